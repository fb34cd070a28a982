"""Scoring and rules: the text matrix, batch scores, decisions, and why an image scored as it did."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moderator.banks.index import Hit
from moderator.events import (
    BankMatch,
    CategoryExplanation,
    Decision,
    Frames,
    FrameScores,
    ImagePrecision,
    Outcome,
    PolicyRef,
    TextMatch,
    Trigger,
)
from moderator.frames import FrameSet, frame_maxima, merge_hits
from moderator.observability import STAGE_SECONDS, get_logger
from moderator.policy.spec import BankRule, PolicyError, PolicySpec

if TYPE_CHECKING:
    from moderator.embedding_cache import TextEncoder

log = get_logger(__name__)


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


OUTCOMES: tuple[Outcome, ...] = ("allow", "review", "flag")  # by outcome code


def apply_banks(rules: Sequence[BankRule], hits: Sequence[Hit], triggered: list[Trigger]) -> tuple[list[Trigger], int]:
    """One image's triggers and outcome code once its bank hits are applied (pure).

    A hit fires each rule of its bank whose thresholds it meets: a positive rule adds a ``bank``
    trigger with the rule's decision; a negative rule adds one that decides nothing and removes every
    other trigger of its categories. The outcome is the strongest action left.
    """
    fired: list[Trigger] = []
    suppressed: set[str] = set()
    for rule in rules:
        matches = [m for hit in hits if hit.entry.bank == rule.name and (m := _match(rule, hit)) is not None]
        if not matches:
            continue
        # The closest entry: the smallest PDQ distance, then the highest similarity.
        match = min(matches, key=lambda m: (m.pdq_distance if m.pdq_distance is not None else 999, -(m.cosine or 0)))
        if rule.negative:
            suppressed.update(rule.categories)
            fired += [Trigger(category=c, rule="bank", score=1.0, threshold=1.0, labels=rule.labels, match=match)
                      for c in rule.categories]  # fmt: skip
        else:
            fired.append(Trigger(category=rule.reported_category, rule="bank", score=1.0, threshold=1.0,
                                 severity=rule.severity, labels=rule.labels, match=match))  # fmt: skip
    kept = [t for t in triggered + fired if t.category not in suppressed or t.action == "allow"]
    code = max((OUTCOMES.index(t.action) for t in kept), default=0)
    return kept, code


def _match(rule: BankRule, hit: Hit) -> BankMatch | None:
    """How ``hit`` meets ``rule`` (by PDQ, by embedding, or both); None if it meets neither threshold."""
    by_pdq = rule.pdq_distance is not None and hit.pdq_distance is not None and hit.pdq_distance <= rule.pdq_distance
    by_embedding = rule.cosine is not None and hit.cosine is not None and hit.cosine >= rule.cosine
    if not (by_pdq or by_embedding):
        return None
    return BankMatch(
        bank=rule.name, entry=hit.entry.id, label=hit.entry.label,
        action="allow" if rule.negative else rule.decision, negative=rule.negative,
        pdq_distance=hit.pdq_distance if by_pdq else None, pdq_max=rule.pdq_distance if by_pdq else None,
        variant=hit.variant if by_pdq else None,
        cosine=hit.cosine if by_embedding else None, cosine_min=rule.cosine if by_embedding else None,
    )  # fmt: skip


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

    def decisions(
        self,
        image_embeds: torch.Tensor,
        hits: Sequence[Sequence[Hit]] | None = None,
        image_precision: ImagePrecision = "float32",
    ) -> list[Decision]:
        """Decide a batch: its category scores, (given) each image's bank hits, and the precision of the
        image tower that computed its embeddings (recorded)."""
        t0 = time.perf_counter()
        out = self.decide(self.scores(image_embeds), hits, image_precision)
        STAGE_SECONDS.labels(stage="score").observe(time.perf_counter() - t0)
        return out

    def decisions_over_frames(
        self,
        image_embeds: torch.Tensor,
        frames: Sequence[FrameSet | None],
        hits: Sequence[Sequence[Hit]] | None = None,
        image_precision: ImagePrecision = "float32",
        video_bank_min_frames: int = 1,
    ) -> list[Decision]:
        """Decide a batch whose inputs may have several rows each: ``image_embeds`` holds every input's
        frames one after another (``len(frames[i].sampled)`` rows, or one for a still), and ``hits``
        is per row. Each category's score is its maximum over the input's frames; a bank entry
        matches when any frame matches it (a video: ``video_bank_min_frames`` frames); every trigger
        names its frame, and the decision its sampled frames and the frame that drove it."""
        t0 = time.perf_counter()
        counts = [1 if f is None else len(f.sampled) for f in frames]
        rows = self.scores(image_embeds)
        maxima, which = frame_maxima(rows, counts)
        merged: list[Sequence[Hit]] | None = None
        hit_frame: list[dict[tuple[str, str], int]] = [{} for _ in frames]
        if hits is not None:
            merged = []
            start = 0
            for i, (f, n) in enumerate(zip(frames, counts, strict=True)):
                if f is None:
                    merged.append(hits[start])
                else:
                    need = video_bank_min_frames if f.kind == "video" else 1
                    kept, hit_frame[i] = merge_hits(hits[start : start + n], min(need, n))
                    merged.append(kept)
                start += n
        out = self.decide(maxima, merged, image_precision)
        start = 0
        for i, (f, n) in enumerate(zip(frames, counts, strict=True)):
            if f is not None:
                out[i] = _with_frames(out[i], f, rows[start : start + n], which[i], hit_frame[i], self.categories)
            start += n
        STAGE_SECONDS.labels(stage="score").observe(time.perf_counter() - t0)
        return out

    def decide(
        self,
        scores: np.ndarray,
        hits: Sequence[Sequence[Hit]] | None = None,
        image_precision: ImagePrecision = "float32",
    ) -> list[Decision]:
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
                flag = bool(flagged[i, j])
                triggered.append(Trigger(category=c.name, rule="flag" if flag else "review", score=row[j],
                                         threshold=c.flag if flag else c.review, severity=c.severity,
                                         labels=c.labels))  # fmt: skip
            if hits is not None and hits[i] and self.spec.banks:
                triggered, code = apply_banks(self.spec.banks, hits[i], triggered)
            triggered.sort(key=lambda t: (t.action != "flag", t.rule != "bank", -t.score))
            out.append(
                Decision(
                    decision=OUTCOMES[code],
                    scores=dict(zip(self.categories, row, strict=True)),
                    triggered=triggered,
                    policy=ref,
                    model=self.model,
                    image_precision=image_precision,
                )
            )
        return out


def _with_frames(
    decision: Decision,
    frames: FrameSet,
    rows: np.ndarray,
    which: np.ndarray,
    hit_frame: dict[tuple[str, str], int],
    categories: list[str],
) -> Decision:
    """A decision over frames, annotated: each trigger's frame, the sampled frames' scores, and the
    frame that drove it (the strongest trigger's; with none, the frame of the highest score)."""
    column = {c: j for j, c in enumerate(categories)}

    def position(t: Trigger) -> int | None:
        if t.match is not None:
            return hit_frame.get((t.match.bank, t.match.entry))
        j = column.get(t.category)
        return None if j is None else int(which[j])

    triggered = []
    driving: int | None = None
    for t in decision.triggered:
        at = position(t)
        if driving is None and at is not None:
            driving = at
        triggered.append(t if at is None else t.model_copy(update={"frame": frames.sampled[at].index}))
    if driving is None:
        driving = int(np.unravel_index(int(rows.argmax()), rows.shape)[0]) if rows.size else 0
    sampled = [FrameScores(index=f.index, timestamp_ms=f.timestamp_ms, scores=dict(zip(categories, r, strict=True)))
               for f, r in zip(frames.sampled, rows.tolist(), strict=True)]  # fmt: skip
    first = frames.sampled[driving]
    summary = Frames(kind=frames.kind, count=frames.count, duration_ms=frames.duration_ms, sampled=sampled,
                     frame=first.index, timestamp_ms=first.timestamp_ms)  # fmt: skip
    return decision.model_copy(update={"triggered": triggered, "frames": summary})


def driving_row(decision: Decision) -> int:
    """Which of a decision's sampled frames drove it (0 for a still): its row among the input's."""
    if decision.frames is None:
        return 0
    return [f.index for f in decision.frames.sampled].index(decision.frames.frame)


def ensemble_texts(templates: Sequence[str], text: str) -> list[str]:
    """One prompt per template (each has exactly one ``{}``): the prompts whose mean is ``text``'s vector."""
    return [t.replace("{}", text) for t in templates]


def compile_policy(spec: PolicySpec, encoder: TextEncoder, source: str = "<memory>") -> CompiledPolicy:
    """Encode the policy's prompts (through the cache: only unseen ones run) into one matrix."""
    engine = encoder.engine
    if spec.model is not None and spec.model != engine.model_id:
        raise PolicyError(
            [(source, "model", f"policy is pinned to {spec.model!r}, this worker serves {engine.model_id!r}")]
        )
    texts, _ = build_tables(spec)
    vectors = encoder.encode_ensembles([ensemble_texts(spec.templates, text) for text in texts])
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


def explanations(policy: CompiledPolicy, image_embeds: torch.Tensor, top: int = 3) -> list[list[CategoryExplanation]]:
    """Why each image scored as it did: per enabled category, the score against its thresholds and
    the closest descriptions, contrasts and neutral prompts (one product for the whole batch)."""
    sims = (image_embeds.float() @ policy.matrix).cpu().numpy()  # [B, P]
    scores = policy.scores(image_embeds)
    index = {t: i for i, t in enumerate(policy.texts)}
    enabled = [c for c in policy.spec.categories if c.enabled]
    columns = [([index[t] for t in c.descriptions], [index[t] for t in c.contrasts]) for c in enabled]
    neutral = [index[t] for t in policy.spec.neutral]
    order = np.argsort(-sims, axis=1)  # per image, the texts from the closest

    def closest(row: int, cols: list[int]) -> list[TextMatch]:
        wanted = set(cols)
        picked = [j for j in order[row].tolist() if j in wanted][:top]
        return [TextMatch(text=policy.texts[j], similarity=round(float(sims[row, j]), 6)) for j in picked]

    out = []
    for b in range(len(scores)):
        cats = []
        for j, c in enumerate(enabled):
            s = float(scores[b, j])
            cats.append(CategoryExplanation(
                category=c.name, score=s, flag=c.flag, review=c.review,
                rule_fired="flag" if s >= c.flag else "review" if s >= c.review else None,
                closest_descriptions=closest(b, columns[j][0]), closest_contrasts=closest(b, columns[j][1]),
                closest_neutral=closest(b, neutral),
            ))  # fmt: skip
        out.append(cats)
    return out


def explain(
    policy: CompiledPolicy,
    image_embed: torch.Tensor,
    top: int = 3,
    image_precision: ImagePrecision = "float32",
    frames: FrameSet | None = None,
) -> dict[str, Any]:
    """``moderator policy explain`` for one image: its decision and :func:`explanations`. An animation
    or a video (``image_embed`` one row per sampled frame, ``frames`` what they are): decided over its
    frames, the closest texts of the frame that drove the decision."""
    rows = image_embed.reshape(-1, image_embed.shape[-1])
    decision = policy.decisions_over_frames(rows, [frames], image_precision=image_precision)[0]
    cats = explanations(policy, rows[driving_row(decision)].reshape(1, -1), top)[0]
    return {
        "decision": decision.decision,
        "policy": decision.policy.model_dump(),
        "model": decision.model,
        "image_precision": decision.image_precision,
        "logit_scale": policy.logit_scale,
        "categories": [c.model_dump() for c in cats],
        **({"frames": decision.frames.model_dump(mode="json")} if decision.frames is not None else {}),
    }
