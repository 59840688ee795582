"""LoRA adapters on disk: PEFT's `adapter_config.json` + `adapter_model.safetensors` (the default, read by
`PeftModel.from_pretrained`) and mistral-finetune's `lora.safetensors` + `params.json`.

Example:
    >>> save_adapter(model, "out/", config)                       # PEFT format
    >>> save_adapter(model, "out-mistral/", config, fmt="mistral")
    >>> model = load_adapter(load_model(base), "out/")             # either format, by the files present
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..model import Transformer
from .files import FORMATS, adapter_format, read_adapter, write_adapter
from .modules import LoraConfig, attach_lora, lora_weights

__all__ = ["FORMATS", "adapter_format", "load_adapter", "read_adapter", "save_adapter"]


def save_adapter(model: Transformer, folder: str | Path, config: LoraConfig, fmt: str = "peft",
                 base_model: str | None = None) -> Path:
    """Write `model`'s adapters to `folder` as `fmt` ('peft' or 'mistral'); returns the folder.
    `base_model` goes into PEFT's `base_model_name_or_path`.

    Raises:
        ValueError: `fmt` is unknown, the model has no adapters, or they cannot be written in `fmt`.
    """
    return write_adapter(folder, lora_weights(model), model.args, config, fmt, base_model)


def load_adapter(model: Transformer, folder: str | Path) -> Transformer:
    """Give `model` the adapters saved in `folder` (PEFT or mistral format), unmerged, in place.

    Raises:
        CheckpointError: the folder holds no adapter, or its config or tensors do not fit the model.
    """
    adapters = read_adapter(folder, model.args)
    try:
        return attach_lora(model, adapters)
    except ValueError as e:
        raise CheckpointError(folder, str(e)) from e
