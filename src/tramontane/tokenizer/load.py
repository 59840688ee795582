"""`load_tokenizer`: pick the backend for a tokenizer file, a model folder or a GGUF file, by content."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from ..errors import TokenizerError
from .base import Tokenizer
from .gguf import load_gguf_tokenizer
from .hf import load_hf_tokenizer
from .mistral import MistralCommonTokenizer

_LOOKED_FOR = "tekken.json, tokenizer.model.v*, tokenizer.model, tokenizer.json, or a single *.gguf"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer in `path`: a tokenizer file, a model folder that holds one, or a `.gguf` file.

    Files are recognised by content: GGUF magic, a Tekken JSON (`config` + `vocab`), a Hugging Face
    `tokenizer.json` (`model`), or a sentencepiece model. In a folder the Mistral files come first
    (they are what Mistral's reference stack uses), then `tokenizer.json`, then a lone `*.gguf`.

    Example:
        >>> tok = load_tokenizer("models/Mistral-7B-Instruct-v0.3")
        >>> tok.name
        'mistral v3 (sentencepiece)'

    Raises:
        TokenizerError: nothing usable found, or the file is unknown or corrupt (the message names it).
    """
    path = Path(path)
    if path.is_dir():
        return _load_file(_pick_in_folder(path))
    if not path.is_file():
        raise TokenizerError(path, "no such file or folder")
    return _load_file(path)


def _pick_in_folder(folder: Path) -> Path:
    if (folder / "tekken.json").is_file():
        return folder / "tekken.json"
    versioned = [p for p in folder.glob("tokenizer.model.v*") if re.fullmatch(r"v\d+(m\d+)?", p.name.split(".")[-1])]
    if versioned:
        # Several versions side by side: the newest one is the one the instruct model was tuned with.
        return max(versioned, key=lambda p: [int(n) for n in re.findall(r"\d+", p.name.split(".")[-1])])
    plain = folder / "tokenizer.model"
    hf = folder / "tokenizer.json"
    if plain.is_file() and (not hf.is_file() or _has_mistral_controls(plain)):
        return plain
    if hf.is_file():
        return hf
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise TokenizerError(folder, f"several GGUF files ({names}); pass the one to use")
    raise TokenizerError(folder, f"no tokenizer found; looked for {_LOOKED_FOR}")


def _has_mistral_controls(path: Path) -> bool:
    """Whether a bare `tokenizer.model` is a Mistral instruct vocabulary (`[INST]` is a control token)."""
    try:
        sp = SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(path, f"not a readable sentencepiece model: {exc}") from exc
    inst = sp.piece_to_id("[INST]")
    return inst != sp.unk_id() and sp.is_control(inst)


def _load_file(path: Path) -> Tokenizer:
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise TokenizerError(path, f"cannot read: {exc}") from exc
    if head[:4] == b"GGUF":
        return load_gguf_tokenizer(path)
    if head.lstrip()[:1] == b"{":
        try:
            with path.open("rb") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(path, f"cannot read JSON: {exc}") from exc
        if isinstance(data, dict) and "config" in data and "vocab" in data:
            return MistralCommonTokenizer.from_tekken(path)
        if isinstance(data, dict) and "model" in data:
            return load_hf_tokenizer(path)
        raise TokenizerError(path, "JSON file is neither a Tekken tokenizer nor a Hugging Face tokenizer.json")
    if not head:
        raise TokenizerError(path, "file is empty")
    try:
        return MistralCommonTokenizer.from_sentencepiece(path)
    except TokenizerError as exc:
        raise TokenizerError(
            path, f"not a tokenizer: neither GGUF, Tekken or tokenizer.json, nor a sentencepiece model ({exc.problem})"
        ) from exc
