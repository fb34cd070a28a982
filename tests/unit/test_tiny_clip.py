"""The tiny test CLIP is a real transformers checkpoint: it loads back through from_pretrained."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from moderator.random_init import RANDOM_INIT_MARKER, build_clip_checkpoint
from moderator.samples import photo_like


def test_tiny_clip_loads_back_and_runs(tiny_clip_dir):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)
    image = Image.fromarray(photo_like(50, 40, seed=1))
    inputs = processor(text=["a photo of a cat", "a dog"], images=image, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model(**inputs)
    assert out.logits_per_image.shape == (1, 2)
    assert out.image_embeds.shape == (1, model.config.projection_dim)
    assert torch.isfinite(out.logits_per_image).all()
    marker = json.loads((tiny_clip_dir / RANDOM_INIT_MARKER).read_text())
    assert marker == {"architecture": "tiny", "seed": 0}


def test_tiny_clip_is_deterministic_under_seed(tmp_path):
    a = build_clip_checkpoint(tmp_path / "a", seed=3)
    b = build_clip_checkpoint(tmp_path / "b", seed=3)
    c = build_clip_checkpoint(tmp_path / "c", seed=4)
    sa, sb, sc = (CLIPModel.from_pretrained(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tokenizer_round_trips_text(tiny_clip_dir):
    tok = AutoProcessor.from_pretrained(tiny_clip_dir).tokenizer
    ids = tok(["a handgun or rifle"])["input_ids"][0]
    assert ids[0] == tok.convert_tokens_to_ids("<|startoftext|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a handgun or rifle"
    assert np.argmax(ids) == len(ids) - 1  # eos has the highest id, as in real CLIP vocabularies
