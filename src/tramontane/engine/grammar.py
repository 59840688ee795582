"""Structured outputs: grammars that constrain what a request may generate, enforced with llguidance.

A constrained request carries a grammar (llguidance's serialized form, built here from a JSON schema or
a forced tool call). The engine keeps one `Matcher` per such request: before each sampling step it masks
that row's logits to the tokens the grammar allows next, and feeds it the token sampled. Unconstrained
rows of the same batch are left alone.

`Vocabulary` is the bridge from our tokenizer interface to llguidance: the bytes of every token id
(special tokens marked with llguidance's 0xFF prefix, so that no text can match them) and the ids that
end a sequence.

Example:
    >>> vocab = Vocabulary(tokenizer, model.args.vocab_size)
    >>> grammar = response_format_grammar({"type": "json_object"})
    >>> matcher = vocab.matcher(grammar)
    >>> matcher.mask(logits[row]); token = sample(...); matcher.consume(token)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..tokenizer import Tokenizer

SPECIAL = b"\xff"  # llguidance's marker of a special token's bytes
# JSON laid out as json.dumps does, with no free whitespace: a model cannot stall in spaces and newlines
# (a schema's own "x-guidance" options still win over these)
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:  # an optional dependency: say what the feature needs
        raise ValueError("response_format: structured outputs need the llguidance package "
                         "(pip install llguidance)") from e
    return llguidance


def json_schema_grammar(schema: Mapping[str, Any], field: str) -> str:
    """The grammar of JSON documents valid against `schema`, laid out as `COMPACT` says.
    Raises ValueError naming `field` when the schema is not a JSON object."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"{field}: a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return str(_llguidance().LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{field}: {e}") from e


def response_format_grammar(fmt: Mapping[str, Any] | None) -> str | None:
    """The grammar of OpenAI's `response_format`: None for text, any JSON object for
    {"type": "json_object"}, the schema's documents for {"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}, "strict": ...}}. Raises ValueError naming the field for anything else."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format")
    if kind != "json_schema":
        raise ValueError(f"response_format.type: one of 'text', 'json_object', 'json_schema', not {kind!r}")
    spec = fmt.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ValueError("response_format.json_schema: required with type 'json_schema', as an object")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError("response_format.json_schema.name: required, a non-empty string")
    if "strict" in spec and not isinstance(spec["strict"], bool | None):
        raise ValueError("response_format.json_schema.strict: must be a boolean")
    schema = spec.get("schema", {})
    return json_schema_grammar(schema, "response_format.json_schema.schema")


def tool_call_grammar(tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]], name: str | None,
                      single: bool = False) -> str:
    """The grammar of a forced tool call (`tool_choice` "required", or the named function `name`) in the
    tokenizer's own layout: `[TOOL_CALLS]` then a JSON list of calls (Mistral v2-v7; of one call with
    `single`), or `[TOOL_CALLS]name[ARGS]{arguments}` (v11+, one call). Raises ValueError naming
    tool_choice where the vocabulary has no tool-call token."""
    marker = tokenizer._tool_calls_id
    if marker is None:
        raise ValueError(f"tool_choice: the tokenizer ({tokenizer.name}) has no tool-call token, so a forced "
                         "tool call cannot be enforced; use 'auto' or 'none'")
    functions = [t["function"] for t in tools if isinstance(t.get("function"), Mapping)]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
    if not functions:
        raise ValueError("tool_choice: no function to call among the tools")
    lark = _lark_args_calls(tokenizer, functions, marker) if tokenizer._args_id is not None \
        else _lark_json_calls(functions, marker, single)
    return str(_llguidance().LLMatcher.grammar_from_lark(lark))


def _parameters(function: Mapping[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return dict(params) if isinstance(params, Mapping) else {"type": "object"}


def _lark_json_calls(functions: list[Mapping[str, Any]], marker: int, single: bool) -> str:
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": _parameters(f)},
                       "required": ["name", "arguments"], "additionalProperties": False} for f in functions]}
    schema = {"type": "array", "items": call, "minItems": 1, **({"maxItems": 1} if single else {}),
              "x-guidance": COMPACT}
    return f"start: <[{marker}]> calls\ncalls: %json {json.dumps(schema)}\n"


def _lark_args_calls(tokenizer: Tokenizer, functions: list[Mapping[str, Any]], marker: int) -> str:
    args = tokenizer._args_id
    rules = [f"call{i}: {json.dumps(f['name'])} <[{args}]> %json {json.dumps({**_parameters(f), 'x-guidance': COMPACT})}"
             for i, f in enumerate(functions)]
    names = " | ".join(f"call{i}" for i in range(len(functions)))
    return f"start: <[{marker}]> ({names})\n" + "\n".join(rules) + "\n"


class Vocabulary:
    """llguidance's view of our tokenizer, built on first use (about a second for 50k tokens) and shared
    by every matcher of an engine. `vocab_size` is the model's (ids past the tokenizer's are never allowed)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._ll is None:
                self._ll = self._build()
            return self._ll

    def _build(self) -> Any:
        llg = _llguidance()
        tok = self.tokenizer
        tokens: list[bytes] = []
        special: list[int] = []
        for i in range(self.vocab_size):
            raw = tok.token_bytes(i) if i < tok.vocab_size and not tok.is_special(i) else b""
            if not raw:  # control tokens, and ids no text maps to: never matched by text
                piece = tok.id_to_piece(i) if i < tok.vocab_size else f"<unused{i}>"
                raw = SPECIAL + piece.encode("utf-8", errors="replace")
                special.append(i)
            tokens.append(raw)
        stops = sorted(tok.stop_ids) or ([tok.eos_id] if tok.eos_id is not None else [])
        if not stops:
            raise ValueError("response_format: the tokenizer has no end-of-sequence token to end a constrained answer")

        by_bytes = {raw: i for i, raw in enumerate(tokens) if not raw.startswith(SPECIAL)}
        longest = max(map(len, by_bytes))

        def tokenize(text: str | bytes) -> list[int]:
            """Ids whose bytes are exactly `text`'s: the tokenizer's own where they are, else the longest
            tokens first (a sentencepiece encoder adds a leading space, which llguidance cannot place)."""
            data = text.encode("utf-8") if isinstance(text, str) else text
            ids = tok.encode(data.decode("utf-8", errors="replace"), bos=False)
            if b"".join(tokens[i] for i in ids if i < len(tokens)) == data:
                return ids
            out, at = [], 0
            while at < len(data):
                for end in range(min(len(data), at + longest), at, -1):
                    if (found := by_bytes.get(data[at:end])) is not None:
                        out.append(found)
                        at = end
                        break
                else:
                    raise ValueError(f"no token holds the byte {data[at]:#x}")
            return out

        class _Bridge:
            eos_token_id = stops[0]
            bos_token_id = tok.bos_id
            special_token_ids = special

            def __init__(self) -> None:
                self.tokens = tokens

            def __call__(self, text: str | bytes) -> list[int]:
                return tokenize(text)

        wrapper = llg.TokenizerWrapper(_Bridge())
        return llg.LLTokenizer(wrapper, n_vocab=self.vocab_size, eos_token=stops)

    def check(self, grammar: str, field: str) -> None:
        """Raise ValueError naming `field` when llguidance refuses the grammar for this vocabulary."""
        error = _llguidance().LLMatcher.validate_grammar(grammar, self._get())
        if error:
            raise ValueError(f"{field}: cannot be enforced: {error}")

    def matcher(self, grammar: str) -> Matcher:
        """A fresh matcher at the start of the grammar."""
        ll = _llguidance().LLMatcher(self._get(), grammar, log_level=0)
        if ll.is_error():
            raise ValueError(f"response_format: cannot be enforced: {ll.get_error()}")
        return Matcher(ll)


class Matcher:
    """One request's position in its grammar: the mask of allowed next tokens, fed each token sampled."""

    def __init__(self, ll: Any) -> None:
        self._ll = ll

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of every token the grammar does not allow next to -inf, in place."""
        allowed = torch.frombuffer(bytearray(self._ll.compute_logit_bias()), dtype=torch.uint8)  # [V]: 0 or 200
        logits.masked_fill_(allowed[: logits.shape[0]] == 0, float("-inf"))

    def consume(self, token: int) -> bool:
        """Advance past `token`; False if the grammar did not allow it (the matcher is then in error)."""
        return bool(self._ll.consume_token(token))

    @property
    def error(self) -> str | None:
        return str(self._ll.get_error()) if self._ll.is_error() else None
