"""Soak `tramontane serve`: many concurrent clients for minutes, to see that nothing is lost or mixed
and that memory stays flat. A benchmark, not a test: it reports, it does not assert.

The script starts the server itself on 127.0.0.1 with a small --max-queue (so that some requests are
refused with 503), asks each of a pool of distinct prompts alone first (greedy: the reference answers),
then runs N clients until the time is up. Each request is a random prompt from the pool, streamed or
not; a quarter of them disconnect mid-stream. It reports requests sent, answered, refused (503),
disconnected on purpose, errors, answers that differ from the same request answered alone, and the
server's RSS before and after.

Usage:
    python benchmarks/soak.py                       # 64 clients for 180 s on the demo model
    python benchmarks/soak.py --clients 8 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve import free_port  # noqa: E402

from tramontane.cli import demo_model_path  # noqa: E402

from common import stop_server, wait_for_server  # noqa: E402

SUBJECTS = ["the sea", "a lighthouse", "the north wind", "a fisherman", "an old map", "the harbour", "a storm",
            "the mountains", "a sailing boat", "the moon", "a market", "the island"]
STARTS = ["Write one sentence about", "Describe", "Tell me a fact about", "Name a colour that suits"]


def prompt_pool(n: int) -> list[str]:
    """`n` distinct prompts: each answer can be told apart from every other."""
    pool = [f"{s} {t} (request {i})." for i, (s, t) in enumerate((s, t) for t in SUBJECTS for s in STARTS)]
    while len(pool) < n:
        pool.append(f"Count from {len(pool)} upwards:")
    return pool[:n]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class ServerProcess:
    """`tramontane serve` in a child process, on 127.0.0.1 and a free port."""

    def __init__(self, model: Path, max_queue: int, max_batch: int) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "tramontane.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), "--max-queue", str(max_queue), "--max-batch", str(max_batch)]
        self.log = tempfile.TemporaryFile()  # not a pipe: a chatty server would block on a full one
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())
        self.url = f"http://127.0.0.1:{self.port}"
        def log_tail() -> str:
            self.log.seek(0)
            return ": " + self.log.read().decode(errors="replace")[-2000:]

        self.model = wait_for_server(self.proc, self.url, "tramontane serve", log_tail)

    def stop(self) -> None:
        stop_server(self.proc)


async def ask(client: httpx.AsyncClient, server: ServerProcess, prompt: str, max_tokens: int, stream: bool,
              drop_after: int | None) -> tuple[str, str]:
    """(outcome, text): outcome is answered, refused, dropped (disconnected on purpose) or error:<why>."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    url = f"{server.url}/v1/completions"
    if not stream:
        r = await client.post(url, json=body)
        if r.status_code == 503:
            return "refused", ""
        if r.status_code != 200:
            return f"error:{r.status_code}", ""
        return "answered", r.json()["choices"][0]["text"]
    pieces: list[str] = []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code == 503:
            return "refused", ""
        if r.status_code != 200:
            return f"error:{r.status_code}", ""
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "answered", "".join(pieces)
            event = json.loads(line[6:])
            if "error" in event:
                return "error:event", ""
            if event.get("choices"):
                pieces.append(event["choices"][0].get("text") or "")
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                return "dropped", ""  # leaving the `async with` closes the connection mid-stream
    return "error:no [DONE]", ""


async def soak(server: ServerProcess, prompts: list[str], references: dict[str, str], clients: int, seconds: float,
               max_tokens: int, drop_share: float, seed: int) -> dict[str, Any]:
    counts: dict[str, int] = {"sent": 0, "answered": 0, "refused": 0, "dropped": 0, "errors": 0, "differ": 0}
    errors: dict[str, int] = {}
    differing: list[dict[str, str]] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def user(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline:
                prompt = rng.choice(prompts)
                drop = rng.random() < drop_share
                stream = drop or rng.random() < 0.5
                counts["sent"] += 1
                try:
                    outcome, text = await ask(client, server, prompt, max_tokens, stream,
                                              rng.randint(1, max(1, max_tokens // 2)) if drop else None)
                except httpx.HTTPError as e:
                    outcome, text = f"error:{type(e).__name__}", ""
                if outcome.startswith("error"):
                    counts["errors"] += 1
                    errors[outcome] = errors.get(outcome, 0) + 1
                    continue
                counts[outcome] += 1
                if outcome == "refused":
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
                elif outcome == "answered" and text != references[prompt]:
                    counts["differ"] += 1
                    if len(differing) < 5:
                        differing.append({"prompt": prompt, "alone": references[prompt], "under_load": text})

        await asyncio.gather(*(user(i) for i in range(clients)))
    return {**counts, "error_kinds": errors, "differing_examples": differing}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model path (default: the demo SmolLM2 GGUF)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue: small, so that some get 503")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32, help="distinct prompts in the pool")
    p.add_argument("--drop", type=float, default=0.25, help="share of requests that disconnect mid-stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    a = p.parse_args()
    model = Path(a.model) if a.model else demo_model_path()
    server = ServerProcess(model, a.max_queue, a.max_batch)
    try:
        prompts = prompt_pool(a.prompts)
        with httpx.Client(timeout=300) as client:  # each prompt alone, greedy: the reference answers
            references = {}
            for prompt in prompts:
                r = client.post(f"{server.url}/v1/completions", json={
                    "model": server.model, "prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0})
                r.raise_for_status()
                references[prompt] = r.json()["choices"][0]["text"]
        rss_before = rss_bytes(server.proc.pid)
        t0 = time.perf_counter()
        report = asyncio.run(soak(server, prompts, references, a.clients, a.seconds, a.max_tokens, a.drop, a.seed))
        wall = time.perf_counter() - t0
        time.sleep(2)  # let the engine finish what disconnected clients left behind
        rss_after = rss_bytes(server.proc.pid)
        alive = server.proc.poll() is None
    finally:
        server.stop()
    report = {"model": model.name, "clients": a.clients, "seconds": round(wall, 1), "max_queue": a.max_queue,
              "max_batch": a.max_batch, "max_tokens": a.max_tokens, **report, "server_alive_after": alive,
              "rss_before_mib": round(rss_before / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1)}
    print(json.dumps(report, indent=2))
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
