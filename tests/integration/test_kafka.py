"""The real broker: keyed produce, group consume, commit, and a second member resuming after the commit."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from kafka import TopicPartition

pytestmark = pytest.mark.integration


def _poll_until(consumer: Any, want: int, timeout: float = 30.0, settle: float = 0.0) -> list[Any]:
    """Poll until ``want`` records came (then ``settle`` s more, to catch extras) or the timeout."""
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(records) < want and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    settle_until = time.monotonic() + settle
    while time.monotonic() < settle_until:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def test_group_consume_commit_and_resume(
    make_topic: Callable[..., str],
    make_producer: Callable[..., Any],
    make_consumer: Callable[..., Any],
    unique_name: Callable[[str], str],
) -> None:
    topic = make_topic(partitions=4)
    group = unique_name("g")
    producer = make_producer(acks="all")

    sent = {f"key-{i:03d}".encode(): f"value-{i:03d}".encode() for i in range(100)}
    futures = [producer.send(topic, key=k, value=v) for k, v in sent.items()]
    producer.flush(timeout=30)
    partition_of = {k: f.get(timeout=10).partition for k, f in zip(sent, futures, strict=True)}
    assert set(partition_of.values()) == {0, 1, 2, 3}

    first = make_consumer(topic, group=group)
    records = _poll_until(first, 100)
    assert len(records) == 100
    assert {r.key: r.value for r in records} == sent
    assert {r.partition for r in records} == {0, 1, 2, 3}
    for r in records:  # a key always lands on the partition the producer reported
        assert r.partition == partition_of[r.key]
    first.commit()
    committed = {p: first.committed(TopicPartition(topic, p)) for p in range(4)}
    assert sum(committed.values()) == 100
    first.close(autocommit=False)

    more = {f"more-{i}".encode(): f"late-{i}".encode() for i in range(10)}
    for k, v in more.items():
        producer.send(topic, key=k, value=v)
    producer.flush(timeout=30)

    second = make_consumer(topic, group=group)
    resumed = _poll_until(second, 10, settle=2.0)
    assert {r.key: r.value for r in resumed} == more
    assert len(resumed) == 10  # exactly the new ones: none of the committed 100 again
