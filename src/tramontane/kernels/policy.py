"""Which kernel runs what: decided once per process, from the CPU's features and one measured rate.

Quantized and fp32 layers, and the native decode stack, ask the one `KernelPolicy` instead of each
deciding for itself: up to `small_batch` rows of activations (decode, short prompt chunks, a step's
prompt tokens as rows) the vector kernels win; beyond, weights are dequantized `prefill_tile` output
rows at a time and multiplied in `gemm_dtype`. The limit is the instruction set's (`SMALL_BATCH`). Training
keeps its frozen float products in the same `gemm_dtype`. The instruction set is the kernels' own
choice (the best the CPU has, `Kernels.isa()`), which tests lower with `set_isa`.

`gemm_dtype` is bf16 where PyTorch's bf16 GEMM outruns its fp32 one by `BF16_MIN_SPEEDUP` on this CPU:
measured once per CPU model and torch version (`bf16_speedup`, a fraction of a second) and kept in
`rates_file()`. A flag cannot tell: with AMX tiles bf16 wins by far, on Zen 4 (AVX512-BF16, no AMX) it
wins too, while on a Xeon held to AVX512-BF16 it lost to fp32 (`benchmarks/dot_rates.py` shows the
instructions' own rates behind each).

Example:
    >>> p = kernel_policy()
    >>> p.vector_wins(rows=4, amx_tiles=False, in_features=4096)
    True
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import Kernels, load_kernels

# bf16 operands round activations and weights to 8 bits of mantissa: worth it only for a clear win.
BF16_MIN_SPEEDUP = 1.25

# Rows of activations up to which the vector kernels beat dequantize + GEMM, per instruction set: short
# of where a row costs the vector kernels as much as the GEMM's row plus its share of dequantizing every
# weight. benchmarks/vector_rows.py on Zen 5, three runs: with AVX-512 VNNI the 7B shape crossed between 64
# and 128 rows and SmolLM2 at 128 or later; with AVX-VNNI SmolLM2 between 64 and 192; with AVX2 alone
# between 48 and 96. The GEMM's side moved by a fifth between runs (this VM's memory speed), so the limits
# sit at the last row count where the vector kernels won in all. One limit serves every shape: the
# smallest crossing bounds it. AMX tiles take any number of rows for the formats they read
# (`vector_wins`); its limit stays the one measured before on a Xeon.
SMALL_BATCH = {"amx": 16, "avx512": 64, "avx_vnni": 64, "avx2": 32}

# Formats interleaved by eights per instruction set (KernelPolicy.interleaved). In cache on Zen 5, one row
# of SmolLM2's 576-wide products: int4 2.6-3.5x faster so, Q5_0 1.3-1.7x, Q8_0 1.45-1.55x with VNNI; with
# AVX2 alone Q8_0 runs slower so (26 against 18 ns a row: its 8-bit codes multiply as two nibbles there,
# where rows in order multiply them whole in int16), so it keeps its rows in order.
INTERLEAVED = {"amx": frozenset(), "avx512": frozenset({"int4", "Q5_0", "Q5_1", "Q8_0"}),
               "avx_vnni": frozenset({"int4", "Q5_0", "Q5_1", "Q8_0"})}
INTERLEAVED_ELSEWHERE = frozenset({"int4", "Q5_0", "Q5_1"})


@dataclass(frozen=True)
class KernelPolicy:
    kernels: Kernels | None  # the compiled kernels; None: plain PyTorch everywhere
    # Up to this many rows of activations the kernels win; beyond, dequantize and use a GEMM (SMALL_BATCH).
    small_batch: int = 16
    # Output rows dequantized at a time for a GEMM (1024 rows beat dequantizing whole matrices on the
    # 1B shape, 512 rows: smaller tiles pay for more, smaller GEMMs; benchmarks/run.py's prefill).
    prefill_tile: int = 1024
    # The operands of big float products: a quantized layer's dequantized tiles (beyond small_batch
    # rows) and training's frozen products (lora.lower_frozen). See the module's docstring.
    gemm_dtype: torch.dtype = torch.float32
    # int8 parts per element of the integer kernels' activations (kernels/common.h, split_ref): 2 on every
    # CPU. One part (llama.cpp's Q8 rounding) halves the dot products, but SmolLM2's top-1 agreement with
    # its fp32 weights fell below the 99% that benchmarks/gguf_files.py asks, while a one-row int4
    # product of the 7B shape ran no faster on Zen 4 (it waits on memory there). Kernels.set_activation_parts
    # gives one part to those who want it.
    activation_parts: int = 2
    # The formats whose weights are repacked into rows interleaved by eights when a backend is chosen
    # (kernels/int4.cpp; InterleavedRows.format_name): one dot product then serves 8 rows, 1.3-4x faster on
    # SmolLM2's int4 decode products and 0.9-1.9x on a 7B-shaped one, which waits on memory
    # (benchmarks/projections.py, Zen 5). None with AMX: its tiles read rows in order (INTERLEAVED).
    interleaved: frozenset[str] = frozenset()
    # The C heap keeps freed memory up to `heap_keep` bytes and serves allocations below `heap_mmap_below`
    # (Kernels.keep_heap): a 512-token prefill ran 1.2-1.35x faster on Zen 5 (SmolLM2 and the 7B shape, Q4_0),
    # as each step's activations and weight tiles no longer come fresh from the system, page fault by page
    # fault. 32 MiB is glibc's own ceiling for its adaptive threshold: bigger blocks are still mapped and
    # unmapped, as they were, since the heap could not reuse them exactly (aligned blocks need a little more
    # than a freed one holds) and would only grow. Up to `heap_keep` stays resident (loading still trims).
    heap_mmap_below: int = 32 << 20
    heap_keep: int = 256 << 20

    @classmethod
    def detect(cls, speedup: Callable[[], float] | None = None) -> KernelPolicy:
        """The policy for this CPU; `speedup` (default `bf16_speedup`) gives bf16's GEMM rate over fp32's."""
        kernels = load_kernels()
        if kernels is None:
            return cls(None)
        fast = (speedup or bf16_speedup)() >= BF16_MIN_SPEEDUP
        policy = cls(kernels, small_batch=SMALL_BATCH.get(kernels.isa(), cls.small_batch),
                     gemm_dtype=torch.bfloat16 if fast else torch.float32,
                     interleaved=INTERLEAVED.get(kernels.isa(), INTERLEAVED_ELSEWHERE))
        kernels.set_activation_parts(policy.activation_parts)
        kernels.keep_heap(policy.heap_mmap_below, policy.heap_keep)
        return policy

    def vector_wins(self, rows: int, amx_tiles: bool, in_features: int) -> bool:
        """Whether a quantized layer's kernel beats dequantize + GEMM for `rows` rows of activations: at
        decode sizes always; at any size on AMX for a kernel whose AMX path decodes each block of 32 to
        bf16 once for all rows (`amx_tiles`: int4, int8 and the GGUF block formats, 2x faster than the
        GEMM), which takes rows of whole blocks of 32 only."""
        if rows <= self.small_batch:
            return True
        return amx_tiles and in_features % 32 == 0 and self.kernels is not None and self.kernels.isa() == "amx"


@functools.lru_cache(maxsize=1)
def kernel_policy() -> KernelPolicy:
    """This process's policy (see the module's docstring)."""
    return KernelPolicy.detect()


def cpu_name() -> str:
    """The CPU's model name as the system reports it (the key of measured rates)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rates_file() -> Path:
    """Where measured rates are kept, per user (the XDG cache folder)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tramontane" / "kernel_rates.json"


def bf16_speedup(path: Path | None = None) -> float:
    """PyTorch's bf16 GEMM rate over its fp32 one on this CPU, read from `path` (default `rates_file()`)
    when this CPU model and torch version were measured before, else measured now and written there."""
    path = path or rates_file()
    key = f"{cpu_name()} | torch {torch.__version__} | bf16/fp32 GEMM"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    speedup = measure_bf16_speedup()
    known[key] = round(speedup, 3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1) + "\n")
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only home: measured again next time
    return speedup


def measure_bf16_speedup(m: int = 256, k: int = 2048, n: int = 1024) -> float:
    """Seconds of an [m, k] x [k, n] fp32 product over the same in bf16, best of three each after a warm-up
    (prefill-sized operands: about 0.1 s in all)."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)
