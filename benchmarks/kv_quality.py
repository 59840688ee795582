"""What a KV cache dtype costs: top-1 agreement with the fp32 cache on SmolLM2, and bytes per token.

    PYTHONPATH=src python benchmarks/kv_quality.py --tokens 2000 --decode 200

The same text (this repository's docs/serving.md, `--tokens` of it) goes through the paged pool once per dtype,
teacher-forced: the first `tokens - decode` positions in prompt chunks of `--chunk` (every key is stored
in the pool's dtype and read back from it), the last `--decode` one token at a time (the decode path: the
native block-table attention, for every dtype). At every position we compare the next-token
argmax with the fp32 pool's, i.e. what greedy decoding would pick, and the logits' distance. Memory per
token is the pool's bytes per position: keys, values, their scales (int8) and the slot's position.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tramontane.cache import PagedKVCache
from tramontane.cli import demo_model_path
from tramontane.loading import load_model
from tramontane.model import Transformer
from tramontane.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
BLOCK = 16


@torch.inference_mode()
def run(model: Transformer, tokens: list[int], dtype: torch.dtype, chunk: int, decode: int
        ) -> tuple[torch.Tensor, PagedKVCache]:
    """Next-token logits [len(tokens), vocab] through a paged pool stored in `dtype`."""
    blocks = -(-len(tokens) // BLOCK)
    pool = PagedKVCache.create(model.args, blocks + 1, BLOCK, dtype=dtype)
    table = list(range(1, blocks + 1))
    pool.clear(table)
    ids = torch.tensor([tokens])
    out = []
    prefill = len(tokens) - decode
    for start in range(0, prefill, chunk):
        end = min(start + chunk, prefill)
        used = table[: -(-end // BLOCK)]
        out.append(model(ids[:, start:end], torch.arange(start, end)[None], cache=pool.batch([used], [0]))[0])
    for t in range(prefill, len(tokens)):
        used = table[: t // BLOCK + 1]
        out.append(model(ids[:, t : t + 1], torch.tensor([[t]]), cache=pool.batch([used], [0]))[0])
    return torch.cat(out), pool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--decode", type=int, default=200, help="how many of the last tokens go one at a time")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--text", type=Path, default=Path(__file__).parent.parent / "docs" / "serving.md")
    a = ap.parse_args()
    path = demo_model_path()
    model = load_model(path, dequantize=True)  # float weights: fast prompt chunks; the KV dtype is what varies
    tokenizer = load_tokenizer(path)
    tokens = tokenizer.encode(a.text.read_text(), bos=True)[: a.tokens]
    if len(tokens) < a.tokens or a.decode > len(tokens):
        raise SystemExit(f"--text {a.text}: {len(tokens)} tokens, fewer than --tokens {a.tokens} or --decode")
    start = time.perf_counter()
    reference, ref_pool = run(model, tokens, torch.float32, a.chunk, a.decode)
    print(f"SmolLM2-135M (demo file, dequantized), {len(tokens)} tokens of {a.text.name}: {len(tokens) - a.decode} in chunks "
          f"of {a.chunk}, {a.decode} decoded one by one; fp32 reference in {time.perf_counter() - start:.1f} s")
    ref_top = reference.argmax(-1)
    print(f"{'kv dtype':10s} {'bytes/token':>12s} {'vs fp32':>8s} {'top-1 agree':>12s} {'(decode part)':>14s} "
          f"{'max |dlogit|':>13s} {'mean |dlogit|':>14s}")
    for name in a.dtypes:
        dtype = DTYPES[name]
        logits, pool = (reference, ref_pool) if dtype == torch.float32 else run(model, tokens, dtype, a.chunk,
                                                                                 a.decode)
        per_token = pool.block_nbytes() / BLOCK
        agree = (logits.argmax(-1) == ref_top).float()
        diff = (logits - reference).abs()
        print(f"{name:10s} {per_token:12,.0f} {per_token / (ref_pool.block_nbytes() / BLOCK):8.3f} "
              f"{agree.mean().item():12.4f} {agree[-a.decode:].mean().item():14.4f} {diff.max().item():13.4f} "
              f"{diff.mean().item():14.5f}")


if __name__ == "__main__":
    main()
