"""The metadata of one step, which every layer reads: where this step's keys go, which keys each query
sees, and what a native kernel needs. `step_meta` (in the package) builds it for the cache at hand:
`StepMeta` itself without a cache, `RollingStepMeta` over a `KVCache`, `PagedStepMeta` over a paged
pool. Every kind answers the same three questions, the protocol the layers use:

    layer_kv(layer, k, v)  store this step's keys and values, return the keys and values to attend to
    attention_mask()       which of those keys each query sees ([B, 1, T, K] bool), None when causal
    commit()               after the blocks: record the positions this step wrote

Visibility has one rule, whatever the cache: the key at position p is visible to the query at
position q iff 0 <= p <= q and p > q - window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..kernels import Kernels

KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)  # what the native kernels store


@dataclass
class DecodeView:
    """What the native decode attention (kernels/attention.cpp) reads and writes in one decode step.

    The storage is a pool of blocks `k`, `v` [n_layers, n_blocks, n_kv_heads, S, head_dim] with the
    position held by every slot `key_pos` [n_blocks, S]; row b attends to the first `scan` slots of each
    block of its table `tables[b]` and writes its new key and value at flat slot `write[b]` (block * S +
    offset). A contiguous `KVCache` is one block per row (S = capacity, the table holding the row); a
    `PagedKVCache` is the general case. For an int8 pool, `k_scale`, `v_scale` [n_layers, n_blocks,
    n_kv_heads, S] hold one scale per stored vector.

    A row is one query: B sequences x T tokens are B * T rows (row b * T + t), all of them written
    before any attends, each query seeing the keys up to its own position. So a short prompt chunk runs
    as rows of a decode step (`step_meta(flat=True)`), wherever no key it writes takes the slot of a key
    that an earlier query of the chunk still sees.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    tables: torch.Tensor  # [B, W]
    key_pos: torch.Tensor  # [n_blocks, S]
    write: torch.Tensor  # [B]
    scan: int
    window: int  # 0: none

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Layer i's keys, values and their scales (None unless int8)."""
        ks, vs = self.k_scale, self.v_scale
        return self.k[i], self.v[i], None if ks is None else ks[i], None if vs is None else vs[i]


@dataclass
class StepMeta:
    """A step without a cache (a whole sequence, or training's packed rows): its keys are its own.

    The fields below `is_causal` are set by the cache kinds and the step backends that use them.
    """

    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, 1, T, K] bool, True = visible; None with is_causal (decode: see attention_mask)
    is_causal: bool
    decode: bool = False  # one token per sequence, its key written before attention
    window: int | None = None
    view: DecodeView | None = None  # where the native decode attention reads and writes (a flat step)
    rot: torch.Tensor | None = None  # (cos, sin) per rotary pair [B * T, head_dim // 2, 2], for fused kernels
    # the native decode attention the step backend chose for this step (with `view` and `rot`), else None
    fused: Kernels | None = None
    # packed training row (B = 1): [start, end) of each sequence, each causal from position 0 on its own
    spans: tuple[tuple[int, int], ...] | None = None

    def attention_mask(self) -> torch.Tensor | None:
        return self.mask

    def layer_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's `k`, `v` [B, kv_heads, T, head_dim] and return the keys/values to attend to."""
        return k, v

    def commit(self) -> None:
        """After the blocks: record which positions now sit in which slots."""


def visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, K] mask from key positions [B, K] and query positions [B, T] (-1: an empty slot)."""
    kp = key_pos[:, None, None, :]
    qp = query_pos[:, None, :, None]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    return mask


def within_chunk(positions: torch.Tensor, window: int | None) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) of a chunk that attends to itself alone: no mask but plain causal attention when
    every row's positions run on by one from a real one, within the window (SDPA then skips the scores
    above the diagonal: half a long prompt's attention), else the mask of `visible`."""
    T = positions.shape[1]
    if (window is None or T <= window) and bool((positions[:, 0] >= 0).all()) \
            and bool((positions.diff(dim=1) == 1).all()):
        return None, True
    return visible(positions, positions, window), False


def uncached_meta(positions: torch.Tensor, window: int | None) -> StepMeta:
    """A step without a cache: the chunk attends to itself."""
    return StepMeta(positions, *within_chunk(positions, window))
