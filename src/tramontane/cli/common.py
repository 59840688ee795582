"""What the commands share: the one-line error, range-checked option types, the model options that every
command opening a model takes (`model_parents`), and the few helpers of a torchrun job's leader."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..loading.options import DTYPES, ModelOptions, OpenedModel, open_model
from ..quantize import METHODS as QUANT_METHODS

DEQUANTIZE_HELP = ("turn a GGUF file's quantized tensors into --dtype floats (by default each keeps its own format: "
                   "Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)")


class CliError(Exception):
    """A problem to report in one line, with exit status 1."""


def bounded(kind: Callable[[str], Any], low: float, high: float | None = None, *, above: bool = False
            ) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` in [low, high] (`above`: strictly above `low`); argparse reports a
    value outside in one line naming the option."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        too_low = value <= low if above else value < low
        if value != value or too_low or (high is not None and value > high):  # value != value: NaN
            want = (f"in {'(' if above else '['}{low}, {high}]" if high is not None
                    else f"> {low}" if above else f">= {low}")
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    return parse


def model_parents(*, lora: bool = True) -> argparse.ArgumentParser:
    """The options `model_options` reads: which model, how to load it, how to split it under torchrun.
    `lora=False` leaves out `--lora DIR` (merged), for a command with an adapter option of its own."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", help="native folder, Hugging Face folder, .gguf file or model card name "
                   "(default: the embedded SmolLM2)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype (default float32)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=bounded(int, 0), default=0, help="CPU threads (default 0: every core)")
    p.add_argument("--quantize", choices=QUANT_METHODS, default=None,
                   help="quantize weights while loading (int8 per channel; int4 in groups of 32, symmetric like "
                        "Q4_0, or int4_asym with a minimum per group like Q4_1)")
    p.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)
    if lora:
        p.add_argument("--lora", metavar="DIR", default=None, dest="merged_lora",
                       help="a LoRA adapter folder (PEFT or mistral-finetune format): merged into float weights, "
                            "kept beside quantized ones")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (for GPUs; falls back to eager with a warning)")
    p.add_argument("--tp", type=bounded(int, 1), default=None,
                   help="under torchrun: tensor-parallel ranks (default: world size / --pp)")
    p.add_argument("--pp", type=bounded(int, 1), default=None,
                   help="under torchrun: pipeline stages of contiguous layers (default 1)")
    return p


def sampling_parents() -> argparse.ArgumentParser:
    """The sampling options of the commands that generate; the temperature's default is the command's."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--temperature", type=bounded(float, 0), default=None, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=bounded(float, 0, 1, above=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (default 1.0)")
    return p


def speculative_parents() -> argparse.ArgumentParser:
    """Speculative decoding's options, for the commands that decode."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--speculative", metavar="ngram|MODEL", default=None,
                   help="speculative decoding: draft tokens by looking up the last tokens earlier in the prompt and "
                        "answer ('ngram'), or with a smaller model sharing the tokenizer (a path or card name, loaded "
                        "with --dtype/--device); the model checks them in one step, so the output is the same")
    p.add_argument("--draft-tokens", type=bounded(int, 1, 64), default=8,
                   help="most tokens drafted per sequence and step (default 8)")
    return p


def draft_choice(a: argparse.Namespace) -> Any:
    """What `--speculative` names: None, "ngram", or the draft model, opened as the main one is."""
    if a.speculative is None or a.speculative == "ngram":
        return a.speculative
    return open_model(ModelOptions(model=a.speculative, dtype=a.dtype, device=a.device, threads=a.threads)).model


def model_options(a: argparse.Namespace) -> ModelOptions:
    """The `model_parents` options as the library's ModelOptions."""
    return ModelOptions(model=a.model, dtype=a.dtype, device=a.device, threads=a.threads, quantize=a.quantize,
                        dequantize=a.dequantize, lora=getattr(a, "merged_lora", None), compile=a.compile, tp=a.tp, pp=a.pp)


def open_for(a: argparse.Namespace) -> OpenedModel:
    """The model and tokenizer the command line names (`model_parents`)."""
    return open_model(model_options(a))


def sampling(a: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": a.temperature, "top_p": a.top_p}


def is_leader(model: Any) -> bool:
    """Whether this process reads input and prints: the only one, or rank 0 of a parallel job."""
    return model.parallel is None or model.parallel.rank == 0


def from_leader(model: Any, value: Any) -> Any:
    """Rank 0's `value` on every rank of a parallel job (the prompt it read); `value` in one process."""
    return value if model.parallel is None else model.parallel.from_leader(value)


def silent(*args: Any, **kwargs: Any) -> None:
    """What the ranks other than 0 of a parallel job print: nothing."""


def read_prompt(prompt: str | None) -> str:
    """PROMPT, or stdin without the newline `echo` adds."""
    if prompt is not None:
        return prompt
    if sys.stdin.isatty():
        raise CliError("no prompt: pass PROMPT or pipe text on stdin")
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


# ---------------------------------------------------------------------- what convert, merge and quantize share
def copy_parents(floats: bool = False) -> argparse.ArgumentParser:
    """The options of the commands that write a checkpoint; with `floats` (convert, merge), the float
    folder's format (`--to`) and dtype (`--dtype`, read by `output_dtype`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if floats:
        p.add_argument("--to", choices=["native", "hf"], required=True, help="output format")
        p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="output dtype (default auto: keep the source's)")
    return p


def source_and_destination(a: argparse.Namespace) -> tuple[Path, Path]:
    """SRC must exist; DST must be new or empty unless --force, so nothing is overwritten by accident."""
    src, dst = Path(a.src), Path(a.dst)
    if not src.exists():
        raise CliError(f"{src}: no such file or folder")
    if dst.exists() and any(dst.iterdir()) and not a.force:
        raise CliError(f"{dst}: folder exists and is not empty (use --force to write into it)")
    return src, dst


def output_dtype(name: str, src: Path) -> torch.dtype:
    """`--dtype` of convert and merge: a float dtype, or "auto" for the source's own."""
    if name == "auto":
        return source_dtype(src)
    return DTYPES[name]


def source_dtype(path: Path) -> torch.dtype:
    """The dtype of a checkpoint's first weight (bf16 stays bf16 on convert); float32 for GGUF."""
    from safetensors import safe_open

    from ..loading import checkpoint_format, hf, native

    fmt = checkpoint_format(path)
    files = native.weight_files(path) if fmt == "native" else hf.weight_files(path) if fmt == "hf" else []
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118
                    dtype = st.get_slice(name).get_dtype()
                    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    return torch.float32
