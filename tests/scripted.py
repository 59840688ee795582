"""A stand-in for `Engine` that answers at once from a script: the server's tests without a model;
`scripted_server` serves one live, as `tramontane serve` runs, with a real Mistral v3 tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mistral_common
from live_server import live_server

from tramontane import load_tokenizer
from tramontane.engine import EngineEvent, QueueFullError, Request
from tramontane.engine.grammar import Vocabulary
from tramontane.engine.metrics import Metrics
from tramontane.server import create_app
from tramontane.server.limits import ConnectionLimits

# Mistral's v3 vocabulary, shipped with mistral_common: FIM and tool-call tokens
V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
MODEL = "scripted"  # the served model's name (conftest's `server`)
KEY = "sesame"  # its API key


class ScriptedEngine:
    """Stands in for `Engine`: answers each request at once with the tokens `script(request)` returns,
    then the finish reason `finish` ('length' unless a stop id or stop string comes first)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.metrics = Metrics()
        self.max_seq_len = 256
        self.max_queue = 64
        self.generates = True  # a language model's engine
        self.active = self.waiting = 0
        self.vocabulary = Vocabulary(tokenizer, tokenizer.vocab_size)  # checks grammars; the script ignores them
        self.reset()

    def reset(self) -> None:
        self.script: Callable[[Request], list[int]] = lambda req: self.tokenizer.encode("Hello there", bos=False)
        self.finish = "length"
        self.full = False
        self.submitted: list[Request] = []

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def validate(self, req: Request) -> None:
        if not req.prompt:
            raise ValueError("prompt: must hold at least one token")
        if len(req.prompt) + req.max_tokens > self.max_seq_len:
            raise ValueError(f"max_tokens: prompt plus max_tokens exceeds the context of {self.max_seq_len} tokens")

    def submit(self, req: Request) -> None:
        self.validate(req)
        if self.full:
            raise QueueFullError("the queue holds 0 waiting requests")
        self.submitted.append(req)
        # token events only, as the engine emits them: the server makes their text (and stops at stop strings)
        for token in self.script(req)[: req.max_tokens]:
            if token in self.tokenizer.stop_ids:
                req.emit(EngineEvent(req.id, "", finish_reason="stop"))
                return
            req.emit(EngineEvent(req.id, "", token, -0.25 if req.logprobs else None))
        error = None if self.finish == "length" else "deadline exceeded" if self.finish == "timeout" else "boom"
        req.emit(EngineEvent(req.id, "", finish_reason=self.finish, error=error))


@contextmanager
def scripted_server(model: str = "scripted", tokenizer: Any = None, **options: Any) -> Iterator[tuple[str, ScriptedEngine]]:
    """(base URL, engine) of `create_app(ScriptedEngine, tokenizer, model, **options)` live on uvicorn, run as
    `tramontane serve` runs it; the tokenizer is Mistral's v3 unless given."""
    tok = tokenizer or load_tokenizer(V3)
    engine = ScriptedEngine(tok)
    with live_server(create_app(engine, tok, model, **options), connections=ConnectionLimits()) as url:
        yield url, engine


def answer(tok: Any, text: str) -> list[int]:
    """What the scripted engine emits for a plain answer: the text's tokens, then EOS."""
    return [*tok.encode(text, bos=False), tok.eos_id]


def tool_call(tok: Any, name: str, arguments: dict) -> list[int]:
    """The v3 layout of one call: [TOOL_CALLS] then a JSON list, then EOS."""
    return [tok._tool_calls_id, *tok.encode(json.dumps([{"name": name, "arguments": arguments}]), bos=False),
            tok.eos_id]
