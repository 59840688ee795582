"""Speculative decoding: drafts checked in one step give the tokens of plain decoding (greedy) or its
distribution (sampling), for every drafter, architecture and batch, with what ends a sequence intact."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import jsonschema
import pytest
import torch
from test_engine import Collector, IdTokenizer, run_all, with_text
from test_structured import SCHEMA, json_schema_format
from test_structured import model as v3_model  # noqa: F401  (a fixture)
from test_structured import requests as v3_requests
from test_structured import tok as v3_tok  # noqa: F401  (a fixture)

from tramontane import load_model
from tramontane.engine import Engine, Request
from tramontane.engine.drafters import ModelDrafter, NgramDrafter, Pace, Speculation, StepCosts, best_width
from tramontane.engine.grammar import response_format_grammar
from tramontane.generate import generate
from tramontane.sampling import SamplingParams, verify_draft

from tiny import save_hf

MODELS = ["mistral-window", "mistral-nowindow", "mixtral", "llama-tied"]
GREEDY = SamplingParams(temperature=0)


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def repetitive(seed: int) -> list[int]:
    """A prompt that says the same thing three times: n-gram drafts find matches in it."""
    return prompt(seed, 10) * 3


class Oracle:
    """Proposes what plain decoding gave (`answers[i]` for the request whose prompt is `prompts[i]`), with
    every third proposal wrong from its third token: drafts are accepted, rejected part-way and run out."""

    def __init__(self, prompts: list[list[int]], answers: list[list[int]]) -> None:
        self.known = [(p, a) for p, a in zip(prompts, answers)]
        self.calls = 0

    def propose(self, key, tokens, k):
        self.calls += 1
        p, a = next((p, a) for p, a in self.known if list(tokens[: len(p)]) == p)
        done = len(tokens) - len(p)
        out = a[done : done + k]
        if self.calls % 3 == 0 and len(out) > 2:
            out[2] = (out[2] + 1) % 128
        return out

    def forget(self, key):
        pass


def speculating(engine: Engine) -> Engine:
    """`engine` choosing its drafts' width from a fixed cost shape, not from this machine's clock: rows that
    cost next to nothing, as a tiny model's do, so that what the tests assert about drafting does not
    depend on the load of the machine running them."""
    engine.runner.costs = StepCosts(measured=False, slope=0.01)
    return engine


@pytest.fixture(params=MODELS)
def model(request, tiny_hf):
    return load_model(tiny_hf(request.param)[1])


@torch.no_grad()
def test_greedy_tokens_equal_plain_decoding_for_every_drafter(model):
    prompts = [repetitive(1), prompt(2, 5), repetitive(3)[:17]]
    plain = [g.tokens for g in generate(model, prompts, max_tokens=30)]
    oracle = Oracle(prompts, plain)
    for speculative in ["ngram", Speculation(oracle, 6), model]:
        got = generate(model, prompts, max_tokens=30, speculative=speculative)
        assert [g.tokens for g in got] == plain, speculative
        assert all(g.finish_reason == "length" for g in got)
        alone = generate(model, prompts[:1], max_tokens=30, speculative=speculative)[0].tokens
        assert alone == plain[0]
    assert oracle.calls > 0


@torch.no_grad()
def test_a_draft_model_that_differs_from_the_target_keeps_the_targets_tokens(tiny_hf):
    target = load_model(tiny_hf("mistral-nowindow")[1])
    folder = tiny_hf("mistral-nowindow")[1].parent / "draft-seed-7"
    save_hf("mistral-nowindow", folder, seed=7)
    draft = load_model(folder)
    p = [repetitive(4)]
    assert generate(target, p, max_tokens=24, speculative=draft)[0].tokens == \
        generate(target, p, max_tokens=24)[0].tokens


def test_a_draft_model_with_another_vocabulary_is_refused(model, v3_model):  # noqa: F811
    with pytest.raises(ValueError, match="vocabulary has 32768 tokens and the target's 128"):
        generate(model, [[1, 2, 3]], max_tokens=4, speculative=v3_model)
    with pytest.raises(ValueError, match="expected 'ngram' or a draft model"):
        generate(model, [[1, 2, 3]], max_tokens=4, speculative="bigram")


@torch.no_grad()
def test_stop_ids_max_tokens_logprobs_penalties_and_bias_stay_exact(model):
    p = [repetitive(5)]
    params = dict(repetition_penalty=1.3, logprobs=True)
    plain = generate(model, p, max_tokens=25, **params)[0]
    spec = generate(model, p, max_tokens=25, speculative="ngram", **params)[0]
    assert spec.tokens == plain.tokens
    torch.testing.assert_close(torch.tensor(spec.logprobs), torch.tensor(plain.logprobs), atol=1e-4, rtol=1e-4)
    stop = plain.tokens[7]
    cut = generate(model, p, max_tokens=25, stop=[stop], speculative="ngram", **params)[0]
    assert cut.tokens == plain.tokens[: plain.tokens.index(stop)] and cut.finish_reason == "stop"
    for n in (1, 2, 5):
        short = generate(model, p, max_tokens=n, speculative="ngram")[0]
        assert short.tokens == plain_tokens(model, p, n) and short.finish_reason == "length"


@torch.no_grad()
def test_a_stop_string_inside_a_run_of_accepted_drafts_cuts_the_text_there(model):
    p = repetitive(12)
    plain = generate(model, [p], max_tokens=24)[0].tokens
    engine = speculating(Engine(model, IdTokenizer(), max_batch=2, speculation=Speculation(Oracle([p], [plain]), 8)))
    sink = Collector()
    request = with_text(Request(p, 24, sink, params=GREEDY), stops=(f"<{plain[9]}>",))
    run_all(engine, [request], sink)
    cut = plain.index(plain[9])
    assert "".join(e.text for e in sink.events[request.id]) == "".join(f"<{t}>" for t in plain[:cut])
    end = sink.events[request.id][-1]
    assert end.finish_reason == "stop" and 0 < end.accepted_tokens <= end.draft_tokens  # the counts reach usage


@torch.no_grad()
def test_logit_bias_and_penalties_in_the_engine_stay_exact(model):
    prompts = [repetitive(10), repetitive(11)]
    params = SamplingParams(temperature=0, logit_bias=((3, 4.0), (int(prompts[0][1]), -2.0)), presence_penalty=0.5)
    plain = engine_tokens(model, prompts, params, None)
    assert engine_tokens(model, prompts, params, Speculation(NgramDrafter(n_min=1), 5)) == plain


def engine_tokens(model, prompts, params, speculation) -> list[list[int]]:
    engine = speculating(Engine(model, None, max_batch=4, max_seq_len=128, speculation=speculation))
    sink = Collector()
    requests = [Request(p, 30, sink, params=params, stop_ids=frozenset()) for p in prompts]
    run_all(engine, requests, sink)
    return [sink.tokens(r.id) for r in requests]


def plain_tokens(model, prompts, n):
    return generate(model, prompts, max_tokens=n)[0].tokens


@torch.no_grad()
def test_an_engine_mixes_speculating_and_plain_rows_and_gives_back_rejected_blocks(model):
    prompts = [repetitive(6), repetitive(7), prompt(8, 9)]
    plain = [g.tokens for g in generate(model, prompts, max_tokens=40)]
    engine = speculating(Engine(model, None, max_batch=4, max_seq_len=128, prefix_cache=False,
                                speculation=Speculation(Oracle(prompts, plain), 4)))
    sink = Collector()
    requests = [Request(p, 40, sink, params=GREEDY, stop_ids=frozenset(), speculative=i != 1)
                for i, p in enumerate(prompts)]
    for r in requests:
        engine.submit(r)
    size = engine.blocks.block_size
    while not all(sink.events.get(r.id, [None])[-1] and sink.events[r.id][-1].finish_reason for r in requests):
        engine.step()
        for seq in engine.scheduler.running:  # no block past what its tokens need once a step is over
            assert len(seq.blocks) <= -(-len(seq.tokens) // size) - seq.first_block
    assert [sink.tokens(r.id) for r in requests] == plain
    ends = [sink.events[r.id][-1] for r in requests]
    assert ends[1].draft_tokens == 0 and ends[0].draft_tokens > 0 and ends[2].draft_tokens > 0
    assert 0 < ends[0].accepted_tokens < ends[0].draft_tokens
    assert metric(engine, "draft_tokens_total") == sum(e.draft_tokens for e in ends)
    assert metric(engine, "accepted_tokens_total") == sum(e.accepted_tokens for e in ends)
    assert engine.blocks.used == 0


@torch.no_grad()
def test_a_step_drafts_only_while_its_rows_fit_max_rows(model):
    prompts = [repetitive(i) for i in range(9)]
    drafter = Oracle(prompts, [g.tokens for g in generate(model, prompts, max_tokens=48)])
    engine = speculating(Engine(model, None, max_batch=9, max_seq_len=128, kv_blocks=64,
                                speculation=Speculation(drafter, 8, max_rows=16)))
    steps = []
    run = engine.runner.run

    def spy(inputs):  # the verifying rows, or the plain decode rows (not a step of prompt tokens as rows)
        decode = inputs.verify or (inputs.decode if inputs.logits_of is None else None)
        steps.append((len(decode.tokens), len(decode.tokens[0])) if decode is not None else (0, 0))
        return run(inputs)

    engine.runner.run = spy  # type: ignore[method-assign]
    sink = Collector()
    run_all(engine, [Request(p, 48, sink, params=GREEDY, stop_ids=frozenset()) for p in prompts], sink)
    assert all(rows * width <= 16 for rows, width in steps)
    assert any(width > 1 for _, width in steps) and any(rows == 9 for rows, _ in steps)
    assert metric(engine, "draft_tokens_total") > 0


def metric(engine: Engine, name: str) -> float:
    """A speculative decoding counter as /metrics shows it."""
    found = re.search(rf"^tramontane_speculative_{name} (\S+)$", engine.metrics.render().decode(), re.M)
    assert found is not None, name
    return float(found.group(1))


def test_constrained_requests_only_accept_drafts_the_grammar_allows(v3_model, v3_tok):  # noqa: F811
    grammar = response_format_grammar(json_schema_format(SCHEMA))
    reqs = v3_requests(v3_tok, [grammar, None])
    plain_engine = Engine(v3_model, v3_tok, max_batch=4, max_seq_len=256)
    sink = Collector()
    for r in reqs:
        r.emit = sink
    run_all(plain_engine, reqs, sink)
    plain = [sink.tokens(r.id) for r in reqs]

    class Wrong:  # proposes the plain answer with its tokens shifted: tokens the grammar mostly refuses
        def propose(self, key, tokens, k):
            answer = next(a for r, a in zip(reqs, plain) if list(tokens[: len(r.prompt)]) == r.prompt)
            done = len(tokens) - len(next(r.prompt for r in reqs if list(tokens[: len(r.prompt)]) == r.prompt))
            out = answer[done : done + k]
            return out[:1] + [(t + 1) % v3_tok.vocab_size for t in out[1:]]

        def forget(self, key):
            pass

    again = v3_requests(v3_tok, [grammar, None])
    engine = speculating(Engine(v3_model, v3_tok, max_batch=4, max_seq_len=256, speculation=Speculation(Wrong(), 4)))
    sink = Collector()
    for r in again:
        r.emit = sink
    run_all(engine, again, sink)
    assert [sink.tokens(r.id) for r in again] == plain
    body = [t for t in sink.tokens(again[0].id) if t not in v3_tok.stop_ids]
    jsonschema.validate(json.loads(v3_tok.decode(body)), SCHEMA)
    assert sink.events[again[0].id][-1].accepted_tokens > 0


def test_verify_draft_keeps_the_targets_distribution():
    """Drawn many times, the emitted token follows p whatever the draft (one-hot q): a chi-square test."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = torch.softmax(logits, -1)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for draft in (0, 3):
        counts = Counter(verify_draft(logits, draft, params, gen)[0] for _ in range(n))
        chi2 = sum((counts[i] - n * float(p[i])) ** 2 / (n * float(p[i])) for i in range(5))
        assert chi2 < 18.5, (draft, counts)  # the 0.999 quantile of chi-square with 4 degrees of freedom


@torch.no_grad()
def test_sampled_tokens_follow_the_distribution_of_plain_sampling(tiny_hf):
    """The first three tokens of many seeded sequences with top-k 3: the second and third come from
    verified drafts (a draft model that is the target itself drafts its most likely token), and their
    frequencies match the model's own two-step distribution (chi-square), as plain sampling's do."""
    model = load_model(tiny_hf("llama-tied")[1])
    p = prompt(9, 6)
    params = dict(temperature=1.0, top_k=3)
    n = 1500
    spec = Speculation(ModelDrafter(model, 128, kv_blocks=2 * n), 2, max_rows=10 * n)
    expected = two_step_distribution(model, p, SamplingParams(**params))
    for speculative in (None, spec):
        out = generate(model, [p] * n, max_tokens=3, seed=11, speculative=speculative, **params)
        counts = Counter(tuple(g.tokens[1:]) for g in out)
        assert set(counts) <= set(expected)
        chi2 = sum((counts[k] - n * q) ** 2 / (n * q) for k, q in expected.items())
        dof = len(expected) - 1
        assert chi2 < dof + 4 * math.sqrt(2 * dof), (speculative, chi2)
    assert spec.drafter.blocks.used == 0


def two_step_distribution(model, p, params) -> dict[tuple[int, int], float]:
    """P(tokens 2 and 3) under top-k sampling, summed over token 1."""
    from tramontane.sampling import sampling_weights

    def dist(tokens):
        w = sampling_weights(model(torch.tensor([tokens]))[0, -1][None], [params])[0]
        return w / w.sum()

    out: dict[tuple[int, int], float] = {}
    first = dist(p)
    for t1 in first.nonzero()[:, 0].tolist():
        second = dist(p + [t1])
        for t2 in second.nonzero()[:, 0].tolist():
            third = dist(p + [t1, t2])
            for t3 in third.nonzero()[:, 0].tolist():
                key = (t2, t3)
                out[key] = out.get(key, 0.0) + float(first[t1] * second[t2] * third[t3])
    return out


def test_ngram_drafter_proposes_what_followed_the_longest_recent_match():
    d = NgramDrafter(n_min=2, n_max=3)
    assert d.propose("a", [5, 6, 7, 8, 5, 6], k=3) == [7, 8, 5]
    assert d.propose("a", [5, 6, 7, 8, 5, 6, 9, 1, 6, 9], k=2) == [1, 6]  # [6, 9] ended last at index 7
    assert d.propose("b", [1, 2, 3, 4], k=4) == []  # nothing repeats
    d.forget("a")
    assert d.propose("a", [1, 2, 1], k=2) == []  # n_min = 2: one token is not a match


def test_pace_asks_for_more_drafts_as_they_are_accepted_and_fewer_as_they_fail():
    pace = Pace(limit=8)
    assert pace.acceptance == 0.5 and pace.want() == 3  # 0.5 ** 3 >= 0.1 > 0.5 ** 4
    for _ in range(6):
        pace.record(4, 4)
    assert pace.acceptance > 0.9 and pace.want() == 8
    for _ in range(20):
        pace.record(3, 0)
    assert pace.acceptance < 0.1 and pace.want() == 1
    low = pace.acceptance
    for _ in range(50):
        pace.record(0, 0)  # steps without drafts: back towards an even chance, to try again
    assert low < pace.acceptance < 0.5


def test_the_width_pays_for_its_rows():
    costs = StepCosts()
    for rows, ms in [(1, 10.0), (2, 11.0), (4, 16.0), (9, 36.0)]:
        costs.observe(rows, ms)
    assert costs.estimate(3) == 13.5 and costs.estimate(13) == 52.0  # between, and along the last slope
    sure, unsure = Pace(limit=8, hits=9.5, trials=10), Pace(limit=8, hits=1, trials=10)
    assert best_width([(sure, 8)], costs, 8) == 3  # 1 + .95 + .9 + .86 tokens for 16 ms beats 8 rows' share
    assert best_width([(unsure, 8)], costs, 8) == 0  # 1.1 tokens for 11 ms loses to 1 for 10
    assert best_width([(sure, 8), (unsure, 0)], costs, 8) == 1  # the plain row pays for the width too
    assert StepCosts(measured=False).estimate(9) == 3.0  # lockstep ranks: the shape, not the clock
