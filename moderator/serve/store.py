"""The idempotency store: the decision record a request got, by event id and image, for its retries.

A request that names an event id already decided for the same image bytes (sha256) gets the stored
decision record back, unchanged, without another batch or another publication. Records live in Redis
(``MODERATOR_SERVE_REDIS_PREFIX``, ``MODERATOR_SERVE_IDEMPOTENCY_TTL_S``) with a small in-process LRU in
front. Redis accelerates, it never decides: when it is down or has forgotten, the request is decided
again and published again under the same key (a duplicate the outputs' keys make harmless).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from typing import Any

from moderator.observability import get_logger

log = get_logger(__name__)


class DecisionStore:
    def __init__(
        self, client: Any, prefix: str, ttl_s: float, lru_size: int = 4096, retry_after_s: float = 5.0
    ) -> None:
        self.client = client  # a Redis client, or None: the LRU alone
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.lru_size = lru_size
        self.retry_after_s = retry_after_s
        self._lru: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._down_until = 0.0

    def key(self, event_id: str, sha256: str) -> str:
        return self.prefix + "decision:" + hashlib.sha256(f"{event_id}\x00{sha256}".encode()).hexdigest()

    def get(self, event_id: str, sha256: str) -> bytes | None:
        key = self.key(event_id, sha256)
        with self._lock:
            found = self._lru.get(key)
            if found is not None:
                self._lru.move_to_end(key)
                return found
        client = self._client()
        if client is None:
            return None
        try:
            value = client.get(key)
        except Exception as exc:
            self._failed(exc)
            return None
        if isinstance(value, bytes):
            self._remember(key, value)
            return value
        return None

    def put(self, event_id: str, sha256: str, record: bytes) -> None:
        self.remember(event_id, sha256, record)
        self.save(event_id, sha256, record)

    def remember(self, event_id: str, sha256: str, record: bytes) -> None:
        """In this process only (no I/O: safe on the event loop)."""
        self._remember(self.key(event_id, sha256), record)

    def save(self, event_id: str, sha256: str, record: bytes) -> None:
        """In Redis (a round trip: on a thread)."""
        key = self.key(event_id, sha256)
        client = self._client()
        if client is None or self.ttl_s <= 0:
            return
        try:
            client.set(key, record, px=int(self.ttl_s * 1000))
        except Exception as exc:
            self._failed(exc)

    def _remember(self, key: str, record: bytes) -> None:
        with self._lock:
            self._lru[key] = record
            self._lru.move_to_end(key)
            while len(self._lru) > self.lru_size:
                self._lru.popitem(last=False)

    def _client(self) -> Any:
        return self.client if self.client is not None and time.monotonic() >= self._down_until else None

    def _failed(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("serve_redis_unavailable", error=f"{type(exc).__name__}: {exc}",
                        consequence="retries are decided again")  # fmt: skip
        self._down_until = time.monotonic() + self.retry_after_s
