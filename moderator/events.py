"""Wire formats: the image event in; decisions, review items and dead letters out.

Pydantic models, each with a JSON schema (``moderator schema``); every field is size-limited.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moderator.errors import ReasonError

Outcome = Literal["flag", "review", "allow"]
# The image tower's precision (MODERATOR_DTYPE as it resolved on the device, after the agreement gate).
ImagePrecision = Literal["float32", "bfloat16", "float16", "int8"]
REVIEW_PROBABILITY_DOC = (
    "the probability, by the policy's design, that this decision went to review: 1 for review decisions (and flag"
    " ones with MODERATOR_REVIEW_INCLUDE_FLAGGED), its outcome's audit rate otherwise (0: none); null in records"
    " written before it was recorded. `moderator calibrate` bounds its estimates with it"
)
SAMPLED_DOC = "it went to review as an audit sample: drawn at review_probability (fixed by the event id)"
IMAGE_PRECISION_DOC = (
    "the image tower's precision (float32, bfloat16, float16 or int8): the embedding, hence the scores, depend"
    " on it; records written before this field existed read as float32"
)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyRef(_Record):
    name: str
    version: str = Field(description="content hash of the policy's normalized form")


class BankMatch(_Record):
    """Why a bank rule fired: the image matched this entry of a known-image bank."""

    bank: str
    entry: str = Field(description="the entry's id in its bank")
    label: str = ""
    action: Outcome = Field(description="what the rule decides: flag or review; allow for a negative bank")
    negative: bool = Field(False, description="a known-benign image: its categories' rules are suppressed")
    pdq_distance: int | None = Field(None, description="Hamming distance of the PDQ hashes (of 256 bits)")
    pdq_max: int | None = Field(None, description="the rule's largest distance that matches")
    variant: str | None = Field(
        None, description="the rotation or mirror of the upload that matches the bank image (ThreatExchange's names)"
    )
    cosine: float | None = Field(None, description="cosine similarity of the CLIP embeddings")
    cosine_min: float | None = Field(None, description="the rule's smallest similarity that matches")


class Trigger(_Record):
    """A rule that fired: the category's score reached the threshold of that rule (``flag``,
    ``review``), or the image matched a known-image bank (``bank``: see ``match``; score 1)."""

    category: str
    rule: Literal["flag", "review", "bank"]
    score: float
    threshold: float
    severity: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    match: BankMatch | None = Field(None, description="rule bank: the bank entry the image matched")
    frame: int | None = Field(
        None, description="an animation or video: the sampled frame whose score (or bank match) fired the rule"
    )

    @property
    def action(self) -> Outcome:
        """The outcome this trigger asks for."""
        if self.match is not None:
            return self.match.action
        return "flag" if self.rule == "flag" else "review"


class FrameScores(_Record):
    index: int = Field(description="0-based frame number in the file (a video: in display order)")
    timestamp_ms: float = Field(description="when the frame starts to show")
    scores: dict[str, float] = Field(description="this frame's category scores")


class Frames(_Record):
    """An animation or a video, decided on sampled frames: each category's score is its maximum over
    them (``Decision.scores``), a bank entry matches when a frame does (a video: enough frames)."""

    kind: Literal["animation", "video"]
    count: int = Field(description="frames in the file (a video: its keyframes, which are what is sampled)")
    duration_ms: float
    sampled: list[FrameScores] = Field(description="the sampled frames, in display order, with their scores")
    frame: int = Field(description="the frame that drove the decision: the strongest rule's, else the highest score's")
    timestamp_ms: float = Field(description="when that frame starts to show")


class Decision(_Record):
    """The outcome for one image under one policy, with everything that produced it."""

    decision: Outcome
    scores: dict[str, float] = Field(description="every enabled category's score in [0, 1]")
    triggered: list[Trigger] = Field(description="the rules that fired, strongest first")
    policy: PolicyRef
    model: str = Field(description="model fingerprint: checkpoint id and revision, or a hash of the weights")
    image_precision: ImagePrecision = Field("float32", description=IMAGE_PRECISION_DOC)
    frames: Frames | None = Field(None, description="an animation or a video: its sampled frames (None: a still)")


# ==================================================================================================
# Input: the event envelope

MAX_ID_LENGTH = 256
MAX_METADATA_BYTES = 16 * 1024


class InputError(ReasonError):
    """An event that cannot be read."""

    reason = "invalid_event"


class InvalidJson(InputError):
    reason = "invalid_json"


class InvalidEnvelope(InputError):
    reason = "invalid_envelope"


class InvalidBase64(InputError):
    reason = "invalid_base64"


class MessageTooLarge(InputError):
    reason = "message_too_large"


class UrlImage(_Record):
    url: str = Field(min_length=1, max_length=8192)


class InlineImage(_Record):
    data: str = Field(min_length=1, description="the image bytes, base64 (standard alphabet)")


class ImageEvent(_Record):
    """``{"id": ..., "image": {"url": ...} | {"data": <base64>}, "policy": ..., "metadata": {...}}``"""

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[\x21-\x7e]+$")
    image: UrlImage | InlineImage
    policy: str | None = Field(None, min_length=1, max_length=64)
    metadata: dict[str, Any] = Field(
        default_factory=dict, description=f"passed through; at most {MAX_METADATA_BYTES} bytes"
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(v, separators=(",", ":"))) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
        return v


@dataclass(frozen=True)
class ParsedEvent:
    """An event ready for the image stage: its id, policy, metadata, and bytes or a URL."""

    id: str
    policy: str | None
    metadata: dict[str, Any]
    data: bytes | None
    url: str | None


def parse_event(key: bytes | None, value: bytes | None, raw: bool, max_bytes: int) -> ParsedEvent:
    """The envelope (JSON mode) or the raw image (raw mode: value = bytes, key = id)."""
    if value is None:
        raise InvalidEnvelope("empty message (tombstone)")
    if raw:
        if not key:
            raise InvalidEnvelope("raw mode needs the event id as the message key")
        event_id = key.decode("utf-8", errors="replace")
        if len(event_id) > MAX_ID_LENGTH:
            raise InvalidEnvelope(f"id longer than {MAX_ID_LENGTH} characters")
        if len(value) > max_bytes:
            raise MessageTooLarge(f"{len(value)} bytes exceeds the image limit of {max_bytes}")
        return ParsedEvent(event_id, None, {}, value, None)
    # base64 makes inline images 4/3 larger; allow for it and the envelope around it.
    if len(value) > max_bytes * 4 // 3 + MAX_METADATA_BYTES + 4096:
        raise MessageTooLarge(f"{len(value)} bytes exceeds the envelope limit")
    try:
        raw_obj = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJson(f"not JSON: {exc}") from None
    return parse_envelope(raw_obj)


def parse_envelope(raw_obj: Any) -> ParsedEvent:
    """A decoded JSON envelope (``{"id": ..., "image": ...}``), validated, its inline image decoded."""
    try:
        event = ImageEvent.model_validate(raw_obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidEnvelope(f"{where}: {first['msg']}" if where else first["msg"]) from None
    if isinstance(event.image, InlineImage):
        try:
            data = base64.b64decode(event.image.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidBase64(f"image.data is not valid base64: {exc}") from None
        return ParsedEvent(event.id, event.policy, event.metadata, data, None)
    return ParsedEvent(event.id, event.policy, event.metadata, None, event.image.url)


def event_id_hint(key: bytes | None, value: bytes | None) -> str | None:
    """Best-effort id of an event that failed to parse (for its dead letter)."""
    try:
        obj = json.loads(value or b"")
        event_id = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(event_id, str):
            return event_id[:MAX_ID_LENGTH]
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return key.decode("utf-8", errors="replace")[:MAX_ID_LENGTH] if key else None


# ==================================================================================================
# Output records


class Source(_Record):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = Field(None, description="the record's timestamp, when the broker keeps one")


class Timings(_Record):
    """Milliseconds spent per stage for this event."""

    queued_ms: float = Field(description="from receipt until its image stage started")
    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    preprocess_ms: float = Field(0.0, description="resize and center crop")
    pdq_ms: float = Field(0.0, description="the PDQ hash of the decoded image")
    batch_wait_ms: float = Field(0.0, description="in the micro-batcher")
    model_ms: float = Field(0.0, description="the batch's image tower time")
    score_ms: float = Field(0.0, description="the batch's policy scoring time")
    total_ms: float = Field(description="from receipt until the decision was produced")
    end_to_end_ms: float | None = Field(None, description="from the record's timestamp, when it has one")


class DecisionRecord(Decision):
    """What the decisions topic carries (key = event id)."""

    event_id: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    source: Source
    timings: Timings
    decided_at: str = Field(description="ISO 8601, UTC")
    review_probability: float | None = Field(None, ge=0.0, le=1.0, description=REVIEW_PROBABILITY_DOC)
    sampled: bool = Field(False, description=SAMPLED_DOC)
    image_sha256: str | None = Field(None, description="of the image bytes the decision judged")


class ImageRef(_Record):
    url: str | None = Field(None, description="the image URL, for URL events")
    inline_source: Source | None = Field(None, description="where the inline image can be re-read from")
    sha256: str = Field(description="of the image bytes")
    bytes: int


class TextMatch(_Record):
    text: str
    similarity: float = Field(description="cosine similarity of the image and the text's ensemble embedding")


class CategoryExplanation(_Record):
    """Why an image scored as it did in one category (what ``moderator policy explain`` prints)."""

    category: str
    score: float
    flag: float
    review: float
    rule_fired: Literal["flag", "review"] | None
    closest_descriptions: list[TextMatch]
    closest_contrasts: list[TextMatch]
    closest_neutral: list[TextMatch]


class ReviewItem(_Record):
    """What the review topic carries: what a reviewer's tool needs (key = event id).

    ``sampled`` items are audit samples: allow or flag decisions chosen at random at ``sample_rate``
    (the policy's ``audit``), so that verdicts also measure what the review band never sees. The
    item's identity is the event id *and* the image's sha256 (``handle``): an id re-used for other
    bytes is another item, and a verdict names the bytes it judged.
    """

    event_id: str
    decision: Outcome
    priority: int = Field(ge=0, le=100, description="higher first: severity weight × how far past the threshold")
    image: ImageRef
    scores: dict[str, float]
    reasons: list[Trigger]
    policy: PolicyRef
    model: str
    image_precision: ImagePrecision = Field("float32", description=IMAGE_PRECISION_DOC)
    frames: Frames | None = Field(None, description="an animation or a video: its sampled frames (the console's "
                                  "contact sheet)")  # fmt: skip
    metadata: dict[str, Any] = Field(default_factory=dict)
    source: Source
    decided_at: str
    sampled: bool = Field(False, description="an audit sample of an allow or flag decision, not a review decision")
    sample_rate: float | None = Field(None, description="the audit rate it was sampled at (sampled items)")
    explanation: list[CategoryExplanation] = Field(default_factory=list, description="per category: the closest texts")
    retroactive: bool = Field(
        False, description="found after its decision by `moderator bank scan`: it matches an entry added later"
    )
    second_review: bool = Field(
        False, description="drawn for a second, independent verdict by another reviewer (the policy's double_review)"
    )

    appeal_id: str | None = Field(None, description="an appeal of the decision (the console's appeals queue)")
    appeal_text: str | None = Field(None, description="what the user wrote in their appeal")
    appealed_at: str | None = None

    @property
    def handle(self) -> str:
        """The item's opaque name (URLs, caches, leases): its event id and image, hashed (an appeal of
        the decision is an item of its own)."""
        return item_handle(self.event_id, self.image.sha256, self.appeal_id)


def item_handle(event_id: str, sha256: str | None, appeal_id: str | None = None) -> str:
    """An item's identity as one URL-safe name: (event id, image sha256[, appeal id]), hashed."""
    appeal = f"\x00appeal\x00{appeal_id}" if appeal_id is not None else ""
    return hashlib.sha256(f"{event_id}\x00{sha256 or ''}{appeal}".encode()).hexdigest()[:32]


VerdictKind = Literal["confirm", "overturn", "escalate"]
FINAL_VERDICTS: tuple[VerdictKind, ...] = ("confirm", "overturn")  # escalate waits for one of these


class Verdict(_Record):
    """What the verdicts topic carries (key = event id; compacted). The latest record of an event id
    is its current verdict (one key, one partition: topic order is time order); ``revision`` counts
    the changes. A resubmitted identical verdict is not published again."""

    event_id: str
    verdict: VerdictKind = Field(description="confirm: a violation; overturn: allowed; escalate: for a senior")
    categories: list[str] = Field(default_factory=list, description="the confirmed categories (confirm)")
    reviewer: str = Field(description="the authenticated reviewer, never a name the browser sent")
    note: str = Field("", max_length=2000)
    revision: int = Field(1, ge=1)
    judged: Decision = Field(description="the decision this verdict judges")
    sampled: bool = False
    sample_rate: float | None = None
    retroactive: bool = Field(False, description="it judges a retroactive review item (a bank scan's finding)")
    image_sha256: str | None = Field(
        None, description="the sha256 of the image judged: the bytes the worker scored (null in older records)"
    )
    second_opinion: bool = Field(
        False, description="a second reviewer's independent verdict (double review): it never replaces the first"
    )
    role: Literal["reviewer", "lead", "admin"] | None = Field(
        None, description="the reviewer's role when they gave it (null in older records)"
    )
    assigned_to: str | None = Field(None, description="an escalation assigned to this lead (only they finalize it)")
    appeal: bool = Field(False, description="it decides a user's appeal (not a random sample: calibrate leaves it out)")
    appeal_id: str | None = None
    decided_at: str = Field(description="when the judged decision was made")
    reviewed_at: str

    @property
    def handle(self) -> str:
        return item_handle(self.event_id, self.image_sha256, self.appeal_id if self.appeal else None)

    @property
    def key(self) -> str:
        """Its key on the verdicts topic (compacted: the latest revision per key): the event id and the
        image judged, and whose opinion. Another image under the same id keeps its own verdict."""
        return f"{self.event_id}@{self.image_sha256 or ''}" + ("#second" if self.second_opinion else "")


EmbeddingDtype = Literal["float16", "float32"]


class EmbeddingRecord(_Record):
    """What the embeddings topic carries (key = event id; log-compacted: the latest record per event).

    ``vector`` is the image's L2-normalized embedding as ``dim`` little-endian values of ``dtype``,
    base64 (standard alphabet): ``np.frombuffer(base64.b64decode(vector), "<f2")`` for float16. A
    replay compares decisions only between records of one ``model`` fingerprint and ``image_precision``.
    """

    event_id: str
    model: str = Field(description="fingerprint of the model that computed the embedding")
    image_precision: ImagePrecision = Field("float32", description=IMAGE_PRECISION_DOC)
    dtype: EmbeddingDtype
    dim: int = Field(ge=1)
    vector: str = Field(description="dim little-endian values of dtype, base64 (an animation or video: the frame "
                        "that drove the live decision)")  # fmt: skip
    frame_vectors: str | None = Field(
        None, description="an animation or video: every sampled frame's embedding (live.frames.sampled order), "
        "concatenated as in vector",
    )  # fmt: skip
    source: Source
    live: Decision = Field(description="the live decision: outcome, scores, rules that fired, policy name + version")
    decided_at: str
    pdq: str | None = Field(
        None, description="the image's PDQ hash, 64 hex characters (when the worker hashes; of the driving frame)"
    )
    pdq_quality: int | None = None
    frame_pdqs: list[str | None] | None = Field(
        None, description="an animation or video: each sampled frame's PDQ hash (None: of too low a quality)"
    )
    image: ImageRef | None = Field(None, description="where the image is (for a retroactive review item)")
    review_probability: float | None = Field(None, ge=0.0, le=1.0, description=REVIEW_PROBABILITY_DOC)
    sampled: bool = Field(False, description=SAMPLED_DOC)


class ShadowDecisionRecord(_Record):
    """What the shadow-decisions topic carries (key = event id): a shadow policy's decision of an
    event beside the live one. A shadow decision never changes the live one, nor feeds the review queue."""

    event_id: str
    live: Decision
    shadow: Decision
    agree: bool = Field(description="the same outcome (flag, review or allow)")
    source: Source
    decided_at: str


def encode_vector(row: np.ndarray, dtype: EmbeddingDtype) -> str:
    """One embedding as an :class:`EmbeddingRecord` ``vector``."""
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f2" if dtype == "float16" else "<f4").tobytes()).decode()


def decode_vectors(vectors: list[str], dtype: str, dim: int) -> np.ndarray:
    """Many ``vector`` fields (of one dtype and dim) as float32 ``[N, dim]``, in one pass."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"unknown embedding dtype {dtype!r}")
    raw = b"".join(base64.b64decode(v) for v in vectors)
    values = np.frombuffer(raw, dtype="<f2" if dtype == "float16" else "<f4")
    if values.size != len(vectors) * dim:
        raise ValueError(f"expected {len(vectors)} vectors of {dim} {dtype} values, got {values.size} values")
    return values.reshape(len(vectors), dim).astype(np.float32)


def decode_frame_vectors(text: str, dtype: str, dim: int) -> np.ndarray:
    """An :class:`EmbeddingRecord` ``frame_vectors`` field as float32 ``[F, dim]``."""
    values = np.frombuffer(base64.b64decode(text), dtype="<f2" if dtype == "float16" else "<f4")
    if not values.size or values.size % dim:
        raise ValueError(f"frame_vectors of {values.size} values is not a whole number of {dim}-vectors")
    return values.reshape(-1, dim).astype(np.float32)


class DeadLetter(_Record):
    """What the dead-letter topic carries: every event that could not be decided (key = event id)."""

    event_id: str | None
    reason: str = Field(description="a stable code: invalid_json, invalid_envelope, not_an_image, url_blocked, ...")
    message: str
    source: Source
    original_value: str | None = Field(None, description="the original message value, base64, when small enough")
    original_bytes: int
    original_sha256: str
    failed_at: str


SEVERITY_WEIGHT = {"critical": 1.0, "high": 0.8, "medium": 0.6, "low": 0.4}


def review_priority(triggered: list[Trigger]) -> int:
    """0..100: the strongest trigger's severity weight times its score (flag rules rank higher)."""
    best = 0.0
    for t in triggered:
        if t.action == "allow":  # a negative bank's match asks for nothing
            continue
        weight = SEVERITY_WEIGHT.get((t.severity or "").lower(), 0.5)
        best = max(best, weight * t.score * (1.0 if t.action == "flag" else 0.8))
    return round(100 * min(1.0, best))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch_of(iso: str) -> float | None:
    """The POSIX time of an ISO 8601 stamp as records carry them (``...Z``); None when it is not one."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class PublishedPolicy(_Record):
    """What the policies topic carries: one validated policy version, as published.

    Key ``<name>@<version>``; the topic is compacted and has one partition. Compaction keeps the
    latest record of each key: every version ever published stays readable (``policy history``,
    ``policy rollback``), with its latest publication. The live version of a policy is its last record
    in the topic (one partition: one order); a rollback publishes an earlier version's record again.
    """

    name: str
    version: str = Field(description="the content hash of the normalized policy")
    yaml: str = Field(description="the file as written: comments and layout kept")
    spec: dict[str, Any] = Field(description="the normalized policy, as validated")
    author: str
    published_at: str
    message: str = ""
    action: Literal["publish", "rollback"] = "publish"
    replaces: str | None = Field(None, description="the version that was live before")


class BankEntry(_Record):
    """What the banks topic carries: one known image of a bank (key ``<bank>/<id>``; compacted).

    A record with no value (a tombstone) under the key removes the entry. An entry has a PDQ hash,
    a CLIP embedding, or both; an embedding matches only on workers serving its ``model``.
    """

    bank: str
    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[\x21-\x7e]+$")
    pdq: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="PDQ hash, 64 lowercase hex characters")
    pdq_quality: int | None = Field(None, ge=0, le=100)
    embedding: str | None = Field(None, description="L2-normalized CLIP embedding: dim little-endian float16, base64")
    dim: int | None = Field(None, ge=1)
    model: str | None = Field(None, description="fingerprint of the model that computed the embedding")
    label: str = Field("", max_length=500)
    source: str = Field(description="where it came from: image:<file>, csv:<file>, verdict:<event id>, ...")
    added_by: str
    added_at: str

    @property
    def key(self) -> str:
        return f"{self.bank}/{self.id}"


class Appeal(_Record):
    """What the appeals topic carries (key = event id): a user asks for a decision to be looked at again.
    ``decision`` is the decision record as the platform received it (its image is read back from its
    ``source``, and must still have its ``image_sha256``)."""

    appeal_id: str = Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
    event_id: str
    decision: DecisionRecord
    text: str = Field("", max_length=5000, description="the user's own words")
    appealed_at: str = Field(default_factory=utc_now)

    def review_item(self) -> ReviewItem:
        """The appeal as an item of the console's appeals queue: the decision, its image read back from
        the event's coordinates, first in line."""
        d = self.decision
        return ReviewItem(
            event_id=self.event_id, decision=d.decision, priority=100, scores=d.scores, reasons=d.triggered,
            image=ImageRef(inline_source=d.source, sha256=d.image_sha256 or "", bytes=0), policy=d.policy,
            model=d.model, image_precision=d.image_precision, metadata=d.metadata, source=d.source,
            decided_at=d.decided_at, appeal_id=self.appeal_id, appeal_text=self.text, appealed_at=self.appealed_at,
        )  # fmt: skip


class AppealDecision(_Record):
    """What the appeal-decisions topic carries (key = event id): a lead's answer, for the platform."""

    appeal_id: str
    event_id: str
    outcome: Literal["upheld", "overturned"]
    decision: Outcome = Field(description="the decision appealed")
    categories: list[str] = Field(default_factory=list, description="the violated categories (upheld)")
    reviewer: str
    note: str = ""
    appealed_at: str
    decided_at: str = Field(description="when the appeal was decided")


# The record of each topic of the registry (``moderator/topics.py`` names them).
RECORDS: dict[str, type[BaseModel]] = {
    "ImageEvent": ImageEvent,
    "DecisionRecord": DecisionRecord,
    "ReviewItem": ReviewItem,
    "DeadLetter": DeadLetter,
    "EmbeddingRecord": EmbeddingRecord,
    "ShadowDecisionRecord": ShadowDecisionRecord,
    "Verdict": Verdict,
    "PublishedPolicy": PublishedPolicy,
    "BankEntry": BankEntry,
    "Appeal": Appeal,
    "AppealDecision": AppealDecision,
}


def schemas() -> dict[str, dict[str, Any]]:
    """JSON schemas of the input envelope and every output record (``moderator schema``)."""
    return {name: model.model_json_schema() for name, model in RECORDS.items()}
