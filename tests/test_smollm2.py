"""The real SmolLM2-135M-Instruct GGUF: our logits and greedy text equal transformers' on the same file."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tramontane import generate, load_model, load_tokenizer

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "Les vents de la Méditerranée s'appellent",
]


pytestmark = pytest.mark.xdist_group("smollm2_transformers")  # one load of the reference per run


@pytest.fixture(scope="module")
def models(smollm2_gguf_path, smollm2_transformers):
    ours = load_model(smollm2_gguf_path, dequantize=True)  # the same fp32 weights as transformers'
    return ours, smollm2_transformers, load_tokenizer(smollm2_gguf_path)


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


@torch.no_grad()
def test_default_load_keeps_the_files_formats_and_agrees_with_fp32(smollm2_gguf_path, models):
    """By default the file's Q4_1 blocks and Q8_0 embedding stay as they are; decode-sized steps (the
    integer kernels, activations rounded to int8) then agree with the dequantized model on real text
    (measured: 97.3% top-1 over these 256 tokens, perplexity 17.32 against 17.34)."""
    from pydoc_data.topics import topics

    from tramontane import KVCache
    from tramontane.gguf_linear import block_formats
    from tramontane.loading.gguf import gguf_tensor_info

    floats, _, tok = models
    blocks = load_model(smollm2_gguf_path)
    stored = Counter(kind for kind, shape in gguf_tensor_info(smollm2_gguf_path).values() if len(shape) == 2)
    # q/k/v and w1/w3 are fused into one layer each: 7 matrices a block become 4
    assert block_formats(blocks) == {"Q4_1": stored["Q4_1"] * 4 // 7, "Q8_0": stored["Q8_0"]}
    ids = torch.tensor([tok.encode("\n\n".join(topics[k] for k in sorted(topics)), bos=False)[:257]])
    logits = {}
    for label, model in (("fp32", floats), ("blocks", blocks)):
        cache = KVCache.create(model.args, 1, 257)
        logits[label] = torch.cat([model(ids[:, s : s + 16], torch.arange(s, s + 16)[None], cache=cache)[0]
                                   for s in range(0, 256, 16)])
    agree = (logits["fp32"].argmax(-1) == logits["blocks"].argmax(-1)).float().mean().item()
    assert agree >= 0.95
    nll = {k: torch.nn.functional.cross_entropy(v, ids[0, 1:]).item() for k, v in logits.items()}
    assert abs(nll["blocks"] - nll["fp32"]) < 0.01  # perplexity within 1%
    first = [tok.encode(p, bos=True) for p in PROMPTS[:2]]
    for ours, theirs in zip(generate(blocks, first, max_tokens=6), generate(floats, first, max_tokens=6)):
        assert ours.tokens[:3] == theirs.tokens[:3]
