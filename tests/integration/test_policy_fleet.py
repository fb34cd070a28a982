"""Policies published through Kafka to a fleet of workers, and invalid files in directory mode."""

from __future__ import annotations

import collections
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from moderator.cli import main
from moderator.policy import load_spec
from moderator.policy.topic import read_published
from moderator.samples import jpeg_bytes, photo_like

from .harness import Outputs, WorkerProcess, inline_event, produce, settings_env, wait_until

pytestmark = pytest.mark.every_broker  # `make test` runs these on Kafka 0.9 and on Tansu

ROOT = Path(__file__).resolve().parents[2]


def _events(prefix: str, n: int, policy: str | None = None) -> list[tuple[str, bytes]]:
    extra = {"policy": policy} if policy else {}
    return [(f"{prefix}-{i:03d}", inline_event(f"{prefix}-{i:03d}", jpeg_bytes(photo_like(48, 36, seed=i)), **extra))
            for i in range(n)]  # fmt: skip


def _loaded_at(worker: WorkerProcess, version: str) -> float | None:
    """When (epoch seconds) the worker logged loading ``version``, if it did."""
    for e in worker.events():
        if e.get("event") == "policy_loaded" and e.get("version") == version:
            return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


def test_a_published_version_reaches_every_worker_and_a_rollback_brings_the_old_one_back(
    settings_factory, tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    settings = settings_factory(topics=True, partitions=3, model_id=str(tiny_clip_dir), device="cpu",
                                policy_source="kafka", max_batch_size=8, max_delay_ms=10)  # fmt: skip
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    first = tmp_path / "v1"
    shutil.copytree(ROOT / "policies", first)
    assert main(["policy", "publish", str(first), "--author", "alice", "--message", "first"]) == 0
    v1 = load_spec(first / "community-standards.yaml").version()
    workers = [WorkerProcess(settings, tmp_path / f"w{i}.log") for i in range(3)]
    out = Outputs(settings)
    try:
        for w in workers:
            w.wait_for("worker_started")
        assert all(_loaded_at(w, v1) for w in workers)
        for w in workers:
            w.wait_for("partitions_assigned")
        # A new version: every worker serves it within 2 s of the publish.
        second = tmp_path / "v2"
        shutil.copytree(first, second)
        raw = yaml.safe_load((second / "community-standards.yaml").read_text())
        raw["categories"][0]["flag"] = 0.8
        (second / "community-standards.yaml").write_text(yaml.safe_dump(raw))
        v2 = load_spec(second / "community-standards.yaml").version()
        published = time.time()
        assert main(["policy", "publish", str(second), "--author", "bob", "--message", "lower flag"]) == 0
        wait_until(lambda: all(_loaded_at(w, v2) for w in workers), timeout=10)
        delays = [_loaded_at(w, v2) - published for w in workers]  # type: ignore[operator]
        assert max(delays) < 2.0, delays
        print(f"publish to served: {', '.join(f'{d:.2f} s' for d in delays)}; spread {max(delays) - min(delays):.2f} s")
        items = _events("after", 30)
        produce(settings, items)
        out.wait_for({e for e, _ in items})
        versions = {r["event_id"]: r["policy"]["version"] for r in out.records["decisions"]}
        assert {versions[e] for e, _ in items} == {v2}
        # A restarted worker serves the latest published version from its start.
        workers[0].signal(signal.SIGTERM)
        assert workers[0].wait(60) == 0
        workers[0] = WorkerProcess(settings, tmp_path / "w0-again.log")
        workers[0].wait_for("worker_started")
        started = [e for e in workers[0].events() if e.get("event") == "policy_loaded"]
        assert {e["version"] for e in started if e["policy"] == "community-standards"} == {v2}
        # An invalid file: refused whole, nothing published, the fleet keeps serving.
        broken = tmp_path / "broken"
        shutil.copytree(second, broken)
        (broken / "kids-platform.yaml").write_text("name: kids-platform\nnot_a_key: 1\n")
        before = len(read_published(settings))
        capsys.readouterr()
        assert main(["policy", "publish", str(broken)]) == 1
        assert "not_a_key" in capsys.readouterr().err and len(read_published(settings)) == before
        # Roll back: every worker serves the first version again.
        rolled = time.time()
        assert main(["policy", "rollback", "community-standards", "--author", "carol"]) == 0
        wait_until(lambda: all(any(e.get("event") == "policy_loaded" and e.get("version") == v1 and
                              datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp() > rolled
                              for e in w.events()) for w in workers), timeout=10)  # fmt: skip
        items = _events("rolled", 30)
        produce(settings, items)
        out.wait_for({e for e, _ in items})
        versions = {r["event_id"]: r["policy"]["version"] for r in out.records["decisions"]}
        assert {versions[e] for e, _ in items} == {v1}
        capsys.readouterr()
        assert main(["policy", "history", "community-standards", "--json"]) == 0
        import json

        history = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(h["version"], h["author"], h["action"]) for h in history] == [
            (v1, "alice", "publish"), (v2, "bob", "publish"), (v1, "carol", "rollback")]  # fmt: skip
        assert all(h["published_at"] for h in history) and history[-1]["live"]
    finally:
        out.close()
        for w in workers:
            w.signal(signal.SIGTERM)
        for w in workers:
            w.wait(60)


def test_a_worker_refuses_an_empty_policies_topic_unless_allowed(settings_factory, tiny_clip_dir, tmp_path):
    settings = settings_factory(topics=True, model_id=str(tiny_clip_dir), device="cpu", policy_source="kafka")
    refused = WorkerProcess(settings, tmp_path / "refused.log")
    assert refused.wait(120) == 2
    assert "moderator policy publish" in refused.tail()
    allowed = WorkerProcess(settings, tmp_path / "allowed.log", policy_allow_empty=True)
    try:
        allowed.wait_for("worker_started")
    finally:
        allowed.signal(signal.SIGTERM)
        assert allowed.wait(60) == 0


def test_directory_mode_serves_the_valid_files_and_dead_letters_the_invalid_policy(
    settings_factory, tiny_clip_dir, tmp_path
):
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    (policies / "kids-platform.yaml").write_text(
        (policies / "kids-platform.yaml").read_text() + "not_a_key: 1\n"
    )  # fmt: skip
    settings = settings_factory(topics=True, model_id=str(tiny_clip_dir), device="cpu", policy_dir=policies)
    worker = WorkerProcess(settings, tmp_path / "w.log")
    out = Outputs(settings)
    try:
        worker.wait_for("partitions_assigned")
        assert worker.count("policy_invalid") == 1
        good, bad = _events("good", 10), _events("bad", 10, policy="kids-platform")
        produce(settings, good + bad)
        out.wait_for({e for e, _ in good + bad})
        assert {r["event_id"] for r in out.records["decisions"]} == {e for e, _ in good}
        reasons = collections.Counter(r["reason"] for r in out.records["dead"])
        assert reasons == {"invalid_policy": 10}
        assert "not_a_key" in out.records["dead"][0]["message"]
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()
    strict = WorkerProcess(settings, tmp_path / "strict.log", policy_strict=True)
    assert strict.wait(120) == 2
    assert "not_a_key" in strict.tail() and "kids-platform.yaml" in strict.tail()


@pytest.fixture(autouse=True)
def _quiet_logs(monkeypatch):
    monkeypatch.setenv("MODERATOR_LOG_FORMAT", "json")
