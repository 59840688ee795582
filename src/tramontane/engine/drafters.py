"""Speculative decoding's drafters: who proposes the tokens that the engine checks in one step.

A decode step reads every weight once, and on a CPU a step of a few rows costs little more than a step
of one. So the engine asks a drafter for up to k tokens that may follow a sequence, runs the sequence's
last token plus those drafts as rows of one step of the target model, keeps the longest prefix of drafts
that the target agrees with (`sampling.verify_draft`) plus one token of the target's own, and rolls back
the rest: the KV written past that point is overwritten by the next step, and blocks it no longer needs
go back to the pool. Every accepted draft is a token for nearly nothing; greedy output is the same token
for token as without speculation, and sampled output follows the same distribution.

- `NgramDrafter`: the latest earlier occurrence of the sequence's last n tokens (n from `n_max` down to
  `n_min`, prompt and answer alike) proposes the tokens that followed it. Costs nothing to run, and wins
  where the answer repeats its context: code edits, summaries, answers quoting a document.
- `ModelDrafter`: a smaller model with the same vocabulary decodes k tokens greedily through a KV pool
  of its own.

Adding a drafter: a class with `propose(key, tokens, k) -> list[int]` (at most k token ids that may follow
`tokens`; `key` names the sequence across calls, for drafters that keep state per sequence) and
`forget(key)` (the sequence is done), given to `Speculation`. Its proposals must not depend on anything
but the tokens and its own state, so that the ranks of a parallel job draft alike.

Example:
    >>> engine = Engine(model, tokenizer, speculation=Speculation(NgramDrafter(), max_draft=8))
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..cache import PagedKVCache
from ..model import Transformer
from ..step_backends import choose_backend
from .kv_blocks import BlockManager


class Drafter(Protocol):
    def propose(self, key: Hashable, tokens: Sequence[int], k: int) -> list[int]: ...

    def forget(self, key: Hashable) -> None: ...


@dataclass
class Speculation:
    """An engine's speculative decoding: `drafter` proposes up to `max_draft` tokens per sequence and step,
    while the step's rows (every decoding sequence's token plus its drafts) stay within `max_rows`: a step
    of 16 rows costs a few one-row steps on the vector kernels (benchmarks/speculative.py's verify part),
    and larger batches are compute-bound already: they decode plainly."""

    drafter: Drafter
    max_draft: int = 8
    max_rows: int = 16

    def __post_init__(self) -> None:
        if self.max_draft < 1:
            raise ValueError(f"draft tokens must be >= 1, got {self.max_draft}")


@dataclass
class Pace:
    """One sequence's record of its drafts: how likely its next draft is to be accepted (`acceptance`, a
    running estimate that forgets old steps, starting from an even chance), and how many tokens are
    worth asking the drafter for (`want`: while the chance that the whole run of drafts is accepted stays
    above `keep`, at most `limit`). While a sequence does not draft, its estimate drifts back towards the
    even chance, so that a sequence whose drafts failed tries again later."""

    limit: int
    hits: float = 1.0  # accepted drafts, discounted, plus a prior of one in two
    trials: float = 2.0
    forget: float = 0.8  # weight of the past at each step that drafts
    drift: float = 0.97  # at each step that does not
    keep: float = 0.1

    @property
    def acceptance(self) -> float:
        return self.hits / self.trials

    def want(self) -> int:
        a = min(self.acceptance, 0.99)
        return max(1, min(self.limit, int(math.log(self.keep) / math.log(a)) if a > 0 else 1))

    def expected(self, drafts: int) -> float:
        """Tokens one step gives with `drafts` drafts: its own token plus the run of accepted drafts."""
        a = self.acceptance
        return float(sum(a**j for j in range(drafts + 1)))

    def record(self, drafted: int, accepted: int) -> None:
        """A step checked `drafted` drafts and accepted the first `accepted` (each a trial, and the
        rejected one too); a step without drafts is `record(0, 0)`."""
        if drafted == 0:
            self.hits = self.drift * self.hits + (1 - self.drift) * 1.0
            self.trials = self.drift * self.trials + (1 - self.drift) * 2.0
            return
        self.hits = self.forget * self.hits + accepted
        self.trials = self.forget * self.trials + accepted + (accepted < drafted)


class StepCosts:
    """What a decode step of r rows (sequences x tokens each) costs, as measured on this model (`observe`,
    a running mean per row count), and estimated where it was not: between two measured counts on the
    line through them, beyond the last one along the last measured slope, and, before two counts are
    known, as one row plus a `slope` of its cost per extra row. `measured=False` keeps to that shape
    alone: the ranks of a parallel job that step in lockstep must choose alike, whatever their clocks say.

    Example:
        >>> costs = StepCosts(measured=False)
        >>> costs.estimate(5) / costs.estimate(1)
        2.0
    """

    def __init__(self, measured: bool = True, slope: float = 0.25) -> None:
        self.measured = measured
        self.slope = slope
        self.seconds: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        if self.measured:
            old = self.seconds.get(rows)
            self.seconds[rows] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def estimate(self, rows: int) -> float:
        if rows in self.seconds:
            return self.seconds[rows]
        known = sorted(self.seconds)
        if not known:
            return 1.0 + self.slope * (rows - 1)
        below = [r for r in known if r < rows]
        above = [r for r in known if r > rows]
        if below and above:
            a, b = below[-1], above[0]
            return self.seconds[a] + (self.seconds[b] - self.seconds[a]) * (rows - a) / (b - a)
        if len(known) >= 2 and below:
            a, b = known[-2], known[-1]
            step = max((self.seconds[b] - self.seconds[a]) / (b - a), 0.0)
            return self.seconds[b] + step * (rows - b)
        r = known[0] if not below else below[-1]
        return self.seconds[r] * (1.0 + self.slope * (rows - 1)) / (1.0 + self.slope * (r - 1))


def best_width(paces: list[tuple[Pace | None, int]], costs: StepCosts, widest: int) -> int:
    """The number of drafts per row (0: none) that gives the most tokens per second for a step of these
    rows, each (its pace, or None for a row that does not speculate, and the drafts it has): every row
    counts as wide as the widest, since the step pads them to one width."""
    rows = len(paces)
    best, rate = 0, rows / costs.estimate(rows)
    for width in range(1, widest + 1):
        tokens = sum(1.0 if pace is None else pace.expected(min(width, have)) for pace, have in paces)
        if (r := tokens / costs.estimate(rows * (width + 1))) > rate:
            best, rate = width, r
    return best


@dataclass
class _Index:
    """Where each n-gram of one sequence last ended (the index of the token after it), for tokens[:upto]."""

    ends: dict[tuple[int, ...], int] = field(default_factory=dict)
    upto: int = 0


class NgramDrafter:
    """Proposes what followed the latest earlier occurrence of the sequence's last `n` tokens, trying
    n = `n_max` down to `n_min`. Its index grows with each sequence (a dictionary entry per n-gram), so a
    step costs the same at any length.

    Example:
        >>> NgramDrafter(n_min=2).propose("a", [5, 6, 7, 8, 5, 6], k=3)
        [7, 8, 5]
    """

    def __init__(self, n_min: int = 2, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes must satisfy 1 <= n_min <= n_max, got {n_min} and {n_max}")
        self.n_min, self.n_max = n_min, n_max
        self._indexes: dict[Hashable, _Index] = {}

    def propose(self, key: Hashable, tokens: Sequence[int], k: int) -> list[int]:
        index = self._indexes.setdefault(key, _Index())
        n_tokens = len(tokens)
        # index every n-gram that ends before the last token: the suffix must match an earlier occurrence
        for end in range(max(index.upto, 1), n_tokens):
            for n in range(self.n_min, min(self.n_max, end) + 1):
                index.ends[tuple(tokens[end - n : end])] = end
        index.upto = max(index.upto, n_tokens)
        for n in range(min(self.n_max, n_tokens - 1), self.n_min - 1, -1):
            found = index.ends.get(tuple(tokens[n_tokens - n :]))
            if found is not None:
                return list(tokens[found : found + k])
        return []

    def forget(self, key: Hashable) -> None:
        self._indexes.pop(key, None)


@dataclass
class _DraftRow:
    """A sequence's place in the draft model's pool: its blocks and the tokens its keys and values hold."""

    blocks: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)


class ModelDrafter:
    """A draft model: decodes k tokens greedily after the sequence, through a paged KV pool of its own of
    `kv_blocks` blocks. What it fed for rejected drafts is rolled back by comparing with the sequence's
    tokens at the next call; only the tokens it has not seen are fed again (a prompt in chunks of
    `chunk_size`).

    Raises:
        ValueError: the draft model's vocabulary differs from `vocab_size` (the target's), or it cannot
            generate (a task head, a bare transformer).
    """

    def __init__(self, model: Transformer, vocab_size: int, kv_blocks: int, *, block_size: int = 16,
                 chunk_size: int = 256) -> None:
        if model.args.bare or model.args.head is not None:
            raise ValueError("speculative: the draft model must be a language model (it has no language-model head)")
        if model.args.vocab_size != vocab_size:
            raise ValueError(f"speculative: the draft model's vocabulary has {model.args.vocab_size} tokens and the "
                             f"target's {vocab_size}: a draft model must share the target's tokenizer")
        self.model = model
        self.step = choose_backend(model)
        self.pool = PagedKVCache.create(model.args, kv_blocks + 1, block_size, dtype=model.dtype,
                                        device=model.device)
        self.blocks = BlockManager(kv_blocks + 1, block_size, prefix_caching=False)
        self.chunk_size = chunk_size
        self._rows: dict[Hashable, _DraftRow] = {}

    def propose(self, key: Hashable, tokens: Sequence[int], k: int) -> list[int]:
        row = self._rows.setdefault(key, _DraftRow())
        same = 0
        for a, b in zip(row.fed, tokens):
            if a != b:
                break
            same += 1
        start = min(same, len(tokens) - 1)  # the last token is fed again when nothing else is new
        del row.fed[start:]
        if not self._reserve(row, len(tokens) + k - 1):
            return []
        drafts: list[int] = []
        feed = list(tokens[start:])
        with torch.inference_mode():
            while len(drafts) < k:
                for s in range(0, len(feed), self.chunk_size):
                    part = feed[s : s + self.chunk_size]
                    logits = self._forward(row, part)
                drafts.append(int(logits.argmax()))
                feed = drafts[-1:]
        return drafts

    def _forward(self, row: _DraftRow, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` after `row.fed`; the last position's logits [V]."""
        device = self.model.device
        start = len(row.fed)
        ids = torch.tensor([tokens], device=device)  # [1, T]
        positions = torch.arange(start, start + len(tokens), device=device)[None]
        logits = self.step(ids, positions, self.pool.batch([row.blocks], [0]), last_only=True)
        row.fed.extend(tokens)
        return logits[0, -1]

    def _reserve(self, row: _DraftRow, positions: int) -> bool:
        """Blocks for `positions` positions in `row`; False (nothing taken) when the pool runs short."""
        fresh = self.blocks.take(-(-positions // self.blocks.block_size) - len(row.blocks))
        if fresh is None:
            return False
        self.pool.clear(fresh)
        row.blocks.extend(fresh)
        return True

    def forget(self, key: Hashable) -> None:
        row = self._rows.pop(key, None)
        if row is not None:
            self.blocks.release(row.blocks)


def speculation_for(choice: str | Transformer | Speculation, target: Transformer, max_draft: int, kv_blocks: int
                    ) -> Speculation:
    """What `generate(speculative=...)`, the CLI and the server accept: "ngram", a draft model (loaded,
    with the target's vocabulary; its pool gets `kv_blocks` blocks) or a `Speculation` as it is.

    Raises:
        ValueError: another string, or a draft model that cannot draft for `target`.
    """
    if isinstance(choice, Speculation):
        return choice
    if isinstance(choice, Transformer):
        return Speculation(ModelDrafter(choice, target.args.vocab_size, kv_blocks), max_draft)
    if choice == "ngram":
        return Speculation(NgramDrafter(), max_draft)
    raise ValueError(f"speculative: expected 'ngram' or a draft model, got {choice!r}")
