"""Reviewer accounts: salted scrypt password hashes in a file (stdlib only).

The file (``MODERATOR_CONSOLE_ACCOUNTS_FILE``) has one account per line, ``#`` comments and blank lines
ignored; the hash is a PHC-style string, so its parameters travel with it::

    alice:$scrypt$ln=15,r=8,p=1$<salt, base64>$<32-byte key, base64>

``moderator console add-user NAME >> reviewers.txt`` writes a line (it asks for the password twice on
a terminal, or reads one line from standard input).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

LN, R, P = 15, 8, 1  # N = 2^15: about 0.1 s and 32 MiB per hash
DKLEN = 32
MAXMEM = 64 * 1024 * 1024  # OpenSSL's default limit (32 MiB) refuses N = 2^15, r = 8
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class AccountsError(ValueError):
    """The accounts file cannot be used; the message names the file and line."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, ln: int = LN) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=2**ln, r=R, p=P, maxmem=MAXMEM, dklen=DKLEN)
    return f"$scrypt$ln={ln},r={R},p={P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, scheme, params, salt_b64, key_b64 = encoded.split("$")
        values = dict(item.split("=", 1) for item in params.split(","))
        ln, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        salt, expected = _unb64(salt_b64), _unb64(key_b64)
    except (ValueError, KeyError):
        return False
    if scheme != "scrypt" or not (1 <= ln <= 20):
        return False
    key = hashlib.scrypt(password.encode(), salt=salt, n=2**ln, r=r, p=p, maxmem=MAXMEM, dklen=len(expected))
    return hmac.compare_digest(key, expected)


_DUMMY = hash_password("not a password of anyone")  # checked for unknown names: a wrong name costs as long


@dataclass(frozen=True)
class Accounts:
    hashes: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> Accounts:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise AccountsError(f"{path}: cannot read the reviewer accounts: {exc.strerror or exc}") from None
        hashes: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, encoded = line.partition(":")
            if not sep or not USERNAME_RE.match(name) or not encoded.startswith("$scrypt$"):
                raise AccountsError(
                    f"{path}:{number}: expected NAME:$scrypt$... (make one with: moderator console add-user NAME)"
                )
            hashes[name] = encoded
        if not hashes:
            raise AccountsError(f"{path}: no reviewer accounts (add one with: moderator console add-user NAME)")
        return cls(hashes)

    def check(self, name: str, password: str) -> bool:
        encoded = self.hashes.get(name)
        ok = verify_password(password, encoded or _DUMMY)
        return ok and encoded is not None
