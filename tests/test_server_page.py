"""The chat page's files over plain HTTP (no browser): served at /, with the CSP header, open without the
API key while /v1 still needs it, behind the Host check; and shipped as package data."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from scripted import V3, ScriptedEngine

from tramontane import load_tokenizer
from tramontane.server import create_app
from tramontane.server.chat_page import CSP, FILES

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(V3)


def client(tok, **options) -> TestClient:
    return TestClient(create_app(ScriptedEngine(tok), tok, "scripted", **options), base_url="http://localhost")


def test_the_page_is_served_at_the_root_with_its_csp(tok) -> None:
    res = client(tok).get("/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    assert res.headers["content-security-policy"] == CSP == "default-src 'self'"
    assert '<script src="page.js"' in res.text and "<script>" not in res.text  # no inline script


def test_the_script_and_style_sheet_are_served(tok) -> None:
    page = client(tok)
    js, css = page.get("/page.js"), page.get("/page.css")
    assert js.status_code == css.status_code == 200
    assert js.headers["content-type"].startswith("text/javascript") and "v1/chat/completions" in js.text
    assert css.headers["content-type"].startswith("text/css")
    assert js.headers["content-security-policy"] == CSP and js.headers["x-content-type-options"] == "nosniff"


def test_with_a_key_the_page_is_open_but_the_api_is_not(tok) -> None:
    keyed = client(tok, api_key="sesame")
    for path in FILES:
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert keyed.post("/", json={}).status_code == 405  # the page's paths answer GET only
    assert keyed.get("/page.js/x").status_code == 401  # exact paths, not a prefix
    assert keyed.get("/docs").status_code == 401


def test_the_page_answers_only_this_servers_host_names(tok) -> None:
    app = create_app(ScriptedEngine(tok), tok, "scripted")
    assert TestClient(app, base_url="http://evil.example").get("/").status_code == 403
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/").status_code == 200


def test_the_page_files_are_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folder = ROOT / "src/tramontane/server"
    shipped = {p for pattern in package_data["tramontane.server"] for p in folder.glob(pattern)}
    assert {folder / "page" / name for name, _ in FILES.values()} <= shipped
