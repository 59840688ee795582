"""What `tramontane serve` runs: load a model into an engine, wrap it in the app, run uvicorn.

uvicorn gets the connection limits (`limits.ConnectionLimits`): its own keep-alive timeout and
concurrency limit, a deadline on request headers (`HeaderDeadline`, which uvicorn lacks), and a
shutdown that ends unfinished requests with an OpenAI error instead of cutting them (`GracefulServer`).
"""

from __future__ import annotations

import asyncio
import gc
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..engine import Engine
from ..engine.drafters import speculation_for
from ..loading.options import ModelOptions, open_model
from ..lora.files import read_adapter
from ..lora.serving import serve_adapters
from ..model import Transformer
from ..tokenizer import Tokenizer
from .app import create_app
from .errors import APIError
from .limits import ConnectionLimits, ServerLimits
from .middleware import allowed_hosts

DRAIN_SECONDS = 5.0  # after the shutdown timeout, for the cancelled requests to write their errors


def default_model_name(path: Path) -> str:
    """The name clients use for a model: the file's stem or the folder's name."""
    return path.stem if path.is_file() else path.name


def load_engine(
    model: ModelOptions | str | Path,
    *,
    max_batch: int = 16,
    max_queue: int = 256,
    max_seq_len: int | None = None,
    kv_blocks: int | None = None,
    prefix_cache: bool = True,
    kv_dtype: torch.dtype | None = None,
    lora: Sequence[Path] = (),
    speculative: str | Transformer | None = None,
    draft_tokens: int = 8,
) -> tuple[Engine, Tokenizer]:
    """The model and tokenizer `model` names (`open_model`'s options, or just a path), in an engine whose KV
    pool is reserved now (not started); the KV options are `Engine`'s. `lora` are adapter folders served
    together on the model (`lora.serving`): engine adapter i + 1 is `lora[i]`. `speculative` ("ngram" or a
    loaded draft model) drafts up to `draft_tokens` tokens per step (`engine.drafters`); a request opts out
    with `"speculative": false`. A model split over a torchrun
    job (`ModelOptions.tp`/`pp`) holds this rank's share: rank 0's engine serves, the others' `follow` it.

    Raises:
        ValueError: the KV pool does not fit in memory, or adapters are asked for on a split model.
    """
    options = model if isinstance(model, ModelOptions) else ModelOptions(model=model)
    if lora and options.split:
        raise ValueError("lora: serving adapters is not supported on a parallel model yet; serve them in one process")
    opened = open_model(options)
    rows = serve_adapters(opened.model, [read_adapter(folder, opened.model.args) for folder in lora]) if lora else None
    try:
        engine = Engine(opened.model, opened.tokenizer, max_batch=max_batch, max_queue=max_queue,
                        max_seq_len=max_seq_len, kv_blocks=kv_blocks, prefix_cache=prefix_cache, kv_dtype=kv_dtype,
                        adapters=rows)
    except (RuntimeError, MemoryError) as e:  # torch's allocators raise RuntimeError (OutOfMemoryError included)
        raise ValueError(f"max_batch ({max_batch}) x max_seq_len ({max_seq_len or 'the model context'}), "
                         f"kv_blocks ({kv_blocks}): the KV pool does not fit in memory ({str(e).splitlines()[0]})") from e
    if speculative is not None:  # a draft model's pool holds as many blocks as the engine's
        engine.speculation = speculation_for(speculative, opened.model, draft_tokens, engine.pool.n_blocks)
    return engine, opened.tokenizer


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    `header_timeout` seconds of its start or of its previous answer: a client trickling headers a byte at
    a time, or connecting and saying nothing, would otherwise hold the connection forever."""

    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        # uvicorn's own answer at its concurrency limit is a bare 503 without Retry-After: the same limit
        # is applied here instead, answered like every other 503 of the server
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self._app = self.app

    def _over_limit(self) -> bool:
        limit = self.max_connections
        return limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # these bytes may complete a new request's headers
            self.app = _busy if self._over_limit() else self._app
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the body has its own deadline
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The answer past --max-connections: OpenAI's error body, Retry-After, and the connection closed."""
    error = APIError(503, "the server is at its connection limit (--max-connections); retry later",
                     kind="server_error", code="max_connections")
    await error.response(close=True, path=scope.get("path", ""))(scope, receive, send)


class GracefulServer(uvicorn.Server):
    """uvicorn's shutdown (stop accepting, close idle connections, wait for the busy ones), where the
    requests still running `shutdown_timeout` seconds in are ended by `drain`: they answer an error."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None], shutdown_timeout: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.drain)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def server_config(app: Any, host: str, port: int, connections: ConnectionLimits, log_level: str = "info"
                  ) -> uvicorn.Config:
    """uvicorn's settings for `app` under `connections`."""
    protocol = type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": connections.header_timeout})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_keep_alive=connections.keep_alive_timeout,
                          limit_concurrency=connections.max_connections,
                          timeout_graceful_shutdown=math.ceil(connections.shutdown_timeout + DRAIN_SECONDS))


def freeze_startup_objects() -> None:
    """Put every object alive now out of the garbage collector's sight, for good (`gc.freeze`): the model,
    the app and the tokenizer live as long as the server, and a full collection walked them all. Under
    load (benchmarks/serve.py, 16 streams) one took 140 ms, a pause of the event loop and of every stream,
    that showed up as the slowest time to first token; vLLM freezes its startup objects for the same reason."""
    gc.collect()
    gc.freeze()


def run(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    request_timeout: float | None = 600.0,
    limits: ServerLimits | None = None,
    connections: ConnectionLimits | None = None,
    extra_hosts: Iterable[str] = (),
    log_level: str = "info",
    adapters: Sequence[str] = (),
    cors: Iterable[str] = (),
    embeddings: str | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully (`GracefulServer`) and return.

    Without `api_key`, only `Host` headers naming localhost, `host` or one of `extra_hosts` are answered.
    `adapters` names the engine's LoRA adapters (`load_engine(lora=...)`), in order; web pages on the `cors`
    origins may call the API. `embeddings` ("last" or "mean") serves /v1/embeddings on a language model
    (`create_app`'s); an embedding model serves it anyway.
    """
    connections = connections or ConnectionLimits()
    app = create_app(engine, tokenizer, model_name, api_key, request_timeout=request_timeout, limits=limits,
                     allowed_hosts=allowed_hosts(host, extra_hosts), adapters=adapters, cors=cors,
                     embeddings=embeddings)
    server = GracefulServer(server_config(app, host, port, connections, log_level), app.state.drain,
                            connections.shutdown_timeout)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn raises the signal that stopped it again once it has shut down; here that stop is the normal
    # end of `serve` (exit 0), so the signals are ignored for that moment.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    freeze_startup_objects()  # (the process is the server's: in a thread, as tests run it, the caller's objects stay collectable)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
