"""Claims on review items: expiring leases in Redis, so two reviewers never hold the same item and
an abandoned claim returns its item to the queue by itself.

A lease is one key per item, ``<prefix>lease:<handle>`` (the item's event id and image, hashed),
holding the reviewer's name, set only if absent (``SET NX PX``): the first claim wins, atomically,
across every console replica. It expires after ``ttl_s`` unless renewed; renewing and releasing check
the holder in one Lua script, so a reviewer can never extend or drop another's claim.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

_IF_HOLDER = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call({}) end return 0"
_IF_HOLDER_EXPIRE = _IF_HOLDER.format("'pexpire', KEYS[1], ARGV[2]")
_IF_HOLDER_DELETE = _IF_HOLDER.format("'del', KEYS[1]")


class Leases:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self._expire = client.register_script(_IF_HOLDER_EXPIRE)
        self._delete = client.register_script(_IF_HOLDER_DELETE)

    def key(self, event_id: str) -> str:
        return f"{self.prefix}lease:{event_id}"

    def claim(self, event_id: str, reviewer: str) -> bool:
        """Take the item for ``reviewer`` if nobody holds it (or ``reviewer`` already does: renewed)."""
        if self.client.set(self.key(event_id), reviewer, nx=True, px=self.ttl_ms):
            return True
        return self.renew(event_id, reviewer)

    def holder(self, event_id: str) -> str | None:
        value = self.client.get(self.key(event_id))
        return value.decode() if isinstance(value, bytes) else value

    def holders(self, event_ids: Sequence[str]) -> dict[str, str]:
        """The current holder of each of these items that has one (one round trip)."""
        if not event_ids:
            return {}
        values = self.client.mget([self.key(e) for e in event_ids])
        return {e: v.decode() if isinstance(v, bytes) else str(v) for e, v in zip(event_ids, values, strict=True) if v}

    def expires_in(self, event_id: str) -> float:
        """Seconds left on the item's lease (0 when there is none)."""
        ms = self.client.pttl(self.key(event_id))
        return max(0, int(ms)) / 1000 if isinstance(ms, int) else 0.0

    def renew(self, event_id: str, reviewer: str) -> bool:
        return bool(self._expire(keys=[self.key(event_id)], args=[reviewer, self.ttl_ms]))

    def release(self, event_id: str, reviewer: str) -> bool:
        return bool(self._delete(keys=[self.key(event_id)], args=[reviewer]))
