"""The rolling KV cache: a buffer of `capacity` slots per sequence, and the steps over it.

Each cached key is stored in slot `position % capacity` of its sequence's row, and the cache keeps the
absolute position held by every slot (-1 when empty). Masks are computed from those positions (the
rule of `meta.visible`), so one rule serves full attention, sliding windows, rows at different
positions and rows reused for new requests.

Worked example, window W = capacity = 4, one sequence:
    prefill positions 0..5 (one chunk of 6): queries attend to [empty cache (4 slots)] + [6 new keys];
        afterwards only the last 4 keys are kept: slots (4%4, 5%4, 2%4, 3%4) = (0, 1, 2, 3) hold
        positions (4, 5, 2, 3).
    decode position 6: its key is written first, into slot 6 % 4 = 2, overwriting position 2, which
        lies outside the window (2 <= 6 - 4). The query then sees slots holding 4, 5, 6, 3: all visible.
A chunk of several tokens cannot write first (a later key could overwrite one that an earlier query of
the same chunk still needs), so it attends to [cache] + [chunk] and writes afterwards: its score matrix
is chunk x (capacity + chunk), never T x T for a long prompt.

When there is no sliding window (or the capacity is smaller than the window), nothing may be overwritten:
positions must stay below the capacity, and `KVCache.check` raises if they do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..args import ModelArgs
from .meta import DecodeView, StepMeta, visible, within_chunk


class KVCache:
    """Keys and values of `batch_size` sequences, each with room for `capacity` positions.

    Create it with `KVCache.create` and pass it to `Transformer.forward` together with positions.
    `k` and `v` are [n_layers, batch_size, n_kv_heads, capacity, head_dim]; `positions` is
    [batch_size, capacity] holding the absolute position stored in each slot (-1 for empty).

    Example:
        >>> cache = KVCache.create(args, batch_size=2, capacity=4096)
        >>> logits = model(tokens, positions, cache=cache)
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None) -> None:
        self.k = k
        self.v = v
        self.positions = positions
        self.window = window

    @classmethod
    def create(
        cls,
        args: ModelArgs,
        batch_size: int,
        capacity: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Allocate a cache. `capacity` defaults to the sliding window, the most a window model ever needs."""
        if capacity is None:
            capacity = args.sliding_window
        if capacity is None:
            raise ValueError("capacity is required for a model without a sliding window")
        if args.sliding_window is not None:
            capacity = min(capacity, args.sliding_window)
        if capacity < 1 or batch_size < 1:
            raise ValueError(f"capacity and batch_size must be positive, got {capacity} and {batch_size}")
        shape = (args.n_layers, batch_size, args.n_kv_heads, capacity, args.head_dim)
        k = torch.zeros(shape, dtype=dtype, device=device)
        v = torch.zeros(shape, dtype=dtype, device=device)
        positions = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        return cls(k, v, positions, args.sliding_window)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def rolling(self) -> bool:
        """True when old positions may be overwritten: the buffer holds a whole sliding window."""
        return self.window is not None and self.capacity >= self.window

    def check(self, last_position: int) -> None:
        """Raise if a position would not fit in a cache that cannot roll."""
        if not self.rolling and last_position >= self.capacity:
            raise ValueError(
                f"position {last_position} does not fit in a KV cache of capacity {self.capacity} "
                "(the model has no sliding window to roll over); create a larger cache"
            )

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget what `rows` hold (all rows when None) so they can serve new sequences."""
        if rows is None:
            self.positions.fill_(-1)
        else:
            self.positions[rows] = -1

    def keep(self, rows: torch.Tensor) -> None:
        """Move `rows` to the front (rows 0..len(rows)-1), e.g. to drop finished sequences from a batch."""
        n = rows.numel()
        self.k[:, :n] = self.k[:, rows]
        self.v[:, :n] = self.v[:, rows]
        self.positions[:n] = self.positions[rows]
        self.positions[n:] = -1

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` onto row `dst` and empty `src`."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.positions[dst] = self.positions[src]
        self.positions[src] = -1

    def swap_rows(self, a: int, b: int) -> None:
        idx = torch.tensor([b, a], device=self.k.device)
        self.k[:, [a, b]] = self.k[:, idx]
        self.v[:, [a, b]] = self.v[:, idx]
        self.positions[[a, b]] = self.positions[idx]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.positions.nbytes


@dataclass
class RollingStepMeta(StepMeta):
    """A step over a `KVCache`. `rows` selects the cache rows of the batch (None: rows 0..B-1). A decode
    step (one token per sequence) writes its keys before attention; a chunk after (module docstring)."""

    cache: KVCache | None = None
    rows: torch.Tensor | None = None
    batch_index: torch.Tensor | None = None  # [B, 1] cache row of each sequence
    slots: torch.Tensor | None = None  # [B, T'] slots written (T' = min(T, capacity))
    fresh: bool = False  # a chunk into empty rows: nothing old to attend to
    kv_len: int = 0  # decode: only slots [0, kv_len) can hold anything yet
    # decode: the mask's inputs, for `attention_mask` (the native kernels build their own from the cache)
    key_positions: torch.Tensor | None = None  # [B, kv_len]

    def attention_mask(self) -> torch.Tensor | None:
        """`mask`, built on first use in a decode step: after a decode step's weights have streamed
        through the caches, each PyTorch operation costs tens of microseconds, and the native path
        never needs the mask."""
        if self.mask is None and self.key_positions is not None:
            self.mask = visible(self.key_positions, self.positions, self.window)
        return self.mask

    def layer_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        assert cache is not None and self.batch_index is not None and self.slots is not None
        ck, cv = cache.k[layer], cache.v[layer]
        written = self.slots.shape[1]
        if self.decode:
            _write(ck, cv, self.batch_index, self.slots, k, v)
            if self.rows is None:
                return ck[: k.shape[0], :, : self.kv_len].to(k.dtype), cv[: k.shape[0], :, : self.kv_len].to(v.dtype)
            return (ck.index_select(0, self.rows)[:, :, : self.kv_len].to(k.dtype),
                    cv.index_select(0, self.rows)[:, :, : self.kv_len].to(v.dtype))
        if self.fresh:
            keys, values = k, v
        elif self.rows is None:
            keys = torch.cat([ck[: k.shape[0]].to(k.dtype), k], dim=2)  # [B, kv_heads, capacity + T, head_dim]
            values = torch.cat([cv[: k.shape[0]].to(v.dtype), v], dim=2)
        else:
            keys = torch.cat([ck.index_select(0, self.rows).to(k.dtype), k], dim=2)
            values = torch.cat([cv.index_select(0, self.rows).to(v.dtype), v], dim=2)
        _write(ck, cv, self.batch_index, self.slots, k[:, :, -written:], v[:, :, -written:])
        return keys, values

    def commit(self) -> None:
        if self.cache is None or self.decode:
            return
        assert self.batch_index is not None and self.slots is not None
        written = self.slots.shape[1]
        self.cache.positions[self.batch_index, self.slots] = self.positions[:, -written:]


def _write(ck: torch.Tensor, cv: torch.Tensor, batch_index: torch.Tensor, slots: torch.Tensor,
           k: torch.Tensor, v: torch.Tensor) -> None:
    # ck[b, :, slot] for index tensors [B, T] selects [B, T, kv_heads, head_dim]; a cache may store another
    # dtype than the model computes in (bf16 keys of an fp32 model): stored rounded, read back widened
    ck[batch_index, :, slots] = k.transpose(1, 2).to(ck.dtype)
    cv[batch_index, :, slots] = v.transpose(1, 2).to(cv.dtype)


def rolling_meta(positions: torch.Tensor, window: int | None, cache: KVCache, rows: torch.Tensor | None,
                 flat: bool) -> RollingStepMeta:
    """The step of tokens at `positions` [B, T] over `cache` (rows `rows`); with `flat`, a chunk that does
    not wrap around the buffer gets a `DecodeView`, its keys all written first (`step_meta`)."""
    B, T = positions.shape
    if rows is None:
        if B > cache.batch_size:
            raise ValueError(f"batch of {B} sequences does not fit in a cache of {cache.batch_size} rows")
        batch_index = torch.arange(B, device=positions.device)[:, None]
    else:
        if rows.shape != (B,):
            raise ValueError(f"rows must have shape ({B},), got {tuple(rows.shape)}")
        batch_index = rows[:, None]
    last = int(positions.max())
    cache.check(last)
    written = min(T, cache.capacity)
    slots = positions[:, -written:] % cache.capacity  # [B, written]
    if T == 1 or (flat and last < cache.capacity):  # (a chunk past the capacity may overwrite keys it needs)
        cache.positions[batch_index, slots] = positions
        # Position p sits in slot p % capacity, so no slot at or past last + 1 is in use yet:
        # attention reads only what generation has filled, not the whole buffer.
        kv_len = min(cache.capacity, last + 1)
        key_positions = (cache.positions[:B] if rows is None else cache.positions[rows])[:, :kv_len]
        # one block per cache row: the table of sequence b is its row, its slot row * capacity + slot
        view = DecodeView(cache.k, cache.v, None, None, batch_index.repeat_interleave(T, 0), cache.positions,
                          (batch_index * cache.capacity + slots).view(-1), kv_len, window or 0)
        return RollingStepMeta(positions, None, False, decode=T == 1, window=window, view=view, cache=cache,
                               rows=rows, batch_index=batch_index, slots=slots, kv_len=kv_len,
                               key_positions=key_positions)
    old_positions = cache.positions[:B] if rows is None else cache.positions[rows]  # [B, capacity]
    if int(old_positions.max()) < 0:  # empty rows (a prompt's first chunk): attend within the chunk only
        return RollingStepMeta(positions, *within_chunk(positions, window), cache=cache, rows=rows,
                               batch_index=batch_index, slots=slots, fresh=True)
    mask = visible(torch.cat([old_positions, positions], dim=1), positions, window)
    return RollingStepMeta(positions, mask, False, cache=cache, rows=rows, batch_index=batch_index, slots=slots)
