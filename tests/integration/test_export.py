"""`moderator export onnx`: both towers as ONNX, run by onnxruntime, against the torch towers (tiny model
and the ViT-B/32 architecture), the dynamic batch, the manifest, and the int8 tower through the gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from transformers import CLIPModel

from moderator.cli import main
from moderator.clip import ClipEngine

ROOT = Path(__file__).resolve().parents[2]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("model", ["tiny_clip_dir", "b32_clip_dir"])
def test_onnx_towers_match_torch_at_any_batch(request, model, tmp_path, monkeypatch, capsys):
    model_dir = request.getfixturevalue(model)
    monkeypatch.setenv("MODERATOR_POLICY_DIR", str(ROOT / "policies"))
    out = tmp_path / "onnx"
    capsys.readouterr()
    assert main(["export", "onnx", str(out), "--model", str(model_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "moderator-onnx.json").read_text())
    assert printed["files"] == ["image_tower", "text_tower"] and manifest["format"] == "moderator-onnx/1"
    assert all(v <= 1e-4 for k, v in manifest["checks"].items() if k.endswith("max_abs_diff"))

    # Independently of the command's own check: a fresh transformers model against onnxruntime.
    reference = CLIPModel.from_pretrained(str(model_dir)).eval()
    engine = ClipEngine.load(str(model_dir), device="cpu", warm_up=False)
    assert manifest["model"] == engine.fingerprint and manifest["logit_scale"] == pytest.approx(engine.logit_scale)
    h, w = engine.spec.output_hw
    assert manifest["preprocessing"]["mean"] == list(engine.spec.mean)
    assert manifest["preprocessing"]["center_crop_hw"] == [h, w]
    image, text = _session(out / "image_tower.onnx"), _session(out / "text_tower.onnx")
    for batch in (1, 33):
        pixels = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(batch))
        got = image.run(None, {"pixel_values": pixels.numpy()})[0]
        with torch.inference_mode():
            want = reference.get_image_features(pixel_values=pixels).pooler_output.numpy()
        assert got.shape == (batch, engine.embed_dim)
        assert np.abs(got - want).max() <= 1e-4
    texts = ["a photo of a cat", "a handgun or rifle on a table", "x"] * 11
    tok = engine.tokenizer(texts, padding=True, return_tensors="pt")
    got = text.run(None, {"input_ids": tok["input_ids"].numpy(), "attention_mask": tok["attention_mask"].numpy()})[0]
    with torch.inference_mode():
        want = reference.get_text_features(**tok).pooler_output.numpy()
    assert got.shape == (33, engine.embed_dim) and np.abs(got - want).max() <= 1e-4
    assert (out / "processor" / "tokenizer_config.json").is_file()


def test_int8_export_is_gated(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    """The int8 ONNX tower (NNCF, QDQ) ships only through the precision gate: with a policy whose
    thresholds nothing reaches it passes; under the shipped policies, whose thresholds the tiny model's
    probe scores crowd, its decisions change too often and the export fails, saying why."""
    calm = tmp_path / "calm"
    calm.mkdir()
    raw = yaml.safe_load((ROOT / "policies" / "kids-platform.yaml").read_text())
    for c in raw["categories"]:
        c["review"], c["flag"] = 0.99, 1.0
    (calm / "kids-platform.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MODERATOR_POLICY_DIR", str(calm))
    out = tmp_path / "onnx"
    capsys.readouterr()
    assert main(["export", "onnx", str(out), "--int8", "--model", str(tiny_clip_dir)]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "moderator-onnx.json").read_text())
    int8 = manifest["files"]["image_tower_int8"]
    assert int8["gate"]["min_cosine"] >= 0.99 and int8["gate"]["agreement"] == {"kids-platform": 1.0}
    session = _session(out / int8["file"])
    for batch in (1, 33):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        assert session.run(None, {"pixel_values": x})[0].shape == (batch, 16)

    shutil.rmtree(out)
    monkeypatch.setenv("MODERATOR_POLICY_DIR", str(ROOT / "policies"))
    assert main(["export", "onnx", str(out), "--int8", "--model", str(tiny_clip_dir)]) == 1
    assert "fails the precision gate (not written): agreement under community-standards" in capsys.readouterr().err
