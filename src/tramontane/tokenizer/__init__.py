"""One tokenizer interface over mistral_common, Hugging Face `tokenizers` and GGUF vocabularies.

    >>> from tramontane import load_tokenizer
    >>> tok = load_tokenizer("models/Mistral-7B-Instruct-v0.3")
    >>> ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
"""

from .base import (
    ChatPiece,
    IncrementalDecoder,
    ParsedOutput,
    Tokenizer,
    ToolCallParseError,
    check_conversation,
    new_tool_call_id,
)
from .gguf import gguf_tokenizer_from_file
from .hf import HFTokenizer
from .load import load_tokenizer
from .mistral import MistralCommonTokenizer

__all__ = [
    "ChatPiece",
    "HFTokenizer",
    "IncrementalDecoder",
    "MistralCommonTokenizer",
    "ParsedOutput",
    "Tokenizer",
    "ToolCallParseError",
    "check_conversation",
    "gguf_tokenizer_from_file",
    "load_tokenizer",
    "new_tool_call_id",
]
