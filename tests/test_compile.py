"""The optional torch.compile of the decode step: same tokens as eager, and eager again if it fails.

Dynamo traces the decode step here with the aot_eager backend: the graphs Inductor would compile, without
a C++ compiler run per graph (a minute on 2 cores); Inductor's own code is torch's to test, and the GPU
tier (test_device.py) compiles with it."""

from __future__ import annotations

import pytest
import torch

from tramontane import compile_decode, generate, load_model

PROMPTS = [[5, 9, 12, 3, 7], [40, 41]]


def test_compiled_decode_gives_the_eager_tokens(tiny_hf):
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder, dtype=torch.bfloat16)  # bf16: the whole step is Python blocks for Dynamo
    # one prompt: Dynamo traces a batch of two three times as long (30 s against 10 on 2 cores); the GPU
    # tier's Inductor test decodes both
    eager = [g.tokens for g in generate(model, PROMPTS[:1], max_tokens=8)]
    compile_decode(model, backend="aot_eager")
    compiled = [g.tokens for g in generate(model, PROMPTS[:1], max_tokens=8)]
    assert compiled == eager
    assert model.__dict__["_compiled_decode"].compiled is not None, "compilation failed and fell back"


def test_failed_compilation_falls_back_to_eager_with_a_warning(tiny_hf, monkeypatch):
    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    eager = [g.tokens for g in generate(model, PROMPTS, max_tokens=6)]

    def broken(fn, **_):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    compile_decode(model)
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed.*no C\\+\\+ compiler"):
        again = [g.tokens for g in generate(model, PROMPTS, max_tokens=6)]
    assert again == eager
