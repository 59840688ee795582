"""The paged KV pool gives exactly what a full causal forward gives, wherever its blocks lie."""

from __future__ import annotations

import pytest
import torch

from tramontane import load_model
from tramontane.cache import PagedKVCache

LENGTH = 40  # five times the tiny sliding window


def prompt(seed: int, n: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_paged_incremental_matches_full_forward(tiny_name, tiny_hf, chunk):
    _, folder = tiny_hf(tiny_name)
    model = load_model(folder)
    tokens = prompt(3)
    size = 4
    pool = PagedKVCache.create(model.args, n_blocks=LENGTH // size + 2, block_size=size)
    table = list(range(pool.n_blocks - 1, 0, -1))[: LENGTH // size]  # scattered, in reverse order
    pool.clear(table)
    half = LENGTH // 2
    out = []
    for start in range(0, half, chunk):
        end = min(start + chunk, half)
        out.append(model(tokens[:, start:end], torch.arange(start, end)[None], cache=pool.batch([table], [0])))
    first = 0
    for t in range(half, LENGTH):
        window = model.args.sliding_window
        if window is not None:  # drop the blocks that left the window, as the scheduler does
            gone = (t - window + 1) // size - first
            if gone > 0:
                first += gone
        out.append(model(tokens[:, t : t + 1], torch.tensor([[t]]), cache=pool.batch([table[first:]], [first])))
    full = model(tokens)
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_paged_batch_of_different_lengths_matches_each_alone(tiny_hf):
    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    size = 4
    pool = PagedKVCache.create(model.args, n_blocks=20, block_size=size)
    a, b = prompt(1, 13), prompt(2, 6)
    ta, tb = [3, 7, 1, 9], [5, 2]
    pool.clear(ta + tb)
    model(a[:, :12], torch.arange(12)[None], cache=pool.batch([ta], [0]))
    model(b[:, :5], torch.arange(5)[None], cache=pool.batch([tb], [0]))
    tokens = torch.tensor([[a[0, 12]], [b[0, 5]]])
    logits = model(tokens, torch.tensor([[12], [5]]), cache=pool.batch([ta, tb], [0, 0]))[:, 0]
    torch.testing.assert_close(logits[0], model(a)[0, -1], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], model(b)[0, -1], atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_paged_pool_in_bfloat16_stays_close(tiny_hf):
    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    tokens = prompt(4, 12)
    pool = PagedKVCache.create(model.args, n_blocks=5, block_size=4, dtype=torch.bfloat16)
    pool.clear([1, 2, 3])
    out = model(tokens, torch.arange(12)[None], cache=pool.batch([[1, 2, 3]], [0]))
    assert pool.k.dtype == torch.bfloat16
    torch.testing.assert_close(out, model(tokens), atol=5e-2, rtol=5e-2)


def test_positions_outside_the_table_are_refused(tiny_hf):
    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    pool = PagedKVCache.create(model.args, n_blocks=3, block_size=4)
    with pytest.raises(ValueError, match="block tables"):
        model(prompt(1, 6), torch.arange(6)[None], cache=pool.batch([[1]], [0]))
