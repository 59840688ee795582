"""`POST /v1/embeddings`: OpenAI's embeddings, as the `openai` and `mistralai` clients call them.

The vectors are `embed.embed_tokens`'s, computed on the engine's thread (`Engine.call`, a few inputs at
a time so that generation steps go on in between), L2-normalised as OpenAI's are. The route serves an
embedding model (a bare transformer: last-token pooling unless told otherwise), or a language model
when the app was made with `embeddings="last"` or `"mean"`; otherwise it answers a 400 saying so.

Texts are encoded as `embed.embed` encodes them (BOS, and EOS for last-token pooling); token-id lists
are run as given. OpenAI's `dimensions` (Mistral's `output_dimension`) keeps the first components and
normalises again; `encoding_format: "base64"` sends each vector as the base64 of its little-endian
float32 bytes, as OpenAI does. Mistral's client sends `input` too; `inputs` is taken as well.

Example:
    >>> app.include_router(embeddings_router(server, served_pooling(engine, "last")))
"""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Sequence
from typing import Literal, Protocol, cast

import torch
import torch.nn.functional as F
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from ..embed import POOLINGS, Pooling, embed_tokens, embedding_tokens
from ..engine import Engine
from ..tokenizer import Tokenizer
from . import protocol as p
from .errors import APIError, bad_request
from .limits import check_prompt_chars, scan_text
from .schemas import STRICT

MAX_INPUTS = 2048  # per request, as OpenAI allows
INPUTS_PER_CALL = 8  # inputs embedded per turn on the engine thread, between generation steps

Input = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, with Mistral's names beside: `inputs`, `output_dimension`, `output_dtype`."""

    model_config = STRICT

    model: str | None = None
    input: Input | None = None
    inputs: Input | None = None  # Mistral's name in its API reference (its client sends `input`)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    output_dimension: int | None = Field(None, ge=1)  # Mistral's `dimensions`
    output_dtype: Literal["float", "int8", "uint8", "binary", "ubinary"] | None = None  # Mistral's; float only
    user: str | None = None


class EmbeddingServer(Protocol):
    """What the route uses of the app's server (`app.OpenAIServer`)."""

    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    max_prompt_chars: int
    request_timeout: float | None
    shutting_down: bool


def served_pooling(engine: Engine, option: str | None) -> Pooling | None:
    """The pooling /v1/embeddings runs: `option` ("last" or "mean"), else "last" for an embedding model,
    None (the route off) for a language model.

    Raises:
        ValueError: `option` is another value.
    """
    if option is None:
        return None if engine.generates else "last"
    for pooling in POOLINGS:
        if option == pooling:
            return pooling
    raise ValueError(f"embeddings: must be one of {', '.join(POOLINGS)} (or None: off for a language model), "
                     f"got {option!r}")


def embeddings_router(server: EmbeddingServer, pooling: Pooling | None) -> APIRouter:
    """The /v1/embeddings route, answered by `server` with `pooling` (None: a 400 saying how to enable it)."""
    routes = EmbeddingRoutes(server, pooling)
    router = APIRouter()
    router.add_api_route("/v1/embeddings", routes.create, methods=["POST"])
    return router


class EmbeddingRoutes:
    def __init__(self, server: EmbeddingServer, pooling: Pooling | None) -> None:
        self.server = server
        self.pooling = pooling

    async def create(self, body: EmbeddingRequest) -> Response:
        server, pooling = self.server, self.pooling
        if pooling is None:
            raise bad_request("model: this server runs a language model without embeddings; start it with "
                              "embeddings='last' or 'mean' (`tramontane serve --embeddings last`) to pool its "
                              "hidden states, or serve an embedding model", "model", "embeddings_disabled")
        if body.model is not None and body.model != server.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; embeddings come from {server.model_name!r}",
                           param="model", code="model_not_found")
        inputs, param = _inputs(body)
        dimensions = _dimensions(body, server.engine.model.args.dim)
        if body.output_dtype not in (None, "float"):
            raise bad_request(f"output_dtype: only 'float' is served, got {body.output_dtype!r}", "output_dtype")
        scan_text(body, ())  # every text valid (no NUL, no lone surrogate) before any is tokenized
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                check_prompt_chars(len(item), server.max_prompt_chars, f"{param}[{i}]")
        ids = await asyncio.to_thread(self._tokens, inputs, param, pooling)
        if server.shutting_down:
            raise APIError(503, "the server is shutting down", kind="server_error", code="server_shutdown")
        try:
            vectors = await asyncio.wait_for(self._embed(ids, pooling), server.request_timeout)
        except TimeoutError as e:  # the calls not begun yet are dropped with their futures
            raise APIError(504, f"the request did not finish within its deadline of {server.request_timeout} seconds",
                           kind="timeout_error", code="request_timeout") from e
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        vectors = F.normalize(vectors, dim=-1)
        used = sum(map(len, ids))
        metrics = server.engine.metrics
        metrics.embedding_inputs.inc(len(ids))
        metrics.embedding_tokens.inc(used)
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return JSONResponse({"id": p.new_id("embd"), "object": "list", "data": data, "model": body.model or server.model_name,
                             "usage": {"prompt_tokens": used, "total_tokens": used}})

    def _tokens(self, inputs: Sequence[str | list[int]], param: str, pooling: Pooling) -> list[list[int]]:
        """Each input's tokens, checked against the vocabulary and the context (on a worker thread)."""
        engine, vocab = self.server.engine, self.server.tokenizer.vocab_size
        out = []
        for i, item in enumerate(inputs):
            where = f"{param}[{i}]"
            if isinstance(item, str):
                ids = embedding_tokens(self.server.tokenizer, item, pooling)
            else:
                ids = item
                if not ids:
                    raise bad_request(f"{where}: a token list must hold at least one token", where)
                if any(not 0 <= t < vocab for t in ids):
                    raise bad_request(f"{where}: token ids must lie in [0, {vocab})", where)
            if len(ids) > engine.max_seq_len:
                raise bad_request(f"{where}: {len(ids)} tokens exceed the context of {engine.max_seq_len} tokens "
                                  "this server runs", where, "context_length_exceeded")
            out.append(ids)
        return out

    async def _embed(self, ids: list[list[int]], pooling: Pooling) -> torch.Tensor:
        """The raw pooled vectors [N, dim], computed on the engine's thread a few inputs per call."""
        engine, parts = self.server.engine, []
        for start in range(0, len(ids), INPUTS_PER_CALL):
            chunk = ids[start : start + INPUTS_PER_CALL]
            future = engine.call(functools.partial(embed_tokens, ids=chunk, pooling=pooling, normalize=False))
            parts.append(await asyncio.wrap_future(future))
        return torch.cat(parts) if parts else torch.zeros(0, engine.model.args.dim)


def _inputs(body: EmbeddingRequest) -> tuple[list[str | list[int]], str]:
    """The request's inputs as a list of texts or of token lists, and the field they came in."""
    if (body.input is None) == (body.inputs is None):
        raise bad_request("input: give the texts to embed in 'input' (or Mistral's 'inputs'), not both", "input")
    param, value = ("input", body.input) if body.input is not None else ("inputs", body.inputs)
    assert value is not None
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif value and isinstance(value[0], int):
        items = [cast(list[int], value)]  # one token list
    else:
        items = list(cast(list[str | list[int]], value))
    if not items:
        raise bad_request(f"{param}: must hold at least one text or token list", param)
    if len(items) > MAX_INPUTS:
        raise bad_request(f"{param}: {len(items)} inputs; at most {MAX_INPUTS} per request", param)
    return items, param


def _dimensions(body: EmbeddingRequest, dim: int) -> int | None:
    """OpenAI's `dimensions` or Mistral's `output_dimension` (both: they must agree), at most `dim`."""
    if body.dimensions is not None and body.output_dimension is not None and body.dimensions != body.output_dimension:
        raise bad_request(f"output_dimension: {body.output_dimension} disagrees with dimensions: {body.dimensions}; "
                          "give one of them", "output_dimension")
    param, value = ("dimensions", body.dimensions) if body.dimensions is not None else \
        ("output_dimension", body.output_dimension)
    if value is not None and value > dim:
        raise bad_request(f"{param}: the model's embeddings have {dim} dimensions, got {value}", param)
    return value


def _encoded(vector: torch.Tensor, encoding: str) -> list[float] | str:
    """A vector as a list of floats, or the base64 of its little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
