"""The pure core of the worker: micro-batching by size or deadline, and done-watermarks."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from moderator.batcher import MicroBatcher
from moderator.offsets import OffsetTracker


def test_flush_when_full():
    b = MicroBatcher(max_size=3, max_delay_s=10)
    for i in range(2):
        b.add(i, now=0.0)
    assert not b.ready(0.5) and b.take(0.5) == []
    b.add(2, now=0.6)
    assert b.ready(0.6)
    assert [p.item for p in b.take(0.6)] == [0, 1, 2]
    assert len(b) == 0 and b.deadline() is None


def test_flush_when_oldest_waited_max_delay():
    b = MicroBatcher(max_size=100, max_delay_s=0.02)
    b.add("a", now=1.000)
    b.add("b", now=1.015)
    assert b.deadline() == 1.02
    assert not b.ready(1.019)
    assert [p.item for p in b.take(1.020)] == ["a", "b"]  # measured from the oldest, not the newest


def test_take_caps_at_max_size_and_keeps_order():
    b = MicroBatcher(max_size=4, max_delay_s=0)
    for i in range(10):
        b.add(i, now=float(i))
    assert [p.item for p in b.take(100)] == [0, 1, 2, 3]
    assert [p.item for p in b.take(100)] == [4, 5, 6, 7]
    assert [p.item for p in b.take(100)] == [8, 9]


def test_force_takes_a_partial_batch():
    b = MicroBatcher(max_size=8, max_delay_s=60)
    b.add(1, now=0)
    assert b.take(0) == []
    assert [p.item for p in b.take(0, force=True)] == [1]


def test_watermark_waits_for_the_lowest_unfinished():
    t: OffsetTracker[str] = OffsetTracker()
    for o in range(10, 15):
        t.start("p0", o)
    assert t.committable() == {}
    t.finish("p0", 12)
    t.finish("p0", 11)
    assert t.committable() == {}  # 10 is not done: nothing may be committed
    t.finish("p0", 10)
    assert t.committable() == {"p0": 13}  # 10, 11, 12 done: the next to read is 13
    t.mark_committed({"p0": 13})
    assert t.committable() == {}
    t.finish("p0", 14)
    assert t.committable() == {} and t.pending("p0") == 1
    t.finish("p0", 13)
    assert t.committable() == {"p0": 15} and t.pending() == 0


def test_partitions_are_independent_and_drop_forgets():
    t: OffsetTracker[tuple[str, int]] = OffsetTracker()
    a, b = ("t", 0), ("t", 1)
    t.start(a, 0)
    t.start(b, 100)
    t.finish(b, 100)
    assert t.committable() == {b: 101}
    t.drop([a])
    t.finish(a, 0)  # a late finish for a revoked partition is ignored
    assert t.committable() == {b: 101}


def test_redelivered_offsets_do_not_move_the_watermark():
    t: OffsetTracker[str] = OffsetTracker()
    assert t.start("p", 5) and t.start("p", 6)
    assert not t.start("p", 5)  # re-delivery of a pending offset
    t.finish("p", 5)
    t.finish("p", 6)
    assert t.committable() == {"p": 7}
    assert not t.start("p", 3)  # below the watermark: already done once
    assert t.start("p", 7)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.randoms(use_true_random=False), st.data())
def test_committed_offset_never_skips_an_unfinished_event(n, rnd: random.Random, data):
    t: OffsetTracker[int] = OffsetTracker()
    for o in range(n):
        t.start(0, o)
    finished: set[int] = set()
    order = list(range(n))
    rnd.shuffle(order)
    stop = data.draw(st.integers(0, n))
    for o in order[:stop]:
        t.finish(0, o)
        finished.add(o)
        c = t.committable().get(0)
        if c is not None:
            assert all(x in finished for x in range(c))  # everything below it is done
            assert c == n or c not in finished  # and it is the lowest unfinished
    if stop == n:
        assert t.watermark(0) == n


def test_uncommitted_counts_until_the_commit():
    t: OffsetTracker[str] = OffsetTracker()
    for o in range(5):
        t.start("p", o)
    assert t.uncommitted() == 5
    for o in range(3):
        t.finish("p", o)
    assert t.uncommitted() == 5 and t.pending() == 2  # done, but a crash now would re-read them
    t.mark_committed(t.committable())
    assert t.uncommitted() == 2
