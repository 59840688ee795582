"""`finetune(...)`: load a model and data, train LoRA adapters (or all weights), save the result. The
`tramontane finetune` command is a thin layer over it.

Example:
    >>> trainer = finetune("SmolLM2.gguf", "train.jsonl", "out/", config=TrainConfig(steps=50, lr=2e-4))
    >>> trainer.history[-1]["loss"]
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..kernels.policy import kernel_policy
from ..loading import load_model, save_model
from ..lora import LoraConfig, apply_lora, lower_frozen
from ..lora.adapters import save_adapter
from ..model import Transformer
from ..tokenizer import load_tokenizer
from .data import load_examples
from .trainer import TrainConfig, Trainer

DEFAULT_LORA = LoraConfig()  # rank 16, alpha 32, every projection
DEFAULT_CONFIG = TrainConfig()


def frozen_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a LoRA run keeps its frozen float products in by default: the kernel policy's on a CPU
    (bf16 where the kernel policy measured bf16 products faster), else the model's."""
    return kernel_policy().gemm_dtype if torch.device(device).type == "cpu" and dtype == torch.float32 else dtype


def prepare_model(path: str | Path, lora: LoraConfig | None, quantize: str | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  base_dtype: torch.dtype | None = None) -> Transformer:
    """The model to train: frozen with adapters (`lora`), frozen quantized with adapters (`quantize`:
    QLoRA), or every weight trainable (`lora` None).

    A GGUF file's quantized tensors are dequantized to `dtype` unless `quantize` is given (then those
    already in that scheme stay as stored: a Q4_1 file under "int4_asym" trains on its own blocks).
    With adapters on a float base, the frozen products (bases, head) are kept in `base_dtype`
    (default `frozen_dtype`: bf16 where the kernel policy chose it) while adapters, norms and sums stay in `dtype`.

    Raises:
        ValueError: full training (`lora` None) of a quantized model.
    """
    if lora is None and quantize is not None:
        raise ValueError("quantize: full training updates every weight, which a quantized base cannot hold; "
                         "drop --quantize or train LoRA adapters")
    model = load_model(path, dtype, device, quantize=quantize, dequantize=quantize is None)
    if lora is not None:
        apply_lora(model, lora)
        lowered = base_dtype or frozen_dtype(dtype, device)
        return lower_frozen(model, lowered) if quantize is None and lowered != dtype else model
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def finetune(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    eval_data: str | Path | None = None,
    lora: LoraConfig | None = DEFAULT_LORA,
    quantize: str | None = None,
    config: TrainConfig = DEFAULT_CONFIG,
    resume: str | Path | None = None,
    adapter_format: str | None = None,
    dtype: torch.dtype = torch.float32,
    base_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Trainer:
    """Train on `data` (JSONL, see finetune.data) and write to `out`: the adapter (format
    `adapter_format`, else save_adapter's default) or, for full training (`lora` None), the whole model as a native folder.
    Checkpoints go to `out/checkpoint-N` every `config.save_every` steps; `resume` is one of them (or
    a run's `out` folder: its latest). Returns the trainer (its `history` holds the losses).
    """
    out = Path(out)
    tokenizer = load_tokenizer(model_path)
    limit = config.batch_tokens + 1  # an example of n tokens has n - 1 inputs
    examples = load_examples(data, tokenizer, limit)
    evals = load_examples(eval_data, tokenizer, limit) if eval_data is not None else None
    model = prepare_model(model_path, lora, quantize, dtype, device, base_dtype)
    trainer = Trainer(model, examples, config, evals)
    if resume is not None:
        trainer.resume(Path(resume))
    trainer.train(progress=progress, checkpoints=out)
    if lora is not None and adapter_format is not None:
        save_adapter(model, out, lora, fmt=adapter_format)
    elif lora is not None:
        save_adapter(model, out, lora)
    else:
        save_model(model, out, "native")
    return trainer
