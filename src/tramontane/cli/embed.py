"""`tramontane embed TEXT...`: one vector per text (or per line of stdin), pooled from the final hidden
states: last-token after an appended EOS (what Mistral-architecture embedding models document) or mean."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import CliError, bounded, model_parents, open_for

POOLINGS = ["last", "mean"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser("embed", parents=[common, model_parents()],
                       help="embed texts: one vector per text (an embedding model, or a language model's states)")
    e.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: each line of stdin)")
    e.add_argument("--pooling", choices=POOLINGS, default="last",
                   help="last: the hidden state at an appended EOS (default); mean: averaged over the tokens")
    e.add_argument("--no-normalize", action="store_true", help="keep the vectors' length (default: L2-normalised)")
    e.add_argument("--batch-size", type=bounded(int, 1), default=8, help="texts run together (default 8)")
    e.add_argument("--json", action="store_true",
                   help='print a JSON list of {"text", "embedding"} (default: one line of numbers per text)')
    e.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..embed import embed

    texts = list(a.texts)
    if not texts:
        if sys.stdin.isatty():
            raise CliError("no texts: pass TEXT arguments or pipe lines on stdin")
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise CliError("no texts on stdin")
    opened = open_for(a)
    vectors = embed(opened.model, opened.tokenizer, texts, pooling=a.pooling, normalize=not a.no_normalize,
                    batch_size=a.batch_size)
    if a.json:
        print(json.dumps([{"text": t, "embedding": v.tolist()} for t, v in zip(texts, vectors)]))
    else:
        for v in vectors:
            print(" ".join(f"{x:.7g}" for x in v.tolist()))
    return 0
