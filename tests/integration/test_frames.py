"""Animations and videos on the real broker: the worker process decides them on sampled frames, refuses
the adversarial ones with typed dead letters and lives; replay scores them as the worker did; the
console shows their contact sheet in a real browser."""

from __future__ import annotations

import io
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from moderator.app import App
from moderator.config import Settings
from moderator.console import Console
from moderator.console.auth import hash_password
from moderator.console.service import Person
from moderator.replay import logged_scores, read_log
from moderator.samples import animation_bytes, jpeg_bytes, many_frames_gif, photo_like, video_bytes
from moderator.topics import TOPICS, NewTopic

from .harness import Outputs, WorkerProcess, inline_event, produce, wait_until
from .test_console import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "alice-password-1"
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "MP4", "WEBM")


def _frames(n: int, seed: int, w: int = 128, h: int = 96) -> list[np.ndarray]:
    return [photo_like(w, h, seed=seed + k) for k in range(n)]


@pytest.fixture(scope="module")
def decided(kafka_service, redis_service, tiny_clip_dir, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Stills, an animated GIF, an animated WebP, an MP4 and a WebM, and four adversarial inputs, through
    the worker process under a policy that sends every decision to review."""
    tmp = tmp_path_factory.mktemp("frames")
    run = uuid.uuid4().hex[:8]
    names = {t.setting: f"frames-{run}-{t.default}" for t in TOPICS}
    kafka_service.create_topics([NewTopic(names[t.setting], t.partitions_for(2), t.compacted) for t in TOPICS])
    policies = tmp / "policies"
    shutil.copytree(ROOT / "policies", policies)
    raw = yaml.safe_load((policies / "community-standards.yaml").read_text())
    raw["categories"][2]["review"] = 0.0  # everything reaches review
    (policies / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    accounts = tmp / "reviewers.txt"
    accounts.write_text(f"alice:lead:{hash_password(PASSWORD, ln=12)}\n")
    settings = Settings(
        kafka_bootstrap_servers=kafka_service.bootstrap_servers, kafka_api_version=kafka_service.api_version,
        kafka_group_id=f"frames-{run}", redis_url=redis_service.url, model_id=str(tiny_clip_dir), device="cpu",
        policy_dir=policies, max_batch_size=16, http_port=0, image_formats=FORMATS, embeddings_dtype="float32",
        console_accounts_file=accounts, console_port=0, console_group_id=f"frames-console-{run}",
        console_redis_prefix=f"test-frames-{run}:", **names,
    )  # fmt: skip
    truncated = animation_bytes(_frames(12, 40), "GIF", 80)
    clip = video_bytes(_frames(10, 60, 160, 120), "mp4", fps=2, keyframe_every=2)
    inputs = {
        "still": (jpeg_bytes(photo_like(128, 96, seed=1)), None),
        "gif": (animation_bytes(_frames(20, 100), "GIF", [100] * 10 + [400] * 10), None),
        "webp": (animation_bytes(_frames(6, 200), "WEBP", 150), None),
        "mp4": (clip, None),
        "webm": (video_bytes(_frames(6, 300, 160, 120), "webm", fps=2, keyframe_every=2), None),
        "gif-3000-frames": (many_frames_gif(3000, 8, 8), "too_many_frames"),
        "gif-huge-frames": (many_frames_gif(300, 1400, 1000), "image_too_large"),  # 420M pixels to composite
        "gif-truncated": (truncated[: len(truncated) * 2 // 3], "truncated_image"),
        "mp4-truncated": (clip[: len(clip) // 2], "corrupt_video"),
    }
    worker = WorkerProcess(settings, tmp / "worker.log")
    out = Outputs(settings)
    try:
        worker.wait_for("partitions_assigned")
        produce(settings, [(k, inline_event(k, data)) for k, (data, _) in inputs.items()])
        out.wait_for(set(inputs), timeout=120)
        alive = worker.proc.poll() is None
        peak_kib = next(int(line.split()[1]) for line in Path(f"/proc/{worker.proc.pid}/status").read_text()
                        .splitlines() if line.startswith("VmHWM:"))  # fmt: skip
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()
    yield {"settings": settings, "inputs": inputs, "out": out, "alive": alive, "peak_mb": peak_kib // 1024}


def test_animations_and_videos_are_decided_on_frames_and_bad_ones_dead_lettered(decided):
    out, inputs = decided["out"], decided["inputs"]
    decisions = {r["event_id"]: r for r in out.records["decisions"]}
    dead = {r["event_id"]: r["reason"] for r in out.records["dead"]}
    assert dead == {k: reason for k, (_, reason) in inputs.items() if reason}
    assert set(decisions) == {k for k, (_, reason) in inputs.items() if not reason}
    assert decided["alive"], "the worker died"
    print(f"worker peak RSS through the adversarial inputs: {decided['peak_mb']} MB")
    assert decided["peak_mb"] < 1500
    assert decisions["still"]["frames"] is None
    gif = decisions["gif"]["frames"]
    assert (gif["kind"], gif["count"], gif["duration_ms"]) == ("animation", 20, 5000.0)
    assert gif["sampled"][0]["index"] == 0 and gif["sampled"][-1]["index"] == 19
    assert len(gif["sampled"]) == 8
    for category, score in decisions["gif"]["scores"].items():  # each category: its highest frame
        assert score == max(f["scores"][category] for f in gif["sampled"])
    for kind in ("mp4", "webm"):
        v = decisions[kind]["frames"]
        assert v["kind"] == "video" and v["sampled"][0]["timestamp_ms"] == 0.0
        assert v["duration_ms"] == pytest.approx(5000 if kind == "mp4" else 3000, abs=600)
    mp4 = decisions["mp4"]["frames"]  # a keyframe every 2 frames of 10 (the encoder may add one at the end)
    assert mp4["count"] in (5, 6) and len(mp4["sampled"]) == mp4["count"]
    review = {r["event_id"]: r for r in out.records["review"]}
    assert review["gif"]["frames"] == decisions["gif"]["frames"]


def test_replay_scores_an_animation_over_its_logged_frames_as_the_worker_did(decided):
    settings = decided["settings"]
    decisions = {r["event_id"]: r for r in decided["out"].records["decisions"]}
    app = App(settings)
    try:
        logged = read_log(app, app.engine.fingerprint)
        policy = app.compile(app.policies.current.get(None).spec)
        rows = [logged.ids.index(k) for k in ("still", "gif", "webp", "mp4", "webm")]
        assert set(logged.frame_vectors) == set(rows[1:])  # the still logs one vector
        assert [len(logged.frame_vectors[r]) for r in rows[1:]] == [
            len(decisions[k]["frames"]["sampled"]) for k in ("gif", "webp", "mp4", "webm")]  # fmt: skip
        scores = logged_scores(policy, logged, rows)
        for k, row in zip(("still", "gif", "webp", "mp4", "webm"), scores, strict=True):
            assert row.tolist() == pytest.approx([decisions[k]["scores"][c] for c in policy.categories], abs=1e-5), k
        # The driving frames' vectors alone do not give the maxima: replay really reads every frame.
        alone = policy.scores(torch.from_numpy(logged.vectors[rows[1:]]))
        assert not np.allclose(alone, scores[1:], rtol=0, atol=1e-6)
    finally:
        app.close()


def test_the_console_shows_an_animation_as_a_contact_sheet(decided, kafka_service):
    from playwright.sync_api import sync_playwright

    settings = decided["settings"]
    topic = f"verdicts-{uuid.uuid4().hex[:8]}"
    kafka_service.create_topics([NewTopic(topic, 1, compacted=True)])
    console = Console(App(settings.model_copy(update={"topic_verdicts": topic})), health=False).start()
    try:
        wait_until(lambda: console.queue.depth()["new"] == 5)
        (handle,) = [q.handle for q in console.queue.pending() if q.item.event_id == "gif"]
        console.service.claim(handle, Person("alice", "lead"))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=console.url).new_page()
            page.goto("/login")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(console.url + "/")
            page.goto(f"/item/{handle}")
            text = page.inner_text("#frames")
            frame = console.queue.get(handle).item.frames.frame  # type: ignore[union-attr]
            assert "Animation: 8 of 20 frames" in text and f"driven by frame {frame} " in text
            blurred = Image.open(io.BytesIO(page.request.get(f"/image/{handle}").body()))
            assert max(blurred.size) <= 96 and blurred.mode == "L"  # blurred like any image
            page.keyboard.press("r")
            page.wait_for_function("() => document.querySelector('#shield img').src.endsWith('/original')")
            page.wait_for_function("() => document.querySelector('#shield img').complete")
            sheet = Image.open(io.BytesIO(page.request.get(f"/image/{handle}/original").body()))
            assert sheet.width > 3 * 128 and sheet.height > 2 * 96  # 4 columns, 2 rows of frames
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "console-contact-sheet.png"))
            browser.close()
    finally:
        console.stop()
