"""Comparing two policies' decisions on the same events, pure: what a replay or a shadow run reports.

A :class:`Side` is one policy's view of N events: an outcome code per event (0 allow, 1 review,
2 flag), and per category whether the event reached the category's review and flag thresholds.
:func:`compare` turns a baseline and a candidate into the :class:`Comparison` that ``moderator
replay`` prints: the decision transition matrix, per-category threshold crossings, the change in
review and flag volume, a few event ids per transition, and the transitions too close to a threshold
to trust (``borderline``: the candidate's decision would differ were its scores moved by the stored
embedding's rounding error).

:func:`check` evaluates ``--fail-if`` expressions against a comparison's :meth:`Comparison.metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OUTCOME_NAMES = ("allow", "review", "flag")
# What --fail-if can test (Comparison.metrics): shares of the replayed events, and volume changes
# relative to the baseline's volume.
METRICS = (
    "changed",  # share of events whose decision changed (borderline ones left out)
    "borderline",  # share of events whose change sits within the storage tolerance of a threshold
    "review_volume_increase",  # (candidate reviews - baseline reviews) / baseline reviews
    "flag_volume_increase",  # the same for flags
    "flag_recall_drop",  # share of the baseline's flags the candidate does not flag
    *(f"{a}->{b}" for a in OUTCOME_NAMES for b in OUTCOME_NAMES if a != b),  # share of events per transition
    # With reviewer verdicts (the console's verdicts topic), on the verdict-labelled events, weighted:
    "flag_precision_drop",  # baseline flag precision - candidate's
    "flag_recall_drop_verdicts",  # baseline flag recall - candidate's
    "caught_recall_drop",  # the same for flag-or-review
)


@dataclass(frozen=True)
class Side:
    """One policy's decisions on N events (rows aligned with the event ids)."""

    codes: np.ndarray  # int [N]: 0 allow, 1 review, 2 flag
    categories: tuple[str, ...]
    reached_flag: np.ndarray  # bool [N, C]: the score reached the category's flag threshold
    reached_review: np.ndarray  # bool [N, C]: ... its review threshold (implied by reaching flag)

    @classmethod
    def from_scores(cls, scores: np.ndarray, categories: tuple[str, ...], flag: np.ndarray, review: np.ndarray) -> Side:
        """Decide from scores ``[N, C]`` and per-category thresholds, as a policy does."""
        reached_flag = scores >= flag
        reached_review = scores >= review
        codes = np.where(reached_flag.any(axis=1), 2, np.where(reached_review.any(axis=1), 1, 0))
        return cls(codes, categories, reached_flag, reached_review)

    def column(self, category: str, reached: np.ndarray) -> np.ndarray:
        if category in self.categories:
            return np.asarray(reached[:, self.categories.index(category)], dtype=bool)
        return np.zeros(len(self.codes), dtype=bool)  # a category this policy lacks is never reached


@dataclass(frozen=True)
class CategoryChange:
    category: str
    flag_up: int  # reach the flag threshold under the candidate only
    flag_down: int  # ... under the baseline only
    review_up: int
    review_down: int

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "flag_up": self.flag_up, "flag_down": self.flag_down,
                "review_up": self.review_up, "review_down": self.review_down}  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    replayed: int
    matrix: dict[str, int]  # every "baseline->candidate" pair, unchanged ones included
    transitions: dict[str, int]  # the changed pairs with a count, borderline ones left out
    borderline: dict[str, int]  # changed pairs within the tolerance of a threshold
    examples: dict[str, list[str]]  # a few event ids per changed pair (borderline ones too)
    categories: list[CategoryChange]
    baseline_volume: dict[str, int]  # events per outcome
    candidate_volume: dict[str, int]
    tolerance: float
    extra: dict[str, Any] = field(default_factory=dict)  # sections added by the caller (verdicts, ...)

    def metrics(self) -> dict[str, float]:
        """The figures ``--fail-if`` can test (shares in 0..1; volume changes relative to the baseline)."""
        n = max(self.replayed, 1)
        base, cand = self.baseline_volume, self.candidate_volume
        flags_kept = self.matrix.get("flag->flag", 0)
        out: dict[str, float] = {
            "replayed": float(self.replayed),
            "changed": sum(self.transitions.values()) / n,
            "borderline": sum(self.borderline.values()) / n,
            "review_volume_increase": (cand["review"] - base["review"]) / max(base["review"], 1),
            "flag_volume_increase": (cand["flag"] - base["flag"]) / max(base["flag"], 1),
            "flag_recall_drop": (base["flag"] - flags_kept) / max(base["flag"], 1),
        }
        for a in OUTCOME_NAMES:
            for b in OUTCOME_NAMES:
                if a != b:
                    out[f"{a}->{b}"] = self.transitions.get(f"{a}->{b}", 0) / n
        out.update({k: float(v) for k, v in self.extra.get("metrics", {}).items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "transitions": self.transitions,
            "borderline": self.borderline,
            "matrix": self.matrix,
            "examples": self.examples,
            "categories": [c.to_dict() for c in self.categories],
            "volume": {"baseline": self.baseline_volume, "candidate": self.candidate_volume},
            "tolerance": self.tolerance,
            "metrics": self.metrics(),
            **{k: v for k, v in self.extra.items() if k != "metrics"},
        }


def compare(
    event_ids: list[str],
    baseline: Side,
    candidate: Side,
    *,
    unstable: np.ndarray | None = None,
    tolerance: float = 0.0,
    examples: int = 5,
) -> Comparison:
    """Baseline vs candidate on the same events. ``unstable`` (bool [N]) marks events whose candidate
    decision is not robust to a score error of ``tolerance``: their changes count as borderline."""
    n = len(event_ids)
    if not (len(baseline.codes) == len(candidate.codes) == n):
        raise ValueError("baseline, candidate and event ids must have the same length")
    unstable = np.zeros(n, dtype=bool) if unstable is None else unstable
    pair = baseline.codes * 3 + candidate.codes  # 0..8
    counts = np.bincount(pair, minlength=9)
    changed = baseline.codes != candidate.codes
    confident = np.bincount(pair[changed & ~unstable], minlength=9)
    shaky = np.bincount(pair[changed & unstable], minlength=9)
    name = [f"{a}->{b}" for a in OUTCOME_NAMES for b in OUTCOME_NAMES]
    ids = np.asarray(event_ids, dtype=object)
    example_ids: dict[str, list[str]] = {}
    for k in np.flatnonzero(np.bincount(pair[changed], minlength=9)).tolist():
        example_ids[name[k]] = ids[(pair == k)][:examples].tolist()
    categories = []
    for c in dict.fromkeys((*baseline.categories, *candidate.categories)):
        bf, cf = baseline.column(c, baseline.reached_flag), candidate.column(c, candidate.reached_flag)
        br, cr = baseline.column(c, baseline.reached_review), candidate.column(c, candidate.reached_review)
        categories.append(CategoryChange(c, int((cf & ~bf).sum()), int((bf & ~cf).sum()),
                                         int((cr & ~br).sum()), int((br & ~cr).sum())))  # fmt: skip
    return Comparison(
        replayed=n,
        matrix={name[k]: int(counts[k]) for k in range(9)},
        transitions={name[k]: int(confident[k]) for k in range(9) if confident[k]},
        borderline={name[k]: int(shaky[k]) for k in range(9) if shaky[k]},
        examples=example_ids,
        categories=categories,
        baseline_volume=_volume(baseline.codes),
        candidate_volume=_volume(candidate.codes),
        tolerance=tolerance,
    )


def merge(parts: dict[str, Comparison]) -> Comparison:
    """One comparison of several policies' events (categories named ``policy/category`` when there
    are several policies)."""
    if len(parts) == 1:
        return next(iter(parts.values()))

    def total(counts: Iterable[dict[str, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in counts:
            for k, v in c.items():
                out[k] = out.get(k, 0) + v
        return out

    examples: dict[str, list[str]] = {}
    for c in parts.values():
        for k, ids in c.examples.items():
            examples[k] = (examples.get(k, []) + ids)[:5]
    empty = {name: 0 for name in OUTCOME_NAMES}
    no_pairs = {f"{a}->{b}": 0 for a in OUTCOME_NAMES for b in OUTCOME_NAMES}
    categories = [
        CategoryChange(f"{name}/{x.category}", x.flag_up, x.flag_down, x.review_up, x.review_down)
        for name, c in parts.items()
        for x in c.categories
    ]
    return Comparison(
        replayed=sum(c.replayed for c in parts.values()),
        matrix=total([no_pairs, *(c.matrix for c in parts.values())]),
        transitions=total(c.transitions for c in parts.values()),
        borderline=total(c.borderline for c in parts.values()),
        examples=examples,
        categories=categories,
        baseline_volume=total([empty, *(c.baseline_volume for c in parts.values())]),
        candidate_volume=total([empty, *(c.candidate_volume for c in parts.values())]),
        tolerance=max((c.tolerance for c in parts.values()), default=0.0),
    )


def verdict_metrics(codes: np.ndarray, violation: np.ndarray, weight: np.ndarray) -> dict[str, float | None]:
    """Precision and recall of a side's decisions on verdict-labelled events, each weighted by the
    inverse of its chance to be reviewed (1 for review decisions, 1/rate for audit samples).

    ``flag_*``: flag decisions as the positives; ``caught_recall``: flag or review (what reaches a
    person or is acted on) over the violations."""
    flagged, caught = codes == 2, codes >= 1
    positives = float(weight[violation].sum())

    def ratio(num: float, den: float) -> float | None:
        return round(num / den, 4) if den > 0 else None

    return {
        "flag_precision": ratio(float(weight[flagged & violation].sum()), float(weight[flagged].sum())),
        "flag_recall": ratio(float(weight[flagged & violation].sum()), positives),
        "caught_recall": ratio(float(weight[caught & violation].sum()), positives),
    }


def unstable_within(scores: np.ndarray, flag: np.ndarray, review: np.ndarray, tolerance: float) -> np.ndarray:
    """bool [N]: events whose decision would change were every score moved by up to ``tolerance``."""
    if tolerance <= 0:
        return np.zeros(len(scores), dtype=bool)
    up = Side.from_scores(scores + tolerance, (), flag, review).codes
    down = Side.from_scores(scores - tolerance, (), flag, review).codes
    return np.asarray(up != down)


def _volume(codes: np.ndarray) -> dict[str, int]:
    counts = np.bincount(codes, minlength=3)
    return {name: int(counts[i]) for i, name in enumerate(OUTCOME_NAMES)}


# ==================================================================================================
# --fail-if

_EXPR = re.compile(r"^\s*([a-z_]+(?:->[a-z_]+)?)\s*(>=|<=|>|<)\s*(-?[0-9]*\.?[0-9]+)\s*$")


@dataclass(frozen=True)
class FailIf:
    metric: str
    op: str
    value: float
    text: str

    def holds(self, metrics: dict[str, float]) -> bool:
        got = metrics[self.metric]
        return {">": got > self.value, ">=": got >= self.value, "<": got < self.value, "<=": got <= self.value}[self.op]


def parse_fail_if(text: str, known: set[str]) -> FailIf:
    """``flag_recall_drop>0.02``, ``review_volume_increase>=0.2``, ``allow->flag>0.01`` ..."""
    m = _EXPR.match(text)
    if not m:
        raise ValueError(f"--fail-if {text!r}: expected METRIC OP NUMBER, e.g. flag_recall_drop>0.02")
    metric, op, value = m.group(1), m.group(2), float(m.group(3))
    if metric not in known:
        raise ValueError(f"--fail-if {text!r}: unknown metric {metric!r}; one of {', '.join(sorted(known))}")
    return FailIf(metric, op, value, text.strip())


def check(conditions: list[FailIf], metrics: dict[str, float]) -> list[str]:
    """The conditions that hold (each as "expression (value)"): any of them fails the replay."""
    return [f"{c.text} ({metrics[c.metric]:.4g})" for c in conditions if c.holds(metrics)]
