"""tramontane: run Mistral and Llama-shaped models, exactly and fast."""

from .args import PRESETS, HeadArgs, ModelArgs, MoeArgs, preset
from .cache import KVCache
from .errors import CheckpointError, ConfigError, TensorMismatchError, TokenizerError
from .generate import Generation, compile_decode, generate, stream
from .heads import TaskModel, classify
from .loading import load_model, read_model_args, save_model
from .mask_viz import visualize_mask
from .model import Transformer
from .parallel import ParallelConfig, ParallelError
from .sampling import SamplingParams
from .textgen import chat, complete, stream_chat, stream_text
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "ModelArgs", "MoeArgs", "TensorMismatchError",
    "TokenizerError", "preset", "compile_decode", "load_model", "read_model_args", "save_model", "Transformer", "KVCache",
    "Generation", "generate", "stream", "SamplingParams", "chat", "complete", "stream_chat", "stream_text",
    "Tokenizer", "load_tokenizer", "HeadArgs", "TaskModel", "classify", "visualize_mask",
    "ParallelConfig", "ParallelError",
]
__version__ = "0.1.0"
