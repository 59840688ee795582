"""Generation through the cache: exact greedy parity, batching, and bad input."""

from __future__ import annotations

import pytest
import torch

from tramontane import load_model
from tramontane.generate import FinishEvent, TokenEvent, generate, stream

MODELS = ["mistral-window", "mixtral", "llama-tied"]


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_greedy_equals_argmax_of_full_forward(name, chunk_size, tiny_hf):
    _, folder = tiny_hf(name)
    model = load_model(folder)
    p = prompt(5, 11)
    n = 3 * 8 + 2  # three times the tiny window
    out = generate(model, [p], max_tokens=n, chunk_size=chunk_size, logprobs=True)[0]
    assert len(out.tokens) == n and out.finish_reason == "length"
    full = model(torch.tensor([p + out.tokens]))[0]
    steps = full[len(p) - 1 : -1]
    assert steps.argmax(-1).tolist() == out.tokens
    expected_lp = torch.log_softmax(steps, -1).gather(-1, torch.tensor(out.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected_lp, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_batch_of_different_lengths_equals_each_alone(name, tiny_hf):
    _, folder = tiny_hf(name)
    model = load_model(folder)
    prompts = [prompt(1, 3), prompt(2, 17), prompt(3, 9), prompt(4, 1)]
    together = generate(model, prompts, max_tokens=12)
    for p, got in zip(prompts, together):
        assert got.tokens == generate(model, [p], max_tokens=12)[0].tokens


@torch.no_grad()
@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_transformers_generate(name, tiny_hf):
    ref, folder = tiny_hf(name)
    model = load_model(folder)
    p = prompt(7, 6)
    ours = generate(model, [p], max_tokens=20)[0].tokens
    theirs = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
    assert ours == theirs[0, len(p):].tolist()


@torch.no_grad()
def test_each_sequence_stops_at_its_own_eos(tiny_hf):
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder)
    prompts = [prompt(1, 5), prompt(2, 6)]
    free = generate(model, prompts, max_tokens=10)
    eos = free[0].tokens[3]  # make the 4th token of the first answer its eos
    got = generate(model, prompts, max_tokens=10, eos_id=eos)
    first = free[0].tokens.index(eos)
    assert got[0].tokens == free[0].tokens[:first] and got[0].finish_reason == "stop"
    cut = free[1].tokens.index(eos) if eos in free[1].tokens else 10
    assert got[1].tokens == free[1].tokens[:cut]


@torch.no_grad()
def test_stream_yields_tokens_then_finish(tiny_hf):
    _, folder = tiny_hf("llama-tied")
    model = load_model(folder)
    events = list(stream(model, [prompt(1, 4), prompt(2, 4)], max_tokens=3))
    for i in range(2):
        mine = [e for e in events if e.index == i]
        assert [type(e) for e in mine] == [TokenEvent] * 3 + [FinishEvent]
        assert mine[-1].reason == "length"


@torch.no_grad()
def test_seed_makes_sampling_repeat(tiny_hf):
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder)
    kw = dict(max_tokens=15, temperature=1.5, top_p=0.95)
    a = generate(model, [prompt(1, 4)] * 2, seed=3, **kw)
    b = generate(model, [prompt(1, 4)] * 2, seed=3, **kw)
    c = generate(model, [prompt(1, 4)] * 2, seed=4, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]


@torch.no_grad()
def test_repetition_penalty_changes_greedy_output(tiny_hf):
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder)
    p = prompt(1, 4)
    plain = generate(model, [p], max_tokens=20)[0].tokens
    penalised = generate(model, [p], max_tokens=20, frequency_penalty=100.0)[0].tokens
    assert len(set(penalised)) == 20  # a huge frequency penalty forbids any repeat
    assert penalised != plain


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_parameters(kwargs, param, tiny_hf):
    _, folder = tiny_hf("mistral-window")
    model = load_model(folder)
    with pytest.raises(ValueError, match=param):
        generate(model, [[1, 2]], **{"max_tokens": 4, **kwargs})


def test_bad_prompts(tiny_hf):
    _, folder = tiny_hf("mistral-nowindow")
    model = load_model(folder)  # context 512, no window
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[1], []], max_tokens=4)
    with pytest.raises(ValueError, match="prompts must hold"):
        generate(model, [], max_tokens=4)
    with pytest.raises(ValueError, match="context of 512"):
        generate(model, [[1] * 510], max_tokens=4)
    with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
        generate(model, [[1, 500]], max_tokens=4)
