"""The one tokenizer interface, the streaming decoder, conversation checks and tool-call parsing.

Every backend (mistral_common, Hugging Face `tokenizer.json`, GGUF vocabularies) implements `Tokenizer`;
generation, the CLI and the server only ever see this class.
"""

from __future__ import annotations

import codecs
import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TokenizerError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatPiece:
    """Consecutive ids of a tokenized conversation; `assistant` is the index of the assistant message
    they belong to, or None (prompt, headers, tool results)."""

    ids: list[int]
    assistant: int | None


@dataclass(frozen=True)
class ToolCallParseError:
    """The model started a tool call that could not be read; returned, never raised.

    `text` is the raw tool-call text the model produced, so a server can log it or show it.
    """

    message: str
    text: str


@dataclass(frozen=True)
class ParsedOutput:
    """What an assistant turn said: its text and its tool calls in OpenAI form.

    Each tool call is `{"id": ..., "type": "function", "function": {"name": ..., "arguments": "<json>"}}`.
    `error` is set (and `tool_calls` is empty) when the model emitted a tool call that is not valid JSON.
    """

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    error: ToolCallParseError | None = None


class IncrementalDecoder:
    """Turns token ids arriving one at a time into text that is safe to show.

    Bytes of a character split over several tokens (byte-fallback pieces of an emoji or a CJK
    character) are held back until the character is complete, and the sentencepiece rule that drops
    the space of the first piece is applied, so the pieces joined equal `tokenizer.decode(ids)`.

    Example:
        >>> dec = tok.decoder()
        >>> text = "".join(dec.add(i) for i in ids) + dec.flush()
    """

    def __init__(self, tokenizer: Tokenizer, continuation: bool = False) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # A continuation of earlier text keeps the space that sentencepiece drops at the very start.
        self._first = not continuation

    def add(self, token_id: int) -> str:
        """Feed one token id; return the text that is now complete (often "", never a broken character)."""
        piece = self._tokenizer.token_bytes(token_id, first=self._first)
        if not self._tokenizer.is_special(token_id):
            self._first = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Return what is still held back at the end of the stream (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer(ABC):
    """Text to token ids and back, chat formatting, fill-in-the-middle and tool-call parsing.

    Built by `tramontane.load_tokenizer(path)`. Attributes every backend sets:

    - `path`: the file it was read from; `kind`: "mistral", "hf" or "gguf";
    - `name`: a one-line description such as "mistral v3 (sentencepiece)" or "gguf gpt2 (pre=smollm)";
    - `bos_id`, `eos_id`: the BOS and EOS ids, or None where the vocabulary has none;
    - `vocab_size`: number of ids the model's embedding must cover;
    - `stop_ids`: ids that end generation (EOS plus end-of-turn tokens such as `<|im_end|>`);
    - `chat_format`: how `encode_chat` formats a conversation, e.g. "mistral_common v3" or "none";
    - `has_fim`: whether `encode_fim` is available.
    """

    path: Path
    kind: str
    name: str
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    stop_ids: frozenset[int]
    chat_format: str
    has_fim: bool
    # Id of the `[TOOL_CALLS]` token where the vocabulary has one (Mistral tool calling).
    _tool_calls_id: int | None = None
    # Ids of `[ARGS]` and `[CALL_ID]` (v11+ tool-call layout), where present.
    _args_id: int | None = None
    _call_id_id: int | None = None

    @property
    def has_tool_calls(self) -> bool:
        """Whether the vocabulary has Mistral's `[TOOL_CALLS]` token: tool calls can be parsed and forced."""
        return self._tool_calls_id is not None

    @abstractmethod
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; `bos` prepends BOS where the model expects one, `eos` appends EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, with special (control) tokens left out."""

    @abstractmethod
    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Prompt ids for an OpenAI-style conversation, ending where the assistant's answer starts.

        Raises:
            ValueError: the conversation is invalid (empty, unknown role, tool result without a call...).
            TokenizerError: the tokenizer has no chat format.
        """

    def encode_chat_turns(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[ChatPiece]:
        """A whole conversation (a training example) as consecutive pieces of ids, each tagged with the
        index in `messages` of the assistant message it holds (None for everything else). Joined, the
        pieces are the conversation as the model sees it at inference: each assistant piece is what the
        model writes after the prompt of the messages before it, end-of-turn token included.

        Raises:
            ValueError: the conversation is invalid for this chat format.
            TokenizerError: the tokenizer has no chat format.
        """
        raise TokenizerError(self.path, f"{self.name} cannot split a conversation into turns")

    @abstractmethod
    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """Fill-in-the-middle prompt ids: the model writes what goes between `prefix` and `suffix`.

        Raises:
            TokenizerError: the vocabulary has no FIM tokens (see `has_fim`).
        """

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as stored (e.g. "▁Hello", "<0x0A>", "ĠHello", "[INST]")."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a control token that `decode` leaves out."""

    @abstractmethod
    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        """The bytes `token_id` adds to decoded text (b"" for special tokens).

        `first` says no non-special token came before it, where sentencepiece-style vocabularies drop
        the leading space that encoding added.
        """

    def decoder(self, continuation: bool = False) -> IncrementalDecoder:
        """A fresh streaming decoder for one sequence of generated ids; `continuation` when the ids
        continue a text (a completion), so that a leading space is kept."""
        return IncrementalDecoder(self, continuation)

    def parse_tool_calls(self, ids: Sequence[int]) -> ParsedOutput:
        """Split generated ids into text and OpenAI-style tool calls.

        Understands Mistral's `[TOOL_CALLS]` layouts: a JSON list after the token (v2 to v7), or
        `name[ARGS]{json}` per call (v11+, optionally with `[CALL_ID]id`). Calls without an id get a
        fresh 9-character one, the form Mistral's tokenizers accept back. Malformed JSON gives
        `ParsedOutput.error`, never an exception.

        Example:
            >>> out = tok.parse_tool_calls(generated_ids)
            >>> out.tool_calls[0]["function"]["name"]
            'get_weather'
        """
        ids = [i for i in ids if i not in self.stop_ids]
        marker = self._tool_calls_id
        if marker is None or marker not in ids:
            return ParsedOutput(content=self.decode(ids))
        start = ids.index(marker)
        content = self.decode(ids[:start])
        segments: list[list[int]] = []
        for token_id in ids[start:]:
            if token_id == marker:
                segments.append([])
            else:
                segments[-1].append(token_id)
        raw = "".join(self.decode(segment) for segment in segments)
        try:
            calls = [call for segment in segments for call in self._parse_segment(segment)]
        except (ValueError, TypeError, KeyError) as exc:
            return ParsedOutput(content=content, error=ToolCallParseError(str(exc), raw))
        return ParsedOutput(content=content, tool_calls=calls)

    def _parse_segment(self, segment: list[int]) -> list[dict[str, Any]]:
        """Tool calls in the ids that follow one `[TOOL_CALLS]` token."""
        if self._args_id is not None and self._args_id in segment:
            # v11+: name[CALL_ID]id[ARGS]{json} or name[ARGS]{json}
            split = segment.index(self._args_id)
            head, arguments = segment[:split], self.decode(segment[split + 1 :])
            call_id = None
            if self._call_id_id is not None and self._call_id_id in head:
                at = head.index(self._call_id_id)
                head, call_id = head[:at], self.decode(head[at + 1 :]).strip()
            return [_tool_call(self.decode(head).strip(), _load_json(arguments), call_id)]
        payload = _load_json(self.decode(segment))
        if isinstance(payload, dict):
            payload = [payload]
        if not isinstance(payload, list):
            raise ValueError(f"expected a JSON list of tool calls, got {type(payload).__name__}")
        calls = []
        for item in payload:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError(f"tool call without a name: {item!r}")
            calls.append(_tool_call(item["name"], item.get("arguments", {}), item.get("id")))
        return calls


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool call is not valid JSON ({exc.msg} at char {exc.pos}): {text!r}") from exc


def _tool_call(name: str, arguments: Any, call_id: Any) -> dict[str, Any]:
    if not name:
        raise ValueError("tool call with an empty function name")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(call_id, str) or not call_id or call_id == "null":
        call_id = new_tool_call_id()
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def new_tool_call_id() -> str:
    """A fresh tool-call id: 9 characters from [a-z0-9], the form Mistral's v3+ tokenizers require."""
    return uuid.uuid4().hex[:9]


def check_conversation(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
) -> None:
    """Raise ValueError, with the reason, if `messages` is not a conversation a chat model can take.

    Checks what every chat format needs: a non-empty list of message dicts with known roles, content
    where a role needs it, well-formed tool calls, and each tool result answering a pending call of
    the assistant message just before it. Format-specific rules are left to the backend.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    pending: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"messages[{i}] content must be a string or a list of parts")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ValueError(f"messages[{i}] is a tool result without a tool_call_id")
            if call_id not in pending:
                raise ValueError(
                    f"messages[{i}] is a tool result for tool_call_id {call_id!r}, which matches no "
                    "unanswered tool call of the assistant message before it"
                )
            pending.discard(call_id)
            if content is None:
                raise ValueError(f"messages[{i}] is a tool result without content")
            continue
        pending = set()
        if role == "assistant":
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ValueError(f"messages[{i}] tool_calls must be a list")
            if content is None and not calls:
                raise ValueError(f"messages[{i}] is an assistant message with neither content nor tool_calls")
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                    raise ValueError(f"messages[{i}].tool_calls[{j}] needs a function with a name")
                if isinstance(call.get("id"), str):
                    pending.add(call["id"])
        elif content is None:
            raise ValueError(f"messages[{i}] is a {role} message without content")
    for k, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
