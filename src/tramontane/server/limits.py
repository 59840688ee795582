"""What one request may ask of the server, checked before any work is done for it.

`ServerLimits` holds the limits on a request that `tramontane serve` takes as options, and
`ConnectionLimits` those on a connection (uvicorn applies them); `scan_text` checks every string
of a parsed body (a lone surrogate or a NUL reaches no tokenizer) and counts the prompt's characters,
so that a prompt far beyond any context is refused before it is tokenized.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from .errors import APIError, bad_request

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
CHARS_PER_TOKEN = 16  # the default prompt cap per token of context: tokens are rarely longer
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")  # json decodes a valid surrogate pair into one character


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request, each named in the error that refuses it.

    - max_request_bytes: the request body, counted as it arrives (chunked bodies too), before parsing.
    - max_prompt_chars: characters of prompt text (prompts, suffix, messages, tools) before tokenizing;
      None: `CHARS_PER_TOKEN` per token of the engine's context.
    - body_timeout: seconds a client may take to send the whole body.
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_prompt_chars: int | None = None
    body_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes: must be >= 1, got {self.max_request_bytes}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars: must be >= 1, got {self.max_prompt_chars}")
        if not self.body_timeout > 0:
            raise ValueError(f"body_timeout: must be > 0, got {self.body_timeout}")

    def prompt_chars(self, context: int) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else CHARS_PER_TOKEN * context


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on connections, so that slow or idle clients cannot hold the server.

    - header_timeout: seconds from a connection's start (or its previous answer) to a request's full headers.
    - keep_alive_timeout: seconds an idle keep-alive connection stays open.
    - max_connections: open connections and running requests together; beyond, new requests get 503.
    - shutdown_timeout: seconds running requests get to finish after SIGTERM; the rest end with an error.
    """

    header_timeout: float = 10.0
    keep_alive_timeout: int = 5  # uvicorn takes whole seconds
    max_connections: int = 512
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("header_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections: must be >= 1, got {self.max_connections}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout: must be >= 0, got {self.shutdown_timeout}")


def scan_text(body: BaseModel, prompt_fields: Sequence[str]) -> int:
    """The characters of text in `prompt_fields` of `body`, after checking every string of every field.

    Raises:
        APIError: 400 naming the path of the first string holding a lone surrogate or a NUL
            ("messages[1].content").
    """
    total = 0
    for name in type(body).model_fields:
        chars = _scan(getattr(body, name), name)
        if name in prompt_fields:
            total += chars
    return total


def check_prompt_chars(chars: int, cap: int, param: str) -> None:
    if chars > cap:
        raise bad_request(f"{param}: the prompt holds {chars} characters; this server tokenizes at most {cap} "
                          f"per request (--max-prompt-chars)", param, "context_length_exceeded")


def _scan(value: object, param: str) -> int:
    if isinstance(value, str):
        bad = _BAD_TEXT.search(value)
        if bad is not None:
            raise _bad_text(param, bad.group(0))
        return len(value)
    if isinstance(value, BaseModel):
        return sum(_scan(getattr(value, k), f"{param}.{k}") for k in type(value).model_fields)
    if isinstance(value, Mapping):
        total = 0
        for key, item in value.items():
            total += _scan(key, param) + _scan(item, f"{param}.{key}")
        return total
    if isinstance(value, list):
        return sum(_scan(item, f"{param}[{i}]") for i, item in enumerate(value))
    return 0


def _bad_text(param: str, char: str) -> APIError:
    what = "a NUL character" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    return bad_request(f"{param}: the text holds {what}; send valid Unicode text", param, "invalid_text")
