"""Per-key rate limits: a token bucket per API key, counted in images (pure: the caller passes the time).

A key earns ``rate`` images per second up to ``burst`` saved; a request of ``n`` images takes ``n``
tokens, or is refused with the seconds until it could be served (``Retry-After``). Buckets are per
process: with several replicas behind a balancer, a key's rate is per replica.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # most tokens saved
    tokens: float
    stamp: float  # when ``tokens`` was last brought up to date

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens (at most ``burst``: a larger request waits for a full bucket) and return 0;
        or take none and return the seconds until there would be enough."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        n = min(n, self.burst)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class RateLimiter:
    """One bucket per key name, made full on first use; the least recently used are forgotten beyond
    ``max_keys`` (a forgotten key starts full again)."""

    def __init__(self, burst: int, max_keys: int = 10_000) -> None:
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, name: str, rate: float, n: int, now: float) -> float:
        bucket = self._buckets.get(name)
        if bucket is None or bucket.rate != rate:  # new, or its rate changed in the keys file
            bucket = TokenBucket(rate, float(self.burst), float(self.burst), now)
            self._buckets[name] = bucket
        self._buckets.move_to_end(name)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return bucket.take(float(n), now)
