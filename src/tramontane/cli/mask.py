"""`tramontane mask TEXT...`: which tokens each token attends to, drawn as a grid."""

from __future__ import annotations

import argparse
from typing import Any

from ..loading.options import resolve_model
from .common import CliError, bounded


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    mk = sub.add_parser("mask", parents=[common],
                        help="draw which tokens each token attends to (causal, sliding window), one grid per prompt")
    mk.add_argument("texts", nargs="+", metavar="TEXT", help="prompt(s); several are several batch rows")
    mk.add_argument("--model", help="checkpoint whose tokenizer and attention rule to use (default: embedded SmolLM2)")
    mk.add_argument("--window", type=bounded(int, 1), default=None, help="sliding window to show instead of the model's")
    mk.add_argument("--png", default=None, metavar="FILE", help="also draw the grids into a PNG (needs matplotlib)")
    mk.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..mask_viz import visualize_mask

    try:
        print(visualize_mask(resolve_model(a.model), a.texts, window=a.window, png=a.png))
    except ImportError as e:
        raise CliError(str(e)) from e
    if a.png:
        print(f"wrote {a.png}")
    return 0
