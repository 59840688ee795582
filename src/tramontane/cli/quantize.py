"""`tramontane quantize SRC DST --to int8|int4|int4_asym`: a quantized copy as a native folder."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..quantize import METHODS as QUANT_METHODS
from .common import copy_parents, source_and_destination


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    qz = sub.add_parser("quantize", parents=[common, copy_parents()],
                        help="save a quantized copy (int8, int4, int4_asym) as a native folder")
    qz.add_argument("src", help="native folder, Hugging Face folder or .gguf file")
    qz.add_argument("dst", help="output folder (loads later without quantizing again)")
    qz.add_argument("--to", choices=QUANT_METHODS, required=True, help="scheme")
    qz.add_argument("--group-size", type=int, default=32, help="int4 group size, a multiple of 32 (default 32)")
    qz.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..loading import load_model, save_model
    from ..quantize import QuantConfig

    src, dst = source_and_destination(a)
    config = QuantConfig(a.to, a.group_size)
    t0 = time.perf_counter()
    model = load_model(src, quantize=config, progress=not a.quiet)
    save_model(model, dst, to="native")
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"wrote {a.to} checkpoint to {dst} ({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s)")
    return 0
