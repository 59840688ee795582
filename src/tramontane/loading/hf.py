"""Hugging Face folders: `config.json` plus `model.safetensors` or index-sharded safetensors.

Hugging Face stores wq/wk with each head's rows permuted for "rotate half" rotary embeddings; these
functions map names through an explicit table and undo (or redo) that permutation, so the model only
sees Mistral's native layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..args import ModelArgs
from ..errors import CheckpointError
from .common import iter_safetensors, safetensors_shapes
from .names import to_hf, to_internal
from .validate import HF_FIELDS, check_against_tensors


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def read_args(folder: Path) -> ModelArgs:
    """The folder's `config.json`, checked against the names and shapes of the tensors its weights hold
    (read from the safetensors headers, through the same name table as the weights)."""
    args = ModelArgs.from_hf_config_json(folder / "config.json")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder):
        for name, shape in safetensors_shapes(file).items():
            for internal, t in to_internal(name, torch.empty(shape, device="meta"), args, file):
                shapes[internal] = tuple(t.shape)
    check_against_tensors(args, shapes, folder / "config.json", HF_FIELDS)
    return args


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder: those its index names (each checked to lie inside the
    folder before any is opened), or the lone `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(index, f"invalid index file ({e})") from e
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                index, f"weight_map must be an object of tensor name -> file name, got {_brief(weight_map)}"
            )
        files = [_inside(folder, name, index) for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f, "listed in model.safetensors.index.json but missing")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")):
        raise CheckpointError(folder, "only pickle .bin weights found; convert them to safetensors first")
    raise CheckpointError(folder, "no model.safetensors or model.safetensors.index.json")


def _inside(folder: Path, name: str, index: Path) -> Path:
    """`folder / name`, refused when `name` is absolute or leads out of the folder (`..`, a symlink)."""
    root = folder.resolve()
    target = (folder / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(root) or target == root:
        raise CheckpointError(index, f"weight_map names {name!r}, which is outside the checkpoint folder {folder}")
    return folder / name


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def iter_tensors(folder: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for file in weight_files(folder):
        for name, tensor in iter_safetensors(file):
            for internal, t in to_internal(name, tensor, args, file):
                yield internal, t, file


def save(folder: Path, args: ModelArgs, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Write `config.json` and `model.safetensors` that transformers loads unchanged."""
    folder.mkdir(parents=True, exist_ok=True)
    config = args.to_hf_config()
    out_dtype = dtype or next(iter(state_dict.values())).dtype
    config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = dict(to_hf(k, v.to(out_dtype), args) for k, v in state_dict.items())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
