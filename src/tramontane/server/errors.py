"""OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`) for every failure, and the
API-key check, which runs before anything else reads the request."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)


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

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


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


async def _validation_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request").response()
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"malformed JSON in the request body: {detail}".rstrip(": "), code="json_invalid").response()
    param = _param(first.get("loc", ()))
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return bad_request("the request body must be a JSON object").response()
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
    return bad_request(message, param=param).response()


async def _api_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), kind=kind).response()


async def _internal_error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


class BearerAuth:
    """ASGI middleware: every path except `open_paths` needs `Authorization: Bearer <key>`.

    It answers 401 before the body is read, so a request without the key learns nothing else.
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Sequence[str] = ()) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "missing API key" if not given else "incorrect API key"
                error = APIError(401, f"{message}: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
