"""The native decode stack (kernels/decode.cpp) against the Python blocks it stands in for."""

from __future__ import annotations

import pytest
import torch

import tramontane.model as model_module
from tramontane import KVCache, load_model
from tramontane.generate import decode_step, prefill


def decode_logits(model, prompts: list[list[int]], steps: int, native: bool, monkeypatch) -> list[torch.Tensor]:
    """Prefill each prompt into its own row, then `steps` decode steps of all rows together, fed fixed
    tokens (so a near-tie cannot send the two paths down different continuations)."""
    with monkeypatch.context() as m:
        if not native:
            m.setattr(model_module, "native_stack", lambda *_: None)
        cache = KVCache.create(model.args, len(prompts), 64, dtype=model.dtype)
        with torch.inference_mode():
            for row, p in enumerate(prompts):
                prefill(model, p, cache, row, chunk_size=8)
            positions = torch.tensor([len(p) for p in prompts])
            out = []
            for step in range(steps):
                tokens = (torch.arange(len(prompts)) * 7 + step * 3) % model.args.vocab_size
                out.append(decode_step(model, tokens, positions, cache))
                positions = positions + 1
    return out


PROMPTS = [[5, 9, 12, 3, 7, 1, 30, 8, 2, 11], [40, 41, 42], [7] * 20]


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "int4_asym"])
@pytest.mark.parametrize("name", ["mistral-window", "llama-tied"])
def test_native_stack_equals_python_blocks(tiny_hf, name, quantize, monkeypatch):
    _, folder = tiny_hf(name)
    model = load_model(folder, quantize=quantize)
    for batch in (PROMPTS[:1], PROMPTS):  # one row (PyTorch's matrix-vector path) and three
        native = decode_logits(model, batch, 40, True, monkeypatch)  # 40 steps: past the window of 32
        assert model.__dict__["_native_stack"][1] is not None, "the native stack was not used"
        python = decode_logits(model, batch, 40, False, monkeypatch)
        for step, (a, b) in enumerate(zip(native, python)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")


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


def test_mixture_of_experts_stays_in_python(tiny_hf, monkeypatch):
    _, folder = tiny_hf("mixtral")
    model = load_model(folder)
    decode_logits(model, PROMPTS[:1], 2, True, monkeypatch)
    assert model.__dict__["_native_stack"][1] is None
