"""Every client this product makes of Kafka and Redis, built from :class:`~moderator.config.Settings`.

- :func:`make_producer`: every record this product publishes (``acks=all``; idempotent where the
  broker can do it).
- :func:`make_consumer`: a consumer-group member (the worker; the console's own group).
- :func:`make_reader`: a group-less reader of whole topics (``tail``, the demo, replay, tests).
- topic administration: :func:`create_topics` and friends, for brokers with the CreateTopics API
  (>= 0.10.1); the local 0.9 stack creates its topics with Kafka's own tool (``stack/``).
- :func:`make_redis`: a Redis client that fails fast (the cache fails open around it).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from moderator.config import Settings, parse_api_version
from moderator.observability import get_logger
from moderator.topics import NewTopic, check_topic_names

log = get_logger(__name__)

TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


class TopicError(RuntimeError):
    """A topic is missing or cannot be created; the message says which and what to do."""


def kafka_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments shared by every kafka-python client this process makes."""
    common: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_api_version_tuple is not None:
        common["api_version"] = settings.kafka_api_version_tuple
    if settings.kafka_sasl_mechanism is not None:
        common["sasl_mechanism"] = settings.kafka_sasl_mechanism
        common["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            common["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    for key, value in (
        ("ssl_cafile", settings.kafka_ssl_cafile),
        ("ssl_certfile", settings.kafka_ssl_certfile),
        ("ssl_keyfile", settings.kafka_ssl_keyfile),
    ):
        if value is not None:
            common[key] = str(value)
    if settings.kafka_ssl_password is not None:
        common["ssl_password"] = settings.kafka_ssl_password.get_secret_value()
    return common


# ==================================================================================================
# Producer and consumers


def make_producer(settings: Settings, *, transactional_id: str | None = None, **overrides: Any) -> KafkaProducer:
    """The producer: ``acks=all``, retries, idempotent where the broker supports it (>= 0.11: by the
    configured version, else by the versions the broker advertises); with ``transactional_id``, the
    exactly-once worker's transactional producer (``init_transactions`` is the caller's)."""
    # Inline images travel in events (produce) and in dead letters (their original value).
    largest = max(2 * settings.dead_letter_max_original_bytes, settings.image_max_bytes * 4 // 3 + (1 << 20))
    kwargs: dict[str, Any] = {
        **kafka_kwargs(settings),
        "acks": "all",
        "retries": 10,
        "linger_ms": 5,
        "max_request_size": largest,
    }
    if settings.idempotence is not None:  # None: kafka-python turns it on where the broker's versions allow
        kwargs["enable_idempotence"] = settings.idempotence
    if transactional_id is not None:  # retries: kafka-python's (until the delivery timeout)
        kwargs.pop("retries")
        kwargs["transactional_id"] = transactional_id
        kwargs["transaction_timeout_ms"] = settings.transaction_timeout_ms
    kwargs.update(overrides)
    return KafkaProducer(**kwargs)


def broker_version(producer: Any) -> tuple[int, ...] | None:
    """The protocol version a producer speaks (configured or probed); None for a stand-in without one."""
    config = getattr(producer, "config", None)
    version = config.get("api_version") if isinstance(config, dict) else None
    return tuple(version) if version else None


def headers_enabled(settings: Settings, producer: Any) -> bool:
    """Whether outputs carry record headers: ``MODERATOR_KAFKA_HEADERS``, "auto" by the producer's broker
    version (>= 0.11; an in-process stand-in without a version takes them)."""
    if settings.kafka_headers != "auto":
        return settings.kafka_headers == "true"
    version = broker_version(producer)
    return version is None or version >= (0, 11)


@dataclass(frozen=True)
class ConsumerTimeouts:
    session_ms: int
    heartbeat_ms: int
    max_poll_interval_ms: int


def consumer_timeouts(settings: Settings) -> ConsumerTimeouts:
    """The group timeouts to ask for. Brokers before 0.10.1 have no separate poll interval:
    kafka-python makes it the session timeout, so the smaller of the two governs both."""
    session, poll = settings.kafka_session_timeout_ms, settings.kafka_max_poll_interval_ms
    version = settings.kafka_api_version_tuple
    if version is not None and version < (0, 10, 1):
        session = poll = min(session, poll)
    return ConsumerTimeouts(session, min(settings.kafka_heartbeat_interval_ms, max(100, session // 3)), poll)


def _fetch_limits(settings: Settings) -> dict[str, int]:
    # The largest message: an inline image (base64: 4/3) plus its envelope.
    partition_bytes = settings.image_max_bytes * 4 // 3 + 1_048_576
    return {
        "max_partition_fetch_bytes": partition_bytes,
        "fetch_max_bytes": max(partition_bytes, 52_428_800),
        # Old brokers ignore fetch_max_bytes: a response may carry one full partition fetch per
        # partition; a frame over this limit is dropped without an error reaching poll().
        "receive_message_max_bytes": max(100_000_000, 4 * partition_bytes + 1_048_576),
    }


def _isolation(settings: Settings) -> dict[str, str]:
    """Exactly-once: read what committed transactions wrote (the worker's outputs), nothing of open or
    aborted ones."""
    return {"isolation_level": "read_committed"} if settings.exactly_once else {}


def make_consumer(settings: Settings, group_id: str | None = None, **overrides: Any) -> KafkaConsumer:
    """A member of ``group_id`` (default: the worker's group): manual commits, earliest offsets."""
    t = consumer_timeouts(settings)
    kwargs: dict[str, Any] = {
        **kafka_kwargs(settings),
        **_fetch_limits(settings),
        "group_id": group_id or settings.kafka_group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": t.session_ms,
        "heartbeat_interval_ms": t.heartbeat_ms,
        "max_poll_records": min(500, settings.max_in_flight),
        **_isolation(settings),
    }
    version = settings.kafka_api_version_tuple
    if t.max_poll_interval_ms != t.session_ms or version is None or version >= (0, 10, 1):
        kwargs["max_poll_interval_ms"] = t.max_poll_interval_ms
    kwargs.update(overrides)
    return KafkaConsumer(**kwargs)


def make_reader(
    settings: Settings, topics: Sequence[str], *, from_beginning: bool = True, **overrides: Any
) -> KafkaConsumer:
    """A group-less consumer assigned every partition of ``topics``, at their beginning (or end); with
    no topics, one to assign and seek as the caller needs.

    Raises :class:`TopicError` naming the topics that do not exist.
    """
    kwargs: dict[str, Any] = {**kafka_kwargs(settings), **_fetch_limits(settings), "group_id": None,
                              "enable_auto_commit": False, **_isolation(settings)}  # fmt: skip
    kwargs.update(overrides)
    consumer = KafkaConsumer(**kwargs)
    parts: list[TopicPartition] = []
    missing = []
    for topic in topics:
        found = consumer.partitions_for_topic(topic)
        if not found:
            missing.append(topic)
        parts.extend(TopicPartition(topic, p) for p in sorted(found or ()))
    if missing:
        consumer.close(autocommit=False)
        raise TopicError(
            f"topic(s) {', '.join(map(repr, missing))} do not exist on {settings.kafka_bootstrap_servers}: "
            "create them (moderator topics create) or check MODERATOR_TOPIC_*"
        )
    consumer.assign(parts)
    if parts and from_beginning:
        consumer.seek_to_beginning(*parts)
    elif parts:
        _seek_to_end(consumer, parts)
    return consumer


def _seek_to_end(consumer: KafkaConsumer, parts: list[TopicPartition], timeout_s: float = 5.0) -> None:
    """Stand at each partition's end: one past its last record, read rather than trusted.

    A broker's ListOffsets answer may fall short: Tansu 0.6 answers the first offset of the last record
    batch + 1, and a reader standing there would take the rest of that batch for new records. So each
    partition is read from one before the answered end up to where its fetch stands after that last
    record (or batch); those records are dropped. Records produced meanwhile are dropped with them.
    """
    end = consumer.end_offsets(parts)
    remaining = set()
    for tp in parts:
        consumer.seek(tp, max(0, end[tp] - 1))
        if end[tp] > 0:
            remaining.add(tp)
    deadline = time.monotonic() + timeout_s
    while remaining and time.monotonic() < deadline:
        for tp in consumer.poll(timeout_ms=200, max_records=10_000):
            remaining.discard(tp)
        remaining = {tp for tp in remaining if consumer.position(tp) < end[tp]}
    for tp in remaining:  # e.g. compacted away at end - 1: the answered end, as it is
        consumer.seek(tp, end[tp])


def read_to_end(
    reader: KafkaConsumer, apply: Callable[[Any], None], *, timeout_s: float = 300.0, limit: int | None = None
) -> int:
    """Feed ``apply`` every record of a reader's partitions from where it stands up to their end as
    of now (``limit``: at most that many records); the reader then stands there, ready to follow.

    The end is taken once, at the start; a partition is done when its position reaches it (positions,
    not offsets seen: compaction leaves gaps). Records past the end may come in the last poll and are
    applied too. Returns how many records were applied.
    """
    parts = list(reader.assignment())
    end = reader.end_offsets(parts)
    remaining = {tp for tp in parts if reader.position(tp) < end[tp]}
    deadline = time.monotonic() + timeout_s
    applied = 0
    while remaining and (limit is None or applied < limit):
        if time.monotonic() > deadline:
            raise TopicError(f"not at the end of {sorted(str(tp) for tp in remaining)} after {timeout_s:.0f}s")
        for records in reader.poll(timeout_ms=500, max_records=10_000).values():
            for record in records:
                if limit is not None and applied >= limit:
                    break
                apply(record)
                applied += 1
        remaining = {tp for tp in remaining if reader.position(tp) < end[tp]}
    return applied


# ==================================================================================================
# Topic administration (brokers >= 0.10.1)


def make_admin(bootstrap: str, api_version: str | None, timeout: float = 10.0) -> KafkaAdminClient:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "client_id": "moderator-admin",
        "request_timeout_ms": max(1000, int(timeout * 1000)),
        "bootstrap_timeout_ms": max(1000, int(timeout * 1000)),
    }
    version = parse_api_version(api_version)
    if version is not None:
        kwargs["api_version"] = version
    return KafkaAdminClient(**kwargs)


def broker_ready(bootstrap: str, api_version: str | None, timeout: float = 5.0) -> bool:
    """Whether the cluster at ``bootstrap`` answers a metadata request that lists a broker. Asked while
    a broker starts: a port that does not listen yet is a plain no, and kafka-python's own error lines
    about it are kept out of the output (it is expected, not news)."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 1.0)).close()
    except (OSError, ValueError):
        return False
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        try:
            admin = make_admin(bootstrap, api_version, timeout)
        except Exception:
            return False
        try:
            return bool(admin.describe_cluster().get("brokers"))
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                admin.close()
    finally:
        kafka_log.setLevel(level)


def list_topics(bootstrap: str, api_version: str | None, timeout: float = 5.0) -> dict[str, int]:
    """The cluster's topics (internal ones left out) and their partition counts."""
    admin = make_admin(bootstrap, api_version, timeout)
    try:
        return {
            t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics() if not t["name"].startswith("__")
        }
    finally:
        admin.close()


def wait_for_topics(bootstrap: str, api_version: str | None, names: Sequence[str], timeout: float = 30.0) -> None:
    """Block until every topic in ``names`` is in the metadata with a leader for each partition."""
    admin = make_admin(bootstrap, api_version, timeout)
    try:
        admin.wait_for_topics(list(names), timeout_ms=int(timeout * 1000))
    except Exception as exc:
        raise TopicError(f"topics not ready after {timeout:.0f}s: {exc}") from exc
    finally:
        admin.close()


def create_topics(bootstrap: str, api_version: str | None, topics: Iterable[NewTopic], timeout: float = 30.0) -> None:
    """Create topics through the CreateTopics API (brokers >= 0.10.1), with their cleanup policy.

    Existing topics are left alone (their partitions and configuration are not changed).
    """
    topics = list(topics)
    check_topic_names([t.name for t in topics])
    if not topics:
        return
    version = parse_api_version(api_version)
    if version is not None and version < (0, 10, 1):
        raise TopicError(f"the broker at {bootstrap} ({api_version}) has no CreateTopics API (needs >= 0.10.1)")
    admin = make_admin(bootstrap, api_version, timeout)
    try:
        result = admin.create_topics(
            {t.name: {"num_partitions": t.partitions, "replication_factor": 1, "configs": t.configs()} for t in topics},
            timeout_ms=int(timeout * 1000),
            raise_errors=False,
        )
        errors = []
        for topic in result.get("topics", []):
            code = topic.get("error_code", 0)
            if code == TOPIC_ALREADY_EXISTS:
                log.info("topic_exists", topic=topic.get("name"))
            elif code != 0:
                errors.append(f"{topic.get('name')}: error {code} {topic.get('error_message') or ''}".strip())
        if errors:
            raise TopicError("cannot create topics: " + "; ".join(errors))
        admin.wait_for_topics([t.name for t in topics], timeout_ms=int(timeout * 1000))
    finally:
        admin.close()


# ==================================================================================================
# Redis


def make_redis(url: str, socket_timeout_ms: int = 200, connect_timeout_ms: int = 200) -> redis.Redis:
    """A bytes-in/bytes-out client whose calls fail fast (no retries: callers fail open)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_ms / 1000,
        socket_connect_timeout=connect_timeout_ms / 1000,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    try:
        client = make_redis(url, int(timeout * 1000), int(timeout * 1000))
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()
