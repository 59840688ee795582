"""Mistral-native folders: `params.json` plus `consolidated.safetensors` or `consolidated[.NN].pth`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..args import ModelArgs
from ..errors import CheckpointError, TensorMismatchError
from ..formats.layout import NATIVE_FIELDS, check_against_tensors
from ..quantize import QuantConfig
from .common import iter_safetensors, load_pth, safetensors_shapes


def is_native_folder(path: Path) -> bool:
    return (path / "params.json").is_file()


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: one safetensors file, or one or more `.pth` shards."""
    safetensors = sorted(folder.glob("consolidated*.safetensors"))
    if safetensors:
        return safetensors
    pth = sorted(folder.glob("consolidated*.pth"))
    if pth:
        return pth
    raise CheckpointError(folder, "no consolidated.safetensors or consolidated.NN.pth weight file")


def read_args(folder: Path) -> ModelArgs:
    """The folder's `params.json`, checked against the names and shapes of the tensors its weights hold."""
    args = ModelArgs.from_params_json(folder / "params.json")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            shapes.update(safetensors_shapes(file))
        else:
            shapes.update((name, tuple(t.shape)) for name, t in load_pth(file).items())
    check_against_tensors(args, shapes, folder / "params.json", NATIVE_FIELDS)
    return args


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Internal-name tensors of a native folder. Shards split the keys; a key in two shards is an error
    (tensor-parallel shards, as Meta's Llama releases have, are not supported)."""
    seen: dict[str, Path] = {}
    for file in weight_files(folder):
        pairs = iter_safetensors(file) if file.suffix == ".safetensors" else load_pth(file).items()
        for name, tensor in pairs:
            if name in seen:
                raise TensorMismatchError(
                    file, f"tensor {name!r} also appears in {seen[name].name}: tensor-parallel shards are not supported"
                )
            seen[name] = file
            yield name, tensor, file


def read_quantization(folder: Path, args: ModelArgs) -> QuantConfig | None:
    """The scheme a quantized native folder was saved with (its params.json `quantization`)."""
    data = args.extra.get("quantization")
    return None if data is None else QuantConfig.from_json(data, folder / "params.json")


def save(folder: Path, args: ModelArgs, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
         quant: QuantConfig | None = None) -> None:
    """Write `params.json` and `consolidated.safetensors` (float tensors cast to `dtype` when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = args.to_params()
    if quant is not None:
        params["quantization"] = quant.to_json()
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    tensors = {k: (v if dtype is None or not v.dtype.is_floating_point or k.endswith((".scale", ".mins"))
                   else v.to(dtype)).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / "consolidated.safetensors"), metadata={"format": "pt"})
