"""The continuous-batching engine gives each request exactly what it would get alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tramontane import generate, load_model
from tramontane.cache import PagedKVCache
from tramontane.engine import Engine, EngineEvent, QueueFullError, Request
from tramontane.engine.text import TextOutput
from tramontane.sampling import SamplingParams


class IdTokenizer:
    """Text of token t is '<t>': enough to test text plumbing without a real vocabulary."""

    stop_ids = frozenset()

    class _Decoder:
        def __init__(self, prefix: str = "") -> None:
            self.prefix = prefix

        def add(self, token: int) -> str:
            text, self.prefix = self.prefix + f"<{token}>", ""
            return text

        def flush(self) -> str:
            return ""

    def decoder(self, continuation: bool = False):
        # a continuation keeps the leading space that a fresh answer drops
        return self._Decoder(" " if continuation else "")


class Collector:
    def __init__(self) -> None:
        self.events: dict[str, list[EngineEvent]] = {}
        self.done = threading.Event()
        self.expected = 0
        self.lock = threading.Lock()

    def __call__(self, ev: EngineEvent) -> None:
        with self.lock:
            self.events.setdefault(ev.request_id, []).append(ev)
            if ev.finish_reason and sum(1 for v in self.events.values() if v[-1].finish_reason) >= self.expected:
                self.done.set()

    def tokens(self, rid: str) -> list[int]:
        return [e.token for e in self.events[rid] if e.token is not None]


def with_text(request: Request, stops: tuple[str, ...] = (), continuation: bool = False) -> Request:
    """`request` with its events' text made on their way out, as the server makes it on its event loop;
    a stop string cancels the request in the engine."""
    output = TextOutput(IdTokenizer(), stops, continuation, on_stop=lambda: request.cancel("stop"))
    sink = request.emit

    def emit(event: EngineEvent) -> None:
        for e in output.feed(event):
            sink(e)

    request.emit = emit
    return request


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(params=["mistral-window", "llama-tied", "mixtral"])
def model(request, tiny_hf):
    _, folder = tiny_hf(request.param)
    return load_model(folder)


def run_all(engine: Engine, requests: list[Request], sink: Collector, timeout: float = 60) -> None:
    sink.expected = len(requests)
    engine.start()
    try:
        for r in requests:
            engine.submit(r)
        assert sink.done.wait(timeout), "engine did not finish in time"
    finally:
        engine.stop()


def test_concurrent_requests_match_generation_alone(model):
    sink = Collector()
    engine = Engine(model, IdTokenizer(), max_batch=4, chunk_size=5)
    lengths = [3, 17, 9, 1, 30, 12, 5, 8, 21, 2, 14, 6]
    reqs = [with_text(Request(prompt(i, n), max_tokens=6 + i, emit=sink)) for i, n in enumerate(lengths)]
    run_all(engine, reqs, sink)
    for r in reqs:
        alone = generate(model, [r.prompt], max_tokens=r.max_tokens)[0].tokens
        assert sink.tokens(r.id) == alone
        evs = sink.events[r.id]
        assert evs[-1].finish_reason == "length"
        assert "".join(e.text for e in evs) == "".join(f"<{t}>" for t in alone)
    assert engine.active == 0 and engine.blocks.used == 0


def test_prompts_that_arrive_together_start_in_one_forward(model):
    """Eight prompts of eight lengths arriving together (103 tokens) run as rows of a single forward in the
    first step, beside nothing else, and later ones beside the decode rows; each answer is what the
    prompt gets alone."""
    engine = Engine(model, IdTokenizer(), max_batch=8, chunk_size=256)
    calls: list[tuple[int, ...]] = []
    step = engine.runner.step

    def spy(tokens, *args, **kwargs):
        calls.append(tuple(tokens.shape))
        return step(tokens, *args, **kwargs)

    engine.runner.step = spy  # type: ignore[assignment]
    sink = Collector()
    reqs = [Request(prompt(20 + i, 9 + i), max_tokens=5, emit=sink) for i in range(8)]
    for r in reqs[:6]:
        engine.submit(r)
    engine.step()
    assert calls == [(sum(range(9, 15)), 1)]  # one row per prompt token
    engine.step()
    engine.step()
    for r in reqs[6:]:
        engine.submit(r)
    engine.step()
    assert calls[1:] == [(6, 1), (6, 1), (15 + 16 + 6, 1)]  # two prompts' tokens beside the six decode rows
    while engine.active:
        engine.step()
    for r in reqs:
        assert sink.tokens(r.id) == generate(model, [r.prompt], max_tokens=5)[0].tokens


def test_seeded_sampling_is_independent_of_batching(model):
    sink = Collector()
    engine = Engine(model, IdTokenizer(), max_batch=3)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    reqs = [Request(prompt(i, 4 + i), max_tokens=10, emit=sink, params=params, seed=100 + i) for i in range(5)]
    run_all(engine, reqs, sink)
    for i, r in enumerate(reqs):
        # generate() seeds prompt i with seed + i
        alone = generate(model, [r.prompt], max_tokens=10, temperature=1.0, top_p=0.9, seed=100 + i)[0].tokens
        assert sink.tokens(r.id) == alone


def test_stop_strings_and_stop_ids(model):
    free = generate(model, [prompt(1, 5)], max_tokens=8)[0].tokens
    sink = Collector()
    engine = Engine(model, IdTokenizer(), max_batch=2)
    by_string = with_text(Request(prompt(1, 5), max_tokens=8, emit=sink), stops=(f"<{free[3]}>",))
    by_id = Request(prompt(1, 5), max_tokens=8, emit=sink, stop_ids=frozenset({free[2]}))
    sink.expected = 2
    engine.start()
    try:
        engine.submit(by_string)
        engine.submit(by_id)
        assert sink.done.wait(60)
        deadline = time.monotonic() + 10  # the stop string's request leaves the engine within a step
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    first = free.index(free[3])
    events = sink.events[by_string.id]
    assert "".join(e.text for e in events) == "".join(f"<{t}>" for t in free[:first])
    assert sink.tokens(by_string.id) == free[: first + 1]  # the token that completed the string is out
    assert [e.finish_reason for e in events].count("stop") == 1 and events[-1].finish_reason == "stop"
    assert sink.tokens(by_id.id) == free[: free.index(free[2])]
    assert sink.events[by_id.id][-1].finish_reason == "stop"
    assert engine.active == 0 and engine.blocks.used == 0
    assert 'tramontane_requests_total{reason="stop"} 2.0' in engine.metrics.render().decode()


def test_continuation_requests_keep_the_leading_space(model):
    sink = Collector()
    engine = Engine(model, IdTokenizer(), max_batch=2)
    fresh = with_text(Request(prompt(1, 5), max_tokens=3, emit=sink))
    cont = with_text(Request(prompt(1, 5), max_tokens=3, emit=sink), continuation=True)
    run_all(engine, [fresh, cont], sink)
    text = {r.id: "".join(e.text for e in sink.events[r.id]) for r in (fresh, cont)}
    assert text[cont.id] == " " + text[fresh.id] and not text[fresh.id].startswith(" ")


def test_cancel_frees_the_row_within_a_step(model):
    engine = Engine(model, IdTokenizer(), max_batch=2)
    seen: list[EngineEvent] = []
    req = Request(prompt(1, 5), max_tokens=200, emit=seen.append)
    engine.submit(req)
    for _ in range(6):
        engine.step()
    assert engine.active == 1 and len(seen) >= 4
    req.cancel()
    engine.step()
    assert engine.active == 0 and seen[-1].finish_reason == "cancelled"
    assert engine.blocks.used == 0


def test_deadline_ends_request_with_error(model):
    engine = Engine(model, IdTokenizer(), max_batch=1)
    seen: list[EngineEvent] = []
    req = Request(prompt(1, 5), max_tokens=200, emit=seen.append, timeout=0.05)
    engine.submit(req)
    engine.step()
    time.sleep(0.06)
    engine.step()
    assert seen[-1].finish_reason == "timeout" and seen[-1].error
    assert engine.active == 0


def test_queue_bound_and_validation(model):
    engine = Engine(model, IdTokenizer(), max_batch=1, max_queue=2, max_seq_len=64)
    noop = lambda ev: None  # noqa: E731
    engine.submit(Request([1], max_tokens=4, emit=noop))
    engine.submit(Request([1], max_tokens=4, emit=noop))
    with pytest.raises(QueueFullError):
        engine.submit(Request([1], max_tokens=4, emit=noop))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.validate(Request([1] * 60, max_tokens=10, emit=noop))
    with pytest.raises(ValueError, match="prompt"):
        engine.validate(Request([], max_tokens=10, emit=noop))
    with pytest.raises(ValueError, match="prompt"):
        engine.validate(Request([1000], max_tokens=10, emit=noop))


def test_metrics_exposition(model):
    sink = Collector()
    engine = Engine(model, IdTokenizer(), max_batch=2)
    run_all(engine, [Request(prompt(i, 4), max_tokens=5, emit=sink) for i in range(3)], sink)
    text = engine.metrics.render().decode()
    assert "tramontane_generation_tokens_total 15.0" in text
    assert "tramontane_prompt_tokens_total 12.0" in text
    assert 'tramontane_requests_total{reason="length"} 3.0' in text
    assert "tramontane_time_to_first_token_seconds_count 3.0" in text


def test_a_tiny_block_budget_preempts_but_answers_stay_the_same(model):
    sink = Collector()
    # 12 blocks of 4 positions: one 48-token context, far less than 6 sequences of ~40 tokens need;
    # in the window model, 6 short prompts take all 12 blocks, so the first to grow preempts another
    engine = Engine(model, IdTokenizer(), max_batch=6, chunk_size=8, max_seq_len=48, kv_blocks=12, block_size=4)
    params = SamplingParams(temperature=1.0, top_k=20, frequency_penalty=0.5)
    reqs = [Request(prompt(i, n), max_tokens=36, emit=sink, params=params if i % 2 else SamplingParams(),
                    seed=7 + i) for i, n in enumerate([7, 5, 8, 6, 3, 5])]
    run_all(engine, reqs, sink)
    assert "tramontane_preemptions_total 0.0" not in engine.metrics.render().decode()
    for i, r in enumerate(reqs):
        kw = dict(temperature=1.0, top_k=20, frequency_penalty=0.5, seed=r.seed) if i % 2 else {}
        assert sink.tokens(r.id) == generate(model, [r.prompt], max_tokens=36, **kw)[0].tokens
    assert engine.blocks.used == 0


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_shared_prefixes_are_computed_once(model, prefix_cache):
    shared = prompt(99, 20)
    first = Request(shared + [3], max_tokens=5, emit=(alone := Collector()))
    engine = Engine(model, IdTokenizer(), max_batch=4, chunk_size=6, block_size=4, prefix_cache=prefix_cache)
    run_all(engine, [first], alone)
    sink = Collector()
    later = [Request(shared + prompt(i, 1 + i), max_tokens=6, emit=sink) for i in range(4)]
    run_all(engine, later, sink)
    assert alone.tokens(first.id) == generate(model, [first.prompt], max_tokens=5)[0].tokens
    for r in later:
        assert sink.tokens(r.id) == generate(model, [r.prompt], max_tokens=r.max_tokens)[0].tokens
    assert alone.events[first.id][-1].cached_tokens == 0
    assert [sink.events[r.id][-1].cached_tokens for r in later] == [20 if prefix_cache else 0] * 4
    assert engine.blocks.used == 0 and (engine.blocks.cached > 0) == prefix_cache


def test_kv_blocks_must_hold_one_context(model):
    with pytest.raises(ValueError, match="kv_blocks"):
        Engine(model, IdTokenizer(), max_seq_len=64, kv_blocks=3, block_size=16)


def test_kv_pool_larger_than_memory_is_refused_before_reserving(model):
    """A pool the machine cannot hold is an error naming kv_blocks, not a process killed later under load."""
    from tramontane.loading.validate import available_memory

    have = available_memory("cpu")
    if have is None:
        pytest.skip("this machine does not report its available memory")
    per_block = PagedKVCache.pool_nbytes(model.args, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=r"kv_blocks: the KV pool .* needs .* GiB but only"):
        Engine(model, IdTokenizer(), max_seq_len=64, kv_blocks=have // per_block + 10, block_size=16)


def test_pool_nbytes_is_what_create_reserves(model):
    pool = PagedKVCache.create(model.args, 7, 4, dtype=torch.bfloat16)
    assert PagedKVCache.pool_nbytes(model.args, 7, 4, torch.bfloat16) == pool.nbytes()
