"""What `tramontane serve` runs: load a model into an engine, wrap it in the app, run uvicorn."""

from __future__ import annotations

from pathlib import Path

import torch
import uvicorn

from ..engine import Engine
from ..generate import compile_decode
from ..loading import load_model
from ..tokenizer import Tokenizer, load_tokenizer
from .app import create_app


def default_model_name(path: Path) -> str:
    """The name clients use for a model: the file's stem or the folder's name."""
    return path.stem if path.is_file() else path.name


def load_engine(
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_batch: int = 16,
    max_queue: int = 256,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    compile: bool = False,
    kv_blocks: int | None = None,
    prefix_cache: bool = True,
    kv_dtype: torch.dtype | None = None,
) -> tuple[Engine, Tokenizer]:
    """A model and its tokenizer, read from `path`, in an engine whose KV pool is reserved now (not started);
    `compile` routes decode steps through torch.compile (`generate.compile_decode`); the KV options are
    `Engine`'s."""
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype, device=device, quantize=quantize)
    if compile:
        compile_decode(model)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_seq_len=max_seq_len,
                    kv_blocks=kv_blocks, prefix_cache=prefix_cache, kv_dtype=kv_dtype)
    return engine, tokenizer


def run(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    request_timeout: float | None = 600.0,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (Ctrl-C stops uvicorn, then the engine)."""
    app = create_app(engine, tokenizer, model_name, api_key, request_timeout=request_timeout)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
