"""Token-level generation, layered: `prefill`/`decode_step` -> `stream` of events -> `generate` collector.

Example:
    >>> results = generate(model, [[1, 851, 349], [1, 22557]], max_tokens=16)
    >>> results[0].tokens        # new tokens only, eos excluded
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .model import Transformer
from .parallel.topology import wait_all
from .sampling import Penalties, SamplingParams, sample_rows, token_logprobs
from .step_backends import StepBackend, choose_backend


@dataclass(frozen=True)
class TokenEvent:
    """Prompt `index` produced `token` (with its log-probability under the model when asked)."""

    index: int
    token: int
    logprob: float | None = None


@dataclass(frozen=True)
class FinishEvent:
    """Prompt `index` is done: reason 'stop' (eos or a stop token) or 'length' (max_tokens reached)."""

    index: int
    reason: str


Event = TokenEvent | FinishEvent


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None


def prefill(
    step: StepBackend, tokens: Sequence[int], cache: KVCache, row: int, chunk_size: int, start: int = 0
) -> torch.Tensor:
    """Run `tokens` (at positions start, start+1, ...) into cache row `row` in chunks, each a step of
    `step` (`choose_backend(model)`); last logits [V]."""
    device = step.model.device
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    rows = torch.tensor([row], device=device)
    logits = None
    for s in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, s : s + chunk_size]
        pos = torch.arange(start + s, start + s + chunk.shape[1], device=device)[None]
        logits = step(chunk, pos, cache, rows=rows, last_only=True)
    assert logits is not None
    return logits[0, -1]


def decode_step(step: StepBackend, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token for each of the first B cache rows: tokens, positions [B] -> logits [B, V], a step of
    `step` (`choose_backend(model)`).

    Runs through torch.compile after `compile_decode(model)`.
    """
    compiled = step.model.__dict__.get("_compiled_decode")
    if compiled is not None:
        return compiled(tokens, positions, cache)
    return _decode(step, tokens, positions, cache)


def _decode(step: StepBackend, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return step(tokens[:, None], positions[:, None], cache)[:, 0]


def compile_decode(model: Transformer) -> None:
    """Route `model`'s decode steps through torch.compile (Inductor), for every caller of `decode_step`
    (generate, stream, the chat, the server's engine).

    Compilation happens on the first step (tens of seconds) and again for new shapes. If compiling or
    running the compiled step fails, decoding goes on eagerly, with one warning. Worth it on GPUs; on
    CPU the native decode stack already runs the blocks of a step in one call, and compiling the rest
    measured slower than eager.

    Example:
        >>> compile_decode(model)
        >>> generate(model, [[1, 851, 349]], max_tokens=16)  # first step compiles
    """
    model.__dict__["_compiled_decode"] = _CompiledDecode(choose_backend(model))


class _CompiledDecode:
    def __init__(self, step: StepBackend) -> None:
        self.step = step
        self.compiled: Callable[..., torch.Tensor] | None = torch.compile(functools.partial(_decode, step), dynamic=True)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(tokens, positions, cache)
            except Exception as e:  # any failure of Dynamo/Inductor or the compiler it calls
                warnings.warn(f"tramontane: torch.compile of the decode step failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); decoding without it", stacklevel=3)
                self.compiled = None
        return _decode(self.step, tokens, positions, cache)


def check_language_model(model: Transformer) -> None:
    """Generating needs next-token logits, which a model with a task head does not give.

    Raises:
        ValueError: `model` has a classification or question-answering head, or none at all (a bare
            embedding model).
    """
    if model.args.bare:
        raise ValueError("model: it is a bare transformer (an embedding model) without a language-model head, so it "
                         "cannot generate text (use tramontane.embed, or serve it for /v1/embeddings)")
    if model.args.head is not None:
        raise ValueError(f"model: it has a {model.args.head.kind!r} task head instead of a language-model "
                         "output, so it cannot generate text (use `tramontane classify` or `tramontane answer`)")


def check_prompt(prompt: Sequence[int], name: str, vocab_size: int, max_tokens: int, context: int | None) -> None:
    """Raise ValueError, naming `name` or max_tokens first, when `prompt` plus `max_tokens` new tokens
    cannot be generated: an empty prompt, ids outside the vocabulary, or more than `context` positions
    (None: no limit, e.g. a model whose sliding window rolls). The one check of `stream` and the engine."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if len(prompt) == 0:
        raise ValueError(f"{name} is empty: a prompt needs at least one token (e.g. BOS)")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"{name} holds token ids outside [0, {vocab_size})")
    if context is not None and len(prompt) + max_tokens > context:
        raise ValueError(f"max_tokens: a prompt of {len(prompt)} tokens plus max_tokens={max_tokens} exceeds "
                         f"the context of {context} tokens")


def check_request(
    model: Transformer, prompts: Sequence[Sequence[int]], max_tokens: int, chunk_size: int | None
) -> None:
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    args = model.args
    context = args.max_seq_len if args.sliding_window is None else None
    for i, p in enumerate(prompts):
        check_prompt(p, f"prompts[{i}]", args.vocab_size, max_tokens, context)


class TokenLoop:
    """What each sampled token of one sequence does: the one place where stop ids, a stop check (stop
    strings), penalties and the length limit end a sequence, for `stream` and the server's engine alike.

    Per token, `accept(token)` first (False: a stop id, which ends the sequence with 'stop' and is not
    output); then, once the token is out, `finish_reason(token)`: 'stop' when `stop_check(token)` says
    so, 'length' at `max_tokens`, else None.

    Example:
        >>> loop = TokenLoop(max_tokens=2, stop_ids={2})
        >>> loop.accept(7), loop.finish_reason(7), loop.accept(9), loop.finish_reason(9)
        (True, None, True, 'length')
    """

    def __init__(
        self,
        max_tokens: int,
        stop_ids: Collection[int] = (),
        penalties: Penalties | None = None,
        stop_check: Callable[[int], bool] | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.penalties = penalties
        self.stop_check = stop_check
        self.produced = 0

    def accept(self, token: int) -> bool:
        self.produced += 1
        return token not in self.stop_ids

    def finish_reason(self, token: int) -> str | None:
        if self.stop_check is not None and self.stop_check(token):
            return "stop"
        if self.penalties is not None:
            self.penalties.record(token)
        return "length" if self.produced >= self.max_tokens else None


def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Collection[int] = (),
    seed: int | None = None,
    chunk_size: int | None = None,
    logprobs: bool = False,
    stop_check: Callable[[int, int], bool] | None = None,
) -> Iterator[Event]:
    """Yield TokenEvents as they are produced and a FinishEvent per prompt.

    All prompts decode together in one batch; each is prefilled on its own (no padding), and a prompt
    that finishes leaves the batch at once. `stop_check(index, token)`, called after each token is
    yielded, ends that prompt with reason 'stop' when it returns True (e.g. a stop string matched).
    On a pipeline-parallel model the prompts may decode as several micro-batches in flight
    (`ParallelConfig.groups_for`, `_Flight`), so every stage computes while the others do; each prompt's
    tokens are the same.
    """
    params = params or SamplingParams()
    check_language_model(model)
    check_request(model, prompts, max_tokens, chunk_size)
    args = model.args
    device = model.device
    longest = max(len(p) for p in prompts) + max_tokens
    capacity = min(args.sliding_window, longest) if args.sliding_window else longest
    chunk = chunk_size or min(512, args.sliding_window or 512)
    if model.parallel is not None:  # one share of a model: every rank must sample alike
        seed = model.parallel.shared_seed(seed)
    generators = [torch.Generator(device=device).manual_seed(seed + i) if seed is not None else None
                  for i in range(len(prompts))]
    penalties = [Penalties.for_prompt(p, args.vocab_size, device) if params.penalised else None for p in prompts]

    loops = [TokenLoop(max_tokens, stop_ids, penalties[i],
                       None if stop_check is None else functools.partial(stop_check, i)) for i in range(len(prompts))]
    lengths = [len(p) for p in prompts]
    step = choose_backend(model)  # once: the model does not change while it generates
    with torch.inference_mode():
        flights = []
        groups = _groups(model, len(prompts))
        for group in groups:
            cache = KVCache.create(args, len(group), capacity, dtype=model.dtype, device=device)
            logits = torch.stack([prefill(step, prompts[i], cache, r, chunk) for r, i in enumerate(group)])
            flights.append(_Flight(group, cache, logits, overlap=len(groups) > 1))
        while flights:
            for flight in list(flights):  # each group's step is in flight while the others are handled
                flight.arrive()
                active, logits = flight.active, flight.logits
                chosen = sample_rows(logits, [params] * len(active), [generators[i] for i in active],
                                     [penalties[i] for i in active])
                lps: list[float | None] = list(token_logprobs(logits, chosen)) if logprobs else [None] * len(active)
                keep: list[int] = []
                for r, i in enumerate(active):
                    if not loops[i].accept(chosen[r]):
                        yield FinishEvent(i, "stop")
                        continue
                    yield TokenEvent(i, chosen[r], lps[r])
                    if (reason := loops[i].finish_reason(chosen[r])) is not None:
                        yield FinishEvent(i, reason)
                    else:
                        keep.append(r)
                if not keep:
                    flights.remove(flight)
                    continue
                if len(keep) < len(active):
                    flight.cache.keep(torch.tensor(keep, device=device))
                    flight.active = [active[r] for r in keep]
                toks = torch.tensor([chosen[r] for r in keep], device=device)
                pos = torch.tensor([lengths[i] + loops[i].produced - 1 for i in flight.active], device=device)
                flight.depart(step, toks, pos)
    if model.parallel is not None:
        model.parallel.settle()


def _groups(model: Transformer, n: int) -> list[list[int]]:
    """The prompts [0, n) in the groups that decode in flight together: one group, or on a pipeline
    `ParallelConfig.groups_for(n)` contiguous groups as even as can be."""
    count = 1 if model.parallel is None else model.parallel.config.groups_for(n)
    bounds = [n * g // count for g in range(count + 1)]
    return [list(range(bounds[g], bounds[g + 1])) for g in range(count)]


@dataclass
class _Flight:
    """One group of sequences decoding together over its own cache: `active` holds the prompt index of
    each cache row (rows kept contiguous), `logits` [len(active), V] their next-token logits once
    `arrive` returns. With `overlap` (a pipeline's groups), `pending` is what must finish before they
    are there: the broadcast of the last stage's logits."""

    active: list[int]
    cache: KVCache
    logits: torch.Tensor
    overlap: bool = False
    pending: list[torch.distributed.Work] = field(default_factory=list)

    def depart(self, step: StepBackend, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Start the step of `tokens` [B] at `positions` [B]; with `overlap`, the logits arrive later and
        the first stage goes on to the next group meanwhile."""
        parallel = step.model.parallel
        if not self.overlap or parallel is None:
            self.logits = decode_step(step, tokens, positions, self.cache)
            return
        with parallel.deferred_logits() as self.pending:
            self.logits = decode_step(step, tokens, positions, self.cache)

    def arrive(self) -> None:
        if self.pending:
            wait_all(self.pending)
            self.pending = []


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    eos_id: int | None = None,
    stop: Collection[int] | None = None,
    seed: int | None = None,
    chunk_size: int | None = None,
    logprobs: bool = False,
) -> list[Generation]:
    """Generate for a batch of token-id prompts; per prompt, the new tokens only (eos excluded).

    `stop` holds extra token ids that end a sequence like `eos_id`. Temperature 0 is greedy.

    Raises:
        ValueError: an empty prompt, max_tokens < 1, a sampling parameter out of range, or a prompt
            that does not fit in the context of a model without a sliding window.
    """
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty)
    stop_ids = set(stop or ()) | ({eos_id} if eos_id is not None else set())
    results = [Generation(logprobs=[] if logprobs else None) for _ in prompts]
    for event in stream(model, prompts, max_tokens=max_tokens, params=params, stop_ids=stop_ids, seed=seed,
                        chunk_size=chunk_size, logprobs=logprobs):
        result = results[event.index]
        if isinstance(event, TokenEvent):
            result.tokens.append(event.token)
            if result.logprobs is not None and event.logprob is not None:
                result.logprobs.append(event.logprob)
        else:
            result.finish_reason = event.reason
    return results
