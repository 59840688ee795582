"""Small checkpoints in every format, built from random weights, and the ways to damage them.

No transformers model is built here: each file takes milliseconds, so tests and fuzzers can make many.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader

from tramontane import CheckpointError, ModelArgs, TokenizerError, load_model
from tramontane.args import MoeArgs
from tramontane.loading import hf, native, read_model_args
from tramontane.loading.common import expected_shapes
from tramontane.loading.gguf_write import write_gguf
from tramontane.tokenizer import load_tokenizer

ARGS = ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                 vocab_size=40, max_seq_len=256)
MOE_ARGS = dataclasses.replace(ARGS, moe=MoeArgs(4, 2))
TOKENS = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + ["▁" + chr(ord("a") + i) for i in range(11)]
# a sentencepiece-style vocabulary in GGUF metadata, as write_gguf takes it
GGUF_TOKENIZER: dict[str, Any] = {
    "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": TOKENS,
    "tokenizer.ggml.scores": [0.0] * 3 + [-float(i) for i in range(len(TOKENS) - 3)],
    "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (len(TOKENS) - 3),
    "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
}


def random_state(args: ModelArgs = ARGS, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in expected_shapes(args).items()}


def native_folder(folder: Path, args: ModelArgs = ARGS) -> Path:
    native.save(folder, args, random_state(args))
    return folder


def hf_folder(folder: Path, args: ModelArgs = ARGS) -> Path:
    hf.save(folder, args, random_state(args))
    return folder


def gguf_file(path: Path, args: ModelArgs = ARGS, tokenizer: dict[str, Any] | None = None) -> Path:
    write_gguf(path, args, random_state(args), tokenizer=GGUF_TOKENIZER if tokenizer is None else tokenizer)
    return path


def edit_json(path: Path, **changes: Any) -> None:
    """Set (or with None, remove) top-level keys of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def set_gguf_scalar(path: Path, key: str, value: int | float) -> None:
    """Overwrite a scalar metadata value in place (same type and width as the one written)."""
    reader = GGUFReader(path, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()


def set_gguf_array_length(path: Path, key: str, length: int) -> None:
    """Overwrite the item count of a metadata array in place: the items themselves stay as they are."""
    reader = GGUFReader(path, "r+")
    field = reader.fields[key]
    field.parts[4][0] = length  # parts: key length, key, type, item type, item count, items...
    reader.data.flush()




def load_all_ways(path: Path, tokenizer: bool = True, seconds: float = 5.0) -> None:
    """Load `path` as the CLI does (args, model, tokenizer): only our own errors may come out, naming
    the file, and within `seconds`. Any other exception propagates: that is a bug the fuzzers found."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown fields are warned about: fine here
        try:
            read_model_args(path)
            load_model(path)
        except CheckpointError as e:
            assert e.path and e.problem
        if tokenizer:
            try:
                load_tokenizer(path)
            except TokenizerError as e:
                assert e.path and e.problem
    took = time.perf_counter() - start
    assert took < seconds, f"{path}: took {took:.1f}s"
