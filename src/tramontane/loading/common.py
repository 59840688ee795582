"""Shared loading machinery: build on the meta device, stream tensors in, check every name and shape."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..args import ModelArgs
from ..errors import CheckpointError, TensorMismatchError
from ..model import Transformer

# (internal name, tensor, file it came from)
NamedTensors = Iterable[tuple[str, torch.Tensor, Path]]


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `args` must hold, by internal (Mistral-native) name."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def build_model(
    args: ModelArgs,
    tensors: NamedTensors,
    where: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool = False,
) -> Transformer:
    """Create the model on the meta device and assign each tensor as it streams in.

    Each source tensor is converted to `dtype`/`device` on its own, so peak memory is the model plus
    one tensor. Raises TensorMismatchError naming the file and tensor for an unknown, duplicate,
    misshapen or missing tensor.
    """
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(shapes), desc="Loading weights", unit="tensor", disable=not progress, leave=False)
    for name, tensor, source in tensors:
        if name not in shapes:
            raise TensorMismatchError(source, f"unexpected tensor {name!r} (not part of this model's architecture)")
        if name in loaded:
            raise TensorMismatchError(source, f"tensor {name!r} appears more than once")
        if tuple(tensor.shape) != shapes[name]:
            raise TensorMismatchError(
                source, f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shapes[name])}"
            )
        if not tensor.dtype.is_floating_point:
            raise TensorMismatchError(source, f"tensor {name!r} has non-float dtype {tensor.dtype}")
        loaded[name] = tensor.to(device=device, dtype=dtype)
        bar.update(1)
    bar.close()
    missing = [n for n in shapes if n not in loaded]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise TensorMismatchError(where, f"missing tensor(s) {', '.join(missing[:5])}{more}")
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval()


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file, read one at a time from the memory map."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"cannot read safetensors file ({e}); is it truncated or corrupt?") from e


def safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"cannot read safetensors file ({e}); is it truncated or corrupt?") from e


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict, memory-mapped and without executing any code from the file."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(path, f"cannot read PyTorch checkpoint safely ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(path, "expected a flat dict of tensor name -> tensor")
    return data

