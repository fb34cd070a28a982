"""Known-image banks on the real broker: live additions and removals, hash-list imports, retroactive scans."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pdqhash
import pytest
import yaml

from moderator.banks.store import read_entries
from moderator.cli import main
from moderator.clients import make_reader, read_to_end
from moderator.samples import animation_bytes, jpeg_bytes, photo_like

from .harness import Outputs, WorkerProcess, inline_event, produce, settings_env, wait_until

pytestmark = pytest.mark.every_broker  # `make test` runs these on Kafka 0.9 and on Tansu

ROOT = Path(__file__).resolve().parents[2]


def _policies(tmp_path: Path, banks: list[dict]) -> Path:
    out = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", out)
    raw = yaml.safe_load((out / "community-standards.yaml").read_text())
    raw["banks"] = banks
    (out / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    return out


def _logged_at(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _banks_loaded_after(worker: WorkerProcess, since: float, entries: int) -> float | None:
    for e in worker.events():
        if e.get("event") == "banks_loaded" and e.get("entries") == entries and _logged_at(e) >= since:
            return _logged_at(e)
    return None


def _bank_triggers(decision: dict) -> list[dict]:
    return [t["match"] for t in decision["triggered"] if t["rule"] == "bank"]


def _cli_json(capsys, argv: list[str]) -> list[dict]:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_an_entry_added_while_the_worker_runs_matches_within_seconds_and_a_tombstone_removes_it(
    settings_factory, tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    policies = _policies(tmp_path, [{"name": "known", "category": "known-violation", "severity": "high"}])
    settings = settings_factory(topics=True, model_id=str(tiny_clip_dir), device="cpu", policy_dir=str(policies),
                                max_batch_size=8, max_delay_ms=10)  # fmt: skip
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    original = photo_like(480, 360, seed=4242)
    (tmp_path / "case.jpg").write_bytes(jpeg_bytes(original, quality=95))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    out = Outputs(settings)
    try:
        worker.wait_for("partitions_assigned")
        added = time.time()
        rows = _cli_json(capsys, ["bank", "add", "known", str(tmp_path / "case.jpg"), "--id", "case-1",
                                  "--label", "confirmed 2026-11", "--author", "alice"])  # fmt: skip
        assert rows[0]["result"] == "added" and rows[0]["embedding"] is True
        wait_until(lambda: _banks_loaded_after(worker, added, 1) is not None, timeout=5)
        delay = _banks_loaded_after(worker, added, 1) - added  # type: ignore[operator]
        print(f"bank entry added -> live on the worker: {delay:.2f} s")
        copies = {"copy-q40": jpeg_bytes(original, quality=40), "copy-mirror": jpeg_bytes(original[:, ::-1]),
                  "unrelated": jpeg_bytes(photo_like(480, 360, seed=4243))}  # fmt: skip
        produce(settings, [(k, inline_event(k, v)) for k, v in copies.items()])
        out.wait_for(set(copies))
        decided = {r["event_id"]: r for r in out.records["decisions"]}
        for k in ("copy-q40", "copy-mirror"):
            assert decided[k]["decision"] == "flag"
            (match,) = _bank_triggers(decided[k])
            assert (match["bank"], match["entry"], match["label"]) == ("known", "case-1", "confirmed 2026-11")
            assert match["pdq_distance"] <= 31
        assert _bank_triggers(decided["copy-mirror"])[0]["variant"] != "original"
        assert _bank_triggers(decided["unrelated"]) == []
        # Removed: a tombstone, and the worker stops matching it.
        removed = time.time()
        assert main(["bank", "remove", "known", "case-1"]) == 0
        wait_until(lambda: _banks_loaded_after(worker, removed, 0) is not None, timeout=5)
        produce(settings, [("after-removal", inline_event("after-removal", copies["copy-q40"]))])
        out.wait_for({"after-removal"})
        after = next(r for r in out.records["decisions"] if r["event_id"] == "after-removal")
        assert _bank_triggers(after) == []
        assert read_entries(settings) == {}
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0


def test_an_imported_hash_list_matches_its_images_and_refuses_low_quality_hashes(
    settings_factory, tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    policies = _policies(tmp_path, [{"name": "partner", "decision": "review"}])
    settings = settings_factory(topics=True, model_id=str(tiny_clip_dir), device="cpu", policy_dir=str(policies),
                                max_batch_size=8, max_delay_ms=10)  # fmt: skip
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    images = {f"p{i}": photo_like(640, 480, seed=7000 + i) for i in range(5)}
    rows = []
    for name, arr in images.items():  # hashed as a partner would: pdqhash on the full image
        vector, quality = pdqhash.compute(arr)
        rows.append([np.packbits(vector.astype(np.uint8)).tobytes().hex(), quality, f"partner-{name}"])
    flat_gradient = np.repeat(np.linspace(0, 255, 640, dtype=np.uint8)[None, :, None], 480, 0).repeat(3, 2)
    for i, arr in enumerate((np.full((64, 64, 3), 90, np.uint8), flat_gradient)):
        vector, quality = pdqhash.compute(arr)
        assert quality < 50
        rows.append([np.packbits(vector.astype(np.uint8)).tobytes().hex(), quality, f"low-{i}"])
    with (tmp_path / "hashes.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    (report,) = _cli_json(capsys, ["bank", "import", "partner", str(tmp_path / "hashes.csv")])
    assert (report["imported"], report["refused_low_quality"], report["invalid"]) == (5, 2, 0)
    assert main(["bank", "list"]) == 0
    worker = WorkerProcess(settings, tmp_path / "worker.log")  # reads the bank at start-up
    out = Outputs(settings)
    try:
        worker.wait_for("partitions_assigned")
        events = {name: inline_event(name, jpeg_bytes(arr)) for name, arr in images.items()}
        events |= {f"u{i}": inline_event(f"u{i}", jpeg_bytes(photo_like(640, 480, seed=7100 + i))) for i in range(5)}
        produce(settings, events.items())
        out.wait_for(set(events))
        decided = {r["event_id"]: r for r in out.records["decisions"]}
        for name in images:
            (match,) = _bank_triggers(decided[name])
            assert match["entry"] == f"partner-{name}" and match["action"] == "review" and match["pdq_distance"] <= 31
            assert decided[name]["decision"] in ("review", "flag")
        assert all(_bank_triggers(decided[f"u{i}"]) == [] for i in range(5))
        assert {r["event_id"] for r in out.records["review"]} >= set(images)  # the review queue gets them
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0


def test_a_scan_finds_the_earlier_events_of_an_image_banked_later(
    settings_factory, tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    settings = settings_factory(topics=True, model_id=str(tiny_clip_dir), device="cpu",
                                policy_dir=str(ROOT / "policies"), max_batch_size=8, max_delay_ms=10)  # fmt: skip
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    original = photo_like(400, 300, seed=9001)
    (tmp_path / "later.jpg").write_bytes(jpeg_bytes(original))
    earlier = {"early-same": jpeg_bytes(original), "early-q40": jpeg_bytes(original, quality=40),
               "early-rot90": jpeg_bytes(np.ascontiguousarray(np.rot90(original))),
               # an animation whose third frame is the image: found through that frame's logged hash
               "early-gif": animation_bytes([photo_like(400, 300, seed=9200 + k) if k != 2 else original
                                             for k in range(5)])}  # fmt: skip
    unrelated = {f"other-{i}": jpeg_bytes(photo_like(400, 300, seed=9100 + i)) for i in range(20)}
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    out = Outputs(settings, kinds=("decisions", "review", "dead_letters"))
    try:
        worker.wait_for("partitions_assigned")
        produce(settings, [(k, inline_event(k, v)) for k, v in (earlier | unrelated).items()])
        out.wait_for(set(earlier) | set(unrelated))
        assert main(["bank", "add", "later", str(tmp_path / "later.jpg"), "--id", "later-1"]) == 0
        # By PDQ (the log keeps each image's hash as it was: the rotated copy is not a PDQ match).
        found = _cli_json(capsys, ["bank", "scan", "later"])
        summary = found.pop()["summary"]
        assert {f["event_id"] for f in found} == {"early-same", "early-q40", "early-gif"}
        assert all(f["entry"] == "later-1" and f["pdq_distance"] <= 31 for f in found)
        assert summary["events_scanned"] == len(earlier) + len(unrelated)
        # By embedding too, at a similarity for this (random, tiny) checkpoint: its embeddings of
        # unrelated images reach 0.998, its re-encoded and rotated copies 0.9995 and up.
        found = _cli_json(capsys, ["bank", "scan", "later", "--cosine", "0.9995", "--publish-review"])
        summary = found.pop()["summary"]
        by_event = {f["event_id"]: f for f in found}
        assert (
            "other-0" not in by_event and set(by_event) <= set(earlier) and {"early-same", "early-q40"} <= set(by_event)
        )
        assert by_event["early-same"]["cosine"] > 0.9995
        assert summary["published_for_review"] == len(by_event)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(r.get("retroactive") for r in out.records["review"]):
            out.poll()
        retro = {r["event_id"]: r for r in out.records["review"] if r.get("retroactive")}
        assert set(retro) == set(by_event)
        item = retro["early-same"]
        assert item["reasons"][0]["rule"] == "bank" and item["reasons"][0]["match"]["entry"] == "later-1"
        assert item["image"]["inline_source"] is not None
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    # The bank topic is compacted and keyed by bank/id: what `bank list` reads back.
    reader = make_reader(settings, [settings.topic("banks")])
    keys: list[bytes] = []
    read_to_end(reader, lambda r: keys.append(r.key))
    reader.close(autocommit=False)
    assert keys == [b"later/later-1"]
