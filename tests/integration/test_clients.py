"""moderator's own Kafka and Redis clients (``moderator.clients``) against the real services."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from kafka import TopicPartition

from moderator.clients import TopicError, broker_version, make_consumer, make_producer, make_reader, make_redis

pytestmark = [pytest.mark.integration, pytest.mark.every_broker]  # `make test`: on Kafka 0.9 and on Tansu


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


def test_producer_and_group_consumer_commit_and_resume(settings_factory, make_topic: Callable[..., str]) -> None:
    """The factories' settings work on this broker: keyed produce with acks=all (idempotence as the
    broker allows), a group member with manual commits, a second member resuming after the commit."""
    topic = make_topic(partitions=4)
    settings = settings_factory(redis=False)
    producer = make_producer(settings)
    # idempotence auto-detected: off on 0.9 (configured), on where the broker advertises >= 0.11 (Tansu)
    assert producer.config["enable_idempotence"] == (broker_version(producer) >= (0, 11))
    sent = {f"key-{i:03d}".encode(): f"value-{i:03d}".encode() for i in range(100)}
    futures = [producer.send(topic, key=k, value=v) for k, v in sent.items()]
    producer.flush(timeout=30)
    partition_of = {k: f.get(timeout=10).partition for k, f in zip(sent, futures, strict=True)}
    assert set(partition_of.values()) == {0, 1, 2, 3}

    first = make_consumer(settings)
    first.subscribe([topic])
    records = _poll_until(first, 100)
    assert {r.key: r.value for r in records} == sent and len(records) == 100
    assert all(r.partition == partition_of[r.key] for r in records)  # a key stays on its partition
    first.commit()
    assert sum(first.committed(TopicPartition(topic, p)) for p in range(4)) == 100
    first.close(autocommit=False)

    more = {f"more-{i}".encode(): f"late-{i}".encode() for i in range(10)}
    for k, v in more.items():
        producer.send(topic, key=k, value=v)
    producer.flush(timeout=30)
    producer.close()
    second = make_consumer(settings)
    second.subscribe([topic])
    resumed = _poll_until(second, 10, settle=2.0)
    second.close(autocommit=False)
    assert {r.key: r.value for r in resumed} == more and len(resumed) == 10  # none of the committed 100


def test_reader_reads_every_partition_from_the_beginning_or_the_end(settings_factory, make_topic) -> None:
    a, b = make_topic(partitions=3), make_topic(partitions=1)
    settings = settings_factory(redis=False)
    producer = make_producer(settings)
    for i in range(30):
        producer.send(a if i % 2 else b, key=str(i).encode(), value=b"x")
    producer.flush(timeout=30)
    reader = make_reader(settings, [a, b])
    assert len(_poll_until(reader, 30, settle=1.0)) == 30
    reader.close(autocommit=False)
    tail = make_reader(settings, [a, b], from_beginning=False)
    assert _poll_until(tail, 1, timeout=1.0) == []  # at the end: nothing old
    producer.send(a, key=b"new", value=b"y")
    producer.flush(timeout=30)
    assert [r.key for r in _poll_until(tail, 1)] == [b"new"]
    tail.close(autocommit=False)
    producer.close()
    with pytest.raises(TopicError, match=r"do not exist.*moderator topics create"):
        make_reader(settings, [a, "no-such-topic-here"])


def test_redis_client_is_binary_safe_and_fails_fast(redis_service, redis_key_prefix: str) -> None:
    client = make_redis(redis_service.url, 1000, 1000)
    key = f"{redis_key_prefix}blob"
    value = bytes(range(256)) + b"\x00tail"
    client.mset({key: value, f"{key}2": b""})
    assert client.mget([key, f"{key}2", f"{key}3"]) == [value, b"", None]
    client.delete(key, f"{key}2")
    client.close()
    dead = make_redis("redis://127.0.0.1:1/0", 200, 200)  # nothing listens: an error at once, no retries
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 (redis raises ConnectionError subclasses)
        dead.ping()
    assert time.monotonic() - t0 < 2
