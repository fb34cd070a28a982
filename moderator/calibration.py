"""Threshold calibration from reviewer verdicts, pure: exact bounds under the sampling design, and the
thresholds they support (``moderator calibrate`` does the I/O).

**The population.** A calibration is about the decisions of one policy in a window of the embeddings
log: every one has its score per category (under the policy being calibrated) and the probability,
recorded by the worker, that it went to review: 1 for review decisions (and flag ones with
``MODERATOR_REVIEW_INCLUDE_FLAGGED``), its outcome's audit rate for allow and flag decisions (0 where
there was no audit). Decisions of one outcome and one probability form a **stratum**; within a stratum,
which decisions went to review was an independent random draw at a known rate (the audit draw). Given
how many were drawn, they are a simple random sample of the stratum. Verdicts label the drawn ones
that reviewers judged; drawn ones still waiting for a verdict count as the worst case (for precision:
not violations; for recall: missed violations), so no assumption is made about which ones a queue
worked by priority reached first.

**Bounds.** For a threshold ``t`` and a stratum: ``N`` decisions score at or above it (an exact count:
the log has them all), ``n`` of them were drawn, ``k`` were judged violations. The number ``K`` of
violations among the ``N`` has an exact lower confidence bound from ``k`` of ``n``: the Clopper-Pearson
bound on ``k / n`` times ``N`` (a binomial bound; for sampling without replacement it is conservative,
which ``tests/unit/test_calibration.py`` checks exactly against the hypergeometric distribution over a
grid). A part of a stratum reviewed whole (``n = N``) needs no bound (``K >= k``); a part never drawn
from (``n = 0``) says nothing (``0 <= K <= N``). Strata combine by Bonferroni: the error level is split
over the parts sampled in part.

- precision(t) = K(t) / N(t): lower bound ``Σ K_lower / N(t)``;
- recall(t) = K(t) / (K(t) + M(t)), ``M`` the violations scoring below ``t``: lower bound
  ``K_lower / (K_lower + M_upper)``, each bounded per stratum (Bonferroni over both).

Inverse-probability weights with a Kish effective size (this module's first version) do not give such a
bound: Kish assumes the outcome does not depend on the weight, and here the heavy allow-band samples are
exactly where precision differs (its simulated coverage fell to 85-90%); nor do weights say anything
about what was never sampled, where a bound must.

**Choosing** a threshold is a test per candidate: they are tested in a fixed sequence, from the safest on
(highest for precision, lowest for recall), stopping at the first that fails (Learn-then-Test's
fixed-sequence procedure: the chosen one misses its target with probability at most 1 - confidence).
The sequence's start is chosen from counts alone, never from verdicts: for precision, the highest
threshold at which even all-violation verdicts could pass; for recall, the lowest threshold whose review
volume stays within ``max_review_share`` of the traffic. The candidates are the scores of the judged
decisions (where a verdict changes the counts), at most ``MAX_CANDIDATES`` of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta

MAX_CANDIDATES = 2000
PENDING = -1  # a drawn decision without a final verdict (yet)
SCALES = np.geomspace(1.0, 1000.0, 61)  # how much more sampling "needed" messages consider


@dataclass(frozen=True)
class Stratum:
    """Decisions of one outcome that went to review with one probability."""

    outcome: str
    probability: float  # 1: all reviewed; 0: none; otherwise the audit rate

    @property
    def name(self) -> str:
        return f"{self.outcome} at {self.probability:g}"


@dataclass(frozen=True)
class Population:
    """One category's decisions in the window: score, stratum, drawn for review, and the verdict's label."""

    scores: np.ndarray  # float [N]
    stratum: np.ndarray  # int [N]: an index into strata
    strata: tuple[Stratum, ...]
    selected: np.ndarray  # bool [N]: drawn for review by the design
    label: np.ndarray  # int8 [N]: 1 a violation, 0 not, PENDING no verdict; PENDING where not selected

    def __post_init__(self) -> None:
        n = len(self.scores)
        if not (len(self.stratum) == len(self.selected) == len(self.label) == n):
            raise ValueError("scores, stratum, selected and label must have one value per decision")
        if np.any(self.label[~self.selected] != PENDING):
            raise ValueError("only decisions drawn for review can carry a verdict in the calibration")
        probability = np.array([s.probability for s in self.strata] or [0.0])[self.stratum] if n else np.zeros(0)
        if np.any(self.selected & (probability == 0)) or np.any(~self.selected & (probability == 1)):
            raise ValueError("a stratum of probability 1 is drawn whole, one of probability 0 never")

    @property
    def judged(self) -> np.ndarray:
        out: np.ndarray = self.selected & (self.label != PENDING)
        return out


@dataclass(frozen=True)
class Part:
    """Per candidate threshold (rows) and stratum (columns), of the decisions on one side of it: how many,
    how many of them were drawn for review, judged violations, and drawn ones still waiting."""

    population: np.ndarray  # int [T, H]
    selected: np.ndarray
    positive: np.ndarray
    pending: np.ndarray

    @property
    def judged(self) -> np.ndarray:
        out: np.ndarray = self.selected - self.pending
        return out

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.population, self.selected, self.positive, self.pending

    def __add__(self, other: Part) -> Part:
        return Part(*(a + b for a, b in zip(self.arrays(), other.arrays(), strict=True)))

    def rows(self, index: slice) -> Part:
        return Part(*(a[index] for a in self.arrays()))


@dataclass(frozen=True)
class Counts:
    """The decisions scoring at or above each candidate threshold (highest first), and below it."""

    thresholds: np.ndarray  # [T], descending
    strata: tuple[Stratum, ...]
    above: Part
    below: Part

    @property
    def total(self) -> Part:
        return self.above + self.below

    def row(self, k: int) -> Counts:
        """Only the ``k``-th threshold (a what-if about one test need not compute them all)."""
        one = slice(k, k + 1)
        return Counts(self.thresholds[one], self.strata, self.above.rows(one), self.below.rows(one))

    @property
    def share_above(self) -> np.ndarray:
        """The share of all decisions scoring at or above each threshold (its review-or-flag volume)."""
        total = self.total.population.sum(axis=1).astype(float)
        out: np.ndarray = np.divide(self.above.population.sum(axis=1), total, out=np.zeros(len(total)), where=total > 0)
        return out


def candidates(pop: Population, limit: int = MAX_CANDIDATES, decimals: int | None = None) -> np.ndarray:
    """The thresholds worth testing, descending: the distinct scores of the judged decisions (rounded to
    ``decimals``, the grid a policy file shows; thinned evenly to ``limit``). Which decisions were
    judged, not what their verdicts said."""
    judged = pop.scores[pop.judged]
    scores = np.unique(judged if decimals is None else np.round(judged, decimals))[::-1]
    if len(scores) > limit:
        scores = scores[np.unique(np.linspace(0, len(scores) - 1, limit).round().astype(int))]
    return scores


def counts(pop: Population, thresholds: np.ndarray) -> Counts:
    t = np.asarray(thresholds, dtype=float)
    above: list[list[np.ndarray]] = [[], [], [], []]
    below: list[list[np.ndarray]] = [[], [], [], []]
    for h in range(len(pop.strata)):
        mine = pop.stratum == h
        parts = (mine, mine & pop.selected, mine & (pop.label == 1), mine & pop.selected & (pop.label == PENDING))
        for j, part in enumerate(parts):
            s = np.sort(pop.scores[part])
            at_or_above = len(s) - np.searchsorted(s, t, side="left")
            above[j].append(at_or_above)
            below[j].append(len(s) - at_or_above)
    shape = (len(t), len(pop.strata))

    def stacked(columns: list[list[np.ndarray]]) -> Part:
        return Part(*(np.stack(c, axis=1) if c else np.zeros(shape, dtype=np.int64) for c in columns))

    return Counts(t, pop.strata, stacked(above), stacked(below))


# --- bounds on counts ---------------------------------------------------------------------------------
def violations_lower(k: np.ndarray, n: np.ndarray, big_n: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """A lower confidence bound (error ``alpha``) on the violations among ``big_n`` decisions, of which a
    simple random sample of ``n`` holds ``k``: exact when all were judged, none known when none were."""
    k, n, big_n = (np.asarray(a, dtype=float) for a in (k, n, big_n))
    a = np.broadcast_to(np.asarray(alpha, dtype=float), k.shape)
    ok = (k > 0) & (n > 0)
    p = np.zeros(k.shape)
    p[ok] = beta.ppf(a[ok], k[ok], n[ok] - k[ok] + 1)
    bound = np.maximum(k, np.ceil(big_n * np.nan_to_num(p) - 1e-9))
    out: np.ndarray = np.where(n >= big_n, k, np.where(n > 0, bound, 0.0))
    return out


def violations_upper(k: np.ndarray, n: np.ndarray, big_n: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """An upper confidence bound on the violations among ``big_n``, a sample of ``n`` holding ``k``."""
    k, n, big_n = (np.asarray(a, dtype=float) for a in (k, n, big_n))
    a = np.broadcast_to(np.asarray(alpha, dtype=float), k.shape)
    ok = (k < n) & (n > 0)
    p = np.ones(k.shape)
    p[ok] = beta.ppf(1 - a[ok], k[ok] + 1, n[ok] - k[ok])
    bound = np.minimum(big_n - (n - k), np.floor(big_n * np.nan_to_num(p, nan=1.0) + 1e-9))
    out: np.ndarray = np.where(n >= big_n, k, np.where(n > 0, bound, big_n))
    return out


def _split(alpha: float, *parts: Part) -> np.ndarray:
    """Bonferroni: the error level of each bounded part, per threshold (a column vector). Only parts
    sampled in part are bounded; a part judged whole or never drawn from is exact either way."""
    m = sum(((p.selected > 0) & (p.selected < p.population)).sum(axis=1) for p in parts)
    out: np.ndarray = (alpha / np.maximum(m, 1))[:, None]
    return out


def _estimate(p: Part) -> np.ndarray:
    """Each part's violations estimated from its judged sample (NaN where nothing was judged)."""
    judged = p.judged
    out: np.ndarray = np.divide(p.population * p.positive, judged, out=np.full(judged.shape, np.nan), where=judged > 0)
    return out


def precision_bounds(c: Counts, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: the estimated precision (NaN: nothing judged) and its lower confidence bound.
    Drawn decisions still waiting count as non-violations in the bound."""
    a = c.above
    alpha = _split(1 - confidence, a)
    found = violations_lower(a.positive, a.selected, a.population, alpha).sum(axis=1)
    total = a.population.sum(axis=1).astype(float)
    lower = np.divide(found, total, out=np.zeros(len(total)), where=total > 0)
    est = _estimate(a)
    size = np.where(np.isfinite(est), a.population, 0).sum(axis=1)
    estimate = np.divide(np.nansum(est, axis=1), size, out=np.full(len(size), np.nan), where=size > 0)
    return estimate, lower


def recall_bounds(c: Counts, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: the estimated recall (NaN: nothing judged) and its lower confidence bound. Drawn
    decisions still waiting count as non-violations above the threshold and as missed ones below it."""
    a, b = c.above, c.below
    alpha = _split(1 - confidence, a, b)
    found = violations_lower(a.positive, a.selected, a.population, alpha).sum(axis=1)
    missed = violations_upper(b.positive + b.pending, b.selected, b.population, alpha).sum(axis=1)
    lower = np.divide(found, found + missed, out=np.zeros(len(found)), where=(found + missed) > 0)
    f_est, m_est = np.nansum(_estimate(a), axis=1), np.nansum(_estimate(b), axis=1)
    estimate = np.divide(f_est, f_est + m_est, out=np.full(len(f_est), np.nan), where=(f_est + m_est) > 0)
    return estimate, lower


# --- what-ifs (label-free, or "as observed") ----------------------------------------------------------
def as_if(c: Counts, precision: float) -> Counts:
    """The counts as if every drawn decision were judged and ``precision`` of them were violations
    (counts only, no verdict read: for choosing where a scan starts)."""
    a = c.above
    positive = np.floor(a.selected * precision + 1e-9)
    return dataclasses.replace(c, above=Part(a.population, a.selected, positive, np.zeros_like(a.pending)))


def more_sampling(c: Counts, scale: float, strata: np.ndarray | None = None) -> Counts:
    """The counts as they would be with ``scale`` times the audit rate of the sampled strata (those in
    ``strata``, default all) and every waiting decision judged, with violations in the proportion
    observed (in the part; in the stratum where the part has no verdict)."""
    sampled = np.array([0 < s.probability < 1 for s in c.strata], dtype=bool)
    if strata is not None:
        sampled &= strata
    t = c.total
    overall = np.divide(t.positive, t.judged, out=np.zeros(t.positive.shape), where=t.judged > 0)

    def grow(p: Part) -> Part:
        rate = np.divide(p.positive, p.judged, out=overall.astype(float), where=p.judged > 0)
        n = np.where(sampled, np.minimum(p.population, np.round(p.selected * scale)), p.selected)
        return Part(p.population, n, np.round(n * rate), np.zeros_like(p.pending))

    return dataclasses.replace(c, above=grow(c.above), below=grow(c.below))


def with_disagreement(c: Counts, rate: float) -> Counts:
    """The counts if ``rate`` of the judged violations were not violations, and as many of the judged
    non-violations below each threshold were missed ones: how far reviewer disagreement of that rate
    could move the bounds."""
    a, b = c.above, c.below
    above = Part(a.population, a.selected, np.round(a.positive * (1 - rate)), a.pending)
    below = Part(b.population, b.selected, np.minimum(b.judged, np.round(b.positive + (b.judged - b.positive) * rate)),
                 b.pending)  # fmt: skip
    return dataclasses.replace(c, above=above, below=below)


# --- proposals ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proposal:
    """A proposed threshold (None: the verdicts do not support one), and what it rests on."""

    threshold: float | None
    estimate: float | None  # the estimated precision (flag) or recall (review) at it
    lower: float | None  # its lower confidence bound
    count: int  # judged decisions it rests on (at or above it, for precision; violations, for recall)
    reason: str  # why there is no proposal, or ""
    needed: str  # what would make one possible, or ""
    start: float | None = None  # the scan's first threshold (chosen from counts, before any verdict)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def flag_scan_start(c: Counts, target: float, confidence: float, min_samples: int) -> int | None:
    """The row the precision scan starts at: the highest threshold with ``min_samples`` judged decisions
    at or above it at which even all-violation verdicts would pass. Counts only, never labels. (Starting
    lower, where verdicts of a merely plausible precision would pass, was measured too: it loses the
    proposals whose target is reached only in a thinly sampled flag band.)"""
    best = precision_bounds(as_if(c, 1.0), confidence)[1]
    eligible = (c.above.judged.sum(axis=1) >= min_samples) & (best >= target)
    return int(np.argmax(eligible)) if eligible.any() else None


def propose_flag(c: Counts, target: float, confidence: float, min_samples: int) -> Proposal:
    """The lowest threshold whose lower bound on precision reaches ``target``: a fixed sequence down from
    :func:`flag_scan_start`, stopping at the first that fails."""
    if len(c.thresholds) == 0:
        return Proposal(None, None, None, 0, "no verdicts", f"at least {min_samples} verdicts")
    estimate, lower = precision_bounds(c, confidence)
    judged = c.above.judged.sum(axis=1)
    first = flag_scan_start(c, target, confidence, min_samples)
    start = None if first is None else float(c.thresholds[first])
    if first is not None:
        run = np.logical_and.accumulate(lower[first:] >= target)
        if run[0]:
            k = first + int(np.flatnonzero(run)[-1])
            return Proposal(float(c.thresholds[k]), _num(estimate[k]), float(lower[k]), int(judged[k]), "", "", start)
    # Nothing passed: say what would make the most promising threshold pass.
    promising = np.nan_to_num(estimate, nan=-1.0) > target
    if not promising.any():
        best = float(np.nanmax(estimate)) if np.isfinite(estimate).any() else 0.0
        return Proposal(None, _num(best), None, int(judged[-1]),
                        f"no threshold reaches precision {target} even as an estimate (best {best:.3f})",
                        "more verdicts cannot fix this: its texts do not separate it (see the hints)",
                        start)  # fmt: skip
    at = first if first is not None and promising[first] else int(np.argmax(np.where(promising, judged, -1)))
    t = float(c.thresholds[at])
    reason = (f"{int(judged[at])} verdicts on decisions scoring >= {t:.3f} (precision {estimate[at]:.3f}): "
              f"lower bound {lower[at]:.3f} < {target}")  # fmt: skip
    if judged[at] < min_samples:
        reason += f" (fewer than --min-samples {min_samples})"
    needed = _needed(c.row(at), lambda cc: precision_bounds(cc, confidence)[1][0] >= target, above_only=True)
    return Proposal(None, _num(estimate[at]), float(lower[at]), int(judged[at]), reason, needed, start)


def review_scan_start(c: Counts, max_review_share: float) -> int | None:
    """The row the recall scan starts at: the lowest threshold whose decisions at or above it are at most
    ``max_review_share`` of the traffic (review volume is what recall costs). Counts only."""
    allowed = np.flatnonzero(c.share_above <= max_review_share + 1e-12)
    return int(allowed[-1]) if len(allowed) else None


def propose_review(
    c: Counts, target: float, confidence: float, min_samples: int, max_review_share: float = 0.5
) -> Proposal:
    """The highest threshold whose lower bound on recall reaches ``target``: a fixed sequence up from
    :func:`review_scan_start`, stopping at the first that fails."""
    positives = int(c.total.positive[0].sum()) if len(c.thresholds) else 0
    if positives < min_samples:
        return Proposal(None, None, None, positives,
                        f"{positives} confirmed violations judged (at least {min_samples} needed)",
                        f"{min_samples - positives} more confirmed violations")  # fmt: skip
    estimate, lower = recall_bounds(c, confidence)
    first = review_scan_start(c, max_review_share)
    if first is None:
        return Proposal(None, None, None, positives, f"every threshold sends more than {max_review_share:.0%} of "
                        "the traffic to review (--max-review-share)", "")  # fmt: skip
    start = float(c.thresholds[first])
    run = np.logical_and.accumulate(lower[first::-1] >= target)  # from the start upwards
    if run[0]:
        k = first - int(np.flatnonzero(run)[-1])
        return Proposal(float(c.thresholds[k]), _num(estimate[k]), float(lower[k]), positives, "", "", start)
    reason = (f"at {start:.3f} (the lowest threshold within --max-review-share {max_review_share:g}) the recall "
              f"bound is {lower[first]:.3f} < {target}")  # fmt: skip
    needed = _needed(c.row(first), lambda cc: recall_bounds(cc, confidence)[1][0] >= target, above_only=False)
    return Proposal(None, _num(estimate[first]), float(lower[first]), positives, reason, needed, start)


def _needed(c: Counts, passes: Any, above_only: bool) -> str:
    """What would make the test of the one threshold in ``c`` pass, judged by the same bound that failed:
    judging what waits, a higher audit rate of the sampled strata, and the strata never sampled."""
    row = 0
    t = float(c.thresholds[row])
    where = f" scoring >= {t:.3f}" if above_only else ""
    part = c.above if above_only else c.total
    big_n, n, pending = part.population[row], part.selected[row], int(part.pending[row].sum())
    parts: list[str] = []
    if pending:
        parts.append(f"judge the {pending} drawn decisions{where} still waiting for a verdict")
    never = [(s, int(big_n[h])) for h, s in enumerate(c.strata) if s.probability == 0 and big_n[h] > 0]
    for s, size in never:
        parts.append(f"{size} {s.outcome} decisions{where} were never sampled for review and cannot be bounded: "
                     f"set the policy's audit.{s.outcome} rate")  # fmt: skip
    if never:
        return "; ".join(parts)
    # The smallest growth in verdicts that passes: more audit samples of one sampled stratum, or of all.
    sampled = [h for h, s in enumerate(c.strata) if 0 < s.probability < 1 and n[h]]
    options = [np.eye(len(c.strata), dtype=bool)[h] for h in sampled] + ([np.ones(len(c.strata), dtype=bool)]
                                                                         if len(sampled) > 1 else [])  # fmt: skip
    best: tuple[int, float, np.ndarray] | None = None
    for which in options:
        scale = _smallest_scale(lambda f, w=which: passes(more_sampling(c, f, w)))
        if scale is None:
            continue
        grown = more_sampling(c, scale, which).above if above_only else more_sampling(c, scale, which).total
        extra = int((grown.selected[row] - n).sum())
        if best is None or extra < best[0]:
            best = (extra, scale, which)
    if best is None:
        parts.append("no audit rate would do: even reviewing every decision leaves the estimate short of the target")
    elif best[1] > 1.0:
        extra, scale, which = best
        rates = [f"{c.strata[h].outcome} decisions at about {min(1.0, c.strata[h].probability * scale):.3g} instead "
                 f"of {c.strata[h].probability:g}" for h in sampled if which[h]]  # fmt: skip
        parts.append(f"audit {' and '.join(rates)} (about {max(1, extra)} more verdicts{where})")
    return "; ".join(parts)


def _smallest_scale(passes: Any) -> float | None:
    """The smallest of ``SCALES`` at which ``passes`` (bisection: more sampling never hurts a bound much)."""
    if not passes(float(SCALES[-1])):
        return None
    lo, hi = -1, len(SCALES) - 1  # passes(SCALES[hi]); lo: not known to pass
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(float(SCALES[mid])):
            hi = mid
        else:
            lo = mid
    return float(SCALES[hi])


# --- agreement between reviewers ------------------------------------------------------------------------
def cohens_kappa(first: np.ndarray, second: np.ndarray) -> float | None:
    """Cohen's kappa of two reviewers' yes/no labels of the same items (None: no pairs, or no variation)."""
    a, b = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if len(a) == 0:
        return None
    observed = float(np.mean(a == b))
    pa, pb = float(a.mean()), float(b.mean())
    chance = pa * pb + (1 - pa) * (1 - pb)
    return None if chance >= 1.0 else (observed - chance) / (1 - chance)
