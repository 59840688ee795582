"""The server's OpenAI plumbing with a scripted engine and a real Mistral tokenizer: tool calls,
fill-in-the-middle, a full queue, deadlines and engine errors, choice ordering. No model runs here."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mistral_common
import openai
import pytest
from live_server import live_server
from scripted import ScriptedEngine

from tramontane import load_tokenizer
from tramontane.server import create_app

V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
MODEL = "scripted"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tok):
    engine = ScriptedEngine(tok)
    with live_server(create_app(engine, tok, MODEL, request_timeout=30)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def tool_call_output(tok, payload: str = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]') -> list[int]:
    marker = next(i for i in range(tok.vocab_size) if tok.is_special(i) and tok.id_to_piece(i) == "[TOOL_CALLS]")
    return [marker, *tok.encode(payload, bos=False), tok.eos_id]


def test_tools_reach_the_prompt(tok, engine, client):
    client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
    assert engine.submitted[-1].prompt == tok.encode_chat(QUESTION, tools=TOOLS) != tok.encode_chat(QUESTION)
    client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none")
    assert engine.submitted[-1].prompt == tok.encode_chat(QUESTION)


def test_tool_calls_come_back_as_openai_tool_calls(tok, engine, client):
    engine.script = lambda req: tool_call_output(tok)
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and len(call.id) == 9
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the call and its result go back into the conversation
    follow = [*QUESTION, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    engine.script = lambda req: tok.encode("It is 21 degrees.", bos=False) + [tok.eos_id]
    answer = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS)
    assert answer.choices[0].message.content == "It is 21 degrees." and answer.choices[0].finish_reason == "stop"


def test_streamed_tool_calls(tok, engine, client):
    engine.script = lambda req: tool_call_output(tok)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_malformed_tool_call_is_text(tok, engine, client):
    engine.script = lambda req: tool_call_output(tok, '[{"name": "get_weather", "arguments": {"city"')
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content.startswith('[{"name": "get_weather"')
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_tool_call_tokens_without_tools_are_text(tok, engine, client):
    engine.script = lambda req: tool_call_output(tok)
    out = client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls is None
    assert "get_weather" in out.choices[0].message.content


def test_fill_in_the_middle(tok, engine, client):
    engine.script = lambda req: tok.encode("a + b", bos=False) + [tok.eos_id]
    out = client.completions.create(model=MODEL, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))")
    assert engine.submitted[-1].prompt == tok.encode_fim("def add(a, b):\n    return ", "\n\nprint(add(1, 2))")
    # a completion continues its prompt's text, so it keeps the space of its first piece ('▁a')
    assert out.choices[0].text == " a + b" and out.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 2, 3], suffix="x")
    assert e.value.body["param"] == "suffix"


def test_choices_are_ordered_prompt_major(tok, engine, client):
    engine.script = lambda req: tok.encode(f"seed {req.seed} prompt {len(req.prompt)}", bos=False)
    out = client.completions.create(model=MODEL, prompt=["a", "a b c"], n=2, seed=5, max_tokens=30)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    lengths = [len(tok.encode(p)) for p in ("a", "a b c")]
    assert [c.text for c in out.choices] == [f" seed {s} prompt {n}" for n in lengths for s in (5, 6)]
    assert out.usage.prompt_tokens == sum(lengths)


def test_an_empty_prompt_continues_from_bos_alone(tok, engine, client):
    out = client.completions.create(model=MODEL, prompt="", max_tokens=4)
    assert engine.submitted[-1].prompt == [tok.bos_id] and out.usage.prompt_tokens == 1
    assert out.choices[0].finish_reason == "length"
    client.completions.create(model=MODEL, prompt=["", "a"], max_tokens=4)
    assert [r.prompt for r in engine.submitted[-2:]] == [[tok.bos_id], tok.encode("a")]
    for nothing in ([], [[]]):  # no token at all, not even BOS: nothing to continue from
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=nothing, max_tokens=4)
        assert e.value.body["param"] == "prompt"


def test_an_empty_prompt_is_bos_where_a_text_gets_none(smollm2_gguf_path):
    smol = load_tokenizer(smollm2_gguf_path)  # SmolLM2 puts no BOS before a text: "" alone would be no token
    assert smol.encode("", bos=True) == [] and smol.bos_id is not None
    engine = ScriptedEngine(smol)
    with live_server(create_app(engine, smol, "demo")) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as smol_client:
            smol_client.completions.create(model="demo", prompt="", max_tokens=4)
            assert engine.submitted[-1].prompt == [smol.bos_id]
            smol_client.completions.create(model="demo", prompt="Hi", max_tokens=4)
            assert engine.submitted[-1].prompt == smol.encode("Hi")  # a text still gets no BOS


def test_completion_stream_usage_and_logprobs(tok, engine, client):
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=10, logprobs=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tok.encode("Hello there", bos=False))
    assert all(x == -0.25 for c in chunks[:-1] if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs)
    assert chunks[-2].choices[0].finish_reason == "length"
    chat = list(client.chat.completions.create(model=MODEL, messages=QUESTION, logprobs=True, stream=True))
    entries = [e for c in chat if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert b"".join(bytes(e.bytes) for e in entries).decode() == "Hello there"
    assert {e.logprob for e in entries} == {-0.25}


def test_content_parts_are_joined(tok, engine, client):
    parts = [{"type": "text", "text": "What is the weather"}, {"type": "text", "text": "in Paris?"}]
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}])
    expected = tok.encode_chat([{"role": "user", "content": "What is the weather\nin Paris?"}])
    assert engine.submitted[-1].prompt == expected
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_full_queue_is_503(server, engine, client):
    engine.full = True
    res = httpx.post(server[0] + "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert res.status_code == 503
    assert res.json()["error"]["code"] == "queue_full" and res.json()["error"]["type"] == "server_error"
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="x")


@pytest.mark.parametrize("finish, status", [("timeout", 504), ("error", 500)])
def test_deadline_and_engine_errors(server, engine, client, finish, status):
    engine.finish = finish
    res = httpx.post(server[0] + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50})
    assert res.status_code == status and set(res.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIError) as e:
        list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=50, stream=True))
    assert e.value.body["type"] == ("timeout_error" if finish == "timeout" else "server_error")


def test_bad_conversations(server, engine):
    def status(body: dict) -> tuple[int, str | None]:
        res = httpx.post(server[0] + "/v1/chat/completions", json={"model": MODEL, **body})
        return res.status_code, res.json().get("error", {}).get("param")

    assert status({"messages": [{"role": "tool", "content": "x", "tool_call_id": "abcdefghi"}]}) == (400, "messages")
    assert status({"messages": QUESTION, "tools": [{"type": "function"}]}) == (400, "tools[0]")
    assert status({"messages": QUESTION, "tool_choice": "auto"}) == (400, "tool_choice")
    assert status({"messages": QUESTION, "response_format": {"type": "xml"}}) == (400, "response_format.type")
    assert status({"messages": "hello"}) == (400, "messages")
    assert status({"messages": QUESTION, "stop": 3}) == (400, "stop")
    assert not engine.submitted


def test_grammars_reach_the_engine(tok, engine, client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.chat.completions.create(model=MODEL, messages=QUESTION, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert engine.submitted[-1].grammar is not None and "json_schema" in engine.submitted[-1].grammar
    client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required")
    forced = engine.submitted[-1].grammar
    assert forced is not None and "get_weather" in forced
    client.completions.create(model=MODEL, prompt="x", extra_body={"response_format": {"type": "json_object"}})
    assert engine.submitted[-1].grammar is not None
    client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert engine.submitted[-1].grammar is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    assert e.value.body["param"] == "tool_choice"
