"""`tramontane complete [PROMPT]`: one prompt (argument or stdin) continued, streamed or as JSON."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from .common import (
    bounded,
    draft_choice,
    from_leader,
    is_leader,
    model_parents,
    open_for,
    read_prompt,
    sampling,
    sampling_parents,
    silent,
    speculative_parents,
)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    co = sub.add_parser("complete", parents=[common, model_parents(), sampling_parents(), speculative_parents()],
                        help="complete one prompt (argument or stdin)")
    co.add_argument("prompt", nargs="?", help="the text to complete (default: read stdin)")
    co.add_argument("--max-tokens", type=bounded(int, 1), default=128, help="most tokens to generate (default 128)")
    co.add_argument("--json", action="store_true", help="print a JSON object with tokens, text and timing")
    co.set_defaults(func=run, temperature_default=0.0)


def run(a: argparse.Namespace) -> int:
    from ..sampling import SamplingParams
    from ..textgen import stream_text

    leader = int(os.environ.get("RANK", "0")) == 0  # torchrun's other ranks take the prompt from rank 0
    text = read_prompt(a.prompt) if leader else ""
    opened = open_for(a)
    model, tokenizer = opened.model, opened.tokenizer
    speculative = draft_choice(a)
    text = from_leader(model, text)
    say = print if is_leader(model) else silent
    ids = tokenizer.encode(text, bos=True)
    t0 = time.perf_counter()
    first = None
    pieces: list[str] = []
    tokens: list[int] = []
    reason = ""
    drafted = accepted = 0
    for ev in stream_text(model, tokenizer, [ids], max_tokens=a.max_tokens, params=SamplingParams(**sampling(a)),
                          seed=a.seed, continuation=True, speculative=speculative, draft_tokens=a.draft_tokens):
        if ev.token is not None:
            tokens.append(ev.token)
            first = first or time.perf_counter()
        pieces.append(ev.text)
        reason = ev.finish_reason or reason
        drafted, accepted = drafted + ev.draft_tokens, accepted + ev.accepted_tokens
        if not a.json:
            say(ev.text, end="", flush=True)
    seconds = time.perf_counter() - t0
    if a.json:
        decode_s = time.perf_counter() - (first or t0)
        out: dict[str, Any] = {
            "prompt": text, "text": "".join(pieces), "tokens": tokens, "finish_reason": reason,
            "prompt_tokens": len(ids), "completion_tokens": len(tokens), "seconds": round(seconds, 4),
            "tokens_per_second": round(max(len(tokens) - 1, 0) / decode_s, 2) if decode_s > 0 else None,
        }
        if speculative is not None:  # every token is an accepted draft or the one token of a step
            out["speculative"] = {"draft_tokens": drafted, "accepted_tokens": accepted,
                                  "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
                                  "tokens_per_step": round(len(tokens) / max(len(tokens) - accepted, 1), 3)}
        say(json.dumps(out))
    else:
        say()
    return 0
