"""`tramontane convert SRC DST --to native|hf`: any checkpoint (native, HF, GGUF) as a float folder."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import copy_parents, output_dtype, source_and_destination


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("convert", parents=[common, copy_parents(floats=True)],
                       help="convert a checkpoint (native, HF or GGUF) to a native or HF folder")
    c.add_argument("src", help="native folder, Hugging Face folder or .gguf file")
    c.add_argument("dst", help="output folder")
    c.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..loading import load_model, save_model

    src, dst = source_and_destination(a)
    dtype = output_dtype(a.dtype, src)
    t0 = time.perf_counter()
    model = load_model(src, dtype=dtype, dequantize=True, progress=not a.quiet)  # GGUF blocks become floats
    save_model(model, dst, to=a.to)
    print(f"wrote {a.to} checkpoint to {dst} ({dtype}, {time.perf_counter() - t0:.1f}s)")
    return 0
