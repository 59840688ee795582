"""Cross-origin requests from web pages (CORS): which origins may call the API from a browser.

None may by default. With `serve --cors-origins https://app.example,http://localhost:3000`, a page on
one of those origins may call the API; `*` lets any page call it. Credentials (cookies, HTTP auth) are
never allowed: a page sends the API key itself, in `Authorization` or `x-api-key`.

`Cors` is the outermost layer but one (`CatchAll`): a browser's preflight carries no key, so it is
answered here, before `KeyAuth` or `HostCheck` could refuse it, and every answer to an allowed origin,
errors included, carries `Access-Control-Allow-Origin` so that the page can read it.

Example (a preflight, then the request it allows):
    OPTIONS /v1/chat/completions   Origin: https://app.example   Access-Control-Request-Method: POST
    -> 204   Access-Control-Allow-Origin: https://app.example
             Access-Control-Allow-Headers: authorization, content-type, x-api-key
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = ("authorization", "content-type", "x-api-key")  # the key, by either header, and a JSON body
EXPOSE_HEADERS = "Retry-After"  # a page retrying a 503 needs to read it
MAX_AGE_SECONDS = 600  # how long a browser may reuse a preflight's answer
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # HTTP's token characters
ORIGIN = re.compile(r"https?://[^/\s]+")  # scheme://host[:port], as browsers send it: no path, no slash


def cors_origins(origins: Iterable[str]) -> frozenset[str]:
    """The origins `--cors-origins` lists, checked: `*` alone, or `scheme://host[:port]` each.

    Raises:
        ValueError: an origin with a path or another scheme, or `*` mixed with named origins.
    """
    found = frozenset(o.strip().rstrip("/").lower() for o in origins if o.strip())
    if "*" in found and len(found) > 1:
        raise ValueError("cors_origins: '*' allows every origin; give it alone")
    for origin in found - {"*"}:
        if not ORIGIN.fullmatch(origin):
            raise ValueError(f"cors_origins: {origin!r} is not an origin such as https://app.example or "
                             "http://localhost:3000 (a scheme and a host, no path)")
    return found


class Cors:
    """Answers preflights from `origins` ('*': any) and marks the other answers to them as readable.

    A preflight from an origin not among them is a 403; a plain request from one is served as usual,
    without `Access-Control-Allow-Origin`, so the browser keeps the answer from the page.
    """

    def __init__(self, app: ASGIApp, origins: frozenset[str]) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = "*" in self.origins or origin.lower() in self.origins
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
            await self._preflight(scope, origin, allowed)(scope, receive, send)
            return
        if not allowed:
            await self.app(scope, receive, send)
            return

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._mark(MutableHeaders(scope=message), origin)
            await send(message)

        await self.app(scope, receive, marked)

    def _preflight(self, scope: Scope, origin: str, allowed: bool) -> ASGIApp:
        if not allowed:
            error = APIError(403, f"the origin {origin!r} may not call this server from a browser; start it with "
                             "--cors-origins to allow it", code="cors_origin_not_allowed")
            return error.response(path=scope["path"])
        asked = (_header(scope, b"access-control-request-headers") or "").lower().split(",")
        # the SDKs' own headers (x-stainless-*, anthropic-version, ...) are allowed as asked
        headers = sorted({*ALLOW_HEADERS, *(h.strip() for h in asked if HEADER_NAME.fullmatch(h.strip()))})
        response = Response(status_code=204, headers={"Access-Control-Allow-Methods": ALLOW_METHODS,
                                                      "Access-Control-Allow-Headers": ", ".join(headers),
                                                      "Access-Control-Max-Age": str(MAX_AGE_SECONDS)})
        self._mark(response.headers, origin)
        return response

    def _mark(self, headers: MutableHeaders, origin: str) -> None:
        headers["Access-Control-Allow-Origin"] = "*" if "*" in self.origins else origin
        headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        headers.add_vary_header("Origin")


def _header(scope: Scope, name: bytes) -> str | None:
    value = next((v for k, v in scope["headers"] if k == name), None)
    return None if value is None else value.decode("latin-1")
