"""OpenAI's `POST /v1/responses`, `GET /v1/responses/{id}` and `DELETE /v1/responses/{id}`, over the
server's chat path.

A request is translated into a chat request (`responses.to_chat`) and goes through the same checks, chat
template, grammars, engine queue and limits as /v1/chat/completions; its errors name the Responses API's
fields (`input`, `max_output_tokens`, `text.format`). Answered responses with `store` (the default) are
kept in a bounded `ResponseStore`, owned by these routes, for `previous_response_id` and GET.

Example:
    >>> app.include_router(responses_router(server))  # `server`: the app's `OpenAIServer`
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request as HTTPRequest

from . import protocol as p
from . import responses as r
from .anthropic_routes import ChatServer
from .bridge import Submission
from .errors import APIError, bad_request
from .streaming import EventStream, typed_event


class ResponsesServer(ChatServer, Protocol):
    """What these routes use of the app's server (`app.OpenAIServer`)."""

    model_name: str


def responses_router(server: ResponsesServer, store: r.ResponseStore | None = None) -> APIRouter:
    """The Responses API's routes, answered by `server`; answers kept in `store` (None: a fresh one)."""
    routes = ResponsesRoutes(server, store or r.ResponseStore())
    router = APIRouter()
    router.add_api_route("/v1/responses", routes.create, methods=["POST"])
    router.add_api_route("/v1/responses/{response_id}", routes.retrieve, methods=["GET"])
    router.add_api_route("/v1/responses/{response_id}", routes.delete, methods=["DELETE"])
    return router


def _not_found(rid: str, param: str) -> APIError:
    return APIError(404, f"{param}: no stored response has the id {rid!r} (responses are kept in memory, the last "
                         f"{r.STORE_CAPACITY}, and only with store: true)", param=param, code="response_not_found")


class ResponsesRoutes:
    def __init__(self, server: ResponsesServer, store: r.ResponseStore) -> None:
        self.server = server
        self.store = store

    async def retrieve(self, response_id: str, stream: bool = False) -> Response:
        if stream:
            raise bad_request("stream: a stored response is not streamed again; leave it out", "stream")
        stored = self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id, "response_id")
        return JSONResponse(stored.body)

    async def delete(self, response_id: str) -> Response:
        if not self.store.delete(response_id):
            raise _not_found(response_id, "response_id")
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def create(self, body: r.ResponsesRequest, request: HTTPRequest) -> Response:
        history: list[r.Item] = []
        if body.previous_response_id is not None:
            previous = self.store.get(body.previous_response_id)
            if previous is None:
                raise _not_found(body.previous_response_id, "previous_response_id")
            history = previous.items
        with r.in_responses_terms():
            chat = r.to_chat(body, history)
            prompt, tools = await self.server.chat_prompt(chat)
            sub = await self.server.submit_chat(chat, prompt, tools)
        start = r.response_body(r.new_id("resp"), body, body.model or self.server.model_name, p.now())
        if body.stream:
            events = self._stream(sub, start, body, history, len(prompt), tools is not None)
            return EventStream(events, on_close=lambda: self.server.release(sub))
        (choice,) = await self.server.collect(sub, request)
        output, reason = r.output_items(self.server.tokenizer, choice, tools is not None)
        return JSONResponse(self._keep(body, history, r.finished(start, output, reason, len(prompt), choice)))

    def _keep(self, body: r.ResponsesRequest, history: list[r.Item], done: dict[str, Any]) -> dict[str, Any]:
        if body.store:
            self.store.put(done, self.store.conversation(body, done["output"], history))
        return done

    async def _stream(self, sub: Submission, start: dict[str, Any], body: r.ResponsesRequest,
                      history: list[r.Item], prompt_tokens: int, tools: bool) -> AsyncIterator[str]:
        """OpenAI's event sequence: response.created and .in_progress; a message item as the text comes (its
        output_text part, deltas, then the .done events); a function_call item per call once the call after
        [TOOL_CALLS] has parsed (its arguments in one delta); response.completed, .incomplete or .failed."""
        tok = self.server.tokenizer
        numbers = itertools.count()

        def emit(kind: str, **fields: Any) -> str:
            return typed_event({"type": kind, "sequence_number": next(numbers), **fields})

        yield emit("response.created", response=start)
        yield emit("response.in_progress", response=start)
        mid, shown = r.new_id("msg"), list[str]()
        at = {"item_id": mid, "output_index": 0, "content_index": 0}

        def text(piece: str) -> Iterator[str]:
            if not shown:  # opened on the first text, so an answer that only calls a function has no empty message
                shown.append("")
                yield emit("response.output_item.added", output_index=0, item=r.message_item(mid, [], "in_progress"))
                yield emit("response.content_part.added", **at, part=r.text_part(""))
            if piece:
                shown.append(piece)
                yield emit("response.output_text.delta", **at, delta=piece, logprobs=[])

        choice = p.Choice()
        held: str | None = None
        async for kind, value in p.shown_text(sub.events(), choice, tok, tools, lambda: choice.failure(
                self.server.request_timeout, self.server.shutting_down)):
            if kind == "failure":
                yield emit("response.failed", response=r.failed(start, value))
                return
            if kind == "text":
                for chunk in text(value):
                    yield chunk
            else:
                held = value
        message, reason = p.assistant_message(tok, choice, tools)
        calls: list[dict[str, Any]] = message.get("tool_calls") or []
        if not calls and (held or not shown):  # text held back that was no call after all; or an empty answer
            for chunk in text(held or ""):
                yield chunk
        output = []
        if shown:
            whole = "".join(shown)
            part = r.text_part(whole)
            item = r.message_item(mid, [part], "incomplete" if reason == "length" else "completed")
            yield emit("response.output_text.done", **at, text=whole, logprobs=[])
            yield emit("response.content_part.done", **at, part=part)
            yield emit("response.output_item.done", output_index=0, item=item)
            output.append(item)
        for call in calls:
            index, item = len(output), r.function_call_item(call)
            where = {"item_id": item["id"], "output_index": index}
            yield emit("response.output_item.added", output_index=index,
                       item={**item, "arguments": "", "status": "in_progress"})
            yield emit("response.function_call_arguments.delta", **where, delta=item["arguments"])
            yield emit("response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"])
            yield emit("response.output_item.done", output_index=index, item=item)
            output.append(item)
        done = self._keep(body, history, r.finished(start, output, reason, prompt_tokens, choice))
        yield emit(f"response.{done['status']}", response=done)
