"""Tensor parallel on one machine: what 2 ranks cost and save against one process.

- peak RSS per rank against one process (each rank must read only its share: goal <= 0.55x at 2 ranks);
- decode tokens/s, 2 ranks x 1 thread against 1 rank x 2 threads (same cores: the ratio is what the
  collectives and the Python blocks cost; goal >= 0.8x);
- bytes each rank hands to collectives per decoded token, against the analytic count: 2 all-reduces of
  `dim` floats per layer (after wo and w2), one for the vocabulary-parallel embedding, and the gather of
  the logits (vocab / tp floats).

Each side runs in fresh processes (one with `python`, the other with torchrun). On a shared 2-core
machine the speeds are indicative only.

Usage: python benchmarks/distributed.py [--shape small|1b] [--steps 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MISTRAL_1B, current_rss_bytes, ensure_checkpoint, peak_rss_bytes, save_result  # noqa: E402

SHAPES = {
    "1b": MISTRAL_1B,
    "small": dataclasses.replace(MISTRAL_1B, dim=1024, n_layers=8, hidden_dim=3584, head_dim=64),
}


def child(path: str, steps: int, parallel: bool) -> None:
    """One rank (or the one process): load, decode `steps` tokens, print a JSON line (rank 0 only)."""
    import torch.distributed as dist

    import tramontane
    from tramontane.generate import decode_step, prefill

    base = current_rss_bytes()
    if parallel:
        dist.init_process_group("gloo")
    model = tramontane.load_model(path, parallel="tensor" if parallel else None)
    cache = tramontane.KVCache.create(model.args, 1, 256)
    with torch.inference_mode():
        logits = prefill(model, list(range(1, 17)), cache, 0, 16)
        token = torch.tensor([int(logits.argmax())])
        if model.parallel is not None:
            model.parallel.traffic = type(model.parallel.traffic)()  # count the decode steps only
        t0 = time.perf_counter()
        for i in range(steps):
            token = decode_step(model, token, torch.tensor([16 + i]), cache).argmax(-1)
        seconds = time.perf_counter() - t0
    peaks = [peak_rss_bytes() - base]
    traffic = {}
    if model.parallel is not None:
        gathered: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, peaks[0])
        peaks = [int(p) for p in gathered]  # type: ignore[call-overload]
        traffic = {k: v / steps for k, v in dataclasses.asdict(model.parallel.traffic).items()}
    if not parallel or dist.get_rank() == 0:
        print(json.dumps({"peaks": peaks, "tokens_per_second": steps / seconds, "traffic": traffic}))
    if parallel:
        dist.destroy_process_group()


def run(path: Path, steps: int, ranks: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // ranks))
    me = [str(Path(__file__).resolve()), "--child", str(path), "--steps", str(steps)]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(port), *me, "--parallel"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.steps, a.parallel)
        return
    args = SHAPES[a.shape]
    path = ensure_checkpoint(f"mistral-{a.shape}", args, "native", torch.float32)
    one, two = run(path, a.steps, 1), run(path, a.steps, 2)
    tp = 2
    analytic = {"all_reduce": (2 * args.n_layers + 1) * args.dim * 4, "all_gather": args.vocab_size // tp * 4}
    rows = {
        "peak_rss_one_process_gib": one["peaks"][0] / 2**30,
        "peak_rss_per_rank_gib": [b / 2**30 for b in two["peaks"]],
        "rss_ratio": max(two["peaks"]) / one["peaks"][0],
        "tokens_per_second_1x2": one["tokens_per_second"],
        "tokens_per_second_2x1": two["tokens_per_second"],
        "speed_ratio": two["tokens_per_second"] / one["tokens_per_second"],
        "bytes_per_token_measured": two["traffic"],
        "bytes_per_token_analytic": analytic,
    }
    for k, v in rows.items():
        print(f"{k:<28} {v}")
    print(f"saved {save_result(f'distributed_{a.shape}', {'shape': dataclasses.asdict(args), **rows})}")


if __name__ == "__main__":
    main()
