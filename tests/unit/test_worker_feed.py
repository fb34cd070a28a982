"""The whole worker (real engine on the tiny checkpoint, real policies, real checkpoint) fed by the
in-process feed: what it publishes, what it commits, how it re-sends and when it gives up."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from moderator.app import App
from moderator.banks.store import FixedBanks
from moderator.config import Settings
from moderator.events import decode_vectors
from moderator.images import ImageLimits, load_image
from moderator.policy import PolicyError, audit_draw, parse_spec
from moderator.samples import jpeg_bytes, photo_like
from moderator.worker import EXIT_OK, EXIT_PUBLISH_FAILED
from moderator.worker.feed import QueueFeed

ROOT = Path(__file__).resolve().parents[2]


def _event(event_id: str, seed: int, **extra: object) -> bytes:
    data = base64.b64encode(jpeg_bytes(photo_like(40, 30, seed=seed))).decode()
    return json.dumps({"id": event_id, "image": {"data": data}, **extra}).encode()


def _settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"policy_dir": ROOT / "policies", "redis_enabled": False, "max_batch_size": 8,
                                 "max_delay_ms": 5, "commit_interval_ms": 50, "shutdown_timeout_s": 10,
                                 "banks_enabled": False}  # fmt: skip
    values.update(overrides)
    return Settings(**values)


def _run(app: App, feed: QueueFeed, want: int) -> int:
    """Run the worker until ``want`` records of decisions or dead letters came out; its exit code."""
    worker = app.worker(consumer=feed, producer=feed)
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(worker.run(install_signals=False)))
    thread.start()
    done = {app.settings.topic("decisions"), app.settings.topic("dead_letters")}
    seen = 0
    while seen < want and thread.is_alive():
        seen = sum(1 for o in feed.outputs_since(0, 0.2) if o.topic in done)
    worker.stop("test done")
    thread.join(30)
    assert not thread.is_alive()
    return code[0]


def test_every_event_is_decided_or_dead_lettered_and_committed(tiny_engine):
    app = App(_settings(), engine=tiny_engine)
    feed = QueueFeed(app.settings.topic("images"))
    feed.put(b"a", _event("a", 1))  # no policy field: the pack's default decides it
    feed.put(b"b", _event("b", 2, policy="kids-platform"))
    feed.put(b"c", _event("c", 3, policy="no-such-policy"))
    feed.put(b"d", b"{not json")
    assert _run(app, feed, 4) == EXIT_OK
    by_topic: dict[str, dict[str, dict]] = {}
    for o in feed.outputs:
        by_topic.setdefault(o.topic, {})[o.key.decode()] = json.loads(o.value)
    decisions, dead = by_topic["decisions"], by_topic["dead-letters"]
    assert decisions["a"]["policy"]["name"] == "community-standards"
    assert decisions["b"]["policy"]["name"] == "kids-platform"
    assert decisions["a"]["model"] == tiny_engine.fingerprint
    assert dead["c"]["reason"] == "unknown_policy" and dead["d"]["reason"] == "invalid_json"
    assert feed.committed == {feed.tp: 4}  # everything done, everything committed


def test_refused_records_are_re_sent_and_the_event_is_committed_once_acknowledged(tiny_engine):
    app = App(_settings(publish_retries=3), engine=tiny_engine)
    feed = QueueFeed(app.settings.topic("images"))
    feed.put(b"a", _event("a", 1))
    feed.refuse(2)  # the broker refuses the first two sends: the decision and the embedding
    assert _run(app, feed, 1) == EXIT_OK
    assert feed.sends == 4 and {(o.topic, o.key) for o in feed.outputs} == {("decisions", b"a"), ("embeddings", b"a")}
    assert feed.committed == {feed.tp: 1}


def test_a_record_refused_beyond_the_retries_stops_the_worker_uncommitted(tiny_engine):
    app = App(_settings(publish_retries=1), engine=tiny_engine)
    feed = QueueFeed(app.settings.topic("images"))
    feed.put(b"a", _event("a", 1))
    feed.refuse(100)
    worker = app.worker(consumer=feed, producer=feed)
    assert worker.run(install_signals=False) == EXIT_PUBLISH_FAILED  # stops by itself
    assert feed.sends == 4 and feed.outputs == [] and feed.committed == {}  # 2 records, sent twice each


def test_several_policies_and_no_default_are_refused_at_start_naming_the_setting(tmp_path, tiny_engine):
    for name in ("one", "two"):
        text = (ROOT / "policies" / "kids-platform.yaml").read_text().replace("name: kids-platform", f"name: {name}")
        (tmp_path / f"{name}.yaml").write_text(text)
    with pytest.raises(PolicyError, match="MODERATOR_DEFAULT_POLICY"):
        App(_settings(policy_dir=tmp_path), engine=tiny_engine).policies  # noqa: B018
    app = App(_settings(policy_dir=tmp_path, default_policy="two"), engine=tiny_engine)
    assert app.policies.current.default == "two"
    with pytest.raises(PolicyError, match="MODERATOR_DEFAULT_POLICY=three names no loaded policy"):
        App(_settings(policy_dir=tmp_path, default_policy="three"), engine=tiny_engine).policies  # noqa: B018


def _outputs(feed: QueueFeed) -> dict[str, dict[str, dict]]:
    by_topic: dict[str, dict[str, dict]] = {}
    for o in feed.outputs:
        by_topic.setdefault(o.topic, {})[o.key.decode()] = json.loads(o.value)
    return by_topic


def test_the_embedding_record_holds_the_vector_and_the_live_decision(tiny_engine):
    app = App(_settings(), engine=tiny_engine)
    feed = QueueFeed(app.settings.topic("images"))
    feed.put(b"a", _event("a", 7))
    assert _run(app, feed, 1) == EXIT_OK
    out = _outputs(feed)
    record, decision = out["embeddings"]["a"], out["decisions"]["a"]
    assert (record["model"], record["image_precision"], record["dtype"], record["dim"]) == (
        tiny_engine.fingerprint, "float32", "float16", 16)  # fmt: skip
    assert record["live"] == {
        k: decision[k] for k in ("decision", "scores", "triggered", "policy", "model", "image_precision", "frames")
    }
    pixels = load_image(jpeg_bytes(photo_like(40, 30, seed=7)), ImageLimits(), tiny_engine.spec)
    want = tiny_engine.encode_images(pixels[None]).numpy()
    got = decode_vectors([record["vector"]], "float16", 16)
    assert np.abs(got - want).max() <= 2**-11 * np.abs(want).max()  # float16's rounding, nothing more


def test_no_embedding_record_when_the_log_is_off(tiny_engine):
    app = App(_settings(embeddings_enabled=False), engine=tiny_engine)
    feed = QueueFeed(app.settings.topic("images"))
    feed.put(b"a", _event("a", 1))
    assert _run(app, feed, 1) == EXIT_OK
    assert set(_outputs(feed)) == {"decisions"}


def test_a_shadow_policy_decides_beside_the_live_one_and_cannot_be_named(tmp_path, tiny_engine):
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    raw = yaml.safe_load((policies / "kids-platform.yaml").read_text())
    shadow = {**raw, "name": "kids-strict", "shadow_of": "kids-platform",
              "categories": [{**c, "review": 0.0} for c in raw["categories"]]}  # fmt: skip
    (policies / "kids-strict.yaml").write_text(yaml.safe_dump(shadow))
    app = App(_settings(policy_dir=policies), engine=tiny_engine)
    assert set(app.policies.current.policies) == {"community-standards", "kids-platform"}
    feed = QueueFeed(app.settings.topic("images"))
    feed.put(b"k", _event("k", 1, policy="kids-platform"))
    feed.put(b"c", _event("c", 2))  # community-standards: it has no shadow
    feed.put(b"s", _event("s", 3, policy="kids-strict"))  # a shadow is never live
    assert _run(app, feed, 3) == EXIT_OK
    out = _outputs(feed)
    assert set(out["shadow-decisions"]) == {"k"} and out["dead-letters"]["s"]["reason"] == "unknown_policy"
    pair = out["shadow-decisions"]["k"]
    assert pair["shadow"]["policy"]["name"] == "kids-strict" and pair["shadow"]["decision"] != "allow"
    assert pair["live"]["decision"] == out["decisions"]["k"]["decision"]
    assert pair["agree"] == (pair["live"]["decision"] == pair["shadow"]["decision"])
    assert "k" not in out.get("review", {}) or out["decisions"]["k"]["decision"] == "review"  # the shadow feeds none


def test_audit_draws_are_uniform_and_fixed_by_the_event_id():
    from scipy.stats import binom

    draws = [audit_draw(f"event-{i}") for i in range(10_000)]
    sampled = sum(d < 0.05 for d in draws)
    low, high = binom.ppf(0.0005, 10_000, 0.05), binom.ppf(0.9995, 10_000, 0.05)
    assert low <= sampled <= high, (sampled, low, high)  # 99.9% binomial bounds: 450..552
    assert draws == [audit_draw(f"event-{i}") for i in range(10_000)]  # the same id, the same choice


def test_the_worker_samples_allow_decisions_at_the_policy_rate(tmp_path, tiny_engine):
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    raw = yaml.safe_load((policies / "community-standards.yaml").read_text())
    raw["audit"] = {"allow": 0.25, "flag": 0.0}
    (policies / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    app = App(_settings(policy_dir=policies), engine=tiny_engine)
    feed = QueueFeed(app.settings.topic("images"))
    ids = [f"s-{i}" for i in range(200)]
    for i, eid in enumerate(ids):
        feed.put(eid.encode(), _event(eid, i))
    assert _run(app, feed, 200) == EXIT_OK
    out = _outputs(feed)
    allowed = {e for e, d in out["decisions"].items() if d["decision"] == "allow"}
    assert len(allowed) > 150  # random weights: most are allowed
    review = out.get("review", {})
    sampled = {e for e, r in review.items() if r["sampled"]}
    assert sampled == {e for e in allowed if audit_draw(e) < 0.25}  # exactly the rule, per event id
    assert all(review[e]["sample_rate"] == 0.25 and review[e]["decision"] == "allow" for e in sampled)
    assert all(len(review[e]["explanation"]) == 6 for e in sampled)  # they carry why they scored so
    # Every decision and embedding record carries its sampling design (what `moderator calibrate` bounds with).
    embeddings = out["embeddings"]
    for e, d in out["decisions"].items():
        want = 1.0 if d["decision"] == "review" else 0.25 if d["decision"] == "allow" else 0.0
        assert d["review_probability"] == embeddings[e]["review_probability"] == want, e
        assert d["sampled"] == embeddings[e]["sampled"] == (e in sampled)
        assert d["image_sha256"] == embeddings[e]["image"]["sha256"]


def test_the_review_draw_follows_the_policy_s_design():
    from moderator.worker.outputs import review_draw

    spec = parse_spec("name: p\naudit: {allow: 0.3, flag: 0.5}\ndouble_review: 0.2\n"
                      "categories: [{name: c, descriptions: [x], flag: 0.9, review: 0.5}]\n", "p.yaml")  # fmt: skip
    ids = [f"e-{i}" for i in range(4000)]
    review = [review_draw(e, "review", spec, include_flagged=False) for e in ids]
    assert all(d.probability == 1.0 and d.goes and not d.sampled for d in review)
    allow = [review_draw(e, "allow", spec, include_flagged=False) for e in ids]
    assert all(d.probability == 0.3 for d in allow)
    assert [d.sampled for d in allow] == [audit_draw(e) < 0.3 for e in ids]
    # A flag that goes to review anyway (MODERATOR_REVIEW_INCLUDE_FLAGGED) is reviewed whole, not sampled.
    flags = [review_draw(e, "flag", spec, include_flagged=True) for e in ids]
    assert all(d.probability == 1.0 and not d.sampled for d in flags)
    # Double review: a fifth of what goes to review, drawn apart from the audit draw.
    second = [d.second for d in review]
    assert 0.17 < np.mean(second) < 0.23
    assert [d.second for d in allow if d.goes] == [s for s, d in zip(second, allow, strict=True) if d.goes]
    assert not any(d.second for d in allow if not d.goes)
    without = parse_spec("name: p\ncategories: [{name: c, descriptions: [x], flag: 0.9, review: 0.5}]\n", "p.yaml")
    assert review_draw("e", "allow", without, include_flagged=False) == review_draw("e", "flag", without, False)
    assert review_draw("e", "allow", without, include_flagged=False).probability == 0.0


def test_a_bank_match_decides_in_the_worker_and_the_log_keeps_the_hash(tmp_path, tiny_engine):
    """A re-encoded copy of a banked image is flagged by the bank rule (the decision names the bank,
    the entry and the distance); an unrelated image is not; the embeddings log keeps each image's
    PDQ hash and where the image is."""
    from moderator.banks.index import BankIndex, Entry
    from moderator.banks.pdq import from_hex, hash_image

    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    raw = yaml.safe_load((policies / "community-standards.yaml").read_text())
    raw["banks"] = [{"name": "known", "decision": "flag", "category": "known-violation", "severity": "high"}]
    (policies / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    banked = photo_like(320, 240, seed=77)
    entry = Entry("known", "case-1", "a confirmed case", hash_image(banked).variants[0], None, None)
    app = App(_settings(policy_dir=policies), engine=tiny_engine)
    feed = QueueFeed(app.settings.topic("images"))
    for eid, arr in (("copy", banked), ("other", photo_like(320, 240, seed=78))):
        data = base64.b64encode(jpeg_bytes(arr, quality=40)).decode()
        feed.put(eid.encode(), json.dumps({"id": eid, "image": {"data": data}}).encode())
    worker = app.worker(consumer=feed, producer=feed, banks=FixedBanks(BankIndex([entry], tiny_engine.fingerprint)))
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(worker.run(install_signals=False)))
    thread.start()
    while len([o for o in feed.outputs_since(0, 0.2) if o.topic == "decisions"]) < 2 and thread.is_alive():
        pass
    worker.stop("test done")
    thread.join(30)
    out = _outputs(feed)
    copy, other = out["decisions"]["copy"], out["decisions"]["other"]
    assert copy["decision"] == "flag"
    bank = [t for t in copy["triggered"] if t["rule"] == "bank"]
    assert len(bank) == 1 and bank[0]["category"] == "known-violation" and bank[0]["severity"] == "high"
    match = bank[0]["match"]
    assert (match["bank"], match["entry"], match["label"], match["action"]) == ("known", "case-1", "a confirmed case",
                                                                                 "flag")  # fmt: skip
    assert match["pdq_distance"] <= 31 and match["pdq_max"] == 31 and match["variant"] == "original"
    assert not any(t["rule"] == "bank" for t in other["triggered"])
    assert copy["timings"]["pdq_ms"] > 0
    logged = out["embeddings"]["copy"]
    assert logged["pdq_quality"] >= 50
    distance = int(np.bitwise_count(from_hex(logged["pdq"]) ^ entry.pdq).sum())
    assert distance == match["pdq_distance"]
    assert logged["image"]["inline_source"]["offset"] == copy["source"]["offset"]


def test_exactly_once_outputs_and_offsets_land_together_and_a_failed_transaction_is_retried(tiny_engine):
    app = App(_settings(processing_guarantee="exactly-once", transaction_interval_ms=20, publish_retries=3),
              engine=tiny_engine)  # fmt: skip
    feed = QueueFeed(app.settings.topic("images"))
    for i in range(6):
        feed.put(f"e{i}".encode(), _event(f"e{i}", i), headers=[("traceparent", b"00-" + b"ab" * 16 + b"-" + b"cd" * 8
                                                                   + b"-01")] if i == 0 else None)  # fmt: skip
    feed.put(b"bad", b"{not json")
    feed.fail_transactions(2)  # the first two commits fail: aborted, their records held for the next
    assert _run(app, feed, 7) == EXIT_OK
    keys = [(o.topic, o.key) for o in feed.outputs if o.topic in ("decisions", "dead-letters")]
    assert sorted(keys) == sorted([("decisions", f"e{i}".encode()) for i in range(6)] + [("dead-letters", b"bad")])
    assert feed.committed == {feed.tp: 7} and feed.transactions >= 1
    headers = {o.key: dict(o.headers or []) for o in feed.outputs if o.topic == "decisions"}
    assert headers[b"e0"]["traceparent"].startswith(b"00-" + b"ab" * 16 + b"-")  # the input's trace goes on
    assert headers[b"e0"]["moderator-transaction"].startswith(b"moderator-")  # <group>-<host>/<run>-<n>
    assert headers[b"e1"]["moderator-event-id"] == b"e1" and headers[b"e1"]["moderator-model"]


def test_exactly_once_stops_the_worker_when_transactions_keep_failing(tiny_engine):
    app = App(_settings(processing_guarantee="exactly-once", transaction_interval_ms=20, publish_retries=1),
              engine=tiny_engine)  # fmt: skip
    feed = QueueFeed(app.settings.topic("images"))
    feed.put(b"a", _event("a", 1))
    feed.fail_transactions(100)
    worker = app.worker(consumer=feed, producer=feed)
    assert worker.run(install_signals=False) == EXIT_PUBLISH_FAILED
    assert feed.outputs == [] and feed.committed == {}  # nothing published, nothing committed


def _record_schedule(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """What the batch stage does, in order: ("begin", ids) / ("run", ids) per batch, ("decode", (id, thread
    name, idle?)) per decode."""
    from moderator.worker import stages

    log: list[tuple[str, object]] = []
    begin, run, decode = stages.BatchStage.begin, stages.BatchStage.run, stages.ImageStage.decode

    def ids(events: list) -> tuple[str, ...]:
        return tuple(e.parsed.id for e in events)

    def logged_begin(self, events, waited):  # type: ignore[no-untyped-def]
        log.append(("begin", ids(events)))
        return begin(self, events, waited)

    def logged_run(self, batch):  # type: ignore[no-untyped-def]
        log.append(("run", ids(batch.events)))
        return run(self, batch)

    def logged_decode(self, e):  # type: ignore[no-untyped-def]
        idle = os.sched_getscheduler(0) == os.SCHED_IDLE
        log.append(("decode", (e.parsed.id, threading.current_thread().name, idle)))
        return decode(self, e)

    monkeypatch.setattr(stages.BatchStage, "begin", logged_begin)
    monkeypatch.setattr(stages.BatchStage, "run", logged_run)
    monkeypatch.setattr(stages.ImageStage, "decode", logged_decode)
    return log


def _run_recorded(engine, monkeypatch, events: int, **settings):  # type: ignore[no-untyped-def]
    """``events`` events through a pipelined worker, what its batch stage did recorded (see
    :func:`_record_schedule`); the app, its feed, the record."""
    log = _record_schedule(monkeypatch)
    app = App(_settings(decode_schedule="pipelined", **settings), engine=engine)
    feed = QueueFeed(app.settings.topic("images"))
    for i in range(events):
        feed.put(f"e{i}".encode(), _event(f"e{i}", i))
    assert _run(app, feed, events) == EXIT_OK
    return app, feed, log


def test_pipelined_decoding_of_a_backlog_starts_on_idle_threads_before_the_batch_before_runs(tiny_engine, monkeypatch):
    """Beside a tower that runs a batch in one native call (the int8 one; here the tiny torch tower
    claims it: the schedule is what is tested)."""
    monkeypatch.setattr(tiny_engine.tower, "one_call", True)
    app, feed, log = _run_recorded(tiny_engine, monkeypatch, 64, max_delay_ms=500)
    decided = [o.key for o in feed.outputs if o.topic == app.settings.topic("decisions")]
    assert sorted(decided) == sorted(f"e{i}".encode() for i in range(64))  # each once
    assert feed.committed == {feed.tp: 64}
    order = [(kind, what) for kind, what in log if kind != "decode"]
    batches = [what for kind, what in order if kind == "begin"]
    assert [len(b) for b in batches] == [8] * 8  # a backlog: full batches (the batcher waits up to 500 ms)
    # the next batch began (its decoding submitted) before the one before it ran: the first batch's may
    # come before the second batch's events are in, the others' are all there
    ahead = [order.index(("begin", b)) < order.index(("run", a)) for a, b in itertools.pairwise(batches)]
    assert sum(ahead) >= len(ahead) - 1, order
    decodes = [what for kind, what in log if kind == "decode"]
    assert len(decodes) == 64
    assert any(idle and name.startswith("decode-ahead") for _, name, idle in decodes)  # taken ahead, idle priority
    assert all(idle == name.startswith("decode-ahead") for _, name, idle in decodes)  # moved ones: normal priority


def test_beside_a_torch_tower_a_backlog_is_decoded_when_each_batch_runs(tiny_engine, monkeypatch):
    """A tower that dispatches operators from Python (fp32, bf16): no decoding ahead (a decode thread
    holding the GIL while it waits for a core would stall every dispatch)."""
    assert not tiny_engine.tower.one_call
    _, _, log = _run_recorded(tiny_engine, monkeypatch, 32, max_delay_ms=500)
    decodes = [what for kind, what in log if kind == "decode"]
    assert len(decodes) == 32 and not any(idle or name.startswith("decode-ahead") for _, name, idle in decodes)


def test_a_batch_that_is_not_full_is_decoded_when_it_runs_at_normal_priority(tiny_engine, monkeypatch):
    """The stream keeping up (batches smaller than max_batch_size): nothing decodes ahead, nothing at idle
    priority, where it would wait for every other thread of the machine."""
    monkeypatch.setattr(tiny_engine.tower, "one_call", True)
    _, _, log = _run_recorded(tiny_engine, monkeypatch, 3)
    decodes = [what for kind, what in log if kind == "decode"]
    assert len(decodes) == 3 and not any(idle or name.startswith("decode-ahead") for _, name, idle in decodes)
