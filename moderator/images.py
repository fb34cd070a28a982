"""Image bytes to model input: decode with limits, then resize and center-crop as uint8.

The output of :func:`load_image` is a ``uint8`` array ``[H, W, 3]`` at the checkpoint's crop size.
Rescaling and normalization happen later, on the device, on the whole batch (see ``clip.py``).

Fidelity: decoding follows ``transformers.image_utils.load_image`` (EXIF orientation applied, then
``convert("RGB")``: alpha is dropped, palette/CMYK/LA/L become RGB), and resizing follows the
checkpoint's image processor (shortest edge, Pillow resampling,
center crop with the same offsets and zero padding; a transparent colour key is composited onto
white, as the processor's ``convert_to_rgb`` does). One deliberate difference: 16-bit greyscale is
scaled to 8 bits (``>> 8``). Pillow's own ``convert("RGB")`` clips it at 255, which turns almost
every 16-bit image white, and a moderation service must not be blind to a class of inputs.

An animated image (GIF, WebP, APNG) and, where allowed, a video (``moderator/video.py``) give up to
``frames_sampled`` frames (:func:`load_frames`; which ones: ``moderator/frames.py``), each through the
same path as a still; the first frame is exactly what a still's decoding gives. Before any pixel is
decoded, the frame count (``max_frames``) and the pixels of every frame together
(``max_animation_pixels``: a GIF's frames are composited in order, so sampling the last decodes all)
are checked; each sampled frame is resized, cropped and hashed as soon as it is decoded, so at most
one full-size frame is held at a time.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from moderator.banks.pdq import PdqHash, hash_image
from moderator.config import Settings
from moderator.errors import ReasonError
from moderator.frames import (
    BROWSER_DEFAULT_DELAY_MS,
    FrameSet,
    SampledFrame,
    frame_durations,
    sample_frames,
    timestamps,
)
from moderator.observability import IMAGE_ERRORS, STAGE_SECONDS, get_logger

log = get_logger(__name__)


class ImageError(ReasonError):
    """An input that cannot become model input."""

    reason = "bad_image"


class NotAnImage(ImageError):
    reason = "not_an_image"


class UnsupportedFormat(ImageError):
    reason = "unsupported_format"


class ImageTooLarge(ImageError):
    reason = "image_too_large"


class TruncatedImage(ImageError):
    reason = "truncated_image"


class CorruptImage(ImageError):
    reason = "corrupt_image"


class TooManyFrames(ImageError):
    reason = "too_many_frames"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")
    # JPEG DCT-domain downscaling while decoding (Pillow's draft mode) for images at least twice
    # the resize target: much faster for large photos, slightly different pixels (see README); with it,
    # a landscape image's resize computes only the columns the crop keeps (preprocess, exact=False).
    jpeg_draft: bool = False
    frames_sampled: int = 8  # of an animation or video; 1: its first frame only
    max_frames: int = 1_000  # in one animation (video: keyframes); more: refused (too_many_frames)
    max_animation_pixels: int = 400_000_000  # frames x width x height of an animation
    video_max_seconds: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings, precision: str | None = None) -> ImageLimits:
        """The settings' limits; ``precision``: the image tower's that the images are for (it decides
        ``MODERATOR_IMAGE_JPEG_DRAFT=auto``: draft decoding for a reduced precision; None: exact)."""
        draft = settings.image_jpeg_draft
        if draft == "auto":
            draft = precision is not None and precision != "float32"
        return cls(
            settings.image_max_bytes, settings.image_max_pixels, settings.image_formats, bool(draft),
            settings.frames_sampled, settings.frames_max, settings.frames_max_pixels, settings.video_max_seconds,
        )  # fmt: skip


@dataclass(frozen=True)
class PreprocessSpec:
    """The geometric part of a checkpoint's image processor, plus its normalization constants."""

    shortest_edge: int | None  # resize so that the short side is this long (aspect kept) ...
    resize_hw: tuple[int, int] | None  # ... or to exactly (height, width); neither: no resize
    crop_hw: tuple[int, int] | None  # center crop, or None
    resample: int  # a PIL.Image.Resampling value
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.crop_hw is not None:
            return self.crop_hw
        if self.resize_hw is not None:
            return self.resize_hw
        raise ValueError("image processor has neither a crop size nor a fixed resize size")

    @classmethod
    def from_image_processor(cls, proc: Any) -> PreprocessSpec:
        """Read the spec off a ``transformers`` CLIP image processor (PIL or torchvision backend;
        their classes differ across releases, so it is read by attribute)."""
        size = dict(getattr(proc, "size", None) or {})
        crop = dict(getattr(proc, "crop_size", None) or {})
        do_resize = bool(getattr(proc, "do_resize", True))
        shortest = size.get("shortest_edge") if do_resize else None
        resize_hw = None
        if do_resize and shortest is None and size.get("height") and size.get("width"):
            resize_hw = (int(size["height"]), int(size["width"]))
        if size.get("longest_edge") or size.get("max_height"):
            raise ValueError(f"unsupported image processor size rule: {size}")
        crop_hw = None
        if getattr(proc, "do_center_crop", False) and crop:
            crop_hw = (int(crop["height"]), int(crop["width"]))
        resample = getattr(proc, "resample", Image.Resampling.BICUBIC)
        if not isinstance(resample, int):  # torchvision InterpolationMode
            resample = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1}.get(
                str(getattr(resample, "value", resample)).lower(), 3
            )
        mean = proc.image_mean if proc.do_normalize else (0.0, 0.0, 0.0)
        std = proc.image_std if proc.do_normalize else (1.0, 1.0, 1.0)
        rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 1.0
        return cls(
            shortest_edge=int(shortest) if shortest else None,
            resize_hw=resize_hw,
            crop_hw=crop_hw,
            resample=int(resample),
            rescale_factor=rescale,
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
        )

    def resize_target(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, with the image processor's integer rounding."""
        if self.resize_hw is not None:
            return self.resize_hw[1], self.resize_hw[0]
        if self.shortest_edge is None:
            return width, height
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)


def decode(data: bytes, limits: ImageLimits, spec: PreprocessSpec | None = None) -> Image.Image:
    """Bytes to one RGB frame (an animation's first), or a typed :class:`ImageError`. Checks sizes
    before decoding pixels."""
    return _first_frame(_open(data, limits), data, limits, spec)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    if not data:
        raise NotAnImage("empty input")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise NotAnImage("not a recognized image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except Exception as exc:
        raise _decode_error(exc, data, "cannot read image header") from None
    if img.format not in limits.formats:
        raise UnsupportedFormat(f"format {img.format} is not allowed (allowed: {', '.join(limits.formats)})")
    width, height = img.size
    if width < 1 or height < 1:
        raise CorruptImage(f"invalid dimensions {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}")
    return img


def _first_frame(img: Image.Image, data: bytes, limits: ImageLimits, spec: PreprocessSpec | None) -> Image.Image:
    width, height = img.size
    try:
        if limits.jpeg_draft and img.format == "JPEG" and spec is not None:
            tw, th = spec.resize_target(width, height)
            if width >= 2 * tw and height >= 2 * th:
                img.draft("RGB", (tw, th))
        ImageOps.exif_transpose(img, in_place=True)  # a still's only frame: turned in place, not copied
        return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except Exception as exc:
        raise _decode_error(exc, data, "cannot decode image") from None


Frames = Iterator[tuple[SampledFrame, Image.Image]]


def open_frames(
    data: bytes, limits: ImageLimits, spec: PreprocessSpec | None = None, pick: Sequence[int] | None = None
) -> tuple[FrameSet | None, Frames]:
    """What will be sampled (None: a still), and the sampled frames, decoded one by one as RGB.

    Limits are checked before the first frame decodes; a frame that fails to decode raises its typed
    error from the iterator. A still gives its one frame (:func:`decode`). ``pick``: these frame
    indices (those the file has) instead of a sample (the console shows a decision's frames)."""
    from moderator import video  # PyAV is imported only where a video is allowed and arrives

    if data and video.sniff(data) is not None:
        return video.open_video(data, limits, pick)
    img = _open(data, limits)
    if limits.frames_sampled <= 1 or not getattr(img, "is_animated", False):
        return None, iter([(SampledFrame(0, 0.0), _first_frame(img, data, limits, spec))])
    try:
        count = int(getattr(img, "n_frames", 1))
    except Exception as exc:
        raise _decode_error(exc, data, "cannot count the frames") from None
    if count > limits.max_frames:
        raise TooManyFrames(f"{count} frames exceeds the limit of {limits.max_frames}")
    width, height = img.size
    if count * width * height > limits.max_animation_pixels:
        raise ImageTooLarge(f"{count} frames of {width}x{height} = {count * width * height} pixels exceeds the "
                            f"animation limit of {limits.max_animation_pixels}")  # fmt: skip
    durations = frame_durations(data, str(img.format))
    if durations is None or len(durations) != count:  # the file does not say: evenly spaced
        durations = [BROWSER_DEFAULT_DELAY_MS] * count
    starts = timestamps(durations)
    picked = sample_frames(durations, limits.frames_sampled) if pick is None else sorted({i for i in pick if i < count})
    frames = FrameSet("animation", count, round(sum(durations), 3),
                      tuple(SampledFrame(i, round(starts[i], 3)) for i in picked))  # fmt: skip

    def decoded() -> Frames:
        for frame in frames.sampled:
            try:
                img.seek(frame.index)
                yield frame, _to_rgb(ImageOps.exif_transpose(img))
            except Image.DecompressionBombError as exc:
                raise ImageTooLarge(str(exc)) from None
            except Exception as exc:
                raise _decode_error(exc, data, f"cannot decode frame {frame.index}") from None

    return frames, decoded()


# End-of-image markers: a file that fails to decode and lacks its trailer was cut short.
_TRAILERS = {b"\xff\xd8": b"\xff\xd9", b"\x89PNG": b"IEND\xaeB`\x82", b"GIF8": b";"}


def _decode_error(exc: Exception, data: bytes, what: str) -> ImageError:
    detail = f"{what}: {type(exc).__name__}: {exc}"
    if "truncat" in str(exc).lower():
        return TruncatedImage(detail)
    for magic, trailer in _TRAILERS.items():
        if data.startswith(magic) and not data.rstrip(b"\0").endswith(trailer):
            return TruncatedImage(detail + " (the file ends before its end-of-image marker)")
    return CorruptImage(detail)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB" and img.info.get("transparency") is None:
        return img  # convert("RGB") would return a copy of the same pixels
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        arr = np.asarray(img).astype(np.uint32)
        return Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    rgb = img.convert("RGB")
    if rgb.info.get("transparency") is not None:
        # A palette or RGB image with a transparent colour key: the image processor composites it
        # onto white (its convert_to_rgb), so the transparent colour becomes white.
        white = Image.new("RGBA", rgb.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgb.convert("RGBA")).convert("RGB")
    return rgb


def preprocess(img: Image.Image, spec: PreprocessSpec, exact: bool = True) -> np.ndarray:
    """RGB image to ``uint8 [H, W, 3]`` at the crop size, exactly as the image processor crops.

    ``exact=False`` (the reduced precisions, with draft decoding): when a landscape or square image shrinks,
    only the columns the crop keeps are resampled (Pillow's ``box``: the same filter centres and weights, a
    quarter less work for a 4:3 photo); their sums round differently, by one level on a few pixels
    (measured on 640x480, 320x240, 1280x720: 0.004-0.02% of the pixels). Portrait images are resized
    whole: with a box, Pillow's two passes round otherwise, by several levels.
    """
    width, height = img.size
    tw, th = spec.resize_target(width, height)
    if not exact and spec.crop_hw is not None and tw < width and th < height:
        ch, cw = spec.crop_hw
        top, left = (th - ch) // 2, (tw - cw) // 2
        if top == 0 and left >= 0:  # a landscape or square photo: the crop cuts columns only
            sx, sy = width / tw, height / th
            box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
            return np.asarray(img.resize((cw, ch), resample=spec.resample, box=box))
    if (tw, th) != (width, height):
        img = img.resize((tw, th), resample=spec.resample)
    arr = np.asarray(img)
    if spec.crop_hw is None:
        return np.ascontiguousarray(arr)
    ch, cw = spec.crop_hw
    top, left = (th - ch) // 2, (tw - cw) // 2
    if top >= 0 and left >= 0:
        return np.ascontiguousarray(arr[top : top + ch, left : left + cw])
    # Smaller than the crop: pad with zeros around the center, then crop (the processor's rule).
    nh, nw = max(ch, th), max(cw, tw)
    top_pad, left_pad = math.ceil((nh - th) / 2), math.ceil((nw - tw) / 2)
    canvas = np.zeros((nh, nw, 3), dtype=np.uint8)
    canvas[top_pad : top_pad + th, left_pad : left_pad + tw] = arr
    top, left = top + top_pad, left + left_pad
    return np.ascontiguousarray(canvas[max(0, top) : top + ch, max(0, left) : left + cw])


def load_image(
    data: bytes, limits: ImageLimits, spec: PreprocessSpec, timings: dict[str, float] | None = None
) -> np.ndarray:
    """Bytes to model-ready ``uint8 [H, W, 3]``; raises :class:`ImageError` (and counts it).

    An animation or a video gives its first frame (:func:`load_frames` gives the sampled ones). The
    seconds spent decoding and preprocessing go to ``moderator_stage_seconds`` (stages ``decode`` and
    ``preprocess``) and, when given, into ``timings`` under the same names.
    """
    first: np.ndarray = load_frames(data, replace(limits, frames_sampled=1), spec, timings, with_pdq=False).pixels[0]
    return first


@dataclass(frozen=True)
class Loaded:
    """One input as model input: its frames' pixels, their PDQ hashes, and what was sampled."""

    pixels: np.ndarray  # uint8 [F, H, W, 3]: one row of the batch per frame (a still: F = 1)
    pdqs: tuple[PdqHash | None, ...]  # per frame (None: not hashed, or the hasher failed)
    frames: FrameSet | None  # an animation or a video: the sampled frames; None: a still


def load_frames(
    data: bytes, limits: ImageLimits, spec: PreprocessSpec, timings: dict[str, float] | None = None,
    with_pdq: bool = True,
) -> Loaded:  # fmt: skip
    """Bytes to model input, every sampled frame (a still: its one frame, as :func:`load_image`);
    raises :class:`ImageError` (and counts it). Seconds go to ``moderator_stage_seconds`` (``decode``,
    ``preprocess``, ``pdq``: summed over frames) and into ``timings``: the CPU seconds of the decoding
    thread (``time.thread_time``), what each stage costs whether or not its thread waited for a core
    (at idle priority, beside the model, it mostly waits)."""
    seconds = {"decode": 0.0, "preprocess": 0.0, "pdq": 0.0}
    rows: list[np.ndarray] = []
    pdqs: list[PdqHash | None] = []
    sampled: list[SampledFrame] = []
    try:
        t0 = time.thread_time()
        frames, decoded = open_frames(data, limits, spec)
        for frame, img in decoded:
            sampled.append(frame)
            t1 = time.thread_time()
            seconds["decode"] += t1 - t0
            rows.append(preprocess(img, spec, exact=not limits.jpeg_draft))
            t2 = time.thread_time()
            seconds["preprocess"] += t2 - t1
            pdqs.append(_pdq(img) if with_pdq else None)
            del img  # at most one full-size frame at a time
            t0 = time.thread_time()
            seconds["pdq"] += t0 - t2
    except ImageError as exc:
        IMAGE_ERRORS.labels(reason=exc.reason).inc()
        raise
    if frames is not None and len(sampled) < len(frames.sampled):  # a video's keyframe that did not decode
        frames = FrameSet(frames.kind, frames.count, frames.duration_ms, tuple(sampled))
    if not rows:
        IMAGE_ERRORS.labels(reason="corrupt_image").inc()
        raise CorruptImage("no frame could be decoded")
    for stage, value in seconds.items():
        if with_pdq or stage != "pdq":
            STAGE_SECONDS.labels(stage=stage).observe(value)
    if timings is not None:
        timings.update(seconds)
    pixels = rows[0][None] if len(rows) == 1 else np.stack(rows)  # a still: a view, not a copy
    return Loaded(pixels, tuple(pdqs), frames)


def _pdq(img: Image.Image) -> PdqHash | None:
    try:
        return hash_image(img)
    except Exception as exc:
        log.warning("pdq_failed", error=f"{type(exc).__name__}: {exc}", size=img.size)
        return None


def idle_priority() -> None:
    """The calling thread at idle CPU priority: ``SCHED_IDLE`` (Linux), else the lowest nice value;
    where neither is allowed, it stays as it is. For decode threads that must take only the cores'
    time the model leaves (``MODERATOR_DECODE_SCHEDULE=pipelined``)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: per thread
        except (AttributeError, OSError):
            log.warning("idle_priority_unavailable")


class ImageLoader:
    """Decodes and preprocesses on a thread pool (Pillow releases the GIL while it works); ``idle``: its
    threads at idle CPU priority (:func:`idle_priority`)."""

    def __init__(self, limits: ImageLimits, spec: PreprocessSpec, threads: int = 4, idle: bool = False) -> None:
        self.limits = limits
        self.spec = spec
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode",
                                        initializer=idle_priority if idle else None)  # fmt: skip

    def load_one(self, data: bytes) -> np.ndarray | ImageError:
        try:
            return load_image(data, self.limits, self.spec)
        except ImageError as exc:
            return exc

    def load_frames(self, data: bytes) -> Loaded | ImageError:
        try:
            return load_frames(data, self.limits, self.spec, with_pdq=False)
        except ImageError as exc:
            return exc

    def load_frames_many(self, items: Sequence[bytes]) -> list[Loaded | ImageError]:
        """:meth:`load_many` with every sampled frame of an animation or video (:func:`load_frames`)."""
        return list(self._pool.map(self.load_frames, items))

    def load_many(self, items: Sequence[bytes]) -> list[np.ndarray | ImageError]:
        """One result per input, in order: an array, or the typed error for that input."""
        if len(items) <= 1:
            return [self.load_one(d) for d in items]
        return list(self._pool.map(self.load_one, items))

    def batch(self, items: Sequence[bytes]) -> np.ndarray:
        """``uint8 [B, H, W, 3]`` of inputs known to be good; the first bad one raises its ImageError."""
        out = []
        for result in self.load_many(items):
            if isinstance(result, ImageError):
                raise result
            out.append(result)
        return np.stack(out)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
