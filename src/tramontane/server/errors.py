"""OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`) for every failure, and
Anthropic's (`{"type": "error", "error": {"type", "message"}}`) for those on Anthropic's paths.

The middleware answers before any route is chosen, so the dialect of an error is picked by its path:
a client of /v1/messages reads Anthropic's shape whichever layer refused it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

RETRY_AFTER_SECONDS = 1  # sent with every 503: the queue or the server frees up within a step or two
ANTHROPIC_PATHS = ("/v1/messages",)  # and what lies under them: errors in Anthropic's shape
# Anthropic's error type for each HTTP status (its API reference, "Errors"); others: by status class
ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                   503: "overloaded_error", 504: "timeout_error"}


def speaks_anthropic(path: str) -> bool:
    """Whether the errors of `path` take Anthropic's shape."""
    return any(path == p or path.startswith(p + "/") for p in ANTHROPIC_PATHS)


class APIError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind  # OpenAI's "type"
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's shape: the type follows the status; the message names the field, as OpenAI's `param` does."""
        kind = ANTHROPIC_KINDS.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, close: bool = False, path: str = "") -> JSONResponse:
        """The JSON response to a request for `path`, in its dialect's shape; `close` ends the connection
        after it (the rest of a request was not read)."""
        headers = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        if close:
            headers["Connection"] = "close"
        body = self.anthropic_body() if speaks_anthropic(path) else self.body()
        return JSONResponse(body, status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def field_of(message: str, fields: Sequence[str]) -> str | None:
    """The field a ValueError names at its start ("temperature must be >= 0", "max_tokens: ...")."""
    match = re.match(r"[A-Za-z_]+", message)
    return match.group(0) if match and match.group(0) in fields else None


def _param(loc: Sequence[Any]) -> str | None:
    """'messages[0]' from a pydantic location ('body', 'messages', 0, 'dict[str,any]')."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path") else list(loc)
    if not parts or not isinstance(parts[0], str):
        return None
    param = parts[0]
    for part in parts[1:]:
        if not isinstance(part, int):
            break
        param += f"[{part}]"
    return param


def _dotted(loc: Sequence[Any]) -> str | None:
    """'messages.0.content.0.tool_use.input' from a pydantic location, as Anthropic names a field: union
    members' type tags ('str', 'list[...]') left out, a tagged union's tag kept."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path") else list(loc)
    kept = [str(p) for p in parts if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(kept) or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "tuple"})


async def _validation_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    path = request.url.path
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request").response(path=path)
    first = errors[0]
    if speaks_anthropic(path):  # of a union's members, the one the input went deepest into ("a list, of blocks")
        first = max(errors, key=lambda e: len((_dotted(e.get("loc", ())) or "").split(".")))
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"malformed JSON in the request body: {detail}".rstrip(": "),
                           code="json_invalid").response(path=path)
    param = _param(first.get("loc", ()))
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return bad_request("the request body must be a JSON object").response(path=path)
    where = _dotted(first.get("loc", ())) if speaks_anthropic(path) else param
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", "invalid request"))
    return bad_request(message, param=param).response(path=path)


async def _api_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response(path=request.url.path)


async def _http_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    response = APIError(exc.status_code, str(exc.detail), kind=kind).response(path=request.url.path)
    response.headers.update(exc.headers or {})  # a 405's `Allow`, which HTTP requires
    return response


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI bodies (Anthropic's on its paths) for validation errors, `APIError`s and HTTP errors
    (`middleware.CatchAll` takes the rest)."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
