"""The stream worker on the real Kafka and Redis, as `moderator run` processes."""

from __future__ import annotations

import base64
import collections
import http.server
import io
import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from moderator.clip import ClipEngine
from moderator.embedding_cache import TextEmbeddingCache, TextEncoder
from moderator.images import ImageLimits, load_image
from moderator.policy import compile_policy, load_spec
from moderator.samples import jpeg_bytes, photo_like

from .harness import Outputs, WorkerProcess, inline_event, produce

pytestmark = pytest.mark.every_broker  # `make test` runs these on Kafka 0.9 and on Tansu

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def policy_dir(tmp_path):
    d = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", d)
    return d


@pytest.fixture
def worker_settings(settings_factory, tiny_clip_dir, policy_dir):
    def make(partitions: int = 4, **overrides):
        return settings_factory(
            topics=True, partitions=partitions, model_id=str(tiny_clip_dir), device="cpu", policy_dir=policy_dir,
            max_batch_size=16, max_delay_ms=10, commit_interval_ms=200,
            **overrides,
        )  # fmt: skip

    return make


def images(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    sizes = [(64, 48), (48, 64), (80, 60), (32, 32)]
    return [(f"ev-{seed}-{i:05d}", jpeg_bytes(photo_like(*sizes[i % 4], seed=seed * 100_000 + i))) for i in range(n)]


def test_an_event_without_a_policy_is_decided_out_of_the_box(settings_factory, tiny_clip_dir, tmp_path):
    """The shipped pack and no MODERATOR_*POLICY* setting: the pack's default decides it."""
    settings = settings_factory(topics=True, partitions=1, model_id=str(tiny_clip_dir), device="cpu",
                                policy_dir=ROOT / "policies")  # fmt: skip
    assert settings.default_policy is None
    worker = WorkerProcess(settings, tmp_path / "w.log")
    out = Outputs(settings)
    try:
        worker.wait_for("partitions_assigned")
        data = base64.b64encode(jpeg_bytes(photo_like(64, 48, seed=9))).decode()
        produce(settings, [("x", json.dumps({"id": "x", "image": {"data": data}}).encode())])
        out.wait_for({"x"})
        assert out.records["dead"] == []
        [decision] = out.records["decisions"]
        assert decision["event_id"] == "x" and decision["policy"]["name"] == "community-standards"
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()


def test_two_workers_thousand_events_exactly_one_record_each(worker_settings, tmp_path, tiny_clip_dir, policy_dir):
    settings = worker_settings(partitions=4)
    items = images(1000)
    workers = [WorkerProcess(settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        for w in workers:
            w.wait_for("partitions_assigned")
        produce(settings, [(eid, inline_event(eid, data)) for eid, data in items])
        out = Outputs(settings)
        out.wait_for({eid for eid, _ in items}, timeout=240)
        counts = collections.Counter(out.ids("decisions") + out.ids("dead"))
        assert not out.records["dead"], out.records["dead"][:2]
        assert all(c == 1 for c in counts.values()), [e for e, c in counts.items() if c > 1][:5]
        assert len(counts) == 1000
        by_worker = [w.count("worker_started") for w in workers]
        assert by_worker == [1, 1]
        # Decisions agree with `moderator classify --policy` on the same images (same engine, same policy).
        engine = ClipEngine.load(str(tiny_clip_dir), device="cpu")
        encoder = TextEncoder(engine, TextEmbeddingCache(engine.fingerprint, engine.embed_dim))
        policy = compile_policy(load_spec(policy_dir / "community-standards.yaml"), encoder)

        batch = np.stack([load_image(data, ImageLimits(), engine.spec) for _, data in items])
        expected = policy.decisions(engine.encode_images(batch))
        got = {r["event_id"]: r for r in out.records["decisions"]}
        for (eid, _), want in zip(items, expected, strict=True):
            d = got[eid]
            assert d["decision"] == want.decision and d["policy"] == want.policy.model_dump()
            assert d["model"] == engine.fingerprint
            assert max(abs(d["scores"][k] - v) for k, v in want.scores.items()) < 1e-5
        out.close()
    finally:
        for w in workers:
            w.signal(signal.SIGTERM)
        for w in workers:
            assert w.wait(60) == 0, w.tail()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_worker_killed_mid_stream_loses_nothing(worker_settings, tmp_path, sig):
    max_in_flight = 40
    settings = worker_settings(partitions=4, max_in_flight=max_in_flight)
    items = images(600, seed=1)
    produce(settings, [(eid, inline_event(eid, data)) for eid, data in items])
    out = Outputs(settings, kinds=("decisions", "review", "dead_letters", "embeddings"))
    first = WorkerProcess(settings, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        while len(out.decided()) < 200 and time.monotonic() < deadline:
            out.poll()
        assert len(out.decided()) >= 200, first.tail()
        first.signal(sig)
        code = first.wait(60)
        assert code == (0 if sig == signal.SIGTERM else -9), first.tail()
    finally:
        first.kill()
    second = WorkerProcess(settings, tmp_path / "second.log")
    try:
        out.wait_for({eid for eid, _ in items}, timeout=180)
        counts = collections.Counter(out.ids("decisions") + out.ids("dead"))
        duplicates = sum(c - 1 for c in counts.values())
        assert len(counts) == 600  # zero event ids without a record
        if sig == signal.SIGTERM:
            assert duplicates == 0
        else:
            assert duplicates <= max_in_flight, duplicates
        # The embeddings log is covered too: every decided event has its embedding (duplicates share
        # the key, so the compacted log holds one per event), and no embedding lacks a decision.
        time.sleep(1)
        out.poll()
        assert set(out.ids("embeddings")) == set(out.ids("decisions"))
    finally:
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, second.tail()
        out.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _serve(image: bytes) -> tuple[_Server, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/ok.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)
            elif self.path == "/to-private":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
            elif self.path == "/trickle.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                try:
                    for i in range(len(image)):
                        self.wfile.write(image[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("schedule", ["pipelined", "before_forward", "overlap"])  # CPU (auto), CPU, GPU
def test_bad_inputs_each_give_one_dead_letter_and_the_worker_lives(worker_settings, tmp_path, schedule):
    settings = worker_settings(
        partitions=2, image_max_bytes=300_000, fetch_timeout_s=1.5, fetch_allow_networks=("127.0.0.0/8",),
        decode_schedule=schedule,
    )  # fmt: skip
    good = jpeg_bytes(photo_like(64, 48, seed=3))
    server, base = _serve(good)
    buf = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buf, "PNG")
    bomb = buf.getvalue()
    big = jpeg_bytes(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8), quality=95)
    assert len(big) > 300_000
    cases = {
        "bad-json": (b"{nope", "invalid_json"),
        "missing-id": (b'{"image": {"url": "https://example.com/a.jpg"}}', "invalid_envelope"),
        "bad-base64": (b'{"id": "bad-base64", "image": {"data": "!!!not base64!!!"}}', "invalid_base64"),
        "truncated": (inline_event("truncated", good[: len(good) // 2]), "truncated_image"),
        "text-file": (inline_event("text-file", b"just some notes\n" * 20), "not_an_image"),
        "oversized": (inline_event("oversized", big), "message_too_large"),
        "bomb": (inline_event("bomb", bomb), "image_too_large"),
        "private-url": (b'{"id": "private-url", "image": {"url": "http://10.1.2.3/a.jpg"}}', "url_blocked"),
        "redirect": (f'{{"id": "redirect", "image": {{"url": "{base}/to-private"}}}}'.encode(), "url_blocked"),
        "trickle": (f'{{"id": "trickle", "image": {{"url": "{base}/trickle.jpg"}}}}'.encode(), "fetch_timeout"),
        "unknown-policy": (inline_event("unknown-policy", good, policy="no-such-policy"), "unknown_policy"),
        "good-url": (f'{{"id": "good-url", "image": {{"url": "{base}/ok.jpg"}}}}'.encode(), None),
        "good-inline": (inline_event("good-inline", good), None),
    }
    worker = WorkerProcess(settings, tmp_path / "w.log")
    try:
        worker.wait_for("partitions_assigned")
        pid = worker.proc.pid
        produce(settings, [(k, v) for k, (v, _) in cases.items()])
        out = Outputs(settings)
        out.wait_for(set(cases), timeout=60)  # an envelope without an id: its dead letter has the key
        time.sleep(1)
        out.poll()
        dead = collections.defaultdict(list)
        for r in out.records["dead"]:
            dead[r["event_id"]].append(r)
        for eid, (value, reason) in cases.items():
            if reason is None:
                assert eid in out.ids("decisions") and eid not in dead
            else:
                assert [r["reason"] for r in dead[eid]] == [reason], (eid, dead[eid])
                r = dead[eid][0]
                assert r["source"]["topic"] == settings.topic_images and r["original_bytes"] == len(value)
        assert len(out.records["dead"]) == len([c for c in cases.values() if c[1]])
        assert worker.proc.poll() is None and worker.proc.pid == pid  # never restarted, still running
        out.close()
    finally:
        server.shutdown()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()


def test_policy_edit_and_redis_outage_mid_run(worker_settings, tmp_path, policy_dir):
    from moderator.stack import LocalStack

    own_redis = LocalStack(tmp_path / "redis")
    info = own_redis.start(kafka=False, redis=True)
    settings = worker_settings(partitions=2, redis_url=info.redis_url, redis_enabled=True)
    path = policy_dir / "community-standards.yaml"
    original = load_spec(path).version()
    worker = WorkerProcess(settings, tmp_path / "w.log")
    out = Outputs(settings)
    try:
        worker.wait_for("partitions_assigned")
        first = images(50, seed=2)
        produce(settings, [(e, inline_event(e, d)) for e, d in first])
        out.wait_for({e for e, _ in first})
        own_redis.stop()  # Redis goes away mid-run
        # An invalid edit never shows up; a valid one (a new description: a text never encoded, so the
        # recompile needs the model while Redis is down) goes live.
        raw = yaml.safe_load(path.read_text())
        broken = {**raw, "categories": [{**raw["categories"][0], "flag": 0.1, "review": 0.9}, *raw["categories"][1:]]}
        path.write_text(yaml.safe_dump(broken))
        worker.wait_for("policy_invalid")
        second = images(50, seed=3)
        produce(settings, [(e, inline_event(e, d)) for e, d in second])
        out.wait_for({e for e, _ in second})
        raw["categories"][0]["descriptions"].append("an explicit photo never seen before")
        path.write_text(yaml.safe_dump(raw))
        new_version = load_spec(path).version()
        deadline = time.monotonic() + 60
        while not any(e.get("event") == "policy_loaded" and e.get("version") == new_version for e in worker.events()):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.1)
        third = images(50, seed=4)
        produce(settings, [(e, inline_event(e, d)) for e, d in third])
        out.wait_for({e for e, _ in third})
        versions = {r["event_id"]: r["policy"]["version"] for r in out.records["decisions"]}
        assert {versions[e] for e, _ in first + second} == {original}
        assert {versions[e] for e, _ in third} == {new_version}
        assert not out.records["dead"]
        assert worker.count("redis_unavailable") == 1
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()
        own_redis.stop()


def test_slow_batches_cause_no_rebalance(settings_factory, b32_clip_dir, policy_dir, tmp_path):
    """Batches of 192 on the full-size B/32 architecture (~4 s here) take longer than the poll interval."""
    settings = settings_factory(
        topics=True, partitions=2, model_id=str(b32_clip_dir), device="cpu", policy_dir=policy_dir,
        max_batch_size=192, max_delay_ms=3000,
        kafka_max_poll_interval_ms=2500, kafka_session_timeout_ms=2500, kafka_heartbeat_interval_ms=500,
    )  # fmt: skip
    items = images(256, seed=5)
    worker = WorkerProcess(settings, tmp_path / "w.log")
    out = Outputs(settings)
    try:
        worker.wait_for("partitions_assigned", timeout=180)
        produce(settings, [(e, inline_event(e, d)) for e, d in items])
        out.wait_for({e for e, _ in items}, timeout=180)
        batches = [e for e in worker.events() if e.get("event") == "batch_done"]
        assert batches and max(b["model_ms"] for b in batches) > 2500, batches
        assert worker.count("partitions_assigned") == 1
        assert worker.count("partitions_revoked") == 0 and worker.count("partitions_lost") == 0
        counts = collections.Counter(out.ids("decisions"))
        assert len(counts) == 256 and set(counts.values()) == {1}
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()


def test_readiness_and_metrics(worker_settings, tmp_path):
    import json
    import urllib.request

    from moderator.stack import free_port

    port = free_port()
    settings = worker_settings(partitions=1, http_port=port)
    worker = WorkerProcess(settings, tmp_path / "w.log")
    try:
        worker.wait_for("partitions_assigned")
        time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ready"
        produce(settings, [("m1", inline_event("m1", jpeg_bytes(photo_like(40, 30))))])
        out = Outputs(settings)
        out.wait_for({"m1"})
        out.close()
        time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for metric in ("moderator_events_total 1.0", "moderator_decisions_total", "moderator_batch_size_bucket",
                       "moderator_in_flight_events 0.0"):  # fmt: skip
            assert metric in text, metric
        counts = {m.group(1): float(m.group(2))
                  for m in re.finditer(r'moderator_stage_seconds_count\{stage="(\w+)"\} (\S+)', text)}  # fmt: skip
        assert counts["decode"] == counts["preprocess"] == 1.0, counts  # per image
        for stage in ("transfer", "forward", "score", "publish", "produce"):  # per batch / per record
            assert counts.get(stage, 0) >= 1, (stage, counts)
        assert "fetch" not in counts, counts  # inline image: nothing fetched
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()
