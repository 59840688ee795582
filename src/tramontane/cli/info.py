"""`tramontane info [MODEL]`: architecture, size, tensor types, tokenizer and chat format of a checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import TokenizerError
from ..loading.options import resolve_model
from .common import source_dtype

HEAD_KINDS = {"sequence": "sequence classification", "token": "token classification", "qa": "question answering"}


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    i = sub.add_parser("info", parents=[common], help="describe a model: architecture, size, tokenizer, chat format")
    i.add_argument("model", nargs="?", help="model path or card name (default: the embedded demo model)")
    i.add_argument("--json", action="store_true", help="print a JSON object")
    i.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..loading import checkpoint_format, read_model_args

    path = resolve_model(a.model)
    fmt = checkpoint_format(path)
    args = read_model_args(path)
    info: dict[str, object] = {
        "path": str(path),
        "format": fmt,
        "architecture": "mixtral (sparse MoE)" if args.moe else "llama-shaped transformer",
        "parameters": args.n_params,
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "head_dim": args.head_dim, "hidden_dim": args.hidden_dim, "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta, "sliding_window": args.sliding_window, "context": args.max_seq_len,
        "tied_embeddings": args.tied_embeddings,
        "weights_dtype": str(source_dtype(path)).removeprefix("torch."),
        "quantization": args.extra.get("quantization", {}).get("method", "none"),
        "memory_fp32_gib": round(args.n_params * 4 / 2**30, 3),
        "memory_bf16_gib": round(args.n_params * 2 / 2**30, 3),
    }
    if args.moe:
        info["experts"] = f"{args.moe.num_experts_per_tok} of {args.moe.num_experts}"
    if fmt == "gguf":
        from collections import Counter

        from ..formats.gguf_file import find_gguf
        from ..loading.gguf import gguf_tensor_info

        types = Counter(kind for kind, _ in gguf_tensor_info(find_gguf(path)).values())
        info["tensor_types"] = ", ".join(f"{kind} {n}" for kind, n in types.most_common())
    if args.head:
        labels = ", ".join(args.head.label(i) for i in range(args.head.num_labels))
        info["task_head"] = HEAD_KINDS[args.head.kind] + ("" if args.head.kind == "qa" else f" ({labels})")
    try:
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        info["tokenizer"] = getattr(tok, "name", type(tok).__name__)
        info["chat_format"] = getattr(tok, "chat_format", "unknown")
    except (TokenizerError, ImportError) as e:
        info["tokenizer"] = f"none ({e})"
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0
