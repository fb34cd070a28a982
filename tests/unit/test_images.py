"""Decoding limits and typed errors, and the fast preprocessing path against the image processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import load_image as reference_load_image

from moderator.images import (
    CorruptImage,
    ImageLimits,
    ImageLoader,
    ImageTooLarge,
    NotAnImage,
    PreprocessSpec,
    TruncatedImage,
    UnsupportedFormat,
    decode,
    load_frames,
    load_image,
    preprocess,
)
from moderator.samples import jpeg_bytes, photo_like, varied_images

LIMITS = ImageLimits()


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    return varied_images(seed=7)


def reference_image(data: bytes) -> Image.Image:
    """What the reference pipeline sees (16-bit greyscale: see moderator.images' docstring)."""
    img = Image.open(io.BytesIO(data))
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8), "L").convert("RGB")
    return reference_load_image(img)


def test_corpus_is_varied(corpus):
    assert len(corpus) >= 50
    modes = {Image.open(io.BytesIO(b)).mode for b in corpus.values()}
    assert {"RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16"} <= modes
    sizes = [Image.open(io.BytesIO(b)).size for b in corpus.values()]
    assert min(min(s) for s in sizes) == 1 and max(max(s) for s in sizes) >= 2000


@pytest.mark.parametrize("crop,edge", [(32, 32), (224, 224), (30, 36), (40, 32)])
def test_pixels_equal_image_processor(corpus, tmp_path, crop, edge):
    """Fast path (uint8 crop, normalization on the device) == the checkpoint's image processor."""
    from moderator.clip import ClipEngine
    from moderator.random_init import build_clip_checkpoint

    model_dir = build_clip_checkpoint(
        tmp_path / "m",
        "tiny",
        crop_size=crop,
        shortest_edge=edge,
        image_mean=(0.5, 0.4, 0.3),
        image_std=(0.2, 0.25, 0.3),
    )
    engine = ClipEngine.load(str(model_dir), device="cpu", warm_up=False)
    for name, data in corpus.items():
        ours = engine.pixel_values(load_image(data, LIMITS, engine.spec)[None])
        ref = engine.image_processor(images=[reference_image(data)], return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape, name
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (name, (ours - ref).abs().max().item())


def test_exif_orientation_is_applied(corpus):
    spec = PreprocessSpec(None, None, None, 3, 1 / 255, (0, 0, 0), (1, 1, 1))
    for o in range(2, 9):
        img = decode(corpus[f"exif_orientation{o}.jpg"], LIMITS, spec)
        assert img.size == ((320, 200) if o in (2, 3, 4) else (200, 320))


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    ours = np.asarray(decode(buf.getvalue(), LIMITS))[..., 0]
    assert ours.min() == 0 and ours.max() == 255
    assert abs(float(ours.mean()) - 127.5) < 2  # a ramp stays a ramp ...
    clipped = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))[..., 0]
    assert clipped.mean() > 250  # ... where Pillow's convert("RGB") turns it (almost) white


def test_animated_gif_gives_first_frame(corpus):
    img = decode(corpus["animated.gif"], LIMITS)
    assert img.mode == "RGB" and img.size == (120, 90)
    first = Image.open(io.BytesIO(corpus["animated.gif"]))
    first.seek(0)
    assert np.array_equal(np.asarray(img), np.asarray(first.convert("RGB")))


# --- typed errors ---------------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_not_an_image():
    with pytest.raises(NotAnImage):
        decode(b"hello, this is a text file\n" * 10, LIMITS)
    with pytest.raises(NotAnImage):
        decode(b"", LIMITS)


def test_truncated_jpeg():
    data = jpeg_bytes(photo_like(640, 480))
    with pytest.raises(TruncatedImage):
        decode(data[: len(data) // 2], LIMITS)


def test_corrupt_png():
    data = bytearray(_png(Image.fromarray(photo_like(64, 64))))
    data[60:80] = b"\xff" * 20  # damage the IDAT data: CRC / zlib error
    with pytest.raises((CorruptImage, TruncatedImage)):
        decode(bytes(data), LIMITS)


def test_too_many_bytes():
    data = jpeg_bytes(photo_like(640, 480))
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode(data, ImageLimits(max_bytes=len(data) - 1))


def test_decompression_bomb_rejected_before_decoding():
    # 12000 x 12000 of one colour: a few hundred KB compressed, 432 MB decoded.
    bomb = _png(Image.new("L", (12_000, 12_000)))
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode(bomb, LIMITS)


def test_pillow_bomb_threshold_is_also_caught():
    bomb = _png(Image.new("1", (20_000, 20_000)))  # 400M pixels: Pillow's own bomb error
    with pytest.raises(ImageTooLarge):
        decode(bomb, ImageLimits(max_pixels=10**12))


def test_unsupported_format():
    buf = io.BytesIO()
    Image.fromarray(photo_like(32, 32)).save(buf, "BMP")
    with pytest.raises(UnsupportedFormat, match="BMP"):
        decode(buf.getvalue(), LIMITS)
    assert decode(buf.getvalue(), ImageLimits(formats=("BMP",))).size == (32, 32)


def test_loader_returns_errors_in_place():
    spec = PreprocessSpec(32, None, (32, 32), 3, 1 / 255, (0, 0, 0), (1, 1, 1))
    loader = ImageLoader(LIMITS, spec, threads=2)
    try:
        good = jpeg_bytes(photo_like(100, 80))
        results = loader.load_many([good, b"nope", good[:100], good])
    finally:
        loader.close()
    assert isinstance(results[0], np.ndarray) and results[0].shape == (32, 32, 3)
    assert isinstance(results[1], NotAnImage)
    assert isinstance(results[2], (TruncatedImage, CorruptImage))
    assert np.array_equal(results[0], results[3])


def test_jpeg_draft_only_for_large_jpegs():
    spec = PreprocessSpec(224, None, (224, 224), 3, 1 / 255, (0, 0, 0), (1, 1, 1))
    big = jpeg_bytes(photo_like(2000, 1500, seed=3))
    exact = decode(big, LIMITS, spec)
    drafted = decode(big, ImageLimits(jpeg_draft=True), spec)
    assert exact.size == (2000, 1500)
    assert drafted.size[0] < 2000 and drafted.size[1] >= 224 * 1500 // 2000
    small = jpeg_bytes(photo_like(300, 300, seed=3))
    assert decode(small, ImageLimits(jpeg_draft=True), spec).size == (300, 300)


def test_jpeg_draft_auto_is_on_for_the_reduced_precisions_only():
    from moderator.config import Settings

    auto = Settings()
    assert auto.image_jpeg_draft == "auto"
    assert not ImageLimits.from_settings(auto).jpeg_draft  # no tower named: exact (the console, bank add)
    assert not ImageLimits.from_settings(auto, "float32").jpeg_draft
    assert ImageLimits.from_settings(auto, "bfloat16").jpeg_draft and ImageLimits.from_settings(auto, "int8").jpeg_draft
    assert not ImageLimits.from_settings(Settings(image_jpeg_draft=False), "int8").jpeg_draft
    assert ImageLimits.from_settings(Settings(image_jpeg_draft="true"), "float32").jpeg_draft  # as the env gives it


def test_the_reduced_precisions_resize_only_the_columns_the_crop_keeps():
    """``exact=False`` (with draft decoding): a landscape photo's resize computes only the cropped columns,
    within one level of resize-then-crop on at most 0.05% of the pixels; portrait, square-upscaled and
    small images take the exact path unchanged; exact decoding keeps the exact path."""
    spec = PreprocessSpec(224, None, (224, 224), 3, 1 / 255, (0, 0, 0), (1, 1, 1))
    for i, (w, h) in enumerate([(640, 480), (320, 240), (1280, 720), (1024, 768), (1898, 272), (601, 474)]):
        img = Image.fromarray(photo_like(w, h, seed=40 + i))
        exact, fast = preprocess(img, spec).astype(int), preprocess(img, spec, exact=False).astype(int)
        assert fast.shape == exact.shape == (224, 224, 3)
        assert np.abs(exact - fast).max() <= 1 and (exact != fast).mean() < 5e-4, (w, h)
    for w, h in [(480, 640), (200, 150), (224, 224)]:  # portrait; upscaled; no resize
        img = Image.fromarray(photo_like(w, h, seed=1))
        assert np.array_equal(preprocess(img, spec), preprocess(img, spec, exact=False)), (w, h)
    data = jpeg_bytes(photo_like(640, 480, seed=5))
    assert np.array_equal(load_frames(data, LIMITS, spec, with_pdq=False).pixels[0], load_image(data, LIMITS, spec))
    assert np.array_equal(load_image(data, LIMITS, spec), preprocess(decode(data, LIMITS, spec), spec))
