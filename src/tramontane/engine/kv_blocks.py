"""Which KV blocks are free, which sequences hold which, and which hold a reusable prompt prefix.

Pure bookkeeping over block ids (the tensors live in `cache.PagedKVCache`), so it is tested without a
model. Block 0 is the pool's padding block and is never handed out.

Prefix caching: a full block is identified by its tokens and the identity of the block before it, so
a chain of keys names "these exact tokens from position 0". A block that holds a registered key stays
valid after its last holder releases it: it goes into an LRU and is handed out again as a prefix hit,
or reused for new content (key forgotten) when the free list is empty. Keys compare the tokens
themselves, so two different prefixes can never be taken for one another.

Example:
    >>> blocks = BlockManager(n_blocks=64, block_size=16)
    >>> hit = blocks.match(prompt)            # cached full blocks of the prompt's prefix
    >>> blocks.acquire(hit); table = hit + [blocks.allocate() for _ in range(n - len(hit))]
    >>> blocks.release(table)                 # when the sequence finishes
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# A key is (parent key id, tokens); key id 0 is "nothing before position 0".
_Key = tuple[int, tuple[int, ...]]


class BlockManager:
    """Free list, reference counts and the prefix cache of a pool of `n_blocks` blocks."""

    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if n_blocks < 2 or block_size < 1:
            raise ValueError(f"n_blocks must be >= 2 and block_size >= 1, got {n_blocks} and {block_size}")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(n_blocks - 1, 0, -1))  # a stack: recently freed blocks are reused first
        self._refs = [0] * n_blocks
        self._ids: dict[_Key, int] = {}  # key -> key id
        self._block_of: dict[int, int] = {}  # key id -> block holding it
        self._key_of: dict[int, tuple[_Key, int]] = {}  # block -> its key and key id
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self._next_id = 1

    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out now (free ones and cached ones nobody holds)."""
        return len(self._free) + len(self._lru)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.n_blocks - 1 - self.available

    @property
    def cached(self) -> int:
        """Blocks holding a registered prefix (held or in the LRU)."""
        return len(self._key_of)

    def match(self, tokens: Sequence[int], root: int = 0) -> list[int]:
        """The cached blocks holding the longest run of full blocks of `tokens` from position 0,
        leaving at least the last token to compute (its logits are needed). `root` is the parent key of
        the first block (0; another for prefixes computed otherwise, e.g. under a LoRA adapter)."""
        if not self.prefix_caching:
            return []
        size = self.block_size
        hit: list[int] = []
        parent = root
        for i in range((len(tokens) - 1) // size):
            key_id = self._ids.get((parent, tuple(tokens[i * size : (i + 1) * size])))
            if key_id is None:
                break
            hit.append(self._block_of[key_id])
            parent = key_id
        return hit

    def idle(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` nobody holds (cached in the LRU, counted in `available`)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def acquire(self, blocks: Sequence[int]) -> None:
        """Hold `blocks` (from `match`) for one more sequence."""
        for b in blocks:
            if self._refs[b] == 0:
                self._lru.pop(b)
            self._refs[b] += 1

    def allocate(self) -> int:
        """A block for one sequence alone; its old content (if any) is forgotten. Raises when none is left."""
        if self._free:
            block = self._free.pop()
        elif self._lru:
            block, _ = self._lru.popitem(last=False)
            self._forget(block)
        else:
            raise RuntimeError("no KV block is free (check `available` before allocating)")
        self._refs[block] = 1
        return block

    def take(self, count: int) -> list[int] | None:
        """`count` blocks (none for count <= 0), each as `allocate` gives it, or None, taking nothing, when
        fewer are available: for what may be done without (speculative drafts)."""
        if count > self.available:
            return None
        return [self.allocate() for _ in range(max(count, 0))]

    def release(self, blocks: Sequence[int]) -> None:
        """One sequence lets go of `blocks`; blocks holding a prefix stay cached, the others are freed."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} released more often than held"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Record that full `block` holds `tokens` after the prefix named by key id `parent` (0 at the
        start); returns this prefix's key id, for the next block. When the same prefix is already cached
        elsewhere, that copy keeps the key and `block` stays private."""
        if not self.prefix_caching:
            return 0
        key = (parent, tuple(tokens))
        key_id = self._ids.get(key)
        if key_id is None and block not in self._key_of:
            key_id = self._next_id
            self._next_id += 1
            self._ids[key] = key_id
            self._block_of[key_id] = block
            self._key_of[block] = (key, key_id)
        return key_id or 0

    def _forget(self, block: int) -> None:
        key, key_id = self._key_of.pop(block)
        del self._ids[key]
        del self._block_of[key_id]
