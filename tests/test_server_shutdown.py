"""`tramontane serve` stopped by SIGTERM under load, as a real process with the SmolLM2 model: what can
finish within --shutdown-timeout finishes, the rest ends with an OpenAI error (a stream: an error
event, then [DONE]), new connections are refused, and the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

SHUTDOWN_TIMEOUT = 6.0
DRAIN_SECONDS = 5.0  # serve.DRAIN_SECONDS: the most the cancelled requests may take to answer
COUNTING = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "temperature": 0}  # runs far past the timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tramontane.cli", "serve", "--model", str(path), "--port", str(port),
           "--max-batch", "4", "--max-seq-len", "2048", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600  # a cold start builds the native kernels first
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "tramontane serve did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)


def test_sigterm_finishes_what_it_can_and_ends_the_rest_with_errors(smollm2_gguf_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(smollm2_gguf_path, port)
    results: dict[str, Any] = {}

    def whole(name: str, body: dict) -> None:
        res = httpx.post(url + "/v1/completions", json=body, timeout=120)
        results[name] = (res.status_code, res.json(), res.headers)

    def stream() -> None:
        body = {**COUNTING, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as res:
            results["stream"] = [line[6:] for line in res.iter_lines() if line.startswith("data: ")]

    try:
        workers = [threading.Thread(target=whole, args=("long", COUNTING)), threading.Thread(target=stream)]
        for w in workers:
            w.start()
        wait_for_requests(url, 2)
        # long enough to be seen in the engine (a 2-token answer could end between two polls), short enough
        # to finish within the shutdown timeout
        short = threading.Thread(target=whole, args=("short", {**COUNTING, "max_tokens": 40}))
        short.start()
        workers.append(short)
        wait_for_requests(url, 3)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(1.0)
        refused = False
        try:
            httpx.get(url + "/health", timeout=5)
        except httpx.ConnectError:
            refused = True
        for w in workers:
            w.join(timeout=60)
        output = proc.communicate(timeout=60)[0]
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert refused, "a new connection was accepted after SIGTERM"
    assert took < SHUTDOWN_TIMEOUT + DRAIN_SECONDS + 5, output
    assert "Traceback" not in output and "CancelledError" not in output, output
    # finished within the timeout: answered normally
    status, body, _ = results["short"]
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    # still running at the timeout: an OpenAI error, which says to come back
    status, body, headers = results["long"]
    assert status == 503 and body["error"]["code"] == "server_shutdown" and headers["retry-after"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    events = results["stream"]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutdown" and error["type"] == "server_error"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    assert text.startswith(" 6, 7, 8,")  # it had been streaming


def wait_for_requests(url: str, count: int, timeout: float = 120) -> None:
    """Until the engine holds `count` requests, running or waiting."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=30).json()  # the test is not about latency
        if health["active"] + health["waiting"] >= count:
            return
        assert time.monotonic() < deadline, f"the engine never held {count} requests: {health}"
        time.sleep(0.05)
