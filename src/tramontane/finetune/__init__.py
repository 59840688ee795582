"""Fine-tuning: LoRA, QLoRA and full training on JSONL chats, prompt/completion pairs or text.

    >>> from tramontane.finetune import TrainConfig, finetune
    >>> finetune("SmolLM2.gguf", "train.jsonl", "adapter/", config=TrainConfig(steps=100, lr=2e-4))
"""

from .data import DataError, DataReport, Example, check_data, load_examples, tokenize_record
from .packing import Batch, epoch_plan, make_batch, pack
from .run import finetune, prepare_model
from .schedule import lr_factor, warmup_cosine
from .trainer import TrainConfig, Trainer

__all__ = [
    "Batch", "DataError", "DataReport", "Example", "TrainConfig", "Trainer", "check_data", "epoch_plan",
    "finetune", "load_examples", "lr_factor", "make_batch", "pack", "prepare_model", "tokenize_record",
    "warmup_cosine",
]
