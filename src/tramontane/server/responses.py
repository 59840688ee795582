"""OpenAI's Responses API over the chat machinery: its request body as pydantic models, its translation
into a chat request (`to_chat`), the answer's shapes (response object, output items), and the store
of answered responses that `previous_response_id` continues from.

No web framework here: `responses_routes` serves these. A conversation becomes chat messages as follows:
`instructions` is a system message first; `message` items keep their role (`developer` is `system`);
consecutive `function_call` items are one assistant turn's `tool_calls` (an assistant text beside them is
left out: Mistral's formats hold one or the other); a `function_call_output` is a tool message and must
answer a call of the turn just before. Call ids a Mistral tokenizer would refuse become `mistral.call_id`.

Fields that would change the answer and are not served (`reasoning`, `background`, built-in tools,
`include`, `top_logprobs`, any field not listed here) are refused with a 400 naming them (`refuse_unserved`).

Example:
    >>> body = ResponsesRequest.model_validate({"model": "m", "input": "Hi", "instructions": "Be brief"})
    >>> [m["role"] for m in to_chat(body, []).messages]
    ['system', 'user']
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter

from ..tokenizer import Tokenizer
from . import protocol as p
from .errors import APIError, bad_request
from .mistral import call_id
from .schemas import ChatCompletionRequest

STRICT = ConfigDict(extra="ignore", strict=True)  # items: ids, statuses, annotations of earlier outputs ignored
STORE_CAPACITY = 256  # responses kept for `previous_response_id` and GET; the least recently used goes first
# Our error params in the Responses API's words: the chat path names the chat request's fields (a message's
# index is no index of `input`: instructions and history come before it)
RENAMES = ((re.compile(r"^messages(\[\d+\])?(\.\w+)?"), "input"),
           (re.compile(r"^max_(completion_)?tokens\b"), "max_output_tokens"),
           (re.compile(r"^response_format(\.json_schema)?"), "text.format"))


# ---------------------------------------------------------------------------------------------- requests
class InputText(BaseModel):
    model_config = STRICT

    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(BaseModel):
    """A turn of the conversation: OpenAI's "easy" message (no `type`) or a `message` item."""

    model_config = STRICT

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    model_config = STRICT

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = STRICT

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]


def _item_type(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    return str(kind)


Item = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                 | Annotated[FunctionCallOutputItem, Tag("function_call_output")], Discriminator(_item_type)]
ITEMS: TypeAdapter[list[Item]] = TypeAdapter(list[Item])


class FunctionTool(BaseModel):
    """A tool: only `function` tools are served; the type is checked in `to_chat`, to name a built-in one."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # enforced, by a grammar, on a forced call (tool_choice required or named)


class TextConfig(BaseModel):
    model_config = STRICT

    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(BaseModel):
    model_config = STRICT

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`. Ranges are OpenAI's; unknown fields are kept (`model_extra`) to be refused by name."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: harmless, not sent
    store: bool = True
    # harmless: accepted, echoed where OpenAI echoes them
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # refused unless they ask for nothing (`refuse_unserved`)
    reasoning: Reasoning | None = None
    background: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---------------------------------------------------------------------------------------------- translation
def refuse_unserved(body: ResponsesRequest) -> None:
    """Raise APIError (400) naming the first field that asks for what this server does not do (a field
    it does not know asks for nothing only when null: clients that send every field send nulls)."""
    unknown = next((name for name, value in (body.model_extra or {}).items() if value is not None), None)
    if unknown is not None:
        raise bad_request(f"{unknown}: is not supported by this server; leave it out", unknown)
    refusals = [
        (body.background, "background", "background responses are not supported; leave it out or false"),
        (body.reasoning and body.reasoning.effort not in (None, "none"), "reasoning.effort",
         "this server's models do not reason; leave reasoning out"),
        (body.reasoning and (body.reasoning.summary or body.reasoning.generate_summary), "reasoning.summary",
         "this server's models do not reason, so there is nothing to summarize"),
        (body.include, "include", "no additional output data is served; leave it out or empty"),
        (body.top_logprobs, "top_logprobs", "log probabilities are not served here; use /v1/chat/completions"),
        (body.truncation == "auto", "truncation", "only 'disabled' is served: a conversation beyond the context "
                                                  "is refused, not shortened"),
        (body.text and body.text.verbosity not in (None, "medium"), "text.verbosity", "only 'medium' is served"),
    ]
    for refused, param, why in refusals:
        if refused:
            raise bad_request(f"{param}: {why}", param)


def to_chat(body: ResponsesRequest, history: list[Item]) -> ChatCompletionRequest:
    """The chat request that asks what `body` asks, after the `history` of its previous response.
    Raises APIError (400) naming the field of what cannot be a conversation or is not served."""
    refuse_unserved(body)
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    if not history and not items:
        raise bad_request("input: must hold at least one item", "input")
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages += _messages([*history, *items], len(history))
    tools = [_tool(t, i) for i, t in enumerate(body.tools or [])]
    fields: dict[str, Any] = {
        "model": body.model, "messages": messages, "tools": tools or None, "tool_choice": _tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls, "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream, "user": body.user,
        "response_format": _response_format(body.text.format if body.text else None)}
    return ChatCompletionRequest(**fields)


def _messages(items: list[Item], skip: int) -> list[dict[str, Any]]:
    """Chat messages of a conversation's items; the first `skip` (the stored history) are not the request's
    `input`, so errors count from after them."""
    out: list[dict[str, Any]] = []
    text: list[str] = []  # the open assistant turn's text and calls
    calls: list[dict[str, Any]] = []
    answerable: set[str] = set()  # the call ids of the last assistant turn

    def close_turn() -> None:
        nonlocal answerable
        if calls or text:  # Mistral's formats hold text or calls, not both: the calls are what is answered
            out.append({"role": "assistant", "tool_calls": list(calls)} if calls else
                       {"role": "assistant", "content": "\n".join(text)})
            answerable = {c["id"] for c in calls}
        calls.clear()
        text.clear()

    for i, item in enumerate(items):
        where = f"input[{i - skip}]"
        if isinstance(item, FunctionCallItem):
            calls.append({"id": call_id(item.call_id), "type": "function",
                          "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, MessageItem) and item.role == "assistant":
            text.append(item.text)
        else:
            close_turn()
            if isinstance(item, MessageItem):
                out.append({"role": "user" if item.role == "user" else "system", "content": item.text})
                answerable = set()
            elif call_id(item.call_id) not in answerable:
                raise bad_request(f"{where}.call_id: {item.call_id!r} answers no function_call of the turn just "
                                  "before", f"{where}.call_id")
            else:
                output = item.output if isinstance(item.output, str) else "\n".join(t.text for t in item.output)
                out.append({"role": "tool", "tool_call_id": call_id(item.call_id), "content": output})
    close_turn()
    return out


def _tool(tool: FunctionTool, i: int) -> dict[str, Any]:
    if tool.type != "function":
        raise bad_request(f"tools[{i}].type: {tool.type!r} is a built-in tool this server does not have; only "
                          "'function' tools are served", f"tools[{i}].type")
    if not tool.name:
        raise bad_request(f"tools[{i}].name: required for a function tool", f"tools[{i}].name")
    parameters = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": {"name": tool.name, "description": tool.description or "",
                                             "parameters": parameters}}


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function":
        raise bad_request(f"tool_choice.type: {choice.get('type')!r} is not served; give 'auto', 'none', "
                          "'required' or {'type': 'function', 'name': ...}", "tool_choice.type")
    if not isinstance(choice.get("name"), str) or not choice["name"]:
        raise bad_request("tool_choice.name: required with type 'function'", "tool_choice.name")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat's `response_format` for `text.format`: its json_schema fields sit one level up here."""
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


@contextmanager
def in_responses_terms() -> Iterator[None]:
    """Errors raised inside, their param and message in the Responses API's field names (`messages` is `input`)."""
    try:
        yield
    except APIError as e:
        for old, new in RENAMES:
            if e.param is not None and old.match(e.param):
                e.param = old.sub(new, e.param, count=1)
                e.message = old.sub(new, e.message, count=1)
                break
        raise


# ---------------------------------------------------------------------------------------------- answers
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_body(rid: str, body: ResponsesRequest, model: str, created: int) -> dict[str, Any]:
    """The response object as it starts (in progress, no output): what it echoes of the request."""
    fmt = (body.text.format if body.text else None) or {"type": "text"}
    return {
        "id": rid, "object": "response", "created_at": created, "status": "in_progress", "background": False,
        "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": model, "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "service_tier": body.service_tier or "default",
        "store": body.store, "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": fmt, "verbosity": "medium"}, "tool_choice": body.tool_choice or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "usage": None,
        "user": body.user, "metadata": body.metadata or {}, "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key}


def finished(start: dict[str, Any], output: list[dict[str, Any]], reason: str, prompt_tokens: int,
             choice: p.Choice) -> dict[str, Any]:
    """`start` answered: its output, status ('incomplete' when the output hit the token budget) and usage."""
    incomplete = reason == "length"
    return {**start, "status": "incomplete" if incomplete else "completed", "output": output,
            "completed_at": None if incomplete else p.now(),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "usage": {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": choice.cached_tokens},
                      "output_tokens": len(choice.tokens), "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt_tokens + len(choice.tokens)}}


def failed(start: dict[str, Any], error: APIError) -> dict[str, Any]:
    return {**start, "status": "failed", "error": {"code": error.code or "server_error", "message": error.message}}


def message_item(mid: str, parts: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": parts}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat tool call as a `function_call` item; its `call_id` is what a `function_call_output` answers."""
    function = call["function"]
    return {"type": "function_call", "id": new_id("fc"), "call_id": call["id"], "name": function["name"],
            "arguments": function["arguments"], "status": "completed"}


def output_items(tokenizer: Tokenizer, choice: p.Choice, tools: bool) -> tuple[list[dict[str, Any]], str]:
    """The output items of a finished choice and its finish reason: a message with its text (none when the
    answer only calls functions), then a `function_call` item per call."""
    message, reason = p.assistant_message(tokenizer, choice, tools)
    calls = message.get("tool_calls") or []
    status = "incomplete" if reason == "length" else "completed"
    text = message["content"] or ""
    items = [message_item(new_id("msg"), [text_part(text)], status)] if text or not calls else []
    return items + [function_call_item(call) for call in calls], reason


# ---------------------------------------------------------------------------------------------- store
@dataclass
class Stored:
    body: dict[str, Any]  # the response object, as GET answers it
    items: list[Item]  # its conversation: history, input and output, for a `previous_response_id`


class ResponseStore:
    """The last `capacity` responses asked to be stored, in memory; the least recently used is dropped first.

    Example:
        >>> store = ResponseStore(capacity=2)
        >>> store.put({"id": "resp_1"}, [])
        >>> store.get("resp_1").body["id"]
        'resp_1'
    """

    def __init__(self, capacity: int = STORE_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.capacity = capacity
        self._kept: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, body: dict[str, Any], items: list[Item]) -> None:
        self._kept[body["id"]] = Stored(body, items)
        self._kept.move_to_end(body["id"])
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, rid: str) -> Stored | None:
        stored = self._kept.get(rid)
        if stored is not None:
            self._kept.move_to_end(rid)
        return stored

    def delete(self, rid: str) -> bool:
        return self._kept.pop(rid, None) is not None

    def conversation(self, body: ResponsesRequest, output: list[dict[str, Any]], history: list[Item]
                     ) -> list[Item]:
        """The items a response continuing from this one starts with: `history`, `body`'s input, `output`.
        (A previous response's `instructions` are not carried on, as OpenAI does.)"""
        given = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
        return [*history, *given, *ITEMS.validate_python(output)]
