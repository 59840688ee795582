"""tramontane: run Mistral and Llama-shaped models, exactly and fast.

The names below are imported on first use, so that `tramontane.jax` (and `tramontane.args`) can be
used where torch is not installed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .args import PRESETS, HeadArgs, ModelArgs, MoeArgs, preset
    from .cache import KVCache
    from .embed import embed
    from .errors import CheckpointError, ConfigError, TensorMismatchError, TokenizerError
    from .generate import Generation, compile_decode, generate, stream
    from .heads import TaskModel, classify
    from .loading import load_model, read_model_args, save_model
    from .loading.options import ModelOptions, OpenedModel, open_model
    from .mask_viz import visualize_mask
    from .model import Transformer
    from .parallel import ParallelConfig, ParallelError
    from .sampling import SamplingParams
    from .textgen import chat, complete, stream_chat, stream_text
    from .tokenizer import Tokenizer, load_tokenizer

_WHERE = {
    "args": ["PRESETS", "HeadArgs", "ModelArgs", "MoeArgs", "preset"],
    "cache": ["KVCache"],
    "embed": ["embed"],
    "errors": ["CheckpointError", "ConfigError", "TensorMismatchError", "TokenizerError"],
    "generate": ["Generation", "compile_decode", "generate", "stream"],
    "heads": ["TaskModel", "classify"],
    "loading": ["load_model", "read_model_args", "save_model"],
    "loading.options": ["ModelOptions", "OpenedModel", "open_model"],
    "mask_viz": ["visualize_mask"],
    "model": ["Transformer"],
    "parallel": ["ParallelConfig", "ParallelError"],
    "sampling": ["SamplingParams"],
    "textgen": ["chat", "complete", "stream_chat", "stream_text"],
    "tokenizer": ["Tokenizer", "load_tokenizer"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = [  # the names above (tests/test_package.py checks that both lists agree)
    "PRESETS", "CheckpointError", "ConfigError", "Generation", "HeadArgs", "KVCache", "ModelArgs", "ModelOptions", "MoeArgs",
    "OpenedModel", "ParallelConfig", "ParallelError", "SamplingParams", "TaskModel", "TensorMismatchError", "Tokenizer", "TokenizerError", "Transformer", "chat",
    "classify", "compile_decode", "complete", "embed", "generate", "load_model", "load_tokenizer", "open_model", "preset",
    "read_model_args", "save_model", "stream", "stream_chat", "stream_text", "visualize_mask",
]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """The package, which keeps its names over its submodules': loading `tramontane.generate` binds
    that module as the package's attribute `generate`, where the function `generate` belongs."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODULE_OF and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tramontane' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value
