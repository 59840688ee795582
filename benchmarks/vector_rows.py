"""Where the vector kernels stop beating dequantize + GEMM: the kernel policy's row limit per instruction set.

A step of N single-token rows (decode rows, or a step's prompt tokens as rows) runs either on the native
stack, whose vector kernels multiply every row against the quantized weights (a cost per row), or on the
Python blocks beyond the policy's limit, which dequantize each weight tile once and multiply all rows in
one GEMM (a fixed cost per step plus a smaller one per row). For each instruction set this CPU has, the
benchmark times both on SmolLM2 Q4_0 (and, with --mistral-7b, the 7B shape Q4_0 on the best one) at
several row counts, only the last row's logits computed, and prints where the GEMM starts to win beside
`kernels/policy.py`'s SMALL_BATCH: PASS when the limit lies below the crossing (one limit serves every
shape: the smallest crossing bounds it), with the last row count where the vector kernels still won by
more than 10%, to show what a limit per shape would gain.

    python benchmarks/vector_rows.py                    # results/vector_rows.json
    python benchmarks/vector_rows.py --mistral-7b --out vector_rows_amd_epyc_zen5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tramontane  # noqa: E402
from tramontane.cache import PagedKVCache  # noqa: E402
from tramontane.cli import demo_model_path  # noqa: E402
from tramontane.kernels import load_kernels  # noqa: E402
from tramontane.kernels.policy import SMALL_BATCH, kernel_policy  # noqa: E402
from tramontane.step_backends import NativeBlocks, choose_backend  # noqa: E402

from common import save_result  # noqa: E402
from llama_tools import smollm2_files  # noqa: E402

ROWS = (16, 32, 48, 64, 96, 128, 192)
ROWS_7B = (32, 64, 96, 128)


@contextlib.contextmanager
def gemm_everywhere() -> Iterator[None]:
    """Every module that asks the kernel policy sees a limit of 0 rows meanwhile: the Python blocks'
    quantized layers dequantize and use the GEMM at any row count (as tests/conftest.py's use_policy)."""
    import tramontane.fuse as fuse
    import tramontane.quantize as quantize
    import tramontane.step_backends as step_backends

    policy = dataclasses.replace(kernel_policy(), small_batch=0)
    modules = (fuse, quantize, step_backends)
    saved = [m.kernel_policy for m in modules]
    for m in modules:
        m.kernel_policy = lambda: policy  # type: ignore[assignment]
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.kernel_policy = f  # type: ignore[assignment]


def step_times(model: tramontane.Transformer, rows: tuple[int, ...], reps: int) -> dict[int, dict[str, float]]:
    """Median milliseconds of a step of N rows on the native stack and on the Python blocks with every
    product a GEMM, per N."""
    backend = choose_backend(model)
    if not isinstance(backend, NativeBlocks):
        raise SystemExit(f"vector_rows: {type(backend).__name__} chosen, not the native stack: nothing to compare")
    vector = dataclasses.replace(backend, small_batch=10**9)  # every row count on the vector kernels
    pool = PagedKVCache.create(model.args, 9, 16)
    table = list(range(1, 9))
    pool.clear(table)
    out = {}
    with torch.inference_mode():
        for n in rows:
            tokens = torch.full((n, 1), 100)  # [N, 1]
            positions = (torch.arange(n) % 120)[:, None]  # [N, 1]
            last = torch.tensor([n - 1])
            times: dict[str, list[float]] = {"vector": [], "gemm": []}
            for rep in range(reps + 1):  # the first round warms up
                for name, step in (("vector", vector), ("gemm", backend.python)):
                    with gemm_everywhere() if name == "gemm" else contextlib.nullcontext():
                        t0 = time.perf_counter()
                        step(tokens, positions, pool.batch([table] * n, [0] * n), logits_of=last)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
            out[n] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return out


def crossing(times: dict[int, dict[str, float]]) -> int | None:
    """The first row count where the GEMM is faster (None: the vector kernels won at every count)."""
    return next((n for n, t in sorted(times.items()) if t["gemm"] < t["vector"]), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--mistral-7b", action="store_true", help="also the 7B shape Q4_0 on the best instruction set")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per row count (default 5; 2 on the 7B)")
    ap.add_argument("--out", default="vector_rows", help="results name under benchmarks/results")
    a = ap.parse_args()
    ext = load_kernels()
    if ext is None:
        raise SystemExit("vector_rows: the kernels are not built (make setup)")
    best = ext.isa()
    isas = [isa for isa in ext.isas() if isa in SMALL_BATCH]
    cases: list[tuple[str, Path, tuple[int, ...], int, list[str]]] = [
        ("SmolLM2 Q4_0", smollm2_files(demo_model_path())["Q4_0"], ROWS, a.reps, isas)]
    if a.mistral_7b:
        from gguf_files import mistral_7b_files

        cases.append(("7B shape Q4_0", mistral_7b_files()["7B_Q4_0"], ROWS_7B, min(a.reps, 2), [best]))
    results: list[dict[str, Any]] = []
    verdicts = []
    try:
        for label, path, rows, reps, on in cases:
            model = tramontane.load_model(path)
            for isa in on:
                ext.set_isa(isa)
                times = step_times(model, rows, reps)
                cross, limit = crossing(times), SMALL_BATCH[isa]
                clear = max((n for n, t in times.items() if t["vector"] * 1.1 < t["gemm"]), default=0)
                print(f"{label}, {isa}: " + "  ".join(f"{n} rows {t['vector']:.1f} / {t['gemm']:.1f} ms"
                                                      for n, t in times.items())
                      + f"  (vector / GEMM); GEMM wins from {cross or 'none of these'}; policy limit {limit}")
                passed = cross is None or limit < cross
                verdicts.append(f"{'PASS' if passed else 'MISS'} {label}, {isa}: limit {limit} below the crossing "
                                f"({cross or f'> {max(rows)}'}; the vector kernels >10% ahead up to {clear} rows)")
                print(verdicts[-1])
                results.append({"model": label, "isa": isa, "ms": {str(n): t for n, t in times.items()},
                                "crossing": cross, "policy_limit": limit})
            del model
    finally:
        ext.set_isa(best)
    print(f"saved {save_result(a.out, {'rows': results, 'verdicts': verdicts})}")


if __name__ == "__main__":
    main()
