"""Animated images and videos as sampled frames, pure: which frames, and how their scores combine.

An animation (GIF, animated WebP, APNG) or a video is decided on up to ``K`` sampled frames (the
setting ``MODERATOR_FRAMES_SAMPLED``): the first, the last, and frames evenly spaced by *display
time* in between (:func:`sample_frames`), so that a long-held frame weighs as long as it shows and a
benign first frame hides nothing. Every sampled frame is an item of the batch (one row of the image
tower), and:

- a category's score is the **maximum over the sampled frames** (:func:`frame_maxima`), so a violating
  frame anywhere makes the image score as that frame; the decision names the frame that drove it;
- a bank entry matches an animation when **any** sampled frame matches it, and a video when at least
  ``MODERATOR_VIDEO_BANK_MIN_FRAMES`` of its sampled keyframes do (vPDQ's rule, for bank entries
  that are single images: a share of the query's frames must match) (:func:`merge_hits`).

Display times come from the file itself (:func:`frame_durations`: GIF graphic-control delays, WebP
``ANMF`` durations, APNG ``fcTL`` delays), read without decoding pixels. A GIF delay below 20 ms
shows for 100 ms in browsers, and is counted so.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moderator.banks.index import Hit

BROWSER_MIN_GIF_DELAY_MS = 20.0  # browsers show shorter GIF delays (0 or 10 ms) for 100 ms
BROWSER_DEFAULT_DELAY_MS = 100.0


@dataclass(frozen=True)
class SampledFrame:
    index: int  # 0-based frame number in the file (video: in display order)
    timestamp_ms: float  # when it starts to show


@dataclass(frozen=True)
class FrameSet:
    """What was sampled of one multi-frame input."""

    kind: Literal["animation", "video"]
    count: int  # frames in the file (video: keyframes, the frames sampled from)
    duration_ms: float
    sampled: tuple[SampledFrame, ...]


def sample_frames(durations_ms: Sequence[float], k: int) -> list[int]:
    """Indices of at most ``k`` frames: the first, the last, and evenly spaced display times between
    (the frame showing at each time), in order, without repeats. Every frame when there are at most k."""
    n = len(durations_ms)
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [0]
    starts = timestamps(durations_ms)
    total = starts[-1] + float(durations_ms[-1])
    picked = {0, n - 1}
    for j in range(1, k - 1):
        t = total * j / (k - 1)
        picked.add(min(n - 1, max(0, bisect.bisect_right(starts, t) - 1)))
    if len(picked) < k:  # a long-held frame took several targets: fill by frame order, evenly
        for i in np.linspace(0, n - 1, num=k).round().astype(int).tolist():
            if len(picked) >= k:
                break
            picked.add(int(i))
    return sorted(picked)


def timestamps(durations_ms: Sequence[float]) -> list[float]:
    """When each frame starts to show (ms)."""
    return [float(t) for t in np.concatenate([[0.0], np.cumsum(np.asarray(durations_ms, dtype=np.float64))[:-1]])]


# ==================================================================================================
# Display times, read from the container without decoding pixels


def frame_durations(data: bytes, fmt: str) -> list[float] | None:
    """Each frame's display time in ms (GIF, WEBP, PNG), or None when the file does not say (or is
    cut short where the durations are): the caller then spaces frames evenly."""
    try:
        if fmt == "GIF":
            return _gif_durations(data)
        if fmt == "WEBP":
            return _webp_durations(data)
        if fmt == "PNG":
            return _apng_durations(data)
    except (IndexError, struct.error, ValueError):
        return None
    return None


def _gif_durations(data: bytes) -> list[float] | None:
    if not data.startswith((b"GIF87a", b"GIF89a")):
        return None
    pos = 13
    packed = data[10]
    if packed & 0x80:
        pos += 3 * (1 << ((packed & 7) + 1))
    delay: float | None = None
    out: list[float] = []
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            label = data[pos + 1]
            pos += 2
            if label == 0xF9 and data[pos] >= 4:
                delay = struct.unpack_from("<H", data, pos + 2)[0] * 10.0
            pos = _skip_sub_blocks(data, pos)
        elif block == 0x2C:  # an image: one frame
            packed = data[pos + 9]
            pos += 10
            if packed & 0x80:
                pos += 3 * (1 << ((packed & 7) + 1))
            pos = _skip_sub_blocks(data, pos + 1)  # the LZW code size, then the data
            shown = delay if delay is not None else 0.0
            out.append(BROWSER_DEFAULT_DELAY_MS if shown < BROWSER_MIN_GIF_DELAY_MS else shown)
            delay = None
        else:
            return None
    return out or None


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while True:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos
        if pos > len(data):
            raise IndexError("sub-block runs past the end")


def _webp_durations(data: bytes) -> list[float] | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    pos, out = 12, []
    while pos + 8 <= len(data):
        fourcc, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if fourcc == b"ANMF":
            duration = int.from_bytes(data[pos + 8 + 12 : pos + 8 + 15], "little")
            out.append(float(duration) if duration > 0 else BROWSER_DEFAULT_DELAY_MS)
        pos += 8 + size + (size & 1)
    return out or None


def _apng_durations(data: bytes) -> list[float] | None:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos, out = 8, []
    default_in_animation = False
    seen_idat = False
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"fcTL":
            num, den = struct.unpack_from(">HH", data, pos + 8 + 20)
            out.append(1000.0 * num / (den or 100))
            default_in_animation = default_in_animation or not seen_idat
        elif kind == b"IDAT":
            seen_idat = True
        elif kind == b"IEND":
            break
        pos += 12 + size
    if not out:
        return None
    # Pillow shows the default image as frame 0 even when it is not part of the animation.
    return out if default_in_animation else [BROWSER_DEFAULT_DELAY_MS, *out]


# ==================================================================================================
# Scores and bank hits over frames


def frame_maxima(scores: np.ndarray, counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per input, each category's maximum over its frames' rows, and the row (within the input) that
    holds it. ``scores`` ``[R, C]`` holds the inputs' rows one after another, ``counts[i]`` of them each."""
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    maxima = np.maximum.reduceat(scores, offsets, axis=0)
    which = np.zeros(maxima.shape, dtype=np.int64)
    for i, (start, n) in enumerate(zip(offsets.tolist(), counts, strict=True)):
        if n > 1:
            which[i] = scores[start : start + n].argmax(axis=0)
    return maxima, which


def merge_hits(per_frame: Sequence[Sequence[Hit]], min_frames: int = 1) -> tuple[list[Hit], dict[tuple[str, str], int]]:
    """One input's bank hits from its frames' hits: per entry, the closest hit of the frames that
    match it, kept when at least ``min_frames`` frames match; and, per (bank, entry id), the frame
    (position among the sampled) of that closest hit."""
    best: dict[tuple[str, str], tuple[Hit, int]] = {}
    frames: dict[tuple[str, str], int] = {}
    for position, hits in enumerate(per_frame):
        for hit in hits:
            key = (hit.entry.bank, hit.entry.id)
            frames[key] = frames.get(key, 0) + 1
            known = best.get(key)
            if known is None or _closer(hit, known[0]):
                best[key] = (hit, position)
    kept = {key: value for key, value in best.items() if frames[key] >= min_frames}
    return [hit for hit, _ in kept.values()], {key: position for key, (_, position) in kept.items()}


def _closer(a: Hit, b: Hit) -> bool:
    def rank(h: Hit) -> tuple[int, float]:
        return (h.pdq_distance if h.pdq_distance is not None else 999, -(h.cosine or 0.0))

    return rank(a) < rank(b)
