"""The whole worker through a real local Kafka + Redis: events/s, and produce-to-decision latency.

    python benchmarks/worker_throughput.py [--arch tiny|ViT-B/32] [--events 400] [--batch 32]

Phase 1 (throughput): all events are produced at once; events/s = events / (last decision - first
produce). Phase 2 (latency): events produced at a fixed rate (half the phase-1 throughput);
latency = decision consumed - event produced, p50/p99.
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from moderator.clip import ClipEngine
from moderator.config import load_settings
from moderator.embedding_cache import TextEncoder, cache_from_settings
from moderator.pipeline import Worker
from moderator.policy import PolicyRegistry, compile_policy
from moderator.stack import LocalStack
from moderator.testing import build_clip_checkpoint, jpeg_bytes, photo_like

ROOT = Path(__file__).resolve().parents[1]


def run_phase(settings, images: list[bytes], rate: float | None, tag: str) -> tuple[float, list[float]]:
    consumer = KafkaConsumer(**settings.kafka_common(), group_id=None, enable_auto_commit=False)
    parts = [
        TopicPartition(settings.topic_decisions, p) for p in consumer.partitions_for_topic(settings.topic_decisions)
    ]
    consumer.assign(parts)
    consumer.seek_to_end(*parts)
    for tp in parts:
        consumer.position(tp)
    producer = KafkaProducer(**settings.kafka_common(), acks="all", enable_idempotence=settings.idempotence,
                             linger_ms=5, max_request_size=32 << 20)  # fmt: skip
    sent: dict[str, float] = {}
    payloads = [base64.b64encode(d).decode() for d in images]

    def produce() -> None:
        start = time.monotonic()
        for i, data in enumerate(payloads):
            if rate:
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
            eid = f"{tag}-{i}"
            sent[eid] = time.monotonic()
            producer.send(settings.topic_images, key=eid.encode(),
                          value=json.dumps({"id": eid, "image": {"data": data}}).encode())  # fmt: skip
        producer.flush()

    t0 = time.monotonic()
    threading.Thread(target=produce, daemon=True).start()
    latencies: list[float] = []
    last = t0
    while len(latencies) < len(images) and time.monotonic() - t0 < 900:
        for records in consumer.poll(timeout_ms=100).values():
            for r in records:
                eid = r.key.decode()
                if eid in sent:
                    last = time.monotonic()
                    latencies.append(last - sent[eid])
    consumer.close(autocommit=False)
    producer.close()
    return len(latencies) / (last - t0), latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--events", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    model_dir = build_clip_checkpoint(tmp / "model", args.arch)
    stack = LocalStack(tmp / "stack")
    info = stack.start(kafka=True, redis=True, topics=["images", "decisions", "review", "dead-letters"], partitions=4)
    try:
        settings = load_settings(**info.settings_overrides(), model_id=str(model_dir), device="cpu",
                                 policy_dir=ROOT / "policies", default_policy="community-standards",
                                 max_batch_size=args.batch, http_port=0, log_level="WARNING")  # fmt: skip
        engine = ClipEngine.from_settings(settings)
        encoder = TextEncoder(engine, cache_from_settings(settings, engine))
        registry = PolicyRegistry(settings.policy_dir, lambda s, src: compile_policy(s, encoder, src),
                                  settings.default_policy)  # fmt: skip
        registry.load_initial()
        worker = Worker(settings, engine, registry)
        thread = threading.Thread(target=lambda: worker.run(install_signals=False), daemon=True)
        thread.start()
        worker.assigned.wait(60)
        images = [jpeg_bytes(photo_like(640, 480, seed=i)) for i in range(args.events)]
        throughput, lat1 = run_phase(settings, images, None, "burst")
        rate = throughput / 2
        n2 = min(len(images), max(50, int(rate * 20)))
        _, lat2 = run_phase(settings, images[:n2], rate, "steady")
        worker.stop("benchmark done")
        thread.join(60)
        ms = np.array(lat2) * 1000
        print(json.dumps({
            "arch": args.arch, "events": len(lat1), "batch": args.batch, "input": "640x480 JPEG, inline",
            "events_per_s": round(throughput, 2), "latency_rate_events_per_s": round(rate, 2),
            "latency_events": len(lat2), "latency_p50_ms": round(float(np.percentile(ms, 50)), 1),
            "latency_p99_ms": round(float(np.percentile(ms, 99)), 1),
        }))  # fmt: skip
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
