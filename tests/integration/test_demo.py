"""`moderator demo`: the README's main-job command, end to end on its own local stack."""

from __future__ import annotations

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


def test_demo_prints_its_table_with_the_configured_model(tiny_clip_dir):
    done = run_demo({"MODERATOR_MODEL_ID": str(tiny_clip_dir), "MODERATOR_LOG_LEVEL": "WARNING"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "RANDOMLY INITIALIZED" not in out  # this model loaded: no banner
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
