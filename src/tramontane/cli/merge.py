"""`tramontane merge BASE ADAPTER OUT`: a LoRA adapter folded into the base's weights, saved."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import CliError, copy_parents, output_dtype, source_and_destination


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    mg = sub.add_parser("merge", parents=[common, copy_parents(floats=True)],
                        help="fold a LoRA adapter (PEFT or mistral format) into a model's weights and save the result")
    mg.add_argument("src", metavar="BASE", help="the adapter's base model: native folder, Hugging Face folder or .gguf")
    mg.add_argument("adapter", metavar="ADAPTER", help="adapter folder (adapter_config.json or lora.safetensors)")
    mg.add_argument("dst", metavar="OUT", help="output folder")
    mg.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..loading import load_model, save_model
    from ..lora import LoraLinear

    base, dst = source_and_destination(a)
    dtype = output_dtype(a.dtype, base)
    t0 = time.perf_counter()
    model = load_model(base, dtype=dtype, dequantize=True, progress=not a.quiet, lora=a.adapter)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise CliError(f"{base}: a quantized checkpoint; merging needs float weights (merge into the float "
                       "model, then `tramontane quantize` the result)")
    save_model(model, dst, to=a.to)
    print(f"wrote {a.to} checkpoint to {dst}: {base} with {a.adapter} merged ({dtype}, "
          f"{time.perf_counter() - t0:.1f}s)")
    return 0
