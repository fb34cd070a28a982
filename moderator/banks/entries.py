"""Making bank entries: from image files, from a PDQ hash list, from reviewers' confirmed verdicts.

Hash lists are read in the forms ThreatExchange's tools write (the ``pdq`` signal type):

- ``pdq-photo-hasher`` output and this product's export: ``hash,quality,id`` (no header; an id that is
  a file path with spaces becomes the label, the hash the id), and its ``--details`` form
  (``hash=...,quality=...``);
- ``threatexchange dataset --csv``: a header with ``signal_type,signal_str,...`` (rows of other signal
  types are skipped, and rows whose ``category`` is a partner's ``FALSE_POSITIVE`` opinion too);
- one hash per line, optionally ``pdq <hash>`` (the ``local_file`` exchange).

A hash whose quality is given and below 50 is refused (counted); a line that is not a hash is
reported with its number.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moderator.banks.pdq import HEX_RE, MIN_QUALITY, hash_image
from moderator.events import BankEntry, EmbeddingRecord, Verdict, encode_vector, utc_now
from moderator.images import ImageLimits, PreprocessSpec, decode, preprocess
from moderator.worker.event import ImageEngine

ID_RE = re.compile(r"^[\x21-\x7e]{1,256}$")


class LowQuality(ValueError):
    """The image's PDQ hash is of too low a quality to match on (a flat or featureless image)."""


def image_id(data: bytes) -> str:
    """An entry id fixed by the image bytes: adding the same file twice makes one entry."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:24]


def from_image(
    bank: str,
    data: bytes,
    *,
    limits: ImageLimits,
    engine: ImageEngine | None,
    spec: PreprocessSpec | None,
    source: str,
    added_by: str,
    label: str = "",
    entry_id: str | None = None,
) -> BankEntry:
    """An entry for an image file: its PDQ hash and (with an engine) its CLIP embedding.

    An image whose hash is of too low a quality keeps only its embedding; without an engine, it is
    refused (:class:`LowQuality`). Decoding errors are the worker's (:class:`~moderator.images.ImageError`).
    """
    image = decode(data, limits)
    pdq = hash_image(image)
    embedding = model = None
    dim = None
    if engine is not None and spec is not None:
        vector = engine.encode_images(preprocess(image, spec)[None])[0].cpu().numpy()
        embedding, dim, model = encode_vector(vector, "float16"), int(vector.size), engine.fingerprint
    if not pdq.usable and embedding is None:
        raise LowQuality(f"PDQ quality {pdq.quality} < {MIN_QUALITY}, and no embedding (--no-embedding)")
    return BankEntry(
        bank=bank, id=entry_id or image_id(data), pdq=pdq.hex if pdq.usable else None,
        pdq_quality=pdq.quality, embedding=embedding, dim=dim, model=model, label=label, source=source,
        added_by=added_by, added_at=utc_now(),
    )  # fmt: skip


@dataclass
class HashList:
    """What a hash list held: the entries to add, and what was refused."""

    entries: list[BankEntry] = field(default_factory=list)
    low_quality: int = 0
    skipped_other_signal: int = 0
    false_positive_opinions: int = 0  # rows a partner marked FALSE_POSITIVE (not imported)
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    duplicates: int = 0


def parse_hash_list(text: str, bank: str, *, source: str, added_by: str, label: str = "") -> HashList:
    """Read a PDQ hash list (see the module docstring) into entries of ``bank``."""
    out = HashList()
    rows = list(csv.reader(io.StringIO(text)))
    header: dict[str, int] | None = None
    if rows and rows[0] and not HEX_RE.match(rows[0][0].strip()) and "signal_str" in [c.strip() for c in rows[0]]:
        header = {name.strip(): i for i, name in enumerate(rows[0])}
    seen: set[str] = set()
    now = utc_now()
    for number, row in enumerate(rows, start=1):
        if header is not None and number == 1:
            continue
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        row_label = ""
        if header is not None:
            named = {name: cells[i] if i < len(cells) else "" for name, i in header.items()}
            if (named.get("signal_type") or "pdq").lower() != "pdq":
                out.skipped_other_signal += 1
                continue
            if named.get("category", "").upper() == "FALSE_POSITIVE":  # the partner's opinion: it misfires
                out.false_positive_opinions += 1
                continue
            hash_text, quality_text, entry_id = named.get("signal_str", ""), None, named.get("id") or None
            row_label = " ".join(named[k] for k in ("collab", "category", "tags") if named.get(k))
        elif any("=" in c for c in cells):  # pdq-photo-hasher --details: hash=...,norm=...,quality=...
            fields = dict(c.partition("=")[::2] for c in cells if "=" in c)
            hash_text, quality_text = fields.get("hash", ""), fields.get("quality") or None
            entry_id = fields.get("filename") or None
        else:
            if len(cells) == 1 and " " in cells[0]:  # "pdq <hash>"
                kind, _, rest = cells[0].partition(" ")
                if kind.lower() != "pdq":
                    out.invalid.append((number, f"unknown signal type {kind!r}"))
                    continue
                cells = [rest.strip()]
            hash_text = cells[0]
            quality_text = cells[1] if len(cells) > 1 and cells[1] else None
            entry_id = cells[2] if len(cells) > 2 and cells[2] else None
        hash_text = hash_text.lower()
        if not HEX_RE.match(hash_text):
            out.invalid.append((number, f"not a PDQ hash (64 hex characters): {hash_text[:70]!r}"))
            continue
        quality = None
        if quality_text is not None:
            try:
                quality = int(quality_text)
            except ValueError:
                out.invalid.append((number, f"quality {quality_text[:20]!r} is not a number"))
                continue
            if not 0 <= quality <= 100:
                out.invalid.append((number, f"quality {quality} is not in 0..100"))
                continue
            if quality < MIN_QUALITY:
                out.low_quality += 1
                continue
        if entry_id is not None and not ID_RE.match(entry_id):  # e.g. a file path with spaces: kept as the label
            row_label, entry_id = row_label or entry_id, None
        entry_id = entry_id or hash_text
        if entry_id in seen:
            out.duplicates += 1
            continue
        seen.add(entry_id)
        out.entries.append(BankEntry(bank=bank, id=entry_id, pdq=hash_text, pdq_quality=quality,
                                     label=(label or row_label)[:500], source=source, added_by=added_by,
                                     added_at=now))  # fmt: skip
    return out


def export_hash_list(entries: Sequence[BankEntry]) -> str:
    """The bank's hashes as ``hash,quality,id`` CSV lines (what :func:`parse_hash_list` reads back)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for e in entries:
        if e.pdq:
            writer.writerow([e.pdq, "" if e.pdq_quality is None else e.pdq_quality, e.id])
    return buf.getvalue()


def from_verdict(bank: str, verdict: Verdict, logged: EmbeddingRecord | None, *, added_by: str) -> BankEntry | None:
    """An entry for a confirmed event, from what the embeddings log kept of it: its PDQ hash and
    embedding (None when the event is not in the log, or the log's record is of other bytes than the
    verdict judged: the id was re-used for another image)."""
    if logged is None:
        return None
    logged_sha = logged.image.sha256 if logged.image is not None else None
    if verdict.image_sha256 and logged_sha and verdict.image_sha256 != logged_sha:
        return None
    usable = logged.pdq is not None and (logged.pdq_quality or 0) >= MIN_QUALITY
    embedding = logged.vector
    if logged.dtype != "float16":  # banks keep float16
        vector = np.frombuffer(base64.b64decode(logged.vector), "<f4")
        embedding = encode_vector(vector, "float16")
    label = ", ".join(verdict.categories) + (f": {verdict.note}" if verdict.note else "")
    entry_id = verdict.event_id if ID_RE.match(verdict.event_id) else image_id(verdict.event_id.encode())
    return BankEntry(
        bank=bank, id=entry_id, pdq=logged.pdq if usable else None, pdq_quality=logged.pdq_quality,
        embedding=embedding, dim=logged.dim, model=logged.model, label=label[:500],
        source=f"verdict:{verdict.event_id} by {verdict.reviewer}", added_by=added_by, added_at=utc_now(),
    )  # fmt: skip
