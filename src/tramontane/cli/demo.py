"""`tramontane demo`: a few fixed prompts completed in one batch, and the speed."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from .common import bounded, is_leader, model_parents, open_for, sampling, sampling_parents, silent

DEMO_PROMPTS = [
    "The tramontane is a cold wind that",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("demo", parents=[common, model_parents(), sampling_parents()],
                       help="complete a few fixed prompts and show the speed")
    d.add_argument("--max-tokens", type=bounded(int, 1), default=48, help="tokens per prompt (default 48)")
    d.set_defaults(func=run, temperature_default=0.0)


def run(a: argparse.Namespace) -> int:
    from ..loading import read_model_args
    from ..textgen import complete

    opened = open_for(a)
    model = opened.model
    say = print if is_leader(model) else silent
    where = "" if model.parallel is None else f", tp {model.parallel.config.tp} x pp {model.parallel.config.pp} ranks"
    say(f"model: {opened.path.name} ({read_model_args(opened.path).n_params / 1e6:.0f}M parameters, "
        f"{str(model.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads{where})")
    t0 = time.perf_counter()
    results = complete(model, opened.tokenizer, DEMO_PROMPTS, max_tokens=a.max_tokens, seed=a.seed, **sampling(a))
    seconds = time.perf_counter() - t0
    n = sum(len(r.tokens) for r in results)
    for prompt, r in zip(DEMO_PROMPTS, results):
        say(f"\n--- {prompt!r}\n{prompt}{r.text}")
    say(f"\n{n} tokens for {len(results)} prompts in {seconds:.2f}s: {n / seconds:.1f} tokens/s (batched)")
    return 0
