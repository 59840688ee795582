"""Where one engine step goes: scheduling, block tables, the model forward, sampling, emitting (the
text is made by the consumer, off the engine thread: `engine.text.TextOutput`).

    PYTHONPATH=src python benchmarks/engine_step.py --clients 1 --tokens 64 --quantize int4

Drives `Engine.step` on this thread (no HTTP) with `--clients` concurrent greedy requests on the demo
model (`--json-schema`: each constrained by a small JSON schema) and times each part of the step; for comparison, times `generate` decoding the same prompt alone
(the contiguous cache and the native decode stack). One measurement, not a benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from tramontane import generate
from tramontane.cli import demo_model_path
from tramontane.engine import Engine, Request
from tramontane.engine.grammar import Matcher, response_format_grammar
from tramontane.loading import load_model
from tramontane.sampling import SamplingParams
from tramontane.tokenizer import load_tokenizer

# a small schema whose strings never end (no maxLength), so a constrained request runs its --tokens
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array",
                                                                              "items": {"type": "string"}}},
          "required": ["name", "tags"]}


def timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "float16", "int8"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json-schema", action="store_true", help="constrain every request to a small JSON schema")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample (default: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    a = ap.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    path = demo_model_path()
    model = load_model(path, quantize=a.quantize)
    tokenizer = load_tokenizer(path)
    prompt = tokenizer.encode("The history of the wind called tramontane begins")
    generate(model, [prompt], max_tokens=8)  # warm up (native kernels, allocator)
    start = time.perf_counter()
    generate(model, [prompt], max_tokens=a.tokens)
    alone = (time.perf_counter() - start) / a.tokens

    kv_dtype = None if a.kv_cache_dtype is None else getattr(torch, a.kv_cache_dtype)
    engine = Engine(model, tokenizer, max_batch=max(a.clients, 1), max_seq_len=1024, kv_dtype=kv_dtype)
    totals: dict[str, float] = defaultdict(float)
    engine.scheduler.schedule = timed(totals, "schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    engine.pool.batch = timed(totals, "block tables", engine.pool.batch)  # type: ignore[method-assign]
    model.forward = timed(totals, "model forward", model.forward)  # type: ignore[method-assign]
    engine.runner.execute = timed(totals, "runner (tables + forward)", engine.runner.execute)  # type: ignore[method-assign]
    engine._sample = timed(totals, "sample + accept + emit", engine._sample)  # type: ignore[method-assign]
    engine_module = sys.modules[Engine.__module__]
    engine_module.sample_rows = timed(totals, "  sampling", engine_module.sample_rows)  # type: ignore[attr-defined]
    Matcher.mask = timed(totals, "  grammar mask", Matcher.mask)  # type: ignore[method-assign]
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}) \
        if a.json_schema else None
    for _round in ("warm-up", "measured"):
        totals.clear()
        for _ in range(a.clients):
            engine.submit(Request(list(prompt), max_tokens=a.tokens, emit=lambda ev: None, seed=0,
                                  params=SamplingParams(temperature=a.temperature, top_p=a.top_p),
                                  stop_ids=frozenset(), grammar=grammar))
        steps = 0
        start = time.perf_counter()
        while engine.step():
            steps += 1
        wall = time.perf_counter() - start
    print(f"{steps} steps, {a.clients} clients, {wall / steps * 1e3:.2f} ms per step "
          f"(generate alone: {alone * 1e3:.2f} ms per token)")
    for name, seconds in totals.items():
        print(f"  {name:28s} {seconds / steps * 1e3:7.3f} ms/step  {100 * seconds / wall:5.1f}%")
    python = wall - totals["model forward"]
    print(f"  {'outside the model forward':28s} {python / steps * 1e3:7.3f} ms/step  {100 * python / wall:5.1f}%")


if __name__ == "__main__":
    main()
