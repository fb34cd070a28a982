"""The images reviewers look at, served by the console itself: a reviewer's browser never fetches an
event's URL (the page's Content-Security-Policy allows images from the console only).

- An inline image is read back from Kafka at its event's coordinates (topic, partition, offset).
- A URL image is fetched by the console through the SSRF-safe fetcher, with the worker's limits.

Either way the bytes must be the ones the worker scored: their sha256 is compared with the one the
review item carries, and other bytes (an uploader's server that answers differently now, an id re-used
for another image) are refused (:class:`ImageChanged`), never shown, never hashed into a bank. Then
they are decoded with the worker's limits and re-encoded as a JPEG (EXIF orientation applied, metadata
dropped, at most ``MAX_SIDE`` pixels a side): the browser gets a plain image, never the uploaded bytes,
and until the reviewer reveals it only a small blurred gray rendition (:meth:`ReviewImages.blurred`).
Results are kept in a small in-memory cache by the item's handle (event id and image sha256).

An animation or a video is shown as a contact sheet (:func:`contact_sheet`): the frames its decision
was made on, each labelled with its frame number and time, the frame that drove the decision framed
in red; blurred like any image until revealed.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

from kafka import TopicPartition
from PIL import Image, ImageDraw, ImageFilter

from moderator.app import App
from moderator.errors import ReasonError
from moderator.events import Frames, ReviewItem, parse_event
from moderator.images import ImageLimits, decode, open_frames

MAX_SIDE = 1600
SHEET_TILE = 360  # a contact sheet's frames: at most this many pixels a side
SHEET_COLUMNS = 4
BLUR_SIDE = 96  # the blurred rendition: what the page shows before a reveal
CACHE_BYTES = 128 * 1024 * 1024


class ImageUnavailable(Exception):
    """The image cannot be shown; the message says why (for the page, never a stack trace)."""


class ImageChanged(ImageUnavailable):
    """The bytes at the image's source are not the ones the worker scored."""


class ReviewImages:
    def __init__(self, app: App) -> None:
        self.app = app
        self.limits = ImageLimits.from_settings(app.settings)
        self._reader = app.reader([], max_poll_records=1)
        self._reader_lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()

    def jpeg(self, item: ReviewItem) -> bytes:
        with self._cache_lock:
            cached = self._cache.get(item.handle)
            if cached is not None:
                self._cache.move_to_end(item.handle)
                return cached
        data = self.original(item)
        try:
            if item.frames is not None:
                image = contact_sheet(data, self.limits, item.frames)
            else:
                image = decode(data, self.limits)
        except ReasonError as exc:
            raise ImageUnavailable(f"the image cannot be decoded ({exc.reason})") from None
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        return self._keep(item.handle, out.getvalue())

    def blurred(self, item: ReviewItem) -> bytes:
        """The rendition shown until a reveal: at most ``BLUR_SIDE`` pixels a side, gray and blurred, so
        that opening it in a new tab or saving it shows no more than the page does. Made from
        :meth:`jpeg` (the same checks)."""
        key = item.handle + "#blurred"
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        with Image.open(io.BytesIO(self.jpeg(item))) as full:
            small = full.convert("L")
            small.thumbnail((BLUR_SIDE, BLUR_SIDE), Image.Resampling.BOX)
            small = small.filter(ImageFilter.GaussianBlur(max(1.5, max(small.size) / 24)))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=70)
        return self._keep(key, out.getvalue())

    def _keep(self, key: str, jpeg: bytes) -> bytes:
        with self._cache_lock:
            self._cache[key] = jpeg
            self._cache_bytes += len(jpeg)
            while self._cache_bytes > CACHE_BYTES and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)
        return jpeg

    def original(self, item: ReviewItem) -> bytes:
        """The image's bytes as the worker scored them (read back from Kafka, or fetched through the
        SSRF-safe fetcher); :class:`ImageChanged` when the source now gives other bytes."""
        data = self._read(item)
        if item.image.sha256 and hashlib.sha256(data).hexdigest() != item.image.sha256:
            raise ImageChanged("The image has changed since it was scored: its bytes are not the ones the model "
                               f"judged (sha256 {item.image.sha256[:16]}...), so it is not shown")  # fmt: skip
        return data

    def _read(self, item: ReviewItem) -> bytes:
        if item.image.url is not None:
            try:
                return self.app.fetcher.fetch(item.image.url)
            except ReasonError as exc:
                raise ImageUnavailable(f"the image URL cannot be fetched ({exc.reason})") from None
        source = item.image.inline_source
        if source is None:
            raise ImageUnavailable("the review item names no image")
        tp = TopicPartition(source.topic, source.partition)
        with self._reader_lock:  # one reader, positioned for each read
            self._reader.assign([tp])
            self._reader.seek(tp, source.offset)
            records = self._reader.poll(timeout_ms=5000, max_records=1).get(tp, [])
        if not records or records[0].offset != source.offset:
            raise ImageUnavailable(f"the event is no longer in {source.topic} (retention): offset {source.offset}")
        raw = self.app.settings.input_format == "raw"
        try:
            parsed = parse_event(records[0].key, records[0].value, raw, self.app.settings.image_max_bytes)
        except ReasonError as exc:
            raise ImageUnavailable(f"the event cannot be read back ({exc.reason})") from None
        if parsed.data is None and parsed.url is not None:  # an appeal of a URL event: its URL, fetched
            try:
                return self.app.fetcher.fetch(parsed.url)
            except ReasonError as exc:
                raise ImageUnavailable(f"the image URL cannot be fetched ({exc.reason})") from None
        if parsed.data is None:
            raise ImageUnavailable("the event at those coordinates carries no image")
        return parsed.data

    def close(self) -> None:
        self._reader.close(autocommit=False)


def contact_sheet(data: bytes, limits: ImageLimits, frames: Frames) -> Image.Image:
    """The frames a decision was made on, in a grid: each labelled with its frame number and time, the
    one that drove the decision framed in red (typed :class:`ReasonError` when they cannot be decoded)."""
    _, decoded = open_frames(data, limits, pick=[f.index for f in frames.sampled])
    tiles: list[tuple[int, float, Image.Image]] = []
    for sampled, image in decoded:
        image.thumbnail((SHEET_TILE, SHEET_TILE), Image.Resampling.LANCZOS)
        tiles.append((sampled.index, sampled.timestamp_ms, image))
    if not tiles:
        raise ImageUnavailable("none of the decision's frames could be decoded")
    label_h, pad = 22, 6
    columns = min(SHEET_COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_w = max(t[2].width for t in tiles) + 2 * pad
    cell_h = max(t[2].height for t in tiles) + 2 * pad + label_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for k, (index, at_ms, image) in enumerate(tiles):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        sheet.paste(image, (x + pad, y + pad))
        if index == frames.frame:
            draw.rectangle((x + 2, y + 2, x + pad + image.width + 3, y + pad + image.height + 3), outline=(220, 30, 30),
                           width=4)  # fmt: skip
        text = f"frame {index} · {at_ms / 1000:.2f} s" + ("  (decided)" if index == frames.frame else "")
        draw.text((x + pad, y + pad + image.height + 5), text, fill=(235, 235, 235))
    return sheet
