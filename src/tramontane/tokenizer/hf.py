"""Hugging Face `tokenizer.json` tokenizers (through the `tokenizers` library) with jinja2 chat templates.

Also the runtime for GGUF vocabularies, which `gguf.py` turns into a `tokenizers.Tokenizer` first.
Encoding follows transformers: `encode(text)` is `tokenizer(text)["input_ids"]`, and `encode_chat` is
`apply_chat_template(..., add_generation_prompt=True, tokenize=True)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers

from ..errors import TokenizerError
from .base import ChatPiece, Tokenizer, check_conversation
from .chat_template import compile_chat_template, render_chat_template

# Special tokens that close a turn in common chat formats; each becomes a stop id when the chat
# template writes it (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Phi's <|end|>, Gemma's <end_of_turn>).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character table: printable bytes stand for themselves, the rest move to U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the special tokens and chat templates that go with it.

    Args:
        path: the file it came from (named in errors).
        backend: the tokenizer; its post-processor is not used, BOS/EOS are added here.
        kind, name: see `Tokenizer`.
        special_tokens: `bos_token`, `eos_token`, `unk_token`, `pad_token` strings, as templates see them.
        add_bos: whether the model expects BOS in front of a prompt; None reads the post-processor.
        chat_templates: jinja2 sources by name ("default", "tool_use"); empty if the model has none.
        extra_stop_ids: more ids that end generation (e.g. `generation_config.json`'s eos list).
    """

    def __init__(
        self,
        path: Path,
        backend: tokenizers.Tokenizer,
        *,
        kind: str,
        name: str,
        special_tokens: Mapping[str, str],
        add_bos: bool | None,
        chat_templates: Mapping[str, str],
        chat_template_origin: str,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        self.path = path
        self.kind = kind
        self.name = name
        self._backend = backend
        self._special_tokens = {key: value for key, value in special_tokens.items() if value}
        self.bos_id = self._token_id(self._special_tokens.get("bos_token"))
        self.eos_id = self._token_id(self._special_tokens.get("eos_token"))
        if add_bos is None:
            probe = backend.encode("", add_special_tokens=True).ids
            add_bos = bool(probe) and probe[0] == self.bos_id
        self.add_bos = add_bos and self.bos_id is not None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

        self._templates: dict[str, jinja2.Template] = {}
        for template_name, source in chat_templates.items():
            try:
                self._templates[template_name] = compile_chat_template(source)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerError(path, f"chat template {template_name!r} does not compile: {exc}") from exc
        self.chat_format = f"jinja2 chat template ({chat_template_origin})" if self._templates else "none"
        template_text = "\n".join(chat_templates.values())
        stops = {i for i in (self.eos_id, *extra_stop_ids) if i is not None}
        stops |= {i for t in END_OF_TURN if t in template_text and (i := self._token_id(t)) is not None}
        self.stop_ids = frozenset(stops)

        self._prefix_id, self._suffix_id = self._token_id("[PREFIX]"), self._token_id("[SUFFIX]")
        self.has_fim = self._prefix_id in self._special and self._suffix_id in self._special
        self._tool_calls_id = self._token_id("[TOOL_CALLS]")
        self._args_id = self._token_id("[ARGS]")
        self._call_id_id = self._token_id("[CALL_ID]")
        self._pieces, self._strip_first = self._piece_table()

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _piece_table(self) -> tuple[list[bytes], bool]:
        """Decoded bytes of every id, and whether the decoder drops the first leading space.

        Read from the decoder's configuration: byte-level (GPT-2 style), or sentencepiece style
        ("▁" for spaces, `<0xXX>` byte fallback, a `Strip`/`Metaspace` step for the first space).
        """
        state = self._backend.decoder.__getstate__() if self._backend.decoder is not None else b"null"
        config = json.loads(state) or {}
        steps = config.get("decoders", [config]) if config.get("type") == "Sequence" else [config]
        types = {step.get("type") for step in steps}
        strip_first = any(
            (step.get("type") == "Strip" and step.get("start", 0) >= 1)
            or (step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never")
            for step in steps
        )
        vocab = self._backend.get_vocab(with_added_tokens=True)
        pieces = [b""] * max(self.vocab_size, max(vocab.values(), default=-1) + 1)
        unicode_to_byte = {c: b for b, c in byte_level_alphabet().items()}
        for token, token_id in vocab.items():
            if token_id in self._special:
                continue
            if "ByteLevel" in types:
                if all(c in unicode_to_byte for c in token):
                    pieces[token_id] = bytes(unicode_to_byte[c] for c in token)
                else:
                    pieces[token_id] = token.encode("utf-8")
            elif "ByteFallback" in types or "Metaspace" in types or "Replace" in types:
                byte = _BYTE_PIECE.fullmatch(token) if "ByteFallback" in types else None
                pieces[token_id] = bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode()
            else:
                pieces[token_id] = self._backend.decode([token_id], skip_special_tokens=True).encode("utf-8")
        return pieces, strip_first

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text`; special tokens written in the text are matched, as transformers does."""
        ids = list(self._backend.encode(text, add_special_tokens=False).ids)
        if bos and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat template's text for the conversation, with the assistant header at the end
        (`add_generation_prompt`)."""
        check_conversation(messages, tools)
        template = self._templates.get("tool_use") if tools else None
        template = template or self._templates.get("default")
        if template is None:
            raise TokenizerError(self.path, f"{self.name} has no chat template, so it cannot encode a conversation")
        return render_chat_template(template, messages, tools, self._special_tokens, add_generation_prompt)

    def encode_chat_turns(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[ChatPiece]:
        """The template's text of the whole conversation, cut where each assistant answer starts (after
        the prompt of the messages before it, generation header included) and where the next message's
        text starts; each cut tokenized as `encode_chat` tokenizes a prompt.

        Raises:
            ValueError: the template renders a longer conversation with different earlier text (it
                rewrites past turns), so the assistant text cannot be located.
        """
        whole = self.render_chat(messages, tools, add_generation_prompt=False)
        cuts: list[tuple[int, int, int]] = []  # (answer start, answer end, message index) in `whole`
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render_chat(messages[:i], tools, add_generation_prompt=True) if i else ""
            through = self.render_chat(messages[: i + 1], tools, add_generation_prompt=False)
            start = cuts[-1][1] if cuts else 0
            if not (whole.startswith(through) and through.startswith(before)) or len(before) < start:
                raise ValueError(f"the chat template of {self.name} renders messages[{i}] differently as the "
                                 "conversation grows, so its answer cannot be located in the text")
            cuts.append((len(before), len(through), i))
        pieces: list[ChatPiece] = []
        done = 0
        for start, end, index in cuts:
            pieces += [ChatPiece(self._encode_text(whole[done:start]), None),
                       ChatPiece(self._encode_text(whole[start:end]), index)]
            done = end
        pieces.append(ChatPiece(self._encode_text(whole[done:]), None))
        if self.add_bos and self.bos_id is not None and [i for p in pieces for i in p.ids][:1] != [self.bos_id]:
            pieces.insert(0, ChatPiece([self.bos_id], None))
        return [p for p in pieces if p.ids]

    def _encode_text(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids) if text else []

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """The rendered chat template, tokenized without post-processing (like transformers).

        A model that expects BOS gets one in front when the template did not write it itself.
        """
        ids = list(self._backend.encode(self.render_chat(messages, tools), add_special_tokens=False).ids)
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """Mistral's FIM layout `<s>[SUFFIX]suffix[PREFIX]prefix`, for vocabularies with those tokens."""
        if not self.has_fim or self._prefix_id is None or self._suffix_id is None:
            raise TokenizerError(
                self.path, f"{self.name} has no [PREFIX]/[SUFFIX] tokens, so it cannot encode fill-in-the-middle"
            )
        head = [self.bos_id] if self.bos_id is not None else []
        return [*head, self._suffix_id, *self._encode_infill(suffix), self._prefix_id, *self.encode(prefix, bos=False)]

    def _encode_infill(self, text: str) -> list[int]:
        """Ids of `text` as a continuation: without the space a sentencepiece vocabulary puts in front.

        The same trick as mistral_common: encode behind a marker character, then cut the marker off.
        """
        if not text:
            return []
        marker = self.encode("☺", bos=False)
        ids = self.encode("☺" + text, bos=False)
        return ids[len(marker) :] if ids[: len(marker)] == marker else self.encode(text, bos=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary of {self.path}")
        return piece

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        if not 0 <= token_id < len(self._pieces):
            return b""  # an id of the model's padded embedding that the vocabulary does not have
        piece = self._pieces[token_id]
        if first and self._strip_first and piece.startswith(b" "):
            return piece[1:]
        return piece


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_templates(source: Any, path: Path) -> dict[str, str]:
    """`chat_template` as transformers writes it: one template, or a list of {"name", "template"}."""
    if isinstance(source, str):
        return {"default": source}
    if isinstance(source, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in source
    ):
        return {t["name"]: t["template"] for t in source}
    brief = repr(source)[:80]
    raise TokenizerError(path, f"chat_template must be a string or a list of {{name, template}} objects, got {brief}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(path, f"cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(path, "expected a JSON object")
    return data


def load_hf_tokenizer(path: Path) -> HFTokenizer:
    """Load `tokenizer.json` and what sits beside it: `tokenizer_config.json` (special tokens, BOS
    flag, chat template), `special_tokens_map.json`, `chat_template.jinja`, `generation_config.json`.
    """
    folder = path.parent
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception for every parse error
        raise TokenizerError(path, f"not a readable tokenizer.json: {exc}") from exc
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    token_map = _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = _token_string(config.get(key, token_map.get(key)))
        if token is not None:
            special[key] = token

    templates: dict[str, str] = {}
    origin = config_path.name
    source = config.get("chat_template")
    if source is not None:
        templates = _chat_templates(source, config_path)
    elif (folder / "chat_template.jinja").is_file():
        try:
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(folder / "chat_template.jinja", f"cannot read: {exc}") from exc
        origin = "chat_template.jinja"
    elif (folder / "chat_template.json").is_file():
        templates = _chat_templates(_read_json(folder / "chat_template.json").get("chat_template", ""),
                                    folder / "chat_template.json")
        origin = "chat_template.json"

    extra_stops: list[int] = []
    if (folder / "generation_config.json").is_file():
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        extra_stops = [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]

    add_bos = config.get("add_bos_token")
    model_type = type(backend.model).__name__
    return HFTokenizer(
        path,
        backend,
        kind="hf",
        name=f"hf tokenizer.json ({model_type})",
        special_tokens=special,
        add_bos=add_bos if isinstance(add_bos, bool) else None,
        chat_templates=templates,
        chat_template_origin=origin,
        extra_stop_ids=extra_stops,
    )
