"""Text in, text out: completion and chat over a model and a tokenizer, streamed through the
incremental decoder, with stop strings. Built on `generate.stream`, like every front end.

Example:
    >>> for ev in stream_chat(model, tok, [{"role": "user", "content": "Hi"}], max_tokens=32):
    ...     print(ev.text, end="")
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .engine.drafters import Speculation
from .generate import FinishEvent, TokenEvent, stream
from .model import Transformer
from .sampling import SamplingParams


@dataclass(frozen=True)
class TextEvent:
    """A piece of text for prompt `index` (possibly empty); `finish_reason` set on the last event, with the
    speculative decoding counts (`generate.FinishEvent`)."""

    index: int
    text: str
    token: int | None = None
    logprob: float | None = None
    finish_reason: str | None = None
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int


class StopMatcher:
    """Holds back text that might be the start of a stop string; finds the first full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was found (text is cut before it)."""
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextTracker:
    """Turns one sequence's tokens into text pieces: incremental decoding plus stop strings."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), continuation: bool = False) -> None:
        # A continuation keeps the leading space of its first word ("is" + " Paris"); a fresh answer drops it.
        self.decoder = tokenizer.decoder(continuation=True) if continuation else tokenizer.decoder()
        self.matcher = StopMatcher(stops)
        self.stopped = False

    def feed(self, token: int) -> tuple[str, bool]:
        """Text to emit after `token`, and whether a stop string ended the sequence."""
        text, hit = self.matcher.feed(self.decoder.add(token))
        self.stopped = self.stopped or hit
        return text, hit

    def finish(self) -> str:
        """The text still held back, once the sequence has ended for another reason."""
        if self.stopped:
            return ""
        text, _ = self.matcher.feed(self.decoder.flush())
        return text + self.matcher.flush()


def stream_text(
    model: Transformer,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    params: SamplingParams | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    chunk_size: int | None = None,
    logprobs: bool = False,
    continuation: bool = False,
    speculative: str | Transformer | Speculation | None = None,
    draft_tokens: int = 8,
) -> Generator[TextEvent, None, None]:
    """Stream text pieces for token-id prompts; generation ends at the tokenizer's stop ids, a stop
    string (excluded from the text) or `max_tokens`. With `continuation` the text continues the
    prompt's (a leading space is kept), as a completion does; otherwise it starts afresh, as an answer.
    `speculative` and `draft_tokens`: speculative decoding, as in `generate.stream`."""
    trackers = [TextTracker(tokenizer, stop, continuation) for _ in prompts]

    def check(i: int, token: int) -> bool:  # called once the token's event is out: its text is fed already
        return trackers[i].stopped

    for ev in stream(model, prompts, max_tokens=max_tokens, params=params, stop_ids=tokenizer.stop_ids, seed=seed,
                     chunk_size=chunk_size, logprobs=logprobs, stop_check=check, speculative=speculative,
                     draft_tokens=draft_tokens):
        if isinstance(ev, TokenEvent):
            # each token's text goes out with the token itself, so the last one (whatever ends the
            # sequence) is never left behind
            text, _ = trackers[ev.index].feed(ev.token)
            yield TextEvent(ev.index, text, ev.token, ev.logprob)
        elif isinstance(ev, FinishEvent):
            yield TextEvent(ev.index, trackers[ev.index].finish(), finish_reason=ev.reason,
                            draft_tokens=ev.draft_tokens, accepted_tokens=ev.accepted_tokens)


def _collect(events: Iterator[TextEvent], n: int, prompt_lengths: list[int], prefix: list[str]) -> list[Completion]:
    texts = list(prefix)
    tokens: list[list[int]] = [[] for _ in range(n)]
    reasons = [""] * n
    for ev in events:
        texts[ev.index] += ev.text
        if ev.token is not None:
            tokens[ev.index].append(ev.token)
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    return [Completion(t, k, r, p) for t, k, r, p in zip(texts, tokens, reasons, prompt_lengths)]


def complete(
    model: Transformer,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int,
    echo_prompt: bool = False,
    stop: Sequence[str] = (),
    seed: int | None = None,
    **sampling: Any,
) -> list[Completion]:
    """Complete each text (BOS added); with `echo_prompt` the answer starts with the prompt."""
    prompts = [tokenizer.encode(t, bos=True) for t in texts]
    events = stream_text(model, tokenizer, prompts, max_tokens=max_tokens, params=SamplingParams(**sampling),
                         stop=stop, seed=seed, continuation=True)
    prefix = list(texts) if echo_prompt else [""] * len(texts)
    return _collect(events, len(texts), [len(p) for p in prompts], prefix)


def stream_chat(
    model: Transformer,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int,
    tools: list[dict[str, Any]] | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    **sampling: Any,
) -> Iterator[TextEvent]:
    """Stream the assistant's answer to one conversation (OpenAI-style message dicts)."""
    ids = tokenizer.encode_chat(messages, tools=tools)
    return stream_text(model, tokenizer, [ids], max_tokens=max_tokens, params=SamplingParams(**sampling),
                       stop=stop, seed=seed)


def chat(
    model: Transformer,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, Any]]],
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    seed: int | None = None,
    **sampling: Any,
) -> list[Completion]:
    """Answer a batch of conversations together."""
    prompts = [tokenizer.encode_chat(c) for c in conversations]
    events = stream_text(model, tokenizer, prompts, max_tokens=max_tokens, params=SamplingParams(**sampling),
                         stop=stop, seed=seed)
    return _collect(events, len(prompts), [len(p) for p in prompts], [""] * len(prompts))
