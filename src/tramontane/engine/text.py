"""The text of a request's output, made where its events are consumed, not on the engine thread.

The engine works in token ids: its events carry tokens, logprobs and finish reasons, and their `text`
is empty. `TextOutput` turns one request's events into text events on the consumer's side (the server
runs it on its event loop): the incremental decoder and the stop strings of `textgen.TextTracker`.
A stop string found here ends the request for the consumer at once (text cut before the string,
finish reason 'stop') and calls `on_stop`, with which the consumer asks the engine to drop the request;
the engine may compute one more token for it before it leaves the batch, which is discarded here. This
is the split of vLLM's v1 engine: detokenizing and stop strings in the front end, the engine core
aborting what the front end has stopped.

Example:
    >>> out = TextOutput(tokenizer, stops=("\\n\\n",))
    >>> req = Request(ids, max_tokens=64, emit=lambda ev: [show(e.text) for e in out.feed(ev)])
    >>> out.on_stop = functools.partial(req.cancel, "stop")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ..textgen import TextTracker
from .request import EngineEvent


class TextOutput:
    """One request's engine events, with their text. `continuation`: the output continues the prompt's
    text (a completion), so a leading space is kept."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), continuation: bool = False,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.tracker = TextTracker(tokenizer, stops, continuation)
        self.on_stop = on_stop
        self.done = False

    def feed(self, event: EngineEvent) -> list[EngineEvent]:
        """The events to hand on for one engine event: itself with its text, plus a 'stop' finish when
        its text completed a stop string; nothing once the request has finished here."""
        if self.done:
            return []
        if event.finish_reason is not None:
            self.done = True
            text = self.tracker.finish() if event.finish_reason in ("stop", "length") else ""
            return [dataclasses.replace(event, text=text)]
        assert event.token is not None  # every other event is a token's
        text, stopped = self.tracker.feed(event.token)
        out = [dataclasses.replace(event, text=text)]
        if stopped:
            self.done = True
            out.append(EngineEvent(event.request_id, "", finish_reason="stop", cached_tokens=event.cached_tokens,
                                   draft_tokens=event.draft_tokens, accepted_tokens=event.accepted_tokens))
            if self.on_stop is not None:
                self.on_stop()
        return out
