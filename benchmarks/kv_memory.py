"""KV memory of the paged pool: 16 concurrent 512-token conversations on the Mistral 7B attention shape,
against the bytes of their tokens' keys and values (target: at most 1.2x).

The model has 7B's attention (dim 4096, 32 heads, 8 KV heads of 128) but one layer, a small feed-forward
and a small vocabulary, with random weights: the KV bytes of a token are the same in every layer, so the
ratio is the 32-layer model's, and the run takes seconds instead of needing 14 GiB of weights. The engine
runs 16 requests of 500 prompt tokens and 12 new tokens each (512 positions), stepped by hand, and the run
reports the most blocks held at once, and the pool's resident memory (its pages are committed only as
blocks come into use) measured from the process's RSS.

Usage: python benchmarks/kv_memory.py [--kv-cache-dtype float32|bfloat16|int8]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tramontane import load_tokenizer  # noqa: E402
from tramontane.args import ModelArgs  # noqa: E402
from tramontane.cli import demo_model_path  # noqa: E402
from tramontane.engine import Engine, Request  # noqa: E402
from tramontane.model import Transformer  # noqa: E402
from tramontane.sampling import SamplingParams  # noqa: E402

from common import current_rss_bytes, save_result  # noqa: E402

CONVERSATIONS, PROMPT, NEW = 16, 500, 12
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-cache-dtype", choices=sorted(DTYPES), default="float32")
    a = ap.parse_args()
    kv_dtype = DTYPES[a.kv_cache_dtype]
    args = ModelArgs(dim=4096, n_layers=1, head_dim=128, hidden_dim=512, n_heads=32, n_kv_heads=8, norm_eps=1e-5,
                     vocab_size=1024, max_seq_len=4096)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    tokenizer = load_tokenizer(demo_model_path())  # only decodes the (meaningless) new tokens
    # room for 64 conversations of 1024 positions: most of the pool is never touched
    engine = Engine(model, tokenizer, max_batch=CONVERSATIONS, max_seq_len=1024, kv_blocks=64 * 1024 // 16,
                    kv_dtype=kv_dtype, prefix_cache=False)
    block_bytes = engine.pool.block_nbytes()
    gc.collect()
    before = current_rss_bytes()
    g = torch.Generator().manual_seed(1)
    for _ in range(CONVERSATIONS):
        prompt = torch.randint(0, args.vocab_size, (PROMPT,), generator=g).tolist()
        engine.submit(Request(prompt=prompt, max_tokens=NEW, emit=lambda event: None,
                              params=SamplingParams(temperature=0.0), stop_ids=frozenset()))
    peak_blocks, peak_rss = 0, 0
    while engine.step():
        peak_blocks = max(peak_blocks, engine.blocks.used)
        peak_rss = max(peak_rss, current_rss_bytes())
    tokens = CONVERSATIONS * (PROMPT + NEW)
    # a token's keys and values in every layer, in the pool's dtype (int8 with its fp32 scale per vector)
    per_token = 2 * args.n_layers * args.n_kv_heads * (args.head_dim * kv_dtype.itemsize
                                                        + (4 if kv_dtype == torch.int8 else 0))
    held = peak_blocks * block_bytes
    print(f"{CONVERSATIONS} conversations x {PROMPT + NEW} positions, 7B attention shape, KV {a.kv_cache_dtype}: "
          f"{tokens * per_token / 2**20:.1f} MiB of keys and values per layer")
    print(f"pool reserved {engine.pool.nbytes() / 2**20:.0f} MiB; blocks held at most {peak_blocks} "
          f"({held / 2**20:.1f} MiB): {held / (tokens * per_token):.3f}x")
    grown = peak_rss - before  # the pool's committed pages, and the step's activations
    print(f"RSS grew by {grown / 2**20:.1f} MiB while they ran: {grown / (tokens * per_token):.3f}x")
    ratio = held / (tokens * per_token)
    # what RSS adds beyond the blocks (the steps' activations) does not grow with the layers: on the
    # 32-layer model it is spread over 32 layers' keys and values
    projected = (32 * held + grown - held) / (32 * tokens * per_token)
    print(f"RSS projected to 32 layers: {projected:.3f}x")
    print(f"{'PASS' if ratio <= 1.2 else 'MISS'}  KV memory <= 1.2x the tokens' keys and values: {ratio:.3f}x "
          f"(RSS: {grown / (tokens * per_token):.3f}x)")
    out = save_result(f"kv_memory_{a.kv_cache_dtype}", {"tokens": tokens, "bytes_per_token_per_layer": per_token,
                                                         "peak_blocks": peak_blocks, "block_bytes": block_bytes,
                                                         "ratio_blocks": ratio,
                                                         "ratio_rss": grown / (tokens * per_token),
                                                         "ratio_rss_32_layers": projected})
    print(f"results: {out}")


if __name__ == "__main__":
    main()
