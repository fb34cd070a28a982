"""The synchronous endpoint's pure parts: admission, rate limits, API keys, the OpenAI mapping, the
batcher's urgent lane, reason codes to statuses."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moderator.batcher import MicroBatcher
from moderator.events import DecisionRecord, InvalidBase64, InvalidEnvelope, PolicyRef, Source, Timings, Trigger
from moderator.serve import openai_api
from moderator.serve.admission import Admission
from moderator.serve.errors import STATUS, status_of
from moderator.serve.keys import Keys, KeysError, bearer, key_line, new_key, parse_rate
from moderator.serve.limits import RateLimiter, TokenBucket

ROOT = Path(__file__).resolve().parents[2]

# --- admission ----------------------------------------------------------------------------------------


def test_admission_is_bounded_and_says_when_to_retry():
    a = Admission(capacity=4)
    assert a.admit(3, now=0.0, deadline=5.0) is None
    refused = a.admit(2, now=0.0, deadline=5.0)
    assert refused is not None and refused.why == "full" and refused.retry_after_s == 1  # no pace measured yet
    assert a.pending == 3
    assert a.admit(1, now=0.0, deadline=5.0) is None
    a.release(4, now=0.1, answered=True)
    assert a.pending == 0 and a.admit(4, now=0.1, deadline=1.0) is None


def test_admission_refuses_what_the_measured_pace_cannot_serve_in_time():
    a = Admission(capacity=1000)
    # 10 images answered per second of busy time: 20 images, one at a time, 0.1 s each.
    t = 0.0
    for _ in range(20):
        assert a.admit(1, t, t + 5) is None
        t += 0.1
        a.release(1, t, answered=True)
    assert a.pace(t) == pytest.approx(10.0)
    assert a.admit(30, t, t + 10) is None  # 30 pending
    refused = a.admit(10, t, t + 2.0)  # 40 images ahead at 10/s: 4 s > 2 s
    assert refused is not None and refused.why == "too_slow" and refused.retry_after_s == 4
    assert a.admit(10, t, t + 5.0) is None  # 4 s fits in 5


def test_a_pace_measured_one_at_a_time_is_scaled_to_a_full_batch():
    a = Admission(capacity=100, batch_size=8)
    t = 0.0
    for _ in range(20):  # one at a time, 0.1 s each: 10 per busy second, with one image pending
        assert a.admit(1, t, t + 5) is None
        t += 0.1
        a.release(1, t, answered=True)
    assert a.pace(t) == pytest.approx(80.0)  # a batch of 8 would have shared each 0.1 s
    assert a.admit(40, t, t + 1.0) is None  # a burst of 40: 0.5 s predicted, within 1 s
    # Saturated: 16 pending all the time, 20 answered per second: the pace is what was measured.
    b = Admission(capacity=100, batch_size=8)
    assert b.admit(16, 0.0, 100.0) is None
    for i in range(1, 41):
        b.release(1, i * 0.05, answered=True)
        assert b.admit(1, i * 0.05, 100.0) is None
    assert b.pace(2.0) == pytest.approx(20.0)


def test_an_idle_hour_does_not_read_as_a_slow_endpoint():
    a = Admission(capacity=100)
    for i in range(10):
        assert a.admit(1, float(i), float(i) + 5) is None
        a.release(1, i + 0.01, answered=True)  # 10 ms each, then idle
    assert a.pace(3600.0) == pytest.approx(100.0)
    assert a.admit(1, 3600.0, 3600.5) is None


def test_timed_out_requests_leave_the_queue_but_not_the_pace():
    a = Admission(capacity=2)
    assert a.admit(2, 0.0, 1.0) is None
    a.release(2, 1.0, answered=False)
    assert a.pending == 0 and a.pace(1.0) is None


@given(st.lists(st.tuples(st.integers(1, 5), st.booleans()), max_size=60))
def test_admission_never_holds_more_than_its_capacity(ops):
    a = Admission(capacity=7)
    held: list[int] = []
    t = 0.0
    for n, release in ops:
        t += 0.01
        if release and held:
            a.release(held.pop(0), t, answered=True)
        elif a.admit(n, t, t + 100) is None:
            held.append(n)
        assert a.pending == sum(held) <= 7


# --- rate limits --------------------------------------------------------------------------------------


def test_token_bucket_rate_burst_and_wait():
    b = TokenBucket(rate=2.0, burst=4.0, tokens=4.0, stamp=0.0)
    assert [b.take(1, 0.0) for _ in range(4)] == [0.0] * 4
    assert b.take(1, 0.0) == pytest.approx(0.5)  # one token at 2/s
    assert b.take(1, 0.5) == 0.0
    assert b.take(3, 0.5) == pytest.approx(1.5)
    assert b.take(10, 10.0) == 0.0  # larger than the burst: served from a full bucket


def test_rate_limiter_keeps_a_bucket_per_key_and_forgets_the_oldest():
    r = RateLimiter(burst=2, max_keys=2)
    assert r.take("a", 1.0, 2, 0.0) == 0.0
    assert r.take("a", 1.0, 1, 0.0) == pytest.approx(1.0)
    assert r.take("b", 1.0, 2, 0.0) == 0.0  # b has its own bucket
    r.take("c", 1.0, 1, 0.0)  # a is forgotten
    assert r.take("a", 1.0, 2, 0.0) == 0.0


# --- API keys -----------------------------------------------------------------------------------------


def test_keys_file_lines_and_lookup():
    k1, k2 = new_key(), new_key()
    assert k1 != k2 and k1.startswith("mod_") and len(k1) > 40
    keys = Keys.parse(f"# comment\n\n{key_line('uploads', k1)}\n{key_line('ads', k2, '600/min')}\n")
    assert keys.check(k1).name == "uploads" and keys.check(k1).rate_per_s is None
    assert keys.check(k2).name == "ads" and keys.check(k2).rate_per_s == pytest.approx(10.0)
    assert keys.check(k1 + "x") is None and keys.check("") is None
    assert k1 not in key_line("uploads", k1)  # only the hash is written


@pytest.mark.parametrize(
    "text", ["", "# nothing\n", "name:plain-text-key\n", "bad name:$sha256$" + "0" * 64, "a:5/h:$sha256$" + "0" * 64]
)
def test_bad_keys_files_name_the_line(text):
    with pytest.raises(KeysError, match="<keys>"):
        Keys.parse(text)


def test_rates_and_bearer_tokens():
    assert parse_rate("50/s") == 50 and parse_rate("90/min") == 1.5
    for bad in ("0/s", "5/h", "fast", "-1/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer ") is None and bearer(None) is None


# --- the OpenAI mapping -------------------------------------------------------------------------------


def _record(decision: str, scores: dict[str, float], fired: list[str]) -> DecisionRecord:
    return DecisionRecord(
        decision=decision, scores=scores, policy=PolicyRef(name="kids", version="sha256:1"), model="m",
        triggered=[Trigger(category=c, rule="review", score=scores[c], threshold=0.5) for c in fired],
        event_id="e", source=Source(topic="sync-requests", partition=0, offset=3),
        timings=Timings(queued_ms=0, total_ms=1), decided_at="2026-12-03T00:00:00Z",
    )  # fmt: skip


def test_results_carry_the_policys_categories():
    r = openai_api.result(_record("review", {"weapons": 0.7, "gore": 0.1}, ["weapons"]))
    assert r.flagged and r.categories == {"weapons": True, "gore": False}
    assert r.category_scores == {"weapons": 0.7, "gore": 0.1}
    assert r.category_applied_input_types == {"weapons": ["image"], "gore": ["image"]}
    allow = openai_api.result(_record("allow", {"weapons": 0.2}, []))
    assert not allow.flagged and allow.categories == {"weapons": False} and allow.decision == "allow"


def test_requests_become_image_events():
    png = b"\x89PNG fake bytes"
    body = {
        "model": "kids",
        "input": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            {"type": "image_url", "image_url": {"url": "https://cdn.example.com/a.jpg"}},
            {"type": "image_url", "image_url": {"url": "data:,raw%20bytes"}},
        ],
    }
    events = openai_api.events(openai_api.parse_request(body), "req-1", 1 << 20)
    assert [e.id for e in events] == ["req-1:0", "req-1:1", "req-1:2"]
    assert events[0].data == png and events[0].url is None and events[0].policy == "kids"
    assert events[1].data is None and events[1].url == "https://cdn.example.com/a.jpg"
    assert events[2].data == b"raw bytes"
    [one] = openai_api.events(
        openai_api.parse_request({"input": {"type": "image_url", "image_url": {"url": "https://x.test/a"}}}), "r", 10
    )
    assert one.id == "r" and one.policy is None  # one input: the request id itself; no model: the default policy


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"input": "some text"}, InvalidEnvelope),
        ({"input": ["a", "b"]}, InvalidEnvelope),
        ({"input": [{"type": "text", "text": "hi"}]}, InvalidEnvelope),
        ({"input": []}, InvalidEnvelope),
        ({"model": "kids"}, InvalidEnvelope),
        ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}, InvalidBase64),
        ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64"}}]}, InvalidEnvelope),
    ],
)
def test_bad_requests_have_reason_codes(body, error):
    with pytest.raises(error):
        openai_api.events(openai_api.parse_request(body), "r", 1 << 20)


def test_openai_model_names_mean_the_default_policy_and_ids_are_checked():
    assert openai_api.policy_name("omni-moderation-latest") is None
    assert openai_api.policy_name(None) is None and openai_api.policy_name("kids") == "kids"
    assert openai_api.request_id({"idempotency-key": "abc"}) == "abc"
    assert openai_api.request_id({}).startswith("modr-")
    with pytest.raises(InvalidEnvelope):
        openai_api.request_id({"x-request-id": "has space"})


# --- the batcher's urgent lane ------------------------------------------------------------------------


def test_urgent_items_go_first_and_are_flushed_by_their_due_time():
    b: MicroBatcher[str] = MicroBatcher(max_size=8, max_delay_s=10.0)
    b.add("s0", now=0.0)  # the stream's
    b.add("u0", now=1.0, due=1.5)
    b.add("u1", now=1.1, due=1.3)
    assert b.deadline() == 1.3 and not b.ready(1.29) and b.ready(1.3)
    assert [p.item for p in b.take(1.3)] == ["u0", "u1", "s0"]  # urgent first, then the oldest


def test_a_full_batch_takes_urgent_items_before_older_stream_items():
    b: MicroBatcher[str] = MicroBatcher(max_size=3, max_delay_s=10.0)
    for i in range(4):
        b.add(f"s{i}", now=0.0)
    b.add("u0", now=1.0, due=5.0)
    b.add("u1", now=1.2, due=5.0)
    assert [p.item for p in b.take(1.2)] == ["u0", "u1", "s0"]
    assert [p.item for p in b.take(1.2)] == ["s1", "s2", "s3"]
    assert len(b) == 0 and b.deadline() is None


# --- the command line --------------------------------------------------------------------------------


def test_add_key_prints_the_key_once_and_a_line_with_its_hash_only(capsys):
    from moderator.cli import main

    assert main(["serve", "add-key", "uploads", "--rate", "5/s"]) == 0
    out, err = capsys.readouterr()
    key = err.strip().rsplit(" ", 1)[-1]
    assert key.startswith("mod_") and key not in out
    entry = Keys.parse(out).check(key)
    assert entry is not None and entry.name == "uploads" and entry.rate_per_s == 5.0
    assert main(["serve", "add-key", "bad name"]) == 2


def test_serve_without_keys_stops_before_loading_a_model(monkeypatch, capsys, tmp_path):
    from moderator.cli import main

    monkeypatch.delenv("MODERATOR_SERVE_KEYS_FILE", raising=False)
    monkeypatch.setenv("MODERATOR_MODEL_ID", str(tmp_path / "no-such-model"))  # loading it would fail otherwise
    assert main(["serve"]) == 2
    assert "MODERATOR_SERVE_KEYS_FILE" in capsys.readouterr().err
    (tmp_path / "keys.txt").write_text("uploads:plain-text\n")
    monkeypatch.setenv("MODERATOR_SERVE_KEYS_FILE", str(tmp_path / "keys.txt"))
    assert main(["serve"]) == 2
    assert "keys.txt:1" in capsys.readouterr().err


# --- statuses -----------------------------------------------------------------------------------------


def test_only_overload_and_bugs_are_5xx():
    assert {r for r, code in STATUS.items() if code >= 500} == {"internal_error", "publish_failed", "overloaded",
                                                               "timeout"}  # fmt: skip
    assert status_of("some_new_image_reason") == 422 and status_of("fetch_failed") == 422


# --- a request's event in the stream's batch stage ---------------------------------------------------


class _Sink:
    """The stages' sink of this test: what was decided, in order."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.done = threading.Event()
        self.want = 0

    def decided(self, result: Any) -> None:
        if result.event.reply is not None:
            result.event.reply.decided(result)
        self.order.append(result.event.parsed.id)
        if len(self.order) >= self.want:
            self.done.set()

    def failed(self, e: Any, reason: str, message: str) -> None:
        raise AssertionError(f"{e.parsed.id}: {reason}: {message}")


class _Waiting:
    """A request's side of :class:`moderator.worker.event.Reply`: it only records its decision."""

    def __init__(self, due: float, deadline: float) -> None:
        self.due, self.deadline = due, deadline
        self.results: list[Any] = []

    def decided(self, result: Any) -> None:
        self.results.append(result)

    def failed(self, reason: str, message: str) -> None:
        raise AssertionError(reason)


def test_a_request_behind_a_backlog_goes_in_the_next_batch(tiny_engine):
    """64 stream events wait (bytes, decoded when their batch runs) and a request's event arrives last: the
    batch stage takes it into the urgent lane at once, so it is in the first batch, not the ninth."""
    from kafka import TopicPartition

    from moderator.app import App
    from moderator.banks.store import FixedBanks
    from moderator.config import Settings
    from moderator.events import ParsedEvent
    from moderator.samples import jpeg_bytes, photo_like
    from moderator.worker.checkpoint import Receipt
    from moderator.worker.event import Event
    from moderator.worker.stages import build_stages

    settings = Settings(policy_dir=ROOT / "policies", redis_enabled=False, banks_enabled=False, max_batch_size=8,
                        max_delay_ms=5, decode_schedule="before_forward")  # fmt: skip
    app = App(settings, engine=tiny_engine)
    sink = _Sink()
    images, batches = build_stages(sink, settings, tiny_engine, app.policies, FixedBanks(), app.fetcher)

    def event(i: int, reply: Any = None) -> Event:
        data = jpeg_bytes(photo_like(40, 30, seed=i))
        e = Event(Receipt(TopicPartition("t", 0), i, tracked=False), None, b"", None, time.monotonic(),
                  parsed=ParsedEvent(f"e{i}", None, {}, data, None), reply=reply)  # fmt: skip
        e.data = data
        return e

    for i in range(64):
        images.ready.put(event(i))
    now = time.monotonic()
    waiting = _Waiting(due=now + 5, deadline=now + 10)
    images.ready.put(event(64, waiting))
    sink.want = 65
    batches.start()
    try:
        assert sink.done.wait(60)
    finally:
        batches.stop(10)
        images.close()
    assert len(waiting.results) == 1 and sink.order.index("e64") < 8
    assert sorted(sink.order) == sorted(f"e{i}" for i in range(65))
