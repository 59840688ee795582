"""Anthropic's Messages API over the chat machinery: its request bodies as pydantic models, their
translation into an OpenAI chat request (`to_chat`), and the answer's shapes (message, stream events).

No web framework here: `anthropic_routes` serves these. A conversation becomes OpenAI messages as
follows: `system` (a text or text blocks) is a system message; a user turn's `tool_result` blocks are
tool messages (before the turn's text, as Anthropic orders them); an assistant turn's `tool_use` blocks
are its `tool_calls`, without the turn's text (Mistral's formats hold one or the other). Tool-use ids that a Mistral tokenizer would refuse (it wants 9 letters or digits,
Anthropic's are `toolu_...`) are replaced by a stable 9-character digest, the same for a call and its result.

Example:
    >>> body = MessagesRequest.model_validate({"model": "m", "max_tokens": 64,
    ...     "system": "Be brief", "messages": [{"role": "user", "content": "Hi"}]})
    >>> [m["role"] for m in to_chat(body).messages]
    ['system', 'user']
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..tokenizer import Tokenizer
from . import protocol as p
from .errors import bad_request
from .mistral import call_id
from .schemas import MAX_STOP_STRINGS, ChatCompletionRequest, StopString

STRICT = ConfigDict(extra="ignore", strict=True)  # Anthropic's optional extras (cache_control, ...) are ignored
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # Anthropic's rule for a tool's name
# Our finish reasons in Anthropic's words ("stop" is end_turn or stop_sequence: see `stop_reason`)
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


# ---------------------------------------------------------------------------------------------- requests
class TextBlock(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    model_config = STRICT

    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = STRICT

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] = ""
    is_error: bool = False


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(BaseModel):
    model_config = STRICT

    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(BaseModel):
    """A client tool: what the model may call, and the JSON schema of its input."""

    model_config = STRICT

    type: Literal["custom"] | None = None
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Metadata(BaseModel):
    model_config = STRICT

    user_id: str | None = None


class CountTokensRequest(BaseModel):
    """`POST /v1/messages/count_tokens`: what makes the prompt of a `MessagesRequest`."""

    model_config = STRICT

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    """`POST /v1/messages`. Ranges are Anthropic's (temperature in [0, 1]); `max_tokens` is required, as there."""

    max_tokens: int = Field(ge=1)
    stop_sequences: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None  # accepted; nothing here uses it
    stream: bool = False


# ---------------------------------------------------------------------------------------------- translation
def to_chat(body: CountTokensRequest) -> ChatCompletionRequest:
    """The OpenAI chat request that asks what `body` asks. Raises APIError (400) naming the field of a
    conversation that cannot be one: a tool_result with no tool_use before it, a block in the wrong role."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system)})
    calls: set[str] = set()  # the tool_use ids of the assistant turn just before
    for i, message in enumerate(body.messages):
        turn = _turn(message, i, calls)
        calls = {c["id"] for m in turn for c in m.get("tool_calls", ())}
        messages.extend(turn)
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.input_schema}} for t in body.tools or []]
    fields: dict[str, Any] = {"model": body.model, "messages": messages, "tools": tools or None}
    choice = body.tool_choice
    if choice is not None:
        fields.update(tool_choice=_tool_choice(choice))
        if choice.disable_parallel_tool_use:
            if choice.type == "auto":
                raise bad_request("tool_choice.disable_parallel_tool_use: is enforced only on a forced tool call "
                                  "(type 'any' or 'tool'); with 'auto' the model may call several",
                                  "tool_choice.disable_parallel_tool_use")
            fields.update(parallel_tool_calls=False)
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                      top_k=body.top_k, stop=body.stop_sequences or None, stream=body.stream)
    return ChatCompletionRequest(**fields)


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "\n".join(b.text for b in content)


def _turn(message: Message, i: int, calls: set[str]) -> list[dict[str, Any]]:
    """OpenAI messages of one Anthropic turn; `calls`: the ids a tool_result here may answer."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts, out = [], []
    tool_calls: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):
        where = f"messages.{i}.content.{j}"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise bad_request(f"{where}: tool_use blocks belong in assistant turns", where)
            tool_calls.append({"id": call_id(block.id), "type": "function",
                               "function": {"name": block.name, "arguments": json.dumps(block.input)}})
        else:
            if message.role != "user":
                raise bad_request(f"{where}: tool_result blocks belong in user turns", where)
            if call_id(block.tool_use_id) not in calls:
                raise bad_request(f"{where}.tool_use_id: {block.tool_use_id!r} answers no tool_use block of the "
                                  "assistant turn just before", f"{where}.tool_use_id")
            result = _text(block.content)
            out.append({"role": "tool", "tool_call_id": call_id(block.tool_use_id),
                        "content": f"Error: {result}" if block.is_error else result})
    if message.role == "assistant":  # Mistral's formats hold text or calls, not both: the calls are what is answered
        return [{"role": "assistant", "tool_calls": tool_calls} if tool_calls else
                {"role": "assistant", "content": "\n".join(texts)}]
    return out + ([{"role": "user", "content": "\n".join(texts)}] if texts or not out else [])


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.type == "tool":
        if not choice.name:
            raise bad_request("tool_choice.name: required with type 'tool'", "tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


# ---------------------------------------------------------------------------------------------- answers
def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def message_body(mid: str, model: str, content: list[dict[str, Any]], stop_reason: str | None,
                 stop_sequence: str | None, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as a tool_use block (its arguments parsed: Anthropic's `input` is an object)."""
    function = call["function"]
    return {"type": "tool_use", "id": call["id"], "name": function["name"], "input": json.loads(function["arguments"])}


def answer(tokenizer: Tokenizer, choice: p.Choice, tools: bool, stops: tuple[str, ...]
           ) -> tuple[list[dict[str, Any]], str, str | None]:
    """The content blocks, stop_reason and stop_sequence of a finished choice."""
    message, reason = p.assistant_message(tokenizer, choice, tools)
    content = [{"type": "text", "text": message["content"]}] if message["content"] or "tool_calls" not in message \
        else []
    content += [tool_use_block(call) for call in message.get("tool_calls", ())]
    return (content, *stop_reason(tokenizer, choice, reason, stops))


def stop_reason(tokenizer: Tokenizer, choice: p.Choice, reason: str, stops: tuple[str, ...]
                ) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for our finish `reason`. A 'stop' is a stop sequence
    when the output, decoded whole, holds one (the text handed out was cut before it); else the model's end."""
    if reason != "stop":
        return STOP_REASONS.get(reason, "end_turn"), None
    whole = tokenizer.decode(choice.tokens)
    found = [(at, s) for s in stops if (at := whole.find(s)) >= 0]
    return ("stop_sequence", min(found)[1]) if found else ("end_turn", None)
