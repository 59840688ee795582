"""The check run before any memory is reserved for a model: does it fit in the memory the machine has?
(Whether the hyper-parameters agree with the tensors is `layout.check_against_tensors`.)

Example:
    >>> check_memory(args, torch.float32, None, "cpu", "model.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..args import ModelArgs
from ..errors import CheckpointError
from ..quantize import QuantConfig


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
