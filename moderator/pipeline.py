"""The worker: consumer → image stage → micro-batcher → engine → policy → producer → offsets.

Threads, and what each one owns:

- **main** (:meth:`Worker.run`): the Kafka consumer. Polls without pause (so the group never sees
  a stalled member), parses envelopes, hands events to the image stage, pauses the assigned
  partitions while ``max_in_flight`` events are between receipt and broker ack (backpressure),
  commits done-watermarks every ``commit_interval_ms``.
- **image stage** (a thread pool): fetch (SSRF-safe) or take the inline bytes; then, on an
  accelerator, decode with limits and resize/crop to uint8, overlapping the model's work on the
  current batch; puts the event on the engine's queue.
- **engine** (one thread): the micro-batcher (size or oldest-waited deadline); on the CPU, the
  batch's decoding on every core (``decode_schedule``: decoding beside a model that already uses
  every core slows it more than it gains); the image tower, one policy snapshot per batch,
  decisions, publishing.
- **producer I/O** (kafka-python's): delivery callbacks mark an event done when every record it
  produced (decision, review item, or dead letter) is acknowledged; only then may its offset be
  committed.

Nothing lost: per partition, the committed offset is the lowest event not yet done
(:class:`~moderator.offsets.OffsetTracker`). After a crash, at most the in-flight window is
re-processed; outputs are keyed by event id, so duplicates are harmless.
"""

from __future__ import annotations

import base64
import hashlib
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import MemberState, OffsetAndMetadata

from moderator import observability as obs
from moderator.batcher import MicroBatcher
from moderator.config import Settings
from moderator.events import (
    DeadLetter,
    DecisionRecord,
    ImageRef,
    InputError,
    ParsedEvent,
    ReviewItem,
    Source,
    Timings,
    event_id_hint,
    parse_event,
    review_priority,
    utc_now,
)
from moderator.fetch import Fetcher, FetchError, FetchPolicy, parse_networks
from moderator.images import ImageError, ImageLimits, load_image
from moderator.offsets import OffsetTracker
from moderator.policy import PolicyRegistry, UnknownPolicy

log = obs.get_logger(__name__)


# ==================================================================================================
# One event's journey


@dataclass
class Event:
    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int | None
    received: float  # time.monotonic()
    parsed: ParsedEvent | None = None
    data: bytes | None = None  # the image bytes (inline or fetched) until decoded
    pixels: np.ndarray | None = None
    image_sha256: str = ""
    image_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    outputs: int = 0  # records not yet acknowledged
    tracked: bool = True  # False for a re-delivered offset: it must not move the watermark

    @property
    def source(self) -> Source:
        return Source(topic=self.tp.topic, partition=self.tp.partition, offset=self.offset,
                      timestamp_ms=self.timestamp_ms)  # fmt: skip


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _record_timestamp(ts: Any) -> int | None:
    return int(ts) if isinstance(ts, int) and ts >= 0 else None


# ==================================================================================================
# Kafka clients


def consumer_timeouts(settings: Settings) -> tuple[int, int, int]:
    """(session, heartbeat, max poll interval) in ms. Brokers before 0.10.1 have no separate poll
    interval: kafka-python makes it the session timeout, so the smaller of the two governs both."""
    session, heartbeat, poll = (settings.kafka_session_timeout_ms, settings.kafka_heartbeat_interval_ms,
                                settings.kafka_max_poll_interval_ms)  # fmt: skip
    version = settings.kafka_api_version_tuple
    if version is not None and version < (0, 10, 1):
        session = poll = min(session, poll)
    return session, min(heartbeat, max(100, session // 3)), poll


def make_consumer(settings: Settings, **overrides: Any) -> KafkaConsumer:
    # The largest message: an inline image (base64: 4/3) plus its envelope.
    partition_bytes = settings.image_max_bytes * 4 // 3 + 1_048_576
    session, heartbeat, poll = consumer_timeouts(settings)
    kwargs: dict[str, Any] = {
        **settings.kafka_common(),
        "group_id": settings.kafka_group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": session,
        "heartbeat_interval_ms": heartbeat,
        "max_poll_records": min(500, settings.max_in_flight),
        "max_partition_fetch_bytes": partition_bytes,
        "fetch_max_bytes": max(partition_bytes, 52_428_800),
        # Old brokers ignore fetch_max_bytes: a response may carry one full partition fetch per
        # partition; a frame over this limit is dropped without an error reaching poll().
        "receive_message_max_bytes": max(100_000_000, 4 * partition_bytes + 1_048_576),
    }
    if poll != session or settings.kafka_api_version_tuple is None or settings.kafka_api_version_tuple >= (0, 10, 1):
        kwargs["max_poll_interval_ms"] = poll
    kwargs.update(overrides)
    return KafkaConsumer(**kwargs)


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    kwargs: dict[str, Any] = {
        **settings.kafka_common(),
        "acks": "all",
        "retries": 10,
        "linger_ms": 5,
        "max_request_size": max(settings.dead_letter_max_original_bytes * 2, 4_194_304),
        "enable_idempotence": settings.idempotence,
    }
    if not settings.idempotence:
        kwargs["max_in_flight_requests_per_connection"] = 5
    kwargs.update(overrides)
    return KafkaProducer(**kwargs)


# ==================================================================================================
# The worker


class Worker:
    def __init__(
        self,
        settings: Settings,
        engine: Any,  # moderator.clip.ClipEngine
        registry: PolicyRegistry,
        *,
        consumer: KafkaConsumer | None = None,
        producer: KafkaProducer | None = None,
        fetcher: Fetcher | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.consumer = consumer or make_consumer(settings)
        self.producer = producer or make_producer(settings)
        self.fetcher = fetcher or Fetcher(
            FetchPolicy(
                max_bytes=settings.image_max_bytes,
                timeout_s=settings.fetch_timeout_s,
                connect_timeout_s=settings.fetch_connect_timeout_s,
                max_redirects=settings.fetch_max_redirects,
                allowed_hosts=settings.fetch_allowed_hosts,
                allow_networks=parse_networks(settings.fetch_allow_networks),
            )
        )
        self.limits = ImageLimits.from_settings(settings)
        self.topics = {
            "decisions": settings.topic_decisions,
            "review": settings.topic_review,
            "dead_letters": settings.topic_dead_letters,
        }
        self._pool = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="image")
        self._decode_slots = threading.BoundedSemaphore(settings.decode_threads)
        self._decoder: ThreadPoolExecutor | None = None  # set: each batch is decoded just before its forward
        if decode_before_forward(settings.decode_schedule, engine.device):
            self._decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self._ready: queue.Queue[Event | None] = queue.Queue()
        self._lock = threading.Condition()  # guards the tracker, in-flight count and failures
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._in_flight = 0
        self._owned: set[TopicPartition] = set()
        self._failed: list[tuple[Event, str, bytes | None, bytes, int]] = []  # records to re-send
        self._stop = threading.Event()
        self._fatal: str | None = None
        self._paused = False
        self._commit_in_flight = False
        self._engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self.assigned = threading.Event()

    # ------------------------------------------------------------------------------------------
    # main thread

    def run(self, install_signals: bool = True) -> int:
        """Consume until stopped (SIGTERM/SIGINT or :meth:`stop`); 0 on a clean stop."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop(f"signal {signum}"))
        if self.settings.fetch_allow_networks:
            log.warning("fetch_private_networks_allowed", networks=list(self.settings.fetch_allow_networks))
        self._wait_for_topic(self.settings.topic_images)
        listener = _Rebalance(self, self.consumer, rebalance_wait_budget(self.settings))
        self.consumer.subscribe([self.settings.topic_images], listener=listener)
        # One metadata refresh after subscribing, before the first join: kafka-python builds the
        # snapshot it compares assignments against from metadata updates; without one, the first
        # refresh after joining looks like a partition change and rebalances for nothing.
        self.consumer.topics()
        self._engine_thread.start()
        log.info("worker_started", topic=self.settings.topic_images, group=self.settings.kafka_group_id,
                 model=self.engine.fingerprint, policies=sorted(self.registry.current.policies))  # fmt: skip
        next_commit = time.monotonic() + self.settings.commit_interval_ms / 1000
        try:
            while not self._stop.is_set():
                records = self.consumer.poll(timeout_ms=100)
                for tp, batch in records.items():
                    for record in batch:
                        self._receive(tp, record)
                self._resend_failed()
                self._backpressure()
                if time.monotonic() >= next_commit or self._commit_pressure():
                    self.commit()
                    next_commit = time.monotonic() + self.settings.commit_interval_ms / 1000
            return self._shutdown()
        except Exception:
            log.exception("worker_crashed")
            self._stop.set()
            self._ready.put(None)
            raise

    def _wait_for_topic(self, topic: str, timeout: float = 30.0) -> None:
        """Have the topic's partitions in the consumer's metadata before joining the group.

        kafka-python compares the partitions it assigned against later metadata; joining before the
        topic is known makes it see a change on the next refresh and rebalance for nothing.
        """
        deadline = time.monotonic() + timeout
        while not self.consumer.partitions_for_topic(topic):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"topic {topic!r} does not exist (or has no partitions) on {self.settings.kafka_bootstrap_servers}:"
                    " create it, or set MODERATOR_TOPIC_IMAGES"
                )
            time.sleep(0.2)

    def stop(self, why: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("worker_stopping", why=why)
            self._stop.set()

    def _receive(self, tp: TopicPartition, record: Any) -> None:
        obs.EVENTS_IN.inc()
        event = Event(tp=tp, offset=record.offset, key=record.key, value=record.value or b"",
                      timestamp_ms=_record_timestamp(record.timestamp), received=time.monotonic())  # fmt: skip
        with self._lock:
            event.tracked = self._tracker.start(tp, record.offset)
            self._in_flight += 1
            obs.IN_FLIGHT.set(self._in_flight)
        try:
            event.parsed = parse_event(record.key, record.value, self.settings.input_format == "raw",
                                       self.settings.image_max_bytes)  # fmt: skip
            self.registry.current.get(event.parsed.policy)
        except (InputError, UnknownPolicy) as exc:
            self._dead_letter(event, exc.reason, str(exc))  # type: ignore[attr-defined]
            return
        self._pool.submit(self._image_stage, event)

    def _backpressure(self) -> None:
        # Bounded by events not yet *committed* (not only not yet acknowledged): what a crash would
        # re-process, so duplicates after a crash never exceed max_in_flight.
        with self._lock:
            in_flight = max(self._in_flight, self._tracker.uncommitted())
        limit = self.settings.max_in_flight
        if not self._paused and in_flight >= limit:
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
            obs.BACKPRESSURE_PAUSES.inc()
        elif self._paused and in_flight <= limit // 2:
            self.consumer.resume(*self.consumer.paused())  # only partitions still owned and paused
            self._paused = False

    def _commit_pressure(self) -> bool:
        """Half the in-flight window is done but uncommitted: commit now rather than at the interval."""
        with self._lock:
            done_uncommitted = self._tracker.uncommitted() - self._tracker.pending()
        return done_uncommitted >= max(1, self.settings.max_in_flight // 2)

    def commit(self) -> dict[TopicPartition, int]:
        """Commit every partition's done-watermark that moved, without blocking the poll loop.

        Asynchronous on purpose: a synchronous commit during a rebalance retries until its timeout
        while the rebalance waits for this thread's next poll(). Skipped unless the member is stable
        (revocations commit their own partitions). The callback runs on this thread, in poll().
        """
        if self._commit_in_flight or self.consumer.group_metadata().state != MemberState.STABLE:
            return {}
        with self._lock:
            offsets = self._tracker.committable()
            if not offsets:
                return {}
        t0 = time.perf_counter()

        def done(_offsets: Any, response: Any) -> None:
            self._commit_in_flight = False
            if isinstance(response, BaseException):
                log.warning("commit_failed", error=f"{type(response).__name__}: {response}", partitions=len(offsets))
                return
            with self._lock:
                self._tracker.mark_committed(offsets)
            obs.STAGE_SECONDS.labels(stage="commit").observe(time.perf_counter() - t0)

        self._commit_in_flight = True
        try:
            self.consumer.commit_async(
                offsets={tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}, callback=done
            )
        except Exception as exc:
            self._commit_in_flight = False
            log.warning("commit_failed", error=f"{type(exc).__name__}: {exc}", partitions=len(offsets))
            return {}
        return offsets

    def commit_sync(self, timeout_ms: int = 10_000) -> dict[TopicPartition, int]:
        """A blocking commit, for shutdown (partitions paused, no rebalance expected)."""
        with self._lock:
            offsets = self._tracker.committable()
        if not offsets:
            return {}
        try:
            self.consumer.commit(
                offsets={tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}, timeout_ms=timeout_ms
            )
        except Exception as exc:
            log.warning("commit_failed", error=f"{type(exc).__name__}: {exc}", partitions=len(offsets))
            return {}
        with self._lock:
            self._tracker.mark_committed(offsets)
        return offsets

    def _shutdown(self) -> int:
        """Stop fetching, finish and publish what is in flight, commit, close."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(*assignment)
        while time.monotonic() < deadline and self._fatal is None:
            self._resend_failed()
            with self._lock:
                if self._in_flight == 0:
                    break
                self._lock.wait(timeout=0.05)
        with self._lock:
            left = self._in_flight
        self._ready.put(None)
        self._engine_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.producer.flush(timeout=max(1.0, deadline - time.monotonic()))
        committed = self.commit_sync(timeout_ms=int(max(1.0, deadline - time.monotonic()) * 1000))
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=5)
        log.info(
            "worker_stopped",
            unfinished=left,
            committed={f"{tp.topic}-{tp.partition}": o for tp, o in committed.items()},
        )
        if self._fatal is not None:
            log.error("worker_failed", reason=self._fatal)
            return 1
        return 0 if left == 0 else 3

    # ------------------------------------------------------------------------------------------
    # image stage (thread pool)

    def _image_stage(self, event: Event) -> None:
        """Fetch (URL events) and, unless decoding waits for the batch, decode; then hand to the engine."""
        assert event.parsed is not None
        started = time.monotonic()
        event.timings["queued_ms"] = _ms(started - event.received)
        try:
            event.data = event.parsed.data
            if event.data is None:
                event.data = self.fetcher.fetch(event.parsed.url or "")
                fetch_s = time.monotonic() - started
                event.timings["fetch_ms"] = _ms(fetch_s)
                obs.STAGE_SECONDS.labels(stage="fetch").observe(fetch_s)
        except FetchError as exc:
            self._dead_letter(event, exc.reason, str(exc))
            return
        except Exception as exc:  # a bug, not the data: still never lose the event
            log.exception("image_stage_error", event_id=event.parsed.id)
            self._dead_letter(event, "internal_error", f"{type(exc).__name__}: {exc}")
            return
        if self._decoder is not None or self._decode(event):
            self._ready.put(event)

    def _decode(self, event: Event) -> bool:
        """Decode and preprocess the event's image; on bad data, dead-letter it and return False."""
        assert event.parsed is not None and event.data is not None
        data = event.data
        try:
            seconds: dict[str, float] = {}
            with self._decode_slots:  # fetches wait on the network; decodes compete with the model for cores
                event.pixels = load_image(data, self.limits, self.engine.spec, seconds)
            event.timings["decode_ms"] = _ms(seconds["decode"])
            event.timings["preprocess_ms"] = _ms(seconds["preprocess"])
            event.image_bytes = len(data)
            event.image_sha256 = hashlib.sha256(data).hexdigest()
            event.data = None
        except ImageError as exc:
            self._dead_letter(event, exc.reason, str(exc))
            return False
        except Exception as exc:  # a bug, not the data: still never lose the event
            log.exception("image_stage_error", event_id=event.parsed.id)
            self._dead_letter(event, "internal_error", f"{type(exc).__name__}: {exc}")
            return False
        return True

    # ------------------------------------------------------------------------------------------
    # engine thread

    def _engine_loop(self) -> None:
        batcher: MicroBatcher[Event] = MicroBatcher(self.settings.max_batch_size, self.settings.max_delay_ms / 1000)
        closing = False
        while True:
            deadline = batcher.deadline()
            timeout = 0.1 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._ready.get(timeout=timeout)
                if item is None:
                    closing = True
                else:
                    batcher.add(item, time.monotonic())
                while len(batcher) < batcher.max_size:  # take whatever else is already waiting
                    item = self._ready.get_nowait()
                    if item is None:
                        closing = True
                        break
                    batcher.add(item, time.monotonic())
            except queue.Empty:
                pass
            now = time.monotonic()
            while batcher.ready(now) or (closing and len(batcher)):
                batch = [p for p in batcher.take(now, force=closing)]
                try:
                    self._run_batch([p.item for p in batch], [now - p.since for p in batch])
                except Exception as exc:  # never lose a batch: dead-letter it, keep going
                    log.exception("batch_failed", size=len(batch))
                    for p in batch:
                        self._dead_letter(p.item, "internal_error", f"{type(exc).__name__}: {exc}")
            if closing and not len(batcher) and self._ready.empty():
                return

    def _run_batch(self, events: list[Event], waited: list[float]) -> None:
        if self._decoder is not None:  # every core decodes the batch, then every core runs the model
            good = list(self._decoder.map(self._decode, events))
            events = [e for e, ok in zip(events, good, strict=True) if ok]
            waited = [w for w, ok in zip(waited, good, strict=True) if ok]
            if not events:
                return
        snapshot = self.registry.current  # the whole batch is decided with this policy set
        t0 = time.perf_counter()
        embeds = self.engine.encode_images(np.stack([e.pixels for e in events]))  # type: ignore[misc]
        model_s = time.perf_counter() - t0  # transfer + forward (each observed by the engine)
        obs.BATCH_SIZE.observe(len(events))
        t1 = time.perf_counter()
        groups: dict[str | None, list[int]] = {}
        for i, e in enumerate(events):
            groups.setdefault(e.parsed.policy if e.parsed else None, []).append(i)  # type: ignore[union-attr]
        decisions: list[Any] = [None] * len(events)
        for name, rows in groups.items():
            try:
                policy = snapshot.get(name)
            except UnknownPolicy as exc:  # removed since the event arrived
                for i in rows:
                    self._dead_letter(events[i], exc.reason, str(exc))
                continue
            for i, d in zip(rows, policy.decisions(embeds[rows]), strict=True):
                decisions[i] = d
        score_s = time.perf_counter() - t1  # observed per policy group by CompiledPolicy.decisions
        t2 = time.perf_counter()
        log.info("batch_done", size=len(events), model_ms=_ms(model_s), score_ms=_ms(score_s),
                 oldest_wait_ms=_ms(max(waited)))  # fmt: skip
        now = time.monotonic()
        decided_at = utc_now()
        wall_ms = time.time() * 1000
        for e, d, w in zip(events, decisions, waited, strict=True):
            if d is None:
                continue
            e.pixels = None
            e2e = wall_ms - e.timestamp_ms if e.timestamp_ms is not None else None
            timings = Timings(
                queued_ms=e.timings.get("queued_ms", 0.0), fetch_ms=e.timings.get("fetch_ms", 0.0),
                decode_ms=e.timings.get("decode_ms", 0.0), preprocess_ms=e.timings.get("preprocess_ms", 0.0),
                batch_wait_ms=_ms(w), model_ms=_ms(model_s), score_ms=_ms(score_s), total_ms=_ms(now - e.received),
                end_to_end_ms=round(e2e, 3) if e2e is not None else None,
            )  # fmt: skip
            self._publish_decision(e, d, timings, decided_at)
            obs.DECISIONS.labels(outcome=d.decision).inc()
            obs.EVENT_LATENCY.observe(now - e.received)
            if e2e is not None:
                obs.END_TO_END.observe(max(0.0, e2e / 1000))
        obs.STAGE_SECONDS.labels(stage="publish").observe(time.perf_counter() - t2)

    # ------------------------------------------------------------------------------------------
    # outputs

    def _publish_decision(self, e: Event, d: Any, timings: Timings, decided_at: str) -> None:
        assert e.parsed is not None
        record = DecisionRecord(**d.model_dump(), event_id=e.parsed.id, metadata=e.parsed.metadata,
                                source=e.source, timings=timings, decided_at=decided_at)  # fmt: skip
        outputs = [(self.topics["decisions"], record.model_dump_json().encode())]
        if d.decision == "review" or (d.decision == "flag" and self.settings.review_include_flagged):
            item = ReviewItem(
                event_id=e.parsed.id, decision=d.decision, priority=review_priority(d.triggered),
                image=ImageRef(url=e.parsed.url, inline_source=None if e.parsed.url else e.source,
                               sha256=e.image_sha256, bytes=e.image_bytes),
                scores=d.scores, reasons=d.triggered, policy=d.policy, model=d.model,
                metadata=e.parsed.metadata, source=e.source, decided_at=decided_at,
            )  # fmt: skip
            outputs.append((self.topics["review"], item.model_dump_json().encode()))
        self._send(e, outputs)

    def _dead_letter(self, e: Event, reason: str, message: str) -> None:
        value = e.value
        small = len(value) <= self.settings.dead_letter_max_original_bytes
        record = DeadLetter(
            event_id=e.parsed.id if e.parsed else event_id_hint(e.key, e.value),
            reason=reason, message=message[:2000], source=e.source,
            original_value=base64.b64encode(value).decode() if small else None,
            original_bytes=len(value), original_sha256=hashlib.sha256(value).hexdigest(), failed_at=utc_now(),
        )  # fmt: skip
        obs.DEAD_LETTERS.labels(reason=reason).inc()
        log.info("dead_letter", event_id=record.event_id, reason=reason, message=record.message[:200],
                 topic=e.tp.topic, partition=e.tp.partition, offset=e.offset)  # fmt: skip
        self._send(e, [(self.topics["dead_letters"], record.model_dump_json().encode())])

    def _key(self, e: Event) -> bytes | None:
        if e.parsed is not None:
            return e.parsed.id.encode()
        hint = event_id_hint(e.key, e.value)
        return hint.encode() if hint else e.key

    def _send(self, e: Event, outputs: list[tuple[str, bytes]]) -> None:
        with self._lock:
            e.outputs += len(outputs)
        key = self._key(e)
        for topic, value in outputs:
            self._send_one(e, topic, key, value, attempt=0)

    def _send_one(self, e: Event, topic: str, key: bytes | None, value: bytes, attempt: int) -> None:
        t0 = time.perf_counter()

        def ok(_meta: Any) -> None:
            obs.STAGE_SECONDS.labels(stage="produce").observe(time.perf_counter() - t0)
            self._output_done(e)

        def failed(exc: BaseException) -> None:
            log.warning("publish_failed", topic=topic, attempt=attempt, error=f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._failed.append((e, topic, key, value, attempt + 1))

        try:
            self.producer.send(topic, key=key, value=value).add_callback(ok).add_errback(failed)
        except Exception as exc:  # e.g. buffer full / record too large: same path as an async failure
            failed(exc)

    def _output_done(self, e: Event) -> None:
        with self._lock:
            e.outputs -= 1
            if e.outputs == 0:
                if e.tracked:
                    self._tracker.finish(e.tp, e.offset)
                self._in_flight -= 1
                obs.IN_FLIGHT.set(self._in_flight)
                self._lock.notify_all()

    def _resend_failed(self) -> None:
        with self._lock:
            failed, self._failed = self._failed, []
        for e, topic, key, value, attempt in failed:
            if attempt > self.settings.publish_retries:
                self._fatal = f"could not publish to {topic} after {attempt} attempts"
                self.stop(self._fatal)
                continue
            self._send_one(e, topic, key, value, attempt)

    # ------------------------------------------------------------------------------------------
    # rebalance (called by the consumer's listener)

    def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        with self._lock:
            self._owned |= set(assigned)
        if self._paused and assigned:
            self.consumer.pause(*assigned)  # newly assigned partitions arrive unpaused
        self.assigned.set()
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))

    def pending(self, partitions: set[TopicPartition]) -> int:
        with self._lock:
            return sum(self._tracker.pending(tp) for tp in partitions)

    def partitions_revoked(
        self, revoked: set[TopicPartition], lost: bool
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        """Forget revoked partitions: (offsets to commit for them (none when lost), resume points)."""
        with self._lock:
            offsets = {} if lost else {tp: o for tp, o in self._tracker.committable().items() if tp in revoked}
            resume = {tp: o for tp in revoked if (o := self._tracker.resume_point(tp)) is not None}
            abandoned = sum(self._tracker.pending(tp) for tp in revoked)
            self._tracker.drop(revoked)
            self._owned -= set(revoked)
            if not self._owned:
                self.assigned.clear()
        log.info("partitions_revoked" if not lost else "partitions_lost", abandoned=abandoned,
                 partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in revoked))  # fmt: skip
        return offsets, resume


class _Rebalance(AsyncConsumerRebalanceListener):
    """Rebalance hooks. kafka-python 3 runs them on its IO thread and awaits them, so waiting here
    (with the loop's own sleep; asyncio's does not work there) keeps heartbeats going.

    Revoked: wait (bounded) until the revoked partitions' in-flight events are done, commit their
    watermarks, forget them. Whatever is still unfinished after the wait is abandoned uncommitted
    (the next owner re-reads it), never half-committed. Lost: nothing may be committed; forget.
    Assigned: partitions we keep resume from their first unfinished offset (kafka-python keeps the
    fetch position of a retained partition, which may be past abandoned events).
    """

    def __init__(self, worker: Worker, consumer: KafkaConsumer, max_wait_s: float) -> None:
        self.worker = worker
        self.consumer = consumer
        self.max_wait_s = max_wait_s
        self._resume: dict[TopicPartition, int] = {}

    async def _sleep(self, seconds: float) -> bool:
        net = getattr(self.consumer, "_net", None)  # kafka-python 3's IO loop (tests check it exists)
        if net is None or not hasattr(net, "sleep"):
            return False
        await net.sleep(seconds)
        return True

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        try:
            deadline = time.monotonic() + self.max_wait_s
            while self.worker.pending(revoked) and time.monotonic() < deadline:
                if not await self._sleep(0.05):
                    break
            offsets, self._resume = self.worker.partitions_revoked(set(revoked), lost=False)
            if offsets:
                await self.consumer.commit_async(
                    offsets={tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
                )
                log.info("revoked_partitions_committed", offsets={f"{tp.topic}-{tp.partition}": o
                                                                  for tp, o in offsets.items()})  # fmt: skip
        except Exception as exc:  # never raise into kafka-python: it would retry us on every poll
            log.warning("revocation_commit_failed", error=f"{type(exc).__name__}: {exc}")

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            for tp in assigned:
                if tp in self._resume:
                    self.consumer.seek(tp, self._resume[tp])
            self._resume = {}
            self.worker.partitions_assigned(set(assigned))
        except Exception as exc:
            log.warning("assignment_hook_failed", error=f"{type(exc).__name__}: {exc}")

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        try:
            self.worker.partitions_revoked(set(lost), lost=True)
            self._resume = {}
        except Exception as exc:
            log.warning("partitions_lost_hook_failed", error=f"{type(exc).__name__}: {exc}")


def decode_before_forward(schedule: str, device: torch.device) -> bool:
    """Whether images are decoded when their batch runs (all cores, then the model on all cores)
    rather than ahead of it, beside the model.

    ``auto``: on the CPU, where the image tower already uses every core, decoding beside it preempts
    the model's threads mid-product and costs the model more than the decoding itself takes; on an
    accelerator, decoding ahead overlaps the device's work.
    """
    if schedule == "auto":
        return device.type == "cpu"
    return schedule == "before_forward"


def rebalance_wait_budget(settings: Settings) -> float:
    """How long a revocation may wait for in-flight work before the group gives up on this member.

    Brokers before 0.10.1 (JoinGroup v0) drop a member that has not rejoined within the session
    timeout, heartbeats or not; newer ones wait up to the rebalance timeout (max poll interval).
    """
    version = settings.kafka_api_version_tuple
    if version is not None and version < (0, 10, 1):
        limit_ms = consumer_timeouts(settings)[0] - consumer_timeouts(settings)[1]
    else:
        limit_ms = settings.kafka_max_poll_interval_ms
    return max(0.0, min(settings.rebalance_wait_s, limit_ms / 1000 - 1.0))
