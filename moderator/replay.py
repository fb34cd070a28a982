"""``moderator replay``: re-decide the logged embeddings under a candidate policy, and compare.

The worker logs every decided image's embedding with its live decision (the embeddings topic). A
policy is a small text matrix, so re-deciding a stored embedding under any other policy is one matrix
product: no image, no image tower. :func:`run_replay`:

1. reads the log to its current end (:func:`read_log`): the latest record per event id, records of
   another model fingerprint or image precision (``image_precision``: an int8 tower's embeddings are
   not an fp32 tower's) skipped and counted, never mixed;
2. for each live policy the candidate set names, scores its events' embeddings (all at once) and
   decides; the baseline is the live decision stored with each embedding, or another policy file
   scored on the same embeddings (``--baseline``);
3. compares them (``comparison.py``): transitions, threshold crossings per category, review and
   flag volume, examples, and the borderline changes that sit within the storage tolerance of a
   threshold (reported apart, never counted as transitions).

The storage tolerance: a float16 embedding moves a score by at most about ``s · 2^-11 / sqrt(D)``
(``s`` the logit scale, ``D`` the embedding size; measured: see the README).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderator.app import App
from moderator.banks.pdq import MIN_QUALITY
from moderator.clients import TopicError, read_to_end
from moderator.comparison import Comparison, Side, compare, merge, unstable_within, verdict_metrics
from moderator.events import FINAL_VERDICTS, Verdict, decode_frame_vectors, decode_vectors
from moderator.frames import frame_maxima
from moderator.observability import get_logger
from moderator.policy import CompiledPolicy, load_spec, policy_files

log = get_logger(__name__)

EPSILON = {"float16": 2.0**-11, "float32": 2.0**-24}  # relative rounding error of the stored values


@dataclass
class LoggedEvents:
    """The embeddings log as read: one row per event of the serving model."""

    ids: list[str]
    vectors: np.ndarray  # float32 [N, D] (as stored: normalized before rounding; the tolerance covers it)
    live: list[dict[str, Any]]  # the live decision stored with each (outcome, scores, triggered, policy)
    dtype: str  # how the vectors were stored (the widest seen)
    pdq: list[str | None]  # each image's PDQ hash (when its worker hashed it)
    decided_at: list[str]
    image_sha256: list[str | None]  # of the bytes scored (None: not recorded)
    review_probability: list[float | None]  # by the policy's design (None: written before it was recorded)
    sampled: list[bool]  # went to review as an audit sample
    values: list[bytes]  # the records as read, with keep_values (``bank scan`` re-reads the ones it reports)
    frame_vectors: dict[int, np.ndarray]  # row -> float32 [F, D]: an animation's or video's sampled frames
    frame_pdqs: dict[int, list[str | None]]  # row -> each sampled frame's usable PDQ hash (hex), or None
    read: int  # records read (duplicates and tombstones included)
    skipped_other_model: int
    skipped_other_precision: int
    seconds: dict[str, float]  # read (from Kafka), parse (JSON), decode (vectors)

    @property
    def policies(self) -> list[str]:
        return [d["policy"]["name"] for d in self.live]


def read_log(
    app: App, model: str, limit: int | None = None, image_precision: str | None = "float32", keep_values: bool = False
) -> LoggedEvents:
    """The latest embedding record of every event in the log of ``model`` at ``image_precision`` (None:
    any; at most ``limit`` records read; records written before the field existed count as float32)."""
    t0 = time.perf_counter()
    latest: dict[bytes, bytes] = {}

    def apply(record: Any) -> None:
        if record.value is None:  # a tombstone: the event's embedding was removed
            latest.pop(record.key, None)
        elif record.key is not None:
            latest[record.key] = record.value

    reader = app.reader(["embeddings"])
    try:
        read = read_to_end(reader, apply, limit=limit)
    finally:
        reader.close(autocommit=False)
    t1 = time.perf_counter()
    ids: list[str] = []
    vectors: dict[tuple[str, int], list[str]] = {}
    rows: dict[tuple[str, int], list[int]] = {}
    live: list[dict[str, Any]] = []
    pdq: list[str | None] = []
    decided_at: list[str] = []
    sha: list[str | None] = []
    probability: list[float | None] = []
    sampled: list[bool] = []
    values: list[bytes] = []
    frame_texts: dict[int, tuple[str, str]] = {}
    frame_pdqs: dict[int, list[str | None]] = {}
    skipped = skipped_precision = 0
    for value in latest.values():
        r = json.loads(value)
        if r["model"] != model:
            skipped += 1
            continue
        if image_precision is not None and r.get("image_precision", "float32") != image_precision:
            skipped_precision += 1
            continue
        key = (r["dtype"], r["dim"])
        vectors.setdefault(key, []).append(r["vector"])
        rows.setdefault(key, []).append(len(ids))
        ids.append(r["event_id"])
        live.append(r["live"])
        pdq.append(r.get("pdq") if (r.get("pdq_quality") or 0) >= MIN_QUALITY else None)
        decided_at.append(r["decided_at"])
        sha.append((r.get("image") or {}).get("sha256") or None)
        probability.append(r.get("review_probability"))
        sampled.append(bool(r.get("sampled")))
        if r.get("frame_vectors"):
            frame_texts[len(ids) - 1] = (r["frame_vectors"], r["dtype"])
        if r.get("frame_pdqs"):
            frame_pdqs[len(ids) - 1] = list(r["frame_pdqs"])
        if keep_values:
            values.append(value)
    t2 = time.perf_counter()
    dims = {dim for _, dim in vectors}
    if len(dims) > 1:
        raise ValueError(f"records of one model with different dimensions {sorted(dims)}: the log is corrupt")
    dim = dims.pop() if dims else 0
    if len(vectors) == 1:  # one dtype (the usual case): in log order already
        ((key, texts),) = vectors.items()
        out = decode_vectors(texts, key[0], dim)
    else:
        out = np.zeros((len(ids), dim), dtype=np.float32)
        for key, texts in vectors.items():
            out[rows[key]] = decode_vectors(texts, key[0], dim)
    frames = {row: decode_frame_vectors(text, kind, dim) for row, (text, kind) in frame_texts.items()}
    dtype = "float16" if any(k[0] == "float16" for k in vectors) else "float32"
    seconds = {"read": t1 - t0, "parse": t2 - t1, "decode": time.perf_counter() - t2}
    return LoggedEvents(ids, out, live, dtype, pdq, decided_at, sha, probability, sampled, values, frames, frame_pdqs,
                        read, skipped, skipped_precision, {k: round(v, 3) for k, v in seconds.items()})  # fmt: skip


def logged_scores(policy: CompiledPolicy, logged: LoggedEvents, rows: Sequence[int]) -> np.ndarray:
    """``[len(rows), C]`` category scores of logged events under ``policy``, as the worker scores them:
    an animation's or a video's are each category's maximum over its logged frames."""
    device = policy.matrix.device
    scores = policy.scores(torch.from_numpy(np.ascontiguousarray(logged.vectors[list(rows)])).to(device))
    multi = [(k, logged.frame_vectors[i]) for k, i in enumerate(rows) if i in logged.frame_vectors]
    if multi:
        stacked = torch.from_numpy(np.concatenate([v for _, v in multi])).to(device)
        maxima, _ = frame_maxima(policy.scores(stacked), [len(v) for _, v in multi])
        scores[[k for k, _ in multi]] = maxima
    return scores


@dataclass
class Verdicts:
    """The verdicts topic as read: the current verdict (latest revision) per judged image, i.e. per
    (event id, image sha256), and the second opinions of double review apart."""

    current: dict[tuple[str, str | None], Verdict]
    second: dict[tuple[str, str | None], Verdict]

    def of(self, event_id: str, sha256: str | None) -> Verdict | None:
        """The current verdict on these bytes under this id (one that names no image, written before
        verdicts carried the hash, counts for the id)."""
        return self.current.get((event_id, sha256)) or self.current.get((event_id, None))

    def second_of(self, event_id: str, sha256: str | None) -> Verdict | None:
        return self.second.get((event_id, sha256))


def read_verdicts(app: App, include_appeals: bool = False) -> Verdicts:
    """Every current verdict; empty without a verdicts topic. Appeal verdicts are left out unless asked
    (appeals are not a sample of anything: the users chose them)."""
    out = Verdicts({}, {})

    def apply(record: Any) -> None:
        if record.value is None:
            return
        verdict = Verdict.model_validate_json(record.value)
        if verdict.appeal and not include_appeals:
            return
        into = out.second if verdict.second_opinion else out.current
        key = (verdict.event_id, verdict.image_sha256)
        known = into.get(key)
        if known is None or verdict.revision >= known.revision:
            into[key] = verdict

    try:
        reader = app.reader(["verdicts"])
    except TopicError:
        return out
    try:
        read_to_end(reader, apply)
    finally:
        reader.close(autocommit=False)
    return out


def storage_tolerance(logit_scale: float, dim: int, dtype: str) -> float:
    """How far a stored embedding's rounding may move a score (3x and more above what was measured)."""
    return logit_scale * EPSILON[dtype] / math.sqrt(max(dim, 1))


def stored_side(decisions: Sequence[dict[str, Any]], categories: tuple[str, ...]) -> Side:
    """Stored decisions (the live ones in the log, or those of the shadow topic) as a :class:`Side`."""
    codes = np.array([{"allow": 0, "review": 1, "flag": 2}[d["decision"]] for d in decisions], dtype=np.int64)
    index = {c: j for j, c in enumerate(categories)}
    reached_flag = np.zeros((len(decisions), len(categories)), dtype=bool)
    reached_review = np.zeros_like(reached_flag)
    for i, d in enumerate(decisions):
        for t in d["triggered"]:
            if t["rule"] == "bank":  # a bank match is not a threshold crossing
                continue
            j = index.get(t["category"])
            if j is None:
                continue
            reached_review[i, j] = True  # review <= flag: a category that flags reached review too
            reached_flag[i, j] = t["rule"] == "flag"
    return Side(codes, categories, reached_flag, reached_review)


def policy_side(
    policy: CompiledPolicy, logged: LoggedEvents, rows: Sequence[int], tolerance: float
) -> tuple[Side, np.ndarray]:
    """A policy's decisions on stored embeddings, and which of them a score error of ``tolerance`` could flip."""
    scores = logged_scores(policy, logged, rows)
    side = Side.from_scores(scores, tuple(policy.categories), policy.flag, policy.review)
    return side, unstable_within(scores, policy.flag, policy.review, tolerance)


def load_policies(app: App, path: Path) -> tuple[dict[str, CompiledPolicy], list[str]]:
    """Compile the policies of a file or directory. Those pinned to another model are left out and
    named in the second return value (their events are skipped, never scored by the wrong model)."""
    compiled: dict[str, CompiledPolicy] = {}
    other_model: list[str] = []
    for file in policy_files([path]):
        spec = load_spec(file)
        if spec.model is not None and spec.model != app.engine.model_id:
            other_model.append(spec.name)
            continue
        compiled[spec.name] = app.compile(spec, str(file))
    return compiled, other_model


def run_replay(
    app: App,
    candidate_path: Path,
    baseline_path: Path | None = None,
    *,
    limit: int | None = None,
    tolerance: float | None = None,
    image_precision: str = "float32",
) -> dict[str, Any]:
    """Steps 1-3 of the module docstring; the report ``moderator replay`` prints. Only the records of
    the engine's model at ``image_precision`` are replayed (the engine's text tower is all it uses)."""
    engine = app.engine
    candidate, pinned = load_policies(app, candidate_path)
    baseline = load_policies(app, baseline_path)[0] if baseline_path is not None else None
    logged = read_log(app, engine.fingerprint, limit, image_precision)
    tol = tolerance if tolerance is not None else storage_tolerance(engine.logit_scale, engine.embed_dim, logged.dtype)
    names = np.array(logged.policies, dtype=object)
    verdicts = read_verdicts(app)
    labelled: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # base, cand, violation, weight
    per_policy: dict[str, Comparison] = {}
    skipped_other_policy = skipped_pinned = 0
    # Bank matches are not replayed (the log keeps no dihedral hashes, and banks change apart from
    # policies: `moderator bank scan` is their replay); events a bank rule decided are left out.
    by_bank = np.array([any(t["rule"] == "bank" for t in d["triggered"]) for d in logged.live], dtype=bool)
    t0 = time.perf_counter()
    for name in sorted(set(logged.policies)):
        rows = np.flatnonzero((names == name) & ~by_bank)
        if not len(rows):
            continue
        if name in pinned:
            skipped_pinned += len(rows)
            continue
        if name not in candidate or (baseline is not None and name not in baseline):
            skipped_other_policy += len(rows)
            continue
        cand, unstable = policy_side(candidate[name], logged, rows.tolist(), tol)
        if baseline is not None:
            base, base_unstable = policy_side(baseline[name], logged, rows.tolist(), tol)
            unstable = unstable | base_unstable
        else:
            categories = tuple(dict.fromkeys(c for i in rows for c in logged.live[i]["scores"]))
            base = stored_side([logged.live[i] for i in rows], categories)
        per_policy[name] = compare([logged.ids[i] for i in rows], base, cand, unstable=unstable, tolerance=tol)
        judged = [
            (k, v)
            for k, i in enumerate(rows)
            if (v := verdicts.of(logged.ids[i], logged.image_sha256[i])) and v.verdict in FINAL_VERDICTS
        ]
        if judged:
            at = np.array([k for k, _ in judged])
            violation = np.array([v.verdict == "confirm" for _, v in judged])
            weight = np.array([1.0 / v.sample_rate if v.sampled and v.sample_rate else 1.0 for _, v in judged])
            labelled.append((base.codes[at], cand.codes[at], violation, weight))
    decide_s = time.perf_counter() - t0
    total = merge(per_policy)
    if labelled:
        base_codes, cand_codes, violation, weight = (np.concatenate(parts) for parts in zip(*labelled, strict=True))
        before, after = verdict_metrics(base_codes, violation, weight), verdict_metrics(cand_codes, violation, weight)
        total.extra["verdicts"] = {
            "labelled": len(violation), "violations": int(violation.sum()), "sampled": int((weight > 1).sum()),
            "baseline": before, "candidate": after,
        }  # fmt: skip
        drops = {"flag_precision_drop": "flag_precision", "flag_recall_drop_verdicts": "flag_recall",
                 "caught_recall_drop": "caught_recall"}  # fmt: skip
        total.extra["metrics"] = {
            metric: (before[key] or 0.0) - (after[key] or 0.0)
            for metric, key in drops.items()
            if before[key] is not None and after[key] is not None
        }
    return {
        **total.to_dict(),
        "skipped_other_model": logged.skipped_other_model + skipped_pinned,
        "skipped_other_precision": logged.skipped_other_precision,
        "skipped_other_policy": skipped_other_policy,
        "skipped_bank_match": int(by_bank.sum()),
        "records_read": logged.read,
        "model": engine.fingerprint,
        "image_precision": image_precision,
        "stored_dtype": logged.dtype,
        "baseline": str(baseline_path) if baseline_path else "live decisions stored in the log",
        "candidate": {n: p.version for n, p in candidate.items()},
        "pinned_to_another_model": pinned,
        "policies": {n: c.to_dict() for n, c in per_policy.items()},
        "seconds": {**logged.seconds, "decide": round(decide_s, 3)},
    }


def shadow_report(app: App, shadow: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Live vs shadow decisions from the shadow-decisions topic, per (live policy, shadow version)."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}  # (event, shadow, version): duplicates collapse

    def apply(record: Any) -> None:
        if record.value is None:
            return
        r = json.loads(record.value)
        ref = r["shadow"]["policy"]
        if shadow is None or ref["name"] == shadow:
            latest[(r["event_id"], ref["name"], ref["version"])] = r

    reader = app.reader(["shadow_decisions"])
    try:
        read = read_to_end(reader, apply, limit=limit)
    finally:
        reader.close(autocommit=False)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for (_, name, version), r in latest.items():
        groups.setdefault((r["live"]["policy"]["name"], name, version), []).append(r)
    pairs = []
    for (live, name, version), records in sorted(groups.items()):
        categories = tuple(dict.fromkeys(c for r in records for d in (r["live"], r["shadow"]) for c in d["scores"]))
        comparison = compare(
            [r["event_id"] for r in records],
            stored_side([r["live"] for r in records], categories),
            stored_side([r["shadow"] for r in records], categories),
        )
        agree = sum(1 for r in records if r["agree"]) / len(records)
        pairs.append({"live": live, "shadow": name, "shadow_version": version, "agreement": round(agree, 4),
                      **comparison.to_dict()})  # fmt: skip
    return {"records_read": read, "pairs": pairs}


def render_shadow(report: dict[str, Any]) -> str:
    if not report["pairs"]:
        return f"no shadow decisions ({report['records_read']} records read)"
    lines = []
    for p in report["pairs"]:
        changed = ", ".join(f"{k} {v}" for k, v in p["transitions"].items()) or "none"
        lines.append(f"{p['shadow']} ({p['shadow_version']}) beside {p['live']}: {p['replayed']} events, "
                     f"agreement {p['agreement']:.2%}; live -> shadow: {changed}")  # fmt: skip
        for k, ids in p["examples"].items():
            lines.append(f"  {k}: {', '.join(ids)}")
    return "\n".join(lines)


# ==================================================================================================
# For a person


def render(report: dict[str, Any], failed: Iterable[str] = ()) -> str:
    names = ("allow", "review", "flag")
    lines = [
        f"replayed {report['replayed']} events of {report['image_precision']} embeddings ({report['records_read']}"
        f" records read; skipped: {report['skipped_other_model']} of another model, "
        f"{report['skipped_other_precision']} of another image precision, {report['skipped_other_policy']} of a"
        f" policy not in the candidate, {report.get('skipped_bank_match', 0)} decided by a bank match); "
        f"storage tolerance {report['tolerance']:.2g} ({report['stored_dtype']} log)",
        f"baseline: {report['baseline']}; candidate: " + ", ".join(f"{n} {v}" for n, v in report["candidate"].items()),
        "",
        f"{'baseline -> candidate':<22}" + "".join(f"{n:>10}" for n in names),
    ]
    for a in names:
        lines.append(f"{a:<22}" + "".join(f"{report['matrix'][f'{a}->{b}']:>10}" for b in names))
    m = report["metrics"]
    changed = f"changed: {sum(report['transitions'].values())} ({m['changed']:.2%})"
    if report["borderline"]:
        shaky = ", ".join(f"{k} {v}" for k, v in report["borderline"].items())
        changed += f", and {sum(report['borderline'].values())} borderline (too close to a threshold to tell: {shaky})"
    base, cand = report["volume"]["baseline"], report["volume"]["candidate"]

    def volume(outcome: str) -> str:
        change = f"{m[outcome + '_volume_increase']:+.1%}" if base[outcome] else "from none"
        return f"{outcome} volume: {base[outcome]} -> {cand[outcome]} ({change})"

    lines += [
        "",
        changed,
        f"{volume('review')}; {volume('flag')}; baseline flags no longer flagged: {m['flag_recall_drop']:.1%}",
    ]
    moved = [c for c in report["categories"] if any(c[k] for k in ("flag_up", "flag_down", "review_up", "review_down"))]
    if moved:
        lines += ["", f"{'category':<32}{'flag +':>8}{'flag -':>8}{'review +':>10}{'review -':>10}"]
        for c in moved:
            lines.append(f"{c['category']:<32}{c['flag_up']:>8}{c['flag_down']:>8}{c['review_up']:>10}"
                         f"{c['review_down']:>10}")  # fmt: skip
    if "verdicts" in report:
        v = report["verdicts"]

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.1%}"

        lines += ["", f"on {v['labelled']} events with a reviewer's verdict ({v['violations']} violations, "
                      f"{v['sampled']} audit samples weighted by 1/rate):",
                  f"{'':<12}{'flag precision':>16}{'flag recall':>14}{'flag or review recall':>24}"]  # fmt: skip
        for side in ("baseline", "candidate"):
            m = v[side]
            lines.append(f"{side:<12}{pct(m['flag_precision']):>16}{pct(m['flag_recall']):>14}"
                         f"{pct(m['caught_recall']):>24}")  # fmt: skip
    if report["examples"]:
        lines += ["", "examples:"] + [f"  {k}: {', '.join(v)}" for k, v in report["examples"].items()]
    for line in failed:
        lines.append(f"FAIL: {line}")
    return "\n".join(lines)
