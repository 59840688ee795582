"""llama.cpp's own C++ tools (llama-bench, llama-server, llama-quantize): the peer of every benchmark.

They are built once with cmake from the llama.cpp tree vendored in the `llama-cpp-python` sdist on
PyPI, and cached outside the repository (`~/.cache/tramontane-bench/`, or `$TRAMONTANE_BENCH_CACHE`).
The Python binding itself is never the peer: its per-token Python loop flatters us.

    python benchmarks/llama_tools.py            # build (about 15 minutes on 2 cores) and print the bin folder
    python benchmarks/llama_tools.py --files    # also write the SmolLM2 files in every peer format
    python benchmarks/llama_tools.py --avx2     # also an AVX2-only llama-bench (no AVX-512, no AVX-VNNI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from llama_cmake_args import AVX2_ONLY, cmake_args  # noqa: E402

VERSION = "0.3.36"
TOOLS = ("llama-bench", "llama-server", "llama-quantize")
# The formats the GGUF benchmarks compare, each written by llama-quantize from the embedded Q4_1 file.
SMOLLM2_TYPES = ("Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K")


def cache_dir() -> Path:
    return Path(os.environ.get("TRAMONTANE_BENCH_CACHE", Path.home() / ".cache" / "tramontane-bench"))


def source_tree() -> Path:
    """The vendored llama.cpp tree of the pinned sdist, downloaded and unpacked once."""
    root = cache_dir()
    tree = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", str(root)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")  # "data": no member may land outside root
    if not (tree / "CMakeLists.txt").exists():
        raise SystemExit(f"{sdist}: no vendor/llama.cpp inside")
    return tree


def build(avx2: bool = False) -> Path:
    """The folder holding the built tools (built on first call): native for this CPU, or with `avx2`
    llama-bench alone built for AVX2 only."""
    tree = source_tree()
    out = cache_dir() / f"llama.cpp-{VERSION}-build{'-avx2' if avx2 else ''}"
    bin_dir = out / "bin"
    tools = ("llama-bench",) if avx2 else TOOLS
    if all((bin_dir / t).exists() for t in tools):
        return bin_dir
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "-S", str(tree), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", *(AVX2_ONLY if avx2 else cmake_args())],
                   check=True)
    subprocess.run(["cmake", "--build", str(out), "-j", jobs, "--target", *tools], check=True)
    return bin_dir


def llama_bench(path: Path, threads: int, prompt: int, gen: int, avx2: bool = False) -> float:
    """tokens/s of one llama-bench test on `path`: prefill of `prompt` tokens (pp) or decode of `gen` (tg),
    one repetition (the callers interleave their own rounds); `avx2`: the AVX2-only build."""
    cmd = [str(build(avx2) / "llama-bench"), "-m", str(path), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", "1", "-o", "json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return float(out[0]["avg_ts"])


def requantize(source: Path, kind: str, dst: Path) -> Path:
    """`source` written as `kind` (Q4_K_M, Q8_0, ...) by llama-quantize into `dst`, once."""
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".tmp")
        subprocess.run([str(build() / "llama-quantize"), "--allow-requantize", str(source), str(tmp), kind],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.move(tmp, dst)
    return dst


def smollm2_files(source: Path) -> dict[str, Path]:
    """type -> the SmolLM2 file in that format (requantized from `source` by llama-quantize, once)."""
    out_dir = cache_dir() / "models"
    files = {"Q4_1": source}
    for kind in SMOLLM2_TYPES:
        files[kind] = requantize(source, kind, out_dir / f"SmolLM2-135M-Instruct.{kind}.gguf")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", action="store_true", help="also write the SmolLM2 files in every peer format")
    parser.add_argument("--avx2", action="store_true", help="also build an AVX2-only llama-bench")
    opts = parser.parse_args()
    print(build())
    if opts.avx2:
        print(build(avx2=True))
    if opts.files:
        from tramontane.cli import demo_model_path

        for kind, path in smollm2_files(demo_model_path()).items():
            print(kind, path)


if __name__ == "__main__":
    main()
