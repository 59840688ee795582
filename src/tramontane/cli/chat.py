"""`tramontane chat`: a conversation in the terminal (or with messages piped on stdin)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from .common import (
    bounded,
    draft_choice,
    from_leader,
    is_leader,
    model_parents,
    open_for,
    sampling,
    sampling_parents,
    speculative_parents,
)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    ch = sub.add_parser("chat", parents=[common, model_parents(), sampling_parents(), speculative_parents()],
                        help="interactive chat in the terminal")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--max-tokens", type=bounded(int, 1), default=512, help="most tokens per answer (default 512)")
    ch.set_defaults(func=run, temperature_default=0.7)


def run(a: argparse.Namespace) -> int:
    from ..chat_repl import ChatSession

    opened = open_for(a)
    model, title = opened.model, opened.path.name
    drafts = {"speculative": draft_choice(a), "draft_tokens": a.draft_tokens}
    if model.parallel is not None:  # rank 0 reads and prints; the others answer the same messages, silently
        leader = is_leader(model)
        session = ChatSession(model, opened.tokenizer, system=a.system, max_tokens=a.max_tokens, seed=a.seed,
                              sampling=sampling(a), read=leader_reader(model),
                              out=sys.stdout if leader else open(os.devnull, "w"), **drafts)  # noqa: SIM115
        return session.run(interactive=leader and sys.stdin.isatty(), title=title)
    if sys.stdin.isatty():
        # Ctrl-C must interrupt an answer even when our parent started us with SIGINT ignored
        # (as a shell does for background jobs); Python would otherwise keep ignoring it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    session = ChatSession(model, opened.tokenizer, system=a.system, max_tokens=a.max_tokens, seed=a.seed,
                          sampling=sampling(a), **drafts)
    return session.run(interactive=sys.stdin.isatty(), title=title)


def leader_reader(model: Any) -> Callable[[str], str]:
    """`input` on rank 0, its lines (and the end of input) shared with every rank. A Ctrl-C reaches rank
    0 alone, so under torchrun it ends the job (the others fail on the collective timeout)."""

    def read(prompt: str) -> str:
        line: str | None = None
        if is_leader(model):
            try:
                line = input(prompt)
            except EOFError:
                line = None
        line = from_leader(model, line)
        if line is None:
            raise EOFError
        return str(line)

    return read
