"""Run an ASGI app with uvicorn on a free loopback port, in a background thread, for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from tramontane.server.limits import ConnectionLimits
from tramontane.server.serve import server_config


@contextmanager
def live_server(app: Any, timeout: float = 30.0, connections: ConnectionLimits | None = None) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) of `app` served by uvicorn until the block ends.

    With `connections`, uvicorn runs as `tramontane serve` runs it (`serve.server_config`).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if connections is None:
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    else:
        config = server_config(app, "127.0.0.1", port, connections, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
