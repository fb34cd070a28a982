"""The policy file format: a strict schema, validation errors with file and field, versions."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moderator.banks.pdq import MATCH_DISTANCE
from moderator.errors import ReasonError
from moderator.observability import get_logger

log = get_logger(__name__)

POLICY_SUFFIXES = (".yaml", ".yml")
NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Target(_Strict):
    """What ``moderator calibrate`` aims for in a category when no flag says otherwise."""

    precision: float | None = Field(None, gt=0.0, lt=1.0, description="of flag decisions: the flag threshold")
    recall: float | None = Field(None, gt=0.0, lt=1.0, description="of flag-or-review: the review threshold")


class Category(_Strict):
    name: str = Field(pattern=NAME_RE, description="machine name, e.g. weapons")
    descriptions: list[str] = Field(min_length=1, description="what it looks like, in plain language")
    contrasts: list[str] = Field(default_factory=list, description="benign look-alikes scored against it")
    flag: float = Field(ge=0.0, le=1.0, description="flag when the score reaches this")
    review: float = Field(ge=0.0, le=1.0, description="send to review when the score reaches this")
    severity: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="passed through to decisions")
    enabled: bool = True
    target: Target | None = Field(None, description="calibration targets (moderator calibrate)")

    @field_validator("descriptions", "contrasts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        return _clean_texts(v)

    @model_validator(mode="after")
    def _thresholds(self) -> Category:
        if self.review > self.flag:
            raise ValueError(f"review threshold {self.review} must not exceed flag threshold {self.flag}")
        overlap = set(self.descriptions) & set(self.contrasts)
        if overlap:
            raise ValueError(f"texts both description and contrast: {sorted(overlap)}")
        return self


class Audit(_Strict):
    """Audit sampling: this fraction of allow and of flag decisions also goes to review, marked sampled."""

    allow: float = Field(0.0, ge=0.0, le=1.0)
    flag: float = Field(0.0, ge=0.0, le=1.0)

    def rate(self, outcome: str) -> float:
        return self.allow if outcome == "allow" else self.flag if outcome == "flag" else 0.0


class BankRule(_Strict):
    """Decide by a known-image bank: an image that matches one of its entries triggers this rule.

    A match is a PDQ hash within ``pdq_distance`` bits (null: no PDQ matching) or a CLIP embedding
    at least ``cosine`` similar (null, the default: no embedding matching; set it per checkpoint,
    after looking at what it matches). A ``negative`` bank holds known-benign images: a match
    suppresses every rule of its ``categories`` (their thresholds and positive banks) for that image.
    """

    name: str = Field(pattern=NAME_RE, description="the bank (moderator bank list)")
    negative: bool = False
    decision: Literal["flag", "review"] = Field("flag", description="what a match decides (positive banks)")
    category: str | None = Field(None, description="the category a match is reported under (default: the bank)")
    categories: list[str] = Field(default_factory=list, description="negative: the categories it suppresses")
    pdq_distance: int | None = Field(MATCH_DISTANCE, ge=0, le=128, description="largest PDQ Hamming distance")
    cosine: float | None = Field(None, gt=0.0, le=1.0, description="smallest embedding cosine similarity")
    severity: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind(self) -> BankRule:
        if self.pdq_distance is None and self.cosine is None:
            raise ValueError("a bank rule needs pdq_distance or cosine (or both)")
        if self.negative:
            if not self.categories:
                raise ValueError("a negative bank names the categories it suppresses (categories: [...])")
            extra = {"decision", "category", "severity"} & self.model_fields_set
            if extra:
                raise ValueError(f"a negative bank decides nothing itself: remove {sorted(extra)}")
        elif self.categories:
            raise ValueError("categories is for negative banks; a positive bank reports under one category")
        return self

    @property
    def reported_category(self) -> str:
        return self.category or self.name


def audit_draw(event_id: str, purpose: str = "audit") -> float:
    """A uniform number in [0, 1) fixed by the event id (and ``purpose``: the audit draw, the double
    review draw): an event is drawn when it is below the rate, so the same event (a replay, a
    re-delivery) is drawn the same way every time, and the draws of two purposes are independent."""
    digest = hashlib.sha256(f"moderator-{purpose}:".encode() + event_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class PolicySpec(_Strict):
    name: str = Field(pattern=NAME_RE)
    description: str | None = None
    owner: str | None = None
    model: str | None = Field(None, description="pin: only a worker serving this checkpoint may load it")
    default: bool = Field(False, description="decides events that name no policy (MODERATOR_DEFAULT_POLICY wins)")
    audit: Audit | None = Field(None, description="audit sampling rates of allow and flag decisions")
    double_review: float = Field(
        0.0, ge=0.0, le=1.0,
        description="the share of review items that also get a second reviewer's independent verdict (agreement)",
    )  # fmt: skip
    shadow_of: str | None = Field(
        None,
        pattern=NAME_RE,
        description="a shadow: decides every event of this live policy beside it, published apart, never live",
    )
    templates: list[str] = Field(default_factory=lambda: ["a photo of {}."], min_length=1)
    neutral: list[str] = Field(default_factory=list, description="ordinary content every category is scored against")
    categories: list[Category] = Field(min_length=1)
    banks: list[BankRule] = Field(default_factory=list, description="known-image banks this policy decides by")

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        v = _clean_texts(v)
        for t in v:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one {{}}")
        return v

    @field_validator("neutral")
    @classmethod
    def _neutral(cls, v: list[str]) -> list[str]:
        return _clean_texts(v)

    @model_validator(mode="after")
    def _unique(self) -> PolicySpec:
        names = [c.name for c in self.categories]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate category names: {dupes}")
        if not any(c.enabled for c in self.categories):
            raise ValueError("every category is disabled")
        if self.shadow_of is not None and self.default:
            raise ValueError("a shadow policy cannot be the default: it never decides an event")
        if self.shadow_of == self.name:
            raise ValueError("a policy cannot be its own shadow")
        known = set(names)
        for rule in self.banks:
            unknown = sorted(set(rule.categories) - known)
            if unknown:
                raise ValueError(f"bank {rule.name!r}: no categories {unknown} in this policy")
        rules = [(r.name, r.negative) for r in self.banks]
        if len(set(rules)) != len(rules):
            raise ValueError("a bank is named twice with the same role (positive or negative)")
        return self

    @property
    def max_pdq_distance(self) -> int | None:
        """The widest PDQ rule (None: no PDQ matching); the index is searched once for all rules."""
        return max((r.pdq_distance for r in self.banks if r.pdq_distance is not None), default=None)

    @property
    def min_cosine(self) -> float | None:
        return min((r.cosine for r in self.banks if r.cosine is not None), default=None)

    def version(self) -> str:
        """Content hash of the normalized form: comments, key order and layout do not change it.

        ``default``, ``shadow_of``, ``audit`` and ``double_review`` are left out: they say which events
        the policy serves and which of its decisions are also sampled for review, not how it decides
        them; nor are the categories' calibration ``target``s. ``banks`` counts when it has rules (so policies without
        any keep the versions they had before banks).
        """
        exclude: dict[str, Any] = {"default": True, "shadow_of": True, "audit": True, "double_review": True,
                                   "categories": {"__all__": {"target"}}}  # fmt: skip
        if not self.banks:
            exclude["banks"] = True
        normalized = self.model_dump(mode="json", exclude=exclude)
        canonical = json.dumps(normalized, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _clean_texts(v: list[str]) -> list[str]:
    out = []
    for text in v:
        text = re.sub(r"\s+", " ", text).strip()
        if not text:
            raise ValueError("empty text")
        out.append(text)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate texts: {sorted({t for t in out if out.count(t) > 1})}")
    return out


class Problem(NamedTuple):
    """One thing wrong with a policy file: where, and why."""

    file: str
    field: str  # a readable path such as categories[0](weapons).flag; "" for the whole file
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.reason}" if self.field else f"{self.file}: {self.reason}"


class PolicyError(Exception):
    """A policy file (or set of files) is invalid; ``errors`` lists every :class:`Problem`."""

    def __init__(self, errors: Sequence[tuple[str, str, str]]) -> None:
        self.errors = [Problem(*e) for e in errors]
        super().__init__("\n".join(map(str, self.errors)))


class UnknownPolicy(ReasonError):
    """An event names a policy that is not loaded (or names none, and there is no default)."""

    reason = "unknown_policy"


def load_spec(path: Path) -> PolicySpec:
    """Read and validate one policy file; :class:`PolicyError` names file, field path and reason."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([(str(path), "", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise PolicyError([(str(path), "", "not UTF-8 text")]) from None
    return parse_spec(text, str(path))


def parse_spec(text: str, where: str) -> PolicySpec:
    """Validate a policy's YAML text (a file's, or one published to the policies topic)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([(where, "", f"invalid YAML: {at}{problem}")]) from None
    if not isinstance(raw, dict):
        raise PolicyError([(where, "", f"expected a mapping at the top level, got {type(raw).__name__}")])
    try:
        return PolicySpec.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError([(where, _loc(e["loc"], raw), e["msg"]) for e in exc.errors()]) from None


def _loc(loc: Sequence[Any], raw: Any) -> str:
    """pydantic's location as a readable path; category indices get the category's name too."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            name = node[item].get("name") if isinstance(node, list) and isinstance(node[item], dict) else None
            parts[-1] = f"{parts[-1]}[{item}]" + (f"({name})" if name else "") if parts else f"[{item}]"
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts)


def policy_files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(c for c in p.iterdir() if c.suffix in POLICY_SUFFIXES and c.is_file()))
        else:
            out.append(p)
    return out
