"""How many multiply-adds per second one core's vector units give, per instruction: the ceiling each
arithmetic puts on a product, and so on the kernel policy's choices (`kernels/policy.py`: frozen training
products and prefill GEMMs in bf16 only where bf16 is faster than fp32).

Each instruction runs in 16 independent chains over registers (no memory), on one thread, compiled with
the system's C compiler; instructions the CPU lacks are skipped and say so. Prints multiply-adds per
second and the ratio to fp32 FMA:
  - fp32 FMA (vfmadd231ps, 16 per instruction): what PyTorch's fp32 GEMM runs on;
  - bf16 dot (vdpbf16ps, AVX512-BF16, 32): a bf16 GEMM without AMX;
  - fp16 FMA (vfmadd231ph, AVX512-FP16, 32, accumulating in fp16);
  - int8 dot (vpdpbusd, AVX512-VNNI, 64): the integer kernels.

Usage: python benchmarks/dot_rates.py
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from common import save_result

# name -> (cpuinfo flag, compiler flag, multiply-adds per instruction, C type, start, one step)
INSTRUCTIONS = {
    "fp32 FMA (vfmadd231ps)": ("avx512f", "-mavx512f", 16, "__m512", "_mm512_set1_ps(0.001f * {i})",
                               "{c} = _mm512_fmadd_ps(a, {c}, b)"),
    "bf16 dot (vdpbf16ps)": ("avx512_bf16", "-mavx512bf16", 32, "__m512", "_mm512_set1_ps(0.001f * {i})",
                             "{c} = _mm512_dpbf16_ps({c}, (__m512bh)ai, (__m512bh)bi)"),
    "fp16 FMA (vfmadd231ph)": ("avx512_fp16", "-mavx512fp16", 32, "__m512h", "_mm512_set1_ph((_Float16)(0.001f * {i}))",
                               "{c} = _mm512_fmadd_ph(ah, {c}, bh)"),
    "int8 dot (vpdpbusd)": ("avx512_vnni", "-mavx512vnni", 64, "__m512i", "_mm512_set1_epi32({i})",
                            "{c} = _mm512_dpbusd_epi32({c}, ai, bi)"),
}

PROGRAM = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
    __m512 a = _mm512_set1_ps(0.9999f), b = _mm512_set1_ps(0.0001f);
    __m512i ai = _mm512_set1_epi32(0x3f803f80), bi = _mm512_set1_epi32(0x01010101);
    EXTRA
    DECLARE
    long n = 50000000;
    double t = now();
    for (long k = 0; k < n; k++) {
        STEPS
        __asm__ volatile("" : "+v"(a), "+v"(ai));  /* keep the loop from being folded */
    }
    t = now() - t;
    SINK
    (void)b;
    printf("%.6f\n", (double)n * CHAINS / t);
    return 0;
}
"""
CHAINS = 16  # independent accumulators: enough to cover each instruction's latency


def program(kind: str, start: str, step: str) -> str:
    """The C source timing `step` over CHAINS accumulators c0..c15 held in registers (`{c}` in `step`
    and `{i}` in `start` name the accumulator)."""
    chains = range(CHAINS)
    extra = "__m512h ah = _mm512_set1_ph((_Float16)0.999f), bh = _mm512_set1_ph((_Float16)0.001f);" \
        if kind == "__m512h" else ""
    return (PROGRAM.replace("EXTRA", extra)
            .replace("DECLARE", " ".join(f"{kind} c{i} = {start.format(i=i)};" for i in chains))
            .replace("STEPS", " ".join(step.format(c=f"c{i}") + ";" for i in chains))
            .replace("SINK", " ".join(f"volatile {kind} s{i} = c{i}; (void)s{i};" for i in chains))
            .replace("CHAINS", str(CHAINS)))


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))


def build(cc: str, folder: Path, flag: str, kind: str, start: str, step: str) -> Path:
    """The compiled timing program of `step` (see `program`)."""
    source = folder / f"{flag.strip('-')}.c"
    source.write_text(program(kind, start, step))
    binary = source.with_suffix("")
    subprocess.run([cc, "-O2", "-mavx512f", flag, str(source), "-o", str(binary)], check=True)
    return binary


def rate(binary: Path) -> float:
    """Instructions per second that `binary` measures, on one thread (pinned to CPU 0 where taskset exists)."""
    command = ["taskset", "-c", "0", str(binary)] if shutil.which("taskset") else [str(binary)]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("dot_rates: needs a C compiler (cc or gcc) on the PATH")
    flags = cpu_flags()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cpu_flag, cc_flag, per, kind, start, step) in INSTRUCTIONS.items():
            if cpu_flag not in flags:
                print(f"SKIP {name}: this CPU has no {cpu_flag}")
                continue
            binary = build(cc, Path(tmp), cc_flag, kind, start, step)
            per_s = max(rate(binary) for _ in range(3))
            results[name] = {"instructions_per_s": per_s, "macs_per_s": per_s * per}
    base = results.get("fp32 FMA (vfmadd231ps)", {}).get("macs_per_s")
    for name, r in results.items():
        ratio = f"{r['macs_per_s'] / base:.2f}x fp32 FMA" if base else ""
        print(f"{name:24s} {r['instructions_per_s'] / 1e9:5.2f} G instructions/s  "
              f"{r['macs_per_s'] / 1e9:6.1f} G multiply-adds/s  {ratio}")
    print(f"saved {save_result('dot_rates', {'one_core': results})}")


if __name__ == "__main__":
    main()
