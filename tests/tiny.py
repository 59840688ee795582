"""Random-weight tiny models, built with Hugging Face transformers (the reference) and saved to folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

# name -> (transformers config class, its arguments). Each exercises one feature of the architecture.
TINY: dict[str, tuple[Any, dict[str, Any]]] = {
    # a sliding window much shorter than the test sequences
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=8, rope_theta=10000.0)),
    "mistral-nowindow": (transformers.MistralConfig, dict(sliding_window=None, rope_theta=1e6)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_theta=100000.0)),
}
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512, rms_norm_eps=1e-5)


def hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, extra = TINY[name]
    config = config_cls(**COMMON, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves norms at 1 and small weights: spread them so that bugs show in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    return model.eval()


def save_hf(name: str, folder: Path, seed: int = 0) -> transformers.PreTrainedModel:
    model = hf_model(name, seed)
    model.save_pretrained(folder)
    return model
