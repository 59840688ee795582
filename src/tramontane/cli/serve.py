"""`tramontane serve`: the HTTP server (OpenAI, Mistral and Anthropic dialects) over a continuous-batching
engine; under torchrun, rank 0 serves and every rank runs its share of each step."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import torch

from ..loading.options import DTYPES, resolve_model
from .common import (
    CliError,
    bounded,
    draft_choice,
    is_leader,
    model_options,
    model_parents,
    speculative_parents,
)

MAX_BATCH = 4096  # beyond, the KV cache alone outgrows any machine
MAX_QUEUE = 1_000_000
KV_DTYPES = {**DTYPES, "int8": torch.int8}


def host_list(text: str) -> tuple[str, ...]:
    """`--allowed-hosts a.example,b.example` as ('a.example', 'b.example')."""
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    if not hosts:
        raise argparse.ArgumentTypeError("expected host names separated by commas")
    return hosts


def origin_list(text: str) -> tuple[str, ...]:
    """`--cors-origins https://a.example,http://localhost:3000` as a checked tuple of origins."""
    try:
        from ..server.cors import cors_origins

        origins = tuple(sorted(cors_origins(text.split(","))))
    except ImportError as e:
        raise argparse.ArgumentTypeError(f"serve needs the server extras: pip install 'tramontane[serve]' ({e})") from e
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("cors_origins: ")) from e
    if not origins:
        raise argparse.ArgumentTypeError("expected origins separated by commas")
    return origins


def named_adapter(text: str) -> tuple[str, Path]:
    """`serve --lora NAME=DIR` as (NAME, DIR); a bare DIR is named after its folder."""
    name, sep, folder = text.partition("=")
    if not sep:
        name, folder = Path(text).name, text
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(folder)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    sv = sub.add_parser("serve", parents=[common, model_parents(lora=False), speculative_parents()],
                        help="OpenAI-compatible HTTP server (continuous batching); under torchrun, rank 0 serves "
                             "and every rank runs its share of each step")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' (all but "
                    "/health, /metrics)")
    sv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: file/folder name)")
    sv.add_argument("--allowed-hosts", type=host_list, default=(),
                    help="without --api-key, Host names answered besides localhost and --host: a,b,... ('*': any)")
    sv.add_argument("--cors-origins", type=origin_list, default=(),
                    help="web page origins that may call the API from a browser: https://a.example,... ('*': any; "
                    "default none); never with credentials")
    sv.add_argument("--max-batch", type=bounded(int, 1, MAX_BATCH), default=16,
                    help=f"sequences decoded together; KV cache rows (default 16, at most {MAX_BATCH})")
    sv.add_argument("--max-queue", type=bounded(int, 1, MAX_QUEUE), default=256,
                    help="sequences waiting for a row before 503s (default 256); a request of more is a 400")
    sv.add_argument("--max-seq-len", type=bounded(int, 1), default=None,
                    help="context per sequence (default: the model's, at most the engine's default context)")
    sv.add_argument("--request-timeout", type=bounded(float, 0), default=600.0,
                    help="seconds before a request fails (default 600; 0: never)")
    sv.add_argument("--max-request-bytes", type=bounded(int, 1), default=4 * 2**20,
                    help="largest request body, checked as it arrives (default 4194304: 4 MiB)")
    sv.add_argument("--max-prompt-chars", type=bounded(int, 1), default=None,
                    help="most prompt characters per request, checked before tokenizing (default: 16 x the context)")
    sv.add_argument("--body-timeout", type=bounded(float, 0, above=True), default=30.0,
                    help="seconds a client may take to send a request body (default 30)")
    sv.add_argument("--header-timeout", type=bounded(float, 0, above=True), default=10.0,
                    help="seconds a connection may take to send a request's headers (default 10)")
    sv.add_argument("--keep-alive-timeout", type=bounded(int, 1), default=5,
                    help="seconds an idle keep-alive connection stays open (default 5)")
    sv.add_argument("--max-connections", type=bounded(int, 1), default=512,
                    help="open connections and running requests before new requests get 503 (default 512)")
    sv.add_argument("--shutdown-timeout", type=bounded(float, 0), default=5.0,
                    help="on SIGTERM, seconds running requests get to finish before they end with an error (default 5)")
    sv.add_argument("--lora", type=named_adapter, action="append", default=[], metavar="NAME=DIR",
                    help="serve a LoRA adapter folder as model NAME (repeatable); requests pick one with "
                         '"model": NAME, and rows with different adapters share each step')
    sv.add_argument("--kv-blocks", type=bounded(int, 1), default=None,
                    help="KV cache blocks of 16 positions (default: max-batch x max-seq-len / 4 positions)")
    sv.add_argument("--kv-cache-dtype", choices=list(KV_DTYPES), default=None,
                    help="KV cache dtype (int8: a scale per stored vector; default: the compute dtype)")
    sv.add_argument("--no-prefix-cache", action="store_true", help="do not reuse the KV blocks of shared prompt "
                    "prefixes")
    sv.add_argument("--embeddings", choices=["last", "mean"], default=None,
                    help="also answer /v1/embeddings with a language model's pooled hidden states (last token "
                         "after EOS, or mean); an embedding model serves it without this")
    sv.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    sv.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    try:
        from ..server import default_model_name, load_engine
        from ..server import run as serve_forever
        from ..server.limits import ConnectionLimits, ServerLimits
    except ImportError as e:
        raise CliError(f"serve needs the server extras: pip install 'tramontane[serve]' ({e})") from e
    limits = ServerLimits(max_request_bytes=a.max_request_bytes, max_prompt_chars=a.max_prompt_chars,
                          body_timeout=a.body_timeout)
    connections = ConnectionLimits(header_timeout=a.header_timeout, keep_alive_timeout=a.keep_alive_timeout,
                                   max_connections=a.max_connections, shutdown_timeout=a.shutdown_timeout)
    options = model_options(a)
    engine, tokenizer = load_engine(
        options, max_batch=a.max_batch, max_queue=a.max_queue, max_seq_len=a.max_seq_len,
        kv_blocks=a.kv_blocks, prefix_cache=not a.no_prefix_cache,
        kv_dtype=None if a.kv_cache_dtype is None else KV_DTYPES[a.kv_cache_dtype],
        lora=[folder for _, folder in a.lora], speculative=draft_choice(a), draft_tokens=a.draft_tokens)
    if not is_leader(engine.model):
        engine.follow()  # rank 0 serves; this rank runs its share of every step until rank 0 stops
        return 0
    # a peer rank that fails stops the engine: the server then shuts down as on SIGTERM, and serve fails
    engine.on_fatal = lambda error: os.kill(os.getpid(), signal.SIGTERM)
    name = a.served_model_name or default_model_name(resolve_model(options.model))
    pool = engine.pool
    split = engine.model.parallel
    where = "" if split is None else f", tp {split.config.tp} x pp {split.config.pp} ranks"
    print(f"tramontane: serving {name} at http://{a.host}:{a.port}/v1 (context {engine.max_seq_len}{where}, "
          f"batch {a.max_batch}, KV pool of {pool.n_blocks - 1} blocks x {pool.block_size} positions, "
          f"up to {pool.nbytes() / 2**30:.2f} GiB, committed as used, {torch.get_num_threads()} threads)"
          f"{'; API key required' if a.api_key else ''}"
          f"{'; adapters ' + ', '.join(n for n, _ in a.lora) if a.lora else ''}"
          f"{'; speculative decoding: ' + a.speculative if a.speculative else ''}", flush=True)
    serve_forever(engine, tokenizer, name, host=a.host, port=a.port, api_key=a.api_key,
                  request_timeout=a.request_timeout or None, limits=limits, connections=connections,
                  extra_hosts=a.allowed_hosts, log_level=a.log_level, adapters=[n for n, _ in a.lora],
                  cors=a.cors_origins, embeddings=a.embeddings)
    if engine.failed is not None:
        from ..parallel import ParallelError

        raise ParallelError(engine.failed)
    return 0
