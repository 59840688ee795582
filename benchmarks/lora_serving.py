"""What serving LoRA adapters costs: engine decode throughput on the demo model without an adapter, with one
merged at load (`load_model(lora=)`), and with `--adapters` served together (`multi_lora`), requests spread
over them so every decode step mixes adapters.

    PYTHONPATH=src python benchmarks/lora_serving.py --clients 8 --tokens 32 --rank 16 --adapters 2

The adapters are random (rank `--rank` on every projection), written once to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tramontane.cli import demo_model_path
from tramontane.engine import Engine, EngineEvent, Request
from tramontane.loading import load_model
from tramontane.lora import LoraConfig, LoraLinear, apply_lora
from tramontane.lora.adapters import read_adapter, save_adapter
from tramontane.lora.serving import AdapterRows, serve_adapters
from tramontane.model import Transformer
from tramontane.tokenizer import load_tokenizer

PROMPT = "Write a short story about a lighthouse keeper who"


def make_adapter(path: Path, folder: Path, rank: int, seed: int) -> Path:
    config = LoraConfig(rank=rank, alpha=2 * rank)
    model = apply_lora(load_model(path, dequantize=True), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.01)
    return save_adapter(model, folder, config)


def tokens_per_second(model: Transformer, tokenizer: object, clients: int, tokens: int,
                      rows: AdapterRows | None) -> float:
    """Generated tokens per second of `clients` greedy requests run to the end (adapter i % (n + 1))."""
    engine = Engine(model, tokenizer, max_batch=clients, adapters=rows)
    ids = tokenizer.encode(PROMPT, bos=True)  # type: ignore[attr-defined]
    done: list[EngineEvent] = []
    n = rows.count + 1 if rows is not None else 1
    for i in range(clients):
        engine.submit(Request(list(ids), max_tokens=tokens, emit=done.append, stop_ids=frozenset(), adapter=i % n))
    start = time.perf_counter()
    while engine.step():
        pass
    seconds = time.perf_counter() - start
    return sum(1 for e in done if e.token is not None) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = demo_model_path()
    tokenizer = load_tokenizer(path)
    with tempfile.TemporaryDirectory() as tmp:
        folders = [make_adapter(path, Path(tmp) / f"a{i}", a.rank, i) for i in range(a.adapters)]
        base = load_model(path, dequantize=True)
        merged = load_model(path, dequantize=True, lora=folders[0])
        served = load_model(path, dequantize=True)
        rows = serve_adapters(served, [read_adapter(f, served.args) for f in folders])
        results = {
            "no adapter": tokens_per_second(base, tokenizer, a.clients, a.tokens, None),
            "one adapter, merged at load": tokens_per_second(merged, tokenizer, a.clients, a.tokens, None),
            f"{a.adapters} adapters + base, mixed in each step": tokens_per_second(served, tokenizer, a.clients,
                                                                                   a.tokens, rows),
        }
    print(f"demo model fp32, {a.clients} clients x {a.tokens} tokens, rank {a.rank} on every projection, "
          f"{torch.get_num_threads()} threads")
    for name, tps in results.items():
        print(f"  {name:<40} {tps:8.1f} tokens/s")


if __name__ == "__main__":
    main()
