"""What Mistral's API adds to OpenAI's, as the `mistralai` client sends and reads it: the safety prompt
of `safe_prompt`, and the model card fields its `models.list()` validates; and the tool-call ids
Mistral's tokenizers accept, for conversations other servers' ids came from (`call_id`).

Example:
    >>> with_safety_prompt([{"role": "user", "content": "Hi"}])[0]["role"]
    'system'
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from ..tokenizer import Tokenizer

# Mistral's documented guardrail prompt, put before the conversation when a request has `safe_prompt: true`.
SAFETY_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
                 "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.")
CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")  # what Mistral's v3+ tokenizers accept as a tool-call id


def with_safety_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with Mistral's safety prompt first: before a leading system prompt's text (a blank line
    between them), or as a system message of its own."""
    first = messages[0] if messages else None
    if isinstance(first, Mapping) and first.get("role") == "system" and isinstance(first.get("content"), str):
        return [{**first, "content": f"{SAFETY_PROMPT}\n\n{first['content']}"}, *messages[1:]]
    return [{"role": "system", "content": SAFETY_PROMPT}, *messages]


def capabilities(tokenizer: Tokenizer, generates: bool = True) -> dict[str, bool]:
    """Mistral's `capabilities` of a served model, read from its tokenizer: a chat format, FIM tokens,
    a tool-call token; none of them for a model that does not generate (an embedding model).
    Fine-tuning, vision and classification are not served."""
    return {"completion_chat": generates and tokenizer.chat_format != "none",
            "completion_fim": generates and tokenizer.has_fim,
            "function_calling": generates and tokenizer.has_tool_calls, "fine_tuning": False, "vision": False,
            "classification": False}


def call_id(foreign: str) -> str:
    """`foreign` (a tool-call id from any client: `toolu_...`, `call_...`) where a Mistral tokenizer accepts
    it, else a stable digest of it in the accepted form: the same for a call and its result."""
    return foreign if CALL_ID.fullmatch(foreign) else hashlib.sha256(foreign.encode()).hexdigest()[:9]
