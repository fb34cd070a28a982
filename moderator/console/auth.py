"""Who a reviewer is: accounts with roles, the trusted proxy header, and the login guard (pure, stdlib).

**Accounts** (``MODERATOR_CONSOLE_ACCOUNTS_FILE``): one per line, ``#`` comments and blank lines ignored;
the role (``reviewer``, ``lead`` or ``admin``) may follow the name, the default is ``reviewer``; the hash
is a PHC-style string, so its parameters travel with it::

    alice:$scrypt$ln=15,r=8,p=1$<salt, base64>$<32-byte key, base64>
    lena:lead:$scrypt$ln=15,r=8,p=1$...

``moderator console add-user NAME [--role lead] >> reviewers.txt`` writes a line. The file is read again
when it changes (:class:`AccountsFile`): an account removed from it is signed out at its next request.

**Trusted header**: behind an authenticating proxy, the reviewer's name (and groups, for the role) come
from headers, believed only when the TCP peer itself is one of ``MODERATOR_CONSOLE_TRUSTED_PROXIES``
(addresses or CIDR ranges; never an ``X-Forwarded-For``) and the header is there exactly once.

**Login guard**: failed sign-ins per client address and per account name earn a doubling wait (after a
few free tries, :func:`backoff_s`; counted in Redis, so across replicas: ``sessions.py``) during which
no password is even hashed; the hashing itself runs on its own small pool (``app.py``), so a flood of
logins cannot take the threads that claims and verdicts need.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moderator.watched_file import WatchedFile

Role = Literal["reviewer", "lead", "admin"]
ROLES: tuple[Role, ...] = ("reviewer", "lead", "admin")  # each may do what the ones before it may
LN, R, P = 15, 8, 1  # N = 2^15: about 0.1 s and 32 MiB per hash (MODERATOR_CONSOLE_SCRYPT_LN)
MAX_LN = 20  # 1 GiB per hash at r = 8: a hash line asking for more is refused, not computed
DKLEN = 32
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class AccountsError(ValueError):
    """The accounts file cannot be used; the message names the file and line."""


def at_least(role: Role, needed: Role) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _maxmem(n: int, r: int, p: int) -> int:
    """What scrypt needs (128 r N for V, 128 r p for B, some slack): OpenSSL refuses more than maxmem."""
    return 128 * r * (n + p + 2) + (1 << 20)


def hash_password(password: str, *, ln: int = LN) -> str:
    if not 10 <= ln <= MAX_LN:
        raise ValueError(f"scrypt cost ln={ln}: choose 10 to {MAX_LN} (15 = 2^15, about 0.1 s)")
    salt = os.urandom(16)
    n = 2**ln
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=R, p=P, maxmem=_maxmem(n, R, P), dklen=DKLEN)
    return f"$scrypt$ln={ln},r={R},p={P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, scheme, params, salt_b64, key_b64 = encoded.split("$")
        values = dict(item.split("=", 1) for item in params.split(","))
        ln, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        salt, expected = _unb64(salt_b64), _unb64(key_b64)
    except (ValueError, KeyError):
        return False
    if scheme != "scrypt" or not (1 <= ln <= MAX_LN) or not (1 <= r <= 32) or not (1 <= p <= 16):
        return False
    n = 2**ln
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=len(expected))
    return hmac.compare_digest(key, expected)


@functools.cache
def _dummy() -> str:  # checked for unknown names: a wrong name costs as long as a wrong password
    return hash_password("not a password of anyone")


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    hash: str


@dataclass(frozen=True)
class Accounts:
    accounts: dict[str, Account]

    @classmethod
    def parse(cls, text: str, path: Path | str = "<accounts>") -> Accounts:
        accounts: dict[str, Account] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, rest = line.partition(":")
            role = "reviewer"
            if sep and not rest.startswith("$"):
                role, sep, rest = rest.partition(":")
            if not sep or not USERNAME_RE.match(name) or not rest.startswith("$scrypt$") or role not in ROLES:
                raise AccountsError(
                    f"{path}:{number}: expected NAME:$scrypt$... or NAME:ROLE:$scrypt$... with ROLE one of"
                    f" {', '.join(ROLES)} (make one with: moderator console add-user NAME --role ROLE)"
                )
            accounts[name] = Account(name, role, rest)
        if not accounts:
            raise AccountsError(f"{path}: no reviewer accounts (add one with: moderator console add-user NAME)")
        return cls(accounts)

    @classmethod
    def load(cls, path: Path) -> Accounts:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise AccountsError(f"{path}: cannot read the reviewer accounts: {exc.strerror or exc}") from None
        return cls.parse(text, path)

    def check(self, name: str, password: str) -> Account | None:
        """The account, if the password is its own (as slow for an unknown name as for a known one)."""
        account = self.accounts.get(name)
        ok = verify_password(password, account.hash if account else _dummy())
        return account if ok and account is not None else None

    def role(self, name: str) -> Role | None:
        account = self.accounts.get(name)
        return account.role if account is not None else None


class AccountsFile(WatchedFile[Accounts]):
    """The accounts file, read again when it changes (see :class:`~moderator.watched_file.WatchedFile`)."""

    def __init__(self, path: Path, on_error: Callable[[str], None] = lambda message: None) -> None:
        super().__init__(path, Accounts.load, (AccountsError,), on_error)


# --- the trusted proxy ------------------------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR ranges (``10.0.0.0/8``); ValueError naming the one that is neither."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR range (e.g. 10.0.0.0/8)") from None
    return tuple(out)


def peer_trusted(peer: str | None, networks: Sequence[Network]) -> bool:
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in networks)


def header_once(values: Sequence[str]) -> str | None:
    """The header's value when it was sent exactly once and is not empty; else None (a second copy may
    be one the client added, ahead of or behind the proxy's)."""
    if len(values) != 1:
        return None
    value = values[0].strip()
    return value or None


def role_of_groups(groups: str, leads: Iterable[str], admins: Iterable[str]) -> Role:
    """The role a proxy's group header gives (comma- or space-separated group names)."""
    names = {g for g in re.split(r"[,\s]+", groups) if g}
    if names & set(admins):
        return "admin"
    if names & set(leads):
        return "lead"
    return "reviewer"


# --- the login guard's law (its state is in Redis: sessions.py) ---------------------------------------
def backoff_s(failures: int, free: int, base_s: float = 1.0, max_s: float = 900.0) -> float:
    """How long to wait after ``failures`` failed sign-ins: nothing for the first ``free``, then doubling
    from ``base_s`` up to ``max_s``."""
    if failures <= free:
        return 0.0
    return float(min(max_s, base_s * 2 ** (failures - free - 1)))
