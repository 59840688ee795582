"""Anthropic's Messages API, driven by the official `anthropic` client: plain answers, system prompts,
stop sequences, streaming, tools (any, a named tool, a tool_result round trip), count_tokens, and
errors in Anthropic's shape.

A scripted engine behind a live uvicorn, with a real Mistral v3 tokenizer (tool-call tokens).
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
from scripted import KEY, MODEL, answer, scripted_server, tool_call

from tramontane.server.limits import ServerLimits

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "description": "The time in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    with anthropic.Anthropic(base_url=server[0], api_key=KEY, max_retries=0) as c:
        yield c


def create(client, **kw):
    return client.messages.create(**{"model": MODEL, "messages": QUESTION, "max_tokens": 64, **kw})


def prompt_text(tok, engine) -> str:
    return tok.decode(engine.submitted[-1].prompt)


# ---------------------------------------------------------------------------------------------- messages
def test_a_plain_answer_in_anthropic_shape(client, engine, tok):
    engine.script = lambda req: answer(tok, "It is sunny.")
    msg = create(client)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "It is sunny."
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens == len(engine.submitted[-1].prompt) and msg.usage.output_tokens > 0


def test_the_system_prompt_reaches_the_model(client, engine, tok):
    create(client, system="Answer in French.")
    assert "Answer in French." in prompt_text(tok, engine)
    create(client, system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}])
    assert "Be brief.\nBe kind." in prompt_text(tok, engine)


def test_content_blocks_are_read_as_text(client, engine, tok):
    create(client, messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                          {"type": "text", "text": "there"}]}])
    assert "Hello\nthere" in prompt_text(tok, engine)


def test_max_tokens_ends_the_answer(client, engine, tok):
    engine.script = lambda req: tok.encode("one two three four five six", bos=False)
    msg = create(client, max_tokens=2)
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 2


def test_a_stop_sequence_is_named(client, engine, tok):
    engine.script = lambda req: answer(tok, "one, two; three")
    msg = create(client, stop_sequences=["three", ";"])
    assert msg.content[0].text == "one, two" and msg.stop_reason == "stop_sequence" and msg.stop_sequence == ";"


def test_sampling_fields_reach_the_engine(client, engine):
    # the 2.x client no longer offers them as arguments; older clients and other tools still send them
    create(client, extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 7}, metadata={"user_id": "u1"})
    params = engine.submitted[-1].params
    assert (params.temperature, params.top_p, params.top_k) == (0.5, 0.9, 7)


# ---------------------------------------------------------------------------------------------- streaming
def test_a_stream_delivers_text_deltas_and_the_final_message(client, engine, tok):
    engine.script = lambda req: answer(tok, "It is sunny in Paris today.")
    with client.messages.stream(model=MODEL, max_tokens=64, messages=QUESTION) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(deltas) > 1 and "".join(deltas) == "It is sunny in Paris today."
    assert final.content[0].text == "It is sunny in Paris today." and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(answer(tok, "It is sunny in Paris today.")) - 1


def test_the_event_sequence_is_anthropics(server, engine, tok):
    engine.script = lambda req: answer(tok, "Hi")
    body = {"model": MODEL, "max_tokens": 8, "messages": QUESTION, "stream": True}
    with httpx.stream("POST", f"{server[0]}/v1/messages", json=body, headers={"x-api-key": KEY}) as res:
        lines = [line for line in res.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names


def test_a_streamed_tool_call_arrives_as_input_json(client, engine, tok):
    engine.script = lambda req: tool_call(tok, "get_weather", {"city": "Paris"})
    with client.messages.stream(model=MODEL, max_tokens=64, messages=QUESTION, tools=[WEATHER],
                                tool_choice={"type": "any"}) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert kinds == ["input_json_delta"]
    (block,) = final.content
    assert block.type == "tool_use" and block.input == {"city": "Paris"} and final.stop_reason == "tool_use"


# ---------------------------------------------------------------------------------------------- tools
def test_tool_choice_any_gives_a_tool_use_block(client, engine, tok):
    engine.script = lambda req: tool_call(tok, "get_weather", {"city": "Paris"})
    msg = create(client, tools=[WEATHER, TIME], tool_choice={"type": "any"})
    (block,) = msg.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.id
    jsonschema.validate(block.input, WEATHER["input_schema"])
    assert msg.stop_reason == "tool_use"
    assert engine.submitted[-1].grammar is not None  # the call is enforced, not hoped for


def test_a_named_tool_is_forced(client, engine, tok):
    engine.script = lambda req: tool_call(tok, "get_time", {"city": "Paris"})
    msg = create(client, tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_time"})
    assert msg.content[0].name == "get_time" and msg.content[0].input == {"city": "Paris"}
    grammar = engine.submitted[-1].grammar
    assert "get_time" in grammar and "get_weather" not in grammar


def test_tool_choice_none_hides_the_tools(client, engine, tok):
    create(client, tools=[WEATHER], tool_choice={"type": "none"})
    assert "get_weather" not in prompt_text(tok, engine)
    create(client, tools=[WEATHER], tool_choice={"type": "auto"})
    assert "get_weather" in prompt_text(tok, engine) and engine.submitted[-1].grammar is None


def test_a_tool_result_round_trip(client, engine, tok):
    engine.script = lambda req: tool_call(tok, "get_weather", {"city": "Paris"})
    first = create(client, tools=[WEATHER], tool_choice={"type": "any"})
    (call,) = first.content
    engine.script = lambda req: answer(tok, "It is 21 degrees in Paris.")
    conversation = [*QUESTION, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                  "content": "21 degrees, sunny"}]}]
    second = create(client, tools=[WEATHER], messages=conversation)
    assert second.content[0].text == "It is 21 degrees in Paris." and second.stop_reason == "end_turn"
    seen = prompt_text(tok, engine)
    assert "21 degrees, sunny" in seen and "get_weather" in seen


def test_anthropic_tool_ids_are_accepted(client, engine, tok):
    """Ids another Anthropic server made (toolu_...) reach a Mistral template in the form it accepts."""
    conversation = [*QUESTION, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                                      "content": [{"type": "text", "text": "rain"}], "is_error": False},
                                     {"type": "text", "text": "And tomorrow?"}]}]
    create(client, tools=[WEATHER], messages=conversation)
    seen = prompt_text(tok, engine)
    assert "rain" in seen and "And tomorrow?" in seen


# ---------------------------------------------------------------------------------------------- count_tokens
def test_count_tokens_is_the_prompt_the_model_would_see(client, engine):
    counted = client.messages.count_tokens(model=MODEL, messages=QUESTION, system="Be brief.", tools=[WEATHER])
    create(client, system="Be brief.", tools=[WEATHER])
    assert counted.input_tokens == len(engine.submitted[-1].prompt) > 0


# ---------------------------------------------------------------------------------------------- errors
def bad_request(call) -> str:
    with pytest.raises(anthropic.BadRequestError) as e:
        call()
    body = e.value.body
    assert e.value.status_code == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]["message"]


def test_max_tokens_is_required(server):
    res = httpx.post(f"{server[0]}/v1/messages", json={"model": MODEL, "messages": QUESTION},
                     headers={"x-api-key": KEY})
    assert res.status_code == 400
    assert res.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                     "message": "max_tokens: Field required"}}


def test_bad_fields_are_named(client):
    assert bad_request(lambda: create(client, extra_body={"temperature": 1.5})).startswith("temperature:")
    assert bad_request(lambda: create(client, max_tokens=0)).startswith("max_tokens:")
    message = bad_request(lambda: create(client, messages=[{"role": "user", "content": [{"type": "image"}]}]))
    assert message.startswith("messages.0.content.0")
    assert bad_request(lambda: create(client, tools=[{"name": "x"}])).startswith("tools.0.input_schema:")


def test_a_tool_result_must_answer_a_tool_use(client):
    stray = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "abc", "content": "x"}]}]
    assert bad_request(lambda: create(client, messages=stray)).startswith("messages.0.content.0.tool_use_id:")


def test_tool_choice_errors_are_named(client):
    assert "tool_choice" in bad_request(lambda: create(client, tool_choice={"type": "any"}))
    assert bad_request(lambda: create(client, tools=[WEATHER], tool_choice={"type": "tool"})).startswith(
        "tool_choice.name:")
    assert "no tool named 'nope'" in bad_request(
        lambda: create(client, tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}))
    assert bad_request(lambda: create(client, tools=[WEATHER], tool_choice={
        "type": "auto", "disable_parallel_tool_use": True})).startswith("tool_choice.disable_parallel_tool_use:")


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(anthropic.NotFoundError) as e:
        create(client, model="claude-opus-4")
    assert e.value.body["error"]["type"] == "not_found_error" and "claude-opus-4" in e.value.body["error"]["message"]


def test_an_over_long_prompt_is_refused(client, engine):
    message = bad_request(lambda: create(client, max_tokens=engine.max_seq_len))
    assert message.startswith("max_tokens:")
    long = [{"role": "user", "content": "word " * 400}]
    assert bad_request(lambda: create(client, messages=long)).startswith("messages:")


def test_a_wrong_key_is_an_authentication_error(server):
    with anthropic.Anthropic(base_url=server[0], api_key="wrong", max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError) as e:
            create(c)
    assert e.value.body["error"]["type"] == "authentication_error"


def test_other_paths_keep_openais_shape(server):
    res = httpx.post(f"{server[0]}/v1/chat/completions", json={"model": MODEL}, headers={"x-api-key": KEY})
    assert res.status_code == 400 and res.json()["error"]["param"] == "messages"


def test_a_failure_mid_stream_is_an_error_event(client, engine):
    engine.finish = "error"
    with pytest.raises(anthropic.APIStatusError) as e:
        with client.messages.stream(model=MODEL, max_tokens=8, messages=QUESTION) as stream:
            stream.get_final_message()
    assert "generation failed" in str(e.value)


def test_the_servers_limits_and_host_check_answer_in_anthropics_shape():
    limits = ServerLimits(max_request_bytes=2000, max_prompt_chars=100)
    with scripted_server(MODEL, limits=limits) as (url, _):
        def post(body: dict, **headers: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/messages", json=body, headers=headers)

        ok = {"model": MODEL, "max_tokens": 8, "messages": QUESTION}
        assert post(ok).status_code == 200
        wrong_host = post(ok, host="evil.example")
        assert wrong_host.status_code == 403 and wrong_host.json()["error"]["type"] == "permission_error"
        too_big = post({**ok, "system": "x" * 3000})
        assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "request_too_large"
        too_long = post({**ok, "system": "x" * 150})
        assert too_long.status_code == 400 and too_long.json()["error"]["message"].startswith("messages:")
