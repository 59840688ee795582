"""The real SmolLM2-135M-Instruct GGUF: our logits and greedy text equal transformers' on the same file."""

from __future__ import annotations

import pytest
import torch
import transformers

from tramontane import generate, load_model, load_tokenizer

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "Les vents de la Méditerranée s'appellent",
]


@pytest.fixture(scope="module")
def models(smollm2_gguf_path):
    ours = load_model(smollm2_gguf_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    ).eval()
    return ours, ref, load_tokenizer(smollm2_gguf_path)


@torch.no_grad()
def test_top1_identical_at_every_position(models):
    ours, ref, tok = models
    chat = tok.encode_chat([{"role": "user", "content": "Name three winds of the Mediterranean."}])
    for ids in [tok.encode(p, bos=True) for p in PROMPTS] + [chat]:
        x = torch.tensor([ids])
        a, b = ours(x), ref(x).logits
        assert (a.argmax(-1) == b.argmax(-1)).all()
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)


@torch.no_grad()
def test_greedy_continuations_identical(models):
    ours, ref, tok = models
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    got = generate(ours, prompts, max_tokens=24)
    for ids, g in zip(prompts, got):
        x = torch.tensor([ids])
        theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert g.tokens == theirs[0, len(ids):].tolist()
    assert tok.decode(got[0].tokens).startswith(" Paris")
