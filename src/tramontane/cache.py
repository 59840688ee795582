"""The KV cache: a rolling buffer per sequence, and the per-step metadata that indexes it.

Each cached key is stored in slot `position % capacity` of its sequence's row, and the cache keeps the
absolute position held by every slot (-1 when empty). Masks are computed from those positions, so one
rule serves full attention, sliding windows, rows at different positions and rows reused for new requests:

    key at position p is visible to a query at position q  iff  0 <= p <= q  and  p > q - window

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

`PagedKVCache` (the server's engine) keeps the same positions-and-masks rule over a pool of fixed-size
blocks instead of one row per sequence: each sequence's block table lists its blocks, every position has
a slot of its own, and a `PagedBatch` of block tables is passed to `forward` in place of a `KVCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .args import ModelArgs

if TYPE_CHECKING:
    from .kernels import Kernels


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
    """What every layer needs to read and write the cache for one forward call (computed once per call).

    `rows` selects the cache rows of the batch (None: rows 0..B-1). In decode mode (one token per
    sequence) keys are written before attention; otherwise after, see the module docstring.
    """

    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, 1, T, K] bool, True = visible; None with is_causal (decode: see attention_mask)
    is_causal: bool
    cache: KVCache | None = None
    rows: torch.Tensor | None = None
    batch_index: torch.Tensor | None = None  # [B, 1] cache row of each sequence
    slots: torch.Tensor | None = None  # [B, T'] slots written (T' = min(T, capacity))
    decode: bool = False
    fresh: bool = False  # a chunk into empty rows: nothing old to attend to
    kv_len: int = 0  # decode: only slots [0, kv_len) can hold anything yet
    rot: torch.Tensor | None = None  # decode: (cos, sin) per rotary pair [B, head_dim // 2, 2], for fused kernels
    # the native decode attention the step backend chose for this step (with `view` and `rot`), else None
    fused: Kernels | None = None
    view: DecodeView | None = None  # decode: where the native decode attention reads and writes
    # decode: the mask's inputs, for `attention_mask` (the native kernels build their own from the cache)
    key_positions: torch.Tensor | None = None  # [B, kv_len]
    window: int | None = None
    # packed training row (B = 1): [start, end) of each sequence, each causal from position 0 on its own
    spans: tuple[tuple[int, int], ...] | None = None

    def attention_mask(self) -> torch.Tensor | None:
        """`mask`, built on first use in a decode step: after a decode step's weights have streamed
        through the caches, each PyTorch operation costs tens of microseconds, and the native path
        never needs the mask."""
        if self.mask is None and self.key_positions is not None:
            self.mask = _visible(self.key_positions, self.positions, self.window)
        return self.mask

    def layer_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's `k`, `v` [B, kv_heads, T, head_dim] and return the keys/values to attend to."""
        cache = self.cache
        if cache is None:
            return k, v
        assert self.batch_index is not None and self.slots is not None
        ck, cv = cache.k[layer], cache.v[layer]
        written = self.slots.shape[1]
        if self.decode:
            _write(ck, cv, self.batch_index, self.slots, k, v)
            if self.rows is None:
                return ck[: k.shape[0], :, : self.kv_len], cv[: k.shape[0], :, : self.kv_len]
            return (ck.index_select(0, self.rows)[:, :, : self.kv_len],
                    cv.index_select(0, self.rows)[:, :, : self.kv_len])
        if self.fresh:
            keys, values = k, v
        elif self.rows is None:
            keys = torch.cat([ck[: k.shape[0]], k], dim=2)  # [B, kv_heads, capacity + T, head_dim]
            values = torch.cat([cv[: k.shape[0]], v], dim=2)
        else:
            keys = torch.cat([ck.index_select(0, self.rows), k], dim=2)
            values = torch.cat([cv.index_select(0, self.rows), v], dim=2)
        _write(ck, cv, self.batch_index, self.slots, k[:, :, -written:], v[:, :, -written:])
        return keys, values

    def commit(self) -> None:
        """After a chunk: record which positions now sit in which slots."""
        if self.cache is None or self.decode:
            return
        assert self.batch_index is not None and self.slots is not None
        written = self.slots.shape[1]
        self.cache.positions[self.batch_index, self.slots] = self.positions[:, -written:]


def _write(ck: torch.Tensor, cv: torch.Tensor, batch_index: torch.Tensor, slots: torch.Tensor,
           k: torch.Tensor, v: torch.Tensor) -> None:
    # ck[b, :, slot] for index tensors [B, T] selects [B, T, kv_heads, head_dim]
    ck[batch_index, :, slots] = k.transpose(1, 2)
    cv[batch_index, :, slots] = v.transpose(1, 2)


def _visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, K] mask from key positions [B, K] and query positions [B, T]."""
    kp = key_pos[:, None, None, :]
    qp = query_pos[:, None, :, None]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    return mask


def _causal_spans(positions: torch.Tensor, segments: torch.Tensor, window: int | None) -> tuple[tuple[int, int], ...] | None:
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


def step_meta(
    positions: torch.Tensor,
    window: int | None,
    cache: KVCache | PagedBatch | None = None,
    rows: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    flat: bool = False,
) -> StepMeta:
    """Build the metadata for one forward call of tokens at `positions` [B, T].

    With `flat` (the caller runs the native stack, which takes every token as a row of its own) a chunk
    of T > 1 tokens gets a `DecodeView` too, where its keys can all be written first: always in a paged
    pool, in a contiguous cache when the chunk does not wrap around the rolling buffer.

    `segments` [B, T] (packed training rows, no cache): keys are visible only to queries of the same
    segment, on top of the positions rule. Example, two sequences packed in one row:
        positions 0 1 2 0 1, segments 0 0 0 1 1: the query at index 3 (position 0 of the second
        sequence) sees only itself, although keys 0..2 hold positions <= 0..2.
    """
    B, T = positions.shape
    if segments is not None:
        if cache is not None:
            raise ValueError("segments pack sequences for a forward without a cache; a cache row holds one sequence")
        if (spans := _causal_spans(positions, segments, window)) is not None:
            return StepMeta(positions, None, True, spans=spans)
        mask = _visible(positions, positions, window) & (segments[:, None, :, None] == segments[:, None, None, :])
        return StepMeta(positions, mask, False)
    if isinstance(cache, PagedBatch):
        if rows is not None:
            raise ValueError("rows do not apply to a paged cache: its block tables say where each sequence is")
        return _paged_meta(positions, window, cache, flat)
    if cache is None:
        if rows is not None:
            raise ValueError("rows only make sense with a cache")
        causal_ok = window is None or T <= window
        if causal_ok and bool((positions == torch.arange(T, device=positions.device)).all()):
            return StepMeta(positions, None, True)
        return StepMeta(positions, _visible(positions, positions, window), False)

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
        return StepMeta(positions, None, False, cache, rows, batch_index, slots, decode=T == 1, kv_len=kv_len,
                        key_positions=key_positions, window=window, view=view)
    old_positions = cache.positions[:B] if rows is None else cache.positions[rows]  # [B, capacity]
    if int(old_positions.max()) < 0:  # empty rows (a prompt's first chunk): attend within the chunk only
        return StepMeta(positions, _visible(positions, positions, window), False, cache, rows, batch_index,
                        slots, fresh=True)
    mask = _visible(torch.cat([old_positions, positions], dim=1), positions, window)
    return StepMeta(positions, mask, False, cache, rows, batch_index, slots)


KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


class PagedKVCache:
    """Keys and values of many sequences in one pool of fixed-size blocks (paged attention).

    `k` and `v` are [n_layers, n_blocks, n_kv_heads, block_size, head_dim]; `positions` is
    [n_blocks, block_size], the absolute position held by each slot (-1 for empty). A sequence owns a
    list of blocks (its block table, handed out by `engine.blocks.BlockManager`): position p sits in
    slot p % block_size of the table's block for p // block_size. Masks come from the stored positions
    with the rule of the module docstring, so blocks that left a sliding window can be dropped from the
    front of a table, and blocks holding a shared prompt prefix can sit in several tables at once.

    In int8, every stored vector (one head's key or value at one position, `head_dim` values) has its
    own float32 scale, `k_scale`, `v_scale` [n_layers, n_blocks, n_kv_heads, block_size]: x is kept as
    round(x * 127 / max|x|), as GGUF's Q8_0 keeps blocks of 32 weights. Vectors are written once and
    never rescaled, so nothing drifts as a block fills up.

    Block 0 is never handed out: it pads block tables and always reads as empty. The pool is allocated
    with `torch.empty` and a block is zeroed when it is handed out (`clear`), so the memory pages a
    large pool reserves are only committed as blocks come into use.

    Example:
        >>> pool = PagedKVCache.create(args, n_blocks=1024, block_size=16)
        >>> pool.clear([1, 2])
        >>> logits = model(tokens, positions, cache=pool.batch([[1, 2]], [0]))
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        if (k.dtype == torch.int8) != (k_scale is not None) or (k_scale is None) != (v_scale is None):
            raise ValueError("an int8 pool needs k_scale and v_scale, and only an int8 pool has them")
        self.k = k
        self.v = v
        self.positions = positions
        self.window = window
        self.k_scale = k_scale
        self.v_scale = v_scale

    @classmethod
    def create(
        cls,
        args: ModelArgs,
        n_blocks: int,
        block_size: int = 16,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """Reserve a pool of `n_blocks` blocks (block 0 included) of `block_size` positions, stored in `dtype`
        (float32, bfloat16, float16, or int8 with a scale per vector)."""
        if n_blocks < 2 or block_size < 1:
            raise ValueError(f"n_blocks must be >= 2 and block_size >= 1, got {n_blocks} and {block_size}")
        if dtype not in KV_DTYPES:
            raise ValueError(f"dtype: a KV pool is stored in one of {', '.join(map(str, KV_DTYPES))}, not {dtype}")
        shape = cls.shape(args, n_blocks, block_size)
        k = torch.empty(shape, dtype=dtype, device=device)
        v = torch.empty(shape, dtype=dtype, device=device)
        scales = (torch.empty(shape[:-1], device=device), torch.empty(shape[:-1], device=device)) \
            if dtype == torch.int8 else (None, None)
        positions = torch.empty((n_blocks, block_size), dtype=torch.long, device=device)
        pool = cls(k, v, positions, args.sliding_window, *scales)
        pool.clear([0])
        return pool

    @staticmethod
    def shape(args: ModelArgs, n_blocks: int, block_size: int) -> tuple[int, ...]:
        """The shape of the key (and of the value) pool: [layers, blocks, kv_heads, block_size, head_dim]."""
        return (args.n_layers, n_blocks, args.n_kv_heads, block_size, args.head_dim)

    @classmethod
    def pool_nbytes(cls, args: ModelArgs, n_blocks: int, block_size: int, dtype: torch.dtype) -> int:
        """What `create` would reserve, before reserving it: keys, values (and their fp32 scales, one per
        stored vector, in int8), and positions."""
        shape = cls.shape(args, n_blocks, block_size)
        scales = 2 * math.prod(shape[:-1]) * 4 if dtype == torch.int8 else 0
        return 2 * math.prod(shape) * dtype.itemsize + scales + n_blocks * block_size * 8

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def block_nbytes(self) -> int:
        """Bytes of one block: keys, values, their scales (int8) and positions."""
        return sum(t[:, 0].nbytes for t in self._tensors()) + self.positions[0].nbytes

    def nbytes(self) -> int:
        """Bytes the whole pool reserves (committed only as blocks come into use)."""
        return sum(t.nbytes for t in self._tensors()) + self.positions.nbytes

    def clear(self, blocks: list[int]) -> None:
        """Empty `blocks` (new to a sequence): zero keys and values, forget positions."""
        if not blocks:
            return
        index = torch.tensor(blocks, device=self.k.device)
        for t in self._tensors():
            t[:, index] = 0
        self.positions[index] = -1

    def batch(self, tables: list[list[int]], first_blocks: list[int]) -> PagedBatch:
        """The view one forward call reads and writes: row b's block table `tables[b]`, whose first entry
        holds the positions of logical block `first_blocks[b]` (0 unless earlier blocks left the window)."""
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        device = self.k.device
        return PagedBatch(self, torch.tensor(padded, device=device), torch.tensor(first_blocks, device=device))

    def store(self, layer: int, block_index: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write keys and values [B, T, kv_heads, head_dim] of layer `layer` at blocks and offsets [B, T]."""
        for data, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            # data[layer][block, :, offset] for index tensors [B, T] selects [B, T, kv_heads, head_dim]
            if scale is None:
                data[layer][block_index, :, offsets] = x.to(data.dtype)
            else:
                q, s = quantize_vectors(x)
                data[layer][block_index, :, offsets] = q
                scale[layer][block_index, :, offsets] = s

    def read(self, layer: int, tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer `layer` through block tables [B, W]: [B, kv_heads, W * S, head_dim]."""
        out = []
        for data, scale in ((self.k, self.k_scale), (self.v, self.v_scale)):
            x = data[layer][tables]  # [B, W, kv_heads, S, head_dim]
            x = x.to(dtype) if scale is None else x.to(dtype) * scale[layer][tables][..., None].to(dtype)
            B, W, kv_heads, S, D = x.shape
            out.append(x.transpose(1, 2).reshape(B, kv_heads, W * S, D))  # -> [B, kv_heads, W * S, D]
        return out[0], out[1]


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales [...] of vectors x [..., D], as the native decode attention stores
    them: q = round(x * 127 / max|x|), scale = max|x| / 127."""
    x = x.float()
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv[..., None]).to(torch.int8), amax / 127.0


@dataclass
class PagedBatch:
    """Block tables [B, width] (padded with block 0) of the B sequences of one forward call, and the
    logical block index of each table's first entry [B]. Pass it to `Transformer.forward` as `cache`."""

    pool: PagedKVCache
    tables: torch.Tensor
    first_blocks: torch.Tensor


@dataclass
class PagedStepMeta(StepMeta):
    """StepMeta over a paged pool. Every position has a slot of its own (nothing is ever overwritten),
    so each layer writes this step's keys first and then attends to its sequence's blocks, for a decode
    step and a prompt chunk alike. A decode step carries a `DecodeView` of the pool for the native
    decode attention, which reads the block tables directly; the torch path here gathers the blocks."""

    paged: PagedBatch | None = None
    # the tables' blocks up to the last position of this step, which is all the torch path reads: blocks
    # further on (the rest of a prompt being prefilled) hold nothing yet
    reach: torch.Tensor | None = None  # [B, W'] with W' <= W
    block_index: torch.Tensor | None = None  # [B, T] pool block of each new position
    offsets: torch.Tensor | None = None  # [B, T] its slot within the block

    def layer_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.paged is not None and self.block_index is not None and self.offsets is not None
        pool = self.paged.pool
        pool.store(layer, self.block_index, self.offsets, k.transpose(1, 2), v.transpose(1, 2))
        assert self.reach is not None
        return pool.read(layer, self.reach, k.dtype)

    def attention_mask(self) -> torch.Tensor | None:
        """Built on first use: the native decode path never needs it."""
        if self.mask is None:
            assert self.paged is not None and self.reach is not None
            B = self.positions.shape[0]
            key_positions = self.paged.pool.positions[self.reach].view(B, -1)  # [B, width * size]
            self.mask = _visible(key_positions, self.positions, self.window)
        return self.mask

    def commit(self) -> None:
        """Positions were recorded when the step was planned (keys are written before attention)."""


def _paged_meta(positions: torch.Tensor, window: int | None, paged: PagedBatch, flat: bool) -> PagedStepMeta:
    pool = paged.pool
    B, T = positions.shape
    if paged.tables.shape[0] != B:
        raise ValueError(f"a batch of {B} sequences needs {B} block tables, got {paged.tables.shape[0]}")
    size = pool.block_size
    logical = positions // size - paged.first_blocks[:, None]  # [B, T] index into each table
    if int(logical.min()) < 0 or int(logical.max()) >= paged.tables.shape[1]:
        raise ValueError("positions fall outside the blocks of their block tables")
    block_index = paged.tables.gather(1, logical)
    offsets = positions % size
    pool.positions[block_index, offsets] = positions
    view = None
    if T == 1 or flat:
        view = DecodeView(pool.k, pool.v, pool.k_scale, pool.v_scale, paged.tables.repeat_interleave(T, 0),
                          pool.positions, (block_index * size + offsets).view(-1), size, window or 0)
    reach = paged.tables[:, : int(logical.max()) + 1]
    return PagedStepMeta(positions, None, False, decode=T == 1, window=window, view=view, paged=paged,
                         block_index=block_index, offsets=offsets, reach=reach)
