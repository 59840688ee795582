"""Speculative decoding behind the HTTP API and the CLI, with the real SmolLM2: the same answers as plain
decoding, a per-request opt-out, and the counts in usage, /metrics and `complete --json`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from live_server import live_server

from tramontane import load_model, load_tokenizer
from tramontane.engine import Engine
from tramontane.engine.drafters import NgramDrafter, Speculation, StepCosts
from tramontane.server import create_app

from console import tramontane

MODEL = "smollm2"
CODE = """Add a docstring to this function and give the whole function back.

def moving_average(values, width):
    out = []
    for i in range(len(values) - width + 1):
        window = values[i : i + width]
        out.append(sum(window) / width)
    return out
"""


@pytest.fixture(scope="module")
def served(smollm2_gguf_path):
    tokenizer = load_tokenizer(smollm2_gguf_path)
    model = load_model(smollm2_gguf_path)
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=512, speculation=Speculation(NgramDrafter(), 8))
    engine.runner.costs = StepCosts(measured=False)  # drafts chosen alike however loaded the machine is
    with live_server(create_app(engine, tokenizer, MODEL)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served[0]}/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


def ask(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CODE}], max_tokens=96,
                                          temperature=0, **kw)


def test_answers_are_those_of_plain_decoding_and_usage_counts_the_drafts(served, client):
    spec = ask(client)
    plain = ask(client, extra_body={"speculative": False})
    assert spec.choices[0].message.content == plain.choices[0].message.content
    counts = spec.usage.model_extra["speculative"]
    assert 0 < counts["accepted_tokens"] <= counts["draft_tokens"]
    assert "speculative" not in (plain.usage.model_extra or {})
    metrics = httpx.get(served[0] + "/metrics").text
    drafted = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("tramontane_speculative_draft_tokens_total "))
    assert drafted >= counts["draft_tokens"]


def test_a_streamed_answer_is_the_same_and_reports_the_counts(client):
    whole = ask(client)
    pieces, usage = [], None
    for chunk in ask(client, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and usage.model_extra["speculative"]["draft_tokens"] > 0


def test_speculative_must_be_a_boolean(served):
    res = httpx.post(served[0] + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "speculative": "yes"})
    assert res.status_code == 400 and res.json()["error"]["param"] == "speculative", res.text


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_complete_command_prints_the_plain_tokens_and_the_counts(smollm2_gguf_path, drafter):
    def complete(*extra: str) -> dict:
        out = tramontane("complete", "--model", str(smollm2_gguf_path), "--max-tokens", "48", "--json", *extra, CODE)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    plain = complete()
    choice = "ngram" if drafter == "ngram" else str(smollm2_gguf_path)  # the model as its own draft model
    spec = complete("--speculative", choice, "--draft-tokens", "4")
    assert spec["tokens"] == plain["tokens"] and "speculative" not in plain
    counts = spec["speculative"]
    assert 0 < counts["accepted_tokens"] <= counts["draft_tokens"] and counts["tokens_per_step"] > 1
    if drafter == "model":
        assert counts["acceptance_rate"] > 0.9
