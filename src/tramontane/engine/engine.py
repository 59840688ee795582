"""The engine loop: admit waiting requests into free cache rows, prefill a chunk, decode one token for
every running sequence, hand the results back; repeat.

Cache rows are kept in two groups: decoding sequences occupy rows 0..d-1 in order, so the decode step
runs on a contiguous slice of the cache with no gathering; prefilling sequences and free rows sit
above. A sequence whose prefill completes is swapped into row d; a finished one is replaced by the
last decoding row. Each move copies one row, once, instead of gathering the batch every step.

Example:
    >>> engine = Engine(model, tokenizer, max_batch=16)
    >>> engine.start()
    >>> engine.submit(Request(prompt=ids, max_tokens=64, emit=print))
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import KVCache
from ..generate import decode_step
from ..model import Transformer
from ..sampling import Penalties, sample_one, sample_rows, token_logprobs
from ..textgen import TextTracker
from .metrics import Metrics
from .request import EngineEvent, Request

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The engine's waiting queue is full; try again later."""


@dataclass
class _Seq:
    req: Request
    row: int
    tracker: TextTracker
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    penalties: Penalties | None
    prefilled: int = 0
    generated: int = 0
    last_token: int = -1
    last_time: float = 0.0

    @property
    def next_position(self) -> int:
        """Where the last sampled token goes when it is fed back."""
        return len(self.req.prompt) + self.generated - 1


class Engine:
    """Serves many requests at once over one model and one preallocated KV cache.

    `max_batch` rows of `max_seq_len` positions each (or of the sliding window, for a window model)
    bound the cache memory at start-up; when every row is busy, requests wait in a queue of at most
    `max_queue`. Only the engine thread touches the model.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        chunk_size: int = 256,
        max_queue: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch < 1 or chunk_size < 1 or max_queue < 0:
            raise ValueError("max_batch and chunk_size must be >= 1 and max_queue >= 0")
        args = model.args
        context = args.max_seq_len or 4096
        self.max_seq_len = min(max_seq_len or min(context, 4096), context)
        window = args.sliding_window
        capacity = min(window, self.max_seq_len) if window else self.max_seq_len
        self.model = model
        self.tokenizer = tokenizer
        self.cache = KVCache.create(args, max_batch, capacity, dtype=model.dtype, device=model.device)
        self.chunk_size = chunk_size
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._decoding: list[_Seq] = []  # index == cache row
        self._prefilling: list[_Seq] = []
        self._free: list[int] = list(range(max_batch - 1, -1, -1))
        self._thread: threading.Thread | None = None
        self._running = False

    # ------------------------------------------------------------------ client side (any thread)
    def validate(self, req: Request) -> None:
        """Raise ValueError naming the field when a request cannot be served."""
        if not req.prompt:
            raise ValueError("prompt: must hold at least one token")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {req.max_tokens}")
        vocab = self.model.args.vocab_size
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise ValueError(f"prompt: token ids must lie in [0, {vocab})")
        if len(req.prompt) + req.max_tokens > self.max_seq_len:
            raise ValueError(
                f"max_tokens: prompt ({len(req.prompt)} tokens) plus max_tokens ({req.max_tokens}) exceeds the "
                f"context of {self.max_seq_len} tokens"
            )

    def submit(self, req: Request) -> None:
        """Queue a request. Raises ValueError for a bad request and QueueFullError when the queue is full."""
        self.validate(req)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue holds {self.max_queue} waiting requests")
            self._waiting.append(req)
            self.metrics.queue_length.set(len(self._waiting))
            self._cond.notify()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="tramontane-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def active(self) -> int:
        return len(self._decoding) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while self._running:
            try:
                busy = self.step()
            except Exception as e:  # never let one bad step kill the server: fail what was running
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
                busy = False
            if not busy:
                with self._cond:
                    if self._running and not self._waiting:
                        self._cond.wait(timeout=0.1)

    def step(self) -> bool:
        """One iteration: retire cancelled/expired, admit, prefill one chunk, decode one token each.
        Returns whether there was anything to do."""
        with torch.inference_mode():
            self._retire_cancelled()
            self._admit()
            did_prefill = self._prefill_chunk()
            did_decode = self._decode()
        return did_prefill or did_decode

    def _admit(self) -> None:
        with self._cond:
            while self._waiting and self._free:
                req = self._waiting.popleft()
                row = self._free.pop()
                self.cache.reset(torch.tensor([row], device=self.cache.k.device))
                self._prefilling.append(self._new_seq(req, row))
            self.metrics.queue_length.set(len(self._waiting))

    def _new_seq(self, req: Request, row: int) -> _Seq:
        device = self.model.device
        vocab = self.model.args.vocab_size
        gen = torch.Generator(device=device).manual_seed(req.seed) if req.seed is not None else None
        penalties = Penalties.for_prompt(req.prompt, vocab, device) if req.params.penalised else None
        stop_ids = req.stop_ids if req.stop_ids is not None else frozenset(self.tokenizer.stop_ids)
        return _Seq(req, row, TextTracker(self.tokenizer, req.stop_strings, req.continuation), stop_ids, gen, penalties)

    def _prefill_chunk(self) -> bool:
        if not self._prefilling:
            return False
        seq = self._prefilling[0]
        start = seq.prefilled
        ids = seq.req.prompt[start : start + self.chunk_size]
        device = self.model.device
        tokens = torch.tensor([ids], device=device)
        pos = torch.arange(start, start + len(ids), device=device)[None]
        logits = self.model(tokens, pos, cache=self.cache, rows=torch.tensor([seq.row], device=device),
                            last_only=True)[0, -1]
        seq.prefilled += len(ids)
        self.metrics.prompt_tokens.inc(len(ids))
        if seq.prefilled < len(seq.req.prompt):
            return True
        self._prefilling.pop(0)
        token = sample_one(logits, seq.req.params, seq.generator, seq.penalties)
        lp = token_logprobs(logits[None], [token])[0] if seq.req.logprobs else None
        if self._accept(seq, token, lp):
            self._release(seq.row)
        else:
            self._promote(seq)
        return True

    def _decode(self) -> bool:
        batch = self._decoding
        if not batch:
            return False
        device = self.model.device
        tokens = torch.tensor([s.last_token for s in batch], device=device)
        positions = torch.tensor([s.next_position for s in batch], device=device)
        logits = decode_step(self.model, tokens, positions, self.cache)  # rows 0..B-1
        self.metrics.batch_size.set(len(batch))
        self.metrics.batch_sizes.observe(len(batch))
        chosen = sample_rows(logits, [s.req.params for s in batch], [s.generator for s in batch],
                             [s.penalties for s in batch])
        lps: list[float | None] = [None] * len(batch)
        if any(s.req.logprobs for s in batch):
            lps = [lp if s.req.logprobs else None for lp, s in zip(token_logprobs(logits, chosen), batch)]
        done = [i for i, s in enumerate(batch) if self._accept(s, chosen[i], lps[i])]
        for row in reversed(done):
            self._remove_decoding(row)
        return True

    def _accept(self, seq: _Seq, token: int, logprob: float | None) -> bool:
        """Record a sampled token and emit its text; True when the sequence has finished."""
        now = time.monotonic()
        if seq.generated == 0:
            self.metrics.ttft.observe(now - seq.req.submitted)
        else:
            self.metrics.token_latency.observe(now - seq.last_time)
        seq.last_time = now
        seq.generated += 1
        seq.last_token = token
        self.metrics.generation_tokens.inc()
        if token in seq.stop_ids:
            self._finish(seq, "stop")
            return True
        text, hit = seq.tracker.feed(token)
        seq.req.emit(EngineEvent(seq.req.id, text, token, logprob))
        if hit:
            self._finish(seq, "stop")
            return True
        if seq.penalties is not None:
            seq.penalties.record(token)
        if seq.generated >= seq.req.max_tokens:
            self._finish(seq, "length")
            return True
        return False

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        text = seq.tracker.finish() if reason in ("stop", "length") else ""
        self.metrics.requests.labels(reason=reason).inc()
        try:
            seq.req.emit(EngineEvent(seq.req.id, text, finish_reason=reason, error=error))
        except Exception:  # a broken client callback must not take the engine down
            log.exception("emit failed for %s", seq.req.id)

    def _promote(self, seq: _Seq) -> None:
        """Move a sequence whose prompt is in the cache into decoding row d (= number decoding)."""
        d = len(self._decoding)
        if seq.row != d:
            self.cache.swap_rows(seq.row, d)
            other = next((s for s in self._prefilling if s.row == d), None)
            if other is not None:
                other.row = seq.row
            else:
                self._free.remove(d)
                self._free.append(seq.row)
            seq.row = d
        self._decoding.append(seq)

    def _remove_decoding(self, row: int) -> None:
        last = len(self._decoding) - 1
        if row != last:
            self.cache.move_row(last, row)
            self._decoding[row] = self._decoding[last]
            self._decoding[row].row = row
        self._decoding.pop()
        self._release(last)

    def _release(self, row: int) -> None:
        self.cache.reset(torch.tensor([row], device=self.cache.k.device))
        self._free.append(row)

    def _retire_cancelled(self) -> None:
        now = time.monotonic()

        def expired(req: Request) -> str | None:
            if req.cancelled:
                return "cancelled"
            if req.deadline is not None and now > req.deadline:
                return "timeout"
            return None

        with self._cond:
            for req in [r for r in self._waiting if expired(r)]:
                self._waiting.remove(req)
                reason = expired(req) or "cancelled"
                self.metrics.requests.labels(reason=reason).inc()
                req.emit(EngineEvent(req.id, "", finish_reason=reason,
                                     error="deadline exceeded" if reason == "timeout" else None))
        for seq in [s for s in self._prefilling if expired(s.req)]:
            self._prefilling.remove(seq)
            reason = expired(seq.req) or "cancelled"
            self._finish(seq, reason, "deadline exceeded" if reason == "timeout" else None)
            self._release(seq.row)
        gone = [i for i, s in enumerate(self._decoding) if expired(s.req)]
        for row in reversed(gone):
            seq = self._decoding[row]
            reason = expired(seq.req) or "cancelled"
            self._finish(seq, reason, "deadline exceeded" if reason == "timeout" else None)
            self._remove_decoding(row)

    def _fail_all(self, error: str) -> None:
        for seq in self._decoding + self._prefilling:
            self._finish(seq, "error", error)
        self._decoding.clear()
        self._prefilling.clear()
        self.cache.reset()
        self._free = list(range(self.cache.batch_size - 1, -1, -1))
