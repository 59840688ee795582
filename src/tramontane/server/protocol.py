"""OpenAI's response shapes, built from engine events: plain functions and dicts, no web framework.

A `Choice` collects one engine request's events; the functions below turn choices into completion
and chat-completion bodies, streamed chunks, logprobs, usage and tool calls.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import EngineEvent
from ..tokenizer import Tokenizer
from .errors import APIError

DONE = "data: [DONE]\n\n"
TOOL_CALLS_PIECE = "[TOOL_CALLS]"  # the control token that opens a tool call in Mistral's vocabularies
Alternatives = tuple[tuple[int, float], ...]  # (token, logprob) of the most likely tokens at one step, best first


@dataclass
class Choice:
    """One choice's output so far: text pieces, generated token ids, their logprobs and the most likely
    alternatives at each step (`tops`, when top logprobs were asked for)."""

    pieces: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[Alternatives] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and accepted, for this choice
    accepted_tokens: int = 0

    def add(self, event: EngineEvent) -> None:
        if event.text:
            self.pieces.append(event.text)
        if event.token is not None:
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.tops.append(event.top_logprobs)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error
            self.cached_tokens = event.cached_tokens
            self.draft_tokens, self.accepted_tokens = event.draft_tokens, event.accepted_tokens

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def failure(self, timeout: float | None, shutting_down: bool = False) -> APIError | None:
        """The error to answer with when the engine did not finish this choice normally
        (`shutting_down`: the server cancelled it because it is stopping)."""
        if self.finish_reason == "cancelled" and shutting_down:
            return APIError(503, "the server is shutting down; the request was stopped unfinished",
                            kind="server_error", code="server_shutdown")
        if self.finish_reason == "timeout":
            return APIError(504, f"the request did not finish within its deadline of {timeout} seconds",
                            kind="timeout_error", code="request_timeout")
        if self.finish_reason == "error":
            return APIError(500, f"generation failed: {self.error}", kind="server_error")
        if self.finish_reason == "cancelled":
            return APIError(503, "the request was cancelled", kind="server_error", code="cancelled")
        return None


def first_failure(choices: list[Choice], timeout: float | None, shutting_down: bool = False) -> APIError | None:
    return next((f for c in choices if (f := c.failure(timeout, shutting_down)) is not None), None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, choices: list[Choice], n: int = 1) -> dict[str, Any]:
    """Token counts of one call whose choices come `n` per prompt (prompt p's are p * n ... p * n + n - 1);
    `prompt_tokens_details.cached_tokens` counts the prompt tokens that came from the prefix cache
    (those of each prompt's first choice, since a prompt is counted once). With speculative decoding, the
    extension field `speculative` counts the tokens drafted and accepted."""
    completion_tokens = sum(len(c.tokens) for c in choices)
    cached = sum(c.cached_tokens for c in choices[::n])
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens,
                           "prompt_tokens_details": {"cached_tokens": cached}}
    if drafted := sum(c.draft_tokens for c in choices):
        out["speculative"] = {"draft_tokens": drafted, "accepted_tokens": sum(c.accepted_tokens for c in choices)}
    return out


class TokenPieces:
    """The bytes each token of one sequence adds to its text, token after token.

    As in the incremental decoder, a sentencepiece vocabulary drops the space of the first piece, so
    the pieces joined are the sequence's text. Text that splits a character shows U+FFFD; bytes are exact.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.first = True

    def peek(self, token: int) -> bytes:
        """The bytes `token` would add here, without moving on (for the alternatives of a step)."""
        return self.tokenizer.token_bytes(token, first=self.first)

    def next(self, token: int) -> bytes:
        raw = self.tokenizer.token_bytes(token, first=self.first)
        if not self.tokenizer.is_special(token):
            self.first = False
        return raw


def is_tool_call_start(tokenizer: Tokenizer, token: int | None) -> bool:
    return token is not None and tokenizer.is_special(token) and tokenizer.id_to_piece(token) == TOOL_CALLS_PIECE


# ---------------------------------------------------------------------------------------------- logprobs
def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def completion_logprobs(pieces: TokenPieces, tokens: list[int], logprobs: list[float | None],
                        tops: list[Alternatives | None], offset: int = 0) -> dict[str, Any]:
    """Legacy completions logprobs, `text_offset` from `offset`: `top_logprobs` holds one {text: logprob}
    per token (null for echoed prompt tokens, whose `tops` entry is None)."""
    texts, alternatives = [], []
    for token, top in zip(tokens, tops):
        alternatives.append(None if top is None else {_text(pieces.peek(t)): lp for t, lp in top})
        texts.append(_text(pieces.next(token)))
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": alternatives, "text_offset": offsets}


def chat_logprobs(pieces: TokenPieces, tokens: list[int], logprobs: list[float | None], tops: list[Alternatives]
                  ) -> dict[str, Any]:
    """Chat logprobs: one entry per chosen token, with `top_logprobs` alternatives as OpenAI shapes them."""
    content = []
    for token, logprob, top in zip(tokens, logprobs, tops):
        alternatives = []
        for t, lp in top:
            raw = pieces.peek(t)
            alternatives.append({"token": _text(raw), "logprob": lp, "bytes": list(raw)})
        raw = pieces.next(token)
        content.append({"token": _text(raw), "logprob": logprob, "bytes": list(raw), "top_logprobs": alternatives})
    return {"content": content}


# ---------------------------------------------------------------------------------------------- completions
def completion_body(
    cid: str, created: int, model: str, choices: list[dict[str, Any]], usage_: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


# ---------------------------------------------------------------------------------------------- chat
def assistant_message(tokenizer: Tokenizer, choice: Choice, tools: bool) -> tuple[dict[str, Any], str]:
    """The assistant message of a finished choice and its finish reason ("tool_calls" when it called tools).

    With `tools`, the whole output is parsed with `tokenizer.parse_tool_calls`; output that does not
    parse into tool calls is returned as text.
    """
    reason = choice.finish_reason or "stop"
    if tools:
        parsed = tokenizer.parse_tool_calls(choice.tokens)
        if parsed.tool_calls:
            return {"role": "assistant", "content": parsed.content or None, "tool_calls": parsed.tool_calls}, "tool_calls"
    return {"role": "assistant", "content": choice.text}, reason


def tool_call_deltas(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed form of tool calls: each whole call in one delta, with its index."""
    return [{"index": k, **call} for k, call in enumerate(tool_calls)]


def chat_body(
    cid: str, created: int, model: str, choices: list[dict[str, Any]], usage_: dict[str, Any]
) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_}


def chat_chunk(
    cid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    *,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(cid: str, created: int, model: str, obj: str, usage_: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, only usage."""
    return {"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


async def shown_text(events: AsyncIterator[tuple[int, EngineEvent]], choice: Choice, tokenizer: Tokenizer,
                     tools: bool, failure: Callable[[], APIError | None]) -> AsyncIterator[tuple[str, Any]]:
    """One choice's answer as it streams, for the dialects that show its text at once and its tool calls
    at the end (Anthropic's, the Responses API): ("text", piece) for text to show now; from a tool-call
    token on the text is held back until the call can be parsed, and comes last as ("held", text), None
    when nothing was held; ("failure", error) ends the stream early. Every event is added to `choice`."""
    held: list[str] | None = None  # text after [TOOL_CALLS], until the call parses
    async for _, ev in events:
        choice.add(ev)
        if (error := failure()) is not None:
            yield "failure", error
            return
        if tools and held is None and is_tool_call_start(tokenizer, ev.token):
            held = []
        if held is not None:
            held.append(ev.text)
        elif ev.text:
            yield "text", ev.text
    yield "held", None if held is None else "".join(held)

