"""Short videos (MP4, WebM) as sampled keyframes, decoded by PyAV (its wheel carries FFmpeg).

Opt-in: a video is decided only where ``MODERATOR_IMAGE_FORMATS`` names ``MP4`` and/or ``WEBM`` (and
the ``video`` extra is installed); elsewhere it is refused as ``unsupported_format``. Limits, checked
before any frame decodes: the bytes (the image limit), the frame size (``image_max_pixels``), the
duration (``video_max_seconds``, from the container and from the packets' timestamps) and the number
of keyframes (``frames_max``). Keyframes only: the container is demuxed once to list them (no
decoding), :func:`moderator.frames.sample_frames` picks up to ``frames_sampled`` by display time, and
a second pass decodes only keyframes (``skip_frame = NONKEY``) and keeps the picked ones.

Typed reasons: ``corrupt_video`` (no video stream, undecodable), ``video_too_long``,
``too_many_frames``, ``image_too_large``, ``unsupported_format``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from moderator.frames import FrameSet, SampledFrame, sample_frames
from moderator.images import CorruptImage, ImageLimits, ImageTooLarge, TooManyFrames, UnsupportedFormat


class CorruptVideo(CorruptImage):
    reason = "corrupt_video"


class VideoTooLong(TooManyFrames):
    reason = "video_too_long"


def sniff(data: bytes) -> str | None:
    """MP4 (an ISO base media file: ``ftyp`` box first) or WEBM (an EBML header), else None."""
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "MP4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "WEBM"
    return None


def open_video(
    data: bytes, limits: ImageLimits, pick: Sequence[int] | None = None
) -> tuple[FrameSet, Iterator[tuple[SampledFrame, Image.Image]]]:
    """What will be sampled, and the sampled keyframes decoded (``pick``: the keyframes of these frame
    numbers instead of a sample)."""
    fmt = sniff(data)
    if fmt not in limits.formats:
        raise UnsupportedFormat(f"format {fmt} (video) is not allowed (allowed: {', '.join(limits.formats)})")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        import av
    except ImportError:
        raise UnsupportedFormat("videos need the `video` extra (PyAV): pip install 'moderator[video]'") from None

    def opened() -> Any:
        try:
            return av.open(io.BytesIO(data), mode="r")
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise CorruptVideo(f"cannot open the video: {exc}") from None

    container = opened()
    try:
        streams = container.streams.video
        if not streams:
            raise CorruptVideo("the file has no video stream")
        stream = streams[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width < 1 or height < 1:
            raise CorruptVideo(f"invalid dimensions {width}x{height}")
        if width * height > limits.max_pixels:
            raise ImageTooLarge(f"{width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}")
        if container.duration is not None and container.duration / av.time_base > limits.video_max_seconds:
            raise VideoTooLong(f"{container.duration / av.time_base:.1f} s exceeds the limit of "
                               f"{limits.video_max_seconds:g} s")  # fmt: skip
        time_base = float(stream.time_base or 0) or 1 / 90_000
        keyframes: list[int] = []  # pts of every keyframe, by demuxing (no decoding)
        end = 0.0
        try:
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                end = max(end, float(packet.pts + (packet.duration or 0)) * time_base)
                if end > limits.video_max_seconds:
                    raise VideoTooLong(f"longer than the limit of {limits.video_max_seconds:g} s")
                if packet.is_keyframe:
                    keyframes.append(int(packet.pts))
                    if len(keyframes) > limits.max_frames:
                        raise TooManyFrames(f"more than {limits.max_frames} keyframes")
        except av.FFmpegError as exc:
            raise CorruptVideo(f"cannot read the video: {exc}") from None
        rate = float(stream.average_rate or 0)
    finally:
        container.close()
    keyframes = sorted(set(keyframes))
    if not keyframes:
        raise CorruptVideo("the video has no keyframe")
    starts = [(p - keyframes[0]) * time_base * 1000.0 for p in keyframes]
    duration_ms = max(end * 1000.0 - keyframes[0] * time_base * 1000.0, starts[-1])
    shows = [b - a for a, b in zip(starts, [*starts[1:], duration_ms], strict=True)]
    numbers = [round(start * rate / 1000.0) if rate else i for i, start in enumerate(starts)]
    if pick is None:
        picked = sample_frames(shows, limits.frames_sampled)
    else:
        wanted_numbers = set(pick)
        picked = [i for i, n in enumerate(numbers) if n in wanted_numbers]
    wanted = {keyframes[i]: SampledFrame(numbers[i], round(starts[i], 3)) for i in picked}
    frames = FrameSet("video", len(keyframes), round(duration_ms, 3), tuple(wanted[keyframes[i]] for i in picked))

    def decoded() -> Iterator[tuple[SampledFrame, Image.Image]]:
        container = opened()
        try:
            stream = container.streams.video[0]
            stream.codec_context.skip_frame = "NONKEY"
            left = dict(wanted)
            for frame in container.decode(stream):
                sampled = left.pop(int(frame.pts), None) if frame.pts is not None else None
                if sampled is not None:
                    yield sampled, frame.to_image().convert("RGB")
                if not left:
                    break
        except av.FFmpegError as exc:
            raise CorruptVideo(f"cannot decode the video: {exc}") from None
        finally:
            container.close()

    return frames, decoded()
