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

EVENTS = 400
CATEGORY = "weapons"


def _policy(review: float, flag: float) -> dict:
    return {
        "name": "calib", "default": True, "audit": {"allow": 0.3, "flag": 0.3},
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
    out.close()
    assert any(i.sampled for i in items) and any(not i.sampled for i in items)
    # Reviewers: a violation when the score is past a "true" line, with 5% of them wrong.
    rng = np.random.default_rng(0)
    producer = make_producer(settings)
    for item in items:
        violation = (item.scores[CATEGORY] >= truth_at) != (rng.random() < 0.05)
        judged = Decision(decision=item.decision, scores=item.scores, triggered=item.reasons, policy=item.policy,
                          model=item.model)  # fmt: skip
        verdict = Verdict(event_id=item.event_id, verdict="confirm" if violation else "overturn",
                          categories=[CATEGORY] if violation else [], reviewer="test-reviewer", judged=judged,
                          sampled=item.sampled, sample_rate=item.sample_rate, decided_at=item.decided_at,
                          reviewed_at=utc_now())  # fmt: skip
        producer.send(settings.topic("verdicts"), key=item.event_id.encode(), value=verdict.model_dump_json().encode())
    producer.flush()
    producer.close()

    report_dir = tmp_path / "report"
    capsys.readouterr()
    assert main(["calibrate", "--policy", "calib", "--min-samples", "10", "--out", str(report_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cat = report["categories"][CATEGORY]
    assert report["verdicts"] == len(items) and cat["audit_samples"] == sum(i.sampled for i in items)
    assert report["judged_share"] == {"review": 1.0, "audit_samples": 1.0} and report["warnings"] == []
    assert 0 < cat["share_of_estimate_from_samples"] < 1
    proposed = Path(report["proposed_file"])
    assert proposed.exists() and (report_dir / f"pr-{CATEGORY}.png").stat().st_size > 10_000
    assert (report_dir / "report.md").read_text().startswith("# Calibration of calib")
    assert "baseline -> candidate" in (report_dir / "replay.txt").read_text()
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
    print(json.dumps({k: cat[k] for k in ("current", "proposed", "flag", "review")}, indent=1))
