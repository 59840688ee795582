"""Mistral's own API, driven by the official `mistralai` client: model cards, tool_choice "any",
random_seed, safe_prompt, parallel_tool_calls, penalties, n, prediction, fill-in-the-middle, and every
other field its chat request can send: served when it asks for nothing more, else refused by name.

A scripted engine behind a live uvicorn, with a real Mistral v3 tokenizer (FIM and tool-call tokens);
the demo model's tokenizer (SmolLM2, neither) stands for a model that cannot fill in the middle.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from live_server import live_server
from mistralai.client import Mistral
from mistralai.client.errors import SDKError
from scripted import KEY, MODEL, ScriptedEngine, answer

from tramontane import load_tokenizer
from tramontane.server import create_app
from tramontane.server.mistral import SAFETY_PROMPT

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def mistral(server):
    with Mistral(api_key=KEY, server_url=server[0]) as client:
        yield client


def chat(mistral, **kw):
    return mistral.chat.complete(model=MODEL, messages=QUESTION, **{"max_tokens": 64, **kw})


def seen(req) -> tuple:
    """What the engine was asked: everything of a request but its id, time and callback."""
    return (req.prompt, req.max_tokens, req.params, req.stop_ids, req.seed, req.logprobs, req.top_logprobs,
            req.grammar, req.adapter)


def refusal(call) -> dict:
    with pytest.raises(SDKError) as e:
        call()
    assert e.value.status_code == 400
    return json.loads(e.value.body)["error"]


# ---------------------------------------------------------------------------------------------- models
def test_both_sdks_read_the_model_list(server, mistral):
    (card,) = mistral.models.list().data
    assert card.id == MODEL and card.type == "base" and card.max_context_length == server[1].max_seq_len
    assert card.capabilities.completion_chat and card.capabilities.completion_fim
    assert card.capabilities.function_calling and not card.capabilities.vision
    with openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == [MODEL]
        assert client.models.retrieve(MODEL).id == MODEL


# ---------------------------------------------------------------------------------------------- chat fields
def test_tool_choice_any_forces_a_call(tok, engine, mistral):
    engine.script = lambda req: [next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "[TOOL_CALLS]"),
                                 *answer(tok, '[{"name": "get_weather", "arguments": {"city": "Paris"}}]')]
    out = chat(mistral, tools=TOOLS, tool_choice="any")
    assert engine.submitted[-1].grammar is not None
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert out.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_allows_one_call_only(engine, mistral):
    chat(mistral, tools=TOOLS, tool_choice="any", parallel_tool_calls=True)
    several = engine.submitted[-1].grammar
    chat(mistral, tools=TOOLS, tool_choice="any", parallel_tool_calls=False)
    assert '"maxItems": 1' in engine.submitted[-1].grammar and "maxItems" not in several
    error = refusal(lambda: chat(mistral, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False))
    assert error["param"] == "parallel_tool_calls"


def test_random_seed_is_the_seed(server, engine, mistral):
    chat(mistral, random_seed=7, n=2)
    assert [r.seed for r in engine.submitted[-2:]] == [7, 8]
    res = httpx.post(server[0] + "/v1/chat/completions", headers={"x-api-key": KEY},
                     json={"messages": QUESTION, "random_seed": 7, "seed": 8})
    assert res.status_code == 400 and res.json()["error"]["param"] == "random_seed"


def test_safe_prompt_puts_mistrals_safety_prompt_first(tok, engine, mistral):
    chat(mistral, safe_prompt=True)
    assert engine.submitted[-1].prompt == tok.encode_chat([{"role": "system", "content": SAFETY_PROMPT}, *QUESTION])
    system = {"role": "system", "content": "Answer in French."}
    mistral.chat.complete(model=MODEL, messages=[system, *QUESTION], max_tokens=8, safe_prompt=True)
    merged = {"role": "system", "content": f"{SAFETY_PROMPT}\n\nAnswer in French."}
    assert engine.submitted[-1].prompt == tok.encode_chat([merged, *QUESTION])
    chat(mistral, safe_prompt=False)
    assert engine.submitted[-1].prompt == tok.encode_chat(QUESTION)


def test_penalties_and_n_reach_the_engine(engine, mistral):
    out = chat(mistral, presence_penalty=0.5, frequency_penalty=-0.25, n=3)
    assert len(out.choices) == 3 and [c.index for c in out.choices] == [0, 1, 2]
    params = engine.submitted[-1].params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.25)


def test_a_prediction_leaves_the_answer_as_it_is(tok, engine, mistral):
    engine.script = lambda req: answer(tok, "It is sunny.")
    out = chat(mistral, prediction={"type": "content", "content": "It is sunny."})
    assert out.choices[0].message.content == "It is sunny."


def test_min_tokens_is_refused_by_name(mistral):
    assert refusal(lambda: chat(mistral, min_tokens=3))["param"] == "min_tokens"


def test_fields_that_ask_for_nothing_more_reach_the_engine_unchanged(engine, mistral):
    chat(mistral, random_seed=1)
    plain = seen(engine.submitted[-1])
    chat(mistral, random_seed=1, metadata={"team": "search", "run": 3}, prompt_cache_key="user-42",
         reasoning_effort="none", guardrails=[], prompt_logprobs=False, top_prompt_logprobs=0, service_tier="auto")
    assert seen(engine.submitted[-1]) == plain
    chat(mistral, random_seed=1, service_tier="standard_only")  # the one tier there is
    assert seen(engine.submitted[-1]) == plain


def test_null_is_a_field_left_out(server, engine, mistral):
    chat(mistral, random_seed=1)
    plain = seen(engine.submitted[-1])
    chat(mistral, random_seed=1, n=None, logprobs=None, top_logprobs=None, temperature=None, metadata=None,
         prompt_cache_key=None, reasoning_effort=None, prompt_mode=None, guardrails=None, prompt_logprobs=None,
         top_prompt_logprobs=None, service_tier=None, min_tokens=None)
    assert seen(engine.submitted[-1]) == plain
    nulls = dict.fromkeys(["n", "stream", "logprobs", "safe_prompt", "stream_options", "tools", "tool_choice"])
    res = httpx.post(server[0] + "/v1/chat/completions", headers={"x-api-key": KEY},
                     json={"messages": QUESTION, "max_tokens": 64, "random_seed": 1, **nulls})
    assert res.status_code == 200 and len(res.json()["choices"]) == 1
    assert seen(engine.submitted[-1]) == plain


@pytest.mark.parametrize("field, value", [
    ("reasoning_effort", "high"), ("prompt_mode", "reasoning"), ("prompt_logprobs", True),
    ("top_prompt_logprobs", 2), ("guardrails", [{"block_on_error": True, "moderation_llm_v1": {}}]),
])
def test_what_this_server_cannot_give_is_refused_by_name(engine, mistral, field, value):
    error = refusal(lambda: chat(mistral, **{field: value}))
    assert error["param"] == field and error["message"].startswith(f"{field}: ")
    assert error["type"] == "invalid_request_error" and not engine.submitted


@pytest.mark.parametrize("field, value", [
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}), ("web_search_options", {}),
    ("functions", [{"name": "f", "parameters": {}}]), ("function_call", "auto"), ("verbosity", "low"), ("store", True),
])
def test_openais_fields_beyond_text_generation_are_refused_by_name(server, engine, field, value):
    res = httpx.post(server[0] + "/v1/chat/completions", headers={"x-api-key": KEY},
                     json={"messages": QUESTION, field: value})
    assert res.status_code == 400 and res.json()["error"]["param"] == field, res.text
    assert not engine.submitted


def test_openais_fields_that_ask_for_nothing_are_accepted(server, engine):
    res = httpx.post(server[0] + "/v1/chat/completions", headers={"x-api-key": KEY},
                     json={"messages": QUESTION, "modalities": ["text"], "verbosity": "medium", "store": False,
                           "safety_identifier": "user-1"})
    assert res.status_code == 200, res.text


@pytest.mark.parametrize("tier", ["priority", "flex", "scale"])
def test_a_service_tier_other_than_the_one_there_is_is_refused(server, engine, tier):
    # the SDK only sends Mistral's tiers, both served; OpenAI's others come from other clients
    res = httpx.post(server[0] + "/v1/chat/completions", headers={"x-api-key": KEY},
                     json={"messages": QUESTION, "service_tier": tier})
    assert res.status_code == 400 and res.json()["error"]["param"] == "service_tier"
    assert tier in res.json()["error"]["message"] and not engine.submitted


# ---------------------------------------------------------------------------------------------- fill in the middle
def test_fim_complete(tok, engine, mistral):
    engine.script = lambda req: answer(tok, "a + b")
    out = mistral.fim.complete(model=MODEL, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))",
                               max_tokens=16, temperature=0, top_p=1, random_seed=3, stop=["\n"])
    submitted = engine.submitted[-1]
    assert submitted.prompt == tok.encode_fim("def add(a, b):\n    return ", "\n\nprint(add(1, 2))")
    assert submitted.seed == 3 and submitted.max_tokens == 16
    assert out.choices[0].message.content == " a + b" and out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(submitted.prompt)


def test_fim_accepts_metadata_and_a_prompt_cache_key(engine, mistral):
    mistral.fim.complete(model=MODEL, prompt="x = ", suffix="\n", random_seed=2)
    plain = seen(engine.submitted[-1])
    mistral.fim.complete(model=MODEL, prompt="x = ", suffix="\n", random_seed=2, metadata={"file": "a.py"},
                         prompt_cache_key="repo-1")
    assert seen(engine.submitted[-1]) == plain


def test_fim_stream(tok, engine, mistral):
    engine.script = lambda req: answer(tok, "a + b")
    events = list(mistral.fim.stream(model=MODEL, prompt="def add(a, b):\n    return ", suffix="\n"))
    assert "".join(e.data.choices[0].delta.content or "" for e in events) == " a + b"
    assert events[-1].data.choices[0].finish_reason == "stop"


def test_fim_refuses_min_tokens(mistral):
    error = refusal(lambda: mistral.fim.complete(model=MODEL, prompt="x = ", min_tokens=2))
    assert error["param"] == "min_tokens"


def test_fim_without_fim_tokens_is_a_400_that_says_so(smollm2_gguf_path):
    smol = load_tokenizer(smollm2_gguf_path)
    with live_server(create_app(ScriptedEngine(smol), smol, "demo")) as url:
        with Mistral(api_key="unused", server_url=url) as client:
            (card,) = client.models.list().data
            assert not card.capabilities.completion_fim
            error = refusal(lambda: client.fim.complete(model="demo", prompt="def f(", suffix=")"))
    assert error["param"] == "model" and error["code"] == "fim_not_supported"
    assert "fill-in-the-middle" in error["message"]
