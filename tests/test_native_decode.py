"""The native decode stack (kernels/decode.cpp) against the Python blocks it stands in for."""

from __future__ import annotations

import pytest
import torch

from tramontane import KVCache, load_model
from tramontane.generate import decode_step, prefill
from tramontane.kernels import load_kernels
from tramontane.quantize import Int4Linear
from tramontane.step_backends import NativeBlocks, PythonBlocks, choose_backend


def decode_logits(model, prompts: list[list[int]], steps: int, native: bool) -> list[torch.Tensor]:
    """Prefill each prompt into its own row, then `steps` decode steps of all rows together, fed fixed
    tokens (so a near-tie cannot send the two paths down different continuations)."""
    return [pair[0 if native else 1] for pair in paired_steps(model, prompts, steps)]


def paired_steps(model, prompts: list[list[int]], steps: int, capacity: int = 64) -> list[tuple[torch.Tensor, ...]]:
    """Per decode step, (logits, cache keys) of the native stack and of the Python blocks, both from the
    same cache (of `capacity` positions per row): the Python blocks' (a copy goes to the native stack), so
    differences cannot compound."""
    cache = KVCache.create(model.args, len(prompts), capacity, dtype=model.dtype)
    out: list[tuple[torch.Tensor, ...]] = []
    backend = choose_backend(model)
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            prefill(backend, p, cache, row, chunk_size=8)
        positions = torch.tensor([len(p) for p in prompts])
        for step in range(steps):
            tokens = (torch.arange(len(prompts)) * 7 + step * 3) % model.args.vocab_size
            trial = KVCache(cache.k.clone(), cache.v.clone(), cache.positions.clone(), cache.window)
            native = decode_step(backend, tokens, positions, trial)  # the step backend: the native stack
            python = model(tokens[:, None], positions[:, None], cache=cache)[:, 0]  # the Python blocks
            out.append((native, python, trial.k, cache.k.clone()))
            positions = positions + 1
    return out


PROMPTS = [[5, 9, 12, 3, 7, 1, 30, 8, 2, 11], [40, 41, 42], [7] * 20]


@pytest.fixture(params=["best", "avx2"])
def isa(request):
    """The kernels' best instruction set, then AVX2 (the path of CPUs without AVX-512)."""
    ext = load_kernels()
    best = ext.isa()
    if request.param != "best":
        try:
            ext.set_isa(request.param)
        except RuntimeError:
            pytest.skip(f"this CPU has no {request.param}")
    yield ext.isa()
    ext.set_isa(best)


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "int4_asym"])
@pytest.mark.parametrize("name", ["mistral-window", "llama-tied"])
def test_native_stack_equals_python_blocks(tiny_hf, name, quantize, isa):
    _, folder = tiny_hf(name)
    model = load_model(folder, quantize=quantize)
    for batch in (PROMPTS[:1], PROMPTS):  # one row (PyTorch's matrix-vector path) and three
        steps = paired_steps(model, batch, 40)  # 40 steps: past the window of 32
        assert isinstance(choose_backend(model), NativeBlocks), "the native stack was not chosen"
        # int4 splits activations into two int8 parts: a last-bit difference in a norm can carry one across a
        # rounding boundary of its second part, a step of d / 256 (d = max|x| / 127 of its block of 32)
        tol = 1e-4 if quantize in (None, "int8") else 2e-3
        for native, python, native_k, python_k in steps:
            torch.testing.assert_close(native, python, atol=tol, rtol=1e-4)
            torch.testing.assert_close(native_k, python_k, atol=tol, rtol=1e-4)


def test_a_backend_chosen_after_a_change_runs_the_new_weights(tiny_hf):
    """Nothing is revalidated per step: a model changed after a backend was chosen gets a new backend,
    whose native stack holds the new modules and weights."""
    _, folder = tiny_hf("mistral-nowindow")
    model = load_model(folder)
    first = choose_backend(model)
    with torch.no_grad():  # a new module in one block
        old = model.layers[1].attention.wo
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight.copy_(old.weight * 0.5)
        model.layers[1].attention.wo = new
    second = choose_backend(model)
    assert isinstance(second, NativeBlocks) and second.stack is not first.stack
    for a, b in zip(decode_logits(model, PROMPTS[:1], 3, True), decode_logits(model, PROMPTS[:1], 3, False)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # a new weight tensor in a module the stack already holds, and a new norm weight
    ffn, norm = model.layers[0].feed_forward.w2, model.layers[1].ffn_norm
    ffn.weight = torch.nn.Parameter(ffn.weight.detach() * 0.5, requires_grad=False)
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 2.0, requires_grad=False)
    for a, b in zip(decode_logits(model, PROMPTS[:1], 3, True), decode_logits(model, PROMPTS[:1], 3, False)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("interleave", [False, True])
def test_choosing_a_backend_repacks_int4_as_the_policy_says(tiny_hf, use_policy, interleave):
    _, folder = tiny_hf("llama-tied")  # tied: the head's rows are also the embedding table's
    model = load_model(folder, quantize="int4_asym")
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(x)
    chunked = prefill(PythonBlocks(model), x[0].tolist(), KVCache.create(model.args, 1, 32), 0, chunk_size=4)
    use_policy(interleaved=frozenset({"int4"} if interleave else ()))
    step = choose_backend(model)
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert int4 and all(m.interleaved == (interleave and m.out_features % 8 == 0) for m in int4)
    assert any(m.interleaved for m in int4) == interleave
    torch.testing.assert_close(model(x), before, atol=2e-3, rtol=1e-4)  # prefill, the embeddings, the head
    # chunks of 4 rows: the int4 kernels, in the native stack now
    logits = prefill(step, x[0].tolist(), KVCache.create(model.args, 1, 32), 0, chunk_size=4)
    torch.testing.assert_close(logits, chunked, atol=2e-3, rtol=1e-4)


def test_mixture_of_experts_stays_in_python(tiny_hf):
    _, folder = tiny_hf("mixtral")
    model = load_model(folder)
    assert isinstance(choose_backend(model), PythonBlocks)
    decode_logits(model, PROMPTS[:1], 2, True)


def test_a_long_context_splits_between_threads_and_equals_python_blocks(tiny_hf, isa):
    """Past 128 keys a contiguous row's attention runs in parts over its slots (one block of 300 here,
    so the parts split a block), combined by their largest scores: the same logits as the Python blocks."""
    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    prompt = [(11 * i + 5) % model.args.vocab_size for i in range(250)]
    for native, python, native_k, python_k in paired_steps(model, [prompt], 5, capacity=300):
        torch.testing.assert_close(native, python, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(native_k, python_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_long_paged_context_equals_the_torch_gather(tiny_hf, dtype, isa):
    """A decode step over 250 positions in 16 scattered blocks of a pool in each stored type: the parts
    split the blocks' slots, four keys at a time and one at a time at a part's edges; the logits equal
    the Python blocks' over the same pool."""
    from tramontane.cache import PagedKVCache

    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    n = 250
    pool = PagedKVCache.create(model.args, n_blocks=20, block_size=16, dtype=dtype)
    table = list(range(19, 3, -1))  # 16 blocks, in reverse order
    pool.clear(table)
    ids = torch.tensor([[(11 * i + 5) % model.args.vocab_size for i in range(n)]])
    token, position = torch.tensor([[7]]), torch.tensor([[n]])
    with torch.inference_mode():
        model(ids, torch.arange(n)[None], cache=pool.batch([table], [0]))
        native = choose_backend(model)(token, position, pool.batch([table], [0]))
        python = model(token, position, cache=pool.batch([table], [0]))
    torch.testing.assert_close(native, python, atol=1e-4, rtol=1e-4)


def native_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets one entry each time the native stack runs a step (while `monkeypatch` holds)."""
    runs: list[int] = []
    real = NativeBlocks.run

    def counted(self, tokens, meta, last_only, logits_of=None):
        runs.append(1)
        return real(self, tokens, meta, last_only, logits_of)

    monkeypatch.setattr(NativeBlocks, "run", counted)
    return runs


def chunked_prefill(model, tokens: list[int], chunks: list[int], paged: bool, native: bool, monkeypatch
                    ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Logits of `tokens` fed in chunks of the given sizes over a fresh cache (a paged pool, or one
    KVCache row), the keys stored, and how many chunks ran on the native stack."""
    from tramontane.cache import PagedBatch, PagedKVCache

    cache: KVCache | PagedBatch
    if paged:
        pool = PagedKVCache.create(model.args, n_blocks=12, block_size=4)
        table = [9, 3, 11, 1, 7, 5, 2]
        pool.clear(table)
        cache, keys = pool.batch([table], [0]), pool.k[:, table]  # (the other blocks were never cleared)
    else:
        cache = KVCache.create(model.args, 1, 32, dtype=model.dtype)  # a window model: capacity = window
        keys = cache.k
    logits = []
    step_logits = choose_backend(model) if native else model  # the step backend, or the Python blocks
    with monkeypatch.context() as m, torch.inference_mode():
        runs = native_runs(m)
        start = 0
        for n in chunks:
            ids = torch.tensor([tokens[start : start + n]])
            logits.append(step_logits(ids, torch.arange(start, start + n)[None], cache=cache))
            start += n
    return logits, keys, len(runs)


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("name", ["mistral-window", "llama-tied"])
def test_short_chunks_run_as_rows_of_the_native_stack(tiny_hf, name, quantize, paged, monkeypatch):
    """A prompt chunk of up to 16 tokens runs on the native stack, each token a row whose key is written
    before any row attends; its logits and stored keys equal the Python blocks'. Chunks of 6, 1 and 9
    from position 0: the second and third attend to earlier chunks, and in the window model (window 8)
    cross the window. A contiguous cache of a window model is a rolling buffer of 8: only the first
    chunk fits before it wraps, and the chunks that wrap stay on the Python blocks."""
    _, folder = tiny_hf(name)
    model = load_model(folder, quantize=quantize)
    tokens = [(7 * i + 3) % model.args.vocab_size for i in range(16)]
    chunks = [6, 1, 9]
    native, native_k, runs = chunked_prefill(model, tokens, chunks, paged, True, monkeypatch)
    python, python_k, none = chunked_prefill(model, tokens, chunks, paged, False, monkeypatch)
    rolling = not paged and model.args.sliding_window is not None
    assert none == 0 and runs == (2 if rolling else 3)  # (the 1-token chunk is a decode step either way)
    for a, b in zip(native, python):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(native_k, python_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [40, 250])
def test_a_rows_logits_do_not_depend_on_the_other_rows_of_its_step(tiny_hf, length, isa):
    """Speculative decoding's greedy tokens equal plain decoding's only if a row's logits are the same bits
    whether it runs alone or with other rows (drafts after it, other sequences beside it): the attention
    parts and the products' tiles must not depend on the step's size."""
    from tramontane.cache import PagedKVCache

    _, folder = tiny_hf("llama-tied")
    model = load_model(folder, quantize="int4")
    pool = PagedKVCache.create(model.args, n_blocks=40, block_size=16)
    tables = [list(range(1, 20)), list(range(20, 39))]
    pool.clear(tables[0] + tables[1])
    backend = choose_backend(model)
    ids = [[(11 * i + 5 + 3 * s) % model.args.vocab_size for i in range(length)] for s in range(2)]
    with torch.inference_mode():
        for table, prompt in zip(tables, ids):
            model(torch.tensor([prompt]), torch.arange(length)[None], cache=pool.batch([table], [0]))
        alone = backend(torch.tensor([[7]]), torch.tensor([[length]]), pool.batch(tables[:1], [0]))[0, 0]
        with_drafts = backend(torch.tensor([[7, 9, 4, 2]]), torch.arange(length, length + 4)[None],
                              pool.batch(tables[:1], [0]))[0, 0]
        beside = backend(torch.tensor([[7], [3]]), torch.tensor([[length], [length]]), pool.batch(tables, [0, 0]))[0, 0]
    assert torch.equal(alone, with_drafts)
    assert torch.equal(alone, beside)
