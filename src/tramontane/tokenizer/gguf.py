"""Tokenizers stored in GGUF metadata (`tokenizer.ggml.*`), rebuilt as `tokenizers.Tokenizer` objects.

Built the way transformers builds them from a GGUF (its `integrations/gguf` builders), which is the
reference the tests compare against:

- `llama`: sentencepiece-style BPE with byte fallback. The merges are recovered from the scores: every
  split of a token into two tokens is a merge, ranked by the token's score. Text gets a "▁" in front
  unless it already starts with one (Metaspace, prepend "first"), not after special tokens.
- `gpt2`: byte-level BPE from the stored merges, split by the regex that `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from ..errors import CheckpointError, TokenizerError
from ..formats.gguf_file import GGUFFile, read_gguf
from .hf import HFTokenizer, byte_level_alphabet

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex. Names not listed split with GPT-2's own regex, as in transformers.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# Names whose split is GPT-2's (or close enough that transformers uses GPT-2's): no warning for these.
_GPT2_LIKE = {"default", "gpt-2", "gpt2", "smollm", "starcoder", "refact", "olmo"}


def _field(file: GGUFFile, key: str, path: Path, kind: type | tuple[type, ...],
           each: type | tuple[type, ...] | None = None) -> Any:
    """The value of metadata field `key` (None when absent), checked to be a `kind` (a list of `each`)."""
    value = file.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
    if ok and each is not None:
        ok = all(isinstance(v, each) for v in value)
    if not ok:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        detail = f"a list of {each.__name__ if isinstance(each, type) else 'numbers'}" if each is not None else want
        raise TokenizerError(path, f"metadata field {key} should be {detail}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: each way to cut a token into two tokens,
    best score first (ties: longer left part, then longer right part, then vocabulary order)."""
    index = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[str, str, float]] = []
    for token, score in dict(zip(tokens, scores)).items():
        splits = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in index and token[k:] in index]
        splits.sort(key=lambda m: (index[m[0]], index[m[1]]))
        ranked.extend(splits)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _sentencepiece_backend(tokens: list[str], scores: list[float], merges: list[tuple[str, str]] | None,
                           add_space_prefix: bool) -> Backend:
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges or merges_from_scores(tokens, scores),
                                 fuse_unk=True, byte_fallback=True, dropout=None))
    # llama.cpp's add_space_prefix=false (rare) turns the "▁" prefix off; transformers ignores the flag.
    scheme = "first" if add_space_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _byte_level_backend(tokens: list[str], merges: list[tuple[str, str]], pre: str | None) -> Backend:
    alphabet = set(byte_level_alphabet().values())
    spelling = byte_level_alphabet()
    # A few files store tokens as plain text rather than in the byte alphabet; respell those.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    backend = Backend(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                                 fuse_unk=False, dropout=None))
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        if pre is not None and pre not in _GPT2_LIKE:
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known; splitting text with GPT-2's regex", stacklevel=3)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def gguf_tokenizer_from_file(file: GGUFFile) -> HFTokenizer:
    """The tokenizer described by a GGUF file's metadata (`gguf_file.read_gguf`; the model loader can
    pass the file it read).

    Raises:
        TokenizerError: no tokenizer in the metadata, or a `tokenizer.ggml.model` other than llama/gpt2.
    """
    path = file.path
    model = _field(file, "tokenizer.ggml.model", path, str)
    tokens = _field(file, "tokenizer.ggml.tokens", path, list, str)
    if model is None or not tokens:
        raise TokenizerError(path, "GGUF metadata holds no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = _field(file, "tokenizer.ggml.token_type", path, list, int) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(path, f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    raw_merges = _field(file, "tokenizer.ggml.merges", path, list, str)
    merges = None
    if raw_merges:
        merges = [tuple(m.split(" ", 1)) for m in raw_merges]
        if any(len(m) != 2 for m in merges):
            raise TokenizerError(path, "tokenizer.ggml.merges has an entry that is not two tokens")
    pre = _field(file, "tokenizer.ggml.pre", path, str)
    if model == "llama":
        scores = _field(file, "tokenizer.ggml.scores", path, list, (int, float))
        if scores is not None and len(scores) != len(tokens):
            raise TokenizerError(path, f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        if scores is None and merges is None:
            raise TokenizerError(path, "llama tokenizer without tokenizer.ggml.scores or merges")
        add_space_prefix = _field(file, "tokenizer.ggml.add_space_prefix", path, (bool, int))
        backend = _sentencepiece_backend(tokens, scores or [], merges, add_space_prefix is not False)
        default_add_bos = True  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
    elif model == "gpt2":
        if merges is None:
            raise TokenizerError(path, "gpt2 tokenizer without tokenizer.ggml.merges")
        backend = _byte_level_backend(tokens, merges, pre)
        default_add_bos = False
    else:
        raise TokenizerError(path, f"unsupported tokenizer.ggml.model {model!r}; supported: 'llama', 'gpt2'")

    special: dict[str, str] = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = _field(file, f"tokenizer.ggml.{key}_token_id", path, int)
        if token_id is not None and 0 <= token_id < len(tokens):
            special[name] = tokens[token_id]
    # Control tokens (and the named specials) are matched whole and dropped when decoding; user-defined
    # tokens are matched whole and kept. In a byte-level vocabulary a "control" token outside the byte
    # alphabet is a mislabel from the converter, and is left alone, as transformers does.
    alphabet = set(byte_level_alphabet().values()) if model == "gpt2" else None
    named = set(special.values())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types)
        if (kind == _CONTROL or t in named) and (alphabet is None or set(t) <= alphabet)
    ]
    backend.add_special_tokens(control)
    user_defined = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED and backend.token_to_id(t) is not None]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    templates = {"default": _field(file, "tokenizer.chat_template", path, str)}
    tool_use = _field(file, "tokenizer.chat_template.tool_use", path, str)
    if tool_use:
        templates["tool_use"] = tool_use
    add_bos = _field(file, "tokenizer.ggml.add_bos_token", path, (bool, int))
    return HFTokenizer(
        path,
        backend,
        kind="gguf",
        name=f"gguf {model}" + (f" (pre={pre})" if pre else ""),
        special_tokens=special,
        add_bos=default_add_bos if add_bos is None else bool(add_bos),
        chat_templates={k: v for k, v in templates.items() if v},
        chat_template_origin="GGUF tokenizer.chat_template",
    )


def load_gguf_tokenizer(path: Path) -> HFTokenizer:
    """Open a GGUF file and build its tokenizer."""
    try:
        file = read_gguf(path)
    except CheckpointError as exc:
        raise TokenizerError(path, f"not a readable GGUF file: {exc.problem}") from exc
    return gguf_tokenizer_from_file(file)
