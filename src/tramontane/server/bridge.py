"""From the engine thread to the event loop: the engine's requests for one HTTP call, and their events.

The engine calls `emit` from its own thread; each event is handed to the event loop with
`call_soon_threadsafe`, so the loop only ever awaits a queue and never touches the model. The events'
text is made there, on the loop (`engine.text.TextOutput`: incremental decoding and stop strings), and
not on the engine thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from ..engine import Engine, EngineEvent, Request
from ..engine.text import TextOutput
from ..sampling import SamplingParams


@dataclass(frozen=True)
class Job:
    """Everything the engine needs for one HTTP call, except the prompts."""

    max_tokens: int | None  # None: as many as the context leaves after the prompt
    params: SamplingParams
    n: int = 1
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None  # structured output: the llguidance grammar every choice follows
    timeout: float | None = None
    continuation: bool = False  # completions continue the prompt's text; chat answers start afresh
    adapter: int = 0  # the engine's LoRA adapter (0: the base model)
    speculative: bool = True  # draft tokens when the engine speculates


class Submission:
    """The engine requests of one HTTP call: `n` per prompt, choice index `p * n + j`.

    Events arrive as `(index, event)` from `events()`; `cancel()` drops every request still running
    (the engine frees their cache rows within one step).
    """

    def __init__(self, requests: list[Request], queue: asyncio.Queue[tuple[int, EngineEvent]]) -> None:
        self.requests = requests
        self._queue = queue
        self._finished = [False] * len(requests)

    @property
    def done(self) -> bool:
        return all(self._finished)

    async def events(self) -> AsyncIterator[tuple[int, EngineEvent]]:
        """Every event of every request, in arrival order, until each request has finished."""
        while not self.done:
            index, event = await self._queue.get()
            if event.finish_reason is not None:
                self._finished[index] = True
            yield index, event

    def cancel(self) -> None:
        for request, finished in zip(self.requests, self._finished):
            if not finished:
                request.cancel()


def submit(engine: Engine, prompts: Sequence[list[int]], job: Job) -> Submission:
    """Queue `job.n` requests per prompt (seed + j for choice j when a seed is given).

    All requests are validated before any is queued; if the queue fills up part-way, the ones already
    queued are cancelled. Call from the event loop.

    Raises:
        ValueError: a request the engine cannot serve (the message starts with the field).
        QueueFullError: the engine's queue is full.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, EngineEvent]] = asyncio.Queue()
    requests: list[Request] = []
    for prompt in prompts:
        budget = job.max_tokens if job.max_tokens is not None else engine.max_seq_len - len(prompt)
        for j in range(job.n):
            output = TextOutput(engine.tokenizer, job.stop_strings, job.continuation)
            request = Request(
                prompt=prompt,
                max_tokens=budget,
                emit=_emitter(loop, queue, len(requests), output),
                params=job.params,
                seed=None if job.seed is None else job.seed + j,
                logprobs=job.logprobs,
                top_logprobs=job.top_logprobs,
                grammar=job.grammar,
                timeout=job.timeout,
                adapter=job.adapter,
                speculative=job.speculative,
            )
            output.on_stop = functools.partial(request.cancel, "stop")
            engine.validate(request)
            requests.append(request)
    submission = Submission(requests, queue)
    try:
        for request in requests:
            engine.submit(request)
    except BaseException:
        submission.cancel()
        raise
    return submission


def _emitter(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[int, EngineEvent]], index: int, output: TextOutput
) -> Callable[[EngineEvent], None]:
    def deliver(event: EngineEvent) -> None:  # on the event loop
        for ev in output.feed(event):
            queue.put_nowait((index, ev))

    def emit(event: EngineEvent) -> None:  # on the engine thread
        try:
            loop.call_soon_threadsafe(deliver, event)
        except RuntimeError:  # the event loop has closed: nobody will read this any more
            pass

    return emit
