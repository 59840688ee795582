"""What one decode layer's projections cost, one at a time, against the bytes they read.

Each quantized projection of layer 0 runs its native kernel alone (batch 1, the kernel called directly,
no Python module in between) many times; its weights stay in cache, so the time is the kernel's own
work, not memory's. Where that time is above what the memory allows for the same bytes, decode is
compute-bound there. Rows of two lengths (SmolLM2's 576 and 1536) separate a fixed cost per output row
from a cost per element, the split that says whether a new layout or faster arithmetic pays. Int4
layers that the kernel policy interleaves by eights (kernels/int4.cpp) also run as rows in order, the
layout before, to show what the interleaving gained.

    python benchmarks/projections.py [--model FILE] [--threads 1,2] [--parts 2]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tramontane import load_model
from tramontane.cli import demo_model_path
from tramontane.gguf_linear import BLOCK_FORMATS, BlockLinear
from tramontane.kernels import Kernels, load_kernels
from tramontane.quantize import Int4Linear, rows_in_order
from tramontane.step_backends import choose_backend

from common import save_result


def best_us(fn: Callable[[], object], calls: int = 1000, rounds: int = 5) -> float:
    """The fastest of `rounds` means over `calls` calls, in microseconds."""
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


Call = tuple[int, int, int, Callable[[], object], bool]


def projections(model: torch.nn.Module, ext: Kernels) -> dict[str, Call]:
    """name -> (in features, out features, bytes, a call of its kernel on one row, whether decoding runs
    it); int4 layers that the kernel policy interleaved also as rows in order, the layout before."""
    out: dict[str, Call] = {}
    for name, m in model.layers[0].named_modules():
        if isinstance(m, Int4Linear):
            x = torch.randn(1, m.in_features)
            nbytes = sum(t.numel() * t.element_size() for t in (m.weight, m.scale, m.mins) if t is not None)
            mine = "interleaved" if m.interleaved else "rows"
            out[f"{name} {mine}"] = (m.in_features, m.out_features, nbytes, functools.partial(
                ext.int4_linear, x, m.weight, m.scale, m.mins, m.group_size, m.interleaved), True)
            if m.interleaved:
                out[f"{name} rows"] = (m.in_features, m.out_features, nbytes, functools.partial(
                    ext.int4_linear, x, *rows_in_order(m.weight, m.scale, m.mins), m.group_size), False)
            continue
        if isinstance(m, BlockLinear):
            x = torch.randn(1, m.in_features)
            nbytes = m.weight.numel()
            call = functools.partial(ext.block_linear, x, m.weight, BLOCK_FORMATS[m.kind])
        else:
            continue
        out[name] = (m.in_features, m.out_features, nbytes, call, True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a GGUF file (default: the demo model, SmolLM2 Q4_1)")
    ap.add_argument("--threads", default="1,2", help="thread counts to run, comma-separated")
    ap.add_argument("--parts", type=int, default=None, help="activation parts (1 or 2; default: the kernel policy's)")
    a = ap.parse_args()
    ext = load_kernels()
    if ext is None:
        raise SystemExit("the native kernels are not built: run `make setup`")
    path = a.model or demo_model_path()
    model = load_model(path)
    choose_backend(model)  # the kernel policy, as decoding sets it
    if a.parts:
        ext.set_activation_parts(a.parts)
    print(f"{path.name}: layer 0, batch 1, isa {ext.isa()}, activation parts {ext.activation_parts()}")
    runs: dict[str, dict[str, float]] = {}
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        total_us = total_bytes = 0.0
        for name, (k, n, nbytes, call, decodes) in projections(model, ext).items():
            us = best_us(call)
            if decodes:
                total_us, total_bytes = total_us + us, total_bytes + nbytes
            runs[f"{name} {threads}t"] = {"in": k, "out": n, "us": us, "ns_per_row": us * 1e3 / n,
                                          "gb_s": nbytes / us / 1e3}
            print(f"{threads} threads  {name:24s} {k:5d} -> {n:5d}  {us:7.1f} us  {us * 1e3 / n:5.1f} ns/row  "
                  f"{nbytes / us / 1e3:5.1f} GB/s")
        runs[f"layer {threads}t"] = {"us": total_us, "gb_s": total_bytes / total_us / 1e3}
        print(f"{threads} threads  the layer's projections as decoding runs them: {total_us:.1f} us, {total_bytes / total_us / 1e3:.1f} GB/s")
    print(f"saved {save_result('projections', {'model': path.name, 'isa': ext.isa(), 'parts': ext.activation_parts(), 'runs': runs})}")


if __name__ == "__main__":
    main()
