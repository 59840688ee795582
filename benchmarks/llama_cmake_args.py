"""CMAKE_ARGS for building llama-cpp-python here: native, except that AMX stays off.

llama.cpp's native build uses AMX tiles where the CPU lists them; inside some VMs the kernel does not
grant them and the first decode segfaults (seen on the Xeon this project benchmarks on). Without AMX
the same AVX-512/VNNI kernels are built explicitly.
"""

from __future__ import annotations

from pathlib import Path

# An AVX2-only build (no AVX-512, no AVX-VNNI: Haswell to Skylake client, Zen 1-3): the peer of our AVX2
# path on any CPU, so that a machine with AVX-512 still measures what AVX2-only users get.
AVX2_ONLY = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_AVX512=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_BF16=OFF",
             "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def cmake_args() -> list[str]:
    """The cmake options for this CPU: none (a native build) unless it lists AMX."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return []
    if not any(f.startswith("amx") for f in flags):
        return []  # a plain native build is fine
    wanted = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
              "avx512f": "GGML_AVX512", "avx512_vnni": "GGML_AVX512_VNNI", "avx512vbmi": "GGML_AVX512_VBMI",
              "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    args += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in wanted.items()]
    return args


def main() -> None:
    print(" ".join(cmake_args()))


if __name__ == "__main__":
    main()
