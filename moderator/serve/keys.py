"""Who may call the endpoint: API keys, stored hashed in a file, each with its rate (pure, stdlib).

**The keys file** (``MODERATOR_SERVE_KEYS_FILE``): one key per line, ``#`` comments and blank lines
ignored; the key's name, optionally its rate (images per second, ``50/s``, or per minute, ``600/min``;
else ``MODERATOR_SERVE_RATE_PER_S``), and the SHA-256 of the key::

    uploads:$sha256$<64 hex digits>
    ads-review:5/s:$sha256$<64 hex digits>

``moderator serve add-key NAME [--rate 5/s] >> keys.txt`` makes a key, prints it once on stderr and the
line on stdout. Keys are 256 random bits, so one fast hash is enough (a password needs a slow one: the
console's accounts use scrypt; a key cannot be guessed from its SHA-256). The file is read again when it
changes (:class:`KeysFile`): a key removed from it is refused at its next request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moderator.config import Settings
from moderator.observability import get_logger
from moderator.watched_file import WatchedFile

log = get_logger(__name__)

KEY_PREFIX = "mod_"
NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)/(s|min)$")
HASH_RE = re.compile(r"^\$sha256\$([0-9a-f]{64})$")


class KeysError(ValueError):
    """The keys file cannot be used; the message names the file and line."""


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", errors="replace")).hexdigest()


def parse_rate(text: str) -> float:
    """``"50/s"`` -> 50.0, ``"600/min"`` -> 10.0 (images per second); ValueError otherwise."""
    m = RATE_RE.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a rate such as 50/s or 600/min, got {text!r}")
    return float(m.group(1)) / (1 if m.group(2) == "s" else 60)


def key_line(name: str, key: str, rate: str | None = None) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"key name {name!r}: letters, digits and _ . @ -, at most 64")
    if rate is not None:
        parse_rate(rate)
    return f"{name}:{rate + ':' if rate else ''}$sha256${key_hash(key)}"


@dataclass(frozen=True)
class ApiKey:
    name: str
    rate_per_s: float | None  # None: the setting's
    hash: str


@dataclass(frozen=True)
class Keys:
    by_hash: dict[str, ApiKey]

    @classmethod
    def parse(cls, text: str, path: Path | str = "<keys>") -> Keys:
        by_hash: dict[str, ApiKey] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, _, rest = line.partition(":")
            rate: float | None = None
            if rest and not rest.startswith("$"):
                rate_text, _, rest = rest.partition(":")
                try:
                    rate = parse_rate(rate_text)
                except ValueError as exc:
                    raise KeysError(f"{path}:{number}: {exc}") from None
            m = HASH_RE.match(rest)
            if not NAME_RE.match(name) or m is None:
                raise KeysError(
                    f"{path}:{number}: expected NAME:$sha256$HEX or NAME:RATE:$sha256$HEX"
                    " (make one with: moderator serve add-key NAME)"
                )
            by_hash[m.group(1)] = ApiKey(name, rate, m.group(1))
        if not by_hash:
            raise KeysError(f"{path}: no API keys (add one with: moderator serve add-key NAME)")
        return cls(by_hash)

    @classmethod
    def load(cls, path: Path) -> Keys:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeysError(f"{path}: cannot read the API keys: {exc.strerror or exc}") from None
        return cls.parse(text, path)

    def check(self, key: str) -> ApiKey | None:
        """The key's entry when ``key`` is one of them."""
        digest = key_hash(key)
        found = self.by_hash.get(digest)
        return found if found is not None and hmac.compare_digest(found.hash, digest) else None


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (what the OpenAI clients send)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeysFile(WatchedFile[Keys]):
    """The keys file, read again when it changes (see :class:`~moderator.watched_file.WatchedFile`)."""

    def __init__(self, path: Path, on_error: Callable[[str], None] = lambda message: None) -> None:
        super().__init__(path, Keys.load, (KeysError,), on_error)


def _keys_error(message: str) -> None:
    log.error("serve_keys_unreadable", error=message, consequence="the last good keys stay in use")


def load_keys(settings: Settings) -> KeysFile:
    """The API keys file, read (start-up fails here, before any model loads, when it is missing or bad)."""
    if settings.serve_keys_file is None:
        raise KeysError(
            "the endpoint needs API keys: set MODERATOR_SERVE_KEYS_FILE (lines made by `moderator serve add-key NAME`)"
        )
    return KeysFile(settings.serve_keys_file, on_error=_keys_error)
