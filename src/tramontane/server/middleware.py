"""The ASGI layers every request passes before a route: which hosts, which key, which clients, how big a body.
Each answers in the error shape of the path's dialect (`errors.speaks_anthropic`).

From the outside in (`create_app` stacks them): `CatchAll` answers an unexpected exception with an
OpenAI 500 and keeps the connection; `HostCheck` refuses a `Host` header that is not this server's
(DNS rebinding, when no key guards the API); `KeyAuth` checks the API key before the body is read;
`LoopbackDocs` serves /docs and /openapi.json to this machine only; `BodyLimit` reads the body up to
a size and a deadline before anything parses it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Iterable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

log = logging.getLogger(__name__)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


class CatchAll:
    """An exception no handler took becomes OpenAI's 500 body, and is not raised further: uvicorn
    would drop the keep-alive connection, failing the client's next pooled request too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=e)
            if started:  # half an answer is out: only closing the connection can tell the client
                raise
            error = APIError(500, f"internal error: {type(e).__name__}", kind="server_error")
            await error.response(path=scope["path"])(scope, receive, send)


def host_name(host: bytes) -> str:
    """'localhost' from b'localhost:8000', '::1' from b'[::1]:8000'."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The `Host` names a server bound to `bound` answers: localhost's names, `bound` unless it is a
    wildcard (0.0.0.0, ::), and `extra` ('*' allows any)."""
    hosts = {*LOCAL_HOSTS, *(h.strip().lower().strip("[]") for h in extra)}
    if bound not in WILDCARD_HOSTS:
        hosts.add(bound.lower().strip("[]"))
    return frozenset(hosts)


class HostCheck:
    """Refuses requests whose `Host` header names another server: a web page that rebinds its own
    domain to 127.0.0.1 would otherwise reach the local API from the user's browser. `open_paths`
    (probes, scrapers) are exempt; a request without `Host` (HTTP/1.0) is let through."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str], open_paths: Sequence[str] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.hosts and scope["path"] not in self.open_paths:
            host = _header(scope, b"host")
            if host is not None and host_name(host) not in self.hosts:
                error = APIError(403, f"the Host header {host_name(host)!r} is not one of this server's names; "
                                 "start it with --allowed-hosts to accept it", code="host_not_allowed")
                await error.response(path=scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


class KeyAuth:
    """Every path except `open_paths` needs the key, as `Authorization: Bearer <key>` (OpenAI's and
    Mistral's clients) or `x-api-key: <key>` (Anthropic's); each of the two that is sent must hold it.

    It answers 401 before the body is read, so a request without the key learns nothing else.
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Sequence[str] = ()) -> None:
        self.app = app
        self.bearer = f"Bearer {api_key}".encode()
        self.key = api_key.encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = [(v, self.bearer) for v in [_header(scope, b"authorization")] if v is not None]
            given += [(v, self.key) for v in [_header(scope, b"x-api-key")] if v is not None]
            if not given or not all(secrets.compare_digest(v, want) for v, want in given):
                message = "missing API key" if not given else "incorrect API key"
                error = APIError(401, f"{message}: send the header 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                                 code="invalid_api_key")
                await error.response(path=scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LoopbackDocs:
    """The interactive docs and the OpenAPI schema, for clients on this machine only (used when no
    API key is set; with a key, `KeyAuth` guards them like every other path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in DOCS_PATHS and not _is_loopback(scope.get("client")):
            error = APIError(403, "the API docs are served to this machine's clients only (or to any client "
                             "with the key, when the server has --api-key)", code="docs_not_allowed")
            await error.response(path=scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _is_loopback(client: tuple[str, int] | None) -> bool:
    if client is None:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:  # not an IP address (a test client's name, a Unix socket)
        return False


class BodyLimit:
    """Reads the whole request body, at most `max_bytes` of it within `timeout` seconds, before the
    app sees any of it; then hands it on in one piece. Later `receive` calls (a disconnect) pass through.

    A declared `Content-Length` above the limit is refused before reading; a chunked body as soon as
    it passes the limit. Either answer closes the connection: the rest of the body is not read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        error: APIError | None = None
        if declared is not None and not declared.strip().isdigit():
            error = APIError(400, "the Content-Length header is not a number", code="invalid_content_length")
        elif declared is not None and int(declared) > self.max_bytes:
            error = self._too_large(f"{int(declared)} bytes")
        if error is not None:
            await error.response(close=True, path=scope["path"])(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.timeout:g} seconds "
                             "(--body-timeout)", code="request_timeout")
        except _TooLarge:
            error = self._too_large(f"more than {self.max_bytes} bytes")
        if error is not None:
            await error.response(close=True, path=scope["path"])(scope, receive, send)
            return
        if body is None:  # the client left while sending
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size}; this server takes at most {self.max_bytes} bytes "
                        "(--max-request-bytes)", code="request_too_large")


class _TooLarge(Exception):
    pass
