"""The lead's page in figures, pure: what waits and for how long, who judged how much, where the model
is overturned, and how long a decision waits for its verdict.

Computed from what a console replica knows: the items waiting in its queue, and every verdict record
it has read (the verdicts topic, all of it, on every replica). Times are UTC; days are calendar days.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from moderator.events import Verdict, epoch_of


@dataclass(frozen=True)
class StageRow:
    stage: str
    waiting: int
    oldest_s: float | None  # age of the oldest waiting item (since its decision)
    median_s: float | None


@dataclass(frozen=True)
class ReviewerDay:
    day: str
    reviewer: str
    verdicts: int
    confirm: int
    overturn: int
    escalate: int


@dataclass(frozen=True)
class CategoryRow:
    category: str
    judged: int  # final verdicts on items where the model fired this category
    overturned: int

    @property
    def rate(self) -> float:
        return self.overturned / self.judged if self.judged else 0.0


@dataclass(frozen=True)
class TeamStats:
    stages: list[StageRow]
    reviewer_days: list[ReviewerDay]
    categories: list[CategoryRow]
    to_verdict_n: int
    to_verdict_p50_s: float | None
    to_verdict_p90_s: float | None


def team_stats(
    waiting: Sequence[tuple[str, str]], verdicts: Iterable[Verdict], now: float, days: int = 14
) -> TeamStats:
    """``waiting``: (stage, decided_at) of each waiting item; ``verdicts``: every verdict record seen.
    Verdicts older than ``days`` are left out; the decision-to-verdict times are of first verdicts."""
    stages = []
    for stage in ("new", "second", "escalated", "set_aside"):
        ages = [now - t for s, at in waiting if s == stage and (t := epoch_of(at)) is not None]
        stages.append(StageRow(stage, sum(1 for s, _ in waiting if s == stage), max(ages) if ages else None,
                               float(np.median(ages)) if ages else None))  # fmt: skip
    since = now - days * 86_400
    per_day: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    latest: dict[str, Verdict] = {}
    to_verdict: list[float] = []
    for v in verdicts:
        at = epoch_of(v.reviewed_at)
        if at is None or at < since:
            continue
        day = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d")
        per_day[(day, v.reviewer)][v.verdict] += 1
        known = latest.get(v.key)
        if known is None or v.revision >= known.revision:
            latest[v.key] = v
        decided = epoch_of(v.decided_at)
        if v.revision == 1 and not v.second_opinion and decided is not None:
            to_verdict.append(max(0.0, at - decided))
    reviewer_days = [
        ReviewerDay(day, reviewer, sum(c.values()), c["confirm"], c["overturn"], c["escalate"])
        for (day, reviewer), c in sorted(sorted(per_day.items()), key=lambda kv: kv[0][0], reverse=True)
    ]  # the newest day first, reviewers by name
    judged: Counter[str] = Counter()
    overturned: Counter[str] = Counter()
    for v in latest.values():
        if v.second_opinion or v.verdict == "escalate":
            continue
        for category in sorted({t.category for t in v.judged.triggered}):
            judged[category] += 1
            overturned[category] += v.verdict == "overturn"
    categories = sorted((CategoryRow(c, judged[c], overturned[c]) for c in judged), key=lambda r: (-r.rate, r.category))
    times = np.array(to_verdict) if to_verdict else None
    return TeamStats(
        stages, reviewer_days, categories, len(to_verdict),
        float(np.percentile(times, 50)) if times is not None else None,
        float(np.percentile(times, 90)) if times is not None else None,
    )  # fmt: skip


def duration(seconds: float | None) -> str:
    """``95`` -> ``1 min 35 s``; ``None`` -> an en dash."""
    if seconds is None:
        return "\u2013"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86_400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86_400} d {s % 86_400 // 3600} h"
