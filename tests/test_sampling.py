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
