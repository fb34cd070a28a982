"""Fetching images by URL without letting the URL point the worker at its own network (SSRF).

- http and https only; no credentials in the URL; an optional host allowlist;
- the host is resolved once, *every* resolved address is checked, and the connection goes to a
  checked address (no second resolution an attacker's DNS could answer differently);
- blocked by default: loopback, private, link-local (cloud metadata 169.254.169.254 among them),
  carrier-grade NAT, multicast, reserved, unspecified, documentation and benchmarking ranges, and
  IPv6 forms that embed an IPv4 address (IPv4-mapped, 6to4, NAT64, Teredo) when that address is;
  ``allow_networks`` opens named networks deliberately (logged at start-up, never silent);
- redirects are followed hop by hop, each re-checked, at most ``max_redirects``;
- one total deadline for the whole fetch (DNS aside), enforced by a watchdog that closes the socket,
  so a server trickling bytes cannot hold a worker; the body size is enforced while streaming.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from moderator.errors import ReasonError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(ReasonError):
    """A URL that cannot be fetched."""

    reason = "fetch_failed"


class UrlInvalid(FetchError):
    reason = "url_invalid"


class UrlBlocked(FetchError):
    reason = "url_blocked"


class FetchTimeout(FetchError):
    reason = "fetch_timeout"


class FetchTooLarge(FetchError):
    reason = "fetch_too_large"


class FetchHttpStatus(FetchError):
    reason = "fetch_http_status"


class TooManyRedirects(FetchError):
    reason = "too_many_redirects"


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0  # total, from the first byte sent to the last byte read
    connect_timeout_s: float = 3.0
    max_redirects: int = 3
    allowed_hosts: tuple[str, ...] = ()  # "example.com" exactly, ".example.com" any subdomain; () = any
    allow_networks: tuple[IPNetwork, ...] = field(default_factory=tuple)
    user_agent: str = "moderator/0.1 (+content moderation)"


def parse_networks(specs: tuple[str, ...] | list[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(s, strict=False) for s in specs)


def address_blocked(ip: IPAddress, allow: tuple[IPNetwork, ...] = ()) -> str | None:
    """Why an address may not be fetched from, or None when it may."""
    for net in allow:
        if ip.version == net.version and ip in net:
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: IPAddress | None = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip.teredo:
            embedded = ip.teredo[1]
        if embedded is not None:
            inner = address_blocked(embedded, allow)
            return f"embeds {embedded}: {inner}" if inner else None
    for attr in ("is_loopback", "is_private", "is_link_local", "is_multicast", "is_reserved", "is_unspecified"):
        if getattr(ip, attr):
            return attr.removeprefix("is_").replace("_", "-") + " address"
    if ip.version == 4 and ip in _CGNAT:
        return "carrier-grade NAT address"
    if not ip.is_global:
        return "non-global address"
    return None


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    return any(host == a or (a.startswith(".") and host.endswith(a)) for a in allowed)


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to an already checked address, with the URL's host in the Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    raw_sock: socket.socket | None = None  # kept: http.client drops .sock once a response owns it

    def connect(self) -> None:
        self.sock = self.raw_sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._ip = ip
        self._tls = context

    raw_sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.raw_sock = sock
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


class Fetcher:
    def __init__(self, policy: FetchPolicy, ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self._ssl = ssl_context or ssl.create_default_context()

    def check_url(self, url: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, path) of an acceptable URL, or :class:`UrlInvalid` / :class:`UrlBlocked`."""
        if len(url) > 8192:
            raise UrlInvalid("URL longer than 8192 characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UrlInvalid(f"malformed URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise UrlInvalid(f"scheme {parts.scheme!r} is not allowed (http and https only)")
        if parts.username is not None or parts.password is not None:
            raise UrlInvalid("credentials in URLs are not allowed")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise UrlInvalid("URL has no host")
        if not _host_allowed(host, self.policy.allowed_hosts):
            raise UrlBlocked(f"host {host!r} is not in the allowed hosts")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path

    def resolve(self, host: str, port: int) -> str:
        """One checked address to connect to; every address the name resolves to must pass."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
            addrs: list[IPAddress] = [literal]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise FetchError(f"cannot resolve {host!r}: {exc}") from None
            addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not addrs:
            raise FetchError(f"{host!r} resolves to no address")
        for ip in addrs:
            why = address_blocked(ip, self.policy.allow_networks)
            if why:
                raise UrlBlocked(f"{host} resolves to {ip}, a {why}")
        return str(addrs[0])

    def fetch(self, url: str) -> bytes:
        """The body of ``url`` (following checked redirects), or a typed :class:`FetchError`."""
        deadline = time.monotonic() + self.policy.timeout_s
        for _hop in range(self.policy.max_redirects + 1):
            scheme, host, port, path = self.check_url(url)
            ip = self.resolve(host, port)
            status, location, body = self._get(scheme, host, port, ip, path, deadline)
            if status in _REDIRECTS:
                if not location:
                    raise FetchHttpStatus(f"HTTP {status} without a Location header")
                url = urljoin(url, location)
                continue
            return body
        raise TooManyRedirects(f"more than {self.policy.max_redirects} redirects")

    def _get(
        self, scheme: str, host: str, port: int, ip: str, path: str, deadline: float
    ) -> tuple[int, str | None, bytes]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchTimeout(f"no time left within {self.policy.timeout_s}s")
        timeout = min(self.policy.connect_timeout_s, remaining)
        conn: _Pinned | _PinnedTLS = (
            _PinnedTLS(host, port, ip, timeout, self._ssl) if scheme == "https" else _Pinned(host, port, ip, timeout)
        )
        expired = threading.Event()

        def watchdog() -> None:  # the total deadline: close the socket under a slow reader
            expired.set()
            sock = conn.raw_sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(remaining, watchdog)
        timer.daemon = True
        timer.start()
        try:
            conn.request("GET", path, headers={
                "User-Agent": self.policy.user_agent, "Accept": "image/*, video/mp4, video/webm",
                "Accept-Encoding": "identity", "Connection": "close",
            })  # fmt: skip
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                return resp.status, resp.getheader("Location"), b""
            if resp.status != 200:
                raise FetchHttpStatus(f"HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.policy.max_bytes:
                raise FetchTooLarge(f"Content-Length {length} exceeds {self.policy.max_bytes} bytes")
            chunks: list[bytes] = []
            size = 0
            while True:
                if conn.raw_sock is not None:
                    conn.raw_sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = resp.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.policy.max_bytes:
                    raise FetchTooLarge(f"body exceeds {self.policy.max_bytes} bytes")
                chunks.append(chunk)
            if expired.is_set():
                raise FetchTimeout(f"not complete within {self.policy.timeout_s}s")
            return 200, None, b"".join(chunks)
        except FetchError:
            raise
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            if expired.is_set() or isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                raise FetchTimeout(f"not complete within {self.policy.timeout_s}s") from None
            raise FetchError(f"{type(exc).__name__}: {exc}") from None
        finally:
            timer.cancel()
            conn.close()
