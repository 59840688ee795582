"""OpenAI's Responses API, driven by the official `openai` client: plain answers, instructions, the token
budget, streaming events, function calls (a round trip through previous_response_id), json_schema output,
the store (retrieve, delete, continuity, its bound), refused fields, and the server's key and limits.

A scripted engine behind a live uvicorn, with a real Mistral v3 tokenizer (tool-call tokens).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from scripted import KEY, MODEL, answer, scripted_server, tool_call

from tramontane.server.limits import ServerLimits
from tramontane.server.responses import ResponseStore

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
TIME = {**WEATHER, "name": "get_time", "description": "The time in a city"}
QUESTION = "What is the weather in Paris?"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def create(client, **kw):
    return client.responses.create(**{"model": MODEL, "input": QUESTION, **kw})


def prompt_text(tok, engine) -> str:
    return tok.decode(engine.submitted[-1].prompt)


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    body = e.value.body
    assert e.value.status_code == 400 and isinstance(body, dict) and body["type"] == "invalid_request_error"
    return body


# ---------------------------------------------------------------------------------------------- answers
def test_a_plain_answer_in_openais_shape(client, engine, tok):
    engine.script = lambda req: answer(tok, "It is sunny.")
    res = create(client)
    assert res.object == "response" and res.id.startswith("resp_") and res.model == MODEL
    assert res.status == "completed" and res.incomplete_details is None and res.error is None
    (item,) = res.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert res.output_text == "It is sunny."
    assert res.usage.input_tokens == len(engine.submitted[-1].prompt)
    assert res.usage.output_tokens == len(answer(tok, "It is sunny.")) - 1
    assert res.usage.total_tokens == res.usage.input_tokens + res.usage.output_tokens


def test_instructions_come_first_as_the_system_prompt(client, engine, tok):
    res = create(client, instructions="Answer in French.")
    seen = prompt_text(tok, engine)
    assert "Answer in French." in seen and QUESTION in seen and res.instructions == "Answer in French."


def test_message_items_of_every_role_reach_the_model(client, engine, tok):
    create(client, input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}, {"type": "input_text", "text": "there"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!", "annotations": []}]},
        {"role": "user", "content": "How are you?"}])
    seen = prompt_text(tok, engine)
    assert all(s in seen for s in ("Be brief.", "Hello\nthere", "Hi!", "How are you?"))


def test_sampling_fields_reach_the_engine(client, engine):
    create(client, temperature=0.5, top_p=0.9, metadata={"k": "v"}, user="u1", parallel_tool_calls=True,
           truncation="disabled")
    params = engine.submitted[-1].params
    assert (params.temperature, params.top_p) == (0.5, 0.9)


def test_max_output_tokens_makes_an_incomplete_response(client, engine, tok):
    engine.script = lambda req: tok.encode("one two three four five six", bos=False)
    res = create(client, max_output_tokens=2)
    assert engine.submitted[-1].max_tokens == 2
    assert res.status == "incomplete" and res.incomplete_details.reason == "max_output_tokens"
    assert res.usage.output_tokens == 2 and res.output[0].status == "incomplete"


# ---------------------------------------------------------------------------------------------- streaming
def test_a_stream_follows_openais_event_sequence(client, engine, tok):
    engine.script = lambda req: answer(tok, "It is sunny in Paris today.")
    events = list(create(client, stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert len(deltas) > 1 and "".join(deltas) == "It is sunny in Paris today."
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.output_text == "It is sunny in Paris today." and final.usage.output_tokens > 0
    assert events[-2].item.id == events[2].item.id == final.output[0].id


def test_the_clients_stream_helper_assembles_the_final_response(client, engine, tok):
    engine.script = lambda req: answer(tok, "Hello world, twice.")
    with client.responses.stream(model=MODEL, input=QUESTION) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello world, twice."


def test_a_streamed_function_call_arrives_as_argument_events(client, engine, tok):
    engine.script = lambda req: tool_call(tok, "get_weather", {"city": "Paris"})
    events = list(create(client, stream=True, tools=[WEATHER], tool_choice="required"))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert json.loads(events[4].arguments) == {"city": "Paris"} and events[4].item_id == events[5].item.id
    (item,) = events[-1].response.output
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id


def test_a_stream_that_hits_the_budget_ends_incomplete(client, engine, tok):
    engine.script = lambda req: tok.encode("one two three four five six", bos=False)
    last = list(create(client, stream=True, max_output_tokens=3))[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"


def test_a_failure_mid_stream_is_a_failed_response(client, engine):
    engine.finish = "error"
    last = list(create(client, stream=True))[-1]
    assert last.type == "response.failed" and last.response.status == "failed"
    assert "generation failed" in last.response.error.message


def test_a_streamed_response_is_stored(client, engine, tok):
    engine.script = lambda req: answer(tok, "Stored.")
    final = list(create(client, stream=True))[-1].response
    assert client.responses.retrieve(final.id).output_text == "Stored."


# ---------------------------------------------------------------------------------------------- tools
def test_a_function_call_round_trip(client, engine, tok):
    engine.script = lambda req: tool_call(tok, "get_weather", {"city": "Paris"})
    first = create(client, tools=[WEATHER, TIME], tool_choice="required")
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert engine.submitted[-1].grammar is not None  # the call is enforced, not hoped for
    assert first.output_text == ""
    engine.script = lambda req: answer(tok, "It is 21 degrees in Paris.")
    second = create(client, tools=[WEATHER], previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees, sunny"}])
    assert second.output_text == "It is 21 degrees in Paris." and second.previous_response_id == first.id
    seen = prompt_text(tok, engine)
    assert QUESTION in seen and "get_weather" in seen and "21 degrees, sunny" in seen


def test_a_whole_conversation_with_foreign_call_ids(client, engine, tok):
    """Items another server made (call_... ids) reach a Mistral template in the form it accepts."""
    create(client, tools=[WEATHER], input=[
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_Xy12abcDEF34", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_Xy12abcDEF34", "output": "rain"},
        {"role": "user", "content": "And tomorrow?"}])
    seen = prompt_text(tok, engine)
    assert "rain" in seen and "And tomorrow?" in seen


def test_a_named_function_is_forced(client, engine, tok):
    engine.script = lambda req: tool_call(tok, "get_time", {"city": "Paris"})
    res = create(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_time"})
    assert res.output[0].name == "get_time"
    grammar = engine.submitted[-1].grammar
    assert "get_time" in grammar and "get_weather" not in grammar


def test_tool_choice_none_hides_the_tools(client, engine, tok):
    create(client, tools=[WEATHER], tool_choice="none")
    assert "get_weather" not in prompt_text(tok, engine)
    create(client, tools=[WEATHER])
    assert "get_weather" in prompt_text(tok, engine) and engine.submitted[-1].grammar is None


def test_an_output_must_answer_a_call(client):
    body = bad_request(lambda: create(client, input=[
        {"role": "user", "content": QUESTION}, {"type": "function_call_output", "call_id": "abc", "output": "x"}]))
    assert body["param"] == "input[1].call_id"


# ---------------------------------------------------------------------------------------------- structured output
def test_json_schema_output_is_enforced_and_valid(client, engine, tok):
    engine.script = lambda req: answer(tok, '{"name": "Ada", "age": 36}')
    res = create(client, text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(res.output_text), PERSON)
    assert engine.submitted[-1].grammar is not None and res.text.format.type == "json_schema"


def test_the_clients_parse_helper_reads_a_pydantic_model(client, engine, tok):
    class Person(BaseModel):
        name: str
        age: int

    engine.script = lambda req: answer(tok, '{"name": "Ada", "age": 36}')
    res = client.responses.parse(model=MODEL, input="Who wrote the first program?", text_format=Person)
    assert res.output_parsed == Person(name="Ada", age=36) and engine.submitted[-1].grammar is not None


def test_json_object_output_is_enforced(client, engine, tok):
    engine.script = lambda req: answer(tok, '{"ok": true}')
    res = create(client, text={"format": {"type": "json_object"}})
    assert json.loads(res.output_text) == {"ok": True} and engine.submitted[-1].grammar is not None


def test_a_schema_error_names_text_format(client):
    body = bad_request(lambda: create(client, text={"format": {"type": "json_schema", "schema": PERSON}}))
    assert body["param"] == "text.format.name" and body["message"].startswith("text.format.name:")


# ---------------------------------------------------------------------------------------------- the store
def test_previous_response_id_continues_the_conversation(client, engine, tok):
    engine.script = lambda req: answer(tok, "My name is Tramontane.")
    first = create(client, input="What is your name?", instructions="Speak like a pirate.")
    engine.script = lambda req: answer(tok, "Fine.")
    create(client, input="Say it again.", previous_response_id=first.id)
    seen = prompt_text(tok, engine)
    assert seen.index("What is your name?") < seen.index("My name is Tramontane.") < seen.index("Say it again.")
    assert "pirate" not in seen  # instructions are not carried on, as OpenAI does


def test_retrieve_and_delete(client, engine, tok):
    engine.script = lambda req: answer(tok, "Kept.")
    res = create(client)
    got = client.responses.retrieve(res.id)
    assert got.id == res.id and got.output_text == "Kept." and got.usage.output_tokens == res.usage.output_tokens
    client.responses.delete(res.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(res.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(res.id)


def test_store_false_keeps_nothing(client, engine):
    res = create(client, store=False)
    assert res.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(res.id)


def test_an_unknown_previous_response_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        create(client, previous_response_id="resp_nope")
    error = e.value.body
    assert error["param"] == "previous_response_id" and "resp_nope" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_the_store_drops_the_least_recently_used():
    store = ResponseStore(capacity=2)
    for rid in ("a", "b"):
        store.put({"id": rid}, [])
    assert store.get("a") is not None  # "b" is now the least recently used
    store.put({"id": "c"}, [])
    assert len(store) == 2 and store.get("b") is None and store.get("a") is not None


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("fields", "param"), [
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"extra_body": {"max_tool_calls": 2}}, "max_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(client, engine, fields, param):
    body = bad_request(lambda: create(client, **fields))
    assert body["param"] == param and body["message"].startswith(f"{param}:")
    assert not engine.submitted


def test_fields_that_ask_for_nothing_are_accepted(client, engine, tok):
    engine.script = lambda req: answer(tok, "Fine.")
    res = create(client, reasoning={"effort": None}, background=False, include=[], top_logprobs=0,
                 extra_body={"max_tool_calls": None, "conversation": None})
    assert res.output_text == "Fine."


def test_validation_errors_take_openais_shape(server):
    res = httpx.post(f"{server[0]}/v1/responses", json={"model": MODEL, "input": "Hi", "temperature": 3},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert res.status_code == 400 and set(res.json()["error"]) == {"message", "type", "param", "code"}
    assert res.json()["error"]["param"] == "temperature"


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        create(client, model="gpt-5")
    assert e.value.body["param"] == "model"


# ---------------------------------------------------------------------------------------------- the server's guards
def test_a_wrong_key_is_refused(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            create(c)


def test_an_over_long_conversation_names_input(client, engine):
    body = bad_request(lambda: create(client, input="word " * 400))
    assert body["param"] == "input" and body["message"].startswith("input:")
    body = bad_request(lambda: create(client, max_output_tokens=engine.max_seq_len))
    assert body["param"] == "max_output_tokens"


def test_a_full_queue_is_a_503(client, engine):
    engine.full = True
    with pytest.raises(openai.InternalServerError) as e:
        create(client)
    assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"


def test_the_servers_limits_and_host_check_guard_responses():
    limits = ServerLimits(max_request_bytes=2000, max_prompt_chars=100)
    with scripted_server(MODEL, limits=limits) as (url, _):
        def post(body: dict, **headers: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/responses", json=body, headers=headers)

        ok = {"model": MODEL, "input": "Hi"}
        assert post(ok).status_code == 200
        assert post(ok, host="evil.example").status_code == 403
        too_big = post({**ok, "instructions": "x" * 3000})
        assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "invalid_request_error"
        too_long = post({**ok, "instructions": "x" * 150})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"
