"""LoRA, all of it: the adapter modules (`modules`: apply, attach, merge), their files in PEFT's and
mistral-finetune's formats (`files`, `peft`), saving and loading adapters on a model (`adapters`), and
several adapters served side by side on one model (`serving`).

The names below are `modules`'; the others are imported from their modules.
"""

from .modules import (
    TARGETS,
    FrozenLinear,
    LoraConfig,
    LoraLinear,
    LoraWeights,
    apply_lora,
    attach_lora,
    frozen_head,
    lora_slots,
    lora_state_dict,
    lora_weights,
    lower_frozen,
    merge_lora,
    merge_update,
)

__all__ = ["TARGETS", "FrozenLinear", "LoraConfig", "LoraLinear", "LoraWeights", "apply_lora", "attach_lora",
           "frozen_head", "lora_slots", "lora_state_dict", "lora_weights", "lower_frozen", "merge_lora",
           "merge_update"]
