"""Sign-in sessions, server-side in Redis: the cookie names a session, Redis says whose it is.

The signed cookie (Starlette's session middleware) carries only a random session id and the CSRF
token; the session itself is ``<prefix>session:<sha256 of the id>`` (a Redis dump holds no usable
cookie), a hash of the reviewer's name and when it began, expiring after ``idle_s`` without a request
and ``max_s`` after signing in whatever the use. Every replica sees the same sessions; signing out
deletes the key, so the cookie is dead at once, everywhere; ``end_all`` ends every session of one
reviewer (an account removed from the accounts file is ended at its next request, ``app.py``).

:class:`LoginGuard` keeps the failed sign-ins there too, so a client spreading its guesses over the
replicas gets no more of them: ``<prefix>login-failures:<key>`` counts (forgotten an hour after the
last), ``<prefix>login-wait:<key>`` holds until when the next try waits.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import redis

from moderator.console.auth import backoff_s


class Sessions:
    def __init__(self, client: redis.Redis, prefix: str, idle_s: float, max_s: float) -> None:
        self.client = client
        self.prefix = prefix
        self.idle_ms = int(idle_s * 1000)
        self.max_s = max_s

    def _key(self, sid: str) -> str:
        return f"{self.prefix}session:{hashlib.sha256(sid.encode()).hexdigest()}"

    def _index(self, user: str) -> str:
        return f"{self.prefix}sessions-of:{user}"

    def create(self, user: str) -> str:
        sid = secrets.token_urlsafe(32)
        key = self._key(sid)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping={"user": user, "since": f"{time.time():.3f}"})
        pipe.pexpire(key, self.idle_ms)
        pipe.sadd(self._index(user), key)
        pipe.expire(self._index(user), int(self.max_s) + 60)
        pipe.execute()
        return sid

    def user(self, sid: str | None) -> str | None:
        """Whose session this is (and it is used: its idle time starts again); None when it has ended."""
        if not sid:
            return None
        key = self._key(sid)
        values = self.client.hgetall(key)
        if not values:
            return None
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in values.items()}  # fmt: skip
        if time.time() - float(fields.get("since", 0)) > self.max_s:
            self.client.delete(key)
            return None
        self.client.pexpire(key, self.idle_ms)
        return fields.get("user")

    def end(self, sid: str | None) -> None:
        if sid:
            self.client.delete(self._key(sid))

    def end_all(self, user: str) -> int:
        """End every session of ``user``; how many there were."""
        keys = list(self.client.smembers(self._index(user)))
        if not keys:
            return 0
        ended = int(self.client.delete(*keys))
        self.client.delete(self._index(user))
        return ended


class LoginGuard:
    """Failed sign-ins per key (``ip:<address>``, ``account:<name>``), in Redis: after ``free`` failures
    each one doubles the wait before the next try (:func:`~moderator.console.auth.backoff_s`)."""

    def __init__(self, client: redis.Redis, prefix: str, free: int, base_s: float = 1.0, max_s: float = 900.0,
                 forget_s: float = 3600.0) -> None:  # fmt: skip
        self.client, self.prefix = client, prefix
        self.free, self.base_s, self.max_s, self.forget_ms = free, base_s, max_s, int(forget_s * 1000)

    def wait(self, keys: list[str]) -> float:
        """Seconds before these keys may try again (0: now)."""
        values = self.client.mget([f"{self.prefix}login-wait:{k}" for k in keys])
        now = time.time()
        return max([float(v) - now for v in values if v is not None] + [0.0])

    def failed(self, keys: list[str]) -> None:
        pipe = self.client.pipeline()
        for key in keys:
            pipe.incr(f"{self.prefix}login-failures:{key}")
            pipe.pexpire(f"{self.prefix}login-failures:{key}", self.forget_ms)
        counts = pipe.execute()[0::2]
        now = time.time()
        for key, count in zip(keys, counts, strict=True):
            wait = backoff_s(int(count), self.free, self.base_s, self.max_s)
            if wait > 0:
                self.client.set(f"{self.prefix}login-wait:{key}", f"{now + wait:.3f}", px=max(1, int(wait * 1000)))

    def succeeded(self, keys: list[str]) -> None:
        self.client.delete(*[f"{self.prefix}login-{what}:{k}" for k in keys for what in ("failures", "wait")])
