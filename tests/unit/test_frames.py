"""Animations and videos as sampled frames: which frames, their display times, decoding under limits,
scores as maxima over frames, bank matches per frame, and the whole worker on GIFs and videos."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from moderator.app import App
from moderator.banks.index import BankIndex, Entry, Hit
from moderator.banks.pdq import hash_image
from moderator.banks.store import FixedBanks
from moderator.batcher import MicroBatcher
from moderator.config import Settings
from moderator.events import decode_frame_vectors
from moderator.frames import FrameSet, SampledFrame, frame_durations, frame_maxima, merge_hits, sample_frames
from moderator.images import ImageLimits, PreprocessSpec, load_frames, load_image, preprocess
from moderator.policy import PolicySpec, assemble
from moderator.samples import animation_bytes, jpeg_bytes, many_frames_gif, photo_like, video_bytes
from moderator.worker.feed import QueueFeed

ROOT = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec(224, None, (224, 224), 3, 1 / 255, (0.5,) * 3, (0.5,) * 3)
VIDEO = ImageLimits(formats=("JPEG", "PNG", "WEBP", "GIF", "MP4", "WEBM"))


def _photos(n: int, seed: int = 0, w: int = 96, h: int = 64) -> list[np.ndarray]:
    return [photo_like(w, h, seed=seed + k) for k in range(n)]


# --- which frames ----------------------------------------------------------------------------------


def test_sampling_keeps_first_and_last_and_spaces_by_display_time():
    assert sample_frames([100] * 5, 8) == [0, 1, 2, 3, 4]  # few frames: all of them
    assert sample_frames([100] * 100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]
    # One frame shown for 9 s among 99 short ones: it gets the targets that fall in its time, the rest
    # are filled evenly by frame order; the first and last are always there.
    durations = [10.0] * 50 + [9000.0] + [10.0] * 49
    picked = sample_frames(durations, 8)
    assert picked[0] == 0 and picked[-1] == 99 and 50 in picked and len(picked) == 8
    assert sample_frames([100] * 10, 1) == [0]


@given(st.lists(st.floats(1, 10_000), min_size=1, max_size=300), st.integers(1, 16))
def test_sampling_is_sorted_unique_bounded(durations, k):
    picked = sample_frames(durations, k)
    assert picked == sorted(set(picked)) and len(picked) == min(k, len(durations))
    assert picked[0] == 0 and (k == 1 or picked[-1] == len(durations) - 1)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_durations_read_from_the_file_match_what_pillow_decodes(fmt):
    durations = [40, 40, 500, 120, 1000, 60]
    data = animation_bytes(_photos(6), fmt, durations)
    img = Image.open(io.BytesIO(data))
    shown = []
    for i in range(img.n_frames):
        img.seek(i)
        img.load()  # WebP reads a frame's duration as it decodes it
        shown.append(float(img.info["duration"]))
    assert frame_durations(data, fmt) == shown == [float(d) for d in durations]


def test_a_zero_gif_delay_counts_as_browsers_show_it():
    data = animation_bytes(_photos(3), "GIF", 0)
    assert frame_durations(data, "GIF") == [100.0, 100.0, 100.0]
    assert frame_durations(data[:40], "GIF") is None or len(frame_durations(data[:40], "GIF") or []) < 3


# --- decoding -------------------------------------------------------------------------------------------


def test_a_still_gives_one_frame_exactly_as_before():
    data = jpeg_bytes(photo_like(320, 240, seed=5))
    loaded = load_frames(data, ImageLimits(), SPEC)
    assert loaded.frames is None and loaded.pixels.shape == (1, 224, 224, 3)
    assert np.array_equal(loaded.pixels[0], load_image(data, ImageLimits(), SPEC))
    assert loaded.pdqs[0] is not None and loaded.pdqs[0].usable


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_each_sampled_frame_is_the_frame_pillow_shows_and_the_first_is_the_still(fmt):
    data = animation_bytes(_photos(20, seed=3), fmt, 50)
    loaded = load_frames(data, ImageLimits(), SPEC)
    assert loaded.frames is not None and loaded.frames.count == 20 and loaded.frames.kind == "animation"
    indices = [f.index for f in loaded.frames.sampled]
    assert len(indices) == 8 and indices[0] == 0 and indices[-1] == 19
    assert [f.timestamp_ms for f in loaded.frames.sampled] == [50.0 * i for i in indices]
    assert np.array_equal(loaded.pixels[0], load_image(data, ImageLimits(), SPEC))  # the still's path
    img = Image.open(io.BytesIO(data))
    for row, index in enumerate(indices):
        img.seek(index)
        assert np.array_equal(loaded.pixels[row], preprocess(img.convert("RGB"), SPEC)), index
    assert len(loaded.pdqs) == 8 and all(h is not None for h in loaded.pdqs)


def test_frames_sampled_one_is_the_first_frame_only():
    data = animation_bytes(_photos(5), "GIF")
    loaded = load_frames(data, ImageLimits(frames_sampled=1), SPEC)
    assert loaded.frames is None and loaded.pixels.shape[0] == 1


def test_adversarial_animations_are_refused_by_rule_with_typed_reasons():
    from moderator.images import ImageError

    def reason(data: bytes, limits: ImageLimits = VIDEO) -> str:
        with pytest.raises(ImageError) as caught:
            load_frames(data, limits, SPEC)
        return caught.value.reason

    assert reason(many_frames_gif(3000, 8, 8)) == "too_many_frames"  # refused, never truncated
    # 400 frames of 1200x1000: 480M pixels to composite, over the animation limit (each frame is fine)
    assert reason(many_frames_gif(400, 1200, 1000)) == "image_too_large"
    # A logical screen of 9000x9000: over the per-frame pixel limit, before anything decodes
    huge = bytearray(many_frames_gif(2, 8, 8))
    huge[6:10] = (9000).to_bytes(2, "little") * 2
    assert reason(bytes(huge)) == "image_too_large"
    cut = animation_bytes(_photos(12), "GIF")
    assert reason(cut[: len(cut) * 2 // 3]) == "truncated_image"
    assert reason(video_bytes(_photos(4)), ImageLimits()) == "unsupported_format"  # videos are opt-in
    assert reason(b"GIF89a" + b"\x00" * 7) in ("truncated_image", "corrupt_image", "not_an_image")


def test_decoding_a_long_animation_holds_one_frame_at_a_time(tmp_path):
    """Peak memory of decoding 8 sampled frames of a 300-frame 1000x1000 animation (300M pixels to
    composite, under the limit), in a fresh interpreter: the buffers of one frame (Pillow's composited
    frame, the RGB copy, PDQ's float planes: about 21 MB measured), never 8 frames (+32 MB more) or
    300 (1.2 GB)."""
    path = tmp_path / "long.gif"
    path.write_bytes(many_frames_gif(300, 1000, 1000))
    script = textwrap.dedent(f"""
        from pathlib import Path
        from moderator.images import ImageLimits, PreprocessSpec, load_frames
        data = Path({str(path)!r}).read_bytes()
        spec = PreprocessSpec(224, None, (224, 224), 3, 1 / 255, (0.5,) * 3, (0.5,) * 3)
        def kib(field):
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
            return int(line.split()[1])
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
        before = kib("VmRSS:")
        loaded = load_frames(data, ImageLimits(), spec)
        print(loaded.pixels.shape[0], (kib("VmHWM:") - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    frames, grown_mb = map(int, out.stdout.split())
    print(f"8 frames of a 300-frame 1000x1000 GIF: peak memory grew {grown_mb} MB")
    assert frames == 8 and grown_mb < 40


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_a_video_gives_its_keyframes_sampled_by_time(fmt):
    frames = _photos(24, seed=11)
    data = video_bytes(frames, fmt, fps=4, keyframe_every=2)  # 6 s, a keyframe every 0.5 s
    loaded = load_frames(data, VIDEO, SPEC)
    assert loaded.frames is not None and loaded.frames.kind == "video"
    assert loaded.frames.count >= 12 and loaded.frames.duration_ms == pytest.approx(6000, abs=300)
    sampled = loaded.frames.sampled
    assert len(sampled) == 8 and sampled[0].timestamp_ms == 0 and loaded.pixels.shape == (8, 224, 224, 3)
    for f in sampled:
        assert f.index == round(f.timestamp_ms * 4 / 1000)
    # The sampled keyframe is that frame of the clip (lossy: close, not equal)
    first = preprocess(Image.fromarray(frames[sampled[2].index]), SPEC).astype(float)
    assert np.abs(loaded.pixels[2].astype(float) - first).mean() < 12


def test_videos_outside_their_limits_are_refused_with_typed_reasons():
    from moderator.images import ImageError

    def reason(data: bytes, limits: ImageLimits = VIDEO) -> str:
        with pytest.raises(ImageError) as caught:
            load_frames(data, limits, SPEC)
        return caught.value.reason

    long = video_bytes(_photos(2, w=32, h=32) * 5, "mp4", fps=1)  # 10 s
    limits = ImageLimits(formats=VIDEO.formats, video_max_seconds=5)
    assert reason(long, limits) == "video_too_long"
    assert reason(long, ImageLimits(formats=VIDEO.formats, max_frames=4)) == "too_many_frames"
    assert reason(long, ImageLimits(formats=VIDEO.formats, max_pixels=32 * 31)) == "image_too_large"
    good = video_bytes(_photos(4), "mp4")
    assert reason(good[: len(good) // 3]) == "corrupt_video"
    assert reason(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200) == "corrupt_video"


# --- scores and bank hits over frames --------------------------------------------------------------------


def test_maxima_over_frames_and_the_frame_that_holds_them():
    scores = np.array([[0.1, 0.5], [0.9, 0.2], [0.3, 0.4], [0.7, 0.1], [0.2, 0.8], [0.6, 0.6]])
    maxima, which = frame_maxima(scores, [1, 3, 2])
    assert maxima.tolist() == [[0.1, 0.5], [0.9, 0.4], [0.6, 0.8]]
    assert which.tolist() == [[0, 0], [0, 1], [1, 0]]


def _entry(bank: str, name: str) -> Entry:
    return Entry(bank, name, "", None, None, None)


def test_bank_hits_merge_over_frames_with_a_minimum_number_of_frames():
    a, b = _entry("known", "a"), _entry("known", "b")
    per_frame = [[Hit(a, pdq_distance=20)], [], [Hit(a, pdq_distance=8), Hit(b, pdq_distance=30)], [Hit(a, cosine=0.9)]]
    hits, frames = merge_hits(per_frame)
    assert {h.entry.id: h.pdq_distance for h in hits} == {"a": 8, "b": 30}
    assert frames == {("known", "a"): 2, ("known", "b"): 2}
    hits, frames = merge_hits(per_frame, min_frames=2)  # vPDQ's rule: b matches one frame of four
    assert [h.entry.id for h in hits] == ["a"] and frames == {("known", "a"): 2}


POLICY = {
    "name": "test",
    "templates": ["{}"],
    "neutral": ["n1"],
    "categories": [
        {"name": "weapons", "descriptions": ["gun"], "flag": 0.8, "review": 0.5},
        {"name": "gore", "descriptions": ["blood"], "flag": 0.8, "review": 0.5},
    ],
    "banks": [{"name": "known", "decision": "flag", "category": "known-violation"}],
}


def test_a_later_frame_decides_and_every_trigger_names_its_frame():
    policy = assemble(PolicySpec.model_validate(POLICY), np.eye(3, dtype=np.float32), logit_scale=10.0, model="m")
    # Rows: a still (neutral), then an animation of 3 frames: neutral, gore-ish, gun.
    rows = torch.tensor([[0, 0, 1.0], [0, 0, 1.0], [0, 0.6, 0.8], [1.0, 0, 0]])
    animation = FrameSet("animation", 40, 4000.0, (SampledFrame(0, 0.0), SampledFrame(17, 1700.0),
                                                  SampledFrame(39, 3900.0)))  # fmt: skip
    hits = [[], [], [Hit(_entry("known", "x"), pdq_distance=3)], []]
    still, animated = policy.decisions_over_frames(rows, [None, animation], hits)
    assert still.decision == "allow" and still.frames is None
    assert animated.decision == "flag"
    assert animated.scores == pytest.approx(dict(zip(["weapons", "gore"], policy.scores(rows).max(0), strict=True)))
    by_rule = {(t.rule, t.category): t.frame for t in animated.triggered}
    assert by_rule[("flag", "weapons")] == 39 and by_rule[("bank", "known-violation")] == 17
    assert animated.frames is not None and animated.frames.count == 40
    assert [f.index for f in animated.frames.sampled] == [0, 17, 39]
    assert animated.frames.sampled[2].scores["weapons"] == pytest.approx(animated.scores["weapons"])
    # The strongest trigger (a flag by bank first, then by score) drove it
    assert (animated.frames.frame, animated.frames.timestamp_ms) == (
        animated.triggered[0].frame,
        {0: 0.0, 17: 1700.0, 39: 3900.0}[animated.triggered[0].frame],
    )
    # A still's decision is what decisions() gives
    assert still == policy.decisions(rows[:1])[0]


def test_batches_are_full_by_rows():
    batcher: MicroBatcher[str] = MicroBatcher(max_size=10, max_delay_s=1.0)
    for name, weight in [("a", 1), ("gif", 8), ("b", 1), ("c", 1)]:
        batcher.add(name, 0.0, weight=weight)
    assert batcher.ready(0.0) and batcher.weight == 11
    assert [p.item for p in batcher.take(0.0)] == ["a", "gif", "b"]
    assert [p.item for p in batcher.take(0.0, force=True)] == ["c"] and batcher.weight == 0
    batcher.add("huge", 0.0, weight=30)  # heavier than a batch: alone
    assert [p.item for p in batcher.take(0.0)] == ["huge"]


# --- the whole worker --------------------------------------------------------------------------------------


def _settings(policies: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"policy_dir": policies, "redis_enabled": False, "max_batch_size": 16,
                                 "max_delay_ms": 5, "commit_interval_ms": 50, "shutdown_timeout_s": 10,
                                 "banks_enabled": False, "embeddings_dtype": "float32"}  # fmt: skip
    values.update(overrides)
    return Settings(**values)


def _decide(app: App, events: dict[str, bytes], banks: BankIndex | None = None) -> dict[str, dict[str, dict]]:
    feed = QueueFeed(app.settings.topic("images"))
    for eid, data in events.items():
        feed.put(eid.encode(), json.dumps({"id": eid, "image": {"data": base64.b64encode(data).decode()}}).encode())
    worker = app.worker(consumer=feed, producer=feed, banks=FixedBanks(banks) if banks is not None else None)
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(worker.run(install_signals=False)))
    thread.start()
    done = {app.settings.topic("decisions"), app.settings.topic("dead_letters")}
    while sum(1 for o in feed.outputs_since(0, 0.2) if o.topic in done) < len(events) and thread.is_alive():
        pass
    worker.stop("test done")
    thread.join(30)
    out: dict[str, dict[str, dict]] = {}
    for o in feed.outputs:
        out.setdefault(o.topic, {})[o.key.decode()] = json.loads(o.value)
    return out


def _bank_policies(tmp_path: Path) -> Path:
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    raw = yaml.safe_load((policies / "community-standards.yaml").read_text())
    raw["banks"] = [{"name": "known", "decision": "flag", "category": "known-violation", "severity": "high"}]
    (policies / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    return policies


def test_a_gif_whose_fifth_frame_is_banked_is_flagged_by_the_bank_rule(tmp_path, tiny_engine):
    banked = photo_like(160, 120, seed=77)
    entry = Entry("known", "case-1", "a confirmed case", hash_image(banked).variants[0], None, None)
    plain = _photos(7, seed=300, w=160, h=120)
    gif = animation_bytes([*plain[:4], banked, *plain[4:]], "GIF", 120)
    app = App(_settings(_bank_policies(tmp_path), review_include_flagged=True), engine=tiny_engine)
    out = _decide(app, {"gif": gif, "first-frame": jpeg_bytes(plain[0], quality=95)},
                  BankIndex([entry], tiny_engine.fingerprint))  # fmt: skip
    d = out["decisions"]["gif"]
    assert d["decision"] == "flag"
    (bank,) = [t for t in d["triggered"] if t["rule"] == "bank"]
    assert bank["match"]["entry"] == "case-1" and bank["frame"] == 4 and bank["match"]["pdq_distance"] <= 31
    assert (d["frames"]["frame"], d["frames"]["timestamp_ms"], d["frames"]["count"]) == (4, 480.0, 8)
    assert [f["index"] for f in d["frames"]["sampled"]] == list(range(8))
    assert not [t for t in out["decisions"]["first-frame"]["triggered"] if t["rule"] == "bank"]
    # The embeddings log keeps the driving frame's vector and hash, and every frame's vector
    logged = out[app.settings.topic("embeddings")]["gif"]
    frames = decode_frame_vectors(logged["frame_vectors"], logged["dtype"], logged["dim"])
    assert frames.shape == (8, logged["dim"])
    assert np.array_equal(frames[4], decode_frame_vectors(logged["vector"], logged["dtype"], logged["dim"])[0])
    assert int(np.bitwise_count(np.frombuffer(bytes.fromhex(logged["pdq"]), np.uint8) ^ entry.pdq).sum()) <= 31
    # The review feed's item (flags go to review here) carries the frames (the console's contact sheet)
    assert out[app.settings.topic("review")]["gif"]["frames"]["frame"] == 4


def _frame_scores(app: App, data: bytes) -> np.ndarray:
    """The policy's scores of each frame as Pillow decodes it, through the engine: the reference."""
    img = Image.open(io.BytesIO(data))
    rows = []
    for i in range(img.n_frames):
        img.seek(i)
        rows.append(preprocess(img.convert("RGB"), app.engine.spec))
    policy = app.policies.current.get(None)
    return policy.scores(app.engine.encode_images(np.stack(rows)))


def test_a_gif_whose_later_frame_scores_above_a_flag_threshold_is_flagged(tmp_path, tiny_engine):
    """Random weights: the thresholds are set between the frames' scores, so that exactly one later
    frame reaches a flag threshold; sampling only the first frame (the old rule) allows the GIF."""
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    gif = animation_bytes(_photos(8, seed=500, w=120, h=90), "GIF", 100)
    app = App(_settings(policies), engine=tiny_engine)
    scores = _frame_scores(app, gif)  # [8, C]
    categories = app.policies.current.get(None).categories
    # The (category, later frame) standing furthest above every other frame
    others = np.stack([np.delete(scores, j, axis=0).max(0) for j in range(8)])
    margin = scores - others
    margin[0] = -1
    j, c = np.unravel_index(int(margin.argmax()), margin.shape)
    assert margin[j, c] > 1e-4, "no frame stands out on this checkpoint"
    threshold = float(scores[j, c] - margin[j, c] / 2)
    path = policies / "community-standards.yaml"
    raw = yaml.safe_load(path.read_text())
    for cat in raw["categories"]:
        cat["flag"], cat["review"] = (threshold, threshold) if cat["name"] == categories[c] else (1.0, 1.0)
    path.write_text(yaml.safe_dump(raw))
    app = App(_settings(policies), engine=tiny_engine)
    out = _decide(app, {"gif": gif})
    d = out["decisions"]["gif"]
    assert d["decision"] == "flag", (j, categories[c], d["scores"])
    (t,) = d["triggered"]
    assert (t["category"], t["frame"]) == (categories[c], int(j))
    assert (d["frames"]["frame"], d["frames"]["timestamp_ms"]) == (int(j), 100.0 * int(j))
    assert d["scores"][categories[c]] == pytest.approx(float(scores[j, c]), abs=1e-5)
    first = App(_settings(policies, frames_sampled=1), engine=tiny_engine)
    assert _decide(first, {"gif": gif})["decisions"]["gif"]["decision"] == "allow"  # the evasion, before


def test_a_video_matches_a_bank_entry_when_enough_keyframes_do(tmp_path, tiny_engine):
    banked = photo_like(160, 120, seed=77)
    entry = Entry("known", "case-1", "", hash_image(banked).variants[0], None, None)
    plain = _photos(5, seed=900, w=160, h=120)
    clip = video_bytes([plain[0], plain[1], banked, plain[2], plain[3], plain[4]], "mp4", fps=1)
    index = BankIndex([entry], tiny_engine.fingerprint)
    policies = _bank_policies(tmp_path)
    formats = ("JPEG", "PNG", "WEBP", "GIF", "MP4")
    for need, flagged in ((1, True), (2, False)):
        app = App(_settings(policies, image_formats=formats, video_bank_min_frames=need), engine=tiny_engine)
        d = _decide(app, {"clip": clip}, index)["decisions"]["clip"]
        bank = [t for t in d["triggered"] if t["rule"] == "bank"]
        assert d["frames"]["kind"] == "video" and bool(bank) == flagged, (need, d["triggered"])
        if flagged:
            assert bank[0]["frame"] == 2 and d["frames"]["timestamp_ms"] == 2000.0


def test_classify_and_explain_decide_an_animation_over_its_frames(tmp_path, tiny_clip_dir, monkeypatch, capsys):
    """The command line decides a GIF as the worker does: `classify --policy` gives the frames and
    the maxima, `policy explain` the driving frame's closest texts."""
    from moderator.cli import main

    for key, value in {"MODERATOR_MODEL_ID": str(tiny_clip_dir), "MODERATOR_REDIS_ENABLED": "false",
                       "MODERATOR_DEVICE": "cpu"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    gif, still = tmp_path / "a.gif", tmp_path / "s.jpg"
    gif.write_bytes(animation_bytes(_photos(12, seed=40), "GIF", 100))
    still.write_bytes(jpeg_bytes(photo_like(96, 64, seed=1)))
    policy = str(ROOT / "policies" / "community-standards.yaml")
    capsys.readouterr()
    assert main(["classify", str(gif), str(still), "--policy", policy]) == 0
    classified = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert classified[1]["frames"] is None and len(classified[0]["frames"]["sampled"]) == 8
    for category, score in classified[0]["scores"].items():
        assert score == max(f["scores"][category] for f in classified[0]["frames"]["sampled"])
    assert main(["policy", "explain", "--policy", policy, str(gif), str(still)]) == 0
    explained = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    a, b = explained[0]["frames"], classified[0]["frames"]  # (batches of other sizes: the last bits may differ)
    assert [f["index"] for f in a["sampled"]] == [f["index"] for f in b["sampled"]] and "frames" not in explained[1]
    for x, y in zip(a["sampled"], b["sampled"], strict=True):
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)
    assert explained[0]["decision"] == classified[0]["decision"]
    frame = classified[0]["frames"]["frame"]
    driving = next(f for f in classified[0]["frames"]["sampled"] if f["index"] == frame)
    assert {c["category"]: c["score"] for c in explained[0]["categories"]} == pytest.approx(driving["scores"], abs=1e-5)
