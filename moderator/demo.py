"""``moderator demo``: the main job end to end on a local stack, in one command.

Brings up a real Kafka + Redis (``stack.py``), publishes a small set of generated sample images
(and a few bad inputs, to show the dead-letter path), runs the worker until every event has a
record, prints the decisions, the review feed and the dead letters, and stops everything.

Model: the configured checkpoint (``MODERATOR_MODEL_ID``) when it can be loaded. When its weights
cannot be fetched, a banner says so and a randomly initialized model of the same architecture
runs instead; every decision then carries a ``random-init:`` model fingerprint. Never silently.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from moderator.clip import SUPPORTED_CHECKPOINTS, ClipEngine, ModelLoadError
from moderator.config import Settings, load_settings
from moderator.embedding_cache import TextEncoder, cache_from_settings
from moderator.observability import get_logger
from moderator.pipeline import Worker
from moderator.policy import PolicyRegistry, compile_policy
from moderator.stack import LocalStack, default_cache_dir
from moderator.testing import cached_random_checkpoint, jpeg_bytes, photo_like

log = get_logger(__name__)


def banner(lines: list[str]) -> None:
    width = max(len(line) for line in lines) + 4
    print("!" * width)
    for line in lines:
        print(f"! {line.ljust(width - 4)} !")
    print("!" * width, flush=True)


def load_demo_engine(settings: Settings) -> ClipEngine:
    """The configured checkpoint, or (with a banner) a random-init model of its architecture."""
    try:
        if not settings.model_local_files_only and not Path(settings.model_id).is_dir() and not _hub_reachable():
            # Offline: say so at once instead of waiting out the hub client's retries.
            settings = settings.model_copy(update={"model_local_files_only": True})
        return ClipEngine.from_settings(settings)
    except ModelLoadError as exc:
        info = SUPPORTED_CHECKPOINTS.get(settings.model_id)
        arch = info.architecture if info else "ViT-B/32"
        first = str(exc).splitlines()[0]
        reason = first.split(": ", 1)[-1]
        banner([
            f"The weights of {settings.model_id} cannot be loaded here",
            f"({reason[:90]}{'...' if len(reason) > 90 else ''}).",
            f"Running a RANDOMLY INITIALIZED {arch} instead: its decisions are meaningless,",
            "and every decision says so (model fingerprint 'random-init:...').",
            "For real decisions: download the weights and set MODERATOR_MODEL_ID.",
        ])  # fmt: skip
        target = cached_random_checkpoint(default_cache_dir(), arch)
        return ClipEngine.load(str(target), device=settings.device, dtype=settings.dtype,
                               max_batch_size=settings.max_batch_size)  # fmt: skip


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    host = urlsplit(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def sample_events(count: int) -> list[tuple[str, dict[str, Any] | bytes]]:
    """Generated photo-like JPEGs, plus three bad inputs (to show dead letters)."""
    events: list[tuple[str, dict[str, Any] | bytes]] = []
    sizes = [(640, 480), (480, 640), (800, 600), (1024, 768), (320, 240)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        data = jpeg_bytes(photo_like(w, h, seed=1000 + i))
        policy = "kids-platform" if i % 4 == 3 else None
        event: dict[str, Any] = {"id": f"demo-{i:03d}", "image": {"data": base64.b64encode(data).decode()},
                                 "metadata": {"uploader": f"user-{i % 7}", "surface": policy or "public"}}  # fmt: skip
        if policy:
            event["policy"] = policy
        events.append((event["id"], event))
    text = base64.b64encode(b"this is not an image\n").decode()
    cut = base64.b64encode(jpeg_bytes(photo_like(640, 480, seed=7))[:3000]).decode()
    events.append(("demo-bad-text", {"id": "demo-bad-text", "image": {"data": text}}))
    events.append(("demo-bad-truncated", {"id": "demo-bad-truncated", "image": {"data": cut}}))
    events.append(("demo-bad-json", b"{this is not json"))
    return events


def _consume_outputs(settings: Settings, want: set[str], timeout: float) -> dict[str, dict[str, list[dict]]]:
    """Read the three output topics until every wanted event id has a decision or a dead letter."""
    topics = {"decisions": settings.topic_decisions, "review": settings.topic_review,
              "dead-letters": settings.topic_dead_letters}  # fmt: skip
    consumer = KafkaConsumer(**settings.kafka_common(), group_id=None, enable_auto_commit=False)
    parts = [TopicPartition(t, p) for t in topics.values() for p in sorted(consumer.partitions_for_topic(t) or [])]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    by_topic = {v: k for k, v in topics.items()}
    out: dict[str, dict[str, list[dict]]] = {k: {} for k in topics}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                for r in records:
                    rec = json.loads(r.value)
                    eid = rec.get("event_id") or (r.key or b"").decode()
                    out[by_topic[tp.topic]].setdefault(eid, []).append(rec)
            if want <= set(out["decisions"]) | set(out["dead-letters"]):
                break
    finally:
        consumer.close(autocommit=False)
    return out


def print_report(ids: list[str], out: dict[str, dict[str, list[dict]]]) -> None:
    print()
    print(f"{'event':<20} {'decision':<9} {'policy':<22} {'top category':<24} {'score':>6}  model")
    print("-" * 110)
    for eid in ids:
        if eid in out["decisions"]:
            d = out["decisions"][eid][-1]
            top = max(d["scores"].items(), key=lambda kv: kv[1])
            print(f"{eid:<20} {d['decision']:<9} {d['policy']['name']:<22} {top[0]:<24} {top[1]:>6.3f}  "
                  f"{d['model'][:40]}")  # fmt: skip
        elif eid in out["dead-letters"]:
            dl = out["dead-letters"][eid][-1]
            print(f"{eid:<20} {'DEAD':<9} {'-':<22} {dl['reason']:<24} {'':>6}  {dl['message'][:40]}")
        else:
            print(f"{eid:<20} MISSING")
    print()
    review = [r[-1] for r in out["review"].values()]
    print(f"review feed: {len(review)} item(s), highest priority first")
    for r in sorted(review, key=lambda r: -r["priority"]):
        reasons = ", ".join(f"{t['category']} {t['score']:.2f}>={t['threshold']}" for t in r["reasons"])
        print(f"  priority {r['priority']:>3}  {r['event_id']:<20} {r['policy']['name']:<20} {reasons}")
    print()


def run_demo(count: int = 24, keep_stack: bool = False) -> int:
    settings_env = load_settings()
    with tempfile.TemporaryDirectory(prefix="moderator-demo-") as tmp:
        stack = LocalStack(Path(tmp) / "stack")
        print("starting a local Kafka + Redis ...", flush=True)
        topics = [settings_env.topic_images, settings_env.topic_decisions, settings_env.topic_review,
                  settings_env.topic_dead_letters]  # fmt: skip
        info = stack.start(kafka=True, redis=True, topics=topics, partitions=4)
        try:
            overrides = {**info.settings_overrides(), "kafka_group_id": "moderator-demo", "http_port": 0}
            settings = load_settings(**overrides)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            engine = load_demo_engine(settings)
            encoder = TextEncoder(engine, cache_from_settings(settings, engine))
            registry = PolicyRegistry(settings.policy_dir, lambda s, src: compile_policy(s, encoder, src),
                                      settings.default_policy or "community-standards")  # fmt: skip
            registry.load_initial()
            worker = Worker(settings, engine, registry)
            thread = threading.Thread(target=lambda: worker.run(install_signals=False), name="worker")
            thread.start()
            events = sample_events(count)
            producer = KafkaProducer(**settings.kafka_common(), acks="all", enable_idempotence=settings.idempotence)
            for eid, event in events:
                value = event if isinstance(event, bytes) else json.dumps(event).encode()
                producer.send(settings.topic_images, key=eid.encode(), value=value)
            producer.flush()
            producer.close()
            print(f"published {len(events)} events; the worker is deciding ...", flush=True)
            t0 = time.monotonic()
            ids = [eid for eid, _ in events]
            out = _consume_outputs(settings, set(ids), timeout=300)
            elapsed = time.monotonic() - t0
            worker.stop("demo done")
            thread.join(timeout=60)
            print_report(ids, out)
            decided = sum(1 for i in ids if i in out["decisions"] or i in out["dead-letters"])
            print(f"{decided}/{len(ids)} events have a record, in {elapsed:.1f}s; model {engine.fingerprint}")
            return 0 if decided == len(ids) else 1
        finally:
            if not keep_stack:
                stack.stop()
