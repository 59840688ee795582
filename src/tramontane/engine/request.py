"""What a client hands the engine, and what the engine hands back."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..sampling import SamplingParams

_ids = itertools.count()


@dataclass(frozen=True)
class EngineEvent:
    """A piece of one request's output: one token (with its logprobs when asked), or the end. The last
    event of a request has `finish_reason` set: 'stop' (eos or stop token), 'length', 'cancelled' (or the
    reason given to `Request.cancel`), 'timeout' or 'error' (with `error`). `cached_tokens`: how many
    prompt tokens came from the prefix cache instead of being computed. The engine leaves `text` empty:
    `engine.text.TextOutput` fills it in on the consumer's side, with stop strings."""

    request_id: str
    text: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their logprobs, best first
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0
    draft_tokens: int = 0  # with speculative decoding: the tokens drafted for this request so far
    accepted_tokens: int = 0  # and how many of them the model accepted


@dataclass
class Request:
    """One sequence to generate. `emit` is called from the engine thread for every event, so it must
    be quick and thread-safe (the server hands events over to its event loop)."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[EngineEvent], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's stop ids
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the this many most likely tokens at each step
    grammar: str | None = None  # llguidance grammar the output must follow (engine.grammar builds them)
    timeout: float | None = None  # seconds from submission
    adapter: int = 0  # the served LoRA adapter (lora.serving.AdapterRows index; 0: the base model)
    speculative: bool = True  # draft tokens when the engine speculates (False: decode this one plainly)
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    cancel_reason: str = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to drop this request; it leaves the batch within one step, with `reason` as its
        finish reason ('stop' when the consumer found a stop string)."""
        self.cancel_reason = reason
        self.cancelled = True

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.submitted + self.timeout
