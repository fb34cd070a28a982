"""The rebalance listener: revocation and assignment for the :class:`Checkpoint` (steps in its docstring).

kafka-python 3 runs these hooks on its IO thread and awaits them, so waiting here (with the IO
loop's own sleep; asyncio's does not work there) keeps heartbeats going while in-flight events of
revoked partitions finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from moderator import observability as obs
from moderator.clients import consumer_timeouts
from moderator.config import Settings
from moderator.worker.checkpoint import Checkpoint, Revocation, describe

log = obs.get_logger(__name__)


def rebalance_wait_budget(settings: Settings) -> float:
    """How long a revocation may wait for in-flight work before the group gives up on this member.

    Brokers before 0.10.1 (JoinGroup v0) drop a member that has not rejoined within the session
    timeout, heartbeats or not; newer ones wait up to the rebalance timeout (max poll interval).
    One second is kept for the commit itself.
    """
    version = settings.kafka_api_version_tuple
    if version is not None and version < (0, 10, 1):
        t = consumer_timeouts(settings)
        limit_ms = t.session_ms - t.heartbeat_ms
    else:
        limit_ms = settings.kafka_max_poll_interval_ms
    return max(0.0, min(settings.rebalance_wait_s, limit_ms / 1000 - 1.0))


def _names(partitions: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}-{tp.partition}" for tp in partitions)


class RebalanceListener(AsyncConsumerRebalanceListener):
    def __init__(self, checkpoint: Checkpoint, consumer: KafkaConsumer, max_wait_s: float) -> None:
        self.checkpoint = checkpoint
        self.consumer = consumer
        self.max_wait_s = max_wait_s
        self._resume: dict[TopicPartition, int] = {}

    async def _sleep(self, seconds: float) -> bool:
        """Sleep on kafka-python's IO loop (``consumer._net``); False where it has none."""
        net = getattr(self.consumer, "_net", None)
        if net is None or not hasattr(net, "sleep"):
            return False
        await net.sleep(seconds)
        return True

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        try:
            # 1. wait (bounded) for the revoked partitions' events to be done
            deadline = time.monotonic() + self.max_wait_s
            while self.checkpoint.pending(set(revoked)) and time.monotonic() < deadline:
                if not await self._sleep(0.05):
                    break
            if self.checkpoint.transactions is not None:  # exactly-once: one transaction, then forget them
                await self._lock_transactions()
                try:
                    revocation = await self._off_loop(lambda: self._commit_and_revoke(set(revoked)))
                finally:
                    self.checkpoint.transaction_lock.release()
                self._resume = revocation.resume
                log.info("partitions_revoked", abandoned=revocation.abandoned, partitions=_names(set(revoked)))
                return
            # 2-3. their watermarks, and forget them
            revocation = self.checkpoint.revoke(set(revoked), lost=False)
            self._resume = revocation.resume
            log.info("partitions_revoked", abandoned=revocation.abandoned, partitions=_names(set(revoked)))
            if revocation.offsets:
                offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in revocation.offsets.items()}
                await self.consumer.commit_async(offsets=offsets)
                log.info("revoked_partitions_committed", offsets=describe(revocation.offsets))
        except Exception as exc:  # never raise into kafka-python: it would retry us on every poll
            log.warning("revocation_commit_failed", error=f"{type(exc).__name__}: {exc}")

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            # 4. partitions kept across the rebalance resume from their first offset not done
            for tp in assigned:
                if tp in self._resume:
                    self.consumer.seek(tp, self._resume[tp])
            self._resume = {}
            self.checkpoint.assign(set(assigned))
            log.info("partitions_assigned", partitions=_names(set(assigned)))
        except Exception as exc:
            log.warning("assignment_hook_failed", error=f"{type(exc).__name__}: {exc}")

    def _commit_and_revoke(self, revoked: set[TopicPartition]) -> Revocation:
        self.checkpoint.transact()
        return self.checkpoint.revoke(revoked, lost=False)

    async def _off_loop(self, work: Callable[[], Revocation]) -> Revocation:
        """Run blocking work (a transaction's round trips to the broker) on a thread of its own while
        this IO loop goes on (heartbeats, the group's requests)."""
        out: list[Revocation] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                out.append(work())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name="revocation-transaction", daemon=True)
        thread.start()
        while thread.is_alive():
            if not await self._sleep(0.01):
                thread.join()
        if errors:
            raise errors[0]
        return out[0]

    async def _lock_transactions(self) -> None:
        """Take the transaction lock without stopping the IO loop: a transaction in flight on the
        consumer's thread finishes first."""
        while not self.checkpoint.transaction_lock.acquire(blocking=False):
            if not await self._sleep(0.01):
                self.checkpoint.transaction_lock.acquire()
                return

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        try:
            if self.checkpoint.transactions is not None:
                await self._lock_transactions()  # no transaction of ours may commit their offsets after this
                try:
                    revocation = self.checkpoint.revoke(set(lost), lost=True)
                finally:
                    self.checkpoint.transaction_lock.release()
            else:
                revocation = self.checkpoint.revoke(set(lost), lost=True)  # nothing may be committed
            self._resume = {}
            log.info("partitions_lost", abandoned=revocation.abandoned, partitions=_names(set(lost)))
        except Exception as exc:
            log.warning("partitions_lost_hook_failed", error=f"{type(exc).__name__}: {exc}")
