"""``moderator calibrate``: thresholds proposed from reviewers' verdicts, with a report.

1. The policy as written (its file in ``MODERATOR_POLICY_DIR``, ``--policy-file``, or its live
   published version with ``MODERATOR_POLICY_SOURCE=kafka``) and its compiled form.
2. The verdicts on its decisions (the verdicts topic, latest revision per event; escalations wait).
   Each judged decision's scores are used as recorded when it was decided under the current version;
   otherwise its embedding is re-scored from the embeddings log (a verdict on an event the log no
   longer has is left out, and counted).
3. Per category with a target (flags, else the category's ``target``): the weighted curve and the
   proposals (``calibration.py``), the hints (the texts nearest to overturned items), a PNG plot.
4. The proposed file (only the thresholds changed), validated; ``moderator replay`` of it against the
   stored traffic; ``report.json`` and ``report.md`` in ``--out``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderator.app import App
from moderator.calibration import Curve, Judged, curve, propose_flag, propose_review
from moderator.events import FINAL_VERDICTS, Verdict
from moderator.policy import (
    CompiledPolicy,
    PolicySpec,
    audit_draw,
    explanations,
    load_spec,
    parse_spec,
    policy_files,
)
from moderator.policy.rewrite import set_thresholds
from moderator.replay import read_log, read_verdicts, run_replay

HINT_ITEMS = 200  # overturned items per category looked at for hints


class CalibrateError(RuntimeError):
    """Calibration cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Options:
    policy: str
    policy_file: Path | None = None
    target_precision: float | None = None
    target_recall: float | None = None
    min_samples: int = 30
    confidence: float = 0.95
    out: Path = Path("calibration")


def policy_text(app: App, opts: Options) -> tuple[str, str]:
    """The policy's YAML as written, and where it came from."""
    if opts.policy_file is not None:
        return opts.policy_file.read_text(encoding="utf-8"), str(opts.policy_file)
    s = app.settings
    if s.policy_source == "kafka":
        from moderator.policy.topic import live, read_published

        published = live(read_published(s)).get(opts.policy)
        if published is None:
            raise CalibrateError(f"policy {opts.policy!r} was never published (moderator policy status)")
        return published.yaml, f"{s.topic('policies')}:{opts.policy}@{published.version}"
    for path in policy_files([s.policy_dir]):
        try:
            if load_spec(path).name == opts.policy:
                return path.read_text(encoding="utf-8"), str(path)
        except Exception:  # an invalid neighbour is not this command's business
            continue
    raise CalibrateError(f"no policy {opts.policy!r} in {s.policy_dir} (MODERATOR_POLICY_DIR, or --policy-file)")


def _truth(v: Verdict, category: str) -> bool:
    """A confirm counts for the categories the reviewer confirmed (all that fired if none was named)."""
    if v.verdict != "confirm":
        return False
    if v.categories:
        return category in v.categories
    return any(t.category == category for t in v.judged.triggered)


@dataclass(frozen=True)
class Judgements:
    verdicts: list[Verdict]
    scores: np.ndarray  # [N, C] in the policy's current category order
    weights: np.ndarray  # [N]: 1 / the probability that the verdict's decision was judged
    embeddings: dict[str, np.ndarray]  # event id -> its logged embedding (what the log has)
    left_out: int  # judged under another version and not in the log any more
    rescored: int
    judged_share: dict[str, float | None]  # of the logged review decisions, and of the audit samples


def judged_shares(
    spec: PolicySpec, logged_ids: list[str], logged_live: list[dict[str, Any]], verdicts: list[Verdict]
) -> dict[str, float | None]:
    """What share of the policy's review decisions in the embeddings log has a verdict, and of its
    audit samples (which events were sampled follows from their ids and the policy's ``audit``
    rates). None: nothing to measure it on. A share below 1 (a queue not yet worked down) scales the
    weights of that stratum's verdicts, assuming the judged ones are a random subset of it."""
    judged_review = {v.event_id for v in verdicts if not v.sampled and v.judged.decision == "review"}
    judged_sampled = {v.event_id for v in verdicts if v.sampled}
    review = sampled = review_hit = sampled_hit = 0
    for eid, live in zip(logged_ids, logged_live, strict=True):
        if live["policy"]["name"] != spec.name:
            continue
        outcome = live["decision"]
        if outcome == "review":
            review += 1
            review_hit += eid in judged_review
        elif spec.audit is not None and audit_draw(eid) < spec.audit.rate(outcome):
            sampled += 1
            sampled_hit += eid in judged_sampled
    return {"review": review_hit / review if review_hit else None,
            "audit_samples": sampled_hit / sampled if sampled_hit else None}  # fmt: skip


def judgements(app: App, policy: CompiledPolicy) -> Judgements:
    name, version = policy.spec.name, policy.version
    verdicts = [v for v in read_verdicts(app).values()
                if v.verdict in FINAL_VERDICTS and v.judged.policy.name == name]  # fmt: skip
    logged = read_log(app, policy.model, image_precision=None)  # any precision: re-scored under this one
    row = {eid: i for i, eid in enumerate(logged.ids)}
    keep: list[Verdict] = []
    scores: list[np.ndarray] = []
    stale: list[int] = []
    left_out = 0
    for v in verdicts:
        if v.judged.policy.version == version:
            keep.append(v)
            scores.append(np.array([v.judged.scores.get(c, np.nan) for c in policy.categories]))
        elif v.event_id in row:
            stale.append(len(keep))
            keep.append(v)
            scores.append(np.zeros(len(policy.categories)))
        else:
            left_out += 1
    matrix = np.array(scores).reshape(len(keep), len(policy.categories))
    if stale:
        vectors = torch.from_numpy(logged.vectors[[row[keep[i].event_id] for i in stale]])
        matrix[stale] = policy.scores(vectors.to(policy.matrix.device))
    embeddings = {v.event_id: logged.vectors[row[v.event_id]] for v in keep if v.event_id in row}
    shares = judged_shares(policy.spec, logged.ids, logged.live, keep)
    review_share, sampled_share = shares["review"] or 1.0, shares["audit_samples"] or 1.0
    weights = np.array([1.0 / (v.sample_rate * sampled_share) if v.sampled and v.sample_rate
                        else 1.0 / review_share if v.judged.decision == "review" else 1.0
                        for v in keep])  # fmt: skip
    return Judgements(keep, matrix, weights, embeddings, left_out, len(stale), shares)


def hints(policy: CompiledPolicy, category: str, overturned: list[np.ndarray]) -> dict[str, Any]:
    """The descriptions and contrasts nearest to the category's overturned (false-positive) items:
    the description most often closest is what the false positives look like to the model; a contrast
    written near it (or the closest contrast made more specific) is the usual fix."""
    if not overturned:
        return {"overturned": 0, "descriptions": [], "contrasts": [], "neutral": []}
    embeds = torch.from_numpy(np.stack(overturned[:HINT_ITEMS])).to(policy.matrix.device)
    per_item = [next(c for c in cats if c.category == category) for cats in explanations(policy, embeds, top=1)]

    def tally(lists: list[list[Any]]) -> list[dict[str, Any]]:
        counts: Counter[str] = Counter()
        sims: dict[str, list[float]] = {}
        for matches in lists:
            for m in matches[:1]:
                counts[m.text] += 1
                sims.setdefault(m.text, []).append(m.similarity)
        return [{"text": t, "nearest_to": n, "mean_similarity": round(float(np.mean(sims[t])), 4)}
                for t, n in counts.most_common(3)]  # fmt: skip

    return {
        "overturned": len(overturned),
        "descriptions": tally([e.closest_descriptions for e in per_item]),
        "contrasts": tally([e.closest_contrasts for e in per_item]),
        "neutral": tally([e.closest_neutral for e in per_item]),
    }


def _targets(spec: PolicySpec, opts: Options) -> dict[str, tuple[float | None, float | None]]:
    out = {}
    for c in spec.categories:
        if not c.enabled:
            continue
        precision = opts.target_precision or (c.target.precision if c.target else None)
        recall = opts.target_recall or (c.target.recall if c.target else None)
        if precision is not None or recall is not None:
            out[c.name] = (precision, recall)
    return out


def run_calibrate(app: App, opts: Options) -> dict[str, Any]:
    text, origin = policy_text(app, opts)
    spec = parse_spec(text, origin)
    targets = _targets(spec, opts)
    if not targets:
        raise CalibrateError(f"no targets: give --target-precision and/or --target-recall, or set `target:` on "
                             f"categories of {origin}")  # fmt: skip
    policy = app.compile(spec, origin)
    judged = judgements(app, policy)
    opts.out.mkdir(parents=True, exist_ok=True)
    categories: dict[str, Any] = {}
    changes: dict[str, dict[str, float]] = {}
    by_name = {c.name: c for c in spec.categories}
    sampled = np.array([v.sampled and bool(v.sample_rate) for v in judged.verdicts], dtype=bool)
    weight = judged.weights
    for j, name in enumerate(policy.categories):
        if name not in targets:
            continue
        cat = by_name[name]
        precision_target, recall_target = targets[name]
        scores = judged.scores[:, j]
        known = np.isfinite(scores)
        truth = np.array([_truth(v, name) for v in judged.verdicts], dtype=bool)
        items = Judged(scores[known], truth[known], weight[known], sampled[known])
        c = curve(items)
        flag = propose_flag(c, precision_target, opts.confidence, opts.min_samples) if precision_target else None
        review = propose_review(c, recall_target, opts.confidence, opts.min_samples) if recall_target else None
        notes = []
        new_flag = _round_up(flag.threshold) if flag and flag.threshold is not None else None
        new_review = _round_down(review.threshold) if review and review.threshold is not None else None
        if new_review is not None and new_review > (new_flag if new_flag is not None else cat.flag):
            notes.append(f"the proposed review threshold {new_review} is above the flag threshold: set to it")
            new_review = new_flag if new_flag is not None else cat.flag
        if new_flag is not None and new_review is None and new_flag < cat.review:
            notes.append(f"the proposed flag threshold {new_flag} is below the review threshold: review set to it")
            new_review = new_flag
        change = {k: v for k, v in (("flag", new_flag), ("review", new_review)) if v is not None}
        if change:
            changes[name] = change
        overturned = [judged.embeddings[v.event_id] for v in judged.verdicts
                      if v.verdict == "overturn" and v.event_id in judged.embeddings
                      and any(t.category == name for t in v.judged.triggered)]  # fmt: skip
        total_w = float(items.weight.sum())
        categories[name] = {
            "targets": {"precision": precision_target, "recall": recall_target},
            "current": {"flag": cat.flag, "review": cat.review},
            "proposed": {"flag": new_flag, "review": new_review},
            "flag": flag.to_dict() if flag else None,
            "review": review.to_dict() if review else None,
            "verdicts": int(known.sum()), "confirmed": int(items.positive.sum()),
            "overturned": int((~items.positive).sum()), "audit_samples": int(items.sampled.sum()),
            "share_of_estimate_from_samples": round(float(items.weight[items.sampled].sum()) / total_w, 4)
            if total_w else 0.0,
            "at_current": _at(c, cat.flag, cat.review),
            "unweighted_at_current": _at(curve(items.unweighted()), cat.flag, cat.review),
            "hints": hints(policy, name, overturned),
            "notes": notes,
            "plot": None,
        }  # fmt: skip
        if len(c.thresholds):
            plot = opts.out / f"pr-{name}.png"
            draw_curve(plot, name, c, curve(items.unweighted()), cat.flag, cat.review, new_flag, new_review,
                       precision_target, recall_target)  # fmt: skip
            categories[name]["plot"] = str(plot)
    report: dict[str, Any] = {
        "policy": spec.name, "version": policy.version, "source": origin, "model": policy.model,
        "confidence": opts.confidence, "bound": "exact binomial (Clopper-Pearson) on the Kish effective size "
        "(precision); per-stratum exact Poisson bounds on the missed positives (recall); fixed-sequence scan",
        "verdicts": len(judged.verdicts), "rescored_from_log": judged.rescored,
        "left_out_not_in_log": judged.left_out, "judged_share": judged.judged_share, "warnings": _warnings(judged),
        "categories": categories, "proposed_file": None, "replay": None,
    }  # fmt: skip
    if changes:
        proposed = opts.out / f"{spec.name}.yaml"
        proposed.write_text(set_thresholds(text, changes, origin), encoding="utf-8")
        report["proposed_file"] = str(proposed)
        replay = run_replay(app, proposed)
        report["replay"] = {k: replay[k] for k in ("replayed", "matrix", "volume", "metrics") if k in replay}
        from moderator.replay import render

        (opts.out / "replay.txt").write_text(render(replay) + "\n", encoding="utf-8")
    (opts.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (opts.out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _warnings(judged: Judgements) -> list[str]:
    out = []
    for stratum, share in judged.judged_share.items():
        if share is not None and share < 0.9:
            out.append(f"only {share:.0%} of the logged {stratum.replace('_', ' ')} have a verdict: their verdicts are "
                       "weighted up accordingly, assuming the judged ones are a random subset (a queue worked by "
                       "priority is not); calibrate again once the queue is worked down")  # fmt: skip
    return out


def _round_up(t: float) -> float:
    return float(np.ceil(t * 10_000) / 10_000)


def _round_down(t: float) -> float:
    return float(np.floor(t * 10_000) / 10_000)


def _at(c: Curve, flag: float, review: float) -> dict[str, float | None]:
    """The weighted precision at the current flag threshold and recall at the review one."""

    def point(t: float) -> int | None:
        idx = np.flatnonzero(c.thresholds >= t)
        return int(idx[-1]) if len(idx) else None

    pf, pr = point(flag), point(review)
    return {"flag_precision": round(float(c.precision[pf]), 4) if pf is not None else None,
            "review_recall": round(float(c.recall[pr]), 4) if pr is not None else None}  # fmt: skip


def draw_curve(
    path: Path,
    name: str,
    c: Curve,
    unweighted: Curve,
    flag: float,
    review: float,
    new_flag: float | None,
    new_review: float | None,
    precision_target: float | None,
    recall_target: float | None,
) -> None:
    """The category's precision-recall curve, with the current and proposed thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    ax.plot(c.recall, c.precision, color="#1f5fa8", lw=2, label="weighted by 1 / sampling rate")
    ax.plot(unweighted.recall, unweighted.precision, color="#999999", lw=1, ls="--", label="unweighted (biased)")

    def mark(t: float | None, style: str, label: str) -> None:
        if t is None:
            return
        idx = np.flatnonzero(c.thresholds >= t)
        if len(idx):
            k = int(idx[-1])
            ax.plot(c.recall[k], c.precision[k], style, ms=9, label=f"{label} {t:g}")

    mark(flag, "o", "flag now")
    mark(review, "s", "review now")
    mark(new_flag, "*", "flag proposed")
    mark(new_review, "D", "review proposed")
    if precision_target:
        ax.axhline(precision_target, color="#c0392b", lw=0.8, ls=":", label=f"target precision {precision_target}")
    if recall_target:
        ax.axvline(recall_target, color="#27ae60", lw=0.8, ls=":", label=f"target recall {recall_target}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (of confirmed violations, over all traffic)")
    ax.set_ylabel("precision (of decisions at or above the threshold)")
    ax.set_title(f"{name}: precision-recall from reviewer verdicts")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, c in report["categories"].items():
        for rule, target in (("flag", "precision"), ("review", "recall")):
            p = c[rule]
            if p is None:
                continue
            rows.append({"category": name, "threshold": rule, "target": f"{target} {c['targets'][target]}",
                         "current": round(c["current"][rule], 4),
                         "proposed": c["proposed"][rule] if p["threshold"] else "-",
                         "estimate": p["estimate"], "lower_bound": p["lower"], "verdicts": p["count"],
                         "why_not": p["reason"] + (f"; need {p['needed']}" if p["needed"] else "")})  # fmt: skip
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Calibration of {report['policy']} ({report['version']})", "",
             f"{report['verdicts']} verdicts ({report['rescored_from_log']} re-scored from the embeddings log, "
             f"{report['left_out_not_in_log']} left out: judged under another version and no longer logged); "
             f"confidence {report['confidence']}; bound: {report['bound']}.",
             f"Share of the logged decisions judged: {report['judged_share']}.",
             *[f"WARNING: {w}" for w in report["warnings"]], "",
             "| category | threshold | target | current | proposed | estimate | lower bound | verdicts | why not |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    columns = ("category", "threshold", "target", "current", "proposed", "estimate", "lower_bound", "verdicts",
               "why_not")  # fmt: skip
    for r in summary_rows(report):
        lines.append("| " + " | ".join(str(r[k]) for k in columns) + " |")
    for name, c in report["categories"].items():
        lines += ["", f"## {name}", "",
                  f"{c['verdicts']} verdicts: {c['confirmed']} confirmed, {c['overturned']} not; "
                  f"{c['audit_samples']} audit samples carry {c['share_of_estimate_from_samples']:.0%} of the weight.",
                  f"At the current thresholds: {c['at_current']} "
                  f"(unweighted, biased: {c['unweighted_at_current']})."]  # fmt: skip
        if c["plot"]:
            lines.append(f"![{name}]({Path(c['plot']).name})")
        h = c["hints"]
        if h["overturned"]:
            lines.append(f"Nearest to its {h['overturned']} overturned items: descriptions "
                         + ", ".join(f"\"{d['text']}\" ({d['nearest_to']})" for d in h["descriptions"])
                         + "; contrasts " + (", ".join(f"\"{d['text']}\" ({d['nearest_to']})" for d in h["contrasts"])
                                             or "none (add one)") + ".")  # fmt: skip
        lines += [f"- {n}" for n in c["notes"]]
    if report["replay"]:
        lines += ["", "## Replay of the proposal", "", "See replay.txt."]
    return "\n".join(lines) + "\n"
