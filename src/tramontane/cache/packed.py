"""Training's packed rows: several sequences in one row of a batch, none seeing another (no cache).

`segments` [B, T] name each token's sequence: keys are visible only to queries of the same segment, on
top of the positions rule. Example, two sequences packed in one row:
    positions 0 1 2 0 1, segments 0 0 0 1 1: the query at index 3 (position 0 of the second sequence)
    sees only itself, although keys 0..2 hold positions <= 0..2.
"""

from __future__ import annotations

import torch

from .meta import StepMeta, visible


def packed_meta(positions: torch.Tensor, segments: torch.Tensor, window: int | None) -> StepMeta:
    """The step of packed rows: spans of plain causal attention where each sequence is one (`spans`),
    else a mask."""
    if (spans := causal_spans(positions, segments, window)) is not None:
        return StepMeta(positions, None, True, spans=spans)
    mask = visible(positions, positions, window) & (segments[:, None, :, None] == segments[:, None, None, :])
    return StepMeta(positions, mask, False)


def causal_spans(positions: torch.Tensor, segments: torch.Tensor, window: int | None) -> tuple[tuple[int, int], ...] | None:
    """The sequences of a packed row as [start, end) spans when each one is plain causal attention on its
    own (one row; each a run of one segment id at positions 0, 1, ... no longer than the window), so
    attention skips the blocks between sequences that a mask would compute and throw away; else None."""
    if positions.shape[0] != 1:
        return None
    pos, ids = positions[0].tolist(), segments[0].tolist()
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    spans = tuple(zip(starts, [*starts[1:], len(ids)], strict=True))
    if len({ids[s] for s in starts}) < len(starts):  # an id in two runs: those runs see each other
        return None
    for s, e in spans:
        if pos[s:e] != list(range(e - s)) or (window is not None and e - s > window):
            return None
    return spans
