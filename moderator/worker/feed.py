"""An in-process stand-in for the broker, for the benchmark on machines without one and for unit tests.

:class:`QueueFeed` implements exactly the part of kafka-python's ``KafkaConsumer`` and
``KafkaProducer`` API that :class:`~moderator.worker.Worker` uses: events put here are delivered by
``poll()`` on one partition, honouring pause/resume; records the worker publishes are acknowledged
at once (or refused, for the first ``refuse`` sends) and kept with the time they were sent; commits
are recorded. Transactions (the exactly-once mode) keep a transaction's records and offsets aside
until it commits, as a read_committed reader would see them (``fail_transactions`` makes commits
fail). The worker's own code (parse, image stage, batcher, engine, policy, publishing,
checkpoint) runs unchanged; only the broker's network and storage are missing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kafka import TopicPartition
from kafka.future import Future
from kafka.structs import MemberState


class Output(NamedTuple):
    """A record the worker published: where, its key, value and headers, and when (``time.monotonic()``)."""

    topic: str
    key: bytes | None
    value: bytes
    at: float
    headers: list[tuple[str, bytes]] | None = None


@dataclass(frozen=True)
class Record:
    """What the worker reads of a consumed record (the part of kafka-python's ``ConsumerRecord``)."""

    offset: int
    key: bytes | None
    value: bytes
    timestamp: int
    headers: list[tuple[str, bytes]] | None = None


@dataclass(frozen=True)
class _GroupMetadata:
    state: MemberState
    generation_id: int = 1
    member_id: str = "feed"


class _Loop:
    """The ``consumer._net`` the rebalance listener sleeps on (kafka-python's IO loop has one)."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class RefusedError(Exception):
    """What the feed's producer side answers to a send it was told to refuse."""


class QueueFeed:
    def __init__(self, topic: str, max_poll_records: int = 500) -> None:
        self.tp = TopicPartition(topic, 0)
        self.max_poll_records = max_poll_records
        self._queue: deque[Record] = deque()
        self._cond = threading.Condition()
        self._offset = 0
        self._paused = False
        self._listener: Any = None
        self._assigned = False
        self._refuse = 0
        self._net = _Loop()
        self.outputs: list[Output] = []
        self.committed: dict[TopicPartition, int] = {}
        self.sends = 0  # every send, refused ones included
        self._delivered: list[Record] = []  # polled and not yet committed
        self._txn: list[Output] | None = None  # the open transaction's records
        self._txn_offsets: dict[TopicPartition, Any] = {}
        self._fail_txns = 0
        self.transactions = 0  # committed

    # --- what a benchmark or a test calls ------------------------------------------------------
    def put(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> int:
        """Append an event; returns its offset."""
        with self._cond:
            offset = self._offset
            self._queue.append(Record(offset, key, value, int(time.time() * 1000), headers))
            self._offset += 1
            self._cond.notify_all()
        return offset

    def outputs_since(self, index: int, timeout: float) -> list[Output]:
        """The outputs after the first ``index``, waiting up to ``timeout`` for one when there are none."""
        with self._cond:
            if len(self.outputs) <= index:
                self._cond.wait(timeout)
            return self.outputs[index:]

    def refuse(self, sends: int) -> None:
        """Fail the next ``sends`` sends (their errbacks run), as a broker refusing records would."""
        with self._cond:
            self._refuse = sends

    def revoke(self) -> None:
        """Take the partition away through the listener (a rebalance), then give it back on the next poll.

        Unconsumed events stay; the partition resumes from the committed offset, or from where the
        listener seeks it, as a new owner would.
        """
        if self._listener is not None:
            asyncio.run(self._listener.on_partitions_revoked({self.tp}))
        with self._cond:
            self._assigned = False
            start = self.committed.get(self.tp, 0)
            self._rewind(start)

    def _rewind(self, offset: int) -> None:
        """Deliver again from ``offset``: what was delivered at or after it comes back in order."""
        again = [r for r in self._delivered if r.offset >= offset]
        self._delivered = [r for r in self._delivered if r.offset < offset]
        self._queue = deque(sorted(again + [r for r in self._queue if r.offset >= offset], key=lambda r: r.offset))

    def fail_transactions(self, n: int) -> None:
        """Fail the next ``n`` transaction commits (their records and offsets are discarded)."""
        with self._cond:
            self._fail_txns = n

    # --- consumer API used by the worker ---------------------------------------------------------
    def subscribe(self, topics: Sequence[str], listener: Any = None) -> None:
        self._listener = listener

    def topics(self) -> set[str]:
        return {self.tp.topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0} if topic == self.tp.topic else set()

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Record]]:
        if not self._assigned:
            self._assigned = True
            if self._listener is not None:
                asyncio.run(self._listener.on_partitions_assigned({self.tp}))
        with self._cond:
            if self._paused or not self._queue:
                self._cond.wait(timeout_ms / 1000)
            if self._paused or not self._queue:
                return {}
            n = min(self.max_poll_records, len(self._queue))
            records = [self._queue.popleft() for _ in range(n)]
            self._delivered.extend(records)
            return {self.tp: records}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        with self._cond:
            self._rewind(offset)

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused = self._paused or bool(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        if partitions:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def paused(self) -> set[TopicPartition]:
        return {self.tp} if self._paused else set()

    def assignment(self) -> set[TopicPartition]:
        return {self.tp} if self._assigned else set()

    def group_metadata(self) -> _GroupMetadata:
        return _GroupMetadata(MemberState.STABLE)

    def commit_async(
        self, offsets: dict[TopicPartition, Any], callback: Callable[[Any, Any], None] | None = None
    ) -> Future:
        self.commit(offsets)
        if callback is not None:
            callback(offsets, None)
        return Future().success(None)

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        with self._cond:
            self.committed.update({tp: meta.offset for tp, meta in offsets.items()})
            low = self.committed.get(self.tp, 0)
            self._delivered = [r for r in self._delivered if r.offset >= low]

    # --- producer API used by the worker ---------------------------------------------------------
    def send(
        self, topic: str, key: bytes | None = None, value: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Future:  # fmt: skip
        with self._cond:
            self.sends += 1
            if self._refuse > 0:
                self._refuse -= 1
                return Future().failure(RefusedError(f"refused a record for {topic}"))
            (self.outputs if self._txn is None else self._txn).append(
                Output(topic, key, value or b"", time.monotonic(), headers)
            )
            self._cond.notify_all()
        return Future().success(None)

    def flush(self, timeout: float | None = None) -> None:
        pass

    # --- transactional producer API used by the exactly-once worker ----------------------------------
    def init_transactions(self) -> None:
        with self._cond:
            self._txn = None

    def begin_transaction(self) -> None:
        with self._cond:
            if self._txn is not None:
                raise RuntimeError("a transaction is already open")
            self._txn, self._txn_offsets = [], {}

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, Any], group_metadata: Any) -> None:
        with self._cond:
            self._txn_offsets.update(offsets)

    def commit_transaction(self) -> None:
        with self._cond:
            records, offsets, self._txn = self._txn or [], self._txn_offsets, None
            if self._fail_txns > 0:
                self._fail_txns -= 1
                self._txn = []  # still open: the caller aborts it
                raise RefusedError("refused the transaction's commit")
            self.outputs.extend(records)
            self.transactions += 1
            self._cond.notify_all()
        self.commit(offsets)

    def abort_transaction(self) -> None:
        with self._cond:
            self._txn, self._txn_offsets = None, {}

    def close(self, autocommit: bool = False, timeout: float | None = None) -> None:
        pass
