"""Retroactive matching: which events already decided match a bank's entries (``moderator bank scan``).

The embeddings log keeps every decided image's embedding and PDQ hash (the image as it was: the
log has no dihedral variants, so rotated or mirrored earlier copies are found by embedding only).
The bank's entries are searched with all of it, in chunks; a finding can be published to the review
topic as a retroactive review item. An animation or a video is searched with every sampled frame's
hash and embedding (the log keeps them all): an entry matching any frame is a finding, the closest
frame's hit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moderator.banks.index import BankIndex, Hit
from moderator.banks.pdq import MIN_QUALITY, PdqHash, from_hex
from moderator.banks.store import decode
from moderator.events import (
    BankEntry,
    BankMatch,
    EmbeddingRecord,
    ImageRef,
    ReviewItem,
    Trigger,
    review_priority,
)
from moderator.frames import merge_hits
from moderator.replay import LoggedEvents

CHUNK = 4096


@dataclass(frozen=True)
class Finding:
    """An event of the log that matches a bank entry."""

    row: int  # in the log as read
    event_id: str
    hit: Hit
    live_decision: str
    already_matched: bool  # its live decision already came from this entry

    def to_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "entry": self.hit.entry.id, "pdq_distance": self.hit.pdq_distance,
                "cosine": self.hit.cosine, "live_decision": self.live_decision,
                "already_matched": self.already_matched}  # fmt: skip


def scan(
    logged: LoggedEvents,
    entries: Sequence[BankEntry],
    model: str,
    *,
    pdq_distance: int | None,
    cosine: float | None,
) -> list[Finding]:
    """Every (event, entry) of the log within ``pdq_distance`` bits or at least ``cosine`` similar."""
    usable = []
    for e in entries:
        try:
            usable.append(decode(e, model))
        except ValueError:  # nothing this model can match on (or a bad record): not scanned
            continue
    index = BankIndex(usable, model)
    findings: list[Finding] = []
    for start in range(0, len(logged.ids), CHUNK):
        stop = min(start + CHUNK, len(logged.ids))
        # The log keeps only usable hashes (read_log): one variant each, the image as it was; an
        # animation's or video's: one per sampled frame, each a query row of its event.
        owners: list[int] = []
        texts: list[str | None] = []
        vectors: list[np.ndarray] = []
        for row in range(start, stop):
            frames = logged.frame_pdqs.get(row)
            frame_vectors = logged.frame_vectors.get(row)
            if frames is not None and frame_vectors is not None and len(frames) == len(frame_vectors):
                owners += [row] * len(frames)
                texts += frames
                vectors += list(frame_vectors)
            else:
                owners.append(row)
                texts.append(logged.pdq[row])
                vectors.append(logged.vectors[row])
        hashes = [PdqHash(from_hex(h)[None], MIN_QUALITY) if h else None for h in texts]
        embeds = torch.from_numpy(np.ascontiguousarray(np.stack(vectors))) if cosine is not None else None
        per_row: dict[int, list[list[Hit]]] = {}
        for owner, hits in zip(owners, index.search(hashes, embeds, pdq_distance, cosine), strict=True):
            per_row.setdefault(owner, []).append(hits)
        for row, frame_hits in per_row.items():
            hits = merge_hits(frame_hits)[0] if len(frame_hits) > 1 else frame_hits[0]
            if not hits:
                continue
            live = logged.live[row]
            matched = {(t["match"]["bank"], t["match"]["entry"]) for t in live["triggered"] if t.get("match")}
            findings += [Finding(row, logged.ids[row], h, live["decision"], (h.entry.bank, h.entry.id) in matched)
                         for h in hits]  # fmt: skip
    return findings


def review_item(finding: Finding, record: EmbeddingRecord, severity: str | None) -> ReviewItem:
    """A retroactive review item: the event as it was decided, with the bank match as its reason."""
    hit = finding.hit
    match = BankMatch(bank=hit.entry.bank, entry=hit.entry.id, label=hit.entry.label, action="review",
                      pdq_distance=hit.pdq_distance, variant=hit.variant, cosine=hit.cosine)  # fmt: skip
    reason = Trigger(category=hit.entry.bank, rule="bank", score=1.0, threshold=1.0, severity=severity, match=match)
    image = record.image or ImageRef(inline_source=record.source, sha256="", bytes=0)
    return ReviewItem(
        event_id=record.event_id, decision="review", priority=review_priority([reason]), image=image,
        scores=record.live.scores, reasons=[reason, *record.live.triggered], policy=record.live.policy,
        model=record.model, image_precision=record.image_precision, source=record.source,
        decided_at=record.decided_at, retroactive=True,
    )  # fmt: skip
