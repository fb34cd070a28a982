"""The worker's outputs: building each event's records, and sending them so that none is lost.

:class:`Outputs` turns a decided (or failed) event into its records: a decision, plus a review item
for the decisions that go to review by the policy's design (:func:`review_draw`); or one dead letter.
Topic names come from the registry (``moderator/topics.py``) through the settings.

:class:`Publisher` hands an event's records to the producer, all keyed by the event id, and tells
the :class:`~moderator.worker.checkpoint.Checkpoint` how many are on their way and when each is
acknowledged. A record the broker refuses is re-sent from the consumer's thread, up to
``publish_retries`` times; after that the worker stops without committing the event (exit 1). In
the exactly-once mode it hands them to the checkpoint instead, held for the next transaction.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer

from moderator import observability as obs
from moderator import tracing
from moderator.config import Settings
from moderator.events import (
    DeadLetter,
    Decision,
    DecisionRecord,
    EmbeddingRecord,
    ReviewItem,
    ShadowDecisionRecord,
    encode_vector,
    event_id_hint,
    review_priority,
    utc_now,
)
from moderator.policy import PolicySpec, audit_draw
from moderator.worker.checkpoint import Checkpoint, Receipt
from moderator.worker.event import Decided, Event, ReviewDraw
from moderator.worker.transactions import Held

log = obs.get_logger(__name__)


def review_draw(event_id: str, outcome: str, spec: PolicySpec, include_flagged: bool) -> ReviewDraw:
    """Review decisions (and flag ones with ``MODERATOR_REVIEW_INCLUDE_FLAGGED``) all go to review; allow
    and flag ones at their audit rate, drawn by the event id (a flag that goes anyway is no sample)."""
    if outcome == "review" or (outcome == "flag" and include_flagged):
        draw = ReviewDraw(1.0)
    else:
        rate = spec.audit.rate(outcome) if spec.audit is not None else 0.0
        draw = ReviewDraw(rate, sampled=rate > 0 and audit_draw(event_id) < rate)
    if draw.goes and spec.double_review > 0 and audit_draw(event_id, "double-review") < spec.double_review:
        draw = ReviewDraw(draw.probability, draw.sampled, second=True)
    return draw


Headers = list[tuple[str, bytes]]

# The record headers of every output (where the broker has headers: >= 0.11), for routing without
# parsing JSON; W3C traceparent beside them (moderator/tracing.py).
EVENT_ID_HEADER = "moderator-event-id"
POLICY_HEADER = "moderator-policy"  # name@version (the version: a content hash)
MODEL_HEADER = "moderator-model"  # the model fingerprint
# exactly-once adds moderator-transaction: the transaction that wrote the record (worker/transactions.py)


@dataclass(frozen=True)
class OutRecord:
    topic: str
    value: bytes
    headers: Headers | None = None


def output_headers(e: Event, decision: Decision | None) -> Headers:
    """An output's headers: the event id, the policy and model that decided (not on a dead letter), and
    the worker's span of the event's trace."""
    event_id = e.parsed.id if e.parsed is not None else event_id_hint(e.key, e.value)
    headers: Headers = [(EVENT_ID_HEADER, (event_id or "").encode())]
    if decision is not None:
        headers.append((POLICY_HEADER, f"{decision.policy.name}@{decision.policy.version}".encode()))
        headers.append((MODEL_HEADER, decision.model.encode()))
    headers.append((tracing.HEADER, tracing.child(e.trace).header().encode()))
    return headers


class Outputs:
    """What each event publishes, and where (with record headers when ``headers``)."""

    def __init__(self, settings: Settings, headers: bool = False) -> None:
        self.headers = headers
        self.decisions = settings.topic("decisions")
        self.review = settings.topic("review")
        self.dead_letters = settings.topic("dead_letters")
        self.embeddings = settings.topic("embeddings")
        self.shadow_decisions = settings.topic("shadow_decisions")
        self.embeddings_dtype = settings.embeddings_dtype
        self.dead_letter_max_original_bytes = settings.dead_letter_max_original_bytes

    def decided(self, result: Decided) -> list[OutRecord]:
        """The decision; a review item for review decisions (and flag ones, if so configured); the
        embedding with the live decision (when the log is on); one record per shadow decision."""
        e, d, decided_at, draw = result.event, result.decision, result.decided_at, result.review
        assert e.parsed is not None
        headers = output_headers(e, d) if self.headers else None
        record = DecisionRecord(**d.model_dump(), event_id=e.parsed.id, metadata=e.parsed.metadata,
                                source=e.source, timings=result.timings, decided_at=decided_at,
                                review_probability=draw.probability, sampled=draw.sampled,
                                image_sha256=e.image_sha256 or None)  # fmt: skip
        out = [OutRecord(self.decisions, record.model_dump_json().encode(), headers)]
        if draw.goes:
            item = ReviewItem(
                event_id=e.parsed.id, decision=d.decision, priority=review_priority(d.triggered),
                image=e.image,
                scores=d.scores, reasons=d.triggered, policy=d.policy, model=d.model,
                image_precision=d.image_precision, frames=d.frames, metadata=e.parsed.metadata, source=e.source,
                decided_at=decided_at,
                sampled=draw.sampled, sample_rate=draw.probability if draw.sampled else None,
                explanation=list(result.explanation), second_review=draw.second,
            )  # fmt: skip
            out.append(OutRecord(self.review, item.model_dump_json().encode(), headers))
        if result.embedding is not None:
            embedding = EmbeddingRecord(
                event_id=e.parsed.id, model=d.model, image_precision=d.image_precision, dtype=self.embeddings_dtype,
                dim=len(result.embedding), vector=encode_vector(result.embedding, self.embeddings_dtype),
                frame_vectors=None if result.frame_embeddings is None
                else encode_vector(result.frame_embeddings, self.embeddings_dtype),
                source=e.source, live=d, decided_at=decided_at, pdq=result.pdq.hex if result.pdq else None,
                pdq_quality=result.pdq.quality if result.pdq else None, image=e.image,
                frame_pdqs=None if e.frames is None or not e.pdqs
                else [h.hex if h is not None and h.usable else None for h in e.pdqs],
                review_probability=draw.probability, sampled=draw.sampled,
            )  # fmt: skip
            out.append(OutRecord(self.embeddings, embedding.model_dump_json().encode(), headers))
        for shadow in result.shadows:
            pair = ShadowDecisionRecord(event_id=e.parsed.id, live=d, shadow=shadow, source=e.source,
                                        agree=shadow.decision == d.decision, decided_at=decided_at)  # fmt: skip
            out.append(OutRecord(self.shadow_decisions, pair.model_dump_json().encode(), headers))
        return out

    def dead_letter(self, e: Event, reason: str, message: str) -> OutRecord:
        value = e.value
        small = len(value) <= self.dead_letter_max_original_bytes
        record = DeadLetter(
            event_id=e.parsed.id if e.parsed else event_id_hint(e.key, e.value),
            reason=reason, message=message[:2000], source=e.source,
            original_value=base64.b64encode(value).decode() if small else None,
            original_bytes=len(value), original_sha256=hashlib.sha256(value).hexdigest(), failed_at=utc_now(),
        )  # fmt: skip
        obs.DEAD_LETTERS.labels(reason=reason).inc()
        log.info("dead_letter", event_id=record.event_id, reason=reason, message=record.message[:200],
                 topic=e.tp.topic, partition=e.tp.partition, offset=e.offset)  # fmt: skip
        headers = output_headers(e, None) if self.headers else None
        return OutRecord(self.dead_letters, record.model_dump_json().encode(), headers)


@dataclass(frozen=True)
class _Refused:
    receipt: Receipt
    key: bytes | None
    record: OutRecord
    attempt: int  # sends so far


def event_key(e: Event) -> bytes | None:
    """Every output of an event is keyed by its id (best effort for one that could not be parsed)."""
    if e.parsed is not None:
        return e.parsed.id.encode()
    hint = event_id_hint(e.key, e.value)
    return hint.encode() if hint else e.key


class Publisher:
    def __init__(self, producer: KafkaProducer, checkpoint: Checkpoint, retries: int) -> None:
        self.producer = producer
        self.checkpoint = checkpoint
        self.retries = retries
        self._lock = threading.Lock()
        self._refused: list[_Refused] = []
        self.fatal: str | None = None  # set once a record could not be published after every retry

    def send(self, e: Event, records: list[OutRecord]) -> None:
        key = event_key(e)
        if self.checkpoint.transactions is not None:  # exactly-once: held for the next transaction
            self.checkpoint.hold(e.receipt, [Held(r.topic, key, r.value, r.headers) for r in records])
            return
        self.checkpoint.expect(e.receipt, len(records))
        for record in records:
            self._send(_Refused(e.receipt, key, record, 0))

    def _send(self, item: _Refused) -> None:
        t0 = time.perf_counter()

        def ok(_meta: Any) -> None:
            obs.STAGE_SECONDS.labels(stage="produce").observe(time.perf_counter() - t0)
            self.checkpoint.acknowledged(item.receipt)

        def failed(exc: BaseException) -> None:
            log.warning("publish_failed", topic=item.record.topic, attempt=item.attempt + 1,
                        error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            with self._lock:
                self._refused.append(_Refused(item.receipt, item.key, item.record, item.attempt + 1))

        try:
            future = self.producer.send(item.record.topic, key=item.key, value=item.record.value,
                                        headers=item.record.headers)  # fmt: skip
            future.add_callback(ok).add_errback(failed)
        except Exception as exc:  # e.g. buffer full / record too large: the same path as an async failure
            failed(exc)

    def resend_refused(self) -> bool:
        """Re-send what the broker refused (consumer thread). False once a record ran out of retries."""
        with self._lock:
            refused, self._refused = self._refused, []
        for item in refused:
            if item.attempt > self.retries:
                self.fatal = f"could not publish to {item.record.topic} after {item.attempt} attempts"
                continue
            self._send(item)
        return self.fatal is None
