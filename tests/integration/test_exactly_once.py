"""The exactly-once mode on a broker with transactions (Tansu 0.6), as `moderator run` processes:
a worker SIGKILLed five times during 5,000 events beside a steady one (a rebalance each time), read
back with isolation.level=read_committed.

Tansu 0.6 does not hide the records of an aborted transaction from read_committed readers (its
Fetch leaves aborted_transactions empty: see test_stack_cli's test of it), and a producer that
re-registers a transactional id does not abort what the killed one left open. Apache Kafka does
both. So each record here carries the transaction that wrote it (the ``moderator-transaction``
header), every worker logs each transaction it committed, and the test asserts what exactly-once
means for committed transactions: every event id once, and any other copy only in a transaction
a killed worker left open (at most one per kill) — the records Kafka's read_committed hides.
"""

from __future__ import annotations

import collections
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from moderator.clients import make_reader
from moderator.config import Settings
from moderator.samples import jpeg_bytes, photo_like
from moderator.worker.transactions import TRANSACTION_HEADER

from .harness import WorkerProcess, inline_event, produce

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 5_000
KILLS = 5


@pytest.fixture
def tansu_settings(settings_factory, tiny_clip_dir, tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)

    def make(**overrides: Any) -> Settings:
        return settings_factory(
            kafka="tansu", topics=True, partitions=4, model_id=str(tiny_clip_dir), device="cpu",
            policy_dir=policies, max_batch_size=32, max_delay_ms=10, commit_interval_ms=200,
            kafka_session_timeout_ms=6_000, kafka_heartbeat_interval_ms=1_000, banks_enabled=False,
            **overrides,
        )  # fmt: skip

    return make


class Committed:
    """The decisions, review and dead-letter topics as a read_committed reader sees them, with each
    record's event id and transaction."""

    KINDS = ("decisions", "review", "dead_letters")

    def __init__(self, settings: Settings) -> None:
        self.names = {settings.topic(k): k for k in self.KINDS}
        self.reader = make_reader(settings, list(self.names), isolation_level="read_committed")
        self.records: dict[str, list[tuple[str, str | None]]] = {k: [] for k in self.KINDS}

    def poll(self) -> None:
        for tp, recs in self.reader.poll(timeout_ms=200).items():
            for r in recs:
                txn = dict(r.headers or []).get(TRANSACTION_HEADER)
                event_id = json.loads(r.value)["event_id"]
                self.records[self.names[tp.topic]].append((event_id, txn.decode() if txn else None))

    def ids(self) -> set[str]:
        return {e for k in ("decisions", "dead_letters") for e, _ in self.records[k]}

    def close(self) -> None:
        self.reader.close()


def _events(n: int) -> list[tuple[str, bytes]]:
    images = [jpeg_bytes(photo_like(48 + 8 * (i % 3), 40, seed=i)) for i in range(16)]
    out = []
    for i in range(n):
        event_id = f"eos-{i:05d}"
        # one in fifty is bad data: its dead letter is an output like any other
        value = b'{"id": "' + event_id.encode() + b'", "image": {"data": "!!"}}' if i % 50 == 7 else None
        out.append((event_id, value or inline_event(event_id, images[i % len(images)])))
    return out


def _run_with_kills(
    settings: Settings, tmp_path: Path, kills: int, **steady_overrides: Any
) -> tuple[Committed, list[WorkerProcess]]:
    """Produce the events; run a steady worker beside one that is SIGKILLed each time another
    1/(kills+1) of the events are decided, and restarted (every kill and restart a rebalance: the
    steady one's revocations commit under its transaction lock); at the end both stop with SIGTERM."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    items = _events(EVENTS)
    produce(settings, items)
    wanted = {e for e, _ in items}
    out = Committed(settings)
    steady = WorkerProcess(settings, tmp_path / "steady.log", **steady_overrides)
    workers: list[WorkerProcess] = [steady]
    try:
        for k in range(kills + 1):
            worker = WorkerProcess(settings, tmp_path / f"worker-{k}.log")
            workers.append(worker)
            target = EVENTS * (k + 1) // (kills + 1) if k < kills else EVENTS
            deadline = time.monotonic() + 240
            while len(out.ids()) < target and time.monotonic() < deadline:
                out.poll()
                assert worker.proc.poll() is None, worker.tail()
                assert steady.proc.poll() is None, steady.tail()
            assert len(out.ids()) >= target, f"{len(out.ids())} of {target} decided\n{worker.tail()}"
            if k < kills:
                worker.signal(signal.SIGKILL)
                assert worker.wait(30) == -9
        assert out.ids() == wanted  # nothing missing
        for w in (worker, steady):
            w.wait_for("worker_started")  # its SIGTERM handler is in place (it may have had nothing to do)
            w.signal(signal.SIGTERM)
        for w in (worker, steady):
            assert w.wait(60) == 0, w.tail()
        time.sleep(1)  # anything still on its way
        out.poll()
        return out, workers
    except BaseException:
        out.close()
        raise
    finally:
        for w in workers:
            w.kill()


def _committed_transactions(workers: list[WorkerProcess]) -> set[str]:
    return {e["transaction"] for w in workers for e in w.events() if e.get("event") == "transaction_committed"}


def test_exactly_once_through_five_sigkills_and_at_least_once_counted(tansu_settings, tmp_path):
    # exactly-once
    settings = tansu_settings(processing_guarantee="exactly-once", transactional_id="eos-worker-0",
                              transaction_interval_ms=100)  # fmt: skip
    out, workers = _run_with_kills(settings, tmp_path / "eos", KILLS, transactional_id="eos-worker-steady")
    try:
        committed = _committed_transactions(workers)
        report = []
        for kind in Committed.KINDS:
            records = out.records[kind]
            assert all(txn is not None for _, txn in records), f"{kind}: a record written outside a transaction"
            once = collections.Counter(e for e, txn in records if txn in committed)
            assert max(once.values()) == 1, f"{kind}: an event id twice among committed transactions"
            # the rest: at most one transaction per SIGKILL, the one it interrupted
            left_open = {txn for _, txn in records if txn not in committed}
            assert len(left_open) <= KILLS, left_open
            seen = collections.Counter(e for e, _ in records)
            report.append(f"{kind} {len(once)} once, {sum(seen.values()) - len(seen)} more in {len(left_open)} open")
        ids = collections.Counter(e for kind in ("decisions", "dead_letters") for e, _ in out.records[kind])
        assert set(ids) == {f"eos-{i:05d}" for i in range(EVENTS)}  # 0 missing
        revocations = sum(w.count("partitions_revoked") for w in workers)
        print(f"\nexactly-once, {KILLS} SIGKILLs in {EVENTS} events, {revocations} revocations: {'; '.join(report)}")
    finally:
        out.close()

    # at-least-once, the same run shape: its duplicates, counted
    plain = tansu_settings(max_in_flight=256)
    out, _ = _run_with_kills(plain, tmp_path / "alo", KILLS)
    try:
        ids = collections.Counter(e for kind in ("decisions", "dead_letters") for e, _ in out.records[kind])
        print(f"at-least-once, {KILLS} SIGKILLs: {sum(ids.values()) - len(ids)} duplicate decisions/dead letters")
        assert len(ids) == EVENTS
    finally:
        out.close()


def test_outputs_carry_the_event_id_policy_model_and_the_trace_as_headers(tansu_settings, tmp_path):
    """Exactly-once, stopped with SIGTERM: every output once, each with its headers; an input's W3C
    traceparent goes on in its outputs (same trace, the worker's span), an event without one starts one."""
    from kafka import KafkaProducer

    settings = tansu_settings(processing_guarantee="exactly-once", transactional_id="eos-headers")
    image = jpeg_bytes(photo_like(64, 48, seed=3))
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers.split(","))
    for i in range(30):
        headers = [("traceparent", f"00-{trace}-00f067aa0ba902b7-01".encode())] if i % 2 == 0 else None
        producer.send(settings.topic("images"), key=f"h-{i}".encode(), value=inline_event(f"h-{i}", image),
                      headers=headers)  # fmt: skip
    producer.send(settings.topic("images"), key=b"h-bad", value=b"not json", headers=[("traceparent", b"garbage")])
    producer.flush()
    producer.close()
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    reader = make_reader(settings, [settings.topic(k) for k in ("decisions", "review", "dead_letters")],
                         isolation_level="read_committed")  # fmt: skip
    seen: dict[str, list[tuple[str, dict[str, bytes]]]] = collections.defaultdict(list)
    try:
        deadline = time.monotonic() + 120
        while len({k for k, recs in seen.items() if any(t != settings.topic("review") for t, _ in recs)}) < 31:
            assert time.monotonic() < deadline, worker.tail()
            for tp, recs in reader.poll(timeout_ms=200).items():
                for r in recs:
                    seen[r.key.decode()].append((tp.topic, dict(r.headers)))
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()
        for _ in range(5):
            for tp, recs in reader.poll(timeout_ms=200).items():
                for r in recs:
                    seen[r.key.decode()].append((tp.topic, dict(r.headers)))
    finally:
        worker.kill()
        reader.close()
    model = next(e["model"] for e in worker.events() if e.get("event") == "worker_started").encode()
    for key, records in seen.items():
        topics = [t for t, _ in records]
        assert len(topics) == len(set(topics)), f"{key}: an output twice ({topics})"
        parents = {h["traceparent"] for _, h in records}
        assert len(parents) == 1, f"{key}: its outputs are one span of one trace"
        version, trace_id, span, flags = parents.pop().decode().split("-")
        for topic, h in records:
            assert h["moderator-event-id"] == key.encode()
            assert h["moderator-transaction"].startswith(b"eos-headers/")
            if topic == settings.topic("dead_letters"):
                assert "moderator-policy" not in h
            else:
                assert (
                    h["moderator-policy"].startswith(b"community-standards@sha256:") and h["moderator-model"] == model
                )
        if key == "h-bad" or int(key.split("-")[1]) % 2:
            assert trace_id != trace and flags == "00"  # a new trace (the input had none, or a bad one)
        else:
            assert (version, trace_id, flags) == ("00", trace, "01") and span != "00f067aa0ba902b7"
