"""Mistral's own tokenizers (sentencepiece `tokenizer.model*` and Tekken `tekken.json`) via mistral_common.

mistral_common is the reference: plain text, chat requests and FIM prompts are all encoded by it, so
the ids are exactly those of Mistral's stack. This module only adds the shared `Tokenizer` surface.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import (
    InstructTokenizerV1,
    InstructTokenizerV2,
    InstructTokenizerV3,
    InstructTokenizerV7,
    InstructTokenizerV11,
    InstructTokenizerV13,
    InstructTokenizerV15,
)
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from sentencepiece import SentencePieceProcessor

from ..errors import TokenizerError
from .base import ChatPiece, Tokenizer, check_conversation

_INSTRUCT = {
    TokenizerVersion.v1: InstructTokenizerV1,
    TokenizerVersion.v2: InstructTokenizerV2,
    TokenizerVersion.v3: InstructTokenizerV3,
    TokenizerVersion.v7: InstructTokenizerV7,
    TokenizerVersion.v11: InstructTokenizerV11,
    TokenizerVersion.v13: InstructTokenizerV13,
    TokenizerVersion.v15: InstructTokenizerV15,
}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_UNKNOWN_SURFACE = " \u2047 "  # what sentencepiece prints for <unk>


def spm_version(path: Path, sp: SentencePieceProcessor) -> TokenizerVersion:
    """The instruct version of a Mistral sentencepiece file.

    Files named `*.model.vN` (or `.vNmM`) are version N: that suffix is how mistral_common itself
    versions sentencepiece files. A bare `tokenizer.model` is read from its control tokens, where
    mistral_common would assume v1 even for a vocabulary that has `[INST]` as a control token.
    """
    match = re.fullmatch(r"(v\d+)(m\d+)?", path.name.rsplit(".", 1)[-1])
    if match and match.group(1) in TokenizerVersion.__members__:
        return TokenizerVersion(match.group(1))
    controls = {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)}
    if "[SYSTEM_PROMPT]" in controls:
        return TokenizerVersion.v7
    if "[PREFIX]" in controls or "[IMG]" in controls:
        return TokenizerVersion.v3
    if "[INST]" in controls:
        return TokenizerVersion.v2
    return TokenizerVersion.v1


class MistralCommonTokenizer(Tokenizer):
    """A Mistral sentencepiece or Tekken tokenizer; everything is encoded by mistral_common.

    Example:
        >>> tok = MistralCommonTokenizer.from_file(Path("tokenizer.model.v3"))
        >>> tok.encode_chat([{"role": "user", "content": "Hi"}])
        [1, 3, 16127, 4]
    """

    kind = "mistral"

    def __init__(self, path: Path, raw: SentencePieceTokenizer | Tekkenizer) -> None:
        instruct_cls = _INSTRUCT.get(raw.version)
        if instruct_cls is None:
            raise TokenizerError(path, f"mistral_common has no instruct tokenizer for version {raw.version}")
        # Text only: images and audio are not part of this engine, so no image/audio encoders.
        self._normalizer = get_normalizer(raw.version, raw.model_settings_builder)
        self._mistral = MistralTokenizer(
            instruct_cls(raw),
            validator=get_validator(raw.version, mode=ValidationMode.test),
            request_normalizer=self._normalizer,
        )
        # training examples end with the assistant's answer, which the test (inference) mode refuses
        self._finetune_validator = get_validator(raw.version, mode=ValidationMode.finetuning)
        self._raw = raw
        self.path = path
        self.version = raw.version
        engine = "tekken" if isinstance(raw, Tekkenizer) else "sentencepiece"
        self.name = f"mistral {raw.version.value} ({engine})"
        self.chat_format = f"mistral_common {raw.version.value}"
        self.bos_id = raw.bos_id
        self.eos_id = raw.eos_id
        self.vocab_size = raw.n_words
        self.stop_ids = frozenset({raw.eos_id})
        self._special = frozenset(int(i) for i in raw.special_ids)
        self.has_fim = self._special_id("[PREFIX]") is not None and self._special_id("[SUFFIX]") is not None
        self._tool_calls_id = self._special_id("[TOOL_CALLS]")
        self._args_id = self._special_id("[ARGS]")
        self._call_id_id = self._special_id("[CALL_ID]")
        self._pieces = self._piece_table(raw)

    @classmethod
    def from_sentencepiece(cls, path: Path) -> MistralCommonTokenizer:
        """Load a Mistral sentencepiece model (`tokenizer.model`, `tokenizer.model.v3`, ...)."""
        try:
            sp = SentencePieceProcessor(model_file=str(path))
            return cls(path, SentencePieceTokenizer(str(path), tokenizer_version=spm_version(path, sp)))
        except (OSError, RuntimeError, ValueError, AssertionError, MistralCommonException) as exc:
            raise TokenizerError(path, f"not a readable sentencepiece model: {exc}") from exc

    @classmethod
    def from_tekken(cls, path: Path) -> MistralCommonTokenizer:
        """Load a Tekken tokenizer (`tekken.json`); the file name does not matter."""
        try:
            return cls(path, Tekkenizer.from_file(path))
        except TokenizerError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, AssertionError,
                MistralCommonException) as exc:  # mistral_common reads the JSON without checking its structure
            raise TokenizerError(path, f"not a readable Tekken tokenizer: {type(exc).__name__}: {exc}") from exc

    def _special_id(self, piece: str) -> int | None:
        if not self._raw.is_special(piece):
            return None
        return self._raw.get_special_token(piece)

    def _piece_table(self, raw: SentencePieceTokenizer | Tekkenizer) -> list[bytes] | None:
        """Decoded bytes of each sentencepiece token (with "▁" as a space); None for Tekken."""
        if isinstance(raw, Tekkenizer):
            return None
        table = []
        unk = raw.unk_id
        for i, piece in enumerate(raw.vocab()):
            byte = _BYTE_PIECE.fullmatch(piece)
            if i in self._special:
                table.append(b"")
            elif i == unk:
                table.append(_SPM_UNKNOWN_SURFACE.encode())
            elif byte:
                table.append(bytes([int(byte.group(1), 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text`; control tokens written in the text stay plain text, as in mistral_common."""
        return self._raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._mistral.decode(list(ids), special_token_policy=SpecialTokenPolicy.IGNORE)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """mistral_common's `encode_chat_completion` of the OpenAI-style conversation."""
        check_conversation(messages, tools)
        try:
            request = ChatCompletionRequest.from_openai(
                cast(Any, [dict(m) for m in messages]), tools=None if tools is None else [dict(t) for t in tools]
            )
            return list(self._mistral.encode_chat_completion(request).tokens)
        except (MistralCommonException, ValueError, AssertionError, KeyError, TypeError) as exc:
            raise ValueError(f"invalid conversation for {self.name}: {exc}") from exc

    def encode_chat_turns(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[ChatPiece]:
        """mistral_common's encoding of the whole conversation (its `encode_instruct`, as mistral-finetune
        trains), cut where each message's ids begin. Raises ValueError when mistral_common merges
        assistant messages (consecutive ones), so no turn can be told apart."""
        check_conversation(messages, tools)
        try:
            request = ChatCompletionRequest.from_openai(
                cast(Any, [dict(m) for m in messages]), tools=None if tools is None else [dict(t) for t in tools]
            )
            instruct = self._normalizer.from_chat_completion_request(self._finetune_validator.validate_request(request))
            pieces = self._message_pieces(instruct)
            whole = list(self._mistral.instruct_tokenizer.encode_instruct(instruct).tokens)
        except (MistralCommonException, ValueError, AssertionError, KeyError, TypeError) as exc:
            raise ValueError(f"invalid conversation for {self.name}: {exc}") from exc
        if [i for p in pieces for i in p[0]] != whole:  # the walk below must be mistral_common's own
            raise TokenizerError(self.path, f"mistral_common {self.version.value} encodes this conversation "
                                 "differently from its messages one by one; cannot find the assistant turns")
        assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if sum(1 for _, is_assistant in pieces if is_assistant) != len(assistants):
            raise ValueError(f"{self.name} merges consecutive assistant messages; write each answer as one message")
        it = iter(assistants)
        return [ChatPiece(ids, next(it) if is_assistant else None) for ids, is_assistant in pieces]

    def _message_pieces(self, request: InstructRequest[Any, Any]) -> list[tuple[list[int], bool]]:
        """(ids, is assistant) of BOS and each message, encoded as `InstructTokenizerBase.encode_instruct`
        encodes them (without truncation, which training examples do not ask for)."""
        it = cast(Any, self._mistral.instruct_tokenizer)
        first_user, last_user = it.find_first_last_user(request)
        pieces: list[tuple[list[int], bool]] = [(list(it.start()), False)]
        for i, msg in enumerate(request.messages):
            if isinstance(msg, UserMessage):
                ids = it.encode_user_message(msg, request.available_tools, i == last_user, i == first_user,
                                             system_prompt=request.system_prompt, force_img_first=True,
                                             settings=request.settings)[0]
            elif isinstance(msg, ToolMessage):
                ids = it.encode_tool_message(msg, i < last_user)[0]
            elif isinstance(msg, AssistantMessage):
                ids = it.encode_assistant_message(message=msg, is_before_last_user_message=i < last_user)
            elif isinstance(msg, SystemMessage):
                ids = it.encode_system_message(msg)[0]
            else:
                raise ValueError(f"unknown message type {type(msg).__name__}")
            pieces.append((list(ids or []), isinstance(msg, AssistantMessage)))
        return pieces

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """mistral_common's FIM layout: `<s>[SUFFIX]suffix[PREFIX]prefix` (Codestral, v3+)."""
        if not self.has_fim:
            raise TokenizerError(
                self.path, f"{self.name} has no [PREFIX]/[SUFFIX] tokens, so it cannot encode fill-in-the-middle"
            )
        return list(self._mistral.encode_fim(FIMRequest(prompt=prefix, suffix=suffix)).tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self._raw.id_to_piece(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            return b""  # an id of the model's padded embedding that the vocabulary does not have
        if self._pieces is None:
            assert isinstance(self._raw, Tekkenizer)
            return self._raw.id_to_byte_piece(token_id, special_token_policy=SpecialTokenPolicy.IGNORE)
        piece = self._pieces[token_id]
        # sentencepiece drops the dummy-prefix space of the first non-control piece, but not of a
        # byte piece (<0x20>) or of <unk>.
        if first and piece.startswith(b" ") and self._raw.id_to_piece(token_id).startswith("\u2581"):
            return piece[1:]
        return piece

