"""One event's journey through the worker, and the seam the worker needs of the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from kafka import TopicPartition

from moderator.banks.pdq import PdqHash
from moderator.events import CategoryExplanation, Decision, ImageRef, ParsedEvent, Source, Timings
from moderator.frames import FrameSet
from moderator.images import PreprocessSpec
from moderator.precision import ImageTower
from moderator.tracing import TraceParent
from moderator.worker.checkpoint import Receipt


class ImageEngine(Protocol):
    """What the worker needs of the CLIP engine (:class:`moderator.clip.ClipEngine` is one)."""

    device: torch.device
    spec: PreprocessSpec  # how images are resized and cropped before the tower
    fingerprint: str  # the model that decided, recorded in every decision
    tower: ImageTower  # the image tower serving now: read once per batch, its precision recorded

    def encode_images(self, batch: np.ndarray, tower: ImageTower | None = None) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` to L2-normalized float32 embeddings ``[B, D]`` (by ``tower``)."""
        ...


class Reply(Protocol):
    """Where a synchronous request's result goes (``moderator serve``), instead of the worker's publisher:
    the request waits for it. Its times are ``time.monotonic()``."""

    due: float  # the micro-batcher runs its batch by then at the latest (the urgent lane)
    deadline: float  # the requester stops waiting then: an event still unbatched is dropped, not decided

    def decided(self, result: Decided) -> None: ...

    def failed(self, reason: str, message: str) -> None: ...


@dataclass
class Event:
    receipt: Receipt
    key: bytes | None
    value: bytes
    timestamp_ms: int | None  # the record's timestamp, when the broker keeps one
    received: float  # time.monotonic()
    parsed: ParsedEvent | None = None
    data: bytes | None = None  # the image bytes (inline or fetched) until decoded
    pixels: np.ndarray | None = None  # uint8 [F, H, W, 3]: one row per frame (a still: F = 1)
    image_sha256: str = ""
    image_bytes: int = 0
    pdqs: tuple[PdqHash | None, ...] = ()  # per frame, the PDQ hashes (when the worker hashes)
    frames: FrameSet | None = None  # an animation or a video: what was sampled; None: a still
    timings: dict[str, float] = field(default_factory=dict)
    reply: Reply | None = None  # a synchronous request's: its results go there, not to the publisher
    trace: TraceParent | None = None  # the input record's W3C traceparent header (outputs continue its trace)

    @property
    def tp(self) -> TopicPartition:
        return self.receipt.tp

    @property
    def offset(self) -> int:
        return self.receipt.offset

    @property
    def source(self) -> Source:
        return Source(topic=self.tp.topic, partition=self.tp.partition, offset=self.offset,
                      timestamp_ms=self.timestamp_ms)  # fmt: skip

    @property
    def image(self) -> ImageRef:
        """Where the image can be had again: its URL, or the event's own coordinates (inline)."""
        url = self.parsed.url if self.parsed else None
        return ImageRef(url=url, inline_source=None if url else self.source, sha256=self.image_sha256,
                        bytes=self.image_bytes)  # fmt: skip


@dataclass(frozen=True)
class ReviewDraw:
    """How one decision meets the review queue, by its policy's design (recorded on its records:
    ``moderator calibrate`` bounds its estimates with it)."""

    probability: float  # that it goes to review: 1 (review decisions; flags with include_flagged), an audit rate, 0
    sampled: bool = False  # drawn as an audit sample (at ``probability``)
    second: bool = False  # drawn for a second reviewer's independent verdict (the policy's double_review)

    @property
    def goes(self) -> bool:
        return self.probability >= 1.0 or self.sampled


NO_REVIEW = ReviewDraw(0.0)


@dataclass(frozen=True)
class Decided:
    """One event's results from its batch: what its outputs are built from."""

    event: Event
    decision: Decision  # the live policy's
    timings: Timings
    decided_at: str
    embedding: np.ndarray | None  # its (driving frame's) row of the batch's embeddings, as stored (None: log off)
    shadows: tuple[Decision, ...] = ()  # the live policy's shadow policies' decisions
    review: ReviewDraw = NO_REVIEW  # how it meets the review queue (probability, audit sample, second review)
    explanation: tuple[CategoryExplanation, ...] = ()  # for the review feed: the closest texts per category
    pdq: PdqHash | None = None  # of the frame that drove the decision (a still: the image's)
    frame_embeddings: np.ndarray | None = None  # an animation or video: every sampled frame's, as stored


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
