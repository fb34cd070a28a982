"""The exactly-once worker's Kafka transactions (``MODERATOR_PROCESSING_GUARANTEE=exactly-once``).

One transactional producer per worker (``MODERATOR_TRANSACTIONAL_ID``: unique among the workers,
stable across a worker's restarts). :meth:`Transactions.start` registers it with the transaction
coordinator, which fences any older producer with the same id and aborts what that one left open
(a worker killed mid-transaction). Each :meth:`Transactions.commit` is one transaction: the held
output records of the events it covers, the consumed offsets past them (``send_offsets_to_transaction``
with the consumer's group metadata: per KIP-447 a broker >= 2.5 refuses the offsets of a member
whose generation is stale, so a zombie that lost its partitions in a rebalance cannot commit them),
then the commit. Readers with ``isolation.level=read_committed`` see every record of a committed
transaction and none of an aborted one.

kafka-python's transactional producer (``init_transactions`` ... ``commit_transaction``, KIP-447
group metadata) does all of this; its calls block until the broker answers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.errors import ProducerFencedError
from kafka.structs import OffsetAndMetadata

from moderator import observability as obs

log = obs.get_logger(__name__)

Headers = list[tuple[str, bytes]]
TRANSACTION_HEADER = "moderator-transaction"  # on every record: the transaction that wrote it (its log lines')


@dataclass(frozen=True)
class Held:
    """An output record held until its transaction (exactly-once) or sent at once (at-least-once)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None


class RecordFailed(Exception):
    """A record of the transaction was not acknowledged: the transaction is aborted, not committed."""


class TransactionFailed(Exception):
    """A transaction did not commit. ``fatal``: the producer is unusable (fenced by another worker
    with the same transactional id, or an abort that failed too); else it was aborted and can be retried."""

    def __init__(self, message: str, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


class Transactions:
    def __init__(self, producer: Any, consumer: Any, transactional_id: str, headers: bool) -> None:
        self.producer = producer
        self.consumer = consumer
        self.transactional_id = transactional_id
        self.headers = headers  # tag each record with its transaction (brokers with headers)
        self.run = uuid.uuid4().hex[:8]  # this process's instance: transaction ids are <id>/<run>-<n>
        self.count = 0

    def start(self) -> None:
        """Register with the coordinator: fences older producers with this id, aborts what they left open."""
        t0 = time.perf_counter()
        try:
            self.producer.init_transactions()
        except ProducerFencedError as exc:
            raise TransactionFailed(self._fenced(), fatal=True) from exc
        log.info("transactions_started", transactional_id=self.transactional_id, run=self.run,
                 ms=round((time.perf_counter() - t0) * 1000, 1))  # fmt: skip

    def _fenced(self) -> str:
        return (f"transactional id {self.transactional_id!r} was taken by another producer: give every worker its "
                "own MODERATOR_TRANSACTIONAL_ID (stable across its restarts)")  # fmt: skip

    def commit(self, records: Sequence[Held], offsets: dict[TopicPartition, int]) -> str:
        """One transaction: ``records``, then ``offsets`` for the consumer's group, then the commit.
        Returns the transaction's id (in its records' ``moderator-transaction`` header and the log).

        Every record is acknowledged before the commit is asked for: kafka-python would commit a
        transaction whose record failed for good on a retriable error, without it."""
        group = self.consumer.group_metadata()  # one snapshot: checked here, fenced by the broker
        if getattr(group, "generation_id", 0) < 0 or not getattr(group, "member_id", "x"):
            raise TransactionFailed("not a member of the group now (a rebalance is under way)", fatal=False)
        self.count += 1
        txn = f"{self.transactional_id}/{self.run}-{self.count}"
        tag = [(TRANSACTION_HEADER, txn.encode())] if self.headers else None
        t0 = time.perf_counter()
        try:
            self.producer.begin_transaction()
            futures = []
            for r in records:
                headers = (r.headers or []) + tag if tag is not None else r.headers
                futures.append(self.producer.send(r.topic, key=r.key, value=r.value, headers=headers))
            committed = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
            self.producer.send_offsets_to_transaction(committed, group)
            self.producer.flush()
            bad = [f for f in futures if not f.succeeded()]
            if bad:
                raise RecordFailed(f"{len(bad)} of {len(futures)} records not acknowledged: "
                                   f"{type(bad[0].exception).__name__}: {bad[0].exception}")  # fmt: skip
            self.producer.commit_transaction()
        except ProducerFencedError as exc:
            raise TransactionFailed(self._fenced(), fatal=True) from exc
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            try:
                self.producer.abort_transaction()
            except Exception as abort_exc:
                raise TransactionFailed(f"{reason}; the abort failed too: {type(abort_exc).__name__}: {abort_exc}",
                                        fatal=True) from exc  # fmt: skip
            obs.TRANSACTIONS.labels(outcome="aborted").inc()
            raise TransactionFailed(f"aborted: {reason}", fatal=False) from exc
        seconds = time.perf_counter() - t0
        obs.TRANSACTIONS.labels(outcome="committed").inc()
        obs.STAGE_SECONDS.labels(stage="transaction").observe(seconds)
        log.info("transaction_committed", transaction=txn, records=len(records), ms=round(seconds * 1000, 1),
                 offsets={f"{tp.topic}-{tp.partition}": o for tp, o in sorted(offsets.items())})  # fmt: skip
        return txn
