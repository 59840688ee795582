"""Anthropic's `POST /v1/messages` and `POST /v1/messages/count_tokens`, over the server's chat path.

A request is translated into an OpenAI chat request (`anthropic.to_chat`) and goes through the same
checks, chat template, grammars, engine queue and limits as /v1/chat/completions; only the answer's
shape differs. Errors on these paths take Anthropic's shape (`errors.speaks_anthropic`), whichever
layer raises them; an error in the middle of a stream is an `error` event, as Anthropic sends one.

Example:
    >>> app.include_router(anthropic_router(server))  # `server`: the app's `OpenAIServer`
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request as HTTPRequest

from ..tokenizer import Tokenizer
from . import anthropic as a
from . import protocol as p
from .bridge import Submission
from .schemas import ChatCompletionRequest
from .streaming import EventStream, typed_event


class ChatServer(Protocol):
    """What these routes use of the app's server (`app.OpenAIServer`)."""

    tokenizer: Tokenizer
    request_timeout: float | None
    shutting_down: bool

    async def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], list[dict[str, Any]] | None]: ...

    async def submit_chat(self, body: ChatCompletionRequest, prompt: list[int],
                          tools: list[dict[str, Any]] | None) -> Submission: ...

    async def collect(self, sub: Submission, request: HTTPRequest) -> list[p.Choice]: ...

    def release(self, sub: Submission) -> None: ...


def anthropic_router(server: ChatServer) -> APIRouter:
    """The Messages API's routes, answered by `server`."""
    routes = MessagesRoutes(server)
    router = APIRouter()
    router.add_api_route("/v1/messages", routes.create, methods=["POST"])
    router.add_api_route("/v1/messages/count_tokens", routes.count_tokens, methods=["POST"])
    return router


class MessagesRoutes:
    def __init__(self, server: ChatServer) -> None:
        self.server = server

    async def count_tokens(self, body: a.CountTokensRequest) -> Response:
        prompt, _ = await self.server.chat_prompt(a.to_chat(body))
        return JSONResponse({"input_tokens": len(prompt)})

    async def create(self, body: a.MessagesRequest, request: HTTPRequest) -> Response:
        chat = a.to_chat(body)
        prompt, tools = await self.server.chat_prompt(chat)
        sub = await self.server.submit_chat(chat, prompt, tools)
        mid, stops = a.new_message_id(), tuple(body.stop_sequences or ())
        if body.stream:
            events = self._stream(sub, mid, body.model, len(prompt), tools is not None, stops)
            return EventStream(events, on_close=lambda: self.server.release(sub))
        (choice,) = await self.server.collect(sub, request)
        content, reason, stop = a.answer(self.server.tokenizer, choice, tools is not None, stops)
        return JSONResponse(a.message_body(mid, body.model, content, reason, stop, len(prompt), len(choice.tokens)))

    async def _stream(self, sub: Submission, mid: str, model: str, prompt_tokens: int, tools: bool,
                      stops: tuple[str, ...]) -> AsyncIterator[str]:
        """Anthropic's event sequence: message_start, a text block as the text comes, the tool_use blocks
        once the call after [TOOL_CALLS] has parsed (their input in one input_json_delta each), message_delta
        with the stop reason and usage, message_stop."""
        tok = self.server.tokenizer
        yield typed_event({"type": "message_start",
                           "message": a.message_body(mid, model, [], None, None, prompt_tokens, 0)})
        yield typed_event({"type": "ping"})
        choice = p.Choice()
        text_open = False

        def text(piece: str) -> Iterator[str]:
            nonlocal text_open
            if not text_open:  # opened on the first text, so an answer that only calls a tool has no empty block
                text_open = True
                yield typed_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            yield typed_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})

        held: str | None = None
        async for kind, value in p.shown_text(sub.events(), choice, tok, tools, lambda: choice.failure(
                self.server.request_timeout, self.server.shutting_down)):
            if kind == "failure":
                yield typed_event(value.anthropic_body())
                return
            if kind == "text":
                for chunk in text(value):
                    yield chunk
            else:
                held = value
        message, reason = p.assistant_message(tok, choice, tools)
        calls: list[dict[str, Any]] = message.get("tool_calls") or []
        if held and not calls:  # not a valid call after all: the text held back
            for chunk in text(held):
                yield chunk
        if text_open:
            yield typed_event({"type": "content_block_stop", "index": 0})
        for index, call in enumerate(calls, start=int(text_open)):
            block = a.tool_use_block(call)
            yield typed_event({"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}})
            yield typed_event({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": call["function"]["arguments"]}})
            yield typed_event({"type": "content_block_stop", "index": index})
        stop_reason, stop = a.stop_reason(tok, choice, reason, stops)
        yield typed_event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop},
                           "usage": {"input_tokens": prompt_tokens, "output_tokens": len(choice.tokens)}})
        yield typed_event({"type": "message_stop"})
