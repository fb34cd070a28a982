"""The replay contender: re-deciding logged embeddings (``moderator replay``) against re-running images.

Two figures, in the run that also measured the worker:

- **the same events**: the worker's own embeddings log of the events it just decided, replayed under
  the benchmark policy (read from Kafka, parsed, decoded, scored, compared): its events/s over the
  worker's images/s;
- **a large log**: ``log_records`` synthetic records of the serving model (random unit vectors,
  decided by the policy, in the worker's exact record format) produced to a fresh embeddings topic,
  then replayed: embeddings/s, and where the time goes (Kafka read, JSON, vector decode, the product).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderator.app import App
from moderator.bench.options import BenchOptions
from moderator.events import Decision, EmbeddingRecord, Source, encode_vector, utc_now
from moderator.policy import OUTCOMES, CompiledPolicy, decide_batch
from moderator.replay import run_replay
from moderator.topics import NewTopic


def _rate(report: dict[str, Any]) -> dict[str, Any]:
    seconds = report["seconds"]
    total = sum(seconds.values())
    return {"replayed": report["replayed"], "seconds": seconds, "total_s": round(total, 3),
            "per_s": round(report["replayed"] / total, 1) if total else 0.0}  # fmt: skip


def synthetic_log(app: App, policy: CompiledPolicy, topic: str, records: int, seed: int = 0) -> float:
    """Produce ``records`` embedding records of the serving model to ``topic``; the seconds it took."""
    rng = np.random.default_rng(seed)
    engine = app.engine
    live = Decision(
        decision="allow",
        scores={},
        triggered=[],
        policy=policy.ref,
        model=engine.fingerprint,
        image_precision=engine.precision,
    )
    template = EmbeddingRecord(
        event_id="x", model=engine.fingerprint, image_precision=engine.precision, dtype="float16",
        dim=engine.embed_dim, vector="", live=live, source=Source(topic="bench-images", partition=0, offset=0),
        decided_at=utc_now(),
    ).model_dump(mode="json")  # fmt: skip
    producer = app.producer(linger_ms=20, batch_size=256 * 1024)
    t0 = time.perf_counter()
    for start in range(0, records, 4096):
        n = min(4096, records - start)
        vectors = rng.standard_normal((n, engine.embed_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = policy.scores(torch.from_numpy(vectors))
        codes = decide_batch(scores, policy.flag, policy.review)
        for i in range(n):
            eid = f"log-{start + i}"
            record = {**template, "event_id": eid, "vector": encode_vector(vectors[i], "float16"),
                      "source": {**template["source"], "offset": start + i},
                      "live": {**template["live"], "decision": OUTCOMES[int(codes[i])],
                               "scores": dict(zip(policy.categories, scores[i].tolist(), strict=True))}}  # fmt: skip
            producer.send(topic, key=eid.encode(), value=json.dumps(record).encode())
    producer.flush()
    producer.close()
    return time.perf_counter() - t0


def run_replay_contender(
    opts: BenchOptions, app: App, policy: CompiledPolicy, policy_dir: Path, worker: dict[str, Any] | None,
    create_topics: Any,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    if worker is not None and worker.get("feed") == "kafka":
        same = _rate(run_replay(app, policy_dir, image_precision=app.engine.precision))
        out["same_events"] = {**same, "over_worker": round(same["per_s"] / worker["images_per_s"], 1)}
    topic = f"bench-{uuid.uuid4().hex[:8]}-embeddings"
    create_topics([NewTopic(topic, opts.partitions, compacted=True)])
    produce_s = synthetic_log(app, policy, topic, opts.log_records, opts.seed)
    log_app = App(app.settings.model_copy(update={"topic_embeddings": topic}), engine=app.engine)
    large = _rate(run_replay(log_app, policy_dir, image_precision=app.engine.precision))
    out["log"] = {**large, "records": opts.log_records, "produce_s": round(produce_s, 2)}
    if worker is not None:
        out["log"]["over_worker"] = round(large["per_s"] / worker["images_per_s"], 1)
    return out
