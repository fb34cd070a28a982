"""Policies: the file format, compilation into one text matrix, batch scoring, decisions, reload.

A policy file (YAML) names categories in plain language: what each looks like (descriptions),
benign look-alikes (contrasts), and thresholds. Scoring, for an image embedding ``x`` and each
category ``c`` (all embeddings L2-normalized, ``s`` the model's logit scale)::

    candidates(c) = descriptions(c) ∪ contrasts(c) ∪ neutral        (each an ensemble over templates)
    p_j           = exp(s·cos(x, t_j)) / Σ_{k ∈ candidates(c)} exp(s·cos(x, t_k))
    score(c)      = Σ_{j ∈ descriptions(c)} p_j

i.e. the softmax probability mass the category's descriptions take in its own candidate set: the
reference zero-shot pipeline's probability when the candidate set is the same. Decision: ``flag``
if any enabled category reaches its flag threshold, else ``review`` if any reaches its review
threshold, else ``allow``.

The pure part (schema, :func:`score_logits`, :func:`decide`) needs no model; :func:`compile_policy`
needs a :class:`~moderator.embedding_cache.TextEncoder`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moderator.events import Decision, PolicyRef, Trigger
from moderator.observability import POLICY_RELOADS, STAGE_SECONDS, get_logger

if TYPE_CHECKING:
    from moderator.embedding_cache import TextEncoder

log = get_logger(__name__)

POLICY_SUFFIXES = (".yaml", ".yml")
NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


# ==================================================================================================
# The file format


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Category(_Strict):
    name: str = Field(pattern=NAME_RE, description="machine name, e.g. weapons")
    descriptions: list[str] = Field(min_length=1, description="what it looks like, in plain language")
    contrasts: list[str] = Field(default_factory=list, description="benign look-alikes scored against it")
    flag: float = Field(ge=0.0, le=1.0, description="flag when the score reaches this")
    review: float = Field(ge=0.0, le=1.0, description="send to review when the score reaches this")
    severity: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="passed through to decisions")
    enabled: bool = True

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


class PolicySpec(_Strict):
    name: str = Field(pattern=NAME_RE)
    description: str | None = None
    owner: str | None = None
    model: str | None = Field(None, description="pin: only a worker serving this checkpoint may load it")
    templates: list[str] = Field(default_factory=lambda: ["a photo of {}."], min_length=1)
    neutral: list[str] = Field(default_factory=list, description="ordinary content every category is scored against")
    categories: list[Category] = Field(min_length=1)

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
        return self

    def version(self) -> str:
        """Content hash of the normalized form: comments, key order and layout do not change it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
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


class PolicyError(Exception):
    """A policy file is invalid. ``errors`` lists (file, field path, reason)."""

    def __init__(self, errors: list[tuple[str, str, str]]) -> None:
        self.errors = errors
        super().__init__(
            "\n".join(f"{f}: {path}: {reason}" if path else f"{f}: {reason}" for f, path, reason in errors)
        )


class UnknownPolicy(LookupError):
    reason = "unknown_policy"


def load_spec(path: Path) -> PolicySpec:
    """Read and validate one policy file; :class:`PolicyError` names file, field path and reason."""
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError([(where, "", f"cannot read: {exc.strerror or exc}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([(where, "", f"invalid YAML: {at}{problem}")]) from None
    except UnicodeDecodeError:
        raise PolicyError([(where, "", "not UTF-8 text")]) from None
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


# ==================================================================================================
# Scoring and rules (pure)


@dataclass(frozen=True)
class ScoringTables:
    """Index arrays over the policy's prompt list: which prompts each category counts and compares."""

    positive: torch.Tensor  # bool [C, P]: the category's descriptions
    candidates: torch.Tensor  # bool [C, P]: descriptions ∪ contrasts ∪ neutral


def build_tables(spec: PolicySpec) -> tuple[list[str], ScoringTables]:
    """The policy's unique texts (descriptions, contrasts, neutral) and its index tables."""
    texts: list[str] = []
    index: dict[str, int] = {}
    for text in [t for c in spec.categories for t in (*c.descriptions, *c.contrasts)] + list(spec.neutral):
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
    enabled = [c for c in spec.categories if c.enabled]
    positive = torch.zeros((len(enabled), len(texts)), dtype=torch.bool)
    candidates = torch.zeros_like(positive)
    neutral = [index[t] for t in spec.neutral]
    for i, c in enumerate(enabled):
        pos = [index[t] for t in c.descriptions]
        positive[i, pos] = True
        candidates[i, pos + [index[t] for t in c.contrasts] + neutral] = True
    return texts, ScoringTables(positive, candidates)


def score_logits(logits: torch.Tensor, tables: ScoringTables) -> torch.Tensor:
    """Per-category scores ``[B, C]`` from logits ``[B, P]`` (= logit_scale · cos), in float64.

    score = exp(logsumexp(logits over descriptions) - logsumexp(logits over candidates)):
    the softmax mass of the descriptions within the category's candidate set, computed stably.
    """
    lg = logits.double().unsqueeze(1)  # [B, 1, P]
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=lg.device)
    pos = torch.where(tables.positive.to(lg.device), lg, neg_inf).logsumexp(-1)
    cand = torch.where(tables.candidates.to(lg.device), lg, neg_inf).logsumexp(-1)
    return (pos - cand).exp().clamp(0.0, 1.0)


def decide_batch(scores: np.ndarray, flag: np.ndarray, review: np.ndarray) -> np.ndarray:
    """Outcome codes per row: 2 = flag, 1 = review, 0 = allow (vectorized rule)."""
    flagged = (scores >= flag).any(axis=1)
    reviewed = (scores >= review).any(axis=1)
    return np.where(flagged, 2, np.where(reviewed, 1, 0))


OUTCOMES = ("allow", "review", "flag")


# ==================================================================================================
# Compiled policies


@dataclass(frozen=True)
class CompiledPolicy:
    spec: PolicySpec
    version: str
    source: str
    model: str  # fingerprint of the model the matrix was built with
    texts: list[str]  # one per column of the matrix: descriptions, contrasts, neutral
    matrix: torch.Tensor  # [D, P] float32 on the engine device: ensemble text embeddings
    tables: ScoringTables
    categories: list[str]  # enabled categories, in table order
    flag: np.ndarray  # [C]
    review: np.ndarray  # [C]
    logit_scale: float

    @property
    def ref(self) -> PolicyRef:
        return PolicyRef(name=self.spec.name, version=self.version)

    def scores(self, image_embeds: torch.Tensor) -> np.ndarray:
        """``[B, C]`` category scores for L2-normalized image embeddings ``[B, D]``: one matrix product."""
        logits = self.logit_scale * (image_embeds.float() @ self.matrix)
        return score_logits(logits, self.tables).cpu().numpy()

    def decisions(self, image_embeds: torch.Tensor) -> list[Decision]:
        t0 = time.perf_counter()
        out = self.decide(self.scores(image_embeds))
        STAGE_SECONDS.labels(stage="score").observe(time.perf_counter() - t0)
        return out

    def decide(self, scores: np.ndarray) -> list[Decision]:
        codes = decide_batch(scores, self.flag, self.review)
        ref = self.ref
        enabled = [c for c in self.spec.categories if c.enabled]
        flagged = scores >= self.flag  # [B, C], vectorized; Python only visits the rules that fired
        fired = flagged | (scores >= self.review)
        out = []
        for i, (row, code) in enumerate(zip(scores.tolist(), codes.tolist(), strict=True)):
            triggered = []
            for j in np.flatnonzero(fired[i]).tolist():
                c = enabled[j]
                rule, threshold = ("flag", c.flag) if flagged[i, j] else ("review", c.review)
                triggered.append(Trigger(category=c.name, rule=rule, score=row[j], threshold=threshold,
                                         severity=c.severity, labels=c.labels))  # fmt: skip
            triggered.sort(key=lambda t: (t.rule != "flag", -t.score))
            out.append(
                Decision(
                    decision=OUTCOMES[code],  # type: ignore[arg-type]
                    scores=dict(zip(self.categories, row, strict=True)),
                    triggered=triggered,
                    policy=ref,
                    model=self.model,
                )
            )
        return out


def compile_policy(spec: PolicySpec, encoder: TextEncoder, source: str = "<memory>") -> CompiledPolicy:
    """Encode the policy's prompts (through the cache: only unseen ones run) into one matrix."""
    engine = encoder.engine
    if spec.model is not None and spec.model != engine.model_id:
        raise PolicyError(
            [(source, "model", f"policy is pinned to {spec.model!r}, this worker serves {engine.model_id!r}")]
        )
    texts, _ = build_tables(spec)
    vectors = encoder.encode_ensembles([[t.replace("{}", text) for t in spec.templates] for text in texts])
    return assemble(spec, vectors, engine.logit_scale, engine.fingerprint, engine.device, source)


def assemble(
    spec: PolicySpec,
    vectors: np.ndarray,
    logit_scale: float,
    model: str,
    device: torch.device | str = "cpu",
    source: str = "<memory>",
) -> CompiledPolicy:
    """A compiled policy from one L2-normalized vector per text of :func:`build_tables` (pure)."""
    texts, tables = build_tables(spec)
    if vectors.shape[0] != len(texts):
        raise ValueError(f"expected {len(texts)} text vectors, got {vectors.shape[0]}")
    enabled = [c for c in spec.categories if c.enabled]
    return CompiledPolicy(
        spec=spec,
        version=spec.version(),
        source=source,
        model=model,
        texts=texts,
        matrix=torch.from_numpy(np.ascontiguousarray(vectors.T, dtype=np.float32)).to(device),
        tables=ScoringTables(tables.positive.to(device), tables.candidates.to(device)),
        categories=[c.name for c in enabled],
        flag=np.array([c.flag for c in enabled], dtype=np.float64),
        review=np.array([c.review for c in enabled], dtype=np.float64),
        logit_scale=float(logit_scale),
    )


# ==================================================================================================
# A set of policies, and its reloader


@dataclass(frozen=True)
class PolicySet:
    """An immutable snapshot: a batch takes one and scores with it from start to end."""

    policies: dict[str, CompiledPolicy]
    default: str | None

    def get(self, name: str | None) -> CompiledPolicy:
        key = name or self.default
        if key is None:
            raise UnknownPolicy("the event names no policy and no default policy is configured")
        try:
            return self.policies[key]
        except KeyError:
            raise UnknownPolicy(f"no policy named {key!r} (known: {', '.join(sorted(self.policies))})") from None


@dataclass
class _FileState:
    stamp: tuple[int, int, int]  # (mtime_ns, size, inode)
    policy: CompiledPolicy | None  # last good
    error: str | None = None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _scan(directory: Path) -> dict[Path, tuple[int, int, int]]:
    out = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return {}
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(POLICY_SUFFIXES):
            continue
        path = Path(entry.path)
        stamp = _stamp(path)
        if stamp is not None and path.is_file():
            out[path] = stamp
    return out


class PolicyRegistry:
    """Loads a policy directory, keeps the current :class:`PolicySet`, and reloads it on change.

    ``current`` is swapped atomically (one reference assignment). Per file: a valid edit goes live;
    an invalid one is logged with file and reason, counted, and the file's last good version keeps
    serving. :meth:`start` runs :meth:`refresh` on a background thread every ``interval_s``.
    """

    def __init__(
        self,
        directory: Path,
        compile_fn: Callable[[PolicySpec, str], CompiledPolicy],
        default: str | None = None,
        interval_s: float = 0.5,
    ) -> None:
        self.directory = Path(directory)
        self.compile_fn = compile_fn
        self.default_name = default
        self.interval_s = interval_s
        self._files: dict[Path, _FileState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current = PolicySet({}, None)
        self.generation = 0

    def load_initial(self) -> PolicySet:
        """First load: every file must be valid, else :class:`PolicyError` listing every problem."""
        if not self.directory.is_dir():
            raise PolicyError([(str(self.directory), "", "policy directory does not exist")])
        errors: list[tuple[str, str, str]] = []
        for path, stamp in sorted(_scan(self.directory).items()):
            try:
                compiled = self.compile_fn(load_spec(path), str(path))
            except PolicyError as exc:
                errors.extend(exc.errors)
                continue
            self._files[path] = _FileState(stamp, compiled)
        if not self._files and not errors:
            errors.append((str(self.directory), "", "no policy files (*.yaml, *.yml)"))
        policies = self._policies(errors)
        if errors:
            raise PolicyError(errors)
        self._swap(policies)
        return self.current

    def _policies(self, errors: list[tuple[str, str, str]]) -> dict[str, CompiledPolicy]:
        policies: dict[str, CompiledPolicy] = {}
        for path, state in sorted(self._files.items()):
            if state.policy is None:
                continue
            name = state.policy.spec.name
            if name in policies:
                errors.append((str(path), "name", f"policy {name!r} is already defined in {policies[name].source}"))
                continue
            policies[name] = state.policy
        if self.default_name is not None and self.default_name not in policies:
            errors.append((str(self.directory), "", f"default policy {self.default_name!r} is not defined"))
        return policies

    def _swap(self, policies: dict[str, CompiledPolicy]) -> None:
        default = self.default_name or (next(iter(policies)) if len(policies) == 1 else None)
        self.current = PolicySet(policies, default)
        self.generation += 1

    def refresh(self) -> bool:
        """Look for added, changed and removed files; apply what is valid. True if anything changed."""
        with self._lock:
            seen = _scan(self.directory)
            changed = False
            for path in [p for p in self._files if p not in seen]:
                log.info("policy_removed", file=str(path))
                del self._files[path]
                changed = True
            for path, stamp in sorted(seen.items()):
                state = self._files.get(path)
                if state is not None and state.stamp == stamp:
                    continue
                try:
                    spec = load_spec(path)
                    if state is not None and state.policy is not None and state.policy.version == spec.version():
                        self._files[path] = _FileState(stamp, state.policy)
                        continue
                    compiled = self.compile_fn(spec, str(path))
                except PolicyError as exc:
                    POLICY_RELOADS.labels(result="error").inc()
                    log.error(
                        "policy_invalid",
                        file=str(path),
                        errors=[f"{p}: {r}" if p else r for _, p, r in exc.errors],
                        action="keeping the last good version" if state and state.policy else "not loaded",
                    )
                    self._files[path] = _FileState(stamp, state.policy if state else None, str(exc))
                    continue
                except Exception as exc:  # compile failed for another reason (e.g. the model): same rule
                    POLICY_RELOADS.labels(result="error").inc()
                    log.exception("policy_compile_failed", file=str(path), error=str(exc))
                    self._files[path] = _FileState(stamp, state.policy if state else None, str(exc))
                    continue
                self._files[path] = _FileState(stamp, compiled)
                POLICY_RELOADS.labels(result="ok").inc()
                log.info("policy_loaded", file=str(path), policy=compiled.spec.name, version=compiled.version)
                changed = True
            if changed:
                errors: list[tuple[str, str, str]] = []
                policies = self._policies(errors)
                for f, p, r in errors:
                    log.error("policy_conflict", file=f, field=p, reason=r)
                self._swap(policies)
            return changed

    def start(self) -> PolicyRegistry:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.refresh()
                except Exception:
                    log.exception("policy_reload_loop_error")

        self._thread = threading.Thread(target=loop, name="policy-reloader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def explain(policy: CompiledPolicy, image_embed: torch.Tensor, top: int = 3) -> dict[str, Any]:
    """Why an image scored as it did: per category, score, thresholds, closest texts, the rule."""
    sims = (image_embed.float().reshape(1, -1) @ policy.matrix).reshape(-1).cpu().numpy()
    scores = policy.scores(image_embed.reshape(1, -1))[0]
    decision = policy.decide(scores[None])[0]
    index = {t: i for i, t in enumerate(policy.texts)}
    cats = []
    for j, c in enumerate([c for c in policy.spec.categories if c.enabled]):
        s = float(scores[j])
        rule = "flag" if s >= c.flag else "review" if s >= c.review else None

        def closest(texts: list[str]) -> list[dict[str, Any]]:
            ranked = sorted(texts, key=lambda t: -sims[index[t]])[:top]
            return [{"text": t, "similarity": round(float(sims[index[t]]), 6)} for t in ranked]

        cats.append(
            {
                "category": c.name,
                "score": s,
                "flag": c.flag,
                "review": c.review,
                "rule_fired": rule,
                "closest_descriptions": closest(c.descriptions),
                "closest_contrasts": closest(c.contrasts),
                "closest_neutral": closest(list(policy.spec.neutral)),
            }
        )
    return {
        "decision": decision.decision,
        "policy": decision.policy.model_dump(),
        "model": decision.model,
        "logit_scale": policy.logit_scale,
        "categories": cats,
    }
