"""The console's Kafka side: the review topic in, verdicts in and out.

- **Every replica reads every partition** of the review topic (assigned, not split by a consumer
  group): each has the whole queue, so a reviewer on any replica sees every item, and a replica's
  death loses nothing. Claims stay atomic across replicas through the leases in Redis.
- Start-up reads the whole verdicts topic (compacted: the current verdict of every judged event)
  before any item is served, so a restarted console never shows an item that already has a verdict.
- One thread then follows both: review items into the queue, verdicts (this console's and other
  replicas') into the queue. It commits each review partition's done-watermark (the lowest offset whose
  item is not done) under ``MODERATOR_CONSOLE_GROUP_ID`` (offsets only: no group membership), so a
  restarted replica reads again only from there; every replica commits the same watermark, give or
  take what it has not read yet.
- The appeals topic is read the same way, each appeal an item of the appeals queue.
- :meth:`ConsoleFeeds.publish` sends a verdict and waits for the broker's acknowledgement.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from moderator import observability as obs
from moderator.app import App
from moderator.clients import TopicError, read_to_end
from moderator.console.queue import ReviewQueue
from moderator.events import Appeal, AppealDecision, BankEntry, ReviewItem, Verdict

log = obs.get_logger(__name__)


class ConsoleFeeds:
    def __init__(self, app: App, queue: ReviewQueue, on_tick: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.queue = queue
        self.on_tick = on_tick  # called from the feed thread about once a second (lease bookkeeping)
        self.producer = app.producer()
        self.verdicts = app.reader(["verdicts"])
        self.review = app.consumer(app.settings.console_group_id, max_poll_records=500)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="console-feeds", daemon=True)
        self.loaded = threading.Event()  # set once every existing verdict is known

    # --- start-up -----------------------------------------------------------------------------------
    def start(self) -> ConsoleFeeds:
        t0 = time.monotonic()
        n = read_to_end(self.verdicts, self._verdict)
        log.info("console_verdicts_loaded", records=n, seconds=round(time.monotonic() - t0, 2))
        self.loaded.set()
        topic = self.app.settings.topic("review")
        found = self.review.partitions_for_topic(topic)
        if not found:
            raise TopicError(f"the review topic {topic!r} does not exist: create it (moderator topics create)")
        parts = [TopicPartition(topic, p) for p in sorted(found)]  # every partition, on every replica
        appeals = self.app.settings.topic("appeals")
        found_appeals = self.review.partitions_for_topic(appeals)
        if found_appeals:
            parts += [TopicPartition(appeals, p) for p in sorted(found_appeals)]
        else:
            log.warning("console_no_appeals_topic", topic=appeals, consequence="no appeals are shown",
                        fix="create it: moderator topics create")  # fmt: skip
        self.review.assign(parts)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.review.close(autocommit=False)
        self.verdicts.close(autocommit=False)
        self.producer.close(timeout=5)

    # --- the feed thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        next_commit = next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                for tp, records in self.review.poll(timeout_ms=100).items():
                    for record in records:
                        self._item(tp, record)
                for records in self.verdicts.poll(timeout_ms=50).values():
                    for record in records:
                        self._verdict(record)
                now = time.monotonic()
                if now >= next_commit:
                    self._commit()
                    next_commit = now + 2.0
                if now >= next_tick:
                    depth = self.queue.depth()
                    obs.CONSOLE_QUEUE.labels(state="pending").set(depth["new"])
                    for state in ("escalated", "second", "set_aside"):
                        obs.CONSOLE_QUEUE.labels(state=state).set(depth[state])
                    self.on_tick()
                    next_tick = now + 1.0
            except Exception:  # the console keeps serving; the next poll tries again
                log.exception("console_feed_error")
                time.sleep(1.0)

    def _item(self, tp: TopicPartition, record: Any) -> None:
        try:
            if tp.topic == self.app.settings.topic("appeals"):
                item = Appeal.model_validate_json(record.value or b"").review_item()
            else:
                item = ReviewItem.model_validate_json(record.value or b"")
        except ValidationError as exc:
            log.warning("console_bad_review_record", partition=tp.partition, offset=record.offset, error=str(exc)[:200])
            return
        self.queue.add_item(tp, record.offset, item)

    def _verdict(self, record: Any) -> None:
        if record.value is None:
            return
        try:
            self.queue.add_verdict(Verdict.model_validate_json(record.value))
        except ValidationError as exc:
            log.warning("console_bad_verdict_record", offset=record.offset, error=str(exc)[:200])

    def _commit(self) -> None:
        offsets = self.queue.committable()
        if not offsets:
            return

        def done(_offsets: Any, response: Any) -> None:
            if isinstance(response, BaseException):
                log.warning("console_commit_failed", error=f"{type(response).__name__}: {response}")
            else:
                self.queue.mark_committed(offsets)

        try:
            self.review.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}, callback=done)
        except Exception as exc:  # e.g. a rebalance in progress: the next commit carries it
            log.warning("console_commit_failed", error=f"{type(exc).__name__}: {exc}")

    # --- out ------------------------------------------------------------------------------------------
    def publish(self, verdict: Verdict) -> None:
        """Publish a verdict and wait until the broker has it; then it is the queue's too."""
        value = json.dumps(verdict.model_dump(mode="json")).encode()
        self.producer.send(self.app.settings.topic("verdicts"), key=verdict.key.encode(), value=value).get(timeout=30)
        self.queue.add_verdict(verdict)

    def publish_appeal_decision(self, decision: AppealDecision) -> None:
        """Publish a lead's answer to an appeal (for the platform) and wait until the broker has it."""
        self.producer.send(self.app.settings.topic("appeal_decisions"), key=decision.event_id.encode(),
                           value=decision.model_dump_json().encode()).get(timeout=30)  # fmt: skip

    def publish_bank_entry(self, topic: str, entry: BankEntry) -> None:
        """Publish a bank entry (``console/banks.py``) and wait until the broker has it."""
        self.producer.send(topic, key=entry.key.encode(), value=entry.model_dump_json().encode()).get(timeout=30)
