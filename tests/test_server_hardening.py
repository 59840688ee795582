"""The server's edge against hostile or careless clients, over a scripted engine and SmolLM2's real
tokenizer (whose Rust backend refuses lone surrogates): invalid text, malformed tools, body and prompt
limits, requests that can never fit, strict types, Host checks, docs access, slow clients.

Each test serves its own app on a live uvicorn (127.0.0.1), so limits can differ per test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h11
import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import live_server
from scripted import ScriptedEngine

from tramontane import load_tokenizer
from tramontane.cli import build_parser, main
from tramontane.server import create_app
from tramontane.server.limits import ConnectionLimits, ServerLimits
from tramontane.server.middleware import allowed_hosts, host_name

MODEL = "scripted"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path):
    return load_tokenizer(smollm2_gguf_path)


@contextmanager
def served(tok, connections: ConnectionLimits | None = None, **options: Any) -> Iterator[tuple[str, ScriptedEngine]]:
    engine = ScriptedEngine(tok)
    with live_server(create_app(engine, tok, MODEL, **options), connections=connections) as url:
        yield url, engine


@pytest.fixture(scope="module")
def server(tok):
    with served(tok) as s:
        yield s


def error_of(res: httpx.Response, status: int) -> dict:
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


class Connection:
    """One HTTP/1.1 connection spoken with h11: requests in turn on the same socket, and whether the
    server has closed it."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.host = f"{host}:{port}"
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        heads = {"Host": self.host, "Content-Length": str(len(body)), "Content-Type": "application/json",
                 **(headers or {})}
        self.sock.sendall(self.conn.send(h11.Request(method=method, target=path, headers=list(heads.items()))))
        self.sock.sendall(self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
        status, got, data = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status, got = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, got, data

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within `seconds` (reading whatever it sends)."""
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------------------- invalid text
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["fine", "bad \udfff"]}, "prompt[1]"),
    ("/v1/completions", {**COMPLETION, "prompt": "a\u0000b"}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud83d"}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x\x00"}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {**CHAT, "stop": ["\udc00"]}, "stop"),  # pydantic's own check, for constrained strings
    ("/v1/chat/completions", {**CHAT, "model": "\ud800"}, "model"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
])
def test_invalid_text_is_a_400_and_the_connection_stays(server, path, body, param):
    server[1].reset()
    conn = Connection(server[0])
    try:
        raw = json.dumps(body).encode()  # json escapes the surrogate: "\ud800" reaches the server as sent
        status, _, data = conn.request("POST", path, raw)
        assert status == 400, data
        error = json.loads(data)["error"]
        assert error["param"] == param and error["code"] in ("invalid_text", None)
        # the next request on the same connection is answered: the bad one did not break it
        status, _, data = conn.request("POST", "/v1/completions", json.dumps(COMPLETION).encode())
        assert status == 200 and json.loads(data)["choices"][0]["text"] == "Hello there"
    finally:
        conn.close()
    assert len(server[1].submitted) == 1  # the second request only


def test_a_surrogate_pair_is_text(server):
    res = httpx.post(server[0] + "/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}',
                     headers={"Content-Type": "application/json"})
    assert res.status_code == 200 and res.json()["count"] >= 1


def test_an_internal_error_is_an_openai_500_and_keeps_the_connection(server):
    engine = server[1]
    engine.reset()

    def broken(req):
        raise RuntimeError("scripted failure")

    engine.script = broken
    conn = Connection(server[0])
    try:
        status, _, data = conn.request("POST", "/v1/completions", json.dumps(COMPLETION).encode())
        assert status == 500 and json.loads(data)["error"]["type"] == "server_error"
        engine.reset()
        status, _, _ = conn.request("POST", "/v1/completions", json.dumps(COMPLETION).encode())
        assert status == 200
    finally:
        conn.close()
        engine.reset()


# ---------------------------------------------------------------------------------------------- tools
TOOL = {"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("extra, param", [
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": "w"}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": ["w"]}}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": "w"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": ["w"]}}]}, "tools[0]"),
    ({"tools": [TOOL, "w"], "tool_choice": "auto"}, "tools[1]"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
])
def test_malformed_tools_are_400s(server, extra, param):
    assert error_of(httpx.post(server[0] + "/v1/chat/completions", json={**CHAT, **extra}), 400)["param"] == param


def test_a_forced_tool_choice_this_vocabulary_cannot_enforce_is_a_400(server):
    """SmolLM2's vocabulary has no tool-call token: a forced call is refused, never silently ignored."""
    for choice in ({"type": "function", "function": {"name": "w"}}, "required"):
        body = {**CHAT, "tools": [TOOL], "tool_choice": choice}
        error = error_of(httpx.post(server[0] + "/v1/chat/completions", json=body), 400)
        assert error["param"] == "tool_choice" and "enforced" in error["message"]
    body = {**CHAT, "tools": [TOOL], "tool_choice": "auto"}
    assert httpx.post(server[0] + "/v1/chat/completions", json=body).status_code == 200


# ---------------------------------------------------------------------------------------------- strict types
@pytest.mark.parametrize("field, value", [("max_tokens", "10"), ("n", "2"), ("stream", "yes"), ("n", 2.0),
                                          ("temperature", True), ("logprobs", "1"), ("seed", "7")])
def test_strict_types(server, field, value):
    assert error_of(httpx.post(server[0] + "/v1/completions", json={**COMPLETION, field: value}), 400)["param"] == field


def test_an_integer_is_a_number(server):
    assert httpx.post(server[0] + "/v1/completions", json={**COMPLETION, "temperature": 1, "top_p": 1}).status_code == 200


# ---------------------------------------------------------------------------------------------- sizes
def test_body_limit_declared_and_chunked(tok):
    with served(tok, limits=ServerLimits(max_request_bytes=2000)) as (url, engine):
        big = json.dumps({**COMPLETION, "prompt": "x" * 3000}).encode()
        conn = Connection(url)
        try:
            status, headers, data = conn.request("POST", "/v1/completions", big)
            assert status == 413 and json.loads(data)["error"]["code"] == "request_too_large"
            assert "--max-request-bytes" in json.loads(data)["error"]["message"]
            assert headers.get("connection") == "close" and conn.closed_within(5)
        finally:
            conn.close()

        def chunks(body: bytes) -> Iterator[bytes]:  # no Content-Length: sent chunked
            for i in range(0, len(body), 500):
                yield body[i : i + 500]

        as_json = {"Content-Type": "application/json"}
        res = httpx.post(url + "/v1/completions", content=chunks(big), headers=as_json)
        assert error_of(res, 413)["code"] == "request_too_large"
        small = json.dumps({**COMPLETION, "prompt": "x" * 1000}).encode()
        assert httpx.post(url + "/v1/completions", content=chunks(small), headers=as_json).status_code == 200
        assert len(engine.submitted) == 1


def test_prompt_characters_are_capped_before_tokenizing(tok):
    with served(tok, limits=ServerLimits(max_prompt_chars=100)) as (url, engine):
        res = httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": ["y" * 60, "y" * 41]})
        error = error_of(res, 400)
        assert error["param"] == "prompt" and "--max-prompt-chars" in error["message"]
        chat = {**CHAT, "messages": [{"role": "user", "content": "z" * 101}]}
        assert error_of(httpx.post(url + "/v1/chat/completions", json=chat), 400)["param"] == "messages"
        assert error_of(httpx.post(url + "/tokenize", json={"prompt": "z" * 101}), 400)["param"] == "prompt"
        assert httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": "y" * 100}).status_code == 200
        assert len(engine.submitted) == 1


def test_the_default_prompt_cap_follows_the_context(tok):
    with served(tok) as (url, engine):  # 16 characters per token of the scripted engine's 256
        res = httpx.post(url + "/tokenize", json={"prompt": "a" * (16 * engine.max_seq_len + 1)})
        assert error_of(res, 400)["code"] == "context_length_exceeded"


class BlockingTokenizer:
    """The real tokenizer, except that encoding waits until `release` is set: a stand-in for a prompt
    that takes long to tokenize, without depending on this machine's speed."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def _blocked(self, method: str, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(30), "never released"
        return getattr(self._tok, method)(*args, **kwargs)

    def encode(self, *args, **kwargs):
        return self._blocked("encode", *args, **kwargs)

    def encode_chat(self, *args, **kwargs):
        return self._blocked("encode_chat", *args, **kwargs)


@pytest.mark.parametrize("path, body", [("/tokenize", {"prompt": "Hi"}), ("/v1/completions", COMPLETION),
                                        ("/v1/chat/completions", CHAT)])
def test_tokenizing_leaves_the_event_loop_free(tok, path, body):
    slow = BlockingTokenizer(tok)
    engine = ScriptedEngine(tok)
    with live_server(create_app(engine, slow, MODEL)) as url:
        answers: list[int] = []
        worker = threading.Thread(target=lambda: answers.append(httpx.post(url + path, json=body, timeout=60).status_code))
        worker.start()
        try:
            assert slow.entered.wait(30)
            # tokenizing has begun and is stuck: the loop still answers
            assert httpx.get(url + "/health", timeout=5).status_code == 200
        finally:
            slow.release.set()
            worker.join()
    assert answers == [200]


# ---------------------------------------------------------------------------------------------- can never fit
def test_requests_that_can_never_fit_are_400s(server):
    url, engine = server
    engine.reset()
    many = error_of(httpx.post(url + "/v1/chat/completions", json={**CHAT, "n": engine.max_queue + 1}), 400)
    assert many["param"] == "n" and "--max-queue" in many["message"]
    prompts = {**COMPLETION, "prompt": ["a"] * (engine.max_queue + 1)}
    assert error_of(httpx.post(url + "/v1/completions", json=prompts), 400)["param"] == "prompt"
    both = {**COMPLETION, "prompt": ["a"] * 8, "n": engine.max_queue // 8 + 1}
    assert error_of(httpx.post(url + "/v1/completions", json=both), 400)["param"] == "n"
    assert error_of(httpx.post(url + "/v1/chat/completions", json={**CHAT, "n": 129}), 400)["param"] == "n"
    assert error_of(httpx.post(url + "/v1/chat/completions", json={**CHAT, "stop": ["s"] * 17}), 400)["param"] == "stop"
    assert error_of(httpx.post(url + "/v1/chat/completions", json={**CHAT, "stop": "s" * 1025}), 400)["param"] == "stop"
    long = error_of(httpx.post(url + "/v1/completions", json={**COMPLETION, "max_tokens": engine.max_seq_len}), 400)
    assert long["param"] == "max_tokens" and "context" in long["message"]
    assert not engine.submitted
    fits = {**COMPLETION, "prompt": ["a"] * 8, "n": engine.max_queue // 8, "stop": ["s"] * 16}
    assert len(httpx.post(url + "/v1/completions", json=fits).json()["choices"]) == engine.max_queue


def test_503_carries_retry_after(server):
    url, engine = server
    engine.reset()
    engine.full = True
    try:
        res = httpx.post(url + "/v1/completions", json=COMPLETION)
    finally:
        engine.reset()
    assert error_of(res, 503)["code"] == "queue_full" and res.headers["retry-after"] == "1"


# ---------------------------------------------------------------------------------------------- hosts and docs
def test_host_names():
    assert host_name(b"LocalHost:8000") == "localhost" and host_name(b"[::1]:8000") == "::1"
    assert host_name(b"::1") == "::1" and host_name(b"10.0.0.2") == "10.0.0.2"
    assert allowed_hosts("0.0.0.0") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("192.168.1.5", ["My.Box"]) == {"localhost", "127.0.0.1", "::1", "192.168.1.5", "my.box"}


def test_foreign_host_headers_are_refused_without_a_key(server):
    url = server[0]
    port = url.rsplit(":", 1)[1]
    error = error_of(httpx.post(url + "/v1/completions", json=COMPLETION, headers={"Host": f"evil.example:{port}"}), 403)
    assert error["code"] == "host_not_allowed" and "--allowed-hosts" in error["message"]
    assert httpx.get(url + "/v1/models", headers={"Host": "rebound.example"}).status_code == 403
    assert httpx.get(url + "/health", headers={"Host": "rebound.example"}).status_code == 200  # probes
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200


def test_allowed_hosts_widen_the_list(tok):
    with served(tok, allowed_hosts=["my.box", "localhost", "127.0.0.1"]) as (url, _):
        assert httpx.get(url + "/v1/models", headers={"Host": "my.box:80"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Host": "other.box"}).status_code == 403
    with served(tok, allowed_hosts=["*"]) as (url, _):
        assert httpx.get(url + "/v1/models", headers={"Host": "other.box"}).status_code == 200


def test_docs_are_for_loopback_clients_or_key_holders(server, tok):
    url = server[0]
    assert httpx.get(url + "/docs").status_code == 200  # we are on 127.0.0.1
    assert httpx.get(url + "/openapi.json").json()["info"]["title"] == "tramontane"
    remote = TestClient(create_app(ScriptedEngine(tok), tok, MODEL), base_url="http://localhost")  # client "testclient"
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert error_of(remote.get(path), 403)["code"] == "docs_not_allowed"
    assert remote.get("/v1/models").status_code == 200
    keyed = TestClient(create_app(ScriptedEngine(tok), tok, MODEL, api_key="k"), base_url="http://anyhost")
    assert error_of(keyed.get("/openapi.json"), 401)["code"] == "invalid_api_key"
    assert keyed.get("/openapi.json", headers={"Authorization": "Bearer k"}).status_code == 200


# ---------------------------------------------------------------------------------------------- slow clients
def test_slow_and_idle_connections_are_closed(tok):
    limits = ConnectionLimits(header_timeout=0.5, keep_alive_timeout=1, max_connections=4)
    with served(tok, connections=limits, limits=ServerLimits(body_timeout=0.5)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        idle = socket.create_connection((host, int(port)))  # connects and says nothing
        trickle = socket.create_connection((host, int(port)))
        trickle.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        start = time.monotonic()
        closed = False
        for _ in range(40):  # a header byte every 0.1 s: each arrives well within any idle timeout
            try:
                trickle.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed and time.monotonic() - start < 3
        idle.settimeout(3)
        assert idle.recv(1) == b""
        # a body that trickles gets a 408 when its deadline passes
        body = Connection(url)
        body.sock.sendall(body.conn.send(h11.Request(method="POST", target="/v1/completions", headers=[
            ("Host", body.host), ("Content-Length", "100"), ("Content-Type", "application/json")])))
        body.sock.sendall(b'{"prompt": ')
        body.sock.settimeout(5)
        assert body.sock.recv(65536).startswith(b"HTTP/1.1 408")
        # an idle keep-alive connection is closed after its answer
        kept = Connection(url)
        assert kept.request("GET", "/health")[0] == 200
        assert kept.closed_within(3)
        for s in (idle, trickle, body.sock, kept.sock):
            s.close()


def test_connection_limit(tok):
    with served(tok, connections=ConnectionLimits(max_connections=3)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(3)]
        time.sleep(0.2)
        try:
            busy = httpx.get(url + "/health")
            assert busy.status_code == 503
            assert busy.headers["Retry-After"] == "1"  # like every 503 of the server, not uvicorn's bare one
            assert busy.json()["error"]["code"] == "max_connections"
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------- serve options
@pytest.mark.parametrize("args, option", [
    (["--port", "99999"], "--port"), (["--port", "0"], "--port"), (["--max-batch", "100000"], "--max-batch"),
    (["--max-queue", "0"], "--max-queue"), (["--request-timeout", "-1"], "--request-timeout"),
    (["--request-timeout", "nan"], "--request-timeout"), (["--max-request-bytes", "0"], "--max-request-bytes"),
    (["--max-prompt-chars", "-5"], "--max-prompt-chars"), (["--header-timeout", "0"], "--header-timeout"),
    (["--body-timeout", "x"], "--body-timeout"), (["--keep-alive-timeout", "0"], "--keep-alive-timeout"),
    (["--max-connections", "0"], "--max-connections"), (["--shutdown-timeout", "-2"], "--shutdown-timeout"),
    (["--allowed-hosts", ","], "--allowed-hosts"),
])
def test_serve_options_out_of_range_are_one_line_errors(capsys, args, option):
    with pytest.raises(SystemExit) as e:
        main(["serve", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}:" in err.splitlines()[-1] and "Traceback" not in err


def test_serve_defaults_are_the_libraries_defaults():
    a = build_parser().parse_args(["serve"])
    limits, connections = ServerLimits(), ConnectionLimits()
    assert (a.max_request_bytes, a.max_prompt_chars, a.body_timeout) == (
        limits.max_request_bytes, limits.max_prompt_chars, limits.body_timeout)
    assert (a.header_timeout, a.keep_alive_timeout, a.max_connections, a.shutdown_timeout) == (
        connections.header_timeout, connections.keep_alive_timeout, connections.max_connections,
        connections.shutdown_timeout)
    assert build_parser().parse_args(["serve", "--allowed-hosts", "a.lan, b.lan"]).allowed_hosts == ("a.lan", "b.lan")
