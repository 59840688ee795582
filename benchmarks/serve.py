"""Serving throughput: `tramontane serve` beside llama.cpp's own C++ `llama-server` (llama_tools.py) on the same
SmolLM2 GGUF, both on 127.0.0.1, driven by the same OpenAI-style clients, streamed and not.

The SmolLM2 file is Q4_0 by default (the issue's), written by `llama-quantize` from the embedded Q4_1
(`--file` picks another). For 1, 4, 16 and 32 concurrent clients (the two servers taking turns at each
level), every client sends `--requests` completions (default 16 / clients, at least 2: a connection's
first request pays for the connection, so one client's TTFT needs more than two samples) of
`--max-tokens` tokens at temperature 0, streamed, then the same not streamed (whole answers). The run
reports aggregate output tokens/s and p50/p99 time to first token (streamed), each level's medians over
`--rounds` interleaved rounds, then the ratios and PASS/MISS for the issue's targets.

With `--mistral-7b [Q4_0|Q4_K_M]` the file is the Mistral 7B shape as random Q4_0 blocks, or those
requantized into Q4_K_M (gguf_files.py writes both; SmolLM2's tokenizer), at 1 and 8 clients with 8
slots each, 32 tokens per completion, one request per client: the serving issue's 7B target (>= 1.2x
llama-server at 1 and at 8 clients).

Usage: python benchmarks/serve.py [--quick] [--quantize int4_asym] [--mistral-7b [Q4_K_M]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tramontane.cli import demo_model_path  # noqa: E402

from common import RESULTS, machine, stop_server, wait_for_server  # noqa: E402
from llama_tools import build, smollm2_files  # noqa: E402

PROMPTS = [
    "The history of the Mediterranean winds begins with",
    "Write a short story about a lighthouse keeper who",
    "The three most important ideas in computer science are",
    "Once upon a time, in a village by the sea,",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, label: str, argv: list[str], port: int) -> None:
        self.label, self.port, self.model = label, port, ""
        # the server's own log, for when it fails mid-run (benchmarks/work/ is ignored by git)
        self.log_path = HERE / "work" / f"serve-{port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log_path.open("w"))
        self.model = wait_for_server(self.proc, f"http://127.0.0.1:{port}", label)

    def stop(self) -> None:
        stop_server(self.proc)
        if self.log_path.stat().st_size == 0:  # nothing went wrong: no log to keep
            self.log_path.unlink()


async def one_request(client: httpx.AsyncClient, port: int, model: str, prompt: str,
                      max_tokens: int, stream: bool = True) -> tuple[float, int]:
    """(time to first token, tokens received) for one completion; not streamed, the first token comes
    with the whole answer and the tokens are the answer's `usage.completion_tokens`."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    url = f"http://127.0.0.1:{port}/v1/completions"
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])
    ttft = None
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def load(server: Server, clients: int, requests: int, max_tokens: int, stream: bool = True) -> dict[str, float]:
    port, model = server.port, server.model
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        errors: list[str] = []

        async def user(i: int) -> list[tuple[float, int]]:
            done = []
            for j in range(requests):
                try:
                    done.append(await one_request(client, port, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens,
                                                  stream))
                except httpx.TransportError as e:  # counted and reported, not fatal: which server dropped it matters
                    errors.append(f"{type(e).__name__}: {e}")
            return done

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    for error in sorted(set(errors)):
        print(f"  {server.label}: {errors.count(error)} request(s) failed: {error}", flush=True)
    ttfts = sorted(t for t, _ in results) or [float("nan")]
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {"tok_s": sum(n for _, n in results) / wall, "ttft_p50": statistics.median(ttfts), "ttft_p99": p99,
            "errors": len(errors)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", help="client counts to run, comma-separated (default 1,4,16,32; --quick 1,4,16; "
                                      "the 7B shape 1,8)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the checks take their medians")
    ap.add_argument("--quantize", default="none",
                    help="tramontane's weights: none (default: the file's own blocks), int4, int8")
    ap.add_argument("--max-tokens", type=int, help="tokens per completion (default 64; 32 with --mistral-7b)")
    ap.add_argument("--requests", type=int, help="requests per client (default: 16 / clients, at least 2, so that "
                                                 "one client's TTFT p50 is a median of 16; 1 with --mistral-7b)")
    ap.add_argument("--mistral-7b", nargs="?", const="Q4_0", choices=["Q4_0", "Q4_K_M"],
                    help="the 7B shape's random Q4_0 file (or its Q4_K_M requantization) at 1 and 8 clients")
    ap.add_argument("--file", default="Q4_0", choices=["Q4_1", "Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"],
                    help="which SmolLM2 file: the embedded Q4_1 or one llama-quantize writes from it (default "
                         "Q4_0, the issue's file)")
    ap.add_argument("--out", help="results name under benchmarks/results (default: serve, serve_FILE or serve_7b_FILE), "
                                  "to keep another CPU's run beside the last")
    a = ap.parse_args()
    if a.mistral_7b:
        from gguf_files import mistral_7b_files

        kind = a.mistral_7b
        gguf, name, slots, levels = str(mistral_7b_files()[f"7B_{kind}"]), f"Mistral 7B shape {kind}", 8, [1, 8]
        tokens, requests = 32, 1
    else:
        gguf, name, slots = str(smollm2_files(demo_model_path())[a.file]), f"SmolLM2-135M {a.file}", 32
        levels = [1, 4, 16] if a.quick else [1, 4, 16, 32]
        tokens, requests = 64, None
    if a.clients:
        levels = [int(c) for c in a.clients.split(",")]
    tokens = a.max_tokens or tokens
    threads = str(os.cpu_count() or 1)
    ours_port, llama_port = free_port(), free_port()
    ours_argv = [sys.executable, "-m", "tramontane.cli", "serve", "--model", gguf, "--port", str(ours_port),
                 "--max-batch", str(slots), "--max-seq-len", "512", "--log-level", "warning"]
    if a.quantize != "none":
        ours_argv += ["--quantize", a.quantize]
    # llama.cpp's own C++ server, with as many parallel slots as our batch and the same context per slot
    llama_argv = [str(build() / "llama-server"), "-m", gguf, "--port", str(llama_port), "-t", threads,
                  "-np", str(slots), "-c", str(slots * 512), "--log-disable"]
    info = machine()
    print(f"{info['date']}  {info['cpu']}  {info['cores']} cores; {name} GGUF; ours --quantize {a.quantize}")
    servers = [Server(f"tramontane ({a.quantize})", ours_argv, ours_port), Server("llama.cpp server", llama_argv,
                                                                                   llama_port)]
    rows: list[dict[str, Any]] = []
    try:
        for server in servers:  # warm-up
            asyncio.run(load(server, 1, 1, 8))
        print(f"{'round':>5} {'clients':>7}  {'mode':<8} {'server':<22} {'tok/s':>8} {'TTFT p50':>10} {'TTFT p99':>10}")
        for round_ in range(a.rounds):
            for c in levels:
                for stream in (True, False):
                    for server in servers:
                        r = asyncio.run(load(server, c, a.requests or requests or max(2, 16 // c), tokens, stream))
                        mode = "stream" if stream else "whole"
                        rows.append({"round": round_, "clients": c, "mode": mode, "server": server.label, **r})
                        print(f"{round_:>5} {c:>7}  {mode:<8} {server.label:<22} {r['tok_s']:8.1f} "
                              f"{r['ttft_p50'] * 1e3:8.1f}ms {r['ttft_p99'] * 1e3:8.1f}ms", flush=True)
    finally:
        for server in servers:
            server.stop()

    def medians(prefix: str, mode: str) -> dict[int, dict[str, float]]:
        picked = [r for r in rows if r["server"].startswith(prefix) and r["mode"] == mode]
        return {c: {k: statistics.median(r[k] for r in picked if r["clients"] == c)
                    for k in ("tok_s", "ttft_p50", "ttft_p99")} for c in levels}

    print(f"medians of {a.rounds} round(s):")
    for mode in ("stream", "whole"):
        for c, (o, q) in zip(levels, zip(medians("tramontane", mode).values(), medians("llama", mode).values())):
            print(f"  {mode:<6} {c:>3} clients: ours {o['tok_s']:7.1f} tok/s, llama-server {q['tok_s']:7.1f}: "
                  f"{o['tok_s'] / q['tok_s']:.2f}x" + (f"; TTFT p50 {o['ttft_p50'] * 1e3:.1f} / {q['ttft_p50'] * 1e3:.1f} ms"
                                                     if mode == "stream" else ""))
    ours, peer = medians("tramontane", "stream"), medians("llama", "stream")
    whole, whole_peer = medians("tramontane", "whole"), medians("llama", "whole")
    if a.mistral_7b:
        checks = [(f"{name}, {c} client(s): >= 1.2x llama-server ({mode})", mine[c]["tok_s"] / theirs[c]["tok_s"], 1.2)
                  for c in levels for mode, mine, theirs in (("streamed", ours, peer), ("whole answers", whole, whole_peer))]
    else:
        checks = []
        for c, goal in ((1, 1.0), (16, 1.5)):
            if c in levels:
                checks += [(f"{c} client(s): >= {goal}x llama-server ({mode})", mine[c]["tok_s"] / theirs[c]["tok_s"], goal)
                           for mode, mine, theirs in (("streamed", ours, peer), ("whole answers", whole, whole_peer))]
        if 1 in levels:
            checks.append(("1 client: TTFT p50 <= llama-server's", peer[1]["ttft_p50"] / ours[1]["ttft_p50"], 1.0))
        # under load, the CPU issue's: prompts share steps with the running decodes
        checks += [(f"{c} clients: TTFT p99 <= llama-server's (llama-server's over ours)",
                    peer[c]["ttft_p99"] / ours[c]["ttft_p99"], 1.0) for c in (16, 32) if c in levels]
    for label, ratio, target in checks:
        print(f"{'PASS' if ratio >= target else 'MISS'}  {label}: {ratio:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (f"{a.out}.json" if a.out else f"serve_7b_{a.mistral_7b.lower()}.json" if a.mistral_7b
                     else "serve.json" if a.file == "Q4_0" else f"serve_{a.file.lower()}.json")
    out.write_text(json.dumps({"machine": info, "rows": rows,
                               "targets": [{"target": t, "ratio": r, "pass": r >= g} for t, r, g in checks]},
                              indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
