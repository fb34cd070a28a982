"""The worker contender: the real :class:`~moderator.worker.Worker`, fed by Kafka or by an in-process queue."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from moderator.app import App
from moderator.banks.store import Banks, FixedBanks
from moderator.bench.inputs import EventSource, ImageServer
from moderator.bench.measure import ENGINE_THREAD_STAGES, percentiles, stage_breakdown, stage_totals
from moderator.bench.options import BenchError, BenchOptions
from moderator.config import Settings
from moderator.worker import Worker
from moderator.worker.feed import Output, QueueFeed


class _Transport:
    """How the benchmark puts events in and sees the worker's records come out."""

    name = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def send(self, event_id: str, value: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def fresh(self) -> list[Output]:
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
        decisions, dead_letters = self.settings.topic("decisions"), self.settings.topic("dead_letters")
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline and alive():
            for out in self.fresh():
                eid = (out.key or b"").decode()
                if eid not in left or out.topic not in (decisions, dead_letters):
                    continue
                left.discard(eid)
                if out.topic == dead_letters:
                    dead[eid] = json.loads(out.value).get("reason", "?")
                else:
                    on_decision(eid, out.at)
        if dead:
            first = next(iter(dead.items()))
            raise BenchError(f"{len(dead)} benchmark events were dead-lettered (e.g. {first[0]}: {first[1]})")
        if left:
            why = "the worker stopped (see its log above)" if not alive() else f"none within {timeout:.0f} s"
            raise BenchError(f"{len(left)} of {len(ids)} benchmark events got no decision: {why}")


class KafkaTransport(_Transport):
    name = "kafka"

    def __init__(self, app: App) -> None:
        super().__init__(app.settings)
        self.producer = app.producer()
        self.consumer = app.reader(["decisions", "dead_letters"])
        self.images = app.settings.topic("images")

    def send(self, event_id: str, value: bytes) -> None:
        self.producer.send(self.images, key=event_id.encode(), value=value)

    def flush(self) -> None:
        self.producer.flush()

    def fresh(self) -> list[Output]:
        batches = self.consumer.poll(timeout_ms=100)
        now = time.monotonic()
        return [Output(tp.topic, r.key, r.value or b"", now) for tp, records in batches.items() for r in records]

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

    def fresh(self) -> list[Output]:
        out = self.feed.outputs_since(self._seen, 0.1)
        self._seen += len(out)
        return out


def run_worker(
    worker: Worker,
    events: EventSource,
    transport: _Transport,
    n_events: int,
    load_levels: Sequence[int],
    load_seconds: float,
) -> dict[str, Any]:
    """Throughput from a backlog of ``n_events``, then latency at each offered load level."""
    run_id = uuid.uuid4().hex[:8]
    backlog = {f"bench-{run_id}-b{i}": i for i in range(n_events)}
    for eid, i in backlog.items():  # a backlog, as when a worker catches up a lag
        transport.send(eid, events.event(eid, i))
    transport.flush()
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
        first = worker.settings.max_batch_size
        steady = n_events > 2 * first and times[-1] > times[first - 1]
        throughput = (n_events - first) / (times[-1] - times[first - 1]) if steady else n_events / wall
        stages = stage_breakdown(before, after, n_events)
        model_share = sum(stages.get(s, {}).get("seconds", 0.0) for s in ENGINE_THREAD_STAGES) / wall
        loads = []
        for pct in load_levels:
            rate = throughput * pct / 100
            phase = latency_phase(transport, events, rate, load_seconds, f"{run_id}-{pct}", thread.is_alive)
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


def latency_phase(
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


def run_worker_contender(
    opts: BenchOptions,
    app: App,
    distinct: Sequence[bytes],
    server: ImageServer | None,
    notes: list[str],
    banks: Banks | None = None,
) -> dict[str, Any]:
    """The worker on a backlog of events, then at the load levels. ``banks``: a fixed bank index
    (default: the banks topic with a Kafka feed, none with the in-process queue)."""
    settings = app.settings
    events = EventSource(distinct, opts.source, server)
    transport: _Transport
    if opts.feed == "kafka":
        transport = KafkaTransport(app)
        worker = app.worker(banks=banks)
    else:
        feed = QueueFeed(settings.topic("images"), max_poll_records=min(500, settings.max_in_flight))
        transport = _QueueTransport(settings, feed)
        worker = app.worker(consumer=feed, producer=feed, banks=banks if banks is not None else FixedBanks())
        notes.append(
            "worker fed from an in-process queue (no Kafka or Redis here): its figures leave out the broker's"
            " network and storage; a decision counts when the worker hands it to the producer"
        )
    app.policies.start()  # the worker's hot reload runs beside it, as in `moderator run`
    try:
        out = run_worker(worker, events, transport, opts.images, opts.load_levels, opts.load_seconds)
    finally:
        app.policies.stop()
        app.close()  # the banks topic's reader, if this run opened it
    if opts.feed == "kafka":
        out["broker_api_version"] = settings.kafka_api_version or "probed"
        out["partitions"] = opts.partitions
    return out
