"""`tramontane finetune`: the command line over `finetune.run.finetune` (and `check_data`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..lora import TARGETS, LoraConfig
from ..quantize import METHODS

if TYPE_CHECKING:
    from .trainer import TrainConfig

FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype and --base-dtype


def add_parser(sub: Any, common: argparse.ArgumentParser, bounded: Any) -> None:
    """Register the `finetune` subcommand on the CLI's subparsers; `bounded` is the CLI's range type."""
    f = sub.add_parser("finetune", parents=[common], help="train LoRA adapters (or all weights) on JSONL data",
                       description="Train on JSONL records ({\"messages\": [...]}, {\"prompt\", \"completion\"} "
                                   "or {\"text\"}); writes the adapter (or, with --full, the model) to --out.")
    f.add_argument("--model", required=True, help="base model: native, Hugging Face folder or .gguf file")
    f.add_argument("--data", required=True, type=Path, help="training data, JSONL")
    f.add_argument("--out", type=Path, help="folder for the adapter, checkpoints (checkpoint-N) and, with --full, the model")
    f.add_argument("--eval", type=Path, help="evaluation data, JSONL (eval loss at --eval-every steps and at the end)")
    f.add_argument("--check-data", action="store_true", help="report counts, token lengths and problems; train nothing")
    f.add_argument("--lora-rank", type=bounded(int, 1), default=16)
    f.add_argument("--lora-alpha", type=bounded(float, 0, above=True), default=32.0)
    f.add_argument("--lora-dropout", type=bounded(float, 0, 0.99), default=0.0)
    f.add_argument("--targets", default=",".join(TARGETS), help=f"projections with adapters (default: {','.join(TARGETS)})")
    f.add_argument("--full", action="store_true", help="train every weight (AdamW) and save the whole model, native")
    f.add_argument("--quantize", choices=METHODS, help="freeze the base quantized (QLoRA); on a GGUF file, tensors "
                   "already in that scheme stay as stored (a Q4_1 file under int4_asym)")
    f.add_argument("--steps", type=bounded(int, 1), help="optimizer steps (default: --epochs over the data)")
    f.add_argument("--epochs", type=bounded(int, 1), default=1)
    f.add_argument("--lr", type=bounded(float, 0, above=True), default=1e-4, help="peak learning rate (default 1e-4)")
    f.add_argument("--warmup", type=bounded(int, 0), default=0, help="linear warmup steps, then cosine decay to 0")
    f.add_argument("--weight-decay", type=bounded(float, 0), default=0.0)
    f.add_argument("--batch-tokens", type=bounded(int, 1), default=2048,
                   help="tokens per packed batch (sequences never see each other); longer examples are cut to it")
    f.add_argument("--grad-accum", type=bounded(int, 1), default=1, help="batches per optimizer step")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--eval-every", type=bounded(int, 0), default=0, help="steps between evaluations (0: at the end)")
    f.add_argument("--save-every", type=bounded(int, 0), default=0, help="steps between checkpoints (0: none)")
    f.add_argument("--resume", type=Path, help="a checkpoint-N folder, or a run's --out folder (its latest)")
    f.add_argument("--format", help="adapter format (default: the adapters module's; 'mistral': lora.safetensors)")
    f.add_argument("--bf16", action="store_true", help="bf16 autocast of the matmuls (fast where the CPU has bf16)")
    f.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block's activations in the backward pass instead of keeping them all: less "
                        "memory, about a third more arithmetic (default: on with --quantize, as QLoRA recipes do)")
    f.add_argument("--dtype", default="float32", choices=list(FLOATS), help="weights' dtype")
    f.add_argument("--base-dtype", default="auto", choices=["auto", *FLOATS],
                   help="dtype of the frozen products under the adapters (bases, head); the adapters and sums stay "
                        "in --dtype. auto: bfloat16 where the kernel policy measured bf16 products faster than fp32 "
                        "(AMX, Zen 4), else --dtype")
    f.add_argument("--device", default="cpu")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)


def training_config(a: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that `finetune`'s flags ask for."""
    from .trainer import TrainConfig

    recompute = a.quantize is not None if a.gradient_checkpointing is None else a.gradient_checkpointing
    return TrainConfig(lr=a.lr, warmup=a.warmup, steps=a.steps, epochs=a.epochs, batch_tokens=a.batch_tokens,
                       grad_accum=a.grad_accum, seed=a.seed, weight_decay=a.weight_decay, eval_every=a.eval_every,
                       save_every=a.save_every, bf16=a.bf16, gradient_checkpointing=recompute)


def cmd_finetune(a: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer
    from .data import check_data
    from .run import finetune, frozen_dtype

    if a.check_data:
        tokenizer = load_tokenizer(a.model)
        reports = [check_data(p, tokenizer, a.batch_tokens + 1) for p in (a.data, a.eval) if p is not None]
        for report in reports:
            print(report.summary())
        return 1 if any(r.problems for r in reports) else 0
    if a.out is None:
        raise ValueError("--out: a folder for the adapter is required (unless --check-data)")
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    lora = None if a.full else LoraConfig(a.lora_rank, a.lora_alpha, a.lora_dropout, targets)
    config = training_config(a)
    dtype = FLOATS[a.dtype]
    base = frozen_dtype(dtype, a.device) if a.base_dtype == "auto" else FLOATS[a.base_dtype]
    if lora is not None and a.quantize is None:
        print(f"tramontane: frozen products in {str(base).removeprefix('torch.')}, adapters in "
              f"{str(dtype).removeprefix('torch.')}", file=sys.stderr)
    trainer = finetune(a.model, a.data, a.out, eval_data=a.eval, lora=lora, quantize=a.quantize, config=config,
                       resume=a.resume, adapter_format=a.format, dtype=dtype, base_dtype=base, device=a.device,
                       progress=not a.no_progress)
    last = trainer.history[-1]
    evals = [h["eval"] for h in trainer.history if "eval" in h]
    eval_text = f", eval loss {evals[0]:.4f} -> {evals[-1]:.4f}" if len(evals) > 1 else (
        f", eval loss {evals[-1]:.4f}" if evals else "")
    print(f"tramontane: {trainer.step} steps, loss {trainer.history[0]['loss']:.4f} -> {last['loss']:.4f}"
          f"{eval_text}; {'model' if a.full else 'adapter'} written to {a.out}")
    return 0
