"""Start-up: seconds from launching `tramontane serve` and llama.cpp's own C++ `llama-server` on the same
GGUF file until each answers its first completion (one token), the file in the page cache. The two
servers take turns, `--rounds` times, with a pause between starts; prints each time, the medians, their
ratio and PASS/MISS against the GGUF issue's target (load time <= 2x llama.cpp's).

The file is the Mistral 7B shape requantized into Q4_K_M (gguf_files.py writes it), or `--file PATH`.

Usage: python benchmarks/startup.py [--rounds 3] [--file PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve import free_port  # noqa: E402

from common import machine, poll_server, save_result, stop_server  # noqa: E402
from llama_tools import build  # noqa: E402


def time_to_answer(argv: list[str], port: int, label: str) -> float:
    """Seconds from starting `argv` until its server completes one token at `port`."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answered() -> float | None:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": "The wind", "max_tokens": 1, "temperature": 0})
        return time.perf_counter() - start if r.status_code == 200 else None

    try:
        return poll_server(proc, label, answered, 0.05, lambda: f": run its command to see why: {argv}")
    finally:
        stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--file", type=Path, help="a GGUF file (default: the Mistral 7B shape's Q4_K_M)")
    a = ap.parse_args()
    if a.file is None:
        from gguf_files import mistral_7b_files

        a.file = mistral_7b_files()["7B_Q4_K_M"]
    gguf = str(a.file)
    with open(gguf, "rb") as f:  # into the page cache, as the target says
        while f.read(64 << 20):
            pass
    threads = str(os.cpu_count() or 1)
    argvs = {
        "tramontane serve": lambda port: [sys.executable, "-m", "tramontane.cli", "serve", "--model", gguf,
                                          "--port", str(port), "--max-batch", "8", "--max-seq-len", "512",
                                          "--log-level", "warning"],
        "llama-server": lambda port: [str(build() / "llama-server"), "-m", gguf, "--port", str(port), "-t", threads,
                                      "-np", "8", "-c", str(8 * 512), "--log-disable"],
    }
    info = machine()
    print(f"{info['date']}  {info['cpu']}  {info['cores']} cores; {gguf} ({Path(gguf).stat().st_size / 2**30:.2f} GiB)")
    times: dict[str, list[float]] = {label: [] for label in argvs}
    for round_ in range(a.rounds):
        for label, argv in argvs.items():
            time.sleep(3)  # the previous process's memory goes back first
            port = free_port()
            times[label].append(time_to_answer(argv(port), port, label))
            print(f"round {round_ + 1}: {label:<17} {times[label][-1]:6.2f} s", flush=True)
    ours, theirs = (statistics.median(times[label]) for label in argvs)
    ratio = ours / theirs
    line = (f"{'PASS' if ratio <= 2.0 else 'MISS'} start-up to the first answer {ours:.2f} s vs llama-server "
            f"{theirs:.2f} s ({ratio:.2f}x, target <= 2x)")
    print(line)
    print(f"saved {save_result('startup', {'file': gguf, 'times': times, 'ratio': ratio, 'verdict': line})}")


if __name__ == "__main__":
    main()
