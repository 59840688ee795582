"""Token-level generation, layered: `stream` of events over an engine -> `generate` collector.

`stream` runs the prompts through the same `Engine` loop as the server (stepped here, without a thread).
`prefill` and `decode_step` are single steps over a contiguous `KVCache`, for callers that drive a
cache themselves (benchmarks, tests).

Example:
    >>> results = generate(model, [[1, 851, 349], [1, 22557]], max_tokens=16)
    >>> results[0].tokens        # new tokens only, eos excluded
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .engine.drafters import Speculation, speculation_for
from .engine.engine import BLOCK_SIZE, Engine
from .engine.request import EngineEvent, Request
from .engine.tokens import TokenLoop, check_language_model, check_prompt
from .model import Transformer
from .sampling import SamplingParams
from .step_backends import StepBackend, compile_decode

__all__ = ["FinishEvent", "Generation", "TokenEvent", "TokenLoop", "check_language_model", "check_prompt",
           "compile_decode", "decode_step", "generate", "prefill", "stream"]


@dataclass(frozen=True)
class TokenEvent:
    """Prompt `index` produced `token` (with its log-probability under the model when asked)."""

    index: int
    token: int
    logprob: float | None = None


@dataclass(frozen=True)
class FinishEvent:
    """Prompt `index` is done: reason 'stop' (eos or a stop token) or 'length' (max_tokens reached). With
    speculative decoding: how many tokens were drafted for it, and how many of them were accepted."""

    index: int
    reason: str
    draft_tokens: int = 0
    accepted_tokens: int = 0


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
    `step` (`choose_backend(model)`)."""
    return step(tokens[:, None], positions[:, None], cache)[:, 0]


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
    speculative: str | Transformer | Speculation | None = None,
    draft_tokens: int = 8,
) -> Iterator[Event]:
    """Yield TokenEvents as they are produced and a FinishEvent per prompt.

    The prompts run through an `Engine` of their own, stepped here (no thread), the same loop the server
    runs: prompt chunks and the decode steps of the prompts already prefilled share each step, and a
    prompt that finishes leaves the batch at once. `stop_check(index, token)`, called after each token is
    yielded, ends that prompt with reason 'stop' when it returns True (e.g. a stop string matched). On a
    parallel model every rank calls `stream` alike and steps its own engine in lockstep.

    `speculative` ("ngram", a draft model with the same vocabulary, or a `Speculation`) drafts up to
    `draft_tokens` tokens per step for the model to check (`engine.drafters`): the same tokens when greedy,
    the same distribution when sampling, in fewer steps when the drafts are accepted.
    """
    params = params or SamplingParams()
    check_language_model(model)
    check_request(model, prompts, max_tokens, chunk_size)
    if model.parallel is not None:  # one share of a model: every rank must sample alike
        seed = model.parallel.shared_seed(seed)
    engine = _engine_for(model, prompts, max_tokens, chunk_size, speculative, draft_tokens)
    events: deque[EngineEvent] = deque()
    requests = [Request(list(p), max_tokens, events.append, params=params, stop_ids=frozenset(stop_ids),
                        seed=None if seed is None else seed + i, logprobs=logprobs) for i, p in enumerate(prompts)]
    index = {req.id: i for i, req in enumerate(requests)}
    for req in requests:
        engine.submit(req)
    done: set[int] = set()
    while len(done) < len(requests):
        if not engine.step() and not events:
            raise RuntimeError("generate: the engine stopped with prompts unfinished")  # a bug, not bad input
        while events:
            event = events.popleft()
            i = index[event.request_id]
            if i in done:
                continue
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    raise RuntimeError(f"prompts[{i}]: {event.error}")
                done.add(i)
                yield FinishEvent(i, event.finish_reason, event.draft_tokens, event.accepted_tokens)
                continue
            assert event.token is not None
            yield TokenEvent(i, event.token, event.logprob)
            if stop_check is not None and stop_check(i, event.token):
                requests[i].cancel("stop")
                done.add(i)
                yield FinishEvent(i, "stop")
    if model.parallel is not None:
        model.parallel.settle()


def _engine_for(model: Transformer, prompts: Sequence[Sequence[int]], max_tokens: int, chunk_size: int | None,
                speculative: str | Transformer | Speculation | None = None, draft_tokens: int = 8) -> Engine:
    """An engine for these prompts only: every one admitted at once, with KV blocks for all of its
    positions and its drafts (nothing is ever preempted), and no prefix cache (each prompt is computed as
    it is)."""
    args = model.args
    lengths = [len(p) + max_tokens for p in prompts]
    slack = 0 if speculative is None else draft_tokens  # positions a step's drafts may write past the answer
    blocks = sum(-(-(n + slack) // BLOCK_SIZE) for n in lengths)
    speculation = None if speculative is None else speculation_for(speculative, model, draft_tokens, blocks)
    return Engine(model, None, max_batch=len(prompts), max_seq_len=max(lengths),
                  chunk_size=chunk_size or min(512, args.sliding_window or 512), max_queue=len(prompts),
                  kv_blocks=blocks, block_size=BLOCK_SIZE, prefix_cache=False, lockstep=True,
                  speculation=speculation)


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
    speculative: str | Transformer | Speculation | None = None,
    draft_tokens: int = 8,
) -> list[Generation]:
    """Generate for a batch of token-id prompts; per prompt, the new tokens only (eos excluded).

    `stop` holds extra token ids that end a sequence like `eos_id`. Temperature 0 is greedy. `speculative`
    ("ngram" or a draft model) and `draft_tokens`: speculative decoding, as in `stream`.

    Raises:
        ValueError: an empty prompt, max_tokens < 1, a sampling parameter out of range, or a prompt
            that does not fit in the context of a model without a sliding window.
    """
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty)
    stop_ids = set(stop or ()) | ({eos_id} if eos_id is not None else set())
    results = [Generation(logprobs=[] if logprobs else None) for _ in prompts]
    for event in stream(model, prompts, max_tokens=max_tokens, params=params, stop_ids=stop_ids, seed=seed,
                        chunk_size=chunk_size, logprobs=logprobs, speculative=speculative,
                        draft_tokens=draft_tokens):
        result = results[event.index]
        if isinstance(event, TokenEvent):
            result.tokens.append(event.token)
            if result.logprobs is not None and event.logprob is not None:
                result.logprobs.append(event.logprob)
        else:
            result.finish_reason = event.reason
    return results
