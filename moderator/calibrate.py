"""``moderator calibrate``: thresholds proposed from reviewers' verdicts, with bounds that hold, and a report.

1. The policy as written (its file in ``MODERATOR_POLICY_DIR``, ``--policy-file``, or its live
   published version with ``MODERATOR_POLICY_SOURCE=kafka``) and its compiled form.
2. The window: the policy's decisions in the embeddings log (``--since`` / ``--until``), each with its
   scores under this version (as recorded when decided under it, else re-scored from its embedding)
   and its sampling design as the worker recorded it (review probability, audit sample). Records from
   before the design was recorded are left out, and counted.
3. The verdicts on them: the current verdict on the same bytes (event id and image sha256); only those
   on decisions the design drew for review count (a retroactive bank-scan item or an item claimed by id
   was chosen otherwise, and is left out, counted), and second opinions (double review) are kept apart
   for the agreement figures.
4. Per category with a target (flags, else the category's ``target``): the counts per stratum, the
   proposals (``calibration.py``), the hints (the texts nearest to overturned items), a PNG plot, and
   with ``--holdout-after`` the proposal measured on the later decisions it was not chosen on.
5. The proposed file (only the thresholds changed), validated; ``moderator replay`` of it against the
   stored traffic (in-sample: it saw the verdicts that chose it); ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderator.app import App
from moderator.calibration import (
    PENDING,
    Counts,
    Population,
    Stratum,
    candidates,
    cohens_kappa,
    counts,
    precision_bounds,
    propose_flag,
    propose_review,
    recall_bounds,
    with_disagreement,
)
from moderator.events import FINAL_VERDICTS, Verdict
from moderator.policy import CompiledPolicy, PolicySpec, explanations, load_spec, parse_spec, policy_files
from moderator.policy.rewrite import set_thresholds
from moderator.replay import logged_scores, read_log, read_verdicts, run_replay

HINT_ITEMS = 200  # overturned items per category looked at for hints
DECIMALS = 4  # thresholds are proposed on this grid (what a policy file shows)


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
    joint: bool = False  # the confidence holds for all proposals at once (Bonferroni), not each
    max_review_share: float = 0.5  # no review threshold that sends more of the traffic to review
    since: datetime | None = None  # the window, by decision time
    until: datetime | None = None
    holdout_after: datetime | None = None  # decisions after it are not used to choose, only to measure
    include_appeals: bool = False  # an appeal's verdict replaces the event's earlier one (a corrected label)
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


def _time(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass
class Window:
    """The policy's logged decisions in the window, their sampling design, and the verdicts on them."""

    ids: list[str]
    scores: np.ndarray  # [N, C] in the policy's category order
    vectors: np.ndarray  # [N, D] their logged embeddings (for the hints)
    outcome: np.ndarray  # str [N]: the live decision
    probability: np.ndarray  # float [N]: that it went to review, by the design
    selected: np.ndarray  # bool [N]: drawn for review by the design
    decided: np.ndarray  # float [N]: decision time (POSIX seconds)
    verdicts: list[Verdict | None]  # the current verdict on the same bytes (drawn decisions only)
    seconds: list[Verdict | None]  # a second reviewer's independent verdict (double review)
    left_out: dict[str, int] = field(default_factory=dict)  # what was not used, and why

    def rows(self, mask: np.ndarray) -> Window:
        idx = np.flatnonzero(mask)
        return Window([self.ids[i] for i in idx], self.scores[idx], self.vectors[idx], self.outcome[idx],
                      self.probability[idx], self.selected[idx], self.decided[idx],
                      [self.verdicts[i] for i in idx], [self.seconds[i] for i in idx], dict(self.left_out))  # fmt: skip

    def population(self, j: int, name: str) -> Population:
        """Category ``name`` (column ``j``) as the calibration maths sees it."""
        keys = sorted(set(zip(self.outcome.tolist(), self.probability.tolist(), strict=True)))
        index = {k: h for h, k in enumerate(keys)}
        stratum = np.array([index[k] for k in zip(self.outcome.tolist(), self.probability.tolist(), strict=True)],
                           dtype=np.int64)  # fmt: skip
        label = np.full(len(self.ids), PENDING, dtype=np.int8)
        for i, v in enumerate(self.verdicts):
            if v is not None and v.verdict in FINAL_VERDICTS and self.selected[i]:
                label[i] = int(_truth(v, name))
        scores = self.scores[:, j] if len(self.ids) else np.zeros(0)
        return Population(scores, stratum, tuple(Stratum(o, p) for o, p in keys), self.selected, label)


def read_window(app: App, policy: CompiledPolicy, opts: Options) -> Window:
    """Steps 2 and 3 of the module docstring."""
    name, version = policy.spec.name, policy.version
    logged = read_log(app, policy.model, image_precision=None)  # any precision: re-scored under this one
    verdicts = read_verdicts(app, include_appeals=opts.include_appeals)
    since = opts.since.timestamp() if opts.since else -np.inf
    until = opts.until.timestamp() if opts.until else np.inf
    left_out: Counter[str] = Counter()
    rows: list[int] = []
    for i, live in enumerate(logged.live):
        if live["policy"]["name"] != name:
            continue
        if not since <= _time(logged.decided_at[i]) < until:
            continue
        if logged.review_probability[i] is None:
            left_out["decisions logged before the sampling design was recorded"] += 1
            continue
        rows.append(i)
    ids = [logged.ids[i] for i in rows]
    shas = [logged.image_sha256[i] for i in rows]
    probability = np.array([logged.review_probability[i] for i in rows], dtype=float)
    selected = np.array([logged.sampled[i] for i in rows], dtype=bool) | (probability >= 1.0)
    matrix = np.zeros((len(rows), len(policy.categories)))
    stale = [k for k, i in enumerate(rows) if logged.live[i]["policy"]["version"] != version]
    for k, i in enumerate(rows):
        if logged.live[i]["policy"]["version"] == version:
            matrix[k] = [logged.live[i]["scores"].get(c, np.nan) for c in policy.categories]
    if stale:
        matrix[stale] = logged_scores(policy, logged, [rows[k] for k in stale])
    current: list[Verdict | None] = []
    seconds: list[Verdict | None] = []
    for k, (eid, sha) in enumerate(zip(ids, shas, strict=True)):
        v = verdicts.of(eid, sha)
        if v is not None and not selected[k]:
            left_out["verdicts on decisions the design did not draw (retroactive items, items claimed by id)"] += 1
            v = None
        current.append(v)
        seconds.append(verdicts.second_of(eid, sha) if v is not None else None)
    window_keys, window_ids = set(zip(ids, shas, strict=True)), set(ids)
    logged_sha = dict(zip(logged.ids, logged.image_sha256, strict=True))
    for (eid, sha), v in verdicts.current.items():
        if v.judged.policy.name != name or (eid, sha) in window_keys or (sha is None and eid in window_ids):
            continue
        if eid not in logged_sha:
            left_out["verdicts on decisions no longer in the embeddings log"] += 1
        elif sha is not None and logged_sha[eid] not in (None, sha):
            left_out["verdicts on another image than the one now logged under their event id"] += 1
    return Window(ids, matrix, logged.vectors[rows] if rows else np.zeros((0, 0), np.float32),
                  np.array([logged.live[i]["decision"] for i in rows], dtype=object), probability, selected,
                  np.array([_time(logged.decided_at[i]) for i in rows]), current, seconds, dict(left_out))  # fmt: skip


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


def strata_table(c: Counts) -> list[dict[str, Any]]:
    """Per stratum: decisions, drawn for review, judged, still waiting, confirmed violations."""
    t = c.total
    if not len(c.thresholds):
        return []
    return [{"stratum": s.name, "outcome": s.outcome, "review_probability": s.probability,
             "decisions": int(t.population[0, h]), "drawn": int(t.selected[0, h]), "judged": int(t.judged[0, h]),
             "waiting": int(t.pending[0, h]), "violations": int(t.positive[0, h])}
            for h, s in enumerate(c.strata)]  # fmt: skip


def at_thresholds(pop: Population, flag: float | None, review: float | None, confidence: float) -> dict[str, Any]:
    """Precision at ``flag`` and recall at ``review``: estimates and lower bounds, each a single test."""
    out: dict[str, Any] = {}
    for rule, t, bounds in (("flag_precision", flag, precision_bounds), ("review_recall", review, recall_bounds)):
        if t is None:
            continue
        estimate, lower = bounds(counts(pop, np.array([t])), confidence)
        out[rule] = {"threshold": t, "estimate": _r(estimate[0]), "lower": _r(lower[0])}
    return out


def _r(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


def agreement(window: Window, name: str) -> dict[str, Any]:
    """Cohen's kappa of the first and second reviewers on the double-reviewed decisions."""
    pairs = [(v, s) for v, s in zip(window.verdicts, window.seconds, strict=True)
             if v is not None and s is not None and {v.verdict, s.verdict} <= set(FINAL_VERDICTS)]  # fmt: skip
    first = np.array([_truth(v, name) for v, _ in pairs], dtype=bool)
    second = np.array([_truth(s, name) for _, s in pairs], dtype=bool)
    kappa = cohens_kappa(first, second)
    disagree = float(np.mean(first != second)) if pairs else None
    return {"pairs": len(pairs), "kappa": _r(kappa) if kappa is not None else None,
            "disagreement": _r(disagree) if disagree is not None else None}  # fmt: skip


def run_calibrate(app: App, opts: Options) -> dict[str, Any]:
    text, origin = policy_text(app, opts)
    spec = parse_spec(text, origin)
    targets = _targets(spec, opts)
    if not targets:
        raise CalibrateError(f"no targets: give --target-precision and/or --target-recall, or set `target:` on "
                             f"categories of {origin}")  # fmt: skip
    policy = app.compile(spec, origin)
    whole = read_window(app, policy, opts)
    if not len(whole.ids):
        raise CalibrateError(f"no decisions of {spec.name!r} with a recorded sampling design in the embeddings log"
                             " (and the window): calibration needs MODERATOR_EMBEDDINGS_ENABLED=true on the workers"
                             " (the default) and decisions made since")  # fmt: skip
    if opts.holdout_after is not None:
        later = whole.decided >= opts.holdout_after.timestamp()
        window, holdout = whole.rows(~later), whole.rows(later)
    else:
        window, holdout = whole, None
    tests = sum((p is not None) + (r is not None) for p, r in targets.values())
    confidence = 1 - (1 - opts.confidence) / tests if opts.joint else opts.confidence
    opts.out.mkdir(parents=True, exist_ok=True)
    categories: dict[str, Any] = {}
    changes: dict[str, dict[str, float]] = {}
    by_name = {c.name: c for c in spec.categories}
    for j, name in enumerate(policy.categories):
        if name not in targets:
            continue
        cat = by_name[name]
        precision_target, recall_target = targets[name]
        pop = window.population(j, name)
        c = counts(pop, candidates(pop, decimals=DECIMALS))
        flag = propose_flag(c, precision_target, confidence, opts.min_samples) if precision_target else None
        review = (propose_review(c, recall_target, confidence, opts.min_samples, opts.max_review_share)
                  if recall_target else None)  # fmt: skip
        notes = []
        new_flag = flag.threshold if flag else None
        new_review = review.threshold if review else None
        if new_review is not None and new_review > (new_flag if new_flag is not None else cat.flag):
            notes.append(f"the proposed review threshold {new_review} is above the flag threshold: set to it")
            new_review = new_flag if new_flag is not None else cat.flag
        if new_flag is not None and new_review is None and new_flag < cat.review:
            notes.append(f"the proposed flag threshold {new_flag} is below the review threshold: review set to it")
            new_review = new_flag
        change = {k: v for k, v in (("flag", new_flag), ("review", new_review)) if v is not None}
        if change:
            changes[name] = change
        overturned = [window.vectors[i] for i, v in enumerate(window.verdicts)
                      if v is not None and v.verdict == "overturn" and pop.selected[i]
                      and any(t.category == name for t in v.judged.triggered)]  # fmt: skip
        agree = agreement(window, name)
        if agree["disagreement"]:
            shaken = with_disagreement(c, agree["disagreement"])
            for rule, proposal, bounds in (("flag", flag, precision_bounds), ("review", review, recall_bounds)):
                if proposal is not None and proposal.threshold is not None:
                    k = int(np.flatnonzero(c.thresholds == proposal.threshold)[0])
                    agree[f"{rule}_lower_under_disagreement"] = _r(bounds(shaken.row(k), confidence)[1][0])
        categories[name] = {
            "targets": {"precision": precision_target, "recall": recall_target},
            "current": {"flag": cat.flag, "review": cat.review},
            "proposed": {"flag": new_flag, "review": new_review},
            "flag": flag.to_dict() if flag else None,
            "review": review.to_dict() if review else None,
            "strata": strata_table(c),
            "verdicts": int(pop.judged.sum()), "confirmed": int((pop.label == 1).sum()),
            "overturned": int((pop.label == 0).sum()), "waiting": int((pop.selected & (pop.label == PENDING)).sum()),
            "at_current": at_thresholds(pop, cat.flag, cat.review, confidence),
            "agreement": agree,
            "holdout": _holdout(holdout, j, name, new_flag, new_review, confidence),
            "hints": hints(policy, name, overturned),
            "notes": notes,
            "plot": None,
        }  # fmt: skip
        if len(c.thresholds):
            plot = opts.out / f"pr-{name}.png"
            draw_curve(plot, name, c, confidence, cat.flag, cat.review, new_flag, new_review, precision_target,
                       recall_target)  # fmt: skip
            categories[name]["plot"] = str(plot)
    report: dict[str, Any] = {
        "policy": spec.name, "version": policy.version, "source": origin, "model": policy.model,
        "confidence": opts.confidence, "confidence_per_test": round(confidence, 6), "tests": tests,
        "guarantee": _guarantee(opts, tests, confidence),
        "bound": "per stratum, exact counts of the decisions from the embeddings log and Clopper-Pearson bounds on "
                 "their judged samples, Bonferroni over the strata; waiting items as the worst case; fixed-sequence "
                 "scan from a start chosen by counts alone",
        "window": {"decisions": len(window.ids), "since": opts.since.isoformat() if opts.since else None,
                   "until": opts.until.isoformat() if opts.until else None,
                   "holdout_after": opts.holdout_after.isoformat() if opts.holdout_after else None,
                   "holdout_decisions": len(holdout.ids) if holdout is not None else None},
        "verdicts": sum(v is not None for v in window.verdicts), "left_out": whole.left_out,
        "warnings": _warnings(categories),
        "categories": categories, "proposed_file": None, "replay": None,
    }  # fmt: skip
    if changes:
        proposed = opts.out / f"{spec.name}.yaml"
        proposed.write_text(set_thresholds(text, changes, origin), encoding="utf-8")
        report["proposed_file"] = str(proposed)
        replay = run_replay(app, proposed)
        report["replay"] = {k: replay[k] for k in ("replayed", "matrix", "volume", "metrics") if k in replay}
        report["replay"]["in_sample"] = True  # the verdicts it reports on chose the thresholds
        from moderator.replay import render

        (opts.out / "replay.txt").write_text(
            "IN-SAMPLE: the verdicts below are the ones that chose these thresholds; see the holdout figures in "
            "report.md for a measure on decisions they were not chosen on (--holdout-after).\n\n"
            + render(replay) + "\n", encoding="utf-8")  # fmt: skip
    (opts.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (opts.out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _holdout(
    holdout: Window | None, j: int, name: str, flag: float | None, review: float | None, confidence: float
) -> dict[str, Any] | None:
    """The proposal on the decisions after --holdout-after (which did not choose it): single tests."""
    if holdout is None:
        return None
    pop = holdout.population(j, name)
    return {"decisions": len(holdout.ids), "verdicts": int(pop.judged.sum()),
            **at_thresholds(pop, flag, review, confidence)}  # fmt: skip


def _guarantee(opts: Options, tests: int, confidence: float) -> str:
    per = f"{confidence:.4g}" if opts.joint else f"{opts.confidence:g}"
    scope = (f"jointly: all {tests} proposals hold together with probability at least {opts.confidence:g} "
             f"(Bonferroni: each at {per})" if opts.joint else
             f"per threshold: each proposal holds with probability at least {per}; with {tests} proposals, the chance "
             f"that one of them misses its target can reach {min(1.0, tests * (1 - opts.confidence)):.2g} "
             "(--joint bounds them together)")  # fmt: skip
    return (f"A proposed flag threshold's precision, and a review threshold's recall, over the decisions of the "
            f"window (not future traffic, which the holdout figures speak to), {scope}. It assumes the verdicts are "
            "right: label noise (see the agreement figures) and reviewers who see near-duplicates together are "
            "outside it.")  # fmt: skip


def _warnings(categories: dict[str, Any]) -> list[str]:
    out = []
    for name, c in categories.items():
        for s in c["strata"]:
            if s["drawn"] and s["waiting"] > 0.1 * s["drawn"]:
                out.append(f"{name}: {s['waiting']} of the {s['drawn']} drawn {s['stratum']} decisions still wait "
                           "for a verdict: the bounds count them as the worst case; calibrate again once the queue is "
                           "worked down, or end the window earlier (--until)")  # fmt: skip
            if s["review_probability"] == 0 and s["decisions"]:
                out.append(f"{name}: {s['decisions']} {s['outcome']} decisions had no audit sampling: what they hold "
                           "cannot be bounded (set the policy's audit rates)")  # fmt: skip
    return out


def draw_curve(
    path: Path,
    name: str,
    c: Counts,
    confidence: float,
    flag: float,
    review: float,
    new_flag: float | None,
    new_review: float | None,
    precision_target: float | None,
    recall_target: float | None,
) -> None:
    """The category's precision-recall curve (estimates, and the lower bounds the proposals rest on),
    with the current and proposed thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precision, precision_lower = precision_bounds(c, confidence)
    recall, recall_lower = recall_bounds(c, confidence)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    ax.plot(recall, precision, color="#1f5fa8", lw=2, label="estimate (by sampling stratum)")
    ax.plot(recall_lower, precision_lower, color="#1f5fa8", lw=1, ls="--", label=f"lower bounds ({confidence:g})")

    def mark(t: float | None, style: str, label: str) -> None:
        if t is None:
            return
        idx = np.flatnonzero(c.thresholds >= t)
        if len(idx):
            k = int(idx[-1])
            ax.plot(recall[k], precision[k], style, ms=9, label=f"{label} {t:g}")

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
    ax.set_xlabel("recall (of violations, over the window's traffic)")
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
                         "proposed": c["proposed"][rule] if p["threshold"] is not None else "-",
                         "estimate": _r(p["estimate"]) if p["estimate"] is not None else None,
                         "lower_bound": _r(p["lower"]) if p["lower"] is not None else None, "verdicts": p["count"],
                         "why_not": p["reason"] + (f"; need: {p['needed']}" if p["needed"] else "")})  # fmt: skip
    return rows


def _at_text(at: dict[str, Any]) -> str:
    """``{flag_precision: {threshold, estimate, lower}, review_recall: ...}`` for a person."""
    parts = []
    for key, what in (("flag_precision", "flag"), ("review_recall", "review")):
        if key in at:
            m = at[key]
            parts.append(
                f"{what} at {m['threshold']:.4g}: {key.split('_')[1]} {m['estimate']} (lower bound {m['lower']})"
            )
    return "; ".join(parts)


def render_markdown(report: dict[str, Any]) -> str:
    w = report["window"]
    lines = [f"# Calibration of {report['policy']} ({report['version']})", "",
             f"{w['decisions']} decisions in the window, {report['verdicts']} verdicts on the ones drawn for review; "
             f"confidence {report['confidence']} ({report['tests']} tests); bound: {report['bound']}.", "",
             f"**What the guarantee is.** {report['guarantee']}", "",
             *[f"Left out: {why} ({n})." for why, n in report["left_out"].items()],
             *[f"WARNING: {x}" for x in report["warnings"]], "",
             "| category | threshold | target | current | proposed | estimate | lower bound | verdicts | why not |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    columns = ("category", "threshold", "target", "current", "proposed", "estimate", "lower_bound", "verdicts",
               "why_not")  # fmt: skip
    for r in summary_rows(report):
        lines.append("| " + " | ".join(str(r[k]) for k in columns) + " |")
    for name, c in report["categories"].items():
        lines += ["", f"## {name}", "",
                  f"{c['verdicts']} verdicts: {c['confirmed']} confirmed, {c['overturned']} not; {c['waiting']} "
                  "drawn decisions still waiting.", "",
                  "| stratum | decisions | drawn | judged | waiting | violations |",
                  "| --- | --- | --- | --- | --- | --- |",
                  *[f"| {s['stratum']} | {s['decisions']} | {s['drawn']} | {s['judged']} | {s['waiting']} | "
                    f"{s['violations']} |" for s in c["strata"]], "",
                  f"At the current thresholds (single tests, not a scan): {_at_text(c['at_current'])}."]  # fmt: skip
        a = c["agreement"]
        if a["pairs"]:
            lines.append(f"Double review: {a['pairs']} pairs, Cohen's kappa {a['kappa']}, disagreement "
                         f"{a['disagreement']}; lower bounds if that share of verdicts were wrong: "
                         f"flag {a.get('flag_lower_under_disagreement')}, "
                         f"review {a.get('review_lower_under_disagreement')}.")  # fmt: skip
        if c["holdout"] is not None:
            h = c["holdout"]
            lines.append(f"Holdout ({h['decisions']} decisions after {report['window']['holdout_after']}, "
                         f"{h['verdicts']} verdicts, not used to choose): "
                         f"{_at_text(h) or 'nothing proposed to measure'}.")  # fmt: skip
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
        lines += ["", "## Replay of the proposal (in-sample)", "",
                  "See replay.txt: its verdict figures are measured on the verdicts that chose the "
                  "thresholds."]  # fmt: skip
    return "\n".join(lines) + "\n"
