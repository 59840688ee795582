"""Sampling on known distributions: allowed sets, reproducibility, penalties."""

from __future__ import annotations

import math

import pytest
import torch

from tramontane.sampling import (
    SamplingParams,
    apply_penalties,
    filter_logits,
    greedy,
    sample_one,
    sample_rows,
)

# probabilities 0.4, 0.3, 0.15, 0.1, 0.05
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
LOGITS = PROBS.log()


def draws(params: SamplingParams, n: int = 400) -> set[int]:
    g = torch.Generator().manual_seed(0)
    return {sample_one(LOGITS, params, g) for _ in range(n)}


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0), {0, 1, 2, 3, 4}),
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),  # 0.4 + 0.3 reaches 0.7
        (SamplingParams(temperature=1.0, top_p=0.71), {0, 1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.3), {0}),
        (SamplingParams(temperature=1.0, min_p=0.3), {0, 1, 2}),  # >= 0.3 * 0.4 = 0.12
        (SamplingParams(temperature=1.0, top_k=4, min_p=0.5), {0, 1}),
    ],
)
def test_filters_allow_exactly_the_expected_tokens(params, allowed):
    kept = {i for i, v in enumerate(filter_logits(LOGITS, params).tolist()) if v != -math.inf}
    assert kept == allowed
    assert draws(params) == allowed  # 400 draws see every allowed token and nothing else


def test_temperature_zero_is_greedy():
    assert sample_one(LOGITS, SamplingParams()) == 0


def test_greedy_takes_the_first_largest_value_of_each_row():
    rows = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-5.0, -1.0, -2.0, -1.0]])
    assert greedy(rows) == [1, 0, 1]
    logits = torch.randn(8, 49152, generator=torch.Generator().manual_seed(0))
    assert greedy(logits) == logits.argmax(-1).tolist()
    plain = [SamplingParams(temperature=0.0)] * 8
    assert sample_rows(logits, plain, [None] * 8, [None] * 8) == logits.argmax(-1).tolist()


def test_temperature_sharpens():
    g = torch.Generator().manual_seed(1)
    hot = [sample_one(LOGITS, SamplingParams(temperature=0.05), g) for _ in range(100)]
    assert hot.count(0) >= 99


def test_same_generator_state_repeats():
    p = SamplingParams(temperature=1.0)
    a = [sample_one(LOGITS, p, torch.Generator().manual_seed(5)) for _ in range(3)]
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [sample_one(LOGITS, p, g1) for _ in range(20)] == [sample_one(LOGITS, p, g2) for _ in range(20)]
    assert len(set(a)) == 1


def test_penalties_as_specified():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.tensor([True, True, False, True])
    counts = torch.tensor([0, 3, 0, 1])
    rep = apply_penalties(logits, seen, counts, SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.25]
    pres = apply_penalties(logits, seen, counts, SamplingParams(presence_penalty=0.5))
    assert pres.tolist() == [2.0, -2.5, 1.0, 0.0]
    freq = apply_penalties(logits, seen, counts, SamplingParams(frequency_penalty=0.5))
    assert freq.tolist() == [2.0, -3.5, 1.0, 0.0]


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.01), dict(top_k=-2),
     dict(min_p=-0.1), dict(repetition_penalty=0), dict(presence_penalty=float("inf")),
     dict(logit_bias=((3, 101.0),)), dict(logit_bias=((-1, 1.0),))],
)
def test_invalid_params_name_the_field(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_logit_bias_shifts_the_chosen_logits():
    logits = PROBS.log()
    assert sample_one(logits, SamplingParams(logit_bias=((0, -100.0),))) == 1  # the argmax banned
    assert sample_one(logits, SamplingParams(logit_bias=((4, 5.0),))) == 4  # log 0.05 + 5 > log 0.4
    # one biased row among plain greedy rows leaves the batch's single argmax
    rows = torch.stack([logits, logits])
    params = [SamplingParams(), SamplingParams(logit_bias=((2, 100.0),))]
    assert sample_rows(rows, params, [None, None], [None, None]) == [0, 2]
    # sampled: a bias of ln 2 doubles a token's odds before the draw
    biased = SamplingParams(temperature=1.0, logit_bias=((3, math.log(2.0)),))
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_one(logits, biased, gen) for _ in range(4000)])
    expected = 0.2 / 1.1  # 0.1 * 2 over a total mass of 1.1
    assert abs((draws == 3).float().mean().item() - expected) < 0.02


def nucleus_reference(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """The tokens top-k and top-p keep, by a full sort of the row (the definition)."""
    probs = torch.softmax(logits / params.temperature, -1)
    order = probs.argsort(descending=True).tolist()
    if params.top_k:
        order = order[: params.top_k]
    total = float(probs[order].sum())
    kept, mass = set(), 0.0
    for t in order:
        if mass >= params.top_p * total:
            break
        kept.add(t)
        mass += float(probs[t])
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_beyond_the_candidates_sorts_the_whole_row(top_p):
    """A flat row keeps thousands of tokens: its nucleus reaches past the partial sort's CANDIDATES and
    comes from the full sort; a peaked row's comes from the candidates. Both are the definition's."""
    from tramontane.sampling import CANDIDATES

    g = torch.Generator().manual_seed(3)
    flat = torch.randn(4096, generator=g) * 0.1
    peaked = torch.randn(4096, generator=g) * 6
    params = SamplingParams(temperature=0.8, top_p=top_p)
    sizes = []
    for row in (flat, peaked):
        kept = {i for i, v in enumerate(filter_logits(row, params).tolist()) if v != -math.inf}
        assert kept == nucleus_reference(row, params)
        sizes.append(len(kept))
    assert top_p < 0.5 or sizes[0] > CANDIDATES  # the flat row did take the full sort


def test_a_batch_samples_each_row_as_alone():
    """Rows with different temperature, top-k, top-p, min-p, bias and greedy in one batch: the same
    filters and, with the same generator seeds, the same draws as each row sampled alone."""
    from tramontane.sampling import sampling_weights

    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 4
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=7),
              SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=1.3, min_p=0.05),
              SamplingParams(), SamplingParams(temperature=0.7, top_k=50, top_p=0.6, logit_bias=((5, 3.0),))]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    weights = sampling_weights(logits[sampled], [params[i] for i in sampled])
    for row, i in enumerate(sampled):
        alone = sampling_weights(logits[i : i + 1], [params[i]])[0]
        if not params[i].logit_bias:
            torch.testing.assert_close(weights[row], alone)
    for step in range(20):
        together = sample_rows(logits, params, [torch.Generator().manual_seed(step * 10 + i) for i in range(6)],
                               [None] * 6)
        assert together == [sample_one(logits[i], params[i], torch.Generator().manual_seed(step * 10 + i))
                            for i in range(6)]


def test_draw_follows_the_weights():
    """One uniform per draw against the cumulative weights: frequencies match the (unnormalised)
    weights, and a token of weight 0 is never drawn, even at the ends."""
    from tramontane.sampling import draw

    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    tokens = [draw(weights, [g])[0] for _ in range(4000)]
    counts = [tokens.count(t) / 4000 for t in range(6)]
    assert counts[0] == counts[2] == counts[5] == 0
    assert abs(counts[1] - 0.5) < 0.03 and abs(counts[3] - 0.25) < 0.03 and abs(counts[4] - 0.25) < 0.03
