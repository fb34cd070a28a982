"""The console's request security, as pure-ASGI middleware: strict headers and CSRF.

Order (outermost first): SecurityHeadersMiddleware -> HostCheckMiddleware -> Starlette (its error
handling, then SessionMiddleware -> CSRFMiddleware -> the routes). The headers sit outside Starlette, so
its 500 pages get them too; CSRF sits inside the session middleware: it compares the request's token
with the session's.

- Host: a request naming a host the console does not serve is refused (400) before anything else: a
  DNS-rebinding page cannot talk to a console on a reviewer's own machine.

- Headers: a Content-Security-Policy allowing only the console's own scripts, styles and images (no
  inline script or style, no framing), nosniff, no referrer across origins, ``Cache-Control: no-store``
  (review images stay out of every cache), HSTS behind TLS.
- CSRF: every state-changing request (POST, PUT, PATCH, DELETE) carries the session's token, in the
  ``X-CSRF-Token`` header (fetch) or the ``csrf_token`` form field; a cross-site ``Sec-Fetch-Site`` or a
  foreign ``Origin`` is refused as well. Refusals are 403 before any route runs.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",  # add 'data:' / 'blob:' only if the UI really needs them
        "connect-src 'self'",  # fetch() verdicts
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)

DEFAULT_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # old browsers; frame-ancestors covers new ones
    "Referrer-Policy": "same-origin",  # NOT no-referrer: Chromium then sends "Origin: null" on form POSTs
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    # Review images are sensitive: keep them (and the pages) out of every cache.
    "Cache-Control": "no-store",
}


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, headers: dict[str, str] | None = None, hsts: bool = False) -> None:
        self.app = app
        self.headers = dict(DEFAULT_HEADERS if headers is None else headers)
        if hsts:  # only when served over HTTPS (directly or via the proxy)
            self.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    if name not in headers:  # a route may override, e.g. Cache-Control on /static
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_wrapper)


def host_name(header: str) -> str:
    """The host part of a Host header: ``[::1]:8081`` -> ``::1``, ``Example.org:443`` -> ``example.org``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheckMiddleware:
    """Only requests whose ``Host`` is one of ``allowed`` (``*`` allows any) reach the app."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            host = host_name(Headers(scope=scope).get("host", ""))
            if host not in self.allowed:
                await _deny(send, "unknown host (allowed: MODERATOR_CONSOLE_ALLOWED_HOSTS)", 400)
                return
        await self.app(scope, receive, send)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_SESSION_KEY = "csrf"
CSRF_FORM_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
MAX_FORM_BYTES = 64 * 1024


def csrf_token(session: dict[str, Any]) -> str:
    """The session's token, created on first use (call it when rendering any page with a form)."""
    token = session.get(CSRF_SESSION_KEY)
    return str(token) if token else rotate_csrf_token(session)


def rotate_csrf_token(session: dict[str, Any]) -> str:
    token = secrets.token_urlsafe(32)
    session[CSRF_SESSION_KEY] = token
    return token


class CSRFMiddleware:
    """Every POST/PUT/PATCH/DELETE must carry the session's token, in the X-CSRF-Token header or in the
    'csrf_token' field of an application/x-www-form-urlencoded body; else 403 before the route runs.

    Defence in depth: a cross-site Sec-Fetch-Site or a foreign Origin is refused too. The form body is
    read here, and replayed to the app unchanged.
    """

    def __init__(self, app: ASGIApp, exempt_paths: Iterable[str] = (), allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.exempt = frozenset(exempt_paths)
        self.allowed_origins = frozenset(allowed_origins)  # e.g. {"https://console.example.org"} behind a proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)

        if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            await _deny(send, "cross-site request")
            return
        origin = headers.get("origin")
        if origin is not None and origin != _own_origin(scope, headers) and origin not in self.allowed_origins:
            await _deny(send, "foreign origin")
            return

        body, read_body = b"", False
        submitted = headers.get(CSRF_HEADER)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if submitted is None and ctype == "application/x-www-form-urlencoded":
            read_body, more = True, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_FORM_BYTES:
                    await _deny(send, "form too large", 413)
                    return
            values = parse_qs(body.decode("latin-1")).get(CSRF_FORM_FIELD)
            submitted = values[0] if values else None

        expected = scope.get("session", {}).get(CSRF_SESSION_KEY)
        if not expected or not submitted or not hmac.compare_digest(str(expected), str(submitted)):
            await _deny(send, "missing or wrong CSRF token")
            return

        if read_body:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        else:
            await self.app(scope, receive, send)


def _own_origin(scope: Scope, headers: Headers) -> str:
    return f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"


async def _deny(send: Send, reason: str, status: int = 403) -> None:
    body = json.dumps({"error": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
