"""The native decode stack (kernels/decode.cpp) against the Python blocks it stands in for."""

from __future__ import annotations

import pytest
import torch

import tramontane.model as model_module
from tramontane import KVCache, load_model
from tramontane.generate import decode_step, prefill
from tramontane.kernels import qlinear


def decode_logits(model, prompts: list[list[int]], steps: int, native: bool, monkeypatch) -> list[torch.Tensor]:
    """Prefill each prompt into its own row, then `steps` decode steps of all rows together, fed fixed
    tokens (so a near-tie cannot send the two paths down different continuations)."""
    return [pair[0 if native else 1] for pair in paired_steps(model, prompts, steps, monkeypatch)]


def paired_steps(model, prompts: list[list[int]], steps: int, monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """Per decode step, (logits, cache keys) of the native stack and of the Python blocks, both from the
    same cache: the Python blocks' (a copy goes to the native stack), so differences cannot compound."""
    cache = KVCache.create(model.args, len(prompts), 64, dtype=model.dtype)
    out: list[tuple[torch.Tensor, ...]] = []
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            prefill(model, p, cache, row, chunk_size=8)
        positions = torch.tensor([len(p) for p in prompts])
        for step in range(steps):
            tokens = (torch.arange(len(prompts)) * 7 + step * 3) % model.args.vocab_size
            trial = KVCache(cache.k.clone(), cache.v.clone(), cache.positions.clone(), cache.window)
            native = decode_step(model, tokens, positions, trial)
            with monkeypatch.context() as m:
                m.setattr(model_module, "native_stack", lambda *_: None)
                python = decode_step(model, tokens, positions, cache)
            out.append((native, python, trial.k, cache.k.clone()))
            positions = positions + 1
    return out


PROMPTS = [[5, 9, 12, 3, 7, 1, 30, 8, 2, 11], [40, 41, 42], [7] * 20]


@pytest.fixture(params=["best", "avx2"])
def isa(request):
    """The kernels' best instruction set, then AVX2 (the path of CPUs without AVX-512)."""
    ext = qlinear()
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
def test_native_stack_equals_python_blocks(tiny_hf, name, quantize, isa, monkeypatch):
    _, folder = tiny_hf(name)
    model = load_model(folder, quantize=quantize)
    for batch in (PROMPTS[:1], PROMPTS):  # one row (PyTorch's matrix-vector path) and three
        steps = paired_steps(model, batch, 40, monkeypatch)  # 40 steps: past the window of 32
        assert model.__dict__["_native_stack"][1] is not None, "the native stack was not used"
        close = 0
        for native, python, native_k, python_k in steps:
            if quantize in (None, "int8"):
                torch.testing.assert_close(native, python, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(native_k, python_k, atol=1e-4, rtol=1e-4)
            else:  # int4 rounds activations to int8: a last-bit difference in a norm can move one rounding
                assert (native - python).abs().max() < 0.2 and (native_k - python_k).abs().max() < 0.2
                close += bool(torch.allclose(native, python, atol=1e-4, rtol=1e-4))
        assert quantize in (None, "int8") or close >= 0.9 * len(steps), f"{close} of {len(steps)} steps agree"


def test_native_stack_follows_replaced_weights(tiny_hf, monkeypatch):
    _, folder = tiny_hf("mistral-nowindow")
    model = load_model(folder)
    decode_logits(model, PROMPTS[:1], 2, True, monkeypatch)
    first = model.__dict__["_native_stack"][1]
    with torch.no_grad():  # a new module in one block: the stack must be rebuilt, not run stale weights
        old = model.layers[1].attention.wo
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight.copy_(old.weight * 0.5)
        model.layers[1].attention.wo = new
    native = decode_logits(model, PROMPTS[:1], 3, True, monkeypatch)
    assert model.__dict__["_native_stack"][1] is not first
    python = decode_logits(model, PROMPTS[:1], 3, False, monkeypatch)
    for a, b in zip(native, python):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    second = model.__dict__["_native_stack"][1]
    # a new weight tensor in a module the stack already holds, and a new norm weight
    ffn, norm = model.layers[0].feed_forward.w2, model.layers[1].ffn_norm
    ffn.weight = torch.nn.Parameter(ffn.weight.detach() * 0.5, requires_grad=False)
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 2.0, requires_grad=False)
    native = decode_logits(model, PROMPTS[:1], 3, True, monkeypatch)
    assert model.__dict__["_native_stack"][1] is not second
    python = decode_logits(model, PROMPTS[:1], 3, False, monkeypatch)
    for a, b in zip(native, python):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_mixture_of_experts_stays_in_python(tiny_hf, monkeypatch):
    _, folder = tiny_hf("mixtral")
    model = load_model(folder)
    decode_logits(model, PROMPTS[:1], 2, True, monkeypatch)
    assert model.__dict__["_native_stack"][1] is None
