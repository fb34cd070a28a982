"""Threshold calibration from reviewer verdicts, pure: weighted precision-recall curves, confidence
bounds, and the thresholds they support (``moderator calibrate`` does the I/O).

Verdicts are not a random sample of traffic: every review decision is judged, allow and flag ones
only when audit-sampled (at the policy's ``audit`` rates). Each verdict is therefore weighted by the
inverse of the probability that its decision was judged (``1 / sample_rate`` for audit samples, 1 in
the review band), which makes every weighted count an unbiased estimate over all traffic
(Horvitz-Thompson). Without the weights, the review band dominates and the curve is wrong wherever a
threshold leaves it (tests/unit/test_calibration.py shows by how much).

Bounds: for a threshold, precision is a weighted proportion of the judged items that score at or
above it. Its lower bound is the exact binomial (Clopper-Pearson) bound computed on the Kish
effective sample size ``(Σw)² / Σw²`` (equal weights: exactly Clopper-Pearson; unequal ones: a count
that shrinks as the weights spread). The same for recall, over the judged positives.

Choosing a threshold is many tests, one per candidate: the thresholds are tested in a fixed
sequence, from the safest (highest for precision, lowest for recall) on, stopping at the first that
fails (Learn-then-Test's fixed-sequence procedure), so the chosen threshold misses its target with
probability at most ``1 - confidence`` despite the scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta, gamma


@dataclass(frozen=True)
class Judged:
    """One category's judged items: score, truth (a violation of this category), weight, sampled."""

    scores: np.ndarray  # float [N]
    positive: np.ndarray  # bool [N]
    weight: np.ndarray  # float [N]: 1 / P(judged)
    sampled: np.ndarray  # bool [N]: an audit sample (weight > 1 usually)

    def __post_init__(self) -> None:
        n = len(self.scores)
        if not (len(self.positive) == len(self.weight) == len(self.sampled) == n):
            raise ValueError("scores, positive, weight and sampled must have one value per item")
        if n and (np.any(self.weight <= 0) or not np.all(np.isfinite(self.weight))):
            raise ValueError("weights must be positive and finite")

    def unweighted(self) -> Judged:
        return Judged(self.scores, self.positive, np.ones_like(self.weight), self.sampled)


@dataclass(frozen=True)
class Curve:
    """The weighted precision-recall curve: one point per distinct score, highest threshold first."""

    thresholds: np.ndarray  # distinct scores, descending
    tp: np.ndarray  # weighted positives scoring >= threshold
    fp: np.ndarray  # weighted negatives scoring >= threshold
    positives: float  # weighted positives in all
    n_eff_above: np.ndarray  # Kish effective count of the items >= threshold
    n_eff_positives: float  # ... of all positives
    count_above: np.ndarray  # judged items >= threshold (unweighted)
    positives_above: np.ndarray  # judged positives >= threshold (unweighted)
    count_positives: int
    strata: tuple[Stratum, ...]  # the judged items by sampling weight

    @property
    def precision(self) -> np.ndarray:
        above = self.tp + self.fp
        out: np.ndarray = np.divide(self.tp, above, out=np.ones_like(self.tp), where=above > 0)
        return out

    @property
    def recall(self) -> np.ndarray:
        return self.tp / self.positives if self.positives > 0 else np.zeros_like(self.tp)


def curve(j: Judged) -> Curve:
    order = np.argsort(-j.scores, kind="stable")
    s, y, w = j.scores[order], j.positive[order], j.weight[order]
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, dtype=bool)  # the end of each run of a score
    cum_w, cum_w2 = np.cumsum(w), np.cumsum(w * w)
    cum_tp = np.cumsum(w * y)
    cum_n, cum_pos = np.arange(1, len(s) + 1), np.cumsum(y)
    positives = float(cum_tp[-1]) if len(s) else 0.0
    pos_w2 = float(np.sum(w * w * y))
    return Curve(
        thresholds=s[last], tp=cum_tp[last], fp=(cum_w - cum_tp)[last], positives=positives,
        n_eff_above=_kish(cum_w[last], cum_w2[last]),
        n_eff_positives=float(_kish(np.array([positives]), np.array([pos_w2]))[0]),
        count_above=cum_n[last], positives_above=cum_pos[last], count_positives=int(cum_pos[-1]) if len(s) else 0,
        strata=tuple(_stratum(s, y, w, weight, last) for weight in np.unique(w)),
    )  # fmt: skip


@dataclass(frozen=True)
class Stratum:
    """The judged items of one sampling weight (the review band; each audit rate)."""

    weight: float
    min_score: float
    positives: int
    positives_above: np.ndarray  # per threshold of the curve


def _stratum(s: np.ndarray, y: np.ndarray, w: np.ndarray, weight: float, last: np.ndarray) -> Stratum:
    mine = w == weight
    return Stratum(float(weight), float(s[mine].min()), int((y & mine).sum()), np.cumsum(y & mine)[last])


def _kish(total: np.ndarray, squares: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.divide(total * total, squares, out=np.zeros_like(total, dtype=float), where=squares > 0)
    return out


def lower_bound(estimate: np.ndarray | float, n_eff: np.ndarray | float, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a proportion ``estimate`` over ``n_eff`` trials."""
    p, n = np.broadcast_arrays(np.asarray(estimate, dtype=float), np.asarray(n_eff, dtype=float))
    successes = p * n
    out = np.zeros(p.shape)
    ok = (n > 0) & (successes > 0)
    out[ok] = beta.ppf(1 - confidence, successes[ok], n[ok] - successes[ok] + 1)
    return np.nan_to_num(out)


@dataclass(frozen=True)
class Proposal:
    """A proposed threshold (None: the verdicts do not support one), and what it rests on."""

    threshold: float | None
    estimate: float | None  # the weighted precision (flag) or recall (review) at it
    lower: float | None  # its lower confidence bound
    count: int  # judged items it rests on (at or above it, for precision; positives, for recall)
    reason: str  # why there is no proposal, or ""
    needed: str  # how many more verdicts of which kind would be needed, or ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def propose_flag(c: Curve, target: float, confidence: float, min_samples: int) -> Proposal:
    """The lowest threshold whose lower bound on precision reaches ``target`` (a fixed sequence from
    the highest threshold down)."""
    if len(c.thresholds) == 0:
        return Proposal(None, None, None, 0, "no verdicts", f"at least {min_samples} verdicts")
    lower = lower_bound(c.precision, c.n_eff_above, confidence)
    # Candidates rest on at least min_samples verdicts (a rule on scores, not on verdicts). The sequence
    # starts at the first candidate that passes (above it, too few verdicts for the bound) and stops at
    # the first that fails after it.
    ok = (lower >= target) & (c.count_above >= min_samples)
    if ok.any():
        first = int(np.argmax(ok))
        run = np.logical_and.accumulate(ok[first:])
        k = first + int(np.flatnonzero(run)[-1])
        return Proposal(float(c.thresholds[k]), float(c.precision[k]), float(lower[k]), int(c.count_above[k]), "", "")
    # None passed: say what would make the most promising threshold pass.
    best = int(np.argmax(np.where(c.precision > target, c.n_eff_above, -1)))
    p = float(c.precision[best])
    at = float(c.thresholds[best])
    if p <= target:
        return Proposal(None, float(c.precision.max()), None, int(c.count_above[0]),
                        f"no threshold reaches precision {target} even as an estimate (best {c.precision.max():.3f})",
                        "more verdicts cannot fix this: its texts do not separate it (see the hints)")  # fmt: skip
    more = _more_needed(p, float(c.n_eff_above[best]), target, confidence)
    have = int(c.count_above[best])
    reason = (f"{have} verdicts score >= {at:.3f} (precision {p:.3f}); their lower bound "
              f"{float(lower[best]):.3f} < {target}")  # fmt: skip
    if have < min_samples:
        more = max(more, min_samples - have)
    return Proposal(None, p, float(lower[best]), have, reason,
                    f"about {more} more verdicts of images scoring >= {at:.3f}")  # fmt: skip


def propose_review(c: Curve, target: float, confidence: float, min_samples: int) -> Proposal:
    """The highest threshold whose lower bound on recall reaches ``target`` (fixed sequence from
    the lowest threshold up)."""
    if c.count_positives < min_samples:
        return Proposal(None, None, None, c.count_positives,
                        f"{c.count_positives} confirmed violations judged (at least {min_samples} needed)",
                        f"{min_samples - c.count_positives} more confirmed violations")  # fmt: skip
    recall = c.recall
    lower = recall_lower_bound(c, confidence)
    ascending = lower[::-1] >= target
    passed = np.flatnonzero(np.logical_and.accumulate(ascending))
    if len(passed):
        k = len(lower) - 1 - int(passed[-1])
        return Proposal(float(c.thresholds[k]), float(recall[k]), float(lower[k]), c.count_positives, "", "")
    full = float(lower[-1])
    more = _more_needed(1.0, c.n_eff_positives, target, confidence)
    return Proposal(None, float(recall[-1]), full, c.count_positives,
                    f"even the lowest threshold's recall bound is {full:.3f} < {target}",
                    f"about {more} more confirmed violations")  # fmt: skip


def recall_lower_bound(c: Curve, confidence: float) -> np.ndarray:
    """Per threshold, a lower bound on recall = found / (found + missed), with the missed positives
    (those scoring below the threshold) bounded above per sampling stratum (one weight each): each
    stratum's missed count as a Poisson count (its exact upper bound, Bonferroni over the strata),
    times its weight. Below a low threshold the missed positives are a few heavily weighted audit
    samples, or none seen at all: it is their number that makes the estimate uncertain."""
    strata = c.strata
    level = 1 - (1 - confidence) / max(len(strata), 1)
    upper = np.zeros_like(c.tp)
    for h in strata:
        k = h.positives - h.positives_above  # its positives scoring below each threshold
        upper += np.where(h.min_score < c.thresholds, h.weight * gamma.ppf(level, k + 1), 0.0)
    found = c.tp
    out: np.ndarray = np.divide(found, found + upper, out=np.zeros_like(found), where=(found + upper) > 0)
    return out


def _more_needed(p: float, n_eff: float, target: float, confidence: float) -> int:
    """How many more (effective) verdicts at the observed proportion ``p`` bring its bound to ``target``."""
    if p <= target:
        return 0
    n = max(n_eff, 1.0)
    while n < 1e7 and lower_bound(p, n, confidence)[()] < target:
        n *= 1.25
    return max(1, math.ceil(n - n_eff))
