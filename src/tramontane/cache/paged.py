"""The paged KV pool (the server's engine and `generate`): fixed-size blocks shared by every sequence,
each sequence's blocks listed in its block table, and the steps over it.

The rule of `meta.visible` holds here too: every position has a slot of its own, and masks come from
the positions the slots hold, so blocks can leave a sliding window and shared prompt prefixes can sit in
several tables at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..args import ModelArgs
from .meta import KV_DTYPES, DecodeView, StepMeta, visible


class PagedKVCache:
    """Keys and values of many sequences in one pool of fixed-size blocks (paged attention).

    `k` and `v` are [n_layers, n_blocks, n_kv_heads, block_size, head_dim]; `positions` is
    [n_blocks, block_size], the absolute position held by each slot (-1 for empty). A sequence owns a
    list of blocks (its block table, handed out by `engine.kv_blocks.BlockManager`): position p sits in
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
        assert self.reach is not None
        pool = self.paged.pool
        pool.store(layer, self.block_index, self.offsets, k.transpose(1, 2), v.transpose(1, 2))
        return pool.read(layer, self.reach, k.dtype)

    def attention_mask(self) -> torch.Tensor | None:
        """Built on first use: the native decode path never needs it."""
        if self.mask is None:
            assert self.paged is not None and self.reach is not None
            B = self.positions.shape[0]
            key_positions = self.paged.pool.positions[self.reach].view(B, -1)  # [B, width * size]
            self.mask = visible(key_positions, self.positions, self.window)
        return self.mask

    def commit(self) -> None:
        """Positions were recorded when the step was planned (keys are written before attention)."""


def paged_meta(positions: torch.Tensor, window: int | None, paged: PagedBatch, flat: bool) -> PagedStepMeta:
    """The step of tokens at `positions` [B, T] over the block tables of `paged`; their positions are
    recorded now (every position has a slot of its own). A decode step, or any step with `flat`, gets a
    `DecodeView` for the native kernels."""
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
