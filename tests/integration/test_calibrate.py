"""`moderator calibrate` end to end on the local stack: events through the worker, verdicts in the
console's record format, then the proposal, its plots and its replay."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import yaml

from moderator.app import App
from moderator.cli import main
from moderator.clients import make_producer
from moderator.events import Decision, ReviewItem, Verdict, utc_now
from moderator.images import ImageLimits, load_image
from moderator.samples import jpeg_bytes, photo_like

from .harness import Outputs, WorkerProcess, inline_event, produce, settings_env
from .test_console import ARTIFACTS

EVENTS = 400
CATEGORY = "weapons"


def _policy(review: float, flag: float) -> dict:
    return {
        "name": "calib", "default": True, "audit": {"allow": 0.3, "flag": 0.6}, "double_review": 0.5,
        "categories": [
            {"name": CATEGORY, "descriptions": ["a handgun", "a rifle"], "contrasts": ["a toy gun"],
             "flag": flag, "review": review, "severity": "high",
             "target": {"precision": 0.8, "recall": 0.8}},
        ],
        "neutral": ["a landscape", "a person", "food"],
    }  # fmt: skip


def test_calibrate_proposes_thresholds_with_plots_and_a_replay(
    settings_factory, tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    images = {f"c-{i:03d}": jpeg_bytes(photo_like(48, 36, seed=20_000 + i)) for i in range(EVENTS)}
    policies = tmp_path / "policies"
    policies.mkdir()
    settings = settings_factory(topics=True, model_id=str(tiny_clip_dir), device="cpu", policy_dir=str(policies),
                                max_batch_size=16, max_delay_ms=10, banks_enabled=False)  # fmt: skip
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    # Thresholds at quantiles of this (random, tiny) checkpoint's scores: a review band of about 40%.
    probe = App(settings)
    (policies / "calib.yaml").write_text(yaml.safe_dump(_policy(0.0, 1.0), sort_keys=False))
    compiled = probe.load_policy(policies / "calib.yaml")
    pixels = np.stack([load_image(b, ImageLimits(), probe.engine.spec) for b in images.values()])
    scores = compiled.scores(probe.engine.encode_images(pixels))[:, 0]
    review, flag, truth_at = (float(np.quantile(scores, q)) for q in (0.4, 0.8, 0.6))
    (policies / "calib.yaml").write_text(
        "# the calibration test's policy: thresholds by hand\n" + yaml.safe_dump(_policy(review, flag), sort_keys=False)
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    out = Outputs(settings)
    try:
        worker.wait_for("partitions_assigned")
        produce(settings, [(k, inline_event(k, v)) for k, v in images.items()])
        out.wait_for(set(images))
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    out.poll()
    items = [ReviewItem.model_validate(r) for r in out.records["review"]]
    decisions = {r["event_id"]: r for r in out.records["decisions"]}
    out.close()
    assert any(i.sampled for i in items) and any(not i.sampled for i in items)
    assert any(i.second_review for i in items)
    # Reviewers: a violation when the score is past a "true" line, with 5% of them wrong; a second
    # reviewer on the double-review items, wrong as often.
    rng = np.random.default_rng(0)
    producer = make_producer(settings)

    def send(item: ReviewItem, violation: bool, **extra: object) -> None:
        judged = Decision(decision=item.decision, scores=item.scores, triggered=item.reasons, policy=item.policy,
                          model=item.model)  # fmt: skip
        verdict = Verdict(event_id=item.event_id, verdict="confirm" if violation else "overturn",
                          categories=[CATEGORY] if violation else [], reviewer="test-reviewer", judged=judged,
                          sampled=item.sampled, sample_rate=item.sample_rate, decided_at=item.decided_at,
                          reviewed_at=utc_now(), image_sha256=item.image.sha256, **extra)  # fmt: skip
        producer.send(settings.topic("verdicts"), key=verdict.key.encode(), value=verdict.model_dump_json().encode())

    for item in items:
        truth = item.scores[CATEGORY] >= truth_at
        send(item, truth != (rng.random() < 0.05))
        if item.second_review:
            send(item, truth != (rng.random() < 0.05), second_opinion=True)
    # Verdicts that must not count: one on other bytes under a logged id, one on an allow decision the
    # audit did not draw (as a bank scan's retroactive item would be).
    other = items[0].model_copy(update={"image": items[0].image.model_copy(update={"sha256": "0" * 64})})
    send(other, True)
    undrawn = next(e for e, d in decisions.items() if d["decision"] == "allow" and not d["sampled"])
    image = items[0].image.model_copy(update={"sha256": decisions[undrawn]["image_sha256"]})
    send(items[0].model_copy(update={"event_id": undrawn, "decision": "allow", "retroactive": True, "image": image}),
         True, retroactive=True)  # fmt: skip
    producer.flush()
    producer.close()

    report_dir = tmp_path / "report"
    capsys.readouterr()
    assert main(["calibrate", "--policy", "calib", "--min-samples", "10", "--out", str(report_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cat = report["categories"][CATEGORY]
    assert report["window"]["decisions"] == EVENTS and report["verdicts"] == len(items)
    assert report["left_out"] == {
        "verdicts on another image than the one now logged under their event id": 1,
        "verdicts on decisions the design did not draw (retroactive items, items claimed by id)": 1,
    }
    strata = {s["stratum"]: s for s in cat["strata"]}
    assert set(strata) <= {"allow at 0.3", "review at 1", "flag at 0.6"} and "review at 1" in strata
    assert strata["review at 1"]["drawn"] == strata["review at 1"]["decisions"] == strata["review at 1"]["judged"]
    assert sum(s["drawn"] for s in strata.values()) == len(items) and report["warnings"] == []
    assert sum(s["decisions"] for s in strata.values()) == EVENTS
    assert "per threshold" in report["guarantee"] and report["tests"] == 2
    assert cat["agreement"]["pairs"] == sum(i.second_review for i in items) and cat["agreement"]["kappa"] > 0.5
    proposed = Path(report["proposed_file"])
    assert proposed.exists() and (report_dir / f"pr-{CATEGORY}.png").stat().st_size > 10_000
    assert (report_dir / "report.md").read_text().startswith("# Calibration of calib")
    assert (report_dir / "replay.txt").read_text().startswith("IN-SAMPLE") and report["replay"]["in_sample"]
    # Only the thresholds changed, and the comment on top stayed.
    text = proposed.read_text()
    assert text.startswith("# the calibration test's policy")
    new = yaml.safe_load(text)["categories"][0]
    assert new["flag"] == cat["proposed"]["flag"] or cat["proposed"]["flag"] is None
    assert cat["proposed"]["flag"] is not None and cat["flag"]["lower"] >= 0.8
    assert cat["proposed"]["review"] is not None and cat["review"]["lower"] >= 0.8
    # The reviewers' line sits at truth_at: the proposals bracket it as the targets say.
    assert cat["proposed"]["review"] <= truth_at + 1e-9
    assert report["replay"]["replayed"] == EVENTS
    assert sum(report["replay"]["volume"]["candidate"].values()) == EVENTS
    assert main(["policy", "check", str(proposed)]) == 0
    # Jointly, and with a holdout: the later half measures what the earlier half chose.
    times = sorted(d["decided_at"] for d in decisions.values())
    middle = times[len(times) // 2]
    capsys.readouterr()
    assert main(["calibrate", "--policy", "calib", "--min-samples", "10", "--out", str(tmp_path / "holdout"),
                 "--joint", "--holdout-after", middle, "--json"]) == 0  # fmt: skip
    held = json.loads(capsys.readouterr().out)
    assert held["confidence_per_test"] == 0.975 and "jointly" in held["guarantee"]
    assert held["window"]["decisions"] + held["window"]["holdout_decisions"] == EVENTS
    holdout = held["categories"][CATEGORY]["holdout"]
    assert holdout["decisions"] == held["window"]["holdout_decisions"] and holdout["verdicts"] > 0
    print(json.dumps({k: cat[k] for k in ("current", "proposed", "flag", "review", "strata", "agreement")}, indent=1))
    print(json.dumps(holdout, indent=1))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", f"pr-{CATEGORY}.png", "replay.txt"):
        (ARTIFACTS / f"calibrate-{name}").write_bytes((report_dir / name).read_bytes())
