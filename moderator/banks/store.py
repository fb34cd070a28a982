"""Banks on Kafka: the compacted ``banks`` topic, read, written, and followed by every worker.

- Key ``<bank>/<id>``, value a :class:`~moderator.events.BankEntry`; a tombstone (no value) removes the
  entry. Compaction keeps the latest record of every key, so the topic *is* the banks: no other
  service, and a new worker reads them all at start-up.
- :class:`BankStore` (a worker's): reads the topic to its end at start-up, then follows it on its own
  thread; after any change it builds a new :class:`~moderator.banks.index.BankIndex` off the hot path
  and swaps ``current`` (one reference assignment), so an addition is live within a poll interval.
- :func:`read_entries` and :func:`publish` are what ``moderator bank`` uses.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from moderator import clients
from moderator import observability as obs
from moderator.banks.index import EMPTY, BankIndex, Entry
from moderator.banks.pdq import MIN_QUALITY, from_hex
from moderator.config import Settings
from moderator.events import BankEntry
from moderator.periodic import Periodic

log = obs.get_logger(__name__)


class Banks(Protocol):
    """What the worker needs: the current index (swapped whole, never changed in place)."""

    @property
    def current(self) -> BankIndex: ...


class FixedBanks:
    """An index that never changes (the benchmark's, a test's; no banks at all: ``FixedBanks()``)."""

    def __init__(self, index: BankIndex = EMPTY) -> None:
        self.current = index


def decode(record: BankEntry, model: str | None = None, dim: int | None = None) -> Entry:
    """The entry as the index keeps it: the hash as bytes (none when of too low a quality), the
    embedding as float16, renormalized. An embedding of ``model`` must have ``dim`` finite values of
    about unit length (anything else raises ``ValueError``: one bad record must not poison the index);
    another model's is dropped (it is never compared)."""
    pdq = None
    if record.pdq is not None and (record.pdq_quality is None or record.pdq_quality >= MIN_QUALITY):
        pdq = from_hex(record.pdq)
    embedding = None
    if record.embedding is not None and (model is None or record.model == model):
        values = np.frombuffer(base64.b64decode(record.embedding), dtype="<f2").astype(np.float32)
        want = dim if dim is not None else record.dim
        if want is not None and values.size != want:
            raise ValueError(f"entry {record.key}: an embedding of {values.size} values, {want} expected")
        norm = float(np.linalg.norm(values)) if np.isfinite(values).all() else float("nan")
        if not 0.9 <= norm <= 1.1:
            raise ValueError(f"entry {record.key}: the embedding is not L2-normalized (norm {norm:.3g})")
        embedding = (values / norm).astype(np.float16)
    if pdq is None and embedding is None:
        raise ValueError(f"entry {record.key}: neither a usable PDQ hash nor an embedding of this model")
    return Entry(record.bank, record.id, record.label, pdq, embedding, record.model)


def parse(value: bytes) -> BankEntry:
    return BankEntry.model_validate_json(value)


def read_entries(settings: Settings) -> dict[str, BankEntry]:
    """Every current entry of the banks topic, by key (``moderator bank list``, ``scan``, ``remove``)."""
    entries: dict[str, BankEntry] = {}

    def apply(record: Any) -> None:
        key = record.key.decode() if record.key else ""
        if record.value is None:
            entries.pop(key, None)
        else:
            entries[key] = parse(record.value)

    reader = clients.make_reader(settings, [settings.topic("banks")])
    try:
        clients.read_to_end(reader, apply)
    finally:
        reader.close(autocommit=False)
    return entries


def publish(settings: Settings, entries: Iterable[BankEntry] = (), removed: Sequence[str] = ()) -> int:
    """Send entries (and tombstones for the ``removed`` keys); wait until the broker has every one."""
    producer = clients.make_producer(settings)
    topic = settings.topic("banks")
    try:
        futures = [producer.send(topic, key=e.key.encode(), value=e.model_dump_json().encode()) for e in entries]
        futures += [producer.send(topic, key=key.encode(), value=None) for key in removed]
        for f in futures:
            f.get(timeout=30)
        return len(futures)
    finally:
        producer.close(timeout=5)


class BankStore:
    """A worker's banks: the topic read at start-up, then followed (see the module docstring)."""

    def __init__(self, settings: Settings, model: str, dim: int, interval_s: float = 0.25) -> None:
        self.settings = settings
        self.model = model
        self.dim = dim
        self.interval_s = interval_s
        self.current: BankIndex = EMPTY
        self._entries: dict[str, Entry] = {}
        self._reader: Any = None
        self._follower = Periodic(self.refresh, interval_s, "bank-follower", "bank_follow_error")
        self._generation = 0

    def load(self) -> BankIndex:
        """Read every entry (start-up: the caller waits); raises :class:`~moderator.clients.TopicError`
        when the topic does not exist."""
        self._reader = clients.make_reader(self.settings, [self.settings.topic("banks")])
        clients.read_to_end(self._reader, self._apply)
        return self._swap()

    def refresh(self) -> bool:
        """Apply everything that arrived since (a large import drains in one go), then swap in one new
        index if anything changed."""
        changed = False
        while True:
            polled = self._reader.poll(timeout_ms=100 if not changed else 0, max_records=10_000)
            if not polled:
                break
            for records in polled.values():
                for record in records:
                    self._apply(record)
                    changed = True
        if changed:
            self._swap()
        return changed

    def _apply(self, record: Any) -> None:
        key = record.key.decode("utf-8", errors="replace") if record.key else ""
        if record.value is None:
            self._entries.pop(key, None)
            return
        try:
            self._entries[key] = decode(parse(record.value), self.model, self.dim)
        except ValueError as exc:  # a bad record never stops a worker: it is skipped, and said so
            log.error("bank_entry_invalid", key=key, offset=record.offset, error=str(exc)[:500])

    def _swap(self) -> BankIndex:
        self._generation += 1
        try:
            index = BankIndex(list(self._entries.values()), self.model, self._generation)
        except Exception:  # never expected (entries are checked as they arrive): keep the last good index
            log.exception("bank_index_failed", entries=len(self._entries), action="keeping the previous index")
            return self.current
        self.current = index
        obs.BANK_ENTRIES.clear()
        for bank, count in index.counts.items():
            obs.BANK_ENTRIES.labels(bank=bank).set(count)
        log.info("banks_loaded", entries=len(index), pdq=index.pdq_entries, embeddings=index.embedding_entries,
                 banks=len(index.counts), generation=self._generation)  # fmt: skip
        return index

    def start(self) -> BankStore:
        self._follower.start()
        return self

    def stop(self) -> None:
        self._follower.stop()
        if self._reader is not None:
            self._reader.close(autocommit=False)
