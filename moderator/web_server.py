"""An ASGI app served by uvicorn on a thread: the console's and ``moderator serve``'s web server.

The listening socket is bound when the server is made (so its port, even an ephemeral one, is known
before it starts) and names ``IPPROTO_TCP``: asyncio sets ``TCP_NODELAY`` on accepted connections only
when the listening socket says it is TCP; with protocol 0 every answer written as headers then body
waits ~40 ms for the client's delayed ACK. The peer is the TCP peer (``proxy_headers`` off): a
forwarded header never decides who is trusted.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class WebServer:
    def __init__(self, app: Any, host: str, port: int, *, backlog: int = 128, name: str = "web") -> None:
        self.name = name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(backlog)
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, access_log=False, server_header=False, lifespan="off",
            timeout_graceful_shutdown=3, proxy_headers=False,
        ))  # fmt: skip
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called (it may have stopped since)."""
        return self._thread is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.server.started

    def start(self, timeout: float = 30.0) -> None:
        """Serve on a thread; return once uvicorn has started (RuntimeError if it does not)."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name=self.name)  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name}'s web server did not start")
            time.sleep(0.02)

    def wait(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def request_stop(self) -> None:
        """Ask uvicorn to stop (safe from a signal handler); :meth:`wait` returns once it has."""
        self.server.should_exit = True

    def stop(self) -> None:
        """Stop taking requests (those under way are answered within uvicorn's grace period)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=10)  # uvicorn closes its socket as it stops
        else:
            self._sock.close()
