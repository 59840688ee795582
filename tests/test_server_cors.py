"""Browsers and keys at the server's edge: CORS preflights answered before the key check, the key in
`x-api-key` as in `Authorization: Bearer`, and a 405 that says which methods are allowed.

A scripted engine and a real Mistral tokenizer behind a live uvicorn run as `tramontane serve` runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from scripted import scripted_server

from tramontane.cli import build_parser, main
from tramontane.server.cors import cors_origins

KEY = "sesame"
PAGE = "https://app.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
CHAT = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@contextmanager
def served(**options: Any) -> Iterator[str]:
    with scripted_server(**options) as (url, _):
        yield url


@pytest.fixture(scope="module")
def keyed() -> Iterator[str]:
    with served(api_key=KEY, cors=[PAGE]) as url:
        yield url


def test_a_preflight_from_an_allowed_origin_is_answered_before_the_key(keyed):
    res = httpx.options(f"{keyed}/v1/chat/completions", headers={"Origin": PAGE, **PREFLIGHT})
    assert res.status_code == 204, res.text
    assert res.headers["access-control-allow-origin"] == PAGE
    assert {"authorization", "x-api-key", "content-type"} <= {
        h.strip() for h in res.headers["access-control-allow-headers"].split(",")}
    assert "POST" in res.headers["access-control-allow-methods"] and "Origin" in res.headers["vary"]
    assert "access-control-allow-credentials" not in res.headers


def test_an_sdk_header_asked_for_is_allowed(keyed):
    asked = {**PREFLIGHT, "Access-Control-Request-Headers": "x-stainless-os, authorization"}
    res = httpx.options(f"{keyed}/v1/models", headers={"Origin": PAGE, **asked})
    assert "x-stainless-os" in res.headers["access-control-allow-headers"]


def test_answers_to_an_allowed_origin_are_readable_errors_included(keyed):
    ok = httpx.post(f"{keyed}/v1/chat/completions", json=CHAT, headers={"Origin": PAGE, "x-api-key": KEY})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == PAGE
    refused = httpx.get(f"{keyed}/v1/models", headers={"Origin": PAGE})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE


def test_a_disallowed_origin_gets_no_cors_header(keyed):
    res = httpx.options(f"{keyed}/v1/chat/completions", headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert res.status_code == 403 and res.json()["error"]["code"] == "cors_origin_not_allowed"
    assert "access-control-allow-origin" not in res.headers
    plain = httpx.get(f"{keyed}/v1/models", headers={"Origin": "https://evil.example", "x-api-key": KEY})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_no_origin_is_allowed_by_default():
    with served() as url:
        res = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": PAGE, **PREFLIGHT})
        assert "access-control-allow-origin" not in res.headers


def test_any_origin_with_a_star_never_with_credentials():
    with served(cors=["*"]) as url:
        res = httpx.options(f"{url}/v1/models", headers={"Origin": "http://localhost:3000", **PREFLIGHT})
        assert res.status_code == 204 and res.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in res.headers


@pytest.mark.parametrize("origins", [["*", PAGE], ["https://app.example/path"], ["ftp://files.example"]])
def test_malformed_origins_are_refused(origins):
    with pytest.raises(ValueError, match="cors_origins"):
        cors_origins(origins)


def test_the_serve_option(capsys):
    a = build_parser().parse_args(["serve", "--cors-origins", "https://a.example, http://localhost:3000/"])
    assert a.cors_origins == ("http://localhost:3000", "https://a.example")
    assert build_parser().parse_args(["serve"]).cors_origins == ()
    with pytest.raises(SystemExit):
        main(["serve", "--cors-origins", "*,https://a.example"])
    assert "error: argument --cors-origins: '*' allows every origin" in capsys.readouterr().err


def test_the_key_in_x_api_key(keyed):
    with openai.OpenAI(base_url=f"{keyed}/v1", api_key="unused", default_headers={"x-api-key": KEY},
                       max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):  # the Bearer header it also sends is wrong
            client.models.list()
    assert httpx.get(f"{keyed}/v1/models", headers={"x-api-key": KEY}).status_code == 200
    wrong = httpx.get(f"{keyed}/v1/models", headers={"x-api-key": "nope"})
    assert wrong.status_code == 401 and "x-api-key" in wrong.json()["error"]["message"]


def test_a_405_says_which_methods_are_allowed(keyed):
    res = httpx.get(f"{keyed}/v1/chat/completions", headers={"x-api-key": KEY})
    assert res.status_code == 405 and res.headers["allow"] == "POST"
    assert res.json()["error"]["type"] == "invalid_request_error"
