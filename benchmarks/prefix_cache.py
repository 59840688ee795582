"""Prefix caching: time to first token of requests that share a long system prompt, with the cache and
without it (`tramontane serve --no-prefix-cache`), on the SmolLM2 GGUF.

Every request is the same ~1,000-token system prompt followed by a different short question. The first
request of a server fills its cache; the later ones should prefill only their question. The two servers
take turns, one request at a time, and the run reports the median TTFT of the later requests, the ratio
(target: >= 5x lower with the cache) and `usage.prompt_tokens_details.cached_tokens` as the server
reports it.

Usage: python benchmarks/prefix_cache.py [--rounds 8] [--system-tokens 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve import Server, free_port  # noqa: E402

from tramontane import load_tokenizer  # noqa: E402
from tramontane.cli import demo_model_path  # noqa: E402

from common import machine, save_result  # noqa: E402

PARAGRAPH = ("The tramontane is a cold wind from the north that crosses the Pyrenees and the Alps and reaches the "
             "Mediterranean coast, where sailors have named and feared it for centuries. ")


def system_prompt(tokens: int) -> str:
    """A system prompt of about `tokens` tokens of the demo model's tokenizer."""
    tok = load_tokenizer(demo_model_path())
    text = "You are a helpful assistant who knows the winds of the Mediterranean.\n"
    while len(tok.encode(text)) < tokens:
        text += PARAGRAPH
    return text


def first_token(client: httpx.Client, server: Server, prompt: str) -> tuple[float, int]:
    """(seconds to the first streamed token, cached prompt tokens the server reports) for one request."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, cached = None, 0
    with client.stream("POST", f"http://127.0.0.1:{server.port}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached) or cached
    return (ttft if ttft is not None else time.perf_counter() - t0), cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8, help="requests per server after the first")
    ap.add_argument("--system-tokens", type=int, default=1000)
    a = ap.parse_args()
    system = system_prompt(a.system_tokens)
    gguf = str(demo_model_path())
    serve_args = ["serve", "--model", gguf, "--max-batch", "4", "--max-seq-len", "2048", "--log-level", "warning"]
    servers = {}
    for label, extra in (("cache", []), ("no cache", ["--no-prefix-cache"])):
        port = free_port()
        servers[label] = Server(label, [sys.executable, "-m", "tramontane.cli", *serve_args, "--port", str(port), *extra],
                                port)
    info = machine()
    print(f"{info['date']}  {info['cpu']}  {info['cores']} cores; SmolLM2-135M Q4_1 GGUF; "
          f"system prompt {a.system_tokens} tokens")
    times: dict[str, list[float]] = {label: [] for label in servers}
    cached: dict[str, list[int]] = {label: [] for label in servers}
    try:
        with httpx.Client(timeout=600) as client:
            for server in servers.values():  # the first request: fills the cache (and warms up)
                first_token(client, server, system + "Question 0: which wind is the coldest?")
            for i in range(1, a.rounds + 1):
                for label, server in servers.items():
                    t, c = first_token(client, server, system + f"Question {i}: where does wind number {i} blow?")
                    times[label].append(t)
                    cached[label].append(c)
    finally:
        for server in servers.values():
            server.stop()
    with_cache, without = statistics.median(times["cache"]), statistics.median(times["no cache"])
    ratio = without / with_cache
    for label in servers:
        print(f"{label:<9} TTFT p50 {statistics.median(times[label]) * 1000:7.1f} ms   "
              f"cached tokens p50 {statistics.median(cached[label]):.0f}")
    print(f"{'PASS' if ratio >= 5 else 'MISS'}  TTFT with a shared {a.system_tokens}-token prefix >= 5x lower with the "
          f"cache: {ratio:.1f}x")
    out = save_result("prefix_cache", {"system_tokens": a.system_tokens, "ttft": times,
                                       "cached_tokens": cached, "ratio": ratio, "pass": ratio >= 5})
    print(f"results: {out}")


if __name__ == "__main__":
    main()
