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
from ..formats.layout import HF_FIELDS, check_against_tensors, to_hf, to_internal, weight_files
from .common import iter_safetensors, safetensors_shapes


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
