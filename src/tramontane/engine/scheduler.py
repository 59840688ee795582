"""The scheduler: which sequences run in the next step, on which KV blocks; it decides, the runner executes.

Each step the scheduler returns a `Plan`: the prompt chunks to prefill and the sequences to decode one
token each, with the blocks that are new to them (to be zeroed before the step). It works on token ids
and block ids only, so it is tested without a model.

A sequence's tokens are its prompt plus what it has generated; `computed` of them have keys and values
in the cache, and the next step feeds `tokens[computed:]` (a chunk of them while prefilling, the last
sampled token while decoding). Rules:
  - admission, first come first served, while fewer than `max_batch` run and the free blocks hold the
    whole prompt (after the prefix-cache hit); otherwise the queue waits;
  - a decoding sequence that needs one more block takes it; when none is left, the sequence admitted
    last is preempted: its blocks are released and it goes back to the head of the queue, to be
    recomputed (prompt and tokens so far) when blocks free up. Nothing that fits the context fails;
  - blocks that fell out of a sliding window are released as the sequence moves on;
  - a step prefills up to `chunk_size` prompt tokens, taken from the prefilling sequences in admission
    order: several short prompts that arrive together start in one step instead of one step each (each
    step also decodes every running sequence, so under load a prompt's first token waited for as many
    decode steps as there were prompts ahead of it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .kv_blocks import BlockManager


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of one request. `owner` is the engine's, untouched here."""

    tokens: list[int]
    owner: Any = None
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    first_block: int = 0  # logical index of blocks[0] (> 0 once blocks left a sliding window)
    cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission (-1: not admitted)
    preemptions: int = 0
    adapter: int = 0  # its LoRA adapter: KV of the same tokens differs per adapter, so prefixes are shared within one
    draft: list[int] = field(default_factory=list)  # tokens proposed to follow `tokens`, checked in the next step
    _chain: list[int] = field(default_factory=list)  # prefix key id of each registered full block

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.tokens) - 1


@dataclass
class Chunk:
    """Feed `seq.tokens[start:start + length]`; `last` when it ends the prompt (its logits are sampled)."""

    seq: Sequence
    start: int
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length == len(self.seq.tokens)


@dataclass
class Plan:
    """A step: prompt chunks (of different sequences), the sequences decoding one token, and those (`verify`)
    whose last token runs with their drafts, which the engine moves out of `decode` after drafting."""

    prefills: list[Chunk]
    decode: list[Sequence]
    new_blocks: list[int]
    preempted: list[Sequence]
    verify: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decode and not self.verify


class Scheduler:
    """Admission, block tables, preemption and sliding-window release over one `BlockManager`."""

    def __init__(self, blocks: BlockManager, *, max_batch: int, chunk_size: int, window: int | None = None) -> None:
        if max_batch < 1 or chunk_size < 1:
            raise ValueError(f"max_batch and chunk_size must be >= 1, got {max_batch} and {chunk_size}")
        self.blocks = blocks
        self.max_batch = max_batch
        self.chunk_size = chunk_size
        self.window = window
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Plan:
        new: list[int] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq in preempted or seq.prefilling:
                continue
            while self._needs_block(seq) and seq not in preempted:
                if self.blocks.available == 0:
                    preempted.append(self._preempt())
                else:
                    block = self.blocks.allocate()
                    seq.blocks.append(block)
                    new.append(block)
        self._admit(new)
        chunks: list[Chunk] = []
        budget = self.chunk_size
        for seq in self.running:
            if seq.prefilling and budget > 0:
                chunks.append(Chunk(seq, seq.computed, min(budget, len(seq.tokens) - seq.computed)))
                budget -= chunks[-1].length
        decode = [s for s in self.running if not s.prefilling]
        return Plan(chunks, decode, new, preempted)

    def advance(self, seq: Sequence, fed: int) -> None:
        """The runner has written `fed` more tokens of `seq` into its blocks."""
        seq.computed += fed
        size = self.blocks.block_size
        # full blocks become prefix-cache entries, before a window can release them (their keys and values
        # depend only on the tokens from position 0, window or not)
        while len(seq._chain) < seq.computed // size:
            i = len(seq._chain)
            parent = seq._chain[-1] if seq._chain else -seq.adapter  # each adapter's prefixes have their own root
            block = seq.blocks[i - seq.first_block]
            seq._chain.append(self.blocks.register(block, parent, seq.tokens[i * size : (i + 1) * size]))
        if self.window is not None:
            # the next query sits at position `computed`; it sees positions > computed - window
            gone = (seq.computed - self.window + 1) // size - seq.first_block
            if gone > 0:
                self.blocks.release(seq.blocks[:gone])
                del seq.blocks[:gone]
                seq.first_block += gone

    def reserve(self, seq: Sequence, extra: int) -> list[int] | None:
        """Blocks for `extra` positions past `seq.tokens` (a decoding sequence's drafts), taken only from free
        blocks, never by preempting: the new blocks (to be zeroed before the step), or None when there are
        too few."""
        need = -(-(len(seq.tokens) + extra) // self.blocks.block_size) - seq.first_block - len(seq.blocks)
        fresh = self.blocks.take(need)
        if fresh is not None:
            seq.blocks.extend(fresh)
        return fresh

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past those `seq.tokens` needs (what rejected drafts were written into)."""
        keep = -(-len(seq.tokens) // self.blocks.block_size) - seq.first_block
        if len(seq.blocks) > keep:
            self.blocks.release(seq.blocks[keep:])
            del seq.blocks[keep:]

    def finish(self, seq: Sequence) -> None:
        """`seq` is done (finished, cancelled, failed): release its blocks, waiting or running."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []

    def _needs_block(self, seq: Sequence) -> bool:
        """Whether the tokens to feed next (all of `seq.tokens`) reach past its blocks."""
        return len(seq.tokens) > (seq.first_block + len(seq.blocks)) * self.blocks.block_size

    def _preempt(self) -> Sequence:
        victim = self.running.pop()
        self.blocks.release(victim.blocks)
        victim.blocks, victim.first_block, victim.computed, victim._chain = [], 0, 0, []
        victim.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def _admit(self, new: list[int]) -> None:
        size = self.blocks.block_size
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            hit = self.blocks.match(seq.tokens, root=-seq.adapter)
            needed = -(-len(seq.tokens) // size) - len(hit)
            if self.blocks.available - self.blocks.idle(hit) < needed:
                return
            self.waiting.popleft()
            self.blocks.acquire(hit)
            fresh = [self.blocks.allocate() for _ in range(needed)]
            new.extend(fresh)
            seq.blocks = hit + fresh
            seq.computed = len(hit) * size
            if seq.cached_tokens < 0:
                seq.cached_tokens = seq.computed
            self.advance(seq, 0)  # the hit's blocks start the prefix chain
            self.running.append(seq)
