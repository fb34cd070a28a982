"""The worker's two stages after the consumer: images (fetch, decode) and batches (model, policy).

- :class:`ImageStage`, on a thread pool: fetch a URL image through the SSRF-safe fetcher (or take
  the inline bytes); then, unless decoding waits for the batch, decode with limits, PDQ-hash the
  decoded image and resize/crop to uint8; hand the event to the batch stage.
- :class:`BatchStage`, one thread: the micro-batcher (size or oldest-waited deadline); on the CPU,
  the batch's decoding from when it is taken, beside the batch before it in the model, at idle priority
  (:func:`decode_schedule`); the image tower;
  one policy snapshot and one bank index per batch, searched once for the whole batch; the
  decisions, handed to the worker's sink to publish.

Bad data never escapes a stage: every failure becomes the event's dead letter through the sink.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import numpy as np
import torch

from moderator import observability as obs
from moderator.banks.index import Hit
from moderator.banks.store import Banks
from moderator.batcher import MicroBatcher
from moderator.config import Settings
from moderator.errors import ReasonError
from moderator.events import CategoryExplanation, Decision, Timings, utc_now
from moderator.fetch import Fetcher
from moderator.images import ImageLimits, idle_priority, load_frames
from moderator.policy import CompiledPolicy, PolicyRegistry, PolicySet, explanations
from moderator.policy.scoring import driving_row
from moderator.worker.event import NO_REVIEW, Decided, Event, ImageEngine, ReviewDraw, ms
from moderator.worker.outputs import review_draw

log = obs.get_logger(__name__)


class Sink(Protocol):
    """Where the stages send what they produce (the worker, which publishes)."""

    def decided(self, result: Decided) -> None: ...

    def failed(self, e: Event, reason: str, message: str) -> None: ...


Schedule = Literal["overlap", "before_forward", "pipelined"]


def decode_schedule(setting: str, device: torch.device) -> Schedule:
    """When images are decoded (``MODERATOR_DECODE_SCHEDULE``):

    - ``overlap``: as they arrive, ahead of the model, beside it (an accelerator's: decoding on the CPU
      overlaps the device's work);
    - ``before_forward``: when their batch runs, on every core, then the model on every core;
    - ``pipelined``: a full batch's decoding starts when it is taken from the batcher, while the batch
      before it runs in the model, on decode threads at idle CPU priority (``SCHED_IDLE``), which take
      only what the model leaves (its threads waiting, a stream done before the other); what has not
      started when the batch runs is decoded then, at normal priority. Decoding beside the model at
      normal priority preempts its threads mid-product and costs it more than the decoding takes. Only
      beside a tower that runs a batch in one native call (see :meth:`BatchStage.begin`); beside the
      others it is ``before_forward``.

    ``auto``: pipelined on the CPU, overlap on an accelerator.
    """
    if setting == "auto":
        return "pipelined" if device.type == "cpu" else "overlap"
    if setting not in ("overlap", "before_forward", "pipelined"):
        raise ValueError(f"unknown decode schedule {setting!r}")
    return cast(Schedule, setting)


@dataclass
class _Batch:
    """A batch taken from the batcher, until it runs."""

    events: list[Event]
    waited: list[float]  # seconds each event waited in the batcher
    decoding: list[Future[bool]] | None  # pipelined: its decodes under way (True: decoded)


def _unexpected(sink: Sink, e: Event, exc: Exception) -> None:
    """A bug, not the data: log it with its traceback, and still never lose the event."""
    log.exception("image_stage_error", event_id=e.parsed.id if e.parsed else None)
    sink.failed(e, "internal_error", f"{type(exc).__name__}: {exc}")


def _rows(e: Event) -> int:
    """The batch rows an event takes: its frames once decoded (an undecoded one counts as one)."""
    return 1 if e.pixels is None else len(e.pixels)


def _pixels(e: Event) -> np.ndarray:
    if e.pixels is None:
        raise RuntimeError(f"event {e.parsed.id if e.parsed else e.offset} reached the model undecoded")
    return e.pixels


class ImageStage:
    def __init__(
        self,
        sink: Sink,
        fetcher: Fetcher,
        limits: ImageLimits,
        engine: ImageEngine,
        *,
        fetch_threads: int,
        decode_threads: int,
        decode_with_batch: bool,
        hash_pdq: bool,
    ) -> None:
        self.sink = sink
        self.fetcher = fetcher
        self.limits = limits
        self.engine = engine
        self.decode_with_batch = decode_with_batch
        self.hash_pdq = hash_pdq
        self.ready: queue.Queue[Event | None] = queue.Queue()  # to the batch stage; None closes it
        self._pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="image")
        self._decode_slots = threading.BoundedSemaphore(decode_threads)

    def submit(self, e: Event) -> None:
        self._pool.submit(self._run, e)

    def _run(self, e: Event) -> None:
        """Fetch (URL events) and, unless decoding waits for the batch, decode; then hand over."""
        assert e.parsed is not None
        started = time.monotonic()
        e.timings["queued_ms"] = ms(started - e.received)
        try:
            e.data = e.parsed.data
            if e.data is None:
                e.data = self.fetcher.fetch(e.parsed.url or "")
                fetch_s = time.monotonic() - started
                e.timings["fetch_ms"] = ms(fetch_s)
                obs.STAGE_SECONDS.labels(stage="fetch").observe(fetch_s)
        except ReasonError as exc:
            self.sink.failed(e, exc.reason, str(exc))
            return
        except Exception as exc:
            _unexpected(self.sink, e, exc)
            return
        if self.decode_with_batch or self.decode(e):
            self.ready.put(e)

    def decode(self, e: Event) -> bool:
        """Decode and preprocess the event's image; on bad data, dead-letter it and return False."""
        assert e.data is not None
        data = e.data
        try:
            seconds: dict[str, float] = {}
            with self._decode_slots:  # fetches wait on the network; decodes compete with the model for cores
                loaded = load_frames(data, self.limits, self.engine.spec, seconds, self.hash_pdq)
            e.pixels, e.pdqs, e.frames = loaded.pixels, loaded.pdqs, loaded.frames
            e.timings["decode_ms"] = ms(seconds["decode"])
            e.timings["preprocess_ms"] = ms(seconds["preprocess"])
            e.timings["pdq_ms"] = ms(seconds["pdq"])
            e.image_bytes = len(data)
            e.image_sha256 = hashlib.sha256(data).hexdigest()
            e.data = None
        except ReasonError as exc:
            self.sink.failed(e, exc.reason, str(exc))
            return False
        except Exception as exc:
            _unexpected(self.sink, e, exc)
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class BatchStage:
    def __init__(
        self,
        sink: Sink,
        images: ImageStage,
        engine: ImageEngine,
        registry: PolicyRegistry,
        banks: Banks,
        *,
        max_batch_size: int,
        max_delay_s: float,
        decode_threads: int,
        embeddings_dtype: str | None,
        review_include_flagged: bool,
        video_bank_min_frames: int = 1,
        pipelined: bool = False,
    ) -> None:
        self.sink = sink
        self.video_bank_min_frames = video_bank_min_frames
        # The embeddings log: the batch's embeddings as stored (None: off).
        self.review_include_flagged = review_include_flagged
        self.stored_dtype = {"float16": torch.float16, "float32": torch.float32, None: None}[embeddings_dtype]
        self.images = images
        self.engine = engine
        self.registry = registry
        self.banks = banks
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        # Set: each batch is decoded when it runs (before_forward), on every core; pipelined, from when it is
        # taken, on the idle-priority threads of _ahead, and what has not started when it runs on _decoder.
        self._decoder: ThreadPoolExecutor | None = None
        self._ahead: ThreadPoolExecutor | None = None
        if images.decode_with_batch:
            self._decoder = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        if images.decode_with_batch and pipelined:
            self._ahead = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode-ahead",
                                             initializer=idle_priority)  # fmt: skip
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float) -> None:
        """Close the queue: what is in it is still batched and published; then join the thread."""
        self.images.ready.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout=timeout)
        for pool in (self._decoder, self._ahead):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        ready = self.images.ready
        batcher: MicroBatcher[Event] = MicroBatcher(self.max_batch_size, self.max_delay_s)
        closing = False
        pending: _Batch | None = None  # taken, its decoding under way (pipelined), not yet run
        while True:
            deadline = batcher.deadline()
            timeout = 0.1 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = ready.get(timeout=0.0 if pending is not None else timeout)
                if item is None:
                    closing = True
                else:
                    batcher.add(item, time.monotonic(), item.reply.due if item.reply else None, _rows(item))
                while True:  # take whatever else is already waiting: a request's event behind a backlog of
                    item = ready.get_nowait()  # the stream's goes to the urgent lane now, not batches later
                    if item is None:
                        closing = True
                        break
                    batcher.add(item, time.monotonic(), item.reply.due if item.reply else None, _rows(item))
            except queue.Empty:
                pass
            now = time.monotonic()
            if batcher.ready(now) or (closing and len(batcher)):
                taken = batcher.take(now, force=closing)
                batch = self.begin([p.item for p in taken], [now - p.since for p in taken])
                if pending is not None:  # the batch before it runs in the model while this one decodes
                    self.run_guarded(pending)
                pending = batch
                continue  # the next batch, if one is ready, starts decoding before this one runs
            if pending is not None:
                self.run_guarded(pending)
                pending = None
            if closing and not len(batcher) and ready.empty():
                return

    def begin(self, events: list[Event], waited: list[float]) -> _Batch:
        """A batch taken from the batcher. Pipelined and full (a backlog), its decoding starts now, on threads
        at idle CPU priority: beside the model they take only what it leaves. A batch that is not full (the
        stream keeps up) is decoded when it runs, at normal priority: nothing waits behind it, and at idle
        priority it would wait for every other thread of the machine (measured: p99 latency at 50% load
        several times higher). Nor beside a tower that dispatches its operators from Python (fp32, bf16):
        a decode thread holding the GIL while it waits for a core would stall each dispatch (measured:
        the fp32 forward ~1.7x slower); only beside one native call (the int8 tower, ImageTower.one_call)."""
        decoding = None
        full = sum(map(_rows, events)) >= self.max_batch_size
        if self._ahead is not None and full and self.engine.tower.one_call:
            decoding = [self._ahead.submit(self.images.decode, e) for e in events]
        return _Batch(events, waited, decoding)

    def run_guarded(self, batch: _Batch) -> None:
        """:meth:`run`, never losing a batch: one that fails is dead-lettered and the loop goes on."""
        try:
            self.run(batch)
        except Exception as exc:
            log.exception("batch_failed", size=len(batch.events))
            for e in batch.events:
                self.sink.failed(e, "internal_error", f"{type(exc).__name__}: {exc}")

    def run(self, batch: _Batch) -> None:
        """Decode the batch (or wait for what is left of its pipelined decoding), then the model, the
        policies, the banks; hand every decision to the sink."""
        events, waited = batch.events, batch.waited
        if self._decoder is not None:  # every core decodes (what is left of) the batch, then the model runs
            ahead: list[Future[bool]] | list[None] = batch.decoding or [None] * len(events)
            # A decode that has not started yet moves from the idle threads to the normal ones.
            moved = [f if f is not None and not f.cancel() else self._decoder.submit(self.images.decode, e)
                     for f, e in zip(ahead, events, strict=True)]  # fmt: skip
            good = [f.result() for f in moved]
            events = [e for e, ok in zip(events, good, strict=True) if ok]
            waited = [w for w, ok in zip(waited, good, strict=True) if ok]
        events, waited = self.drop_expired(events, waited)
        if not events:
            return
        snapshot = self.registry.current  # the whole batch is decided with this policy set
        tower = self.engine.tower  # and embedded by this tower, whose precision its decisions record
        t0 = time.perf_counter()
        # Every frame of an animation or video is a row of the batch, its input's rows one after another.
        embeds = self.engine.encode_images(np.concatenate([_pixels(e) for e in events]), tower)
        model_s = time.perf_counter() - t0  # transfer + forward (each observed by the engine)
        obs.BATCH_SIZE.observe(len(embeds))
        t1 = time.perf_counter()
        counts = [len(_pixels(e)) for e in events]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        multi = any(n > 1 for n in counts)
        hits = self.bank_hits(snapshot, events, embeds)
        groups: dict[str | None, list[int]] = {}
        for i, e in enumerate(events):
            groups.setdefault(e.parsed.policy if e.parsed else None, []).append(i)
        decisions: list[Decision | None] = [None] * len(events)
        shadows: list[list[Decision]] = [[] for _ in events]
        draws: list[ReviewDraw] = [NO_REVIEW] * len(events)
        explained: list[tuple[CategoryExplanation, ...]] = [() for _ in events]
        driving = list(starts)  # per event, the row of the frame that drove its decision

        def decide(policy: CompiledPolicy, rows: list[int]) -> list[Decision]:
            if not multi:
                group_hits = None if hits is None else [hits[i] for i in rows]
                return policy.decisions(embeds[rows], group_hits, tower.precision)
            frame_rows = [r for i in rows for r in range(starts[i], starts[i] + counts[i])]
            group_hits = None if hits is None else [hits[r] for r in frame_rows]
            return policy.decisions_over_frames(embeds[frame_rows], [events[i].frames for i in rows], group_hits,
                                                tower.precision, self.video_bank_min_frames)  # fmt: skip

        for name, rows in groups.items():
            try:
                policy = snapshot.get(name)
            except ReasonError as exc:  # e.g. the policy was removed since the event arrived
                for i in rows:
                    self.sink.failed(events[i], exc.reason, str(exc))
                continue
            for i, d in zip(rows, decide(policy, rows), strict=True):
                decisions[i] = d
                driving[i] = starts[i] + driving_row(d)
                parsed = events[i].parsed
                if parsed is not None:
                    draws[i] = review_draw(parsed.id, d.decision, policy.spec, self.review_include_flagged)
            for shadow in snapshot.shadows.get(policy.spec.name, ()):  # one more product per shadow
                for i, d in zip(rows, decide(shadow, rows), strict=True):
                    shadows[i].append(d)
            # The review feed's items carry why they scored as they did (one product for all of them;
            # an animation's: its driving frame's).
            feed = [i for i in rows if draws[i].goes]
            if feed:
                for i, explanation in zip(feed, explanations(policy, embeds[[driving[i] for i in feed]]), strict=True):
                    explained[i] = tuple(explanation)
        stored = None if self.stored_dtype is None else embeds.to(self.stored_dtype).cpu().numpy()
        score_s = time.perf_counter() - t1  # observed per policy group by CompiledPolicy.decisions
        t2 = time.perf_counter()
        log.info("batch_done", size=len(events), model_ms=ms(model_s), score_ms=ms(score_s),
                 oldest_wait_ms=ms(max(waited)))  # fmt: skip
        now = time.monotonic()
        decided_at = utc_now()
        wall_ms = time.time() * 1000
        for i, (e, decision, w) in enumerate(zip(events, decisions, waited, strict=True)):
            if decision is None:
                continue
            e.pixels = None
            e2e = wall_ms - e.timestamp_ms if e.timestamp_ms is not None else None
            timings = Timings(
                queued_ms=e.timings.get("queued_ms", 0.0), fetch_ms=e.timings.get("fetch_ms", 0.0),
                decode_ms=e.timings.get("decode_ms", 0.0), preprocess_ms=e.timings.get("preprocess_ms", 0.0),
                pdq_ms=e.timings.get("pdq_ms", 0.0),
                batch_wait_ms=ms(w), model_ms=ms(model_s), score_ms=ms(score_s), total_ms=ms(now - e.received),
                end_to_end_ms=round(e2e, 3) if e2e is not None else None,
            )  # fmt: skip
            row = driving[i]
            embedding = None if stored is None else stored[row]
            frame_embeddings = None
            if stored is not None and e.frames is not None:
                frame_embeddings = stored[starts[i] : starts[i] + counts[i]]
            pdq = e.pdqs[row - starts[i]] if e.pdqs else None
            self.sink.decided(Decided(e, decision, timings, decided_at, embedding, tuple(shadows[i]), draws[i],
                                      explained[i], pdq, frame_embeddings))  # fmt: skip
            obs.DECISIONS.labels(outcome=decision.decision).inc()
            matches = {(t.match.bank, t.match.entry, t.match.negative) for t in decision.triggered if t.match}
            for bank, _, negative in matches:  # once per match (a negative one names several categories)
                obs.BANK_MATCHES.labels(bank=bank, kind="negative" if negative else "positive").inc()
            obs.EVENT_LATENCY.observe(now - e.received)
            if e2e is not None:
                obs.END_TO_END.observe(max(0.0, e2e / 1000))
        obs.STAGE_SECONDS.labels(stage="publish").observe(time.perf_counter() - t2)

    def drop_expired(self, events: list[Event], waited: list[float]) -> tuple[list[Event], list[float]]:
        """Synchronous requests whose requester stopped waiting are not decided (it was answered 503)."""
        now = time.monotonic()
        if not any(e.reply is not None and now >= e.reply.deadline for e in events):
            return events, waited
        keep = [e.reply is None or now < e.reply.deadline for e in events]
        for e, ok in zip(events, keep, strict=True):
            if not ok:
                self.sink.failed(e, "timeout", "the request's deadline passed before its batch ran")
        return [e for e, k in zip(events, keep, strict=True) if k], [w for w, k in zip(waited, keep, strict=True) if k]

    def bank_hits(self, snapshot: PolicySet, events: list[Event], embeds: torch.Tensor) -> list[list[Hit]] | None:
        """Each row's bank hits (a frame of an animation is a row), one search for the batch at the
        widest thresholds of the policies that serve now (each policy's rules then keep the hits within
        their own); None: no bank rule."""
        index = self.banks.current
        if not len(index):
            return None
        specs = [p.spec for p in snapshot.policies.values()] + [p.spec for s in snapshot.shadows.values() for p in s]
        distances = [d for s in specs if (d := s.max_pdq_distance) is not None]
        cosines = [c for s in specs if (c := s.min_cosine) is not None]
        if not distances and not cosines:
            return None
        t0 = time.perf_counter()
        # One hash per row: every frame of an animation or video has its own.
        hashes = [h for e in events for h in (e.pdqs or (None,) * len(_pixels(e)))]
        hits = index.search(hashes, embeds, max(distances, default=None), min(cosines, default=None))
        obs.STAGE_SECONDS.labels(stage="banks").observe(time.perf_counter() - t0)
        return hits


def build_stages(
    sink: Sink, settings: Settings, engine: ImageEngine, registry: PolicyRegistry, banks: Banks, fetcher: Fetcher
) -> tuple[ImageStage, BatchStage]:
    """The image and batch stages as the settings say (the stream worker's; ``moderator serve``'s alone)."""
    schedule = decode_schedule(settings.decode_schedule, engine.device)
    images = ImageStage(
        sink, fetcher, ImageLimits.from_settings(settings, engine.tower.precision), engine,
        fetch_threads=settings.fetch_threads, decode_threads=settings.decode_threads,
        decode_with_batch=schedule != "overlap",
        hash_pdq=settings.pdq_enabled,
    )  # fmt: skip
    batches = BatchStage(
        sink, images, engine, registry, banks, max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_delay_ms / 1000, decode_threads=settings.decode_threads,
        embeddings_dtype=settings.embeddings_dtype if settings.embeddings_enabled else None,
        review_include_flagged=settings.review_include_flagged,
        video_bank_min_frames=settings.video_bank_min_frames, pipelined=schedule == "pipelined",
    )  # fmt: skip
    return images, batches
