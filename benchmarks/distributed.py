"""Tensor parallel on one machine: what 2 ranks cost and save against one process.

- peak RSS per rank against one process (each rank must read only its share: goal <= 0.55x at 2 ranks);
- decode tokens/s, 2 ranks x 1 thread against 1 rank x 2 threads (same cores: the ratio is what the
  collectives and the Python blocks cost; goal >= 0.8x);
- bytes each rank hands to collectives per decoded token, against the analytic count: 2 all-reduces of
  `dim` floats per layer (after wo and w2), one for the vocabulary-parallel embedding, and the gather of
  the logits (vocab / tp floats);
- pipeline parallel (2 stages x 1 thread), `--sequences` (16) decoding together: tokens/s with 2
  micro-batches in flight against 1 (no overlap: one stage waits while the other computes). With weights
  read once per step whatever its rows, splitting pays only as far as a step's cost grows with its rows;
  reported, no target.

Each side runs in fresh processes (one with `python`, the other with torchrun). On a shared 2-core
machine the speeds are indicative only.

Usage: python benchmarks/distributed.py [--shape small|1b] [--steps 32] [--sequences 16]
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


def pipeline_child(path: str, steps: int, micro_batches: int, sequences: int) -> None:
    """One pipeline stage: `sequences` decode `steps` tokens each; rank 0 prints tokens/s as JSON."""
    import torch.distributed as dist

    import tramontane
    from tramontane.parallel import init_distributed

    init_distributed("cpu")  # as the CLI joins a job: each rank on its own cores
    model = tramontane.load_model(path, parallel={"pp": 2, "micro_batches": micro_batches})
    prompts = [list(range(1 + i, 17 + i)) for i in range(sequences)]
    tramontane.generate(model, prompts, max_tokens=2)  # warm up
    t0 = time.perf_counter()
    out = tramontane.generate(model, prompts, max_tokens=steps)
    seconds = time.perf_counter() - t0
    if dist.get_rank() == 0:
        print(json.dumps({"tokens_per_second": sum(len(g.tokens) for g in out) / seconds}))
    dist.destroy_process_group()


def child(path: str, steps: int, parallel: bool) -> None:
    """One rank (or the one process): load, decode `steps` tokens, print a JSON line (rank 0 only)."""
    import torch.distributed as dist

    import tramontane
    from tramontane.generate import decode_step, prefill
    from tramontane.parallel import init_distributed
    from tramontane.step_backends import choose_backend

    base = current_rss_bytes()
    if parallel:
        init_distributed("cpu")
    model = tramontane.load_model(path, parallel="tensor" if parallel else None)
    cache = tramontane.KVCache.create(model.args, 1, 256)
    with torch.inference_mode():
        step = choose_backend(model)
        logits = prefill(step, list(range(1, 17)), cache, 0, 16)
        token = torch.tensor([int(logits.argmax())])
        if model.parallel is not None:
            model.parallel.traffic = type(model.parallel.traffic)()  # count the decode steps only
        t0 = time.perf_counter()
        for i in range(steps):
            token = decode_step(step, token, torch.tensor([16 + i]), cache).argmax(-1)
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


def run(path: Path, steps: int, ranks: int, extra: tuple[str, ...] = ("--parallel",)) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // ranks))
    me = [str(Path(__file__).resolve()), "--child", str(path), "--steps", str(steps)]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(port), *me, *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sequences", type=int, default=16, help="sequences decoding together in the pipeline run")
    p.add_argument("--micro-batches", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child and a.micro_batches:
        pipeline_child(a.child, a.steps, a.micro_batches, a.sequences)
        return
    if a.child:
        child(a.child, a.steps, a.parallel)
        return
    args = SHAPES[a.shape]
    path = ensure_checkpoint(f"mistral-{a.shape}", args, "native", torch.float32)
    one, two = run(path, a.steps, 1), run(path, a.steps, 2)
    # interleaved rounds, the best of each: without and with micro-batches in flight
    pipe: dict[int, float] = {1: 0.0, 2: 0.0}
    for _ in range(2):
        for mb in pipe:
            extra = ("--micro-batches", str(mb), "--sequences", str(a.sequences))
            pipe[mb] = max(pipe[mb], run(path, a.steps, 2, extra)["tokens_per_second"])
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
        "pipeline_tokens_per_second_1_micro_batch": pipe[1],
        "pipeline_tokens_per_second_2_micro_batches": pipe[2],
        "pipeline_overlap_ratio": pipe[2] / pipe[1],
        "pipeline_sequences": a.sequences,
    }
    for k, v in rows.items():
        print(f"{k:<42} {v}")
    for ok, what in ((rows["rss_ratio"] <= 0.55, f"peak RSS per rank {rows['rss_ratio']:.2f}x one process (goal 0.55x)"),
                     (rows["speed_ratio"] >= 0.8, f"decode 2 ranks x 1 thread {rows['speed_ratio']:.2f}x 1 x 2 (goal 0.8x)")):
        print(f"{'PASS' if ok else 'MISS'}  {what}")
    print(f"saved {save_result(f'distributed_{a.shape}', {'shape': dataclasses.asdict(args), **rows})}")


if __name__ == "__main__":
    main()
