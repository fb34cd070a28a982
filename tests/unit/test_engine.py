"""The engine on the tiny CLIP: loading, fingerprints, batching, scoring, ensembles, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from moderator import onednn
from moderator.clip import ClipEngine, ModelLoadError, _check_registry, zero_shot_probs
from moderator.embedding_cache import TextEmbeddingCache, TextEncoder
from moderator.onednn import fuse_cpu_image_tower
from moderator.policy import ensemble_texts
from moderator.random_init import build_clip_checkpoint
from moderator.samples import photo_like


def _batch(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *hw, 3), dtype=np.uint8)


def test_embeddings_are_normalized_and_tagged(tiny_engine):
    embs = tiny_engine.encode_images(_batch(5, tiny_engine.spec.output_hw))
    assert embs.shape == (5, tiny_engine.embed_dim) and embs.dtype == torch.float32
    assert torch.allclose(embs.norm(dim=-1), torch.ones(5), atol=1e-6)
    texts = tiny_engine.encode_texts(["a cat", "a handgun or rifle", ""])
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert tiny_engine.fingerprint.startswith("random-init:tiny@sha256:")


def test_batch_grouping_does_not_change_embeddings(tiny_engine):
    images = _batch(256, tiny_engine.spec.output_hw, seed=1)
    results = []
    for size in (1, 7, 64):
        tiny_engine.max_batch_size = size
        results.append(tiny_engine.encode_images(images))
    tiny_engine.max_batch_size = 64
    assert torch.allclose(results[0], results[1], atol=1e-5, rtol=0)
    assert torch.allclose(results[0], results[2], atol=1e-5, rtol=0)


def test_text_embeddings_do_not_depend_on_padding(tiny_engine):
    alone = tiny_engine.encode_texts(["a cat"])
    padded = tiny_engine.encode_texts(["a cat", "a much longer description of a scene with many words"])
    assert torch.allclose(alone[0], padded[0], atol=1e-6)


def test_matches_clipmodel_forward(tiny_engine, tiny_clip_dir):
    """Engine (uint8 path, folded normalization) == CLIPModel.forward on processor pixels."""
    from PIL import Image

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    imgs = [photo_like(90, 60, seed=s) for s in range(4)]
    labels = ["a photo of a cat", "a dog", "graphic injury with blood"]
    tok = tiny_engine.tokenizer(labels, padding=True, return_tensors="pt")
    px = tiny_engine.image_processor(images=[Image.fromarray(i) for i in imgs], return_tensors="pt")
    with torch.inference_mode():
        ref = model(**tok, pixel_values=px["pixel_values"]).logits_per_image.softmax(-1)
    from moderator.images import preprocess

    batch = np.stack([preprocess(Image.fromarray(i), tiny_engine.spec) for i in imgs])
    probs = zero_shot_probs(tiny_engine.encode_images(batch), tiny_engine.encode_texts(labels), tiny_engine.logit_scale)
    assert torch.allclose(probs, ref, atol=1e-5)


def test_zero_shot_probs_by_hand():
    img = torch.tensor([[1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = zero_shot_probs(img, txt, logit_scale=2.0)
    e = np.exp([2.0, 0.0])
    assert np.allclose(p.numpy(), [e / e.sum()], atol=1e-7)


def test_ensemble_is_mean_of_normalized_then_normalized(tiny_engine):
    encoder = TextEncoder(tiny_engine, TextEmbeddingCache(tiny_engine.fingerprint, tiny_engine.embed_dim))
    prompts = ensemble_texts(["a photo of {}.", "an image containing {}"], "a knife")
    assert prompts == ["a photo of a knife.", "an image containing a knife"]
    got = encoder.encode_ensembles([prompts, ["a dog"]])
    each = tiny_engine.encode_texts(prompts)
    want = torch.nn.functional.normalize(each.mean(0), dim=-1)
    assert np.allclose(got[0], want.numpy(), atol=1e-6)
    assert np.allclose(got[1], tiny_engine.encode_texts(["a dog"])[0].numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)


def test_in_process_cache_encodes_each_text_once(tiny_engine):
    encoder = TextEncoder(tiny_engine, TextEmbeddingCache(tiny_engine.fingerprint, tiny_engine.embed_dim))
    first = encoder.encode(["a", "b", "a"])
    assert encoder.texts_encoded == 2
    again = encoder.encode(["b", "a", "c"])
    assert encoder.texts_encoded == 3
    assert np.array_equal(first[0], again[1]) and np.array_equal(first[1], again[0])


def test_local_fingerprint_changes_with_weights(tmp_path):
    a = ClipEngine.load(str(build_clip_checkpoint(tmp_path / "a", seed=1)), device="cpu", warm_up=False)
    b = ClipEngine.load(str(build_clip_checkpoint(tmp_path / "b", seed=2)), device="cpu", warm_up=False)
    assert a.fingerprint != b.fingerprint


def test_missing_weights_error_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        ClipEngine.load("openai/clip-vit-base-patch32", local_files_only=True, cache_dir=tmp_path, device="cpu")
    msg = str(info.value)
    assert "openai/clip-vit-base-patch32" in msg
    assert "hf download openai/clip-vit-base-patch32" in msg
    assert "MODERATOR_MODEL_ID" in msg


def test_registry_rejects_mismatched_checkpoint(tiny_clip_dir):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    with pytest.raises(ModelLoadError, match="expected"):
        _check_registry("openai/clip-vit-base-patch32", model)
    _check_registry("some/other-model", model)  # not in the registry: no check


def test_cuda_request_without_cuda_fails_clearly(tiny_clip_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelLoadError, match="MODERATOR_DEVICE=cpu"):
        ClipEngine.load(str(tiny_clip_dir), device="cuda")


def test_models_command_lists_registry(capsys, tmp_path, monkeypatch):
    from moderator.cli import main

    monkeypatch.setenv("MODERATOR_MODEL_CACHE_DIR", str(tmp_path))
    assert main(["models"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["model"] for r in rows} == {
        "openai/clip-vit-base-patch32",
        "openai/clip-vit-base-patch16",
        "openai/clip-vit-large-patch14",
        "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    }
    assert all(r["available_locally"] is False for r in rows)


# --------------------------------------------------------------------------------------------------
# The fused oneDNN image tower (CPU)


def _plain_tower(model_dir, act: str | None = None):
    from transformers.activations import ACT2FN

    model = CLIPModel.from_pretrained(model_dir).eval()
    if act is not None:  # the same weights with another activation (LAION checkpoints use gelu)
        model.config.vision_config.hidden_act = act
        for layer in model.vision_model.encoder.layers:
            layer.mlp.activation_fn = ACT2FN[act]
    return model


def _embed(model, pixels):
    with torch.inference_mode():
        return torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


def test_engine_runs_the_fused_tower_and_matches_clipmodel(tiny_engine, tiny_clip_dir):
    assert tiny_engine.image_tower == "onednn-fused"
    assert any(type(m).__name__ == "_OneDNNLinear" for m in tiny_engine.model.vision_model.modules())
    assert not any(type(m).__name__ == "_OneDNNLinear" for m in tiny_engine.model.text_model.modules())
    batch = _batch(6, tiny_engine.spec.output_hw, seed=5)
    ours = tiny_engine.encode_images(batch)
    reference = _embed(_plain_tower(tiny_clip_dir), tiny_engine.pixel_values(batch))
    assert (ours - reference).abs().max() < 1e-5


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_pytorch_tanh", "silu"])
def test_fused_tower_equals_plain_for_each_activation(tiny_clip_dir, act):
    model = _plain_tower(tiny_clip_dir, act)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = _embed(model, pixels)
    assert fuse_cpu_image_tower(model, torch.float32, 32)
    assert (_embed(model, pixels) - plain).abs().max() < 1e-5
    fused_acts = [m.act for m in model.vision_model.modules() if type(m).__name__ == "_OneDNNLinear"]
    assert ("swish" in fused_acts) == (act == "quick_gelu") and ("gelu" in fused_acts) == act.startswith("gelu")


def test_fused_tower_that_disagrees_is_not_used(tiny_clip_dir, monkeypatch):
    monkeypatch.setitem(onednn._FUSED_ACTIVATIONS, "quick_gelu", ("swish", "", 1.0))  # the 1.702 forgotten
    model = _plain_tower(tiny_clip_dir)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain = _embed(model, pixels)
    assert not onednn.fuse_cpu_image_tower(model, torch.float32, 32)
    assert all(type(m).__name__ != "_OneDNNLinear" for m in model.modules())  # every swap undone
    assert torch.equal(_embed(model, pixels), plain)


def test_fused_tower_in_bfloat16(tiny_clip_dir):
    model = _plain_tower(tiny_clip_dir)
    model.vision_model.to(torch.bfloat16)
    model.visual_projection.to(torch.bfloat16)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    plain = _embed(model, pixels).float()
    assert fuse_cpu_image_tower(model, torch.bfloat16, 32)
    assert ((_embed(model, pixels).float() * plain).sum(-1) > 0.99).all()
