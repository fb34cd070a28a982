"""``moderator bench``: the reference pipeline, the engine, the whole worker and the ceiling, side by side.

One process, one machine, the same weights and the same images for every contender:

- **reference**: ``transformers.pipeline("zero-shot-image-classification")`` called once per image
  with the policy's prompts as candidate labels: what a team would write without moderator;
- **engine**: JPEG bytes decoded on a thread pool on the worker's schedule (on the CPU each batch
  just before its forward, on a GPU one batch ahead), the batched image tower, the compiled policy
  (text embeddings computed once, cached);
- **worker**: :class:`moderator.pipeline.Worker` end to end: events produced to the real Kafka,
  decisions consumed from it, Redis as the text cache (``feed="kafka"``); or, on a machine without
  a broker, the same worker fed from an in-process queue (``feed="queue"``, :class:`QueueFeed`);
- **ceiling**: the bare image tower at the same batch size and precision on pre-made device
  tensors: the most any pipeline could reach on this hardware with this model.

Per contender: images/s; for the engine and the worker, a per-stage breakdown read from
``moderator_stage_seconds`` (the metric production workers export); for the worker, produce-to-
decision latency at fixed offered loads. Sweeps: throughput vs batch size, vs number of prompts,
and latency vs offered load. The result is a table on stdout and a JSON document with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from moderator import observability as obs
from moderator.clip import (
    PIPELINE_TEMPLATE,
    SUPPORTED_CHECKPOINTS,
    ClipEngine,
    checkpoint_available,
    synchronize,
    zero_shot_probs,
)
from moderator.config import Settings, load_settings
from moderator.embedding_cache import TextEncoder, cache_from_settings
from moderator.images import ImageError, ImageLimits, ImageLoader
from moderator.pipeline import decode_before_forward
from moderator.policy import CompiledPolicy, PolicyRegistry, PolicySpec, compile_policy
from moderator.stack import (
    LocalStack,
    create_topics_admin,
    default_cache_dir,
    die_with_parent_hook,
    free_port,
    port_open,
)
from moderator.testing import ARCHITECTURES, cached_random_checkpoint, is_random_init, jpeg_bytes, photo_like

STAGES = ("fetch", "decode", "preprocess", "transfer", "forward", "score", "publish", "produce", "commit")
ENGINE_THREAD_STAGES = ("transfer", "forward", "score", "publish")  # the model's part of the engine thread


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why and what to change."""


# ==================================================================================================
# Options


@dataclass(frozen=True)
class BenchOptions:
    arch: str = "ViT-B/32"  # architecture: its real checkpoint when cached locally, else random weights
    model: str | None = None  # a checkpoint (hub id or directory) instead of the arch's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # image tower precision (auto: fp32 on CPU, fp16 on CUDA)
    images: int = 384  # images through the engine and the worker (cycled from `distinct` generated ones)
    distinct: int = 128  # distinct generated JPEGs
    sizes: tuple[tuple[int, int, int], ...] = ((640, 480, 1),)  # (width, height, weight) of the size mix
    source: str = "inline"  # inline: base64 in the event; url: served by a local HTTP server, fetched
    prompts: int = 12  # texts in the benchmark policy (= candidate labels of the reference)
    batch: int = 32
    max_delay_ms: float = 20.0
    decode_threads: int = 0  # 0: the core count
    decode_schedule: str = "auto"  # auto | overlap | before_forward (the worker's setting)
    reference_images: int = 24
    ceiling_batches: int = 6
    contenders: tuple[str, ...] = ("reference", "engine", "worker", "ceiling")
    feed: str = "kafka"  # kafka | queue
    partitions: int = 4
    kafka_bootstrap: str | None = None  # an existing broker instead of a local stack
    kafka_api_version: str | None = None
    redis_url: str | None = None  # an existing Redis instead of the local stack's
    load_levels: tuple[int, ...] = (25, 50, 75, 100)  # % of the worker's measured maximum
    load_seconds: float = 15.0
    sweep_batch: tuple[int, ...] = ()
    sweep_prompts: tuple[int, ...] = ()
    seed: int = 0

    @property
    def threads(self) -> int:
        return self.decode_threads or os.cpu_count() or 1

    def check(self) -> None:
        """Raise :class:`BenchError` naming the first option that cannot work."""
        if self.model is None and self.arch not in ARCHITECTURES:
            raise BenchError(f"unknown architecture {self.arch!r}: one of {', '.join(ARCHITECTURES)}, or --model")
        unknown = set(self.contenders) - {"reference", "engine", "worker", "ceiling"}
        if unknown or not self.contenders:
            raise BenchError(f"contenders are reference, engine, worker, ceiling; got {', '.join(self.contenders)}")
        if self.feed not in ("kafka", "queue") or self.source not in ("inline", "url"):
            raise BenchError("feed is kafka or queue; source is inline or url")
        for name in ("images", "distinct", "prompts", "batch", "reference_images", "ceiling_batches", "partitions"):
            if getattr(self, name) < 1:
                raise BenchError(f"{name.replace('_', '-')} must be at least 1")
        if self.load_seconds <= 0 or self.decode_threads < 0 or self.max_delay_ms < 0:
            raise BenchError("load-seconds must be positive, decode-threads and max-delay-ms not negative")


def parse_sizes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"640x480"`` or ``"640x480:3,1280x720:1"`` (weights) to ``((w, h, weight), ...)``."""
    out = []
    for part in text.split(","):
        dims, _, weight = part.strip().partition(":")
        w, sep, h = dims.partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or (weight and not weight.isdigit()):
            raise BenchError(f"bad size {part!r}: expected WIDTHxHEIGHT[:WEIGHT], e.g. 640x480:3,1280x720:1")
        if int(w) < 1 or int(h) < 1 or (weight and int(weight) < 1):
            raise BenchError(f"bad size {part!r}: width, height and weight must be >= 1")
        out.append((int(w), int(h), int(weight or 1)))
    return tuple(out)


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BenchError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise BenchError(f"expected positive integers, got {text!r}")
    return values


# ==================================================================================================
# Inputs: photo-like JPEGs, plain-language prompts, a policy


def size_plan(sizes: Sequence[tuple[int, int, int]], count: int) -> list[tuple[int, int]]:
    """``count`` sizes in the proportions of the weights (a repeating cycle)."""
    cycle = [(w, h) for w, h, weight in sizes for _ in range(weight)]
    return [cycle[i % len(cycle)] for i in range(count)]


def make_images(sizes: Sequence[tuple[int, int, int]], count: int, seed: int = 0, threads: int = 1) -> list[bytes]:
    """``count`` distinct photo-like JPEGs (quality 85) of the size mix."""
    plan = size_plan(sizes, count)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(lambda i: jpeg_bytes(photo_like(*plan[i], seed=seed + i)), range(count)))


_SUBJECTS = (
    "a handgun", "a rifle", "a shotgun", "a kitchen knife", "a sword", "bullets and ammunition", "a syringe",
    "pills", "a needle", "a cigarette", "a cigar", "a bottle of beer", "a glass of liquor", "marijuana",
    "white powder", "blood", "a bruise", "a dead body", "a fist fight", "a soldier in uniform",
    "a police officer", "a crime scene", "a protest sign", "a swastika flag", "a naked person",
    "a woman in a bikini", "a man in underwear", "a couple kissing", "a baby in a stroller",
    "a child on a playground", "a dog", "a cat", "food on a plate", "a birthday party", "a crowd at a concert",
    "a painting", "a comic drawing", "a meme with text", "a screenshot of a website", "a car on a highway",
)  # fmt: skip
_CONTEXTS = (
    "", "on a table", "in a kitchen", "on the floor", "on a bed", "at night", "indoors", "outdoors",
    "in a park", "on a street", "in a school", "in a hospital", "in a restaurant", "at a bar", "at the beach",
    "next to a window", "in a forest", "on a bridge", "in a car", "on a stage", "close up", "in a dark room",
    "held by a man", "held by a woman", "in a video game", "in a cartoon", "in a movie",
)  # fmt: skip


def prompt_bank(n: int) -> list[str]:
    """``n`` distinct plain-language prompts (up to 1080), the first ones all different subjects."""
    bank = [f"{s} {c}".strip() for c in _CONTEXTS for s in _SUBJECTS]
    if n > len(bank):
        raise BenchError(f"at most {len(bank)} prompts, asked for {n}")
    return bank[:n]


def bench_policy(texts: Sequence[str], name: str = "bench") -> PolicySpec:
    """A policy over exactly ``texts``, each put in the reference pipeline's default template.

    Categories of two descriptions and one contrast, as many as a quarter of the texts allows; the
    rest are neutral prompts. The texts are the reference's candidate labels: with its default
    hypothesis template it scores the very prompts this policy's matrix holds.
    """
    texts = list(texts)
    if not texts:
        raise BenchError("the policy needs at least one prompt")
    n_cat = max(1, len(texts) // 4)
    categories, rest = [], texts
    for i in range(n_cat):
        desc, rest = rest[:2], rest[2:]
        contrast, rest = rest[:1], rest[1:]
        if not desc:
            break
        categories.append({"name": f"category-{i}", "descriptions": desc, "contrasts": contrast,
                           "flag": 0.9, "review": 0.5})  # fmt: skip
    return PolicySpec.model_validate(
        {"name": name, "templates": [PIPELINE_TEMPLATE], "neutral": rest, "categories": categories}
    )


# ==================================================================================================
# Stage accounting, from the metrics production workers export


def stage_totals() -> dict[str, tuple[float, float]]:
    """``moderator_stage_seconds``: stage -> (count, seconds), cumulative since the process started."""
    out: dict[str, list[float]] = {}
    for metric in obs.STAGE_SECONDS.collect():
        for sample in metric.samples:
            stage = sample.labels.get("stage")
            if stage is None:
                continue
            if sample.name.endswith("_count"):
                out.setdefault(stage, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(stage, [0.0, 0.0])[1] = sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_breakdown(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], images: int
) -> dict[str, dict[str, float]]:
    """Per stage, what happened between two :func:`stage_totals`: count, seconds, ms per image."""
    out = {}
    for stage in STAGES:
        count = after.get(stage, (0.0, 0.0))[0] - before.get(stage, (0.0, 0.0))[0]
        seconds = after.get(stage, (0.0, 0.0))[1] - before.get(stage, (0.0, 0.0))[1]
        if count > 0:
            out[stage] = {"count": round(count), "seconds": round(seconds, 4),
                          "ms_per_image": round(1000 * seconds / max(images, 1), 3)}  # fmt: skip
    return out


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    if len(seconds) == 0:
        return {}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)} | {
        "max_ms": round(float(ms.max()), 1)
    }


# ==================================================================================================
# Contenders


@dataclass
class Result:
    images: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"images_per_s": round(self.images_per_s, 2), "images": self.images,
                "seconds": round(self.seconds, 3), **self.extra}  # fmt: skip


def run_ceiling(engine: ClipEngine, pixels: np.ndarray, batches: int) -> Result:
    """The bare image tower on a pre-made, normalized device tensor of one batch, ``batches`` times."""
    with torch.inference_mode():
        x = engine.pixel_values(pixels).to(engine.dtype)
        engine.model.get_image_features(pixel_values=x)  # warm-up at this shape
        synchronize(engine.device)
        t0 = time.perf_counter()
        for _ in range(batches):
            engine.model.get_image_features(pixel_values=x)
        synchronize(engine.device)
        seconds = time.perf_counter() - t0
    return Result(batches * len(pixels), seconds, {"batch": len(pixels)})


def run_engine(
    engine: ClipEngine, policy: CompiledPolicy, images: Sequence[bytes], batch: int, loader: ImageLoader, schedule: str
) -> Result:
    """JPEG bytes to decisions, batched, decoding on the loader's pool as the worker would
    (``schedule``, see :func:`moderator.pipeline.decode_before_forward`): each batch just before
    its forward, or one batch ahead, beside the model."""

    def load(chunk: Sequence[bytes]) -> np.ndarray:
        results = loader.load_many(chunk)
        bad = [r for r in results if isinstance(r, ImageError)]
        if bad:
            raise BenchError(f"a benchmark image failed to decode: {bad[0]}")
        return np.stack(results)  # type: ignore[arg-type]

    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    policy.decisions(engine.encode_images(load(chunks[0])))  # warm-up at this batch size
    overlap = not decode_before_forward(schedule, engine.device)
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="bench-prefetch")
    try:
        before = stage_totals()
        t0 = time.perf_counter()
        pending = prefetch.submit(load, chunks[0]) if overlap else None
        decided = 0
        for k, chunk in enumerate(chunks):
            if pending is not None:
                pixels = pending.result()
                if k + 1 < len(chunks):
                    pending = prefetch.submit(load, chunks[k + 1])
            else:
                pixels = load(chunk)
            decided += len(policy.decisions(engine.encode_images(pixels)))
        seconds = time.perf_counter() - t0
        after = stage_totals()
    finally:
        prefetch.shutdown(wait=True)
    assert decided == len(images)
    extra = {"batch": batch, "decode": "overlap" if overlap else "before_forward"}
    return Result(len(images), seconds, extra | {"stages": stage_breakdown(before, after, len(images))})


def make_reference(model_path: str, engine: ClipEngine) -> Any:
    """The reference: ``transformers.pipeline`` on the same weights, device and precision."""
    from transformers import pipeline

    return pipeline("zero-shot-image-classification", model=model_path, device=engine.device, dtype=engine.dtype)


def run_reference(pipe: Any, device: torch.device, images: Sequence[bytes], texts: Sequence[str]) -> Result:
    """The pipeline once per image, the policy's texts as candidate labels, its default template
    (``extra["scores"]``: per image, label -> probability)."""
    from PIL import Image

    labels = list(texts)

    def call(data: bytes) -> dict[str, float]:
        out = pipe(Image.open(io.BytesIO(data)), candidate_labels=labels)  # as a team would call it
        return {r["label"]: float(r["score"]) for r in out}

    call(images[0])  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    scores = [call(d) for d in images]
    synchronize(device)
    return Result(len(images), time.perf_counter() - t0, {"scores": scores})


def prompt_tokens(engine: ClipEngine, texts: Sequence[str]) -> float:
    """Mean tokens per prompt, start and end included (the reference's text-tower cost grows with it)."""
    ids = engine.tokenizer(list(texts), truncation=True, max_length=engine.max_text_tokens)["input_ids"]
    return round(float(np.mean([len(i) for i in ids])), 2)


# ==================================================================================================
# The worker, fed by Kafka or by an in-process queue


@dataclass
class _Record:  # what kafka-python's poll() returns, as far as the worker reads it
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int


@dataclass(frozen=True)
class _GroupMetadata:
    state: Any


class QueueFeed:
    """An in-process stand-in for the Kafka consumer and producer the worker talks to.

    For machines without a broker (the GPU benchmark): events put here are delivered by ``poll()``
    on one partition, honouring pause/resume; records the worker publishes are acknowledged at once
    and kept with the time they were sent. It implements exactly the part of kafka-python's
    ``KafkaConsumer`` / ``KafkaProducer`` API that :class:`~moderator.pipeline.Worker` uses, so the
    worker's own code (parse, image stage, batcher, engine, policy, publishing, offsets) runs
    unchanged; only the broker's network and storage are missing from what it measures.
    """

    def __init__(self, topic: str, max_poll_records: int = 500) -> None:
        from kafka import TopicPartition

        self.tp = TopicPartition(topic, 0)
        self.max_poll_records = max_poll_records
        self._queue: deque[_Record] = deque()
        self._cond = threading.Condition()
        self._offset = 0
        self._paused = False
        self._listener: Any = None
        self._assigned = False
        self.outputs: list[tuple[str, bytes | None, bytes, float]] = []  # (topic, key, value, monotonic time)
        self.committed: dict[Any, int] = {}

    # --- what the benchmark calls --------------------------------------------------------------
    def put(self, key: bytes, value: bytes) -> None:
        with self._cond:
            self._queue.append(_Record(self._offset, key, value, int(time.time() * 1000)))
            self._offset += 1
            self._cond.notify_all()

    def outputs_since(self, index: int, timeout: float) -> list[tuple[str, bytes | None, bytes, float]]:
        """The outputs after the first ``index``, waiting up to ``timeout`` for one when there are none."""
        with self._cond:
            if len(self.outputs) <= index:
                self._cond.wait(timeout)
            return self.outputs[index:]

    # --- consumer API used by the worker ---------------------------------------------------------
    def subscribe(self, topics: Sequence[str], listener: Any = None) -> None:
        self._listener = listener

    def topics(self) -> set[str]:
        return {self.tp.topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0} if topic == self.tp.topic else set()

    def poll(self, timeout_ms: int = 0) -> dict[Any, list[_Record]]:
        if not self._assigned:
            self._assigned = True
            if self._listener is not None:
                asyncio.run(self._listener.on_partitions_assigned({self.tp}))
        with self._cond:
            if self._paused or not self._queue:
                self._cond.wait(timeout_ms / 1000)
            if self._paused or not self._queue:
                return {}
            n = min(self.max_poll_records, len(self._queue))
            return {self.tp: [self._queue.popleft() for _ in range(n)]}

    def pause(self, *partitions: Any) -> None:
        self._paused = self._paused or bool(partitions)

    def resume(self, *partitions: Any) -> None:
        if partitions:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def paused(self) -> set[Any]:
        return {self.tp} if self._paused else set()

    def assignment(self) -> set[Any]:
        return {self.tp} if self._assigned else set()

    def group_metadata(self) -> _GroupMetadata:
        from kafka.structs import MemberState

        return _GroupMetadata(MemberState.STABLE)

    def commit_async(self, offsets: dict[Any, Any], callback: Callable[[Any, Any], None] | None = None) -> None:
        self.commit(offsets)
        if callback is not None:
            callback(offsets, None)

    def commit(self, offsets: dict[Any, Any], timeout_ms: int | None = None) -> None:
        with self._cond:
            self.committed.update({tp: meta.offset for tp, meta in offsets.items()})

    # --- producer API used by the worker ---------------------------------------------------------
    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> Any:
        from kafka.future import Future

        with self._cond:
            self.outputs.append((topic, key, value or b"", time.monotonic()))
            self._cond.notify_all()
        return Future().success(None)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, autocommit: bool = False, timeout: float | None = None) -> None:
        pass


class ImageServer:
    """The benchmark's images over HTTP on loopback (``source="url"``), ``/<index>.jpg``: Python's
    ``http.server`` in a process of its own, as an image CDN would be, so that serving does not
    compete with the worker for this interpreter's lock."""

    def __init__(self, images: Sequence[bytes], directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(images):
            (directory / f"{i}.jpg").write_bytes(data)
        self.port = free_port()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(directory)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent_hook(),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BenchError(f"the image server (python -m http.server) did not start on port {self.port}")
            time.sleep(0.05)

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.port}/{index}.jpg"

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class EventSource:
    """Event envelopes for the benchmark's images: inline (base64) or by URL. Each image's part of
    the envelope is encoded once; an event is that part and its id (plain ASCII, no escaping)."""

    def __init__(self, images: Sequence[bytes], source: str, server: ImageServer | None) -> None:
        refs = (
            [{"data": base64.b64encode(d).decode()} for d in images]
            if source == "inline"
            else [{"url": server.url(i)} for i in range(len(images))]  # type: ignore[union-attr]
        )
        self._images = [json.dumps(ref).encode() for ref in refs]

    def event(self, event_id: str, index: int) -> bytes:
        return b'{"id": "' + event_id.encode() + b'", "image": ' + self._images[index % len(self._images)] + b"}"


class _Transport:
    """How the benchmark puts events in and sees the worker's records come out."""

    name = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def send(self, event_id: str, value: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def fresh(self) -> list[tuple[str, bytes | None, bytes, float]]:
        """Output records not seen yet (topic, key, value, when seen), waiting briefly for some."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def collect(
        self, ids: set[str], timeout: float, on_decision: Callable[[str, float], None], alive: Callable[[], bool]
    ) -> None:
        """Call ``on_decision(id, time)`` for each decision of ``ids`` until all came; raise
        :class:`BenchError` if any was dead-lettered, or the worker stopped, or ``timeout`` passed."""
        left, dead = set(ids), {}
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline and alive():
            for topic, key, value, t in self.fresh():
                eid = (key or b"").decode()
                if eid not in left or topic not in (self.settings.topic_decisions, self.settings.topic_dead_letters):
                    continue
                left.discard(eid)
                if topic == self.settings.topic_dead_letters:
                    dead[eid] = json.loads(value).get("reason", "?")
                else:
                    on_decision(eid, t)
        if dead:
            first = next(iter(dead.items()))
            raise BenchError(f"{len(dead)} benchmark events were dead-lettered (e.g. {first[0]}: {first[1]})")
        if left:
            why = "the worker stopped (see its log above)" if not alive() else f"none within {timeout:.0f} s"
            raise BenchError(f"{len(left)} of {len(ids)} benchmark events got no decision: {why}")


class _KafkaTransport(_Transport):
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from moderator.pipeline import make_producer

        super().__init__(settings)
        self.producer = make_producer(settings, max_request_size=32 << 20)
        self.consumer = KafkaConsumer(**settings.kafka_common(), group_id=None, enable_auto_commit=False)
        parts = [
            TopicPartition(topic, p)
            for topic in (settings.topic_decisions, settings.topic_dead_letters)
            for p in sorted(self.consumer.partitions_for_topic(topic) or [])
        ]
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)

    def send(self, event_id: str, value: bytes) -> None:
        self.producer.send(self.settings.topic_images, key=event_id.encode(), value=value)

    def flush(self) -> None:
        self.producer.flush()

    def fresh(self) -> list[tuple[str, bytes | None, bytes, float]]:
        batches = self.consumer.poll(timeout_ms=100)
        now = time.monotonic()
        return [(tp.topic, r.key, r.value or b"", now) for tp, records in batches.items() for r in records]

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=5)


class _QueueTransport(_Transport):
    name = "queue"

    def __init__(self, settings: Settings, feed: QueueFeed) -> None:
        super().__init__(settings)
        self.feed = feed
        self._seen = 0  # outputs already looked at

    def send(self, event_id: str, value: bytes) -> None:
        self.feed.put(event_id.encode(), value)

    def fresh(self) -> list[tuple[str, bytes | None, bytes, float]]:
        out = self.feed.outputs_since(self._seen, 0.1)
        self._seen += len(out)
        return out


def run_worker(
    settings: Settings,
    engine: ClipEngine,
    registry: PolicyRegistry,
    events: EventSource,
    transport: _Transport,
    worker_kwargs: dict[str, Any],
    n_events: int,
    load_levels: Sequence[int],
    load_seconds: float,
) -> dict[str, Any]:
    """Throughput from a backlog of ``n_events``, then latency at each offered load level."""
    from moderator.pipeline import Worker

    run_id = uuid.uuid4().hex[:8]
    backlog = {f"bench-{run_id}-b{i}": i for i in range(n_events)}
    for eid, i in backlog.items():  # a backlog, as when a worker catches up a lag
        transport.send(eid, events.event(eid, i))
    transport.flush()
    worker = Worker(settings, engine, registry, **worker_kwargs)
    thread = threading.Thread(target=lambda: worker.run(install_signals=False), name="bench-worker", daemon=True)
    decided: dict[str, float] = {}
    thread.start()
    try:
        if not worker.assigned.wait(120):
            raise BenchError("the worker got no partitions within 120 s (is the broker healthy?)")
        before, t0 = stage_totals(), time.monotonic()
        transport.collect(set(backlog), 120.0 + 2 * n_events, decided.__setitem__, thread.is_alive)
        after = stage_totals()
        times = sorted(decided.values())
        wall = times[-1] - t0
        # Steady state: from the first batch's last decision to the last one (the first batch also
        # pays for the first fetches; the engine's and the ceiling's warm-up batches are not timed
        # either). From the assignment, start included, is reported beside it.
        first = settings.max_batch_size
        steady = n_events > 2 * first and times[-1] > times[first - 1]
        throughput = (n_events - first) / (times[-1] - times[first - 1]) if steady else n_events / wall
        stages = stage_breakdown(before, after, n_events)
        model_share = sum(stages.get(s, {}).get("seconds", 0.0) for s in ENGINE_THREAD_STAGES) / wall
        loads = []
        for pct in load_levels:
            rate = throughput * pct / 100
            phase = _latency_phase(transport, events, rate, load_seconds, f"{run_id}-{pct}", thread.is_alive)
            loads.append({"load_pct": pct, **phase})
    finally:
        worker.stop("benchmark done")
        thread.join(60)
        transport.close()
    return {
        "images_per_s": round(throughput, 2), "images_per_s_including_start": round(n_events / wall, 2),
        "images": n_events, "seconds": round(wall, 3),
        "feed": transport.name, "stages": stages, "model_share_of_wall": round(model_share, 3), "latency": loads,
    }  # fmt: skip


def _latency_phase(
    transport: _Transport, events: EventSource, rate: float, seconds: float, tag: str, alive: Callable[[], bool]
) -> dict[str, Any]:
    """Events at a fixed rate for ``seconds``; produce-to-decision latency of each."""
    n = max(10, int(rate * seconds))
    sent: dict[str, float] = {}
    ids = [f"bench-{tag}-{i}" for i in range(n)]
    latencies: list[float] = []

    def produce() -> None:
        start = time.monotonic()
        for i, eid in enumerate(ids):
            value = events.event(eid, i)
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            sent[eid] = time.monotonic()
            transport.send(eid, value)
        transport.flush()

    producer = threading.Thread(target=produce, name="bench-producer", daemon=True)
    t0 = time.monotonic()
    producer.start()
    transport.collect(set(ids), seconds + 120, lambda eid, t: latencies.append(t - sent[eid]), alive)
    producer.join()
    return {"offered_per_s": round(rate, 2), "events": n, "decided": len(latencies),
            "achieved_per_s": round(len(latencies) / (time.monotonic() - t0), 2), **percentiles(latencies)}  # fmt: skip


# ==================================================================================================
# The whole benchmark


def resolve_model(opts: BenchOptions) -> tuple[str, str]:
    """(what to load, where the reference pipeline loads it from): the named checkpoint, the arch's
    real checkpoint when it is in the local Hugging Face cache, else random weights of the arch."""
    if opts.model:
        return opts.model, _local_path(opts.model)
    real = next((c.model_id for c in SUPPORTED_CHECKPOINTS.values() if c.architecture == opts.arch), None)
    if real is not None and checkpoint_available(real):
        return real, _local_path(real)
    path = str(cached_random_checkpoint(default_cache_dir(), opts.arch))
    return path, path


def _local_path(model: str) -> str:
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    from huggingface_hub import snapshot_download

    return snapshot_download(model, local_files_only=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(engine: ClipEngine) -> dict[str, Any]:
    import transformers

    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(engine.device)}  # fmt: skip
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


def run_bench(
    opts: BenchOptions,
    progress: Callable[[str], None] = lambda s: None,
    create_topics: Callable[[list[str], int], None] | None = None,
) -> dict[str, Any]:
    """Run every contender and sweep asked for; return the report (see :func:`render_table`).

    ``create_topics(names, partitions)`` makes the benchmark's topics on an existing broker
    (default: the CreateTopics API, Kafka >= 0.10.1); a local stack makes its own.
    """
    opts.check()
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="moderator-bench-"))
    progress("model")
    model_id, model_path = resolve_model(opts)
    engine = ClipEngine.load(model_id, device=opts.device, dtype=opts.dtype, max_batch_size=opts.batch,
                             local_files_only=not Path(model_id).is_dir())  # fmt: skip
    random_init = is_random_init(model_path) is not None
    if random_init:
        notes.append(f"random weights of the {opts.arch} architecture (no real checkpoint in the local cache):"
                     " speed is the real architecture's, decisions are meaningless")  # fmt: skip
    progress("images")
    distinct = make_images(opts.sizes, min(opts.distinct, max(opts.images, 1)), opts.seed, opts.threads)
    images = [distinct[i % len(distinct)] for i in range(opts.images)]
    texts = prompt_bank(opts.prompts)
    policy_dir = tmp / "policies"
    policy_dir.mkdir()
    (policy_dir / "bench.yaml").write_text(yaml.safe_dump(bench_policy(texts).model_dump(mode="json"), sort_keys=False))

    stack: LocalStack | None = None
    server: ImageServer | None = None
    loader = ImageLoader(ImageLimits(), engine.spec, opts.threads)
    report: dict[str, Any] = {}
    try:
        overrides: dict[str, Any] = {"redis_enabled": False}
        if "worker" in opts.contenders and opts.feed == "kafka":
            progress("stack")
            stack, overrides = _kafka_and_redis(opts, tmp / "stack", create_topics)
        if opts.source == "url":
            server = ImageServer(distinct, tmp / "images")
            overrides["fetch_allow_networks"] = ("127.0.0.0/8",)
        settings = load_settings(
            **overrides, model_id=model_id, device=str(engine.device), policy_dir=policy_dir, default_policy="bench",
            max_batch_size=opts.batch, max_delay_ms=opts.max_delay_ms, decode_threads=opts.threads,
            decode_schedule=opts.decode_schedule,
            max_in_flight=max(256, 4 * opts.batch), kafka_group_id=f"moderator-bench-{uuid.uuid4().hex[:8]}",
            http_port=0, log_level="WARNING",
        )  # fmt: skip
        encoder = TextEncoder(engine, cache_from_settings(settings, engine))
        t0 = time.perf_counter()
        policy = compile_policy(bench_policy(texts), encoder)
        compile_s = time.perf_counter() - t0

        sizes = [f"{w}x{h}" + (f":{k}" if len(opts.sizes) > 1 else "") for w, h, k in opts.sizes]
        report = {
            "config": {k: v for k, v in asdict(opts).items() if k not in ("kafka_bootstrap", "redis_url")},
            "machine": _machine(engine),
            "model": {"id": model_id, "fingerprint": engine.fingerprint, "architecture": opts.arch,
                      "random_init": random_init, "dtype": str(engine.dtype).removeprefix("torch.")},
            "inputs": {"sizes": sizes, "distinct_images": len(distinct),
                       "mean_jpeg_bytes": int(np.mean([len(d) for d in distinct])), "source": opts.source,
                       "prompts": len(texts), "prompt_template": PIPELINE_TEMPLATE,
                       "mean_prompt_tokens": prompt_tokens(engine, [PIPELINE_TEMPLATE.format(t) for t in texts]),
                       "policy_compile_s": round(compile_s, 3)},
            "contenders": {}, "ratios": {}, "sweeps": {}, "notes": notes,
        }  # fmt: skip
        contenders: dict[str, Any] = report["contenders"]
        h, w = engine.spec.output_hw
        batch_pixels = np.stack(loader.load_many(images[: opts.batch]))  # type: ignore[arg-type]
        if len(batch_pixels) < opts.batch:  # fewer images than one batch: repeat them
            batch_pixels = np.resize(batch_pixels, (opts.batch, h, w, 3))

        # The ceiling is measured in three slices (first, before the worker, last) and the median
        # kept, so that a slow or fast spell of a shared machine does not skew every ratio.
        slices: list[Result] = []

        def ceiling_slice() -> None:
            if "ceiling" in opts.contenders:
                progress("ceiling")
                slices.append(run_ceiling(engine, batch_pixels, opts.ceiling_batches))

        ceiling_slice()
        if "engine" in opts.contenders:
            progress("engine")
            contenders["engine"] = run_engine(
                engine, policy, images, opts.batch, loader, opts.decode_schedule
            ).to_dict()
        reference = None
        if "reference" in opts.contenders or opts.sweep_prompts:
            reference = make_reference(model_path, engine)
        if "reference" in opts.contenders:
            progress("reference")
            ref_images = images[: opts.reference_images]
            ref = run_reference(reference, engine.device, ref_images, texts)
            theirs = np.array([[s[t] for t in policy.texts] for s in ref.extra.pop("scores")])
            ours = zero_shot_probs(engine.encode_images(np.stack(loader.load_many(ref_images))),  # type: ignore[arg-type]
                                   policy.matrix.T, engine.logit_scale).cpu().numpy()  # fmt: skip
            contenders["reference"] = ref.to_dict() | {
                "max_abs_probability_difference_vs_engine": float(np.abs(ours - theirs).max())
            }
        ceiling_slice()
        if "worker" in opts.contenders:
            progress("worker")
            contenders["worker"] = _run_worker_contender(opts, settings, engine, encoder, distinct, server, notes)
        ceiling_slice()
        if slices:
            median = sorted(slices, key=lambda r: r.images_per_s)[len(slices) // 2]
            contenders["ceiling"] = median.to_dict() | {
                "slices_images_per_s": [round(r.images_per_s, 2) for r in slices]
            }

        if opts.sweep_batch:
            progress("sweep: batch size")
            report["sweeps"]["batch"] = sweep_batch(engine, policy, images, loader, opts)
        if opts.sweep_prompts:
            progress("sweep: prompts")
            report["sweeps"]["prompts"] = sweep_prompts(engine, encoder, reference, images, loader, opts)
        report["ratios"] = ratios(contenders)
    finally:
        loader.close()
        if server is not None:
            server.close()
        if stack is not None:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _kafka_and_redis(
    opts: BenchOptions, stack_dir: Path, create_topics: Callable[[list[str], int], None] | None
) -> tuple[LocalStack | None, dict[str, Any]]:
    """The worker's services: the ones named in ``opts``, a local stack for the others; fresh
    topics. Returns the stack (to stop) and the settings that point at all of it."""
    stack, overrides = None, {}
    if opts.kafka_bootstrap is None or opts.redis_url is None:
        stack = LocalStack(stack_dir)
        info = stack.start(kafka=opts.kafka_bootstrap is None, redis=opts.redis_url is None)
        overrides.update(info.settings_overrides())
    if opts.kafka_bootstrap is not None:
        overrides.update(kafka_bootstrap_servers=opts.kafka_bootstrap, kafka_api_version=opts.kafka_api_version)
    if opts.redis_url is not None:
        overrides["redis_url"] = opts.redis_url
    topics = {f"topic_{t}": f"bench-{uuid.uuid4().hex[:8]}-{t.replace('_', '-')}"
              for t in ("images", "decisions", "review", "dead_letters")}  # fmt: skip
    if stack is not None and stack.kafka_running:
        create_topics = stack.create_topics
    elif create_topics is None:
        bootstrap, api = overrides["kafka_bootstrap_servers"], overrides.get("kafka_api_version")
        create_topics = lambda names, n: create_topics_admin(bootstrap, api, names, n)  # noqa: E731
    try:
        create_topics(list(topics.values()), opts.partitions)
    except BaseException:
        if stack is not None:
            stack.stop()
        raise
    return stack, {**overrides, **topics, "redis_key_prefix": "moderator-bench:emb:"}  # embeddings shared by runs


def _run_worker_contender(
    opts: BenchOptions,
    settings: Settings,
    engine: ClipEngine,
    encoder: TextEncoder,
    distinct: Sequence[bytes],
    server: ImageServer | None,
    notes: list[str],
) -> dict[str, Any]:
    def compile_one(spec: PolicySpec, source: str) -> CompiledPolicy:
        return compile_policy(spec, encoder, source)

    events = EventSource(distinct, opts.source, server)
    transport: _Transport
    if opts.feed == "kafka":
        transport, worker_kwargs = _KafkaTransport(settings), {}
    else:
        feed = QueueFeed(settings.topic_images, max_poll_records=min(500, settings.max_in_flight))
        transport, worker_kwargs = _QueueTransport(settings, feed), {"consumer": feed, "producer": feed}
        notes.append(
            "worker fed from an in-process queue (no Kafka or Redis here): its figures leave out the broker's"
            " network and storage; a decision counts when the worker hands it to the producer"
        )
    registry = PolicyRegistry(settings.policy_dir, compile_one, settings.default_policy)
    registry.load_initial()
    registry.start()  # the worker's hot reload runs beside it, as in `moderator run`
    try:
        out = run_worker(
            settings, engine, registry, events, transport, worker_kwargs, opts.images, opts.load_levels,
            opts.load_seconds,
        )  # fmt: skip
    finally:
        registry.stop()
    if opts.feed == "kafka":
        out["broker_api_version"] = settings.kafka_api_version or "probed"
        out["partitions"] = opts.partitions
    return out


def sweep_batch(engine: ClipEngine, policy: CompiledPolicy, images: Sequence[bytes], loader: ImageLoader,
                opts: BenchOptions) -> list[dict[str, Any]]:  # fmt: skip
    """Engine and ceiling images/s at each batch size (same images, cycled to at least 2 batches)."""
    out = []
    saved = engine.max_batch_size
    try:
        for b in opts.sweep_batch:
            engine.max_batch_size = b
            n = max(2 * b, min(len(images), 4 * opts.batch))
            subset = [images[i % len(images)] for i in range(n)]
            pixels = np.stack(loader.load_many(subset[:b]))  # type: ignore[arg-type]
            eng = run_engine(engine, policy, subset, b, loader, opts.decode_schedule)
            ceil = run_ceiling(engine, pixels, max(2, opts.ceiling_batches * opts.batch // b))
            out.append({"batch": b, "engine_images_per_s": round(eng.images_per_s, 2),
                        "ceiling_images_per_s": round(ceil.images_per_s, 2),
                        "engine_over_ceiling": round(eng.images_per_s / ceil.images_per_s, 3)})  # fmt: skip
    finally:
        engine.max_batch_size = saved
    return out


def sweep_prompts(engine: ClipEngine, encoder: TextEncoder, reference: Any, images: Sequence[bytes],
                  loader: ImageLoader, opts: BenchOptions) -> list[dict[str, Any]]:  # fmt: skip
    """Engine images/s as the policy grows (its text matrix is compiled once, through the cache), and
    the reference's images/s with the same prompts as candidate labels (on a few images)."""
    out = []
    n_engine = min(len(images), 4 * opts.batch)
    for p in opts.sweep_prompts:
        texts = prompt_bank(p)
        spec = bench_policy(texts, name=f"bench-{p}")
        encoded = encoder.texts_encoded
        t0 = time.perf_counter()
        policy = compile_policy(spec, encoder)
        cold, encoded_cold = time.perf_counter() - t0, encoder.texts_encoded - encoded
        t0 = time.perf_counter()
        compile_policy(spec, encoder)
        warm, encoded_warm = time.perf_counter() - t0, encoder.texts_encoded - encoded - encoded_cold
        eng = run_engine(engine, policy, images[:n_engine], opts.batch, loader, opts.decode_schedule)
        ref = run_reference(reference, engine.device, images[: max(2, min(8, opts.reference_images // 4))], texts)
        out.append({"prompts": p, "engine_images_per_s": round(eng.images_per_s, 2),
                    "reference_images_per_s": round(ref.images_per_s, 3),
                    "engine_over_reference": round(eng.images_per_s / ref.images_per_s, 2),
                    "compile_s_first": round(cold, 3), "compile_s_again": round(warm, 4),
                    "texts_encoded_first": encoded_cold, "texts_encoded_again": encoded_warm})  # fmt: skip
    return out


def ratios(contenders: dict[str, Any]) -> dict[str, float]:
    rate = {k: v["images_per_s"] for k, v in contenders.items() if v.get("images_per_s")}
    out = {}
    for a, b in (("worker", "ceiling"), ("worker", "reference"), ("engine", "reference"), ("engine", "ceiling"),
                 ("worker", "engine")):  # fmt: skip
        if a in rate and b in rate:
            out[f"{a}_over_{b}"] = round(rate[a] / rate[b], 3)
    return out


# ==================================================================================================
# Output


def render_table(report: dict[str, Any]) -> str:
    cfg, model, inputs, c = report["config"], report["model"], report["inputs"], report["contenders"]
    lines = [
        f"moderator bench: {model['architecture']} ({'random weights' if model['random_init'] else model['id']}), "
        f"{report['machine']['device']} {model['dtype']}, batch {cfg['batch']}, {inputs['prompts']} prompts "
        f"(~{inputs['mean_prompt_tokens']} tokens each), {', '.join(inputs['sizes'])} JPEG "
        f"(~{inputs['mean_jpeg_bytes'] // 1024} KiB) {inputs['source']}",
        "",
        f"{'contender':<10} {'images/s':>10} {'vs reference':>13} {'vs ceiling':>11}  notes",
    ]
    ref = c.get("reference", {}).get("images_per_s")
    ceil = c.get("ceiling", {}).get("images_per_s")
    notes = {
        "reference": "transformers pipeline, one call per image",
        "engine": "decode pool + batched image tower + compiled policy",
        "worker": "",
        "ceiling": "bare image tower on pre-made tensors",
    }
    if "worker" in c:
        w = c["worker"]
        mid = next((x for x in w["latency"] if x["load_pct"] == 50), w["latency"][0] if w["latency"] else None)
        feed = "Kafka + Redis" if w["feed"] == "kafka" else "in-process queue, no Kafka"
        notes["worker"] = feed + (
            f"; at {mid['load_pct']}% load p50 {mid['p50_ms']} ms, p95 {mid['p95_ms']} ms, p99 {mid['p99_ms']} ms"
            if mid
            else ""
        )
    for name in ("reference", "engine", "worker", "ceiling"):
        if name not in c:
            continue
        r = c[name]["images_per_s"]
        vs_ref = f"{r / ref:.2f}x" if ref else "-"
        vs_ceil = f"{r / ceil:.2f}x" if ceil else "-"
        lines.append(f"{name:<10} {r:>10.2f} {vs_ref:>13} {vs_ceil:>11}  {notes[name]}")
    for name in ("engine", "worker"):
        stages = c.get(name, {}).get("stages")
        if stages:
            parts = [f"{s} {v['ms_per_image']:.2f}" for s, v in stages.items()]
            lines.append(f"\n{name} stages (ms per image, summed over threads): " + ", ".join(parts))
    if "worker" in c:
        lines.append(f"worker engine thread in transfer, forward, score and publish: "
                     f"{c['worker']['model_share_of_wall']:.0%} of the wall time")  # fmt: skip
        lines.append("\nlatency vs offered load (produce to decision):")
        for x in c["worker"]["latency"]:
            lines.append(f"  {x['load_pct']:>3}% = {x['offered_per_s']:>8.2f}/s offered, {x['achieved_per_s']:>8.2f}/s"
                         f" decided: p50 {x['p50_ms']} ms, p95 {x['p95_ms']} ms, p99 {x['p99_ms']} ms")  # fmt: skip
    sweeps = report.get("sweeps", {})
    if "batch" in sweeps:
        lines.append("\nthroughput vs batch size:")
        for x in sweeps["batch"]:
            lines.append(f"  batch {x['batch']:>4}: engine {x['engine_images_per_s']:>9.2f}/s, ceiling "
                         f"{x['ceiling_images_per_s']:>9.2f}/s ({x['engine_over_ceiling']:.2f}x)")  # fmt: skip
    if "prompts" in sweeps:
        lines.append("\nthroughput vs prompts (engine: compiled once, cached; reference: prompts per call):")
        for x in sweeps["prompts"]:
            lines.append(f"  {x['prompts']:>5} prompts: engine {x['engine_images_per_s']:>9.2f}/s, reference "
                         f"{x['reference_images_per_s']:>8.3f}/s ({x['engine_over_reference']:.1f}x); "
                         f"compile {x['compile_s_first']:.2f} s ({x['texts_encoded_first']} texts encoded), "
                         f"again {x['compile_s_again']:.3f} s ({x['texts_encoded_again']})")  # fmt: skip
    if report.get("ratios"):
        lines.append("\nratios: " + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ==================================================================================================
# Command line


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    quick, sweeps = args.quick, not (args.quick or args.no_sweeps)

    def pick(value: Any, normal: Any, on_cuda: Any, on_quick: Any) -> Any:
        if value is not None:
            return value
        return on_quick if quick else (on_cuda if cuda else normal)

    return BenchOptions(
        arch=args.arch, model=args.model, device=args.device, dtype=args.dtype,
        images=pick(args.images, 384, 4096, 256 if not cuda else 1024), distinct=args.distinct,
        sizes=parse_sizes(args.sizes), source=args.source, prompts=args.prompts, batch=args.batch,
        max_delay_ms=args.max_delay_ms, decode_threads=args.decode_threads, decode_schedule=args.decode_schedule,
        reference_images=pick(args.reference_images, 24, 64, 8), ceiling_batches=6 if quick else 10,
        contenders=tuple(c.strip() for c in args.contenders.split(",") if c.strip()), feed=args.feed,
        partitions=args.partitions, kafka_bootstrap=args.kafka_bootstrap, kafka_api_version=args.kafka_api_version,
        redis_url=args.redis_url,
        load_levels=parse_ints(args.load) if args.load else ((50,) if quick else (25, 50, 75, 100)),
        load_seconds=pick(args.load_seconds, 15.0, 10.0, 6.0),
        sweep_batch=parse_ints(args.sweep_batch) if args.sweep_batch else
        (((32, 64, 128, 256, 512) if cuda else (1, 8, 16, 32, 64)) if sweeps else ()),
        sweep_prompts=parse_ints(args.sweep_prompts) if args.sweep_prompts else ((12, 48, 192, 768) if sweeps else ()),
    )  # fmt: skip


def cmd_bench(args: argparse.Namespace) -> int:
    import sys

    from transformers.utils import logging as hf_logging

    obs.configure_logging("WARNING", "json", kafka_level="ERROR")  # the stack's start-up probes warn
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        opts = options_from_args(args)
        t0 = time.monotonic()
        report = run_bench(opts, lambda stage: print(f"[bench {time.monotonic() - t0:6.1f}s] {stage}",
                                                     file=sys.stderr, flush=True))  # fmt: skip
    except BenchError as exc:
        print(f"moderator bench: {exc}", file=sys.stderr)
        return 2
    report["wall_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(report, indent=2)
    path = args.json_path or f"bench-{opts.arch.replace('/', '-')}-{report['machine']['device'].replace(':', '')}.json"
    if path == "-":
        print(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(render_table(report))
    print(f"\n({report['wall_s']} s; JSON: {path})")
    return 0
