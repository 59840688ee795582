"""The OpenAI-compatible server on the real SmolLM2 model, through the official `openai` client.

One live server (uvicorn on 127.0.0.1, in a background thread) serves every test of this module.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
from live_server import live_server

from tramontane import load_model, load_tokenizer
from tramontane.engine import Engine
from tramontane.server import create_app

KEY = "test-key"
MODEL = "smollm2"
CONTEXT = 512


@pytest.fixture(scope="module")
def served(smollm2_gguf_path):
    tokenizer = load_tokenizer(smollm2_gguf_path)
    # the float model: its answers are the ones these tests read (the file's own blocks, rounding the
    # activations to int8, answer "What is the capital of France?" with another near-tie first token)
    model = load_model(smollm2_gguf_path, dequantize=True)
    engine = Engine(model, tokenizer, max_batch=8, max_queue=64, max_seq_len=CONTEXT)
    app = create_app(engine, tokenizer, MODEL, api_key=KEY, request_timeout=120)
    with live_server(app) as url:
        yield url, engine, model, tokenizer


@pytest.fixture(scope="module")
def client(served):
    url = served[0]
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def ask(client, question: str, **kw):
    kw = {"max_tokens": 16, "temperature": 0, **kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **kw)


def post(served, path: str, body, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers["Content-Type"] = "application/json"
    return httpx.post(served[0] + path, content=content, headers=headers, timeout=timeout)


def metric(served, name: str) -> float:
    text = httpx.get(served[0] + "/metrics").text
    line = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_and_metrics(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(served[0] + "/health").json()["status"] == "ok"
    assert client.models.retrieve(MODEL).id == MODEL
    res = httpx.get(served[0] + "/metrics")  # open without the key, like /health
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    assert "tramontane_generation_tokens_total" in res.text


def test_chat_completion(client):
    out = ask(client, "What is the capital of France?", max_tokens=24)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == MODEL
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert out.usage.prompt_tokens > 10 and 0 < out.usage.completion_tokens <= 24
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_a_shared_system_prompt_comes_from_the_prefix_cache(client):
    system = {"role": "system", "content": "You are a terse geography tutor. " * 8}
    asks = [[system, {"role": "user", "content": q}] for q in ("Capital of Italy?", "Capital of Spain?")]
    first, second = (client.chat.completions.create(model=MODEL, messages=m, max_tokens=8, temperature=0)
                     for m in asks)
    shared = first.usage.prompt_tokens - 12  # the system prompt's tokens, roughly: blocks of 16 of them
    assert second.usage.prompt_tokens_details.cached_tokens >= shared // 16 * 16 - 16 > 0
    assert second.usage.prompt_tokens_details.cached_tokens % 16 == 0
    # a repeat reuses even more of its prompt and answers the same (engine tests compare with no cache)
    again = client.chat.completions.create(model=MODEL, messages=asks[1], max_tokens=8, temperature=0)
    assert again.choices[0].message.content == second.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens_details.cached_tokens


def test_chat_stream_matches_non_streamed(client):
    whole = ask(client, "Name three colors.")
    chunks = list(ask(client, "Name three colors.", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", served[0] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        raw = res.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "length"


def test_completion_text_tokens_and_echo(served, client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8
    ids = post(served, "/tokenize", {"prompt": "The capital of France is"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "The capital of France is" + out.choices[0].text


def test_completion_list_of_prompts_and_stream(client):
    prompts = ["1, 2, 3,", "Once upon a time"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    assert [c.text for c in out.choices] == [s.choices[0].text for s in singles]
    streamed = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in out.choices]


def test_stop_strings(served, client, monkeypatch):
    """Stop strings cut the text where they start; the text is made off the engine thread (on the
    server's event loop), and a request its text stopped leaves the engine too."""
    from tramontane.textgen import TextTracker

    threads: set[str] = set()
    feed = TextTracker.feed

    def spied(self, token):
        threads.add(threading.current_thread().name)
        return feed(self, token)

    monkeypatch.setattr(TextTracker, "feed", spied)
    full = ask(client, "What is the capital of France?", max_tokens=24).choices[0].message.content
    word = full.split()[3]
    out = ask(client, "What is the capital of France?", max_tokens=24, stop=[word, "zzz"])
    assert out.choices[0].message.content == full[: full.index(word)]
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens < 24
    assert threads and "tramontane-engine" not in threads
    engine = served[1]
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active == 0


def test_seeds_and_n(client):
    kw = dict(temperature=1.0, max_tokens=12)
    singles = [ask(client, "Tell me a story.", seed=11 + j, **kw) for j in range(3)]
    again = ask(client, "Tell me a story.", seed=11, **kw)
    assert again.choices[0].message.content == singles[0].choices[0].message.content
    several = ask(client, "Tell me a story.", seed=11, n=3, **kw)
    assert [c.index for c in several.choices] == [0, 1, 2]
    # choice j is sampled with seed + j, exactly as a request of its own
    assert [c.message.content for c in several.choices] == [s.choices[0].message.content for s in singles]
    assert len({c.message.content for c in several.choices}) > 1
    assert several.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert several.usage.prompt_tokens == singles[0].usage.prompt_tokens
    streamed: dict[int, str] = {}
    roles = set()
    for chunk in ask(client, "Tell me a story.", seed=11, n=3, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            if c.delta.role:
                roles.add(c.index)
    assert roles == {0, 1, 2}
    assert [streamed[i] for i in range(3)] == [c.message.content for c in several.choices]


def test_chat_logprobs_match_the_model(served, client):
    _, _, model, tokenizer = served
    out = ask(client, "What is 2+2?", max_tokens=8, logprobs=True, top_logprobs=5)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert b"".join(bytes(c.bytes) for c in content).decode() == out.choices[0].message.content
    by_bytes = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size) if not tokenizer.is_special(i)}
    generated = [by_bytes[bytes(c.bytes)] for c in content]
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated]))[0]
    logp = torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : -1]  # [generated, vocab]
    expected = logp.gather(-1, torch.tensor(generated)[:, None])
    assert [c.logprob for c in content] == pytest.approx(expected[:, 0].tolist(), abs=2e-3)
    best_values, best_ids = logp.topk(5, dim=-1)
    for c, ids, values in zip(content, best_ids.tolist(), best_values.tolist()):
        assert len(c.top_logprobs) == 5
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)  # greedy: the chosen token is best
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(values, abs=2e-3)
        assert [bytes(t.bytes) for t in c.top_logprobs][:2] == [tokenizer.token_bytes(i) for i in ids][:2]
        assert all(t.token == bytes(t.bytes).decode("utf-8", errors="replace") for t in c.top_logprobs)
    streamed = [x for chunk in ask(client, "What is 2+2?", max_tokens=8, logprobs=True, top_logprobs=5, stream=True)
                for ch in chunk.choices if ch.logprobs for x in ch.logprobs.content]
    assert [t.logprob for x in streamed for t in x.top_logprobs] == \
        pytest.approx([t.logprob for x in content for t in x.top_logprobs], abs=1e-5)
    plain = ask(client, "What is 2+2?", max_tokens=4, logprobs=True)
    assert all(c.top_logprobs == [] for c in plain.choices[0].logprobs.content)


def test_top_logprobs_needs_logprobs_and_a_range(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Hi", top_logprobs=3)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Hi", logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"


def test_max_completion_tokens_is_max_tokens(client):
    out = ask(client, "Tell me a long story.", max_tokens=None, max_completion_tokens=5)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    same = ask(client, "Tell me a long story.", max_tokens=5, max_completion_tokens=5)
    assert same.choices[0].message.content == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Tell me a long story.", max_tokens=5, max_completion_tokens=6)
    assert e.value.body["param"] == "max_completion_tokens"


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                    logprobs=3)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.tokens) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert [len(top) for top in lp.top_logprobs] == [3] * 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) == pytest.approx(logprob, abs=1e-6)  # greedy: the chosen token leads
        assert top[token] == pytest.approx(logprob, abs=1e-6)
        assert list(top.values()) == sorted(top.values(), reverse=True)
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                            temperature=0, logprobs=3, stream=True))
    streamed = [x for c in chunks for x in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert streamed == pytest.approx(lp.token_logprobs)
    tops = [x for c in chunks for x in (c.choices[0].logprobs.top_logprobs if c.choices[0].logprobs else [])]
    assert [list(t) for t in tops] == [list(t) for t in lp.top_logprobs]
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=2, temperature=0,
                                       logprobs=0, echo=True)
    elp = echoed.choices[0].logprobs
    assert elp.top_logprobs[0] is None and elp.top_logprobs[-1] == {}
    assert "".join(elp.tokens) == echoed.choices[0].text


def test_tools_reach_the_template(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    out = ask(client, "What is the weather in Paris?", tools=tools, tool_choice="auto")
    assert out.choices[0].finish_reason in ("stop", "length")  # SmolLM2's template has no tool calling
    assert out.choices[0].message.tool_calls is None
    streamed = list(ask(client, "What is the weather in Paris?", tools=tools, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Hi", tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


# ---------------------------------------------------------------------------------------------- concurrency
def test_32_concurrent_clients_get_their_answers_alone(client):
    # 8 different requests (chat and completions, prompts of different lengths), each sent by 4 clients
    questions = ["What is 2 plus 3?", "Name a fruit.", "Why is the sky blue? Answer briefly, please.", "Hi!"]
    prompts = ["Item 7: the", "def fibonacci(n):", "The three primary colors are", "1, 2, 3, 4,"]

    def run(i: int) -> str:
        i %= 8
        if i < 4:
            return ask(client, questions[i]).choices[0].message.content
        return client.completions.create(model=MODEL, prompt=prompts[i - 4], max_tokens=16, temperature=0).choices[0].text

    alone = [run(i) for i in range(8)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, range(32)))
    assert together == alone * 4


def test_disconnect_mid_stream_frees_the_slot(served):
    _, engine, _, _ = served
    cancelled = metric(served, 'tramontane_requests_total{reason="cancelled"}')
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", served[0] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as res:
        lines = res.iter_lines()
        got = [line for line in (next(lines) for _ in range(4)) if line]
        assert got and all(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0
    assert metric(served, 'tramontane_requests_total{reason="cancelled"}') == cancelled + 1


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(served):
    _, engine, _, _ = served
    cancelled = metric(served, 'tramontane_requests_total{reason="cancelled"}')
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        post(served, "/v1/completions", body, timeout=0.5)
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0
    assert metric(served, 'tramontane_requests_total{reason="cancelled"}') == cancelled + 1


def test_serve_command(smollm2_gguf_path):
    port = free_port()
    cmd = [sys.executable, "-m", "tramontane.cli", "serve", "--model", str(smollm2_gguf_path), "--port", str(port),
           "--api-key", "k", "--served-model-name", "demo", "--max-batch", "2", "--max-seq-len", "256",
           "--speculative", "ngram", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # a cold start builds the native kernels first
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "tramontane serve did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as c:
            assert [m.id for m in c.models.list().data] == ["demo"]
            out = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
            assert out.usage.completion_tokens <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert f"serving demo at http://127.0.0.1:{port}/v1" in output and "speculative decoding: ngram" in output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- errors
def error_of(res: httpx.Response, status: int) -> dict:
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_auth(served):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    assert error_of(post(served, "/v1/completions", body, key=None), 401)["code"] == "invalid_api_key"
    assert error_of(post(served, "/v1/completions", body, key="wrong"), 401)["code"] == "invalid_api_key"
    assert error_of(post(served, "/v1/completions", "{not json", key=None), 401)  # the key is checked first
    assert httpx.get(served[0] + "/v1/models").status_code == 401
    assert post(served, "/v1/completions", body).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_logit_bias_forces_a_token_and_is_checked(served, client):
    bang = served[3].encode("!", bos=False)
    assert len(bang) == 1
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                    logit_bias={str(bang[0]): 100})
    assert out.choices[0].text.strip() == "!!!"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    bad = [{"x": 1}, {"5": 101}, {str(10**7): 1}]
    for bias in bad:
        assert error_of(post(served, "/v1/chat/completions", {**chat, "logit_bias": bias}), 400)["param"] == "logit_bias"


def test_bad_requests_get_openai_errors(served, client):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert error_of(post(served, "/v1/chat/completions", "{\"model\": "), 400)["code"] == "json_invalid"
    assert error_of(post(served, "/v1/chat/completions", {**chat, "temperature": -1}), 400)["param"] == "temperature"
    assert error_of(post(served, "/v1/chat/completions", {**chat, "temperature": "hot"}), 400)["param"] == "temperature"
    assert error_of(post(served, "/v1/chat/completions", {**chat, "top_p": 1.5}), 400)["param"] == "top_p"
    assert error_of(post(served, "/v1/chat/completions", {**chat, "n": 0}), 400)["param"] == "n"
    assert error_of(post(served, "/v1/chat/completions", {"model": MODEL}), 400)["param"] == "messages"
    assert error_of(post(served, "/v1/chat/completions", {**chat, "messages": []}), 400)["param"] == "messages"
    bad_roles = {**chat, "messages": [{"role": "robot", "content": "Hi"}]}
    assert error_of(post(served, "/v1/chat/completions", bad_roles), 400)["param"] == "messages"
    too_long = error_of(post(served, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": CONTEXT}), 400)
    assert too_long["param"] == "max_tokens" and too_long["code"] == "context_length_exceeded"
    huge = {**chat, "messages": [{"role": "user", "content": "word " * CONTEXT}]}
    assert error_of(post(served, "/v1/chat/completions", huge), 400)["code"] == "context_length_exceeded"
    assert error_of(post(served, "/v1/completions", {"model": MODEL, "prompt": [10**9]}), 400)["param"] == "prompt"
    assert error_of(post(served, "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}), 400)["param"] == "suffix"
    unknown = error_of(post(served, "/v1/chat/completions", {**chat, "model": "gpt-4"}), 404)
    assert unknown["param"] == "model" and unknown["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=chat["messages"])
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Hi", temperature=3)
    assert e.value.body["param"] == "temperature"
    # none of that disturbed the server
    assert ask(client, "What is the capital of France?").choices[0].finish_reason in ("stop", "length")


def test_tokenize_and_detokenize(served):
    ids = post(served, "/tokenize", {"prompt": "Hello world"}).json()["tokens"]
    assert post(served, "/detokenize", {"tokens": ids}).json()["prompt"] == "Hello world"
    chat = post(served, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 3
    assert error_of(post(served, "/detokenize", {"tokens": [-1]}), 400)["param"] == "tokens"
    assert error_of(post(served, "/tokenize", {}), 400)["param"] == "prompt"


# ---------------------------------------------------------------------------------------------- structured outputs
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "temperature": {"type": "integer", "minimum": -60, "maximum": 60}},
           "required": ["city", "temperature"], "additionalProperties": False}
WEATHER_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}


def test_json_schema_answers_validate(client):
    out = ask(client, "What is the weather in Paris? Answer in JSON.", max_tokens=60, response_format=WEATHER_FORMAT)
    content = out.choices[0].message.content
    jsonschema.validate(json.loads(content), WEATHER)
    assert out.choices[0].finish_reason == "stop"
    chunks = ask(client, "What is the weather in Paris? Answer in JSON.", max_tokens=60,
                 response_format=WEATHER_FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    done = client.completions.create(model=MODEL, prompt="The weather in Rome, as JSON:", max_tokens=60,
                                     temperature=0, extra_body={"response_format": WEATHER_FORMAT})
    jsonschema.validate(json.loads(done.choices[0].text), WEATHER)


def test_json_object_answers_parse(client):
    out = ask(client, "Describe a cat as a JSON object with its name and age.", max_tokens=80,
              response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


@pytest.mark.slow
def test_constrained_and_free_answers_together_equal_answers_alone(client):
    calls = [("What is the weather in Paris? Answer in JSON.", WEATHER_FORMAT), ("Name a fruit.", None),
             ("What is the weather in Oslo? Answer in JSON.", WEATHER_FORMAT), ("Say hello.", None),
             ("A JSON object about a dog.", {"type": "json_object"})]

    def one(call: tuple[str, dict | None]) -> str:
        question, fmt = call
        extra = {} if fmt is None else {"response_format": fmt}
        return ask(client, question, max_tokens=40, **extra).choices[0].message.content

    alone = [one(c) for c in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(one, calls))
    assert together == alone
    jsonschema.validate(json.loads(alone[0]), WEATHER)
    jsonschema.validate(json.loads(alone[2]), WEATHER)


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": WEATHER}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/none"}}}},
     "response_format.json_schema.schema"),
    # SmolLM2's vocabulary has no tool-call token: a forced call cannot be enforced
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
])
def test_what_cannot_be_enforced_is_a_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Hi", extra_body=extra)
    assert e.value.body["param"] == param


def test_the_objects_alive_at_startup_leave_the_collectors_sight():
    import gc

    from tramontane.server.serve import freeze_startup_objects

    startup = [1.0]
    startup.append(startup)  # a container the collector tracks
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert not any(o is startup for o in gc.get_objects(generation=2))  # a full collection no longer walks it
    finally:
        gc.unfreeze()
    assert any(o is startup for o in gc.get_objects(generation=2))



def test_a_completion_without_response_format_takes_no_thread_trip_for_a_grammar(served, monkeypatch):
    import asyncio

    hops: list[str] = []
    to_thread = asyncio.to_thread

    async def counted(fn, *args, **kwargs):
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    assert post(served, "/v1/completions", body).status_code == 200
    assert hops == ["_completion_prompts"]  # the prompt's tokens, off the event loop; no grammar to build
    hops.clear()
    assert post(served, "/v1/completions", {**body, "response_format": {"type": "json_object"}}).status_code == 200
    assert hops == ["_completion_prompts", "checked"]
