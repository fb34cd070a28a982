"""`moderator demo`: the README's main-job command, end to end on its own local stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_demo(env_overrides: dict[str, str], count: int = 4) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATOR_")}
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-m", "moderator.cli", "demo", "--count", str(count)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_demo_prints_progress_and_tables_for_a_person(tiny_clip_dir, tmp_path):
    log_file = tmp_path / "moderator-demo.log"
    done = run_demo({"MODERATOR_MODEL_ID": str(tiny_clip_dir), "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "RANDOMLY INITIALIZED" not in out  # this model loaded: no banner
    # What a person reads: no JSON log line, no kafka-python chatter, on either stream.
    for line in (out + done.stderr).splitlines():
        assert not line.lstrip().startswith("{"), line
        assert "WARNING" not in line and "kafka." not in line and "MetadataResponse" not in line, line
    assert done.stderr.strip() == "", done.stderr[-2000:]
    assert f"logs (JSON lines): {log_file}" in out
    assert "deciding: 7/7 events have a record" in out
    assert "policies: community-standards, kids-platform (default: community-standards)" in out
    # The logs went to the file it named, as JSON lines with event ids.
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(e.get("event") == "worker_started" for e in logged)
    assert any(e.get("event") == "dead_letter" and e.get("event_id") == "demo-bad-text" for e in logged)
    for line in ("demo-000", "demo-003", "demo-bad-text", "demo-bad-truncated", "demo-bad-json", "review feed"):
        assert line in out
    assert "not_an_image" in out and "truncated_image" in out and "invalid_json" in out
    assert "7/7 events have a record" in out


def test_demo_without_weights_says_so_and_runs_random_init(tmp_path):
    env = {"MODERATOR_MODEL_LOCAL_FILES_ONLY": "true", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "MODERATOR_LOG_LEVEL": "WARNING"}  # fmt: skip
    done = run_demo(env, count=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "cannot be loaded here" in done.stdout and "RANDOMLY INITIALIZED ViT-B/32" in done.stdout
    assert "random-init:ViT-B/32" in done.stdout  # in every decision's model column
    assert "5/5 events have a record" in done.stdout
