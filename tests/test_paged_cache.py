"""The paged KV pool gives exactly what a full causal forward gives, wherever its blocks lie."""

from __future__ import annotations

import pytest
import torch

from tramontane import load_model
from tramontane.cache import PagedKVCache, quantize_vectors
from tramontane.step_backends import choose_backend

from test_native_decode import native_runs

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


TABLES = [[9, 3, 17, 1, 12, 5], [4, 20, 2, 15]]


def paged_decode(model, dtype: torch.dtype, native: bool) -> tuple[torch.Tensor, PagedKVCache]:
    """Two sequences of different lengths in scattered blocks, prefilled, then 6 decode steps together,
    fed fixed tokens; on the native decode attention over block tables or on the torch gather."""
    pool = PagedKVCache.create(model.args, n_blocks=24, block_size=4, dtype=dtype)
    tables = TABLES
    pool.clear(tables[0] + tables[1])
    lengths = [13, 6]
    backend = choose_backend(model)
    for table, n, seed in zip(tables, lengths, (1, 2)):  # prefilled alike, by the step backend
        backend(prompt(seed, n), torch.arange(n)[None], pool.batch([table], [0]))
    out = []
    step_logits = backend if native else model  # the step backend, or the Python blocks with attention in torch
    for step in range(6):
        tokens = torch.tensor([[(7 * step + 3) % 128], [(5 * step + 1) % 128]])
        positions = torch.tensor([[lengths[0] + step], [lengths[1] + step]])
        out.append(step_logits(tokens, positions, cache=pool.batch(tables, [0, 0]))[:, 0])
    return torch.stack(out), pool


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_native_paged_decode_equals_torch_gather(tiny_hf, dtype, quantize, monkeypatch):
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder, quantize=quantize)
    runs = native_runs(monkeypatch)
    native, pool_n = paged_decode(model, dtype, True)
    assert len(runs) == 2 + 6  # the two prompts (13 and 6 tokens, as rows) and the six decode steps
    torch_path, pool_t = paged_decode(model, dtype, False)
    # (int4: a last-bit difference can carry an activation across a rounding boundary of its second int8
    # part, a step of d / 256; see test_native_decode)
    torch.testing.assert_close(native, torch_path, atol=1e-4 if quantize is None else 2e-3, rtol=1e-4)
    # the kernel stores what `store` stores (int8, bf16, fp16: the same rounding, up to a last-bit
    # difference in the rotated key before it); other blocks are unused
    used = torch.tensor(TABLES[0] + TABLES[1])
    key_tol = 1e-5 if quantize is None else 2e-3
    if dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(pool_n.k[:, used], pool_t.k[:, used], atol=key_tol, rtol=torch.finfo(dtype).eps)
        return
    assert (pool_n.k[:, used].float() - pool_t.k[:, used].float()).abs().max() <= (1 if dtype == torch.int8 else key_tol)
    if dtype == torch.int8:
        assert pool_n.k_scale is not None and pool_t.k_scale is not None
        torch.testing.assert_close(pool_n.k_scale[:, used], pool_t.k_scale[:, used])


@torch.no_grad()
def test_int8_pool_stays_close_to_full_forward(tiny_hf):
    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    tokens = prompt(4, 16)
    pool = PagedKVCache.create(model.args, n_blocks=6, block_size=4, dtype=torch.int8)
    table = [5, 1, 3, 2]
    pool.clear(table)
    first = model(tokens[:, :10], torch.arange(10)[None], cache=pool.batch([table], [0]))
    rest = [model(tokens[:, t : t + 1], torch.tensor([[t]]), cache=pool.batch([table], [0])) for t in range(10, 16)]
    out = torch.cat([first, *rest], dim=1)
    full = model(tokens)
    assert pool.k.dtype == torch.int8
    torch.testing.assert_close(out, full, atol=0.2, rtol=0.05)  # a random model's logits span about +-4
    assert (out.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9


def test_int8_pool_is_a_quarter_of_float32_plus_scales(tiny_hf):
    _, folder = tiny_hf("llama-tied")
    args = load_model(folder).args
    f32 = PagedKVCache.create(args, n_blocks=4, block_size=16)
    i8 = PagedKVCache.create(args, n_blocks=4, block_size=16, dtype=torch.int8)
    per_block = 2 * args.n_layers * args.n_kv_heads * 16  # vectors in one block
    assert f32.block_nbytes() - 16 * 8 == per_block * args.head_dim * 4
    assert i8.block_nbytes() - 16 * 8 == per_block * (args.head_dim + 4)
    with pytest.raises(ValueError, match="dtype"):
        PagedKVCache.create(args, n_blocks=4, dtype=torch.float64)


def test_quantize_vectors_round_trip():
    x = torch.randn(3, 5, 64) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    q, scale = quantize_vectors(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 5)
    assert int(q.abs().max()) == 127
    err = (q.float() * scale[..., None] - x).abs()
    assert bool((err <= scale[..., None] / 2 + 1e-6).all())  # within half a step of each vector's scale
    q0, s0 = quantize_vectors(torch.zeros(2, 8))
    assert bool((q0 == 0).all()) and bool((s0 == 0).all())
