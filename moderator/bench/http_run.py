"""The ``http`` contender: the synchronous endpoint inside the stream worker (``moderator run`` with
``MODERATOR_SERVE_IN_WORKER``), under HTTP requests alone and under a mixed load.

Three phases, one worker and its endpoint, the real Kafka and Redis:

1. **stream alone**: a backlog of events through the worker: its capacity (images/s).
2. **http alone**: ``clients`` closed-loop HTTP clients, each sending ``POST /v1/moderate`` (an inline
   image, a new id each time) as soon as its previous answer came: latency p50/p95/p99 and requests/s.
3. **mixed**: stream events offered at ``stream_pct`` % of the capacity measured in 1, and the same HTTP
   clients at once: the HTTP latencies, the stream's achieved throughput and its produce-to-decision
   latency, and how many requests were refused (503).

The load generators run in this process, on the worker's cores (as the worker contender's do).
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moderator.app import App
from moderator.bench.inputs import EventSource, ImageServer
from moderator.bench.measure import percentiles
from moderator.bench.options import BenchError, BenchOptions
from moderator.bench.worker_run import KafkaTransport, latency_phase
from moderator.serve.keys import key_line, new_key


class _Clients:
    """``n`` closed-loop HTTP clients of ``POST /v1/moderate``; each answer's status and seconds."""

    def __init__(self, url: str, key: str, bodies: Sequence[str], n: int, tag: str) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.host, self.port, self.key, self.bodies, self.n, self.tag = host, int(port), key, bodies, n, tag
        self.answers: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, index: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        i = 0
        try:
            while not self._stop.is_set():
                eid = f"http-{self.tag}-{index}-{i}"
                body = self.bodies[(index + i * self.n) % len(self.bodies)].replace("@ID@", eid)
                t0 = time.monotonic()
                conn.request("POST", "/v1/moderate", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                with self._lock:
                    self.answers.append((response.status, time.monotonic() - t0))
                i += 1
        finally:
            conn.close()

    def run_for(self, seconds: float) -> None:
        self.start()
        time.sleep(seconds)
        self.stop()

    def start(self) -> None:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self.seconds = time.monotonic() - self.t0

    def report(self) -> dict[str, Any]:
        ok = [s for status, s in self.answers if status == 200]
        statuses: dict[str, int] = {}
        for status, _ in self.answers:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        if not ok:
            raise BenchError(f"no HTTP request was decided (statuses: {statuses})")
        return {"clients": self.n, "requests": len(self.answers), "statuses": statuses,
                "decided_per_s": round(len(ok) / self.seconds, 2), **percentiles(ok)}  # fmt: skip


def run_http_contender(
    opts: BenchOptions, app: App, distinct: Sequence[bytes], server: ImageServer | None, notes: list[str]
) -> dict[str, Any]:
    if opts.feed != "kafka":
        raise BenchError("the http contender publishes every decision to Kafka: --feed kafka")
    key = new_key()
    keys_dir = Path(tempfile.mkdtemp(prefix="moderator-bench-keys-"))
    keys = keys_dir / "keys.txt"
    keys.write_text(key_line("bench", key, "100000/s") + "\n")
    settings = app.settings.model_copy(update={
        "serve_keys_file": keys, "serve_host": "127.0.0.1", "serve_port": 0, "serve_burst": 100_000,
        "serve_timeout_s": 30.0, "kafka_group_id": f"moderator-bench-http-{uuid.uuid4().hex[:8]}",
    })  # fmt: skip
    served = App(settings, engine=app.engine)
    worker = served.worker()
    endpoint = served.endpoint(worker)
    transport = KafkaTransport(served)
    events = EventSource(distinct, opts.source, server)
    run_id = uuid.uuid4().hex[:8]
    bodies = [json.dumps({"id": "@ID@", "image": {"data": base64.b64encode(d).decode()}}) for d in distinct]
    served.policies.start()
    thread = threading.Thread(target=lambda: worker.run(install_signals=False), name="bench-worker", daemon=True)
    thread.start()
    try:
        endpoint.start()
        if not worker.assigned.wait(120):
            raise BenchError("the worker got no partitions within 120 s (is the broker healthy?)")
        # 1. the stream alone: a backlog
        backlog = {f"bench-{run_id}-hb{i}": i for i in range(opts.images)}
        for eid, i in backlog.items():
            transport.send(eid, events.event(eid, i))
        transport.flush()
        decided: list[float] = []
        t0 = time.monotonic()
        transport.collect(set(backlog), 120.0 + 2 * opts.images, lambda eid, t: decided.append(t), thread.is_alive)
        first = min(opts.batch, len(decided) - 1)
        times = sorted(decided)
        capacity = (len(times) - 1 - first) / (times[-1] - times[first]) if times[-1] > times[first] else (
            len(times) / (times[-1] - t0))  # fmt: skip
        # 2. HTTP alone
        alone = _Clients(endpoint.url, key, bodies, opts.http_clients, f"{run_id}-a")
        alone.run_for(opts.load_seconds)
        # 3. mixed: the stream at stream_pct % of its capacity, and the HTTP clients
        mixed = _Clients(endpoint.url, key, bodies, opts.http_clients, f"{run_id}-m")
        mixed.start()
        try:
            stream = latency_phase(transport, events, capacity * opts.http_stream_pct / 100, opts.load_seconds,
                                   f"{run_id}-hm", thread.is_alive)  # fmt: skip
        finally:
            mixed.stop()
    finally:
        endpoint.stop()
        worker.stop("benchmark done")
        thread.join(60)
        transport.close()
        served.policies.stop()
        served.close()
        shutil.rmtree(keys_dir, ignore_errors=True)
    notes.append(
        f"http: {opts.http_clients} closed-loop clients of POST /v1/moderate (inline images) in this process, on"
        " the worker's cores; every sync decision is published (decisions, embeddings, review) before it is answered"
    )
    return {
        "stream_alone_images_per_s": round(capacity, 2),
        "http_alone": alone.report(),
        "mixed": {"stream_pct": opts.http_stream_pct, "stream": stream, "http": mixed.report()},
    }
