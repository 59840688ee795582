"""The rolling-buffer KV cache gives exactly what a full causal forward gives."""

from __future__ import annotations

import pytest
import torch

from tramontane import KVCache, load_model

LENGTH = 40  # five times the tiny sliding window


def prompt(seed: int, n: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def run_incremental(model, tokens: torch.Tensor, chunk: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Feed `tokens` [1, T] through a cache of `dtype` in chunks of `chunk`, then one by one; logits [1, T, V]."""
    args = model.args
    capacity = args.sliding_window or tokens.shape[1]
    cache = KVCache.create(args, batch_size=1, capacity=capacity, dtype=dtype)
    out = []
    T = tokens.shape[1]
    prefill = T // 2
    for start in range(0, prefill, chunk):
        end = min(start + chunk, prefill)
        pos = torch.arange(start, end)[None]
        out.append(model(tokens[:, start:end], pos, cache=cache))
    for t in range(prefill, T):
        out.append(model(tokens[:, t : t + 1], torch.tensor([[t]]), cache=cache))
    assert cache.capacity == capacity  # memory stays flat however long the sequence
    return torch.cat(out, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3, 8, 13])
def test_incremental_matches_full_forward(tiny_name, tiny_hf, chunk):
    _, folder = tiny_hf(tiny_name)
    model = load_model(folder)
    tokens = prompt(2)
    full = model(tokens)
    torch.testing.assert_close(run_incremental(model, tokens, chunk), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_cache_of_an_fp32_model_stays_close(tiny_name, tiny_hf, dtype):
    # keys and values stored rounded, read back widened to the model's dtype, on the Python blocks (the
    # native kernels read such a cache themselves: test_native_decode)
    _, folder = tiny_hf(tiny_name)
    model = load_model(folder)
    tokens = prompt(5)
    torch.testing.assert_close(run_incremental(model, tokens, 3, dtype), model(tokens), atol=0.1, rtol=0.05)


@torch.no_grad()
def test_rows_at_different_positions_decode_together(tiny_name, tiny_hf):
    _, folder = tiny_hf(tiny_name)
    model = load_model(folder)
    args = model.args
    lengths = [11, 4, 17]
    seqs = [prompt(10 + i, n + 6) for i, n in enumerate(lengths)]
    cache = KVCache.create(args, batch_size=4, capacity=args.sliding_window or 32)
    # Prefill each sequence into its own row (row 3 stays unused), in reversed row order.
    for row, (seq, n) in reversed(list(enumerate(zip(seqs, lengths)))):
        model(seq[:, :n], torch.arange(n)[None], cache=cache, rows=torch.tensor([row]))
    got = []
    for step in range(6):
        toks = torch.stack([s[0, n + step] for s, n in zip(seqs, lengths)])[:, None]
        pos = torch.tensor([[n + step] for n in lengths])
        got.append(model(toks, pos, cache=cache))
    got_t = torch.cat(got, dim=1)  # [3, 6, V]
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        torch.testing.assert_close(got_t[i], model(seq)[0, n:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_keep_compacts_rows(tiny_hf):
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder)
    cache = KVCache.create(model.args, batch_size=3)
    seqs = [prompt(20 + i, 12) for i in range(3)]
    for row, seq in enumerate(seqs):
        model(seq[:, :10], torch.arange(10)[None], cache=cache, rows=torch.tensor([row]))
    cache.keep(torch.tensor([2, 0]))  # drop row 1
    toks = torch.stack([seqs[2][0, 10], seqs[0][0, 10]])[:, None]
    out = model(toks, torch.tensor([[10], [10]]), cache=cache)
    torch.testing.assert_close(out[0, 0], model(seqs[2][:, :11])[0, 10], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, 0], model(seqs[0][:, :11])[0, 10], atol=1e-4, rtol=1e-4)
    assert (cache.positions[2] == -1).all()


@torch.no_grad()
def test_reset_row_serves_a_new_sequence(tiny_hf):
    _, folder = tiny_hf("mistral-nowindow")
    model = load_model(folder)
    cache = KVCache.create(model.args, batch_size=1, capacity=32)
    model(prompt(1, 20), torch.arange(20)[None], cache=cache)
    cache.reset()
    new = prompt(2, 6)
    out = model(new, torch.arange(6)[None], cache=cache)
    torch.testing.assert_close(out, model(new), atol=1e-4, rtol=1e-4)


def test_non_rolling_cache_refuses_overflow(tiny_hf):
    _, folder = tiny_hf("mistral-nowindow")
    model = load_model(folder)
    cache = KVCache.create(model.args, batch_size=1, capacity=8)
    with pytest.raises(ValueError, match="capacity 8"):
        model(prompt(1, 9), torch.arange(9)[None], cache=cache)


def test_cache_needs_positions_and_capacity(tiny_hf):
    _, folder = tiny_hf("mistral-nowindow")
    model = load_model(folder)
    with pytest.raises(ValueError, match="capacity"):
        KVCache.create(model.args, batch_size=1)
    cache = KVCache.create(model.args, batch_size=1, capacity=8)
    with pytest.raises(ValueError, match="positions"):
        model(prompt(1, 4), cache=cache)


def attention_shapes(model, monkeypatch) -> list[tuple[int, int]]:
    """A list that gets (queries per head, keys) of every attention product (while `monkeypatch` holds)."""
    import torch.nn.functional as F

    shapes: list[tuple[int, int]] = []
    real = F.scaled_dot_product_attention
    rep = model.args.n_heads // model.args.n_kv_heads  # query heads that share a key head are stacked

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((q.shape[2] // rep, k.shape[2]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return shapes


@torch.no_grad()
def test_chunked_prefill_bounds_the_attention_matrix(tiny_hf, monkeypatch):
    """A long prompt in chunks never builds a score matrix beyond chunk x (capacity + chunk) in a rolling
    cache, nor beyond chunk x (window + chunk + two blocks) in the engine's paged pool, whose blocks
    leave as the window passes them."""
    from tramontane.generate import generate, prefill
    from tramontane.step_backends import PythonBlocks

    _, folder = tiny_hf("mistral-window")
    model = load_model(folder)  # window 8: capacity 8
    shapes = attention_shapes(model, monkeypatch)
    cache = KVCache.create(model.args, 1)
    prefill(PythonBlocks(model), prompt(3, 100)[0].tolist(), cache, 0, chunk_size=5)  # the native stack would take them
    assert len(shapes) == 20 * model.args.n_layers  # 100 tokens in chunks of 5, every layer
    assert max(q for q, _ in shapes) <= 5
    assert max(q * k for q, k in shapes) <= 5 * (8 + 5)
    shapes.clear()
    with monkeypatch.context() as m:
        m.setattr("tramontane.engine.runner.choose_backend", PythonBlocks)
        generate(model, [prompt(3, 100)[0].tolist()], max_tokens=1, chunk_size=5)
    assert len(shapes) == 20 * model.args.n_layers
    # the window (8) and the chunk (5) span at most two blocks of 16, plus the block the window's start
    # lies in, which is kept whole: three blocks of keys, not the whole prompt's table
    assert max(q * k for q, k in shapes) <= 5 * 3 * 16


def test_each_cache_kind_builds_its_own_step_meta(tiny_hf) -> None:
    """One protocol (layer_kv, attention_mask, commit), one implementation per cache, in its own module."""
    from tramontane.cache import PagedKVCache, PagedStepMeta, RollingStepMeta, StepMeta, step_meta

    _, folder = tiny_hf("mistral-window")
    args = load_model(folder).args
    positions = torch.arange(4)[None]
    rolling = step_meta(positions, 8, KVCache.create(args, 1))
    pool = PagedKVCache.create(args, n_blocks=4, block_size=4)
    pool.clear([1])
    paged = step_meta(positions, 8, pool.batch([[1]], [0]))
    plain = step_meta(positions, 8)
    packed = step_meta(torch.tensor([[0, 1, 0, 1]]), 8, segments=torch.tensor([[0, 0, 1, 1]]))
    assert type(rolling) is RollingStepMeta and type(paged) is PagedStepMeta
    assert type(plain) is StepMeta and plain.is_causal and type(packed) is StepMeta
    assert packed.spans == ((0, 2), (2, 4))  # training's packed rows: attention within each sequence
    for meta in (rolling, paged, plain, packed):
        assert callable(meta.layer_kv) and callable(meta.attention_mask) and callable(meta.commit)


def test_a_chunk_that_attends_to_itself_alone_is_plain_causal_attention() -> None:
    """No mask where every row's positions run on by one from a real position within the window (SDPA's
    own causal attention, half the scores of a long prompt); the mask of `visible` elsewhere."""
    from tramontane.cache.meta import visible, within_chunk

    causal = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    assert within_chunk(causal, None) == (None, True) and within_chunk(causal, 4) == (None, True)
    for positions, window in ((causal, 3), (torch.tensor([[-1, 0, 1, 2]]), None), (torch.tensor([[0, 1, 3, 4]]), None)):
        mask, is_causal = within_chunk(positions, window)
        assert not is_causal and mask is not None and torch.equal(mask, visible(positions, positions, window))
    # a prompt's first chunk into an empty cache row takes that path
    from tramontane.args import ModelArgs
    from tramontane.cache import step_meta

    args = ModelArgs(dim=16, n_layers=1, head_dim=8, hidden_dim=32, n_heads=2, n_kv_heads=1, norm_eps=1e-5,
                     vocab_size=10)
    fresh = step_meta(torch.arange(20)[None], None, KVCache.create(args, 1, 32))
    assert fresh.mask is None and fresh.is_causal
