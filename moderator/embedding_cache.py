"""Text embeddings, cached: an in-process LRU in front of Redis, shared by every worker.

Key: ``prefix + model fingerprint + ":" + sha256(exact text)``. Value: a small header (magic, dtype,
dim) followed by the float32 vector, checked on every read: a value of the wrong format, dtype or
dim is ignored, recomputed and overwritten. Reads and writes are batched (one MGET, one MSET).

Redis accelerates, it never decides: any Redis error or timeout means "compute locally", logged
once per outage and counted; Redis is not tried again for ``retry_after_s``.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from moderator.observability import (
    TEXT_CACHE_HITS,
    TEXT_CACHE_MISSES,
    TEXT_CACHE_REDIS_ERRORS,
    TEXT_CACHE_REJECTED,
    get_logger,
)

if TYPE_CHECKING:
    import redis

    from moderator.clip import ClipEngine

log = get_logger(__name__)

_MAGIC = b"MDE1"
_HEADER = struct.Struct("<4sBI")  # magic, dtype code (1 = float32 little-endian), dim
_F32 = 1


def encode_value(vec: np.ndarray) -> bytes:
    v = np.ascontiguousarray(vec, dtype="<f4")
    return _HEADER.pack(_MAGIC, _F32, v.shape[0]) + v.tobytes()


def decode_value(raw: bytes, dim: int) -> np.ndarray | None:
    """The vector, or None when the value is not a float32 vector of ``dim`` in our format."""
    if len(raw) != _HEADER.size + 4 * dim:
        return None
    magic, code, got_dim = _HEADER.unpack_from(raw)
    if magic != _MAGIC or code != _F32 or got_dim != dim:
        return None
    vec = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size).astype(np.float32)
    if not np.all(np.isfinite(vec)):
        return None
    return vec


class TextEmbeddingCache:
    """LRU + Redis store of float32 text embeddings for one model fingerprint."""

    def __init__(
        self,
        fingerprint: str,
        dim: int,
        redis_client: redis.Redis | None = None,
        *,
        prefix: str = "moderator:emb:",
        lru_size: int = 65_536,
        retry_after_s: float = 5.0,
    ) -> None:
        self.fingerprint = fingerprint
        self.dim = dim
        self.redis = redis_client
        self.prefix = prefix
        self.lru_size = lru_size
        self.retry_after_s = retry_after_s
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._outage = False

    def key(self, text: str) -> str:
        return f"{self.prefix}{self.fingerprint}:{hashlib.sha256(text.encode('utf-8')).hexdigest()}"

    # --- LRU ------------------------------------------------------------------------------------
    def _lru_get(self, text: str) -> np.ndarray | None:
        with self._lock:
            vec = self._lru.get(text)
            if vec is not None:
                self._lru.move_to_end(text)
            return vec

    def _lru_put(self, text: str, vec: np.ndarray) -> None:
        if self.lru_size <= 0:
            return
        with self._lock:
            self._lru[text] = vec
            self._lru.move_to_end(text)
            while len(self._lru) > self.lru_size:
                self._lru.popitem(last=False)

    # --- Redis, fail-open -----------------------------------------------------------------------
    def _usable_redis(self) -> redis.Redis | None:
        """The client, unless there is none or Redis failed less than ``retry_after_s`` ago."""
        return self.redis if time.monotonic() >= self._down_until else None

    def _redis_failed(self, exc: Exception) -> None:
        TEXT_CACHE_REDIS_ERRORS.inc()
        self._down_until = time.monotonic() + self.retry_after_s
        if not self._outage:
            self._outage = True
            log.warning(
                "redis_unavailable",
                error=f"{type(exc).__name__}: {exc}",
                action="computing text embeddings locally",
                retry_after_s=self.retry_after_s,
            )

    def _redis_ok(self) -> None:
        if self._outage:
            self._outage = False
            log.info("redis_available_again")

    def get_many(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors for those texts that have a valid one (LRU first, then one MGET)."""
        found: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            vec = self._lru_get(text)
            if vec is not None:
                found[text] = vec
                TEXT_CACHE_HITS.labels(layer="memory").inc()
            else:
                missing.append(text)
        client = self._usable_redis()
        if missing and client is not None:
            try:
                raws = client.mget([self.key(t) for t in missing])
            except Exception as exc:  # redis errors, timeouts, connection refused
                self._redis_failed(exc)
            else:
                self._redis_ok()
                for text, raw in zip(missing, raws, strict=True):
                    if raw is None:
                        continue
                    vec = decode_value(raw if isinstance(raw, bytes) else raw.encode(), self.dim)
                    if vec is None:
                        TEXT_CACHE_REJECTED.inc()
                        log.warning("text_cache_value_rejected", key=self.key(text), length=len(raw))
                        continue
                    found[text] = vec
                    self._lru_put(text, vec)
                    TEXT_CACHE_HITS.labels(layer="redis").inc()
        TEXT_CACHE_MISSES.inc(sum(1 for t in missing if t not in found))
        return found

    def put_many(self, vectors: dict[str, np.ndarray]) -> None:
        for text, vec in vectors.items():
            self._lru_put(text, vec)
        client = self._usable_redis()
        if vectors and client is not None:
            try:
                client.mset({self.key(t): encode_value(v) for t, v in vectors.items()})
            except Exception as exc:
                self._redis_failed(exc)
            else:
                self._redis_ok()


class TextEncoder:
    """``encode`` and ``encode_ensembles`` through the cache: only texts never seen are run."""

    def __init__(self, engine: ClipEngine, cache: TextEmbeddingCache) -> None:
        if cache.fingerprint != engine.fingerprint or cache.dim != engine.embed_dim:
            raise ValueError("cache and engine disagree on model fingerprint or embedding dim")
        self.engine = engine
        self.cache = cache
        self.texts_encoded = 0  # texts this encoder ran through the model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 ``[N, D]`` (host memory), one row per text, in order."""
        found = self.cache.get_many(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in found]
        if todo:
            fresh = self.engine.encode_texts(todo).cpu().numpy().astype(np.float32)
            new = dict(zip(todo, fresh, strict=True))
            self.cache.put_many(new)
            found.update(new)
            self.texts_encoded += len(todo)
        if not texts:
            return np.zeros((0, self.cache.dim), dtype=np.float32)
        return np.stack([found[t] for t in texts])

    def encode_ensembles(self, ensembles: Sequence[Sequence[str]]) -> np.ndarray:
        """One vector per ensemble: the mean of its normalized embeddings, normalized again."""
        flat = [t for group in ensembles for t in group]
        vecs = torch.from_numpy(self.encode(flat))
        sizes = [len(g) for g in ensembles]
        if any(s == 0 for s in sizes):
            raise ValueError("an ensemble needs at least one text")
        means = torch.stack([chunk.mean(dim=0) for chunk in vecs.split(sizes)])
        return torch.nn.functional.normalize(means, dim=-1).numpy()
