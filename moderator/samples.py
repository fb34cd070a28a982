"""Generated sample images: photo-like content for the demo, the benchmark, probes and tests.

Smooth gradients, shapes, texture and sensor noise, so that JPEG sizes and decode costs resemble
real photos rather than flat colour or white noise; and a corpus of varied encodings (sizes, modes,
formats, EXIF orientations) for fidelity tests. Deterministic under ``seed``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like ``uint8 [H, W, 3]`` image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= max(height - 1, 1)
    xx /= max(width - 1, 1)
    img = np.zeros((height, width, 3), dtype=np.float32)
    for c in range(3):  # a smooth background: a few low-frequency waves per channel
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.3, 3.0), rng.uniform(0.3, 3.0), rng.uniform(0, 6.28)
            img[..., c] += np.sin(fx * 6.28 * xx + fy * 6.28 * yy + ph) * rng.uniform(20, 50)
        img[..., c] += rng.uniform(60, 190)
    for _ in range(int(rng.integers(4, 12))):  # objects: ellipses with their own colour and texture
        cx, cy = rng.uniform(0, 1), rng.uniform(0, 1)
        rx, ry = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        colour = rng.uniform(0, 255, size=3)
        texture = np.sin(xx * rng.uniform(20, 120)) * np.cos(yy * rng.uniform(20, 120)) * rng.uniform(5, 25)
        img[mask] = colour + texture[mask][:, None]
    img += rng.normal(0, 4, size=img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_rotated(arr: np.ndarray, orientation: int) -> bytes:
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, "JPEG", quality=90, exif=exif.tobytes())


def varied_images(seed: int = 0) -> dict[str, bytes]:
    """A corpus of encoded images covering sizes, aspect ratios, modes and formats (name → bytes).

    Names end in the file suffix. Sizes run from 1x1 to beyond 2000 px, with extreme aspect
    ratios; modes RGB, RGBA, LA, L, P (with and without transparency), CMYK, 16-bit greyscale;
    EXIF orientations 2..8; an animated GIF; JPEG, PNG, WEBP and GIF.
    """
    out: dict[str, bytes] = {}
    sizes = [
        (1, 1),
        (3, 5),
        (17, 9),
        (32, 32),
        (64, 48),
        (224, 224),
        (225, 223),
        (300, 200),
        (640, 480),
        (480, 640),
        (1000, 20),
        (20, 1000),
        (1280, 720),
        (2048, 1536),
        (2100, 900),
    ]
    for i, (w, h) in enumerate(sizes):
        out[f"rgb_{w}x{h}.jpg"] = jpeg_bytes(photo_like(w, h, seed + i), quality=80 + i % 15)
    for i, (w, h) in enumerate([(64, 64), (333, 222), (640, 480), (90, 400)]):
        base = photo_like(w, h, seed + 100 + i)
        alpha = (np.linspace(0, 255, w * h).reshape(h, w)).astype(np.uint8)
        rgba = np.dstack([base, alpha])
        out[f"rgba_{w}x{h}.png"] = _save(Image.fromarray(rgba, "RGBA"), "PNG")
        out[f"la_{w}x{h}.png"] = _save(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG")
        out[f"l_{w}x{h}.jpg"] = _save(Image.fromarray(base[..., 1], "L"), "JPEG", quality=88)
        out[f"l_{w}x{h}.png"] = _save(Image.fromarray(base[..., 2], "L"), "PNG")
        pal = Image.fromarray(base).quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        out[f"p_{w}x{h}.png"] = _save(pal, "PNG")
        out[f"p_transparent_{w}x{h}.png"] = _save(pal, "PNG", transparency=0)
        out[f"p_{w}x{h}.gif"] = _save(pal, "GIF")
        out[f"cmyk_{w}x{h}.jpg"] = _save(Image.fromarray(base).convert("CMYK"), "JPEG", quality=90)
        sixteen = (base[..., 0].astype(np.uint16) * 257 + np.uint16(i * 13)).astype(np.uint16)
        out[f"gray16_{w}x{h}.png"] = _save(Image.fromarray(sixteen), "PNG")
        out[f"rgb_{w}x{h}.webp"] = _save(Image.fromarray(base), "WEBP", quality=80)
    for orientation in range(2, 9):
        out[f"exif_orientation{orientation}.jpg"] = _exif_rotated(photo_like(320, 200, seed + orientation), orientation)
    frames = [Image.fromarray(photo_like(120, 90, seed + 200 + k)).quantize(colors=32) for k in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    out["animated.gif"] = buf.getvalue()
    return out


def animation_bytes(frames: list[np.ndarray], fmt: str = "GIF", duration_ms: int | list[int] = 100) -> bytes:
    """An animated GIF, WEBP or PNG (APNG) of these frames (every frame kept: no two are merged)."""
    images = [Image.fromarray(f) for f in frames]
    return _save(images[0], fmt, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def video_bytes(frames: list[np.ndarray], fmt: str = "mp4", fps: int = 2, keyframe_every: int = 1) -> bytes:
    """A short video of these frames (MP4: MPEG-4 part 2; WEBM: VP8), a keyframe every ``keyframe_every``
    frames. Needs PyAV (the ``video`` extra)."""
    import av

    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("mpeg4" if fmt == "mp4" else "libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = keyframe_every
        stream.codec_context.options = {"sc_threshold": "0"} if fmt == "mp4" else {}  # keyframes only by gop
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def many_frames_gif(frames: int, width: int, height: int) -> bytes:
    """A GIF of ``frames`` distinct (so that none is merged) palette frames of ``width`` x ``height``,
    made quickly: for limits and adversarial tests (3,000 frames, huge frames)."""
    base = Image.new("P", (width, height))
    images = []
    for k in range(frames):
        f = base.copy()
        f.putpixel((k % width, (k // width) % height), 1 + k % 250)
        images.append(f)
    return _save(images[0], "GIF", save_all=True, append_images=images[1:], duration=20, loop=0, optimize=False)
