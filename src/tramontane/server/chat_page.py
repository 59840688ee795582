"""The chat page at `/`: plain files shipped in `server/page/`, no build step, nothing from a CDN.

The page (`page/page.js`) calls the API like any client: it fills its model picker from /v1/models,
streams answers from /v1/chat/completions, and, when the server has `--api-key`, asks for the key on
the first 401 and sends it as `Authorization: Bearer`. So only the page's own files are open without
the key (`PAGE_PATHS`, for `KeyAuth`); they still pass `HostCheck` like every other path.

Every file is answered with `Content-Security-Policy: default-src 'self'`: no inline script runs, no
other origin is reached, and what the model writes is put in the page as text, never parsed as HTML.

Example:
    GET /          -> index.html   (text/html, with the CSP header)
    GET /page.js   -> the page's script;  GET /page.css, /icon.svg -> its style sheet and icon
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

CSP = "default-src 'self'"
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/page.js": ("page.js", "text/javascript; charset=utf-8"),
         "/page.css": ("page.css", "text/css; charset=utf-8"),
         "/icon.svg": ("icon.svg", "image/svg+xml")}
PAGE_PATHS = tuple(FILES)  # exact paths, open without the API key


def page_router() -> APIRouter:
    """GET routes for the page's files, read from the package once, now.

    Raises:
        FileNotFoundError: a page file is missing from the installed package (its package data).
    """
    folder = resources.files(__package__ or "tramontane.server") / "page"
    router = APIRouter()
    for path, (name, media_type) in FILES.items():
        router.add_api_route(path, _answer(folder.joinpath(name).read_bytes(), media_type), methods=["GET"],
                             include_in_schema=False)
    return router


def _answer(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    async def serve() -> Response:
        return Response(content, media_type=media_type, headers=headers)

    return serve
