"""The engine loop: schedule, run one step, hand the results back; repeat. One thread owns the model.

The `Scheduler` decides (admission, KV blocks, preemption) and returns a plan, the `Runner` executes it
on the model over a paged KV pool, and the sampled tokens go through each request's `TokenLoop` (the
same stop, penalty and length handling as `generate.stream`) before they are emitted. Events carry
token ids: their text is made where they are consumed (`engine.text.TextOutput`, which the server runs
on its event loop), so the engine thread spends nothing on detokenizing or stop strings.

In a parallel job (a model loaded with `parallel=`), rank 0's engine schedules and samples, and hands
each step's `StepInputs` to the other ranks, whose engines `follow`: every step is the same sequence of
collectives on every rank.

Other work on the model (embeddings) is handed to the same thread with `call`: it runs between two steps.

Example:
    >>> engine = Engine(model, tokenizer, max_batch=16)
    >>> engine.start()
    >>> engine.submit(Request(prompt=ids, max_tokens=64, emit=print))
    >>> vectors = engine.call(lambda model: embed_tokens(model, [ids])).result()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..cache import PagedKVCache
from ..kernels import release_threads
from ..loading.validate import available_memory
from ..lora.serving import AdapterRows
from ..model import Transformer
from ..parallel import ParallelError
from ..sampling import Penalties, sample_one, sample_rows, top_token_logprobs, verify_draft
from .drafters import Pace, Speculation, StepCosts, best_width
from .grammar import Matcher, Vocabulary
from .kv_blocks import BlockManager
from .metrics import Metrics
from .request import EngineEvent, Request
from .runner import Runner, StepInputs
from .scheduler import Plan, Scheduler, Sequence
from .tokens import TokenLoop, check_language_model, check_prompt

log = logging.getLogger(__name__)

# What rank 0 hands the other ranks of a parallel job besides a step's inputs: that it is idle (sent every
# KEEPALIVE seconds, so that a quiet server does not run into the collectives' timeout), or that it stops.
IDLE, STOP = "idle", "stop"
KEEPALIVE = 5.0
DEFAULT_CONTEXT = 4096  # positions per sequence when neither the caller nor the model says
BLOCK_SIZE = 16  # positions per KV block
T = TypeVar("T")


class QueueFullError(Exception):
    """The engine's waiting queue is full; try again later."""


@dataclass(eq=False)
class _Live:
    """A request the engine has taken in: its scheduler sequence and its sampling state."""

    req: Request
    seq: Sequence
    loop: TokenLoop
    generator: torch.Generator | None
    penalties: Penalties | None
    matcher: Matcher | None = None  # the request's grammar, when its output is constrained
    last_time: float = 0.0
    pace: Pace | None = None  # how its drafts fare, when it speculates
    drafted: int = 0
    accepted: int = 0


class Engine:
    """Serves many requests at once over one model and one paged KV pool.

    The pool holds `kv_blocks` blocks of `block_size` positions (default: a quarter of
    `max_batch x max_seq_len` positions, and never less than one full context), stored in `kv_dtype`
    (default: the model's dtype). Blocks are handed out as sequences grow; when none is left, the last
    admitted sequence is preempted and recomputed later. With `prefix_cache`, full blocks of prompts
    are kept after their requests finish and reused by prompts that start with the same tokens (in
    sliding-window models too: a block that leaves a sequence's window stays cached). At most
    `max_batch` sequences run at once; the others wait in a queue of at most `max_queue`. Only the
    engine thread touches the model.
    `adapters` is the selector of the LoRA adapters served on `model` (`lora.serving.serve_adapters`): a
    request's `adapter` picks one, and rows with different adapters share each step.

    On a parallel model, rank 0's engine hands each step's inputs to the other ranks, which `follow`;
    with `lockstep`, every rank runs an engine of its own over the same requests instead (what
    `generate.stream` does on every rank of a job), and each samples alike from the same logits.

    When a peer rank of a parallel job fails, the engine fails what runs, stops, keeps the reason in
    `failed` and calls `on_fatal` with it (the server sets it to shut itself down).

    With `speculation`, decoding sequences draft tokens (`engine.drafters`) that each step checks as rows
    beside their last token: greedy output stays the same token for token, sampled output follows the
    same distribution, and every accepted draft saves a step.

    A bare model (an embedding model, `ModelArgs.bare`) generates nothing: its engine refuses every
    request, reserves no KV pool to speak of (one block), and only runs `call`s.
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
        kv_blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
        prefix_cache: bool = True,
        kv_dtype: torch.dtype | None = None,
        adapters: AdapterRows | None = None,
        lockstep: bool = False,
        speculation: Speculation | None = None,
    ) -> None:
        if max_batch < 1 or chunk_size < 1 or max_queue < 0:
            raise ValueError("max_batch and chunk_size must be >= 1 and max_queue >= 0")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        args = model.args
        self.generates = not args.bare
        if self.generates:
            check_language_model(model)
        context = args.max_seq_len or DEFAULT_CONTEXT
        if max_seq_len is not None and args.sliding_window is not None:
            self.max_seq_len = max_seq_len  # the window rolls: positions may run past the trained context
        else:
            self.max_seq_len = min(max_seq_len or min(context, DEFAULT_CONTEXT), context)
        per_context = -(-self.max_seq_len // block_size)
        if not self.generates:
            kv_blocks = 1  # the scheduler and runner want a pool; nothing is ever admitted to it
        elif kv_blocks is None:
            kv_blocks = max(per_context, -(-max_batch * self.max_seq_len // (4 * block_size)))
        elif kv_blocks < per_context:
            raise ValueError(f"kv_blocks: {kv_blocks} blocks of {block_size} positions cannot hold one sequence "
                             f"of the context ({self.max_seq_len} positions needs {per_context})")
        need = PagedKVCache.pool_nbytes(args, kv_blocks + 1, block_size, kv_dtype or model.dtype)
        have = available_memory(model.device)
        if have is not None and need > have:
            # torch.empty would not fail here (pages are committed as blocks fill): the process would be
            # killed for memory under load instead
            raise ValueError(f"kv_blocks: the KV pool of {kv_blocks} blocks x {block_size} positions needs "
                             f"{need / 2**30:.2f} GiB but only {have / 2**30:.2f} GiB is available; lower --kv-blocks, "
                             "--max-batch or --max-seq-len, or store it smaller (--kv-cache-dtype)")
        self.model = model
        self.tokenizer = tokenizer
        self.pool = PagedKVCache.create(args, kv_blocks + 1, block_size, dtype=kv_dtype or model.dtype,
                                        device=model.device)  # + the padding block
        self.blocks = BlockManager(kv_blocks + 1, block_size, prefix_caching=prefix_cache)
        self.scheduler = Scheduler(self.blocks, max_batch=max_batch, chunk_size=chunk_size,
                                   window=args.sliding_window)
        self.adapters = adapters
        self.lockstep = lockstep
        self.speculation = speculation
        # what decode steps cost by rows, which decides how much speculation drafts (measured, except where
        # every rank of a parallel job decides alone and must decide alike)
        self.runner = Runner(model, self.pool, adapters, StepCosts(measured=not lockstep))
        self.vocabulary = Vocabulary(tokenizer, args.vocab_size)  # for constrained requests, built on first use
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._submitted: deque[Request] = deque()
        self._calls: deque[tuple[Callable[[Transformer], Any], Future[Any]]] = deque()
        self._lives: list[_Live] = []
        self._thread: threading.Thread | None = None
        self._running = False
        self.failed: str | None = None
        self.on_fatal: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ client side (any thread)
    def validate(self, req: Request) -> None:
        """Raise ValueError naming the field when a request cannot be served."""
        if not self.generates:
            raise ValueError("model: this is an embedding model (a bare transformer, without a language-model head): "
                             "it cannot generate text; it answers /v1/embeddings")
        vocab = self.model.args.vocab_size
        check_prompt(req.prompt, "prompt", vocab, req.max_tokens, self.max_seq_len)
        served = self.adapters.count if self.adapters is not None else 0
        if not 0 <= req.adapter <= served:
            raise ValueError(f"adapter: {req.adapter} is not one of the {served} adapters served (0: none)")
        if any(token >= vocab for token, _ in req.params.logit_bias):
            raise ValueError(f"logit_bias: token ids must lie in [0, {vocab})")

    def submit(self, req: Request) -> None:
        """Queue a request. Raises ValueError for a bad request, QueueFullError when the queue is full and
        ParallelError once a peer rank has failed."""
        self.validate(req)
        if self.failed is not None:
            raise ParallelError(self.failed)
        with self._cond:
            if self.waiting >= self.max_queue:
                raise QueueFullError(f"the queue holds {self.max_queue} waiting requests")
            self._submitted.append(req)
            self.metrics.queue_length.set(self.waiting)
            self._cond.notify()

    def call(self, fn: Callable[[Transformer], T]) -> Future[T]:
        """Run `fn(model)` on the engine thread, between two steps, and return its future (which holds
        its result or its exception): the way to use the model for anything but generation without a
        second thread touching it. Call from any thread; the calls run in order, after `start`."""
        future: Future[T] = Future()
        with self._cond:
            if self.failed is not None:
                raise ParallelError(self.failed)
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        if self.model.device.type == "cpu":
            release_threads()  # the engine thread computes from now on: this thread's idle team would slow it
        self._thread = threading.Thread(target=self._loop, name="tramontane-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._cancel_calls()

    @property
    def active(self) -> int:
        """Sequences admitted to the KV pool (prefilling or decoding)."""
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        """Requests waiting for admission (new ones and preempted ones)."""
        return len(self._submitted) + len(self.scheduler.waiting)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        topology = self.model.parallel
        told = time.monotonic()  # when the other ranks last heard from this one
        while self._running:
            try:
                busy = self.step()
                if busy:
                    told = time.monotonic()
                elif topology is not None and time.monotonic() - told > KEEPALIVE:
                    topology.from_leader(IDLE)
                    told = time.monotonic()
            except ParallelError as e:  # a peer rank is gone: no step can run any more
                log.error("engine stopped: %s", e)
                self._fatal(str(e))
                return
            except Exception as e:  # never let one bad step kill the server: fail what was running
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
                busy = False
            if not busy:
                with self._cond:
                    if self._running and not self._submitted and not self._calls:
                        self._cond.wait(timeout=0.1)
        if topology is not None:
            topology.from_leader(STOP)

    def follow(self) -> None:
        """On the ranks other than 0 of a parallel job: run the steps rank 0's engine hands out, until it
        stops. Raises ParallelError when rank 0 is gone (after the collectives' timeout at most)."""
        topology = self.model.parallel
        if topology is None or topology.rank == 0:
            raise ValueError("follow: only the ranks other than 0 of a parallel job follow; rank 0 starts the engine")
        with torch.inference_mode():
            while (message := topology.from_leader(None)) != STOP:
                if isinstance(message, StepInputs):
                    self.runner.run(message)

    def _fatal(self, error: str) -> None:
        self.failed = error
        self._running = False
        self._fail_all(error)
        self._cancel_calls()
        if self.on_fatal is not None:
            self.on_fatal(error)

    def step(self) -> bool:
        """One iteration: take in new requests, retire cancelled/expired ones, schedule, run, emit.
        Returns whether there was anything to do."""
        with torch.inference_mode():
            called = self._run_calls()
            self._take_submitted()
            self._retire()
            plan = self.scheduler.schedule()
            self.metrics.preemptions.inc(len(plan.preempted))
            if plan.empty:
                return called
            if self.speculation is not None and plan.decode:
                self._draft(plan, self.speculation)
            inputs = self.runner.inputs(plan)
            if self.model.parallel is not None and not self.lockstep:
                self.model.parallel.from_leader(inputs)  # the other ranks run the same step
            seqs, logits, verified = self.runner.execute(plan, inputs)
            self._advance(plan)
            if logits is not None:
                self._sample(seqs, logits)
            if verified is not None:
                self._check_drafts(plan.verify, verified)
            self.metrics.kv_blocks_used.set(self.blocks.used)
        return True

    def _run_calls(self) -> bool:
        """Run the `call`s waiting now (not those they queue); whether there were any."""
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.model))
                except Exception as e:  # the caller's to handle: the engine goes on
                    future.set_exception(e)
        return bool(calls)

    def _cancel_calls(self) -> None:
        """Calls that will never run (the engine stopped or failed) end with an error, not a hang."""
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(self.failed or "the engine stopped before running this call"))

    def _take_submitted(self) -> None:
        with self._cond:
            taken = list(self._submitted)
            self._submitted.clear()
        for req in taken:
            try:
                live = self._new_live(req)
            except ValueError as e:  # a grammar llguidance refuses (the server checks them first)
                req.emit(EngineEvent(req.id, "", finish_reason="error", error=str(e)))
                continue
            self._lives.append(live)
            self.scheduler.add(live.seq)

    def _new_live(self, req: Request) -> _Live:
        device = self.model.device
        gen = torch.Generator(device=device).manual_seed(req.seed) if req.seed is not None else None
        penalties = Penalties.for_prompt(req.prompt, self.model.args.vocab_size, device) if req.params.penalised \
            else None
        stop_ids = req.stop_ids if req.stop_ids is not None else frozenset(self.tokenizer.stop_ids)
        loop = TokenLoop(req.max_tokens, stop_ids, penalties)
        matcher = None if req.grammar is None else self.vocabulary.matcher(req.grammar)
        live = _Live(req, Sequence(list(req.prompt), adapter=req.adapter), loop, gen, penalties, matcher)
        if self.speculation is not None and req.speculative:
            live.pace = Pace(self.speculation.max_draft)
        live.seq.owner = live
        return live

    def _advance(self, plan: Plan) -> None:
        for chunk in plan.prefills:
            self.scheduler.advance(chunk.seq, chunk.length)
            self.metrics.prompt_tokens.inc(chunk.length)
        for seq in plan.decode:
            self.scheduler.advance(seq, 1)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        lives: list[_Live] = [s.owner for s in seqs]
        masked = logits
        if any(x.matcher is not None for x in lives):  # constrained rows: only what their grammar allows
            masked = logits.clone()
            for row, live in enumerate(lives):
                if live.matcher is not None:
                    live.matcher.mask(masked[row])
        chosen = sample_rows(masked, [x.req.params for x in lives], [x.generator for x in lives],
                             [x.penalties for x in lives])
        lps: list[float | None] = [None] * len(lives)
        tops: list[list[tuple[int, float]]] = [[] for _ in lives]
        if any(x.req.logprobs for x in lives):
            k = max(x.req.top_logprobs if x.req.logprobs else 0 for x in lives)
            picked, best = top_token_logprobs(logits, chosen, k)
            lps = [lp if x.req.logprobs else None for lp, x in zip(picked, lives)]
            tops = [row[: x.req.top_logprobs] if x.req.logprobs else [] for row, x in zip(best, lives)]
        self.metrics.batch_size.set(len(lives))
        self.metrics.batch_sizes.observe(len(lives))
        for live, token, lp, top in zip(lives, chosen, lps, tops):
            self._accept(live, token, lp, tuple(top))

    def _draft(self, plan: Plan, spec: Speculation) -> None:
        """Ask the drafter for the decoding sequences' drafts and, when they pay, turn the step's decode
        rows into one verifying forward: every decoding sequence's last token plus its drafts, all padded
        to the width that gives the most tokens per second (`drafters.best_width`: each sequence's
        acceptance so far against what steps of so many rows cost), with at most `max_rows` rows in all
        (so a large batch decodes plainly)."""
        rows = len(plan.decode)
        widest = min(spec.max_draft, spec.max_rows // rows - 1)
        if widest < 1:
            return
        lives: list[_Live] = [seq.owner for seq in plan.decode]
        for seq, live in zip(plan.decode, lives):
            if live.pace is None:
                continue
            # drafts past the request's last token or the context would be thrown away
            want = min(live.pace.want(), widest, live.loop.max_tokens - live.loop.produced - 1,
                       self.max_seq_len - len(seq.tokens))
            if want > 0:
                seq.draft = spec.drafter.propose(live, seq.tokens, want)[:want]
        have = max(len(seq.draft) for seq in plan.decode)
        width = best_width([(live.pace, len(seq.draft)) for seq, live in zip(plan.decode, lives)],
                           self.runner.costs, have) if have else 0
        for seq, live in zip(plan.decode, lives):
            del seq.draft[width:]
            if live.pace is not None and not seq.draft:
                live.pace.record(0, 0)
        if width == 0:
            return
        reserved: list[int] = []
        for seq in plan.decode:
            fresh = self.scheduler.reserve(seq, width)
            if fresh is None:  # the pool is short: no drafts this step (what was taken is given back)
                for other in plan.decode:
                    other.draft = []
                    self.scheduler.trim(other)
                return
            reserved.extend(fresh)
        plan.new_blocks.extend(reserved)
        plan.verify, plan.decode = plan.decode, []

    def _check_drafts(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each verifying row's tokens, from its logits at every position [B, T, vocab]: the drafts the model
        accepts (`sampling.verify_draft`), then one token of its own where the first draft is rejected (or
        after the last). Each token goes through the request's loop as a decoded one does; the sequence then
        keeps the keys and values of what it accepted and gives back the blocks of the rest."""
        self.metrics.batch_size.set(len(seqs))
        self.metrics.batch_sizes.observe(len(seqs))
        for seq, rows in zip(seqs, logits):
            live: _Live = seq.owner
            draft, seq.draft = seq.draft, []
            params = live.req.params
            emitted = accepted = 0
            alive = True
            live.drafted += len(draft)  # counted before a token can end the request, whose last event reports them
            for j in range(len(draft) + 1):
                row = rows[j]
                if live.matcher is not None:  # only what the grammar allows after the tokens accepted so far
                    row = row.clone()
                    live.matcher.mask(row)
                if j < len(draft):
                    token, ok = verify_draft(row, draft[j], params, live.generator, live.penalties)
                else:
                    token, ok = sample_one(row, params, live.generator, live.penalties), False
                lp: float | None = None
                top: tuple[tuple[int, float], ...] = ()
                if live.req.logprobs:
                    picked, best = top_token_logprobs(rows[j : j + 1], [token], live.req.top_logprobs)
                    lp, top = picked[0], tuple(best[0])
                emitted += 1
                accepted += ok
                live.accepted += ok
                alive = self._accept(live, token, lp, top)
                if not alive or not ok:
                    break
            if draft:
                self.metrics.draft_tokens.inc(len(draft))
                self.metrics.accepted_tokens.inc(accepted)
                if live.pace is not None:
                    live.pace.record(len(draft), accepted)
            self.metrics.verify_rows.inc()
            self.metrics.verify_tokens.inc(emitted)
            if alive:
                self.scheduler.advance(seq, emitted)  # the fed tokens it accepted now hold their keys
                self.scheduler.trim(seq)

    def _accept(self, live: _Live, token: int, logprob: float | None, top: tuple[tuple[int, float], ...] = ()
                ) -> bool:
        """Record a sampled token, emit it, and end the request when its loop says so; whether it goes on."""
        now = time.monotonic()
        if live.loop.produced == 0:
            self.metrics.ttft.observe(now - live.req.submitted)
            self.metrics.cached_tokens.inc(max(live.seq.cached_tokens, 0))
        else:
            self.metrics.token_latency.observe(now - live.last_time)
        live.last_time = now
        self.metrics.generation_tokens.inc()
        if not live.loop.accept(token):
            self._finish(live, "stop")
            return False
        if live.matcher is not None and not live.matcher.consume(token):
            self._finish(live, "error", f"the grammar refused token {token}: {live.matcher.error}")
            return False
        live.req.emit(EngineEvent(live.req.id, "", token, logprob, top, cached_tokens=max(live.seq.cached_tokens, 0),
                                  draft_tokens=live.drafted, accepted_tokens=live.accepted))
        if (reason := live.loop.finish_reason(token)) is None:
            live.seq.tokens.append(token)
            return True
        self._finish(live, reason)
        return False

    def _finish(self, live: _Live, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(live.seq)
        self._lives.remove(live)
        if self.speculation is not None:
            self.speculation.drafter.forget(live)
        self.metrics.requests.labels(reason=reason).inc()
        try:
            live.req.emit(EngineEvent(live.req.id, "", finish_reason=reason, error=error,
                                      cached_tokens=max(live.seq.cached_tokens, 0), draft_tokens=live.drafted,
                                      accepted_tokens=live.accepted))
        except Exception:  # a broken client callback must not take the engine down
            log.exception("emit failed for %s", live.req.id)

    def _retire(self) -> None:
        now = time.monotonic()
        for live in list(self._lives):
            req = live.req
            if req.cancelled:
                self._finish(live, req.cancel_reason)
            elif req.deadline is not None and now > req.deadline:
                self._finish(live, "timeout", "deadline exceeded")

    def _fail_all(self, error: str) -> None:
        for live in list(self._lives):
            self._finish(live, "error", error)
