"""The verdicts topic as a decision log for QA: every verdict record, or only the current ones, as rows.

``moderator verdicts export --since 2026-12-01 --format csv > verdicts.csv``: one row per verdict record
on the topic (each revision, second opinions too; a compacted topic keeps the latest of each key, and
the earlier revisions until compaction runs), or with ``--current`` only the latest revision of each
item and opinion. Cells a spreadsheet would take for a formula are quoted. Pure except :func:`read_all`.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from moderator.app import App
from moderator.clients import read_to_end
from moderator.events import Verdict, epoch_of

COLUMNS = (
    "reviewed_at", "event_id", "image_sha256", "revision", "verdict", "categories", "reviewer", "role",
    "second_opinion", "assigned_to", "note", "decision", "policy", "policy_version", "model", "sampled",
    "sample_rate", "retroactive", "decided_at",
)  # fmt: skip


def read_all(app: App) -> list[Verdict]:
    """Every verdict record on the topic, in topic order (bad records skipped)."""
    out: list[Verdict] = []

    def apply(record: Any) -> None:
        if record.value is not None:
            with contextlib.suppress(ValueError):  # not a verdict record: not one to export
                out.append(Verdict.model_validate_json(record.value))

    reader = app.reader(["verdicts"])
    try:
        read_to_end(reader, apply)
    finally:
        reader.close(autocommit=False)
    return out


def _at(iso: str) -> float:
    at = epoch_of(iso)
    return at if at is not None else float("-inf")


def select(verdicts: Iterable[Verdict], since: datetime | None = None, until: datetime | None = None,
           current: bool = False) -> list[Verdict]:  # fmt: skip
    """The verdicts given in [since, until), oldest first; with ``current`` the latest revision per key."""
    chosen = [
        v for v in verdicts
        if (since is None or _at(v.reviewed_at) >= since.timestamp())
        and (until is None or _at(v.reviewed_at) < until.timestamp())
    ]  # fmt: skip
    if current:
        latest: dict[str, Verdict] = {}
        for v in chosen:
            if v.key not in latest or v.revision >= latest[v.key].revision:
                latest[v.key] = v
        chosen = list(latest.values())
    return sorted(chosen, key=lambda v: (_at(v.reviewed_at), v.event_id, v.revision))


def row(v: Verdict) -> dict[str, Any]:
    return {
        "reviewed_at": v.reviewed_at, "event_id": v.event_id, "image_sha256": v.image_sha256 or "",
        "revision": v.revision, "verdict": v.verdict, "categories": ";".join(v.categories), "reviewer": v.reviewer,
        "role": v.role or "", "second_opinion": v.second_opinion, "assigned_to": v.assigned_to or "", "note": v.note,
        "decision": v.judged.decision, "policy": v.judged.policy.name,
        "policy_version": v.judged.policy.version, "model": v.judged.model,
        "sampled": v.sampled, "sample_rate": "" if v.sample_rate is None else v.sample_rate,
        "retroactive": v.retroactive, "decided_at": v.decided_at,
    }  # fmt: skip


def _cell(value: Any) -> Any:
    """A text a spreadsheet would run as a formula (a note "=HYPERLINK(...)") is quoted with a '."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(verdicts: Sequence[Verdict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for v in verdicts:
        writer.writerow({k: _cell(x) for k, x in row(v).items()})
    return out.getvalue()
