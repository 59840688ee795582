"""The chat page at / in a real headless Chromium, over a live server whose engine answers from a script,
one token at a time: it streams, stops, carries the conversation, shows the model's HTML as text, asks for
the API key, and lists the served adapters.

Needs the system's Chromium (`apt-get install chromium`; `.ci/run` tries to install it) and playwright,
which drives it (its own browser downloads are never used).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from live_server import live_server
from scripted import V3, ScriptedEngine

from tramontane import load_tokenizer
from tramontane.engine import EngineEvent, QueueFullError, Request
from tramontane.server import create_app
from tramontane.server.limits import ConnectionLimits

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
if CHROMIUM is None:
    pytest.skip("no Chromium binary on PATH (apt-get install chromium): the chat page's browser tests need one",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser: pip install -e '.[dev]'")

MODEL = "scripted"
TIMEOUT_MS = 10_000


class PacedEngine(ScriptedEngine):
    """`ScriptedEngine`'s answers, one token every `pace` seconds from a thread of their own, as a real engine
    streams them; a cancelled request ends at its next token and is kept in `cancelled`."""

    def reset(self) -> None:
        super().reset()
        self.max_seq_len = 4096
        self.pace = 0.0
        self.cancelled: list[Request] = []

    def submit(self, req: Request) -> None:
        self.validate(req)
        if self.full:
            raise QueueFullError("the queue holds 0 waiting requests")
        self.submitted.append(req)
        threading.Thread(target=self._answer, args=(req, self.script(req), self.pace), daemon=True).start()

    def _answer(self, req: Request, tokens: list[int], pace: float) -> None:
        for token in tokens[: req.max_tokens]:
            time.sleep(pace)
            if req.cancelled:
                self.cancelled.append(req)
                req.emit(EngineEvent(req.id, "", finish_reason=req.cancel_reason))
                return
            req.emit(EngineEvent(req.id, "", token))
        req.emit(EngineEvent(req.id, "", finish_reason="length"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(V3)


@contextmanager
def served(tok, adapters: tuple[str, ...] = (), **options: Any) -> Iterator[tuple[str, PacedEngine]]:
    engine = PacedEngine(tok)
    if adapters:
        engine.adapters = SimpleNamespace(count=len(adapters))  # what create_app checks the names against
    app = create_app(engine, tok, MODEL, adapters=adapters, **options)
    with live_server(app, connections=ConnectionLimits()) as url:
        yield url, engine


@pytest.fixture(scope="module")
def server(tok) -> Iterator[tuple[str, PacedEngine]]:
    with served(tok) as s:
        yield s


@pytest.fixture
def engine(server) -> PacedEngine:
    server[1].reset()
    return server[1]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Page(SimpleNamespace):
    """A fresh browser tab and what it saw: console errors, uncaught errors, dialogs, API request bodies."""


@pytest.fixture
def open_page(browser) -> Iterator[Callable[[str], Page]]:
    contexts = []

    def open_(url: str) -> Page:
        context = browser.new_context()  # its own sessionStorage
        contexts.append(context)
        tab = context.new_page()
        tab.set_default_timeout(TIMEOUT_MS)
        seen = Page(tab=tab, errors=[], dialogs=[], chats=[], auth=[])
        tab.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: seen.errors.append(f"uncaught: {e}"))
        tab.on("dialog", lambda d: (seen.dialogs.append(d.message), d.dismiss()))
        tab.on("request", lambda r: _record(seen, r))
        tab.goto(url + "/")
        return seen

    yield open_
    for context in contexts:
        context.close()


def _record(seen: Page, request: Any) -> None:
    if request.url.endswith("/v1/chat/completions"):
        seen.chats.append(request.post_data_json)
        seen.auth.append(request.headers.get("authorization"))


def script(engine: PacedEngine, tok, text: str, pace: float = 0.0) -> None:
    engine.script = lambda req: tok.encode(text, bos=False)
    engine.pace = pace


def ask(seen: Page, text: str) -> None:
    seen.tab.fill("#prompt", text)
    seen.tab.click("#send")


def answered(seen: Page) -> Any:
    """The last answer's element, once the page is ready for the next message."""
    seen.tab.wait_for_selector("#compose[data-busy=false]")
    return seen.tab.locator(".turn.assistant .content").last


def shown_when(seen: Page, ready: Callable[[str], bool]) -> str:
    """The last answer's text as soon as `ready` holds for it (the page's CSP forbids wait_for_function's eval)."""
    content = seen.tab.locator(".turn.assistant .content").last
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not (seen.tab.locator(".turn.assistant").count() and ready(text := content.inner_text())):
        assert time.monotonic() < deadline, "the answer did not come"
        time.sleep(0.01)
    return text


def models(seen: Page) -> list[str]:
    seen.tab.wait_for_selector("#model option", state="attached")
    return seen.tab.locator("#model option").all_inner_texts()


def test_the_page_loads_without_errors(server, open_page) -> None:
    seen = open_page(server[0])
    assert models(seen) == [MODEL]
    assert seen.tab.title() == "tramontane"
    assert seen.tab.is_hidden("#key-form") and seen.tab.is_hidden("#error")
    assert seen.errors == []


def test_an_answer_streams_into_the_page(server, engine, tok, open_page) -> None:
    text = "The tramontane is a cold north wind from the mountains."
    script(engine, tok, text, pace=0.1)
    seen = open_page(server[0])
    ask(seen, "What is the tramontane?")
    first = shown_when(seen, lambda text: len(text) > 0)
    assert first and len(first) < len(text) and text.startswith(first)  # a part, before the rest came
    assert answered(seen).inner_text() == text
    assert seen.tab.locator(".turn.user").inner_text() == "What is the tramontane?"
    assert seen.chats[0]["stream"] is True and seen.chats[0]["model"] == MODEL
    assert seen.errors == []


def test_stop_ends_a_long_answer(server, engine, tok, open_page) -> None:
    script(engine, tok, "wind " * 500, pace=0.02)
    seen = open_page(server[0])
    ask(seen, "Go on forever")
    shown_when(seen, lambda text: len(text) > 20)
    seen.tab.click("#stop")
    stopped = seen.tab.wait_for_selector(".turn.assistant.stopped")
    assert stopped.query_selector(".note").inner_text() == "stopped"
    shown = answered(seen).inner_text()
    time.sleep(0.5)
    assert answered(seen).inner_text() == shown and len(shown) < len("wind " * 500) - 1  # nothing more came
    deadline = time.monotonic() + 5
    while not engine.cancelled and time.monotonic() < deadline:  # the server dropped the request
        time.sleep(0.05)
    assert engine.cancelled == engine.submitted[:1]
    assert seen.tab.is_enabled("#send") and seen.tab.is_disabled("#stop")


def test_a_second_turn_sends_the_whole_conversation(server, engine, tok, open_page) -> None:
    seen = open_page(server[0])
    seen.tab.click("#system-box summary")
    seen.tab.fill("#system", "Answer briefly.")
    seen.tab.fill("#temperature", "0")
    seen.tab.fill("#max-tokens", "32")
    script(engine, tok, "Bora.")
    ask(seen, "Name a wind.")
    assert answered(seen).inner_text() == "Bora."
    script(engine, tok, "Mistral.")
    ask(seen, "Another one?")
    assert answered(seen).inner_text() == "Mistral."
    assert seen.chats[1]["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a wind."},
        {"role": "assistant", "content": "Bora."},
        {"role": "user", "content": "Another one?"},
    ]
    assert seen.chats[1]["temperature"] == 0 and seen.chats[1]["max_tokens"] == 32
    assert engine.submitted[1].max_tokens == 32
    assert "Bora." in tok.decode(engine.submitted[1].prompt)  # what the server received and encoded


def test_the_models_html_is_shown_as_text(server, engine, tok, open_page) -> None:
    evil = ('<img src=x onerror="console.error(\'injected\')"> <script>alert("injected")</script>\n\n'
            '**bold** and *italic* and `<b>code</b>`\n\n```html\n<iframe src="/"></iframe>\n```\n\n- one\n- two')
    script(engine, tok, evil)
    seen = open_page(server[0])
    ask(seen, "Say something dangerous")
    answer = answered(seen)
    for tag in ("img", "script", "iframe", "b"):
        assert answer.locator(tag).count() == 0, tag
    assert '<img src=x onerror="console.error(\'injected\')">' in answer.inner_text()
    assert answer.locator("strong").inner_text() == "bold" and answer.locator("em").inner_text() == "italic"
    assert answer.locator("p code").inner_text() == "<b>code</b>"
    assert answer.locator("pre code").inner_text() == '<iframe src="/"></iframe>'
    assert answer.locator("li").all_inner_texts() == ["one", "two"]
    assert seen.dialogs == [] and seen.errors == []


def test_an_api_error_is_shown_and_the_message_given_back(server, engine, open_page) -> None:
    seen = open_page(server[0])
    models(seen)
    engine.full = True
    ask(seen, "Anyone there?")
    seen.tab.wait_for_selector("#error:not([hidden])")
    assert "queue" in seen.tab.inner_text("#error")
    assert seen.tab.input_value("#prompt") == "Anyone there?" and seen.tab.locator(".turn").count() == 0


def test_a_keyed_server_asks_for_the_key_then_works(tok, open_page) -> None:
    with served(tok, api_key="sesame") as (url, engine):
        seen = open_page(url)
        seen.tab.wait_for_selector("#key-form:not([hidden])")
        seen.tab.fill("#key", "wrong")
        seen.tab.click("#key-form button")
        seen.tab.wait_for_selector("#error:has-text('refused')")
        seen.tab.fill("#key", "sesame")
        seen.tab.click("#key-form button")
        assert models(seen) == [MODEL] and seen.tab.is_hidden("#key-form")
        script(engine, tok, "Open sesame.")
        ask(seen, "Hello")
        assert answered(seen).inner_text() == "Open sesame."
        assert seen.auth == ["Bearer sesame"]
        seen.tab.reload()  # the key is kept for the session
        assert models(seen) == [MODEL] and seen.tab.is_hidden("#key-form")
    assert all(e.startswith("Failed to load resource") for e in seen.errors), seen.errors  # the 401s, no more


def test_the_model_picker_lists_the_adapters(tok, open_page) -> None:
    with served(tok, adapters=("french", "terse")) as (url, engine):
        seen = open_page(url)
        assert models(seen) == [MODEL, "french", "terse"]
        seen.tab.select_option("#model", "terse")
        ask(seen, "Hi")
        answered(seen)
        assert seen.chats[0]["model"] == "terse" and engine.submitted[0].adapter == 2
        assert seen.errors == []
