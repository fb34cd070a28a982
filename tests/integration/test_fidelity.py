"""`moderator classify` gives the reference zero-shot pipeline's scores, image by image.

Both run the same saved checkpoint: the tiny CLIP, and a randomly initialized CLIP with the
ViT-B/32 architecture. Inputs: the varied corpus (1x1 to 2100 px, odd aspect ratios, RGB, RGBA,
LA, L, P, CMYK, 16-bit, EXIF-rotated, animated GIF; JPEG/PNG/WEBP/GIF). fp32, draft mode off.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from moderator.cli import main
from moderator.samples import varied_images

LABELS = [
    "a handgun or rifle",
    "graphic injury with blood",
    "a cat",
    "a bowl of fruit",
    "a crowd at a concert",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for name, data in varied_images(seed=11).items():
        (d / name).write_bytes(data)
    return d


def reference_input(path):
    img = Image.open(path)
    if img.mode.startswith("I;16"):  # the one deliberate difference: 16-bit is scaled, not clipped
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8), "L").convert("RGB")
    return str(path)


def classify(capsys, monkeypatch, model_dir, paths):
    monkeypatch.setenv("MODERATOR_MODEL_ID", str(model_dir))
    monkeypatch.setenv("MODERATOR_REDIS_ENABLED", "false")
    monkeypatch.setenv("MODERATOR_DEVICE", "cpu")
    capsys.readouterr()
    code = main(["classify", *map(str, paths), *[a for lb in LABELS for a in ("--label", lb)]])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return code, rows


@pytest.mark.parametrize("model", ["tiny_clip_dir", "b32_clip_dir"])
def test_classify_equals_reference_pipeline(request, capsys, monkeypatch, corpus_dir, model):
    model_dir = request.getfixturevalue(model)
    paths = sorted(corpus_dir.iterdir())
    assert len(paths) >= 50
    code, rows = classify(capsys, monkeypatch, model_dir, paths)
    assert code == 0
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    pipe = pipeline("zero-shot-image-classification", model=str(model_dir), device="cpu", dtype=torch.float32)
    worst = 0.0
    for path, row in zip(paths, rows, strict=True):
        ref = {r["label"]: r["score"] for r in pipe(reference_input(path), candidate_labels=LABELS)}
        animated = Image.open(path)
        if getattr(animated, "is_animated", False):  # every frame (at most 8: all sampled), each label's highest
            assert animated.n_frames <= 8
            for i in range(1, animated.n_frames):
                animated.seek(i)
                for r in pipe(animated.convert("RGB"), candidate_labels=LABELS):
                    ref[r["label"]] = max(ref[r["label"]], r["score"])
        assert set(row["scores"]) == set(LABELS)
        for label in LABELS:
            diff = abs(row["scores"][label] - ref[label])
            worst = max(worst, diff)
            assert diff <= 1e-4, (path.name, label, row["scores"][label], ref[label])
        assert row["model"].startswith("random-init:")
    print(f"{model}: worst absolute score difference {worst:.2e} over {len(paths)} images")


def test_classify_reports_bad_images_and_continues(capsys, monkeypatch, tiny_clip_dir, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    buf = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buf, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[:200])
    missing = tmp_path / "missing.jpg"
    code, rows = classify(capsys, monkeypatch, tiny_clip_dir, [text, good, truncated, missing])
    assert code == 1
    assert [r.get("error") for r in rows] == ["not_an_image", None, "truncated_image", "unreadable_file"]
    assert abs(sum(rows[1]["scores"].values()) - 1) < 1e-5


def test_b32_batch_grouping_does_not_change_embeddings(b32_clip_dir):
    from moderator.clip import ClipEngine

    engine = ClipEngine.load(str(b32_clip_dir), device="cpu", warm_up=False)
    rng = np.random.default_rng(5)
    # 64 images on the full-size architecture (the tiny-model unit test uses 256): ~13 images/s here.
    images = rng.integers(0, 256, size=(64, 224, 224, 3), dtype=np.uint8)
    out = []
    for size in (1, 7, 64):
        engine.max_batch_size = size
        out.append(engine.encode_images(images))
    print("max differences:", (out[0] - out[1]).abs().max().item(), (out[0] - out[2]).abs().max().item())
    assert torch.allclose(out[0], out[1], atol=1e-5, rtol=0), (out[0] - out[1]).abs().max()
    assert torch.allclose(out[0], out[2], atol=1e-5, rtol=0), (out[0] - out[2]).abs().max()
