"""What the one generation loop costs at batch 1: `generate` (which steps an `Engine` over the paged
pool, the loop the server runs) beside the bare step loop it replaced (`prefill` + `decode_step` over
a contiguous `KVCache`, greedy), same model, same process, interleaved rounds, best of each.

    PYTHONPATH=src python benchmarks/generation_loop.py [--tokens 128] [--rounds 5] [FILE.gguf ...]

Default files: SmolLM2 Q4_0 (from `llama_tools.py --files`) and the 7B shape Q4_0 in benchmarks/work
when they are there. PASS: the engine loop keeps at least 95% of the bare loop's tokens/s.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import tramontane  # noqa: E402
from tramontane import KVCache  # noqa: E402
from tramontane.generate import decode_step, prefill  # noqa: E402
from tramontane.step_backends import choose_backend  # noqa: E402

from common import save_result  # noqa: E402

TARGET = 0.95
DEFAULTS = [Path.home() / ".cache/tramontane-bench/models/SmolLM2-135M-Instruct.Q4_0.gguf",
            Path(__file__).parent / "work/mistral7b-q4_0.gguf"]


def bare_loop(model: tramontane.Transformer, prompt: list[int], n: int) -> float:
    """Tokens/s of n greedy decode steps over a KVCache, the prompt prefilled first (not timed)."""
    step = choose_backend(model)
    cache = KVCache.create(model.args, 1, len(prompt) + n + 1, dtype=model.dtype)
    with torch.inference_mode():
        token = prefill(step, prompt, cache, 0, 512).argmax().view(1)
        t0 = time.perf_counter()
        for i in range(n):
            token = decode_step(step, token, torch.tensor([len(prompt) + i]), cache).argmax(-1)
    return n / (time.perf_counter() - t0)


def engine_loop(model: tramontane.Transformer, prompt: list[int], n: int) -> float:
    """Tokens/s of `generate` (greedy) over n tokens, less the time of its prefill and first token."""
    t0 = time.perf_counter()
    tramontane.generate(model, [prompt], max_tokens=1)
    t1 = time.perf_counter()
    tramontane.generate(model, [prompt], max_tokens=n + 1)
    t2 = time.perf_counter()
    return n / ((t2 - t1) - (t1 - t0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    files = a.files or [f for f in DEFAULTS if f.exists()]
    rows = []
    for path in files:
        model = tramontane.load_model(path)
        prompt = [random.Random(0).randrange(100, 30000) for _ in range(16)]
        tokens = a.tokens if model.args.n_params < 1e9 else max(a.tokens // 4, 16)
        engine_loop(model, prompt, 4)  # warm-up
        bare, engine = 0.0, 0.0
        for _ in range(a.rounds):
            bare = max(bare, bare_loop(model, prompt, tokens))
            engine = max(engine, engine_loop(model, prompt, tokens))
        ratio = engine / bare
        verdict = "PASS" if ratio >= TARGET else "MISS"
        print(f"{path.name:<40} bare loop {bare:8.2f} tok/s  engine loop {engine:8.2f} tok/s  "
              f"ratio {ratio:5.3f}  {verdict}")
        rows.append({"file": path.name, "tokens": tokens, "bare_tok_s": bare, "engine_tok_s": engine,
                     "ratio": ratio, "pass": ratio >= TARGET})
        del model
    print(f"saved {save_result('generation_loop', {'target_ratio': TARGET, 'rows': rows})}")


if __name__ == "__main__":
    main()
