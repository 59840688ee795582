"""The scheduler and block manager, on token and block ids alone (no model)."""

from __future__ import annotations

import pytest

from tramontane.engine.kv_blocks import BlockManager
from tramontane.engine.scheduler import Scheduler, Sequence


def step(s: Scheduler, next_token: int = 7, length: dict[int, int] | None = None) -> list[Sequence]:
    """Run one plan as the engine would: advance what was fed, append a token to each sequence that
    produced logits, finish those that reached `length[id(seq)]`. Returns the sequences finished."""
    plan = s.schedule()
    produced = []
    for chunk in plan.prefills:
        s.advance(chunk.seq, chunk.length)
        if chunk.last:
            produced.append(chunk.seq)
    for seq in plan.decode:
        s.advance(seq, 1)
        produced.append(seq)
    done = []
    for seq in produced:
        seq.tokens.append(next_token)
        if length is not None and len(seq.tokens) >= length[id(seq)]:
            s.finish(seq)
            done.append(seq)
    return done


def check_tables(s: Scheduler) -> None:
    """Each running sequence's blocks cover what it has computed; no block is held twice unless shared."""
    size = s.blocks.block_size
    for seq in s.running:
        assert (seq.first_block + len(seq.blocks)) * size >= seq.computed
    held = [b for seq in s.running for b in seq.blocks]
    assert 0 not in held
    assert s.blocks.used == len(set(held))


def test_admission_waits_for_blocks():
    blocks = BlockManager(n_blocks=1 + 4, block_size=4)
    s = Scheduler(blocks, max_batch=8, chunk_size=16)
    seqs = [Sequence(list(range(i * 10, i * 10 + 6))) for i in range(3)]  # 6 tokens: 2 blocks each
    for seq in seqs:
        s.add(seq)
    plan = s.schedule()
    assert s.running == seqs[:2] and list(s.waiting) == [seqs[2]]
    assert sorted(plan.new_blocks) == [1, 2, 3, 4]
    # both admitted prompts fit the step's 16 prompt tokens
    assert [(c.seq, c.start, c.length) for c in plan.prefills] == [(seqs[0], 0, 6), (seqs[1], 0, 6)]
    s.finish(seqs[0])
    s.schedule()
    assert s.running == [seqs[1], seqs[2]] and not s.waiting
    check_tables(s)


def test_max_batch_bounds_running():
    s = Scheduler(BlockManager(64, 4), max_batch=2, chunk_size=4)
    for i in range(5):
        s.add(Sequence([i, i + 1]))
    s.schedule()
    assert len(s.running) == 2 and len(s.waiting) == 3


def test_prefill_in_chunks_then_decode():
    s = Scheduler(BlockManager(64, 4), max_batch=4, chunk_size=4)
    seq = Sequence(list(range(10)))
    s.add(seq)
    chunks = []
    for _ in range(3):
        plan = s.schedule()
        assert len(plan.prefills) == 1 and not plan.decode
        chunk = plan.prefills[0]
        chunks.append((chunk.start, chunk.length, chunk.last))
        step(s) if chunk.last else s.advance(seq, chunk.length)
    assert chunks == [(0, 4, False), (4, 4, False), (8, 2, True)]
    plan = s.schedule()
    assert not plan.prefills and plan.decode == [seq] and seq.computed == 10 and len(seq.tokens) == 11


def test_prompts_share_a_step_up_to_the_chunk_size():
    """Prompts that arrive together start in one step, in admission order, `chunk_size` tokens in all: the
    last one that fits in part, the rest in the next steps."""
    s = Scheduler(BlockManager(64, 4), max_batch=8, chunk_size=10)
    seqs = [Sequence(list(range(n))) for n in (3, 4, 6, 2)]
    for seq in seqs:
        s.add(seq)
    plan = s.schedule()
    assert [(c.seq, c.start, c.length, c.last) for c in plan.prefills] == \
        [(seqs[0], 0, 3, True), (seqs[1], 0, 4, True), (seqs[2], 0, 3, False)]
    step(s)
    plan = s.schedule()
    assert [(c.seq, c.start, c.length) for c in plan.prefills] == [(seqs[2], 3, 3), (seqs[3], 0, 2)]
    assert plan.decode == seqs[:2]  # the prompts done last step decode beside the new chunks


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_growth_preempts_the_last_admitted_and_recomputes_it(prefix_caching):
    blocks = BlockManager(n_blocks=1 + 3, block_size=4, prefix_caching=prefix_caching)
    s = Scheduler(blocks, max_batch=4, chunk_size=8)
    a, b = Sequence([1, 2, 3, 4]), Sequence([5, 6, 7])
    s.add(a)
    s.add(b)
    step(s)  # prefill a (4 tokens: 1 block) and b (3 tokens: 1 block), in one step
    assert s.running == [a, b] and len(a.tokens) == 5 and len(b.tokens) == 4
    # a needs its 2nd block at 5 tokens, b at 5 tokens: 3 blocks in all, b must give way eventually
    for _ in range(6):
        step(s)
        check_tables(s)
        if b.preemptions:
            break
    assert b.preemptions == 1 and b in s.waiting and b.blocks == [] and b.computed == 0
    assert s.running == [a]
    generated_b = list(b.tokens)
    s.finish(a)
    plan = s.schedule()
    assert s.running == [b]
    if prefix_caching:  # its full first block outlived the preemption: only the last token is computed
        assert not plan.prefills and plan.decode == [b] and b.computed == 4 == len(generated_b) - 1
    else:  # prompt and tokens so far, from position 0
        assert [(c.seq, c.start, c.length) for c in plan.prefills] == [(b, 0, len(generated_b))]


def test_a_long_sequence_alone_never_fails():
    blocks = BlockManager(n_blocks=1 + 5, block_size=4)  # exactly one context of 20
    s = Scheduler(blocks, max_batch=4, chunk_size=8)
    seqs = [Sequence([i] * 3) for i in range(4)]
    lengths = {id(q): 20 for q in seqs}
    for q in seqs:
        s.add(q)
    finished: list[Sequence] = []
    for _ in range(400):
        finished += step(s, length=lengths)
        check_tables(s)
        if len(finished) == 4:
            break
    assert sorted(len(q.tokens) for q in finished) == [20] * 4
    assert blocks.used == 0


def test_sliding_window_releases_blocks_behind_it():
    blocks = BlockManager(n_blocks=64, block_size=4)
    s = Scheduler(blocks, max_batch=1, chunk_size=64, window=8)
    seq = Sequence(list(range(30)))
    s.add(seq)
    step(s)
    # the next query sits at 30 and sees 23..30: blocks 0..4 (positions 0..19) are gone
    assert seq.first_block == 5 and len(seq.blocks) == 3 and blocks.used == 3
    for _ in range(20):
        step(s)
    assert len(seq.blocks) <= 8 // 4 + 1 and blocks.used == len(seq.blocks)


def test_window_prefixes_stay_cached_after_they_leave_the_window():
    """A window model's blocks are registered before they leave the window, so a later prompt with the
    same start hits them all, and then holds only the hit blocks its window still sees."""
    blocks = BlockManager(n_blocks=64, block_size=4)
    s = Scheduler(blocks, max_batch=4, chunk_size=64, window=8)
    shared = list(range(100, 120))  # 5 full blocks, longer than the window
    first = Sequence(shared + [1, 2])
    s.add(first)
    step(s)
    assert first.first_block == 3 and blocks.cached == 5  # blocks 0..2 left the window but stay cached
    later = Sequence(shared + [9, 9, 9])
    s.add(later)
    s.schedule()
    assert later.cached_tokens == 20 and later.computed == 20
    # the next query sits at 20 and sees 13..20: logical blocks 3 and 4 of the hit, then a fresh one
    assert later.first_block == 3 and len(later.blocks) == 3 and later.blocks[:2] == first.blocks[:2]
    check_tables(s)
    s.finish(first)
    s.finish(later)
    assert blocks.used == 0 and blocks.cached == 5


def test_prefix_hits_share_full_blocks_and_keep_one_token_to_compute():
    blocks = BlockManager(n_blocks=32, block_size=4)
    s = Scheduler(blocks, max_batch=4, chunk_size=64)
    shared = list(range(100, 108))
    first = Sequence(shared + [1, 2, 3])
    s.add(first)
    step(s)
    s.finish(first)
    assert blocks.used == 0 and blocks.cached == 2  # two full prompt blocks stay cached
    same = Sequence(shared + [9])
    exact = Sequence(list(shared))  # the whole prompt is cached, but its last token must be computed
    half = Sequence(shared[:4] + [5, 5, 5, 5, 5])
    other = Sequence([0] + shared)
    for q in (same, exact, half, other):
        s.add(q)
    s.schedule()
    assert [q.cached_tokens for q in (same, exact, half, other)] == [8, 4, 4, 0]
    assert same.blocks[:2] == exact.blocks[:1] + [same.blocks[1]] and half.blocks[0] == same.blocks[0]
    assert same.computed == 8 and exact.computed == 4
    check_tables(s)


def test_prefix_cache_off_and_lru_eviction():
    off = BlockManager(n_blocks=8, block_size=2, prefix_caching=False)
    off.register(off.allocate(), 0, [1, 2])
    assert off.match([1, 2, 3]) == []
    blocks = BlockManager(n_blocks=3, block_size=2)
    b1, b2 = blocks.allocate(), blocks.allocate()
    k1 = blocks.register(b1, 0, [1, 2])
    blocks.register(b2, k1, [3, 4])
    blocks.release([b1, b2])
    assert blocks.available == 2 and blocks.match([1, 2, 3, 4, 5]) == [b1, b2]
    assert blocks.allocate() == b1  # the oldest cached block goes first, and its prefix with it
    assert blocks.match([1, 2, 3, 4, 5]) == []
    with pytest.raises(ValueError, match="n_blocks"):
        BlockManager(1, 4)


def test_cancel_while_waiting_or_running_frees_everything():
    blocks = BlockManager(n_blocks=1 + 2, block_size=4)
    s = Scheduler(blocks, max_batch=4, chunk_size=8)
    a, b = Sequence([1] * 8), Sequence([2] * 3)
    s.add(a)
    s.add(b)
    s.schedule()
    assert s.running == [a] and list(s.waiting) == [b]
    s.finish(b)
    s.finish(a)
    assert not s.running and not s.waiting and blocks.used == 0
