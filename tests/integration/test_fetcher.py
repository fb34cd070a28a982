"""The SSRF-safe fetcher's error paths against a real HTTP server on loopback (opened for the test)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from moderator.fetch import Fetcher, FetchHttpStatus, FetchPolicy, FetchTooLarge, TooManyRedirects, parse_networks

BODY = b"\xff\xd8" + b"x" * 5000 + b"\xff\xd9"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/ok":
            self._send(200, BODY, length=True)
        elif self.path == "/missing":
            self._send(404, b"not here", length=True)
        elif self.path == "/error":
            self._send(503, b"", length=True)
        elif self.path.startswith("/hop/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", "/ok" if n == 0 else f"/hop/{n - 1}")
            self.end_headers()
        elif self.path == "/big-declared":
            self._send(200, b"y" * 10_000, length=True)
        elif self.path == "/big-chunked":  # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"z" * 10_000)
        else:
            self._send(404, b"", length=True)

    def _send(self, status: int, body: bytes, length: bool) -> None:
        self.send_response(status)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _fetcher(**kw: object) -> Fetcher:
    values: dict[str, object] = {"max_bytes": 8_000, "timeout_s": 5, "max_redirects": 2,
                                 "allow_networks": parse_networks(["127.0.0.0/8"])}  # fmt: skip
    values.update(kw)
    return Fetcher(FetchPolicy(**values))  # type: ignore[arg-type]


def test_a_good_url_and_redirects_within_the_limit(base: str) -> None:
    assert _fetcher().fetch(f"{base}/ok") == BODY
    assert _fetcher().fetch(f"{base}/hop/1") == BODY  # two redirects (hop/1, hop/0), then the image


def test_http_errors_are_fetch_http_status(base: str) -> None:
    for path, status in (("/missing", "404"), ("/error", "503")):
        with pytest.raises(FetchHttpStatus, match=status) as info:
            _fetcher().fetch(f"{base}{path}")
        assert info.value.reason == "fetch_http_status"


def test_too_many_redirects(base: str) -> None:
    with pytest.raises(TooManyRedirects) as info:
        _fetcher().fetch(f"{base}/hop/2")  # three redirects, one more than allowed
    assert info.value.reason == "too_many_redirects"


@pytest.mark.parametrize("path", ["/big-declared", "/big-chunked"])
def test_bodies_over_the_limit_are_fetch_too_large(base: str, path: str) -> None:
    with pytest.raises(FetchTooLarge) as info:
        _fetcher().fetch(f"{base}{path}")
    assert info.value.reason == "fetch_too_large"
