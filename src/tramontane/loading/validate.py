"""Checks run before any memory is reserved for a model: do the hyper-parameters agree with the tensors
the checkpoint actually holds, and does the model fit in the memory the machine has?

A config that says 10^9 layers (or 2^40 experts) would otherwise build 10^9 modules on the meta device,
and a bit flipped in a GGUF metadata value would size the model by it. Both are caught here from the
tensors' names and shapes alone (safetensors and GGUF headers), before `Transformer(args)` runs.

Example:
    >>> check_against_tensors(args, {"norm.weight": (64,), ...}, "params.json", NATIVE_FIELDS)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..args import ModelArgs
from ..errors import CheckpointError, ConfigError
from ..quantize import QuantConfig

# ModelArgs field -> how each format's config names it, for the error messages.
NATIVE_FIELDS = {"n_layers": "n_layers", "vocab_size": "vocab_size", "num_experts": "moe.num_experts"}
HF_FIELDS = {"n_layers": "num_hidden_layers", "vocab_size": "vocab_size", "num_experts": "num_local_experts"}


def gguf_fields(arch: str) -> dict[str, str]:
    """The GGUF metadata keys of an `arch` file, under the same ModelArgs names."""
    keys = {"n_layers": "block_count", "vocab_size": "vocab_size", "num_experts": "expert_count"}
    return {field: f"{arch}.{key}" for field, key in keys.items()}


_LAYER = re.compile(r"layers\.(\d+)\.")
_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.")


def check_against_tensors(args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], source: str | Path,
                          fields: Mapping[str, str]) -> None:
    """Compare the counts in `args` (layers, experts, vocabulary) with the tensors present: `shapes`
    maps internal names to shapes (for quantized tensors, the rows must be the logical ones).

    Raises:
        ConfigError: a count or size in the config disagrees with the tensors (named: the config field,
            the value it holds, and what the tensors say).
    """

    def refuse(field: str, value: object, found: str) -> ConfigError:
        return ConfigError(source, f"{fields[field]} is {value}, but {found}")

    # Counts above what the weights hold are refused here (they would size the model); counts below
    # leave tensors over, which loading reports by name as unexpected.
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    if args.n_layers > max(layers, default=-1) + 1:
        raise refuse("n_layers", args.n_layers, f"the weights hold {len(layers)} layers")
    experts: dict[int, set[int]] = {}
    for name in shapes:
        if (m := _EXPERT.match(name)) is not None:
            experts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if args.moe is None and experts:
        most = max(len(e) for e in experts.values())
        raise ConfigError(source, f"the weights hold {most} experts per layer, but {fields['num_experts']} is not set")
    if args.moe is not None and args.moe.num_experts > max((max(e) + 1 for e in experts.values()), default=0):
        found = ", ".join(str(c) for c in sorted({len(e) for e in experts.values()})) or "no"
        raise refuse("num_experts", args.moe.num_experts, f"the weights hold {found} experts per layer")

    embedding = shapes.get("tok_embeddings.weight") or shapes.get("tok_embeddings.table.weight")
    if embedding and embedding[0] != args.vocab_size:
        raise refuse("vocab_size", args.vocab_size, f"the embedding tok_embeddings.weight has {embedding[0]} rows")
    # Other sizes (dim, heads, feed-forward) need no check here: they do not multiply the modules built,
    # and each tensor's shape is compared with the model's before any weight is read.


def bytes_per_weight(dtype: torch.dtype, quant: QuantConfig | None) -> float:
    """Memory one weight takes once loaded: its dtype's size, or the quantized size with its scales."""
    if quant is None:
        return torch.empty((), dtype=dtype).element_size()
    if quant.method == "int8":
        return 1.0  # plus one scale per row: negligible
    return 0.5 + (2 if quant.method == "int4" else 4) / quant.group_size


def available_memory(device: torch.device | str) -> int | None:
    """Bytes the machine can still give a model on `device`; None where it cannot tell."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    info = {line.split(":")[0]: line.split()[1:] for line in lines}
    if "MemAvailable" not in info:
        return None
    return int(info["MemAvailable"][0]) * 1024


def check_memory(args: ModelArgs, dtype: torch.dtype, quant: QuantConfig | None, device: torch.device | str,
                 source: str | Path, available: int | None = None, need: int | None = None) -> int:
    """The bytes the loaded weights will take (`need`, where the caller knows better: a GGUF file's
    tensors kept in their own formats); CheckpointError when that exceeds the memory available
    (`available` bytes, or what the machine reports for `device`)."""
    what = quant.method if quant is not None else str(dtype).removeprefix("torch.")
    if need is None:
        need = int(args.n_params * bytes_per_weight(dtype, quant))
    else:
        what = "the file's own formats"
    have = available_memory(device) if available is None else available
    if have is not None and need > have:
        raise CheckpointError(
            source, f"loading needs about {need / 2**30:.2f} GiB ({args.n_params:,} weights as {what}) but only "
                    f"{have / 2**30:.2f} GiB of memory is available on {torch.device(device)}",
        )
    return need
