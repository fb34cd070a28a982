"""The checkpoint: receipt → done → commit. The heart of "nothing lost" (and, in the exactly-once
mode, of "nothing twice").

An event is **received** when the consumer hands it over (its offset is tracked, in order, per
partition). A partition's **done-watermark** is the lowest offset not yet done
(:class:`~moderator.offsets.OffsetTracker`); committing it never skips an event that is not done.
What *done* means, and how a commit goes, depends on ``MODERATOR_PROCESSING_GUARANTEE``.

**At-least-once** (the default). An event is *done* when the broker has acknowledged (``acks=all``)
every record it produced: its decision and review item, or its dead letter. After a crash at most
the uncommitted window is read again; outputs keyed by event id make those duplicates harmless.
Commit, every ``commit_interval_ms`` or as soon as half the in-flight window is done:

1. Only a member in a stable group commits; a rebalance commits its revoked partitions itself
   (see *Revocation*). At most one commit is in flight.
2. Take each partition's done-watermark that moved since the last commit: every event below it has
   every record acknowledged by the broker (delivery callbacks, not a flush, say so).
3. Commit those offsets asynchronously: a blocking commit during a rebalance would wait for the
   join, and the join waits for this thread's next poll.
4. When the broker confirms, mark them committed; only then do they leave the in-flight window.

**Exactly-once** (``exactly-once``; brokers >= 0.11). An event is *done* when its output records are
built: they are **held**, not sent. Commit, every ``transaction_interval_ms`` or as soon as half the
window is done, is one Kafka transaction (``transactions.py``), on this thread:

1. Only a member in a stable group commits, one transaction at a time (the transaction lock; a
   revocation takes it too).
2. Take each partition's done-watermark that moved, and the held records of every event below it.
3. In one transaction: send those records, send the watermarks as the group's offsets
   (``send_offsets_to_transaction``, fenced by the group generation), commit. Each either lands
   with the other or neither does: a reader with ``isolation.level=read_committed`` sees each
   event's outputs once.
4. On success, mark the offsets committed and drop the held records. On an abortable failure the
   transaction is aborted and the records stay held for the next one (``publish_retries`` times in
   a row at most); on a fatal one (fenced by another producer with this transactional id) the
   worker stops. A crash loses only held records and an open transaction, which the next producer
   with this transactional id aborts: the uncommitted events are decided again.

**Backpressure**: at most ``max_in_flight`` events are received and not yet *committed* (not merely
not yet done): that bounds what a crash re-processes. Beyond it every assigned partition is
paused (the consumer keeps polling, so the group never sees a stalled member); at half of it, they
resume.

**Revocation** (on kafka-python's IO thread, inside the rebalance; see ``rebalance.py``):

1. Wait, bounded by what the group protocol allows, until the revoked partitions' events are done.
2. At-least-once: commit their done-watermarks (never for *lost* partitions: another member may
   own them now). Exactly-once: take the transaction lock (a transaction of this thread finishes
   first) and commit one transaction of everything done (none for lost partitions), holding the
   lock through step 3 so that no transaction of this member commits their offsets afterwards.
3. Forget them; late acknowledgements (or held records) for them are ignored. Whatever was not done
   is abandoned uncommitted, and the next owner reads it again.
4. Partitions kept across the rebalance resume from their first offset not done (their fetch
   position may be past abandoned events); exactly-once, from their first offset not committed
   (held records were dropped with them).

**Shutdown** (:meth:`Checkpoint.close`, on SIGTERM/SIGINT or :meth:`Worker.stop`):

1. Stop fetching: pause every assigned partition.
2. Wait until every received event is done, re-sending refused records, until the deadline or a
   fatal publishing error.
3. Close the engine's queue and wait for its thread: a batch in progress finishes and publishes.
4. Flush the producer: every record handed over is acknowledged or failed, every callback has run.
5. Commit the done-watermarks synchronously (partitions paused: no rebalance is expected); in the
   exactly-once mode, the last transaction.
6. The caller closes the consumer without auto-commit, then the producer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import MemberState, OffsetAndMetadata

from moderator import observability as obs
from moderator.offsets import OffsetTracker
from moderator.worker.transactions import Held, TransactionFailed, Transactions

log = obs.get_logger(__name__)


@dataclass(eq=False)
class Receipt:
    """One received event, as the checkpoint sees it."""

    tp: TopicPartition
    offset: int
    tracked: bool  # False for a re-delivered offset: it must not move the watermark
    outputs: int = 0  # records handed to the producer and not yet acknowledged
    done: bool = False
    epoch: int = 0  # the partition's ownership when received (a revocation starts a new one)
    held: list[Held] = field(default_factory=list)  # exactly-once: its records, until their transaction


@dataclass(frozen=True)
class Revocation:
    offsets: dict[TopicPartition, int]  # to commit for the revoked partitions (none when lost)
    resume: dict[TopicPartition, int]  # where each would resume: its first offset not done (exactly-once: committed)
    abandoned: int  # events received and not committed (not done; exactly-once: held), for the next owner


@dataclass(frozen=True)
class Closed:
    unfinished: int  # events still not done when the shutdown deadline came
    committed: dict[TopicPartition, int] = field(default_factory=dict)


def _offsets(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}


def describe(offsets: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}-{tp.partition}": o for tp, o in sorted(offsets.items())}


class Checkpoint:
    """Tracks receipts to done-watermarks and commits them; pauses and resumes for backpressure.

    Thread-safety: :meth:`receive`, :meth:`backpressure`, :meth:`maybe_commit` and :meth:`close` run
    on the consumer's thread; :meth:`expect` and :meth:`hold` on any thread that has an event's
    records; :meth:`acknowledged` on the producer's IO thread; :meth:`pending` and :meth:`revoke` on
    the consumer's IO thread during a rebalance. One condition variable guards the state; in the
    exactly-once mode, :attr:`transaction_lock` is held through each transaction.
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        max_in_flight: int,
        commit_interval_s: float,
        transactions: Transactions | None = None,
        retries: int = 5,
    ) -> None:
        self.consumer = consumer
        self.max_in_flight = max_in_flight
        self.commit_interval_s = commit_interval_s
        self.transactions = transactions  # None: at-least-once
        self.retries = retries  # exactly-once: aborted transactions in a row before the worker stops
        self.transaction_lock = threading.Lock()
        self.fatal: str | None = None  # exactly-once: set when transactions cannot go on
        self._failures = 0
        self._held: dict[TopicPartition, list[Receipt]] = {}  # exactly-once: done, records held, uncommitted
        self._epochs: dict[TopicPartition, int] = {}
        self._cond = threading.Condition()
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._in_flight = 0  # received and not done
        self._owned: set[TopicPartition] = set()
        self._paused = False
        self._commit_in_flight = False
        self._next_commit = time.monotonic() + commit_interval_s
        self.assigned = threading.Event()  # set while the member owns at least one partition

    # --- receipt and done ------------------------------------------------------------------------
    def receive(self, tp: TopicPartition, offset: int) -> Receipt:
        with self._cond:
            receipt = Receipt(tp, offset, tracked=self._tracker.start(tp, offset), epoch=self._epochs.get(tp, 0))
            self._in_flight += 1
            obs.IN_FLIGHT.set(self._in_flight)
        return receipt

    def expect(self, receipt: Receipt, records: int) -> None:
        """``records`` more records of this event are on their way to the broker."""
        with self._cond:
            receipt.outputs += records

    def acknowledged(self, receipt: Receipt) -> None:
        """The broker acknowledged one record of this event; the last one makes the event done."""
        with self._cond:
            receipt.outputs -= 1
            if receipt.outputs > 0 or receipt.done:
                return
            receipt.done = True
            if receipt.tracked:
                self._tracker.finish(receipt.tp, receipt.offset)
            self._in_flight -= 1
            obs.IN_FLIGHT.set(self._in_flight)
            self._cond.notify_all()

    def hold(self, receipt: Receipt, records: list[Held]) -> None:
        """Exactly-once: the event's records are built; it is done, and they wait for its transaction.
        A re-delivered offset's (its first delivery carries them) or a revoked partition's are dropped."""
        with self._cond:
            if receipt.done:
                return
            receipt.done = True
            if receipt.tracked and receipt.epoch == self._epochs.get(receipt.tp, 0) and receipt.tp in self._owned:
                receipt.held = records
                self._held.setdefault(receipt.tp, []).append(receipt)
                self._tracker.finish(receipt.tp, receipt.offset)
            self._in_flight -= 1
            obs.IN_FLIGHT.set(self._in_flight)
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    # --- backpressure -----------------------------------------------------------------------------
    def backpressure(self) -> None:
        with self._cond:
            window = max(self._in_flight, self._tracker.uncommitted())
        if not self._paused and window >= self.max_in_flight:
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
            obs.BACKPRESSURE_PAUSES.inc()
        elif self._paused and window <= self.max_in_flight // 2:
            self.consumer.resume(*self.consumer.paused())  # only partitions still owned and paused
            self._paused = False

    # --- commit -----------------------------------------------------------------------------------
    def maybe_commit(self) -> dict[TopicPartition, int]:
        """Commit when the interval has passed or half the window is done and uncommitted."""
        now = time.monotonic()
        with self._cond:
            done_uncommitted = self._tracker.uncommitted() - self._tracker.pending()
        if now < self._next_commit and done_uncommitted < max(1, self.max_in_flight // 2):
            return {}
        self._next_commit = now + self.commit_interval_s
        return self.commit()

    def commit(self) -> dict[TopicPartition, int]:
        """Steps 1-4 of the commit (module docstring). Returns the offsets sent to the broker."""
        if self.transactions is not None:
            if not self.transaction_lock.acquire(blocking=False):  # a revocation is committing
                return {}
            try:
                if self.consumer.group_metadata().state != MemberState.STABLE:
                    return {}
                return self.transact()
            finally:
                self.transaction_lock.release()
        # 1. stable members only, one commit at a time
        if self._commit_in_flight or self.consumer.group_metadata().state != MemberState.STABLE:
            return {}
        # 2. the done-watermarks that moved
        with self._cond:
            offsets = self._tracker.committable()
        if not offsets:
            return {}
        t0 = time.perf_counter()

        def confirmed(_offsets: Any, response: Any) -> None:  # 4. runs on this thread, inside poll()
            self._commit_in_flight = False
            if isinstance(response, BaseException):
                log.warning("commit_failed", error=f"{type(response).__name__}: {response}", partitions=len(offsets))
                return
            with self._cond:
                self._tracker.mark_committed(offsets)
            obs.STAGE_SECONDS.labels(stage="commit").observe(time.perf_counter() - t0)

        # 3. asynchronously
        self._commit_in_flight = True
        try:
            self.consumer.commit_async(offsets=_offsets(offsets), callback=confirmed)
        except Exception as exc:
            self._commit_in_flight = False
            log.warning("commit_failed", error=f"{type(exc).__name__}: {exc}", partitions=len(offsets))
            return {}
        return offsets

    def transact(self) -> dict[TopicPartition, int]:
        """Exactly-once steps 2-4 (module docstring), the caller holding :attr:`transaction_lock`.
        Returns the offsets committed."""
        assert self.transactions is not None
        if self.fatal is not None:
            return {}
        # 2. the moved watermarks, and the held records below them
        with self._cond:
            offsets = self._tracker.committable()
            batch = [r for tp, o in offsets.items() for r in self._held.get(tp, ()) if r.offset < o]
        if not offsets:
            return {}
        # 3. records and offsets in one transaction
        try:
            self.transactions.commit([h for r in batch for h in r.held], offsets)
        except TransactionFailed as exc:
            self._failures += 1
            log.warning("transaction_failed", error=str(exc), fatal=exc.fatal, attempt=self._failures)
            if exc.fatal or self._failures > self.retries:
                self.fatal = str(exc) if exc.fatal else f"{self._failures} transactions in a row failed: {exc}"
            return {}
        # 4. committed: they leave the window
        self._failures = 0
        with self._cond:
            self._tracker.mark_committed(offsets)
            for tp, o in offsets.items():
                if tp in self._held:
                    self._held[tp] = [r for r in self._held[tp] if r.offset >= o]
            self._cond.notify_all()
        return offsets

    def commit_sync(self, timeout_ms: int) -> dict[TopicPartition, int]:
        """A blocking commit of every moved watermark (shutdown only: partitions are paused); in the
        exactly-once mode, the last transaction (it waits for the broker as long as that takes)."""
        if self.transactions is not None:
            with self.transaction_lock:
                return self.transact()
        with self._cond:
            offsets = self._tracker.committable()
        if not offsets:
            return {}
        try:
            self.consumer.commit(offsets=_offsets(offsets), timeout_ms=timeout_ms)
        except Exception as exc:
            log.warning("commit_failed", error=f"{type(exc).__name__}: {exc}", partitions=len(offsets))
            return {}
        with self._cond:
            self._tracker.mark_committed(offsets)
        return offsets

    # --- rebalance --------------------------------------------------------------------------------
    def assign(self, partitions: set[TopicPartition]) -> None:
        with self._cond:
            self._owned |= partitions
        if self._paused and partitions:
            self.consumer.pause(*partitions)  # newly assigned partitions arrive unpaused
        if partitions:
            self.assigned.set()

    def pending(self, partitions: set[TopicPartition]) -> int:
        """Events of these partitions received and not yet done."""
        with self._cond:
            return sum(self._tracker.pending(tp) for tp in partitions)

    def revoke(self, partitions: set[TopicPartition], lost: bool) -> Revocation:
        """Steps 2-3 of a revocation: what to commit for the partitions, then forget them."""
        with self._cond:
            committable = self._tracker.committable()
            offsets = {} if lost else {tp: o for tp, o in committable.items() if tp in partitions}
            # exactly-once: what is only held is lost with the partition, so resume at the first uncommitted
            where = self._tracker.first_uncommitted if self.transactions is not None else self._tracker.resume_point
            resume = {tp: o for tp in partitions if (o := where(tp)) is not None}
            abandoned = sum(self._tracker.pending(tp) for tp in partitions)
            abandoned += sum(len(self._held.pop(tp, ())) for tp in partitions)  # exactly-once: uncommitted
            for tp in partitions:
                self._epochs[tp] = self._epochs.get(tp, 0) + 1
            self._tracker.drop(partitions)
            self._owned -= partitions
            if not self._owned:
                self.assigned.clear()
        return Revocation(offsets, resume, abandoned)

    # --- shutdown ---------------------------------------------------------------------------------
    def close(
        self,
        deadline: float,
        *,
        resend: Callable[[], bool],
        stop_engine: Callable[[float], None],
        flush: Callable[[float], None],
    ) -> Closed:
        """Shutdown steps 1-5 (module docstring). ``resend()`` re-sends refused records and returns
        False once publishing has failed for good; ``stop_engine(timeout)`` closes the engine's queue
        and joins its thread; ``flush(timeout)`` flushes the producer."""

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        # 1. stop fetching
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(*assignment)
        # 2. wait for every received event to be done
        while left() > 0 and resend():
            with self._cond:
                if self._in_flight == 0:
                    break
                self._cond.wait(timeout=0.05)
        unfinished = self.in_flight
        # 3. the engine finishes its batch and publishes it
        stop_engine(left())
        # 4. every delivery callback has run
        flush(max(1.0, left()))
        # 5. commit what is done
        committed = self.commit_sync(timeout_ms=int(max(1.0, left()) * 1000))
        return Closed(unfinished, committed)
