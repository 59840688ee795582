"""KV caches and the per-step metadata that indexes them.

Two caches, one protocol (`meta.StepMeta`: `layer_kv`, `attention_mask`, `commit`), each in its file:
- `rolling.KVCache`: a buffer of `capacity` slots per sequence (slot = position % capacity), which a
  sliding window rolls over; `Transformer.forward(tokens, positions, cache=KVCache)`.
- `paged.PagedKVCache`: a pool of fixed-size blocks and block tables (`PagedBatch`), what the engine runs
  every generation on (`generate.stream` included).
Training's packed rows (`packed`) have metadata of their own, without a cache.

`step_meta` builds the metadata of one step for whichever cache it is given.
"""

from __future__ import annotations

import torch

from .meta import KV_DTYPES, DecodeView, StepMeta, uncached_meta, visible
from .packed import packed_meta
from .paged import PagedBatch, PagedKVCache, PagedStepMeta, paged_meta, quantize_vectors
from .rolling import KVCache, RollingStepMeta, rolling_meta

__all__ = ["KV_DTYPES", "DecodeView", "KVCache", "PagedBatch", "PagedKVCache", "PagedStepMeta", "RollingStepMeta",
           "StepMeta", "quantize_vectors", "step_meta", "visible"]


def step_meta(
    positions: torch.Tensor,
    window: int | None,
    cache: KVCache | PagedBatch | None = None,
    rows: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    flat: bool = False,
) -> StepMeta:
    """Build the metadata for one forward call of tokens at `positions` [B, T] over `cache` (None: none).

    With `flat` (the caller runs the native stack, which takes every token as a row of its own) a chunk
    of T > 1 tokens gets a `DecodeView` too, where its keys can all be written first: always in a paged
    pool, in a contiguous cache when the chunk does not wrap around the rolling buffer. `segments` [B, T]
    pack several sequences per row (training; no cache): see `packed`.
    """
    if segments is not None:
        if cache is not None:
            raise ValueError("segments pack sequences for a forward without a cache; a cache row holds one sequence")
        return packed_meta(positions, segments, window)
    if isinstance(cache, PagedBatch):
        if rows is not None:
            raise ValueError("rows do not apply to a paged cache: its block tables say where each sequence is")
        return paged_meta(positions, window, cache, flat)
    if cache is None:
        if rows is not None:
            raise ValueError("rows only make sense with a cache")
        return uncached_meta(positions, window)
    return rolling_meta(positions, window, cache, rows, flat)
