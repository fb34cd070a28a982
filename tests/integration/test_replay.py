"""The embeddings log, `moderator replay` and shadow policies, on the real Kafka (tiny model)."""

from __future__ import annotations

import json
import shutil
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from moderator import terminal
from moderator.app import App
from moderator.cli import main
from moderator.clients import make_producer
from moderator.config import Settings
from moderator.events import EmbeddingRecord, Source, encode_vector
from moderator.policy import load_spec
from moderator.replay import read_log, run_replay, storage_tolerance
from moderator.samples import jpeg_bytes, photo_like
from moderator.topics import TOPICS, NewTopic

from .harness import Outputs, WorkerProcess, inline_event, produce, settings_env

ROOT = Path(__file__).resolve().parents[2]


def _images(n: int, seed: int) -> list[tuple[str, bytes]]:
    return [(f"r{seed}-{i:04d}", jpeg_bytes(photo_like(48, 36, seed=seed * 10_000 + i))) for i in range(n)]


def _run_worker(settings, items, tmp_path: Path, name: str = "w") -> Outputs:
    worker = WorkerProcess(settings, tmp_path / f"{name}.log")
    out = Outputs(settings, kinds=("decisions", "review", "dead_letters", "embeddings", "shadow_decisions"))
    try:
        worker.wait_for("partitions_assigned")
        produce(settings, [(eid, inline_event(eid, data)) for eid, data in items])
        out.wait_for({eid for eid, _ in items}, timeout=180)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()
    out.poll()
    out.close()  # the records stay
    return out


@pytest.fixture(scope="module")
def logged(kafka_service, tiny_clip_dir, tmp_path_factory):
    """500 events through the worker with the shipped policies; the settings and what it published."""
    run = uuid.uuid4().hex[:8]
    names = {t.setting: f"replay-{run}-{t.default}" for t in TOPICS}
    kafka_service.create_topics([NewTopic(names[t.setting], t.partitions_for(2), t.compacted) for t in TOPICS])
    settings = Settings(
        kafka_bootstrap_servers=kafka_service.bootstrap_servers, kafka_api_version=kafka_service.api_version,
        kafka_group_id=f"replay-{run}", redis_enabled=False, model_id=str(tiny_clip_dir), device="cpu",
        policy_dir=ROOT / "policies", max_batch_size=32, **names,
    )  # fmt: skip
    out = _run_worker(settings, _images(500, seed=1), tmp_path_factory.mktemp("replay"))
    assert len({r["event_id"] for r in out.records["embeddings"]}) == 500
    return settings, out


def test_identical_policy_replays_with_no_transition_and_scores_within_the_tolerance(logged, tmp_path):
    settings, _ = logged
    app = App(settings)
    report = run_replay(app, ROOT / "policies")
    assert report["replayed"] == 500 and report["skipped_other_model"] == 0
    assert report["transitions"] == {}
    assert report["metrics"]["changed"] == 0
    # Every replayed score within the storage tolerance of the live one.
    log = read_log(app, app.engine.fingerprint)
    tol = storage_tolerance(app.engine.logit_scale, app.engine.embed_dim, log.dtype)
    policy = app.load_policy(ROOT / "policies" / "community-standards.yaml")
    rows = [i for i, name in enumerate(log.policies) if name == "community-standards"]
    import torch

    replayed = policy.scores(torch.from_numpy(log.vectors[rows]))
    live = np.array([[log.live[i]["scores"][c] for c in policy.categories] for i in rows])
    worst = float(np.abs(replayed - live).max())
    assert worst <= tol, (worst, tol)
    print(f"float16 log: max |replayed - live| score {worst:.2e}, tolerance {tol:.2e}")


def test_a_lowered_threshold_flips_exactly_the_events_between_the_thresholds(logged, tmp_path):
    settings, out = logged
    decisions = {r["event_id"]: r for r in out.records["decisions"] if r["policy"]["name"] == "community-standards"}
    raw = yaml.safe_load((ROOT / "policies" / "community-standards.yaml").read_text())
    category = raw["categories"][0]
    name, old = category["name"], category["flag"]
    scores = sorted(d["scores"][name] for d in decisions.values())
    new = round(scores[len(scores) // 2], 4)  # half the events lie above it
    assert new < old
    category["flag"] = category["review"] = min(category["review"], new)
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    new = category["flag"]
    expected = {e for e, d in decisions.items() if d["decision"] != "flag" and new <= d["scores"][name] < old}
    assert 20 < len(expected) < len(decisions)
    report = run_replay(App(settings), candidate)
    flipped = sum(report["transitions"].values()) + sum(report["borderline"].values())
    assert report["skipped_other_policy"] == 500 - len(decisions)  # kids-platform is not in the candidate
    assert flipped == len(expected), (report["transitions"], report["borderline"], len(expected))
    assert set(report["transitions"]) | set(report["borderline"]) <= {"allow->flag", "review->flag"}
    for ids in report["examples"].values():
        assert set(ids) <= expected
    near = {e for e in expected if abs(decisions[e]["scores"][name] - new) <= report["tolerance"]}
    assert sum(report["borderline"].values()) <= len(near)  # only those too close to tell are borderline


def test_records_of_another_model_and_candidates_pinned_to_another_are_skipped_and_counted(logged, tmp_path):
    settings, _ = logged
    producer = make_producer(settings)
    vec = np.ones(16, dtype=np.float32) / 4
    other = "openai/clip-vit-large-patch14@abc"
    live = {"decision": "allow", "scores": {}, "triggered": [], "model": other,
            "policy": {"name": "community-standards", "version": "sha256:x"}}  # fmt: skip
    for i in range(7):
        record = EmbeddingRecord(
            event_id=f"other-{i}", model=other, dtype="float16", dim=16, vector=encode_vector(vec, "float16"),
            source=Source(topic="images", partition=0, offset=i), live=live, decided_at="2026-01-01T00:00:00Z",
        )  # fmt: skip
        producer.send(
            settings.topic("embeddings"), key=record.event_id.encode(), value=record.model_dump_json().encode()
        )
    producer.flush()
    producer.close()
    pinned = tmp_path / "pinned"
    shutil.copytree(ROOT / "policies", pinned)
    text = (pinned / "kids-platform.yaml").read_text()
    (pinned / "kids-platform.yaml").write_text("model: openai/clip-vit-large-patch14\n" + text)
    report = run_replay(App(settings), pinned)
    kids = sum(1 for r in logged[1].records["decisions"] if r["policy"]["name"] == "kids-platform")
    assert report["skipped_other_model"] == 7 + kids
    assert report["pinned_to_another_model"] == ["kids-platform"]
    assert report["replayed"] == 500 - kids and report["transitions"] == {}


def test_fail_if_exits_1_on_the_wrong_side_of_its_line(logged, tmp_path, monkeypatch, capsys):
    settings, _ = logged
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    candidate = tmp_path / "stricter"
    shutil.copytree(ROOT / "policies", candidate)
    raw = yaml.safe_load((candidate / "community-standards.yaml").read_text())
    for c in raw["categories"]:
        c["review"] = 0.0  # everything at least to review
    (candidate / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    assert main(["replay", "--policy", str(candidate), "--json", "--fail-if", "review_volume_increase>0.2"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fail_if"]["failed"] and report["metrics"]["review_volume_increase"] > 0.2
    monkeypatch.setattr(terminal, "is_terminal", lambda stream: True)  # a person at a terminal: a table
    assert main(["replay", "--policy", str(candidate), "--fail-if", "flag_recall_drop>0.02"]) == 0
    table = capsys.readouterr().out
    assert "baseline -> candidate" in table and "FAIL" not in table
    assert main(["replay", "--policy", str(candidate), "--fail-if", "nonsense>1"]) == 2


def test_a_shadow_policy_never_changes_a_live_decision(settings_factory, tiny_clip_dir, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    items = _images(120, seed=2)
    # One image per batch: a matrix product's last bits depend on the batch's size, and batches form as
    # events arrive; so that "the same" can mean byte for byte, every event is decided alone.
    base = settings_factory(topics=True, partitions=2, model_id=str(tiny_clip_dir), device="cpu",
                            policy_dir=policies, max_batch_size=1)  # fmt: skip
    without = _run_worker(base, items, tmp_path, "without")
    raw = yaml.safe_load((policies / "community-standards.yaml").read_text())
    shadow = {**raw, "name": "community-standards-strict", "shadow_of": "community-standards", "default": False,
              "categories": [{**c, "review": 0.0} for c in raw["categories"]]}  # fmt: skip
    (policies / "strict.yaml").write_text(yaml.safe_dump(shadow))
    # The same events again (same topic, offsets and timestamps): another group, other output topics.
    fresh = settings_factory(topics=True, partitions=2)
    outputs = {t: getattr(fresh, t) for t in ("topic_decisions", "topic_review", "topic_dead_letters",
                                              "topic_embeddings", "topic_shadow_decisions")}  # fmt: skip
    with_shadow = base.model_copy(update={**outputs, "kafka_group_id": fresh.kafka_group_id})
    worker = WorkerProcess(with_shadow, tmp_path / "with.log")
    out = Outputs(with_shadow, kinds=("decisions", "review", "dead_letters", "shadow_decisions"))
    try:
        out.wait_for({eid for eid, _ in items}, timeout=180)

        def stable(r: dict) -> str:  # timings and decided_at are when, not what
            return json.dumps({k: v for k, v in r.items() if k not in ("timings", "decided_at")}, sort_keys=True)

        got, want = sorted(map(stable, out.records["decisions"])), sorted(map(stable, without.records["decisions"]))
        assert len(got) == len(want) == len(items), (len(got), len(want))
        assert set(got) == set(want), (sorted(set(got) - set(want))[:2], sorted(set(want) - set(got))[:2])
        assert sorted(r["event_id"] for r in out.records["review"]) == sorted(
            r["event_id"] for r in without.records["review"]
        )  # the shadow feeds no review item
        shadows = out.records["shadow_decisions"]
        live_events = {r["event_id"] for r in out.records["decisions"] if r["policy"]["name"] == "community-standards"}
        assert sorted(r["event_id"] for r in shadows) == sorted(live_events)  # one per event of its live policy
        first_version = {r["shadow"]["policy"]["version"] for r in shadows}
        assert len(first_version) == 1 and all(r["shadow"]["decision"] != "allow" for r in shadows)
        # An invalid edit of the shadow file: live and shadow keep their last good versions.
        (policies / "strict.yaml").write_text(yaml.safe_dump({**shadow, "categories": [{"name": "x"}]}))
        worker.wait_for("policy_invalid")
        more = _images(40, seed=3)
        produce(with_shadow, [(eid, inline_event(eid, data)) for eid, data in more])
        out.wait_for({eid for eid, _ in items + more}, timeout=120)
        later = [r for r in out.records["shadow_decisions"] if r["event_id"].startswith("r3-")]
        assert later and {r["shadow"]["policy"]["version"] for r in later} == first_version
        live_versions = {
            r["policy"]["version"] for r in out.records["decisions"] if r["policy"]["name"] == "community-standards"
        }
        assert live_versions == {load_spec(policies / "community-standards.yaml").version()}
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()
    app = App(with_shadow)
    from moderator.replay import shadow_report

    report = shadow_report(app)
    [pair] = report["pairs"]
    assert pair["live"] == "community-standards" and pair["shadow"] == "community-standards-strict"
    assert pair["replayed"] == len(live_events) + len(later) and pair["agreement"] < 1.0


def test_reviewer_verdicts_give_precision_and_recall_of_both_sides(logged, tmp_path, kafka_service):
    from moderator.events import Decision, Verdict

    settings, out = logged
    topic = f"verdicts-{uuid.uuid4().hex[:8]}"
    kafka_service.create_topics([NewTopic(topic, 1, compacted=True)])
    settings = settings.model_copy(update={"topic_verdicts": topic})
    decisions = [r for r in out.records["decisions"] if r["policy"]["name"] == "community-standards"][:40]
    producer = make_producer(settings)
    for i, d in enumerate(decisions):
        judged = Decision(**{k: d[k] for k in ("decision", "scores", "triggered", "policy", "model")})
        verdict = Verdict(event_id=d["event_id"], verdict="confirm" if i % 2 else "overturn",
                          categories=["weapons"] if i % 2 else [], reviewer="alice", judged=judged,
                          sampled=i % 4 == 0, sample_rate=0.1 if i % 4 == 0 else None,
                          decided_at=d["decided_at"], reviewed_at=d["decided_at"])  # fmt: skip
        producer.send(topic, key=verdict.event_id.encode(), value=verdict.model_dump_json().encode())
    producer.flush()
    producer.close()
    raw = yaml.safe_load((ROOT / "policies" / "community-standards.yaml").read_text())
    for c in raw["categories"]:
        c["flag"] = c["review"] = 0.0  # the candidate flags everything
    candidate = tmp_path / "flag-all"
    candidate.mkdir()
    (candidate / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    report = run_replay(App(settings), candidate)
    v = report["verdicts"]
    assert (v["labelled"], v["violations"], v["sampled"]) == (40, 20, 10)
    assert v["candidate"]["flag_recall"] == 1.0 and v["candidate"]["caught_recall"] == 1.0
    # Every sampled verdict (i % 4 == 0) is an overturn and weighs 10: 20 confirms over 20 + 10 + 10 x 10.
    assert v["candidate"]["flag_precision"] == pytest.approx(20 / 130, abs=1e-4)
    assert report["metrics"]["flag_recall_drop_verdicts"] <= 0  # flagging everything loses no recall


def test_records_of_another_image_precision_are_never_mixed(logged, monkeypatch, capsys):
    settings, _ = logged
    app = App(settings)
    producer = make_producer(settings)
    vec = np.ones(16, dtype=np.float32) / 4
    live = {"decision": "flag", "scores": {}, "triggered": [], "model": app.engine.fingerprint,
            "image_precision": "int8", "policy": {"name": "community-standards", "version": "sha256:x"}}  # fmt: skip
    for i in range(5):  # the same model, embedded by an int8 tower
        record = EmbeddingRecord(
            event_id=f"int8-{i}", model=app.engine.fingerprint, image_precision="int8", dtype="float16", dim=16,
            vector=encode_vector(vec, "float16"), source=Source(topic="images", partition=0, offset=i), live=live,
            decided_at="2026-01-01T00:00:00Z",
        )  # fmt: skip
        producer.send(
            settings.topic("embeddings"), key=record.event_id.encode(), value=record.model_dump_json().encode()
        )
    producer.flush()
    producer.close()
    fp32 = run_replay(app, ROOT / "policies")
    assert (fp32["replayed"], fp32["skipped_other_precision"], fp32["image_precision"]) == (500, 5, "float32")
    assert fp32["transitions"] == {}  # the int8 records' stored "flag" never met the fp32 ones
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert main(["replay", "--policy", str(ROOT / "policies"), "--image-precision", "int8", "--json"]) in (0, 1)
    int8 = json.loads(capsys.readouterr().out)
    assert (int8["replayed"], int8["skipped_other_precision"], int8["image_precision"]) == (5, 500, "int8")
