"""Random request bodies against the server (hypothesis), in process through FastAPI's TestClient over
a scripted engine, with SmolLM2's tokenizer (a chat template, a Rust backend) and Mistral's (tool
schemas checked by mistral_common): no body gets a 500, every error is OpenAI's shape, and a JSON
object that is refused names the `param` at fault.

Bodies mix plausible values for each field with arbitrary JSON (lone surrogates, NUL, huge numbers,
NaN, wrong types, nesting). Bounded: a fixed number of examples, derandomized, so it runs in seconds.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import mistral_common
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import ScriptedEngine

from tramontane import load_tokenizer
from tramontane.server import create_app

MODEL = "scripted"
V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
FUZZ = settings(max_examples=60, deadline=timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# text of any characters, with the ones that break tokenizers or templates drawn often (joined from
# pieces: st.text never draws lone surrogates)
odd = st.sampled_from(["\ud800", "\udfff", "\udc80", "\x00", "\u2028", "\ufffd", "é"])
markup = st.sampled_from(["[INST]", "<|im_start|>", "</s>", "{{", "{%"])
text = st.lists(st.text(max_size=6) | odd | markup, max_size=3).map("".join)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=12)


def sometimes_junk(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Inside a structure, mostly the plausible value, now and then any JSON."""
    return st.one_of(plausible, plausible, plausible, json_values)


ids = st.lists(st.integers(-5, 40000), min_size=0, max_size=6)
content = text | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                 "text": sometimes_junk(text)}), max_size=3)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]),
                                 "content": sometimes_junk(content)},
                                optional={"tool_call_id": text, "tool_calls": json_values, "name": text})
function = st.fixed_dictionaries({"name": sometimes_junk(st.sampled_from(["w", "get_weather", ""]))},
                                 optional={"description": sometimes_junk(text), "parameters": json_values})
tool = st.fixed_dictionaries({"type": sometimes_junk(st.just("function")), "function": sometimes_junk(function)})
tool_choice = st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": sometimes_junk(st.fixed_dictionaries({"name": sometimes_junk(st.just("w"))}))})

# plausible values: mostly valid, with the edges of each range
GENERATION = {
    "model": st.just(MODEL) | text,
    "max_tokens": st.integers(-1, 300),
    "temperature": st.floats(-0.5, 2.5),
    "top_p": st.floats(0, 1.5),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(-0.5, 1.5),
    "repetition_penalty": st.floats(-1, 3),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "n": st.integers(-1, 130),
    "stop": text | st.lists(text, max_size=20),
    "seed": st.integers(-1, 2**64),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": text,
}
COMPLETION = {**GENERATION, "prompt": text | st.lists(text, max_size=4) | ids | st.lists(ids, max_size=3),
              "suffix": text, "echo": st.booleans(), "logprobs": st.integers(-1, 6), "best_of": st.integers(0, 3)}
CHAT = {**GENERATION, "messages": st.lists(message, max_size=4), "tools": st.lists(tool, max_size=3),
        "tool_choice": tool_choice, "logprobs": st.booleans(), "top_logprobs": st.integers(-1, 21),
        "max_completion_tokens": st.integers(-1, 300),
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})}
TOKENIZE = {"model": GENERATION["model"], "prompt": text, "messages": st.lists(message, max_size=3),
            "tools": st.lists(tool, max_size=2), "add_special_tokens": st.booleans()}


def bodies(fields: dict[str, st.SearchStrategy], required: str) -> st.SearchStrategy:
    """A JSON object of plausible values for `required` and some other fields, with up to two fields (or an
    unknown key) replaced by any JSON; rarely, any JSON at all."""
    others = {k: v for k, v in fields.items() if k != required}
    plausible = st.fixed_dictionaries({required: fields[required]}, optional=others)
    junk = st.dictionaries(st.sampled_from([*fields, "unknown"]), json_values, max_size=2)
    objects = st.builds(lambda body, replaced: {**body, **replaced}, plausible, st.just({}) | junk)
    return st.one_of(objects, objects, objects, json_values)


@pytest.fixture(scope="module", params=["smollm2", "mistral-v3"])
def client(request, smollm2_gguf_path):
    tok = load_tokenizer(smollm2_gguf_path if request.param == "smollm2" else V3)
    with TestClient(create_app(ScriptedEngine(tok), tok, MODEL), base_url="http://localhost") as c:
        yield c


def check(client: TestClient, path: str, body: object) -> None:
    res = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert res.status_code < 500, (body, res.text)
    if res.status_code == 200:
        if isinstance(body, dict) and body.get("stream") is True:
            assert res.text.endswith("data: [DONE]\n\n"), (body, res.text)
        return
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, res.text)
    if res.status_code == 400 and isinstance(body, dict):
        assert isinstance(error["param"], str) and error["param"], (body, res.text)


@FUZZ
@given(body=bodies(COMPLETION, "prompt"))
def test_completions_never_500(client, body):
    check(client, "/v1/completions", body)


@FUZZ
@given(body=bodies(CHAT, "messages"))
def test_chat_completions_never_500(client, body):
    check(client, "/v1/chat/completions", body)


@FUZZ
@given(body=bodies(TOKENIZE, "prompt"))
def test_tokenize_never_500(client, body):
    check(client, "/tokenize", body)
