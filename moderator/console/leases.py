"""Claims on review items: expiring leases in Redis, so two reviewers never hold the same item and
an abandoned claim returns its item to the queue by itself.

A lease is one key per item, ``<prefix>lease:<handle>`` (the item's event id and image, hashed),
holding the reviewer's name, set only if absent (``SET NX PX``): the first claim wins, atomically,
across every console replica. It expires after ``ttl_s`` unless renewed; renewing and releasing check
the holder in one Lua script, so a reviewer can never extend or drop another's claim.

Beside the leases, in the same Redis and so shared by every replica:

- ``<prefix>holds:<reviewer>``: the handles a reviewer claimed (``held_by`` keeps those whose lease is
  still theirs): the per-reviewer limit, and the grid of what one holds, whichever replica served it.
- ``<prefix>revealed:<handle>:<reviewer>``: the reviewer revealed this image (the original is served
  only then), for as long as a lease.
- ``<prefix>revision:<key>:<n>``: revision ``n`` of a verdict is being published (``SET NX``): two quick
  submits, on one replica or two, never both publish the same revision.
- ``<prefix>aside:<handle>``: the item's image changed since it was scored (set aside on every replica).
- ``<prefix>judged:<handle>``: the revisions of the item's verdict and second opinion last published,
  written before the lease is released. A replica that has not read them yet from the verdicts topic
  does not hand the item out (it would show a judged item again).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

_IF_HOLDER = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call({}) end return 0"
_IF_HOLDER_EXPIRE = _IF_HOLDER.format("'pexpire', KEYS[1], ARGV[2]")
_IF_HOLDER_DELETE = _IF_HOLDER.format("'del', KEYS[1]")
_MAX_MERGE = """
local v = redis.call('get', KEYS[1])
local a, b = 0, 0
if v then
  local x, y = string.match(v, '(%d+),(%d+)')
  a, b = tonumber(x), tonumber(y)
end
a = math.max(a, tonumber(ARGV[1]))
b = math.max(b, tonumber(ARGV[2]))
redis.call('set', KEYS[1], a .. ',' .. b, 'EX', ARGV[3])
return 1
"""


RESERVE_MS = 35_000  # a verdict's publish waits 30 s at most for the broker


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Leases:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self._expire = client.register_script(_IF_HOLDER_EXPIRE)
        self._delete = client.register_script(_IF_HOLDER_DELETE)
        self._max_merge = client.register_script(_MAX_MERGE)

    def key(self, handle: str) -> str:
        return f"{self.prefix}lease:{handle}"

    def _holds(self, reviewer: str) -> str:
        return f"{self.prefix}holds:{reviewer}"

    def claim(self, handle: str, reviewer: str) -> bool:
        """Take the item for ``reviewer`` if nobody holds it (or ``reviewer`` already does: renewed)."""
        if self.client.set(self.key(handle), reviewer, nx=True, px=self.ttl_ms):
            pipe = self.client.pipeline()
            pipe.sadd(self._holds(reviewer), handle)
            pipe.pexpire(self._holds(reviewer), self.ttl_ms * 2)
            pipe.execute()
            return True
        return self.renew(handle, reviewer)

    def holder(self, handle: str) -> str | None:
        value = self.client.get(self.key(handle))
        return _text(value) if value is not None else None

    def holders(self, handles: Sequence[str]) -> dict[str, str]:
        """The current holder of each of these items that has one (one round trip)."""
        if not handles:
            return {}
        values = self.client.mget([self.key(h) for h in handles])
        return {h: _text(v) for h, v in zip(handles, values, strict=True) if v}

    def held_by(self, reviewer: str) -> list[str]:
        """The items ``reviewer`` holds now, claimed on any replica (the stale ones are forgotten)."""
        handles = sorted(_text(h) for h in self.client.smembers(self._holds(reviewer)))
        held = self.holders(handles)
        gone = [h for h in handles if held.get(h) != reviewer]
        if gone:
            self.client.srem(self._holds(reviewer), *gone)
        return [h for h in handles if held.get(h) == reviewer]

    def all(self, limit: int = 10_000) -> list[tuple[str, str, float]]:
        """Every lease: (handle, holder, seconds left), for the admin's page."""
        keys = []
        for key in self.client.scan_iter(match=f"{self.prefix}lease:*", count=500):
            keys.append(_text(key))
            if len(keys) >= limit:
                break
        if not keys:
            return []
        pipe = self.client.pipeline()
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        values = pipe.execute()
        out = []
        for i, key in enumerate(keys):
            holder, ms = values[2 * i], values[2 * i + 1]
            if holder is not None:
                out.append((key.removeprefix(f"{self.prefix}lease:"), _text(holder), max(0, int(ms)) / 1000))
        return out

    def expires_in(self, handle: str) -> float:
        """Seconds left on the item's lease (0 when there is none)."""
        ms = self.client.pttl(self.key(handle))
        return max(0, int(ms)) / 1000 if isinstance(ms, int) else 0.0

    def renew(self, handle: str, reviewer: str) -> bool:
        if not self._expire(keys=[self.key(handle)], args=[reviewer, self.ttl_ms]):
            return False
        self.client.pexpire(self._holds(reviewer), self.ttl_ms * 2)
        return True

    def release(self, handle: str, reviewer: str) -> bool:
        released = bool(self._delete(keys=[self.key(handle)], args=[reviewer]))
        self.client.srem(self._holds(reviewer), handle)
        return released

    # --- reveals and revisions -------------------------------------------------------------------------
    def mark_revealed(self, handle: str, reviewer: str) -> None:
        self.client.set(f"{self.prefix}revealed:{handle}:{reviewer}", "1", px=self.ttl_ms)

    def revealed(self, handle: str, reviewer: str) -> bool:
        return bool(self.client.exists(f"{self.prefix}revealed:{handle}:{reviewer}"))

    def reserve_revision(self, key: str, revision: int, reviewer: str) -> bool:
        """Whether ``reviewer`` may publish revision ``revision`` of verdict ``key`` (the first to ask). The
        reservation outlives a publish (30 s at most) and no more: a replica that dies holding one does
        not keep the item from being judged for longer."""
        return bool(self.client.set(f"{self.prefix}revision:{key}:{revision}", reviewer, nx=True, px=RESERVE_MS))

    def release_revision(self, key: str, revision: int, reviewer: str) -> None:
        self._delete(keys=[f"{self.prefix}revision:{key}:{revision}"], args=[reviewer])

    def mark_judged(self, handle: str, first: int, second: int) -> None:
        """Raise the item's published revisions to at least these (never lower: replicas race)."""
        self._max_merge(keys=[f"{self.prefix}judged:{handle}"], args=[first, second, 7 * 86_400])

    def judged(self, handle: str) -> tuple[int, int]:
        value = self.client.get(f"{self.prefix}judged:{handle}")
        if value is None:
            return (0, 0)
        first, _, second = _text(value).partition(",")
        return (int(first), int(second or 0))

    def set_aside(self, handle: str, why: str) -> None:
        """The item's image changed since it was scored: no replica hands it out again."""
        self.client.set(f"{self.prefix}aside:{handle}", why, ex=30 * 86_400)

    def aside(self, handle: str) -> str | None:
        value = self.client.get(f"{self.prefix}aside:{handle}")
        return _text(value) if value is not None else None
