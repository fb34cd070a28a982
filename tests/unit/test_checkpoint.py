"""The checkpoint's protocol (receipt → done → commit, backpressure, revocation, shutdown) without a
broker: the real Checkpoint and RebalanceListener against the in-process feed."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from moderator.clients import make_consumer
from moderator.config import Settings
from moderator.worker.checkpoint import Checkpoint
from moderator.worker.feed import QueueFeed, RefusedError
from moderator.worker.rebalance import RebalanceListener

TOPIC = "images"


def _feed(n: int = 0) -> QueueFeed:
    feed = QueueFeed(TOPIC)
    for i in range(n):
        feed.put(f"k{i}".encode(), b"v")
    return feed


def _received(feed: QueueFeed, checkpoint: Checkpoint) -> list:
    receipts = []
    for tp, records in feed.poll(timeout_ms=10).items():
        receipts.extend(checkpoint.receive(tp, r.offset) for r in records)
    return receipts


def test_an_event_is_done_when_every_record_is_acknowledged_and_commits_never_skip_one():
    feed = _feed(4)
    cp = Checkpoint(feed, max_in_flight=100, commit_interval_s=0)
    feed.subscribe([TOPIC], listener=RebalanceListener(cp, feed, 1.0))
    r = _received(feed, cp)
    assert cp.in_flight == 4
    cp.expect(r[0], 2)  # a decision and a review item
    cp.expect(r[1], 1)
    cp.acknowledged(r[1])  # offset 1 done, but 0 is not: nothing may be committed
    assert cp.commit() == {} and feed.committed == {}
    cp.acknowledged(r[0])
    assert cp.commit() == {} and cp.in_flight == 3  # one of its two records is still on its way
    cp.acknowledged(r[0])
    assert cp.commit() == {feed.tp: 2} and feed.committed == {feed.tp: 2}
    assert cp.commit() == {}  # the watermark did not move
    for receipt in r[2:]:
        cp.expect(receipt, 1)
        cp.acknowledged(receipt)
    assert cp.commit() == {feed.tp: 4} and cp.in_flight == 0


def test_maybe_commit_waits_for_the_interval_unless_half_the_window_is_done():
    feed = _feed(10)
    cp = Checkpoint(feed, max_in_flight=8, commit_interval_s=3600)
    feed.subscribe([TOPIC], listener=RebalanceListener(cp, feed, 1.0))
    r = _received(feed, cp)
    cp.maybe_commit()  # the first interval has not passed: nothing
    for receipt in r[:3]:
        cp.expect(receipt, 1)
        cp.acknowledged(receipt)
    assert cp.maybe_commit() == {}  # 3 done < 4 (half the window)
    cp.expect(r[3], 1)
    cp.acknowledged(r[3])
    assert cp.maybe_commit() == {feed.tp: 4}


def test_backpressure_counts_uncommitted_events_and_resumes_at_half():
    feed = _feed(12)
    feed.max_poll_records = 6
    cp = Checkpoint(feed, max_in_flight=6, commit_interval_s=3600)
    feed.subscribe([TOPIC], listener=RebalanceListener(cp, feed, 1.0))
    r = _received(feed, cp)
    cp.backpressure()
    assert feed.paused() == {feed.tp} and feed.poll(timeout_ms=10) == {}
    for receipt in r[:4]:  # done, but not committed: a crash would re-process them, so still paused
        cp.expect(receipt, 1)
        cp.acknowledged(receipt)
    cp.backpressure()
    assert feed.paused() == {feed.tp}
    cp.commit()
    cp.backpressure()  # 2 uncommitted <= 6 // 2: resume
    assert feed.paused() == set() and len(feed.poll(timeout_ms=10)[feed.tp]) == 6


def test_revocation_commits_the_revoked_watermarks_and_lost_partitions_commit_nothing():
    a, b = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    cp = Checkpoint(_feed(), max_in_flight=100, commit_interval_s=0)
    cp.assign({a, b})
    ra = [cp.receive(a, o) for o in range(3)]
    rb = [cp.receive(b, o) for o in range(10, 12)]
    for receipt in (ra[0], rb[0], rb[1]):
        cp.expect(receipt, 1)
        cp.acknowledged(receipt)
    revoked = cp.revoke({a}, lost=False)
    assert revoked.offsets == {a: 1} and revoked.resume == {a: 1} and revoked.abandoned == 2
    assert cp.assigned.is_set() and cp.pending({a}) == 0  # forgotten: late acknowledgements are ignored
    cp.expect(ra[1], 1)
    cp.acknowledged(ra[1])
    lost = cp.revoke({b}, lost=True)
    assert lost.offsets == {} and lost.resume == {b: 12} and not cp.assigned.is_set()


def test_the_rebalance_listener_waits_for_revoked_events_then_commits_and_resumes_where_they_stopped():
    feed = _feed(5)
    cp = Checkpoint(feed, max_in_flight=100, commit_interval_s=0)
    listener = RebalanceListener(cp, feed, max_wait_s=5.0)
    feed.subscribe([TOPIC], listener=listener)
    r = _received(feed, cp)
    assert cp.assigned.is_set()
    for receipt in r:
        cp.expect(receipt, 1)
    for receipt in r[:2]:
        cp.acknowledged(receipt)

    def finish_later() -> None:  # the producer's IO thread acknowledging while the rebalance waits
        time.sleep(0.3)
        cp.acknowledged(r[2])

    threading.Thread(target=finish_later).start()
    t0 = time.monotonic()
    feed.revoke()  # 3 and 4 never finish: abandoned after the wait budget
    waited = time.monotonic() - t0
    assert waited > 0.25 and feed.committed == {feed.tp: 3}
    assert not cp.assigned.is_set()
    # The next assignment re-delivers from the committed offset: nothing abandoned is lost.
    again = _received(feed, cp)
    assert [x.offset for x in again] == [3, 4] and cp.assigned.is_set()


def test_revocation_waits_no_longer_than_its_budget():
    feed = _feed(2)
    cp = Checkpoint(feed, max_in_flight=100, commit_interval_s=0)
    feed.subscribe([TOPIC], listener=RebalanceListener(cp, feed, max_wait_s=0.2))
    for receipt in _received(feed, cp):
        cp.expect(receipt, 1)
    t0 = time.monotonic()
    feed.revoke()
    assert time.monotonic() - t0 < 1.5 and feed.committed == {}


def test_shutdown_runs_its_steps_in_order_and_reports_what_was_left():
    feed = _feed(3)
    cp = Checkpoint(feed, max_in_flight=100, commit_interval_s=3600)
    feed.subscribe([TOPIC], listener=RebalanceListener(cp, feed, 1.0))
    r = _received(feed, cp)
    for receipt in r:
        cp.expect(receipt, 1)
    steps: list[str] = []

    def resend() -> bool:
        if "resend" not in steps:
            steps.append("resend")
            threading.Timer(0.1, lambda: [cp.acknowledged(x) for x in r[:2]]).start()
        return True

    closed = cp.close(
        time.monotonic() + 0.6,
        resend=resend,
        stop_engine=lambda timeout: steps.append("stop_engine"),
        flush=lambda timeout: steps.append("flush"),
    )
    assert feed.paused() == {feed.tp}  # 1. fetching stopped first
    assert steps == ["resend", "stop_engine", "flush"]  # 2, 3, 4
    assert closed.unfinished == 1 and closed.committed == {feed.tp: 2}  # 5. what was done, committed
    assert feed.committed == {feed.tp: 2}


def test_shutdown_stops_waiting_when_publishing_has_failed_for_good():
    feed = _feed(1)
    cp = Checkpoint(feed, max_in_flight=100, commit_interval_s=3600)
    feed.subscribe([TOPIC], listener=RebalanceListener(cp, feed, 1.0))
    cp.expect(_received(feed, cp)[0], 1)
    t0 = time.monotonic()
    closed = cp.close(time.monotonic() + 30, resend=lambda: False, stop_engine=lambda t: None, flush=lambda t: None)
    assert time.monotonic() - t0 < 2 and closed.unfinished == 1 and closed.committed == {}


def test_the_worker_consumer_has_the_io_loop_sleep_the_listener_awaits():
    """The revocation wait sleeps on ``consumer._net`` (kafka-python 3's IO loop); fail loudly if an
    upgrade moves it, on the consumer the worker really builds."""
    consumer = make_consumer(Settings(kafka_bootstrap_servers="127.0.0.1:1", kafka_api_version="0.9"))
    try:
        assert inspect.isawaitable(consumer._net.sleep(0.01))
    finally:
        consumer.close(autocommit=False)


def test_the_feed_fails_sends_it_was_told_to_refuse_and_commits_drop_what_they_cover():
    feed = _feed(3)
    feed.refuse(1)
    failed: list[BaseException] = []
    feed.send("decisions", b"k", b"v").add_errback(failed.append)
    assert len(failed) == 1 and isinstance(failed[0], RefusedError) and feed.outputs == []
    feed.send("decisions", b"k", b"v")
    assert [(o.topic, o.key) for o in feed.outputs] == [("decisions", b"k")]
    asyncio.run(asyncio.sleep(0))
    records = feed.poll(timeout_ms=10)[feed.tp]
    feed.commit({feed.tp: OffsetAndMetadata(2, "", -1)})
    feed.seek(feed.tp, 0)  # a seek below the committed offset re-delivers only what is not committed
    assert [r.offset for r in feed.poll(timeout_ms=10)[feed.tp]] == [2] and len(records) == 3


@pytest.mark.parametrize("lost", [False, True])
def test_revoking_an_unknown_partition_is_harmless(lost):
    cp = Checkpoint(_feed(), max_in_flight=10, commit_interval_s=0)
    assert cp.revoke({TopicPartition("other", 0)}, lost=lost).offsets == {}


def _transactional(feed: QueueFeed, retries: int = 5) -> Checkpoint:
    from moderator.worker.transactions import Transactions

    transactions = Transactions(feed, feed, "t-1", headers=True)
    transactions.start()
    cp = Checkpoint(feed, max_in_flight=100, commit_interval_s=0, transactions=transactions, retries=retries)
    feed.subscribe([TOPIC], listener=RebalanceListener(cp, feed, 1.0))
    return cp


def _held(topic: str, key: bytes) -> list:
    from moderator.worker.transactions import Held

    return [Held(topic, key, b"{}", None)]


def test_exactly_once_a_record_the_broker_refuses_aborts_the_transaction_and_nothing_is_committed():
    feed = _feed(2)
    cp = _transactional(feed)
    r = _received(feed, cp)
    for receipt in r:
        cp.hold(receipt, _held("decisions", f"k{receipt.offset}".encode()))
    feed.refuse(1)  # the first record fails for good: the transaction must not commit without it
    assert cp.commit() == {} and feed.outputs == [] and feed.committed == {}
    assert cp.commit() == {feed.tp: 2}  # the next one carries both records and the offsets
    assert sorted(o.key for o in feed.outputs) == [b"k0", b"k1"] and feed.committed == {feed.tp: 2}
    assert all(dict(o.headers)["moderator-transaction"].startswith(b"t-1/") for o in feed.outputs)


def test_exactly_once_a_revoked_partition_resumes_at_its_first_uncommitted_offset():
    feed = _feed(5)
    cp = _transactional(feed)
    r = _received(feed, cp)
    for receipt in r[:2]:
        cp.hold(receipt, _held("decisions", b"x"))
    assert cp.commit() == {feed.tp: 2}
    for receipt in r[2:]:
        cp.hold(receipt, _held("decisions", b"x"))
    feed.fail_transactions(1)  # the revocation's own transaction fails: offsets 2-4 were only held
    feed.revoke()
    assert feed.committed == {feed.tp: 2}
    records = feed.poll(timeout_ms=10)[feed.tp]  # the partition comes back: 2-4 are read again
    assert [rec.offset for rec in records] == [2, 3, 4]


def test_exactly_once_held_records_of_a_revoked_partition_are_not_sent_after_it_comes_back():
    a = TopicPartition(TOPIC, 0)
    feed = _feed()
    cp = _transactional(feed)
    cp.assign({a})
    late = cp.receive(a, 0)  # in the engine when the partition goes
    cp.revoke({a}, lost=True)
    cp.assign({a})
    again = cp.receive(a, 0)  # the new owner's (here: our own again) delivery of the same event
    cp.hold(late, _held("decisions", b"late"))  # dropped: it belongs to the old ownership
    cp.hold(again, _held("decisions", b"again"))
    assert cp.commit() == {a: 1} and [o.value for o in feed.outputs] == [b"{}"] and len(feed.outputs) == 1
