"""LoRA adapters on disk: mistral-finetune's `lora.safetensors` (native names) and, in time, PEFT's
`adapter_config.json` + `adapter_model.safetensors`.

Example:
    >>> save_adapter(model, "out/", config, fmt="mistral")
    >>> model = load_adapter(load_model(base), "out/")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .lora import LoraConfig, apply_lora, lora_state_dict
from .model import Transformer

MISTRAL_FILE = "lora.safetensors"
MISTRAL_CONFIG = "lora_config.json"  # rank, alpha, targets: what mistral-finetune keeps in its params.json


def save_adapter(model: Transformer, folder: str | Path, config: LoraConfig, fmt: str = "mistral") -> Path:
    """Write `model`'s adapters to `folder` in format `fmt` ("mistral"); returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if fmt != "mistral":
        raise ValueError(f"adapter format: {fmt!r} is not one of: mistral")
    state = {k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    save_file(state, out / MISTRAL_FILE)
    (out / MISTRAL_CONFIG).write_text(json.dumps({"rank": config.rank, "alpha": config.alpha,
                                                  "targets": list(config.targets)}, indent=2))
    return out


def load_adapter(model: Transformer, folder: str | Path) -> Transformer:
    """Give `model` the adapters saved in `folder`, in place.

    Raises:
        CheckpointError: the folder holds no adapter, or its tensors do not match the model.
    """
    src = Path(folder)
    file, meta = src / MISTRAL_FILE, src / MISTRAL_CONFIG
    if not file.is_file() or not meta.is_file():
        raise CheckpointError(src, f"no adapter here (want {MISTRAL_FILE} and {MISTRAL_CONFIG})")
    data = json.loads(meta.read_text())
    config = LoraConfig(rank=int(data["rank"]), alpha=float(data["alpha"]), targets=tuple(data["targets"]))
    apply_lora(model, config)
    state = load_file(file)
    expected = lora_state_dict(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(file, f"adapter tensors do not match the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(file, f"{name} has shape {tuple(tensor.shape)}, the model wants "
                                      f"{tuple(expected[name].shape)}")
            expected[name].copy_(tensor)
    return model
