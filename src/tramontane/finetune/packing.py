"""Packing examples into training batches without cross-contamination.

An example of n tokens gives n - 1 inputs (tokens[:-1]) and targets (tokens[1:], scored where the
mask says). Examples are laid end to end in one row of at most `batch_tokens` inputs; each keeps its
own positions (from 0) and a segment id, and the model's packed mask (`Transformer.forward(...,
segments=...)`) lets a token attend only to earlier tokens of its own example. So a packed batch gives
the same loss as the examples one by one, without a single padding token.

    examples (inputs)   a a a | b b | c c c c        batch_tokens = 10
    positions           0 1 2   0 1   0 1 2 3
    segments            0 0 0   1 1   2 2 2 2

Example:
    >>> plan = epoch_plan(examples, batch_tokens=4096, seed=0, epoch=0)
    >>> batch = make_batch([examples[i] for i in plan[0]])
    >>> logits = model(batch.tokens, batch.positions, segments=batch.segments)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import Example

IGNORE = -100  # a target that is not scored (cross_entropy's ignore_index)


@dataclass(frozen=True)
class Batch:
    """One packed row: inputs, their positions and segments, and targets (IGNORE where not scored),
    all [1, T]."""

    tokens: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    targets: torch.Tensor

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.positions.to(device), self.segments.to(device),
                     self.targets.to(device))


def make_batch(examples: Sequence[Example]) -> Batch:
    """Pack `examples` (each of at least 2 tokens) into one row."""
    tokens: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    targets: list[int] = []
    for s, ex in enumerate(examples):
        n = len(ex.tokens) - 1
        tokens += ex.tokens[:-1]
        positions += range(n)
        segments += [s] * n
        targets += [t if m else IGNORE for t, m in zip(ex.tokens[1:], ex.mask[1:], strict=True)]
    row = [tokens, positions, segments, targets]
    return Batch(*(torch.tensor([r], dtype=torch.long) for r in row))


def pack(examples: Sequence[Example], order: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of `examples` taken in `order`, grouped greedily into batches of at most `batch_tokens`
    inputs (an example longer than that is a batch of its own; load_examples cuts it to fit)."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens: need at least 1, got {batch_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = len(examples[i].tokens) - 1
        if n < 1:
            continue
        if current and used + n > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def epoch_plan(examples: Sequence[Example], batch_tokens: int, seed: int, epoch: int,
               shuffle: bool = True) -> list[list[int]]:
    """The batches of one epoch: a shuffle that depends only on (seed, epoch), so a resumed run
    replays the same order."""
    order = list(range(len(examples)))
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(examples), generator=g).tolist()
    return pack(examples, order, batch_tokens)
