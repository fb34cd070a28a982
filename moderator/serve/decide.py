"""Deciding a request's images: the stream's pipeline, with a deadline, and the stream's trail.

For each image of a request, on the endpoint's event loop:

1. Refuse at once what cannot be decided: an unknown policy; no room in the admission queue, or a
   predicted wait past the deadline (``admission.py``: 503 with ``Retry-After``).
2. The bytes: inline (``data`` or a ``data:`` URL), or fetched through the SSRF-safe fetcher (on a
   thread), so that the image's sha256 is known.
3. Idempotency: the same event id and the same bytes get the stored decision record back
   (``store.py``); the same pair already in flight waits for that one.
4. The request's event goes to the requests topic (``MODERATOR_TOPIC_REQUESTS``); the broker's
   acknowledgement gives it its coordinates: the ``source`` of its decision, where the console reads an
   inline image again, as it does for the stream's events. It is on its way while step 5 runs.
5. The event enters the image stage and the micro-batcher of the stream (``moderator run`` with
   ``MODERATOR_SERVE_IN_WORKER``) or of the endpoint alone, in the urgent lane, due by half its
   remaining time; a batch that starts after its deadline leaves it out (:class:`Reply`).
6. Once decided and its event acknowledged, its records are built by the worker's own
   :class:`~moderator.worker.outputs.Outputs`: the decision record, the review item (review decisions,
   audit samples), the embedding, the shadow decisions; all are published, and when the broker has
   acknowledged every one, the request gets the decision record, byte for byte as the decisions topic
   carries it.

A request never waits past its deadline: it is answered 503 (``timeout``) then, while a decision
already under way is still published (a retry with the same id then gets it from the store).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer, TopicPartition

from moderator import observability as obs
from moderator.config import Settings
from moderator.events import ParsedEvent
from moderator.fetch import Fetcher
from moderator.policy import PolicyRegistry
from moderator.serve.admission import Admission
from moderator.serve.errors import Failed, Overloaded, PublishFailed, Timeout
from moderator.serve.store import DecisionStore
from moderator.worker.checkpoint import Receipt
from moderator.worker.event import Decided, Event
from moderator.worker.outputs import Outputs, event_key

log = obs.get_logger(__name__)


@dataclass(frozen=True)
class Answer:
    record: bytes  # the decision record, as the decisions topic carries it
    replayed: bool  # from the idempotency store


def envelope(item: ParsedEvent, data: bytes | None) -> bytes:
    """The request's image event as the images topic would carry it (inline bytes or the URL)."""
    image = {"url": item.url} if item.url is not None else {"data": base64.b64encode(data or b"").decode()}
    body: dict[str, Any] = {"id": item.id, "image": image}
    if item.policy is not None:
        body["policy"] = item.policy
    if item.metadata:
        body["metadata"] = item.metadata
    return json.dumps(body, separators=(",", ":")).encode()


class Reply:
    """One image's way back to its request (:class:`moderator.worker.event.Reply`).

    Its request's event is on its way to the requests topic while the image is decoded and batched; the
    records are built and published when both the decision (the engine's thread) and the broker's
    acknowledgement of the request's event (kafka-python's thread: the decision's ``source``) have come,
    whichever is second. When every record is acknowledged, the request's future is resolved on the event
    loop.
    """

    def __init__(self, decider: Decider, loop: asyncio.AbstractEventLoop, future: asyncio.Future[bytes],
                 due: float, deadline: float) -> None:  # fmt: skip
        self.decider = decider
        self.loop = loop
        self.future = future
        self.due = due
        self.deadline = deadline
        self._lock = threading.Lock()
        self._recorded: Any = None  # the request event's RecordMetadata, once acknowledged
        self._result: Decided | None = None  # the decision, when it came before the acknowledgement
        self._done = False  # failed, or handed to _publish

    def _settle(self, outcome: bytes | BaseException) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the endpoint stopped (its loop closed): the trail is published
            self.loop.call_soon_threadsafe(settle)

    def recorded(self, meta: Any) -> None:
        """The request's event is acknowledged (kafka-python's thread)."""
        with self._lock:
            self._recorded, result = meta, self._result
            go = result is not None and not self._done
            self._done = self._done or go
        if go:  # never from kafka-python's own thread: a send there may wait for metadata that thread fetches
            self.decider.background(self._publish, result, meta)

    def not_recorded(self, exc: BaseException) -> None:
        with self._lock:
            self._done = True
        self._settle(PublishFailed(f"the request could not be recorded: {exc}", retry_after_s=1))

    def decided(self, result: Decided) -> None:
        with self._lock:
            self._result, meta = result, self._recorded
            go = meta is not None and not self._done
            self._done = self._done or go
        if go:
            self._publish(result, meta)

    def _publish(self, result: Decided, meta: Any) -> None:
        e = result.event
        e.receipt = Receipt(TopicPartition(meta.topic, meta.partition), meta.offset, tracked=False)
        e.timestamp_ms = meta.timestamp if isinstance(meta.timestamp, int) and meta.timestamp >= 0 else None
        records = self.decider.outputs.decided(result)
        decision = records[0].value  # the decision record comes first
        key = event_key(e)
        remaining = [len(records)]
        lock = threading.Lock()

        def ok(_meta: Any) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self._settle(decision)

        def failed(exc: BaseException) -> None:
            log.warning("serve_publish_failed", error=f"{type(exc).__name__}: {exc}")
            self._settle(PublishFailed("the decision could not be published; try again", retry_after_s=1))

        for record in records:
            try:
                self.decider.producer.send(record.topic, key=key, value=record.value).add_callback(ok).add_errback(
                    failed
                )
            except Exception as exc:  # buffer full, record too large: refused like an asynchronous failure
                failed(exc)
                return

    def failed(self, reason: str, message: str) -> None:
        with self._lock:
            self._done = True
        self._settle(Failed(reason, message))


class Decider:
    def __init__(
        self,
        settings: Settings,
        registry: PolicyRegistry,
        fetcher: Fetcher,
        producer: KafkaProducer,
        submit: Callable[[Event], None],
        store: DecisionStore,
    ) -> None:
        self.registry = registry
        self.fetcher = fetcher
        self.producer = producer
        self.submit = submit
        self.store = store
        self.outputs = Outputs(settings)
        self.requests_topic = settings.topic("requests")
        self.admission = Admission(settings.serve_max_pending, settings.max_batch_size)
        self._io = ThreadPoolExecutor(max(4, settings.fetch_threads), thread_name_prefix="serve-io")
        self._in_flight: dict[tuple[str, str], asyncio.Future[bytes]] = {}

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)

    def background(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` on the endpoint's I/O threads (logged if it raises)."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("serve_background_failed")

        self._io.submit(run)

    async def decide(self, items: list[ParsedEvent], deadline: float) -> list[Answer]:
        """Every image's decision record, in order; or the first image's error (a ReasonError). Only decided
        requests count in the admission queue's pace (a refused URL costs no model time)."""
        snapshot = self.registry.current
        for item in items:
            snapshot.get(item.policy)  # unknown_policy / invalid_policy before anything is admitted
        now = time.monotonic()
        refusal = self.admission.admit(len(items), now, deadline)
        if refusal is not None:
            obs.SERVE_REFUSED.labels(why=refusal.why).inc()
            wait = f"{refusal.predicted_wait_s:.1f} s" if refusal.predicted_wait_s is not None else "unknown"
            raise Overloaded(f"overloaded ({refusal.why}: {self.admission.pending} images pending, predicted wait"
                             f" {wait}); retry after {refusal.retry_after_s} s", refusal.retry_after_s)  # fmt: skip
        obs.SERVE_PENDING.set(self.admission.pending)
        answered = False
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*(self._one(item, deadline) for item in items)), timeout=max(0.0, deadline - now)
            )
            answered = True
            return list(answers)
        except asyncio.TimeoutError:
            obs.SERVE_REFUSED.labels(why="timeout").inc()
            raise Timeout("no decision within the request's timeout; retry later (same id)", retry_after_s=1) from None
        finally:
            self.admission.release(len(items), time.monotonic(), answered)
            obs.SERVE_PENDING.set(self.admission.pending)

    async def _one(self, item: ParsedEvent, deadline: float) -> Answer:
        loop = asyncio.get_running_loop()
        data = item.data
        if data is None:
            data = await loop.run_in_executor(self._io, self.fetcher.fetch, item.url or "")
        sha = hashlib.sha256(data).hexdigest()
        stored = await loop.run_in_executor(self._io, self.store.get, item.id, sha)
        if stored is not None:
            obs.SERVE_REPLAYED.inc()
            return Answer(stored, True)
        running = self._in_flight.get((item.id, sha))
        if running is not None:  # the same id and bytes already on their way: one decision for both
            return Answer(await asyncio.shield(running), True)
        future: asyncio.Future[bytes] = loop.create_future()
        future.add_done_callback(lambda f: self._decided(loop, item.id, sha, f))
        self._in_flight[(item.id, sha)] = future
        try:
            value = envelope(item, data)
            now = time.monotonic()
            reply = Reply(self, loop, future, due=now + max(0.0, deadline - now) / 2, deadline=deadline)
            try:  # the request's event, on its way while the image is decoded and batched
                sent = self.producer.send(self.requests_topic, key=item.id.encode(), value=value)
            except Exception as exc:
                raise PublishFailed(f"the request could not be recorded: {exc}", retry_after_s=1) from None
            sent.add_callback(reply.recorded).add_errback(reply.not_recorded)
            event = Event(
                Receipt(TopicPartition(self.requests_topic, -1), -1, tracked=False),  # until the broker says
                item.id.encode(), value, None, now,
                parsed=ParsedEvent(item.id, item.policy, item.metadata, data, item.url), reply=reply,
            )  # fmt: skip
            try:
                self.submit(event)
            except RuntimeError:  # the stages are shutting down
                raise Overloaded("the endpoint is stopping; retry on another replica", retry_after_s=1) from None
            record = await asyncio.shield(future)
        finally:
            self._in_flight.pop((item.id, sha), None)
        return Answer(record, False)

    def _decided(self, loop: asyncio.AbstractEventLoop, event_id: str, sha: str, future: asyncio.Future[bytes]) -> None:
        """A decision reached its future: stored for retries, even when its request stopped waiting."""
        if future.cancelled() or future.exception() is not None:
            return  # (the exception is retrieved, so never logged as lost)
        self.store.remember(event_id, sha, future.result())
        loop.run_in_executor(self._io, self.store.save, event_id, sha, future.result())
