"""OpenAI's moderation API (``POST /v1/moderations``) in moderator's terms, pure: request to image events,
decision records to results.

- ``input`` is a list of ``{"type": "image_url", "image_url": {"url": ...}}`` (one such object alone is
  taken too); the URL is fetched through the SSRF-safe fetcher, or is a ``data:`` URL (base64 or
  percent-encoded) whose bytes are the image. Text inputs are refused (``invalid_envelope``): CLIP
  policies judge images.
- ``model`` names the policy; OpenAI's own model names (``omni-moderation-*``, ``text-moderation-*``)
  and none at all mean the default policy.
- Each result: ``category_scores`` are the policy's category scores, ``categories[c]`` is true when a
  rule of ``c`` fired (flag, review or a bank match), ``flagged`` is true unless the decision is
  ``allow``; moderator's own fields ride along (``decision``, ``event_id``, ``policy``, ``model``),
  which OpenAI's clients keep as extra attributes.
- Event ids: the request's id (``Idempotency-Key`` or ``X-Request-Id``, else a new ``modr-...``) for
  one input, ``<id>:<index>`` for several.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moderator.events import MAX_ID_LENGTH, DecisionRecord, InvalidBase64, InvalidEnvelope, ParsedEvent

OPENAI_MODEL_PREFIXES = ("omni-moderation", "text-moderation")


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ImageUrl(_Open):
    url: str = Field(min_length=1, max_length=8192 * 1024, description="https URL or data: URL of the image")


class ImageUrlInput(_Open):
    type: Literal["image_url"]
    image_url: ImageUrl


class ModerationRequest(_Open):
    """The OpenAI request body: ``{"model": ..., "input": [{"type": "image_url", "image_url": {"url": ...}}]}``."""

    input: list[ImageUrlInput] | ImageUrlInput = Field(description="images only; text inputs are refused")
    model: str | None = Field(None, max_length=128, description="the policy's name (OpenAI's model names: the default)")


class ModerationResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    flagged: bool = Field(description="the decision is flag or review")
    categories: dict[str, bool] = Field(description="per policy category: a rule of it fired")
    category_scores: dict[str, float] = Field(description="per policy category: its score in [0, 1]")
    category_applied_input_types: dict[str, list[Literal["image"]]]
    decision: Literal["flag", "review", "allow"]
    event_id: str
    policy: dict[str, str] = Field(description="name and version")
    model: str = Field(description="the model fingerprint")


class ModerationResponse(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    model: str = Field(description="the policy that decided")
    results: list[ModerationResult]


def request_id(headers: dict[str, str]) -> str:
    """The caller's id for the request (its images' event ids), or a new one."""
    for name in ("idempotency-key", "x-request-id"):
        value = headers.get(name, "").strip()
        if value:
            if len(value) > MAX_ID_LENGTH - 8 or not all(0x21 <= ord(c) <= 0x7E for c in value):
                raise InvalidEnvelope(f"{name}: printable ASCII without spaces, at most {MAX_ID_LENGTH - 8} characters")
            return value
    return f"modr-{uuid.uuid4().hex}"


def policy_name(model: str | None) -> str | None:
    """The policy ``model`` names (None: the default)."""
    if model is None or not model.strip() or model.startswith(OPENAI_MODEL_PREFIXES):
        return None
    return model


def parse_request(body: Any) -> ModerationRequest:
    if isinstance(body, dict) and isinstance(body.get("input"), (str, list)):
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if any(isinstance(i, str) or (isinstance(i, dict) and i.get("type") == "text") for i in items):
            raise InvalidEnvelope("input: text inputs are not supported (send image_url inputs)")
    try:
        return ModerationRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidEnvelope(f"{where}: {first['msg']}" if where else first["msg"]) from None


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URL."""
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidEnvelope("data URL without a comma")
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise InvalidEnvelope(f"data URL larger than the image limit of {max_bytes} bytes")
    if head.lower().endswith(";base64"):
        try:
            return base64.b64decode(urllib.parse.unquote(payload), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidBase64(f"data URL is not valid base64: {exc}") from None
    return urllib.parse.unquote_to_bytes(payload)


def events(request: ModerationRequest, base_id: str, max_bytes: int) -> list[ParsedEvent]:
    """One image event per input, ready for the image stage (data URLs decoded, other URLs to fetch)."""
    inputs = request.input if isinstance(request.input, list) else [request.input]
    if not inputs:
        raise InvalidEnvelope("input: at least one image")
    policy = policy_name(request.model)
    out = []
    for i, item in enumerate(inputs):
        event_id = base_id if len(inputs) == 1 else f"{base_id}:{i}"
        url = item.image_url.url
        if url[:5].lower() == "data:":
            out.append(ParsedEvent(event_id, policy, {}, decode_data_url(url, max_bytes), None))
        else:
            out.append(ParsedEvent(event_id, policy, {}, None, url))
    return out


def result(record: DecisionRecord) -> ModerationResult:
    fired = {t.category for t in record.triggered}
    return ModerationResult(
        flagged=record.decision != "allow",
        categories={c: c in fired for c in record.scores},
        category_scores=dict(record.scores),
        category_applied_input_types={c: ["image"] for c in record.scores},
        decision=record.decision,
        event_id=record.event_id,
        policy={"name": record.policy.name, "version": record.policy.version},
        model=record.model,
    )


def response(request_id: str, records: list[DecisionRecord]) -> ModerationResponse:
    return ModerationResponse(
        id=request_id,
        model=records[0].policy.name if records else "",
        results=[result(r) for r in records],
    )
