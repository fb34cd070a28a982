"""Shared fixtures.

Services (session-scoped, started on first use and stopped at the end of the run):

- ``kafka_service`` -> :class:`KafkaService`: a real broker. By default ZooKeeper + Kafka from
  :class:`moderator.stack.LocalStack` in a temporary directory; with ``MODERATOR_TEST_KAFKA`` set
  (bootstrap servers, and ``MODERATOR_TEST_KAFKA_API_VERSION`` for brokers that cannot be probed)
  that broker instead, which must then support the CreateTopics API (>= 0.10.1).
- ``redis_service`` -> :class:`RedisService`: a real Redis; ``MODERATOR_TEST_REDIS`` (a URL)
  to use one of your own. A Redis-only test starts no Kafka.
- ``stack`` -> :class:`moderator.stack.StackInfo` of both.

Per test: ``make_topic``, ``make_producer``, ``make_consumer`` (unique names; everything closed
at the end), ``redis_client`` (keys under ``redis_key_prefix`` are deleted at the end) and
``settings_factory`` (a :class:`moderator.config.Settings` pointing at the test services).

Everything under ``tests/integration`` is marked ``integration``: ``pytest -m "not integration"``
runs the unit tests alone. Tests marked ``slow`` (larger simulation runs) are skipped unless
``--slow`` is given (``make slow``).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pytest

from moderator.clients import create_topics
from moderator.config import Settings, parse_api_version
from moderator.stack import LocalStack, StackInfo
from moderator.topics import TOPICS, NewTopic

if TYPE_CHECKING:
    import redis
    from kafka import KafkaConsumer, KafkaProducer

pytest_plugins = ["tests.model_fixtures"]

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (larger simulations)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.skip(reason="a larger run: give --slow")
    for item in items:
        if INTEGRATION_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(slow)


# --------------------------------------------------------------------------------------------------
# Services


@dataclass(frozen=True)
class KafkaService:
    bootstrap_servers: str  # "host:port[,host:port...]"
    api_version: str | None  # "0.9" for the local legacy broker; None: clients probe
    local: LocalStack | None = None  # the stack that runs it, None for an external broker
    broker: str = "kafka"  # kafka (Apache Kafka 0.9, or an external broker) or tansu

    @property
    def api_version_tuple(self) -> tuple[int, ...] | None:
        return parse_api_version(self.api_version)

    @property
    def supports_idempotence(self) -> bool:
        v = self.api_version_tuple
        return v is None or v >= (0, 11)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every kafka-python client needs for this broker."""
        kwargs: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers.split(",")}
        if self.api_version_tuple is not None:
            kwargs["api_version"] = self.api_version_tuple
        return kwargs

    def create_topics(self, topics: Sequence[NewTopic]) -> None:
        if self.local is not None:
            self.local.create_topics(topics)
        else:
            create_topics(self.bootstrap_servers, self.api_version, topics)

    def delete_topics(self, names: Sequence[str]) -> None:
        """Best effort, external brokers only (a local stack is thrown away whole)."""
        if self.local is not None or not names:
            return
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(**self.client_kwargs())
        except Exception:
            return
        try:
            admin.delete_topics(list(names), raise_errors=False)
        except Exception:
            pass
        finally:
            admin.close()


@dataclass(frozen=True)
class RedisService:
    url: str  # "redis://host:port/db"
    local: LocalStack | None = None


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupt_on_termination() -> Callable[[], None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so that pytest tears the fixtures down."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, _raise_keyboard_interrupt)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The run's LocalStack (nothing started yet: kafka_service / redis_service start what they need).

    It is stopped at the end of the session, on Ctrl-C or SIGTERM (teardown and atexit), and, on
    Linux, the kernel kills its servers if pytest itself is killed.
    """
    restore = _interrupt_on_termination()
    stack = LocalStack(tmp_path_factory.mktemp("stack"))
    try:
        yield stack
    finally:
        stack.stop()
        restore()


@pytest.fixture(scope="session")
def kafka_service(request: pytest.FixtureRequest) -> KafkaService:
    external = os.environ.get("MODERATOR_TEST_KAFKA", "").strip()
    if external:
        return KafkaService(external, os.environ.get("MODERATOR_TEST_KAFKA_API_VERSION", "").strip() or None)
    stack: LocalStack = request.getfixturevalue("local_stack")
    stack.broker = os.environ.get("MODERATOR_TEST_BROKER", "").strip() or "kafka"  # kafka (0.9) or tansu
    info = stack.start(kafka=True, redis=False)
    assert info.kafka_bootstrap is not None
    return KafkaService(info.kafka_bootstrap, info.kafka_api_version, stack, stack.broker)


@pytest.fixture(scope="session")
def tansu_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaService]:
    """A Tansu broker (modern protocol versions: headers, idempotence, transactions) whatever the run's
    broker is: the run's own when it is Tansu (``MODERATOR_TEST_BROKER=tansu``), else one more of its own."""
    if (os.environ.get("MODERATOR_TEST_BROKER", "").strip() or "kafka") == "tansu" and not os.environ.get(
        "MODERATOR_TEST_KAFKA", ""
    ).strip():
        yield request.getfixturevalue("kafka_service")
        return
    stack = LocalStack(tmp_path_factory.mktemp("tansu"), broker="tansu")
    try:
        info = stack.start(kafka=True, redis=False)
        assert info.kafka_bootstrap is not None
        yield KafkaService(info.kafka_bootstrap, info.kafka_api_version, stack, "tansu")
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def redis_service(request: pytest.FixtureRequest) -> RedisService:
    external = os.environ.get("MODERATOR_TEST_REDIS", "").strip()
    if external:
        return RedisService(external)
    stack: LocalStack = request.getfixturevalue("local_stack")
    info = stack.start(kafka=False, redis=True)
    assert info.redis_url is not None
    return RedisService(info.redis_url, stack)


@pytest.fixture(scope="session")
def stack(kafka_service: KafkaService, redis_service: RedisService) -> StackInfo:
    """Kafka and Redis both up; where they listen."""
    local = kafka_service.local or redis_service.local
    base = local.info if local is not None else StackInfo()
    return replace(
        base,
        kafka_bootstrap=kafka_service.bootstrap_servers,
        kafka_api_version=kafka_service.api_version,
        redis_url=redis_service.url,
    )


# --------------------------------------------------------------------------------------------------
# Per-test factories


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_name("t")`` -> ``t-<test name>-<8 hex>``: safe as a topic, group or key prefix."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:80]

    def make(prefix: str) -> str:
        return f"{prefix}-{slug}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def make_topic(kafka_service: KafkaService, unique_name: Callable[[str], str]) -> Iterator[Callable[..., str]]:
    """``make_topic(partitions=1, name=None, compacted=False) -> name``: a new topic, every partition
    with a leader."""
    created: list[str] = []

    def make(partitions: int = 1, name: str | None = None, compacted: bool = False) -> str:
        topic = name or unique_name("t")
        kafka_service.create_topics([NewTopic(topic, partitions, compacted)])
        created.append(topic)
        return topic

    yield make
    kafka_service.delete_topics(created)


@pytest.fixture
def make_producer(kafka_service: KafkaService) -> Iterator[Callable[..., KafkaProducer]]:
    """``make_producer(**overrides) -> KafkaProducer`` for the test broker (closed at the end).

    Idempotence is off for brokers older than 0.11, which cannot do it.
    """
    from kafka import KafkaProducer

    producers: list[KafkaProducer] = []

    def make(**overrides: Any) -> KafkaProducer:
        kwargs = kafka_service.client_kwargs()
        if not kafka_service.supports_idempotence:
            kwargs["enable_idempotence"] = False
        kwargs.update(overrides)
        producer = KafkaProducer(**kwargs)
        producers.append(producer)
        return producer

    yield make
    for producer in producers:
        producer.close(timeout=5)


_UNIQUE: Any = object()


@pytest.fixture
def make_consumer(
    kafka_service: KafkaService, unique_name: Callable[[str], str]
) -> Iterator[Callable[..., KafkaConsumer]]:
    """``make_consumer(*topics, group=<new group>, **overrides) -> KafkaConsumer`` (closed at the end).

    Subscribes to ``topics`` (if any); ``group=None`` for no group. Defaults: earliest offsets, no
    auto-commit, short session timeouts.
    """
    from kafka import KafkaConsumer

    consumers: list[KafkaConsumer] = []

    def make(*topics: str, group: str | None = _UNIQUE, **overrides: Any) -> KafkaConsumer:
        kwargs = kafka_service.client_kwargs()
        kwargs.update(
            group_id=unique_name("g") if group is _UNIQUE else group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )
        kwargs.update(overrides)
        consumer = KafkaConsumer(*topics, **kwargs)
        consumers.append(consumer)
        return consumer

    yield make
    for consumer in consumers:
        consumer.close(autocommit=False)


@pytest.fixture
def redis_key_prefix(unique_name: Callable[[str], str]) -> str:
    return unique_name("test") + ":"


def _delete_prefixed(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


@pytest.fixture
def redis_client(redis_service: RedisService, redis_key_prefix: str) -> Iterator[redis.Redis]:
    """A bytes-in/bytes-out client; keys under ``redis_key_prefix`` are deleted after the test."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_service.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield client
    finally:
        _delete_prefixed(client, redis_key_prefix)
        client.close()


@pytest.fixture
def settings_factory(
    request: pytest.FixtureRequest, unique_name: Callable[[str], str], redis_key_prefix: str
) -> Iterator[Callable[..., Settings]]:
    """``settings_factory(kafka=True, redis=True, topics=False, partitions=1, **overrides) -> Settings``.

    Points the settings at the test services (started on demand; ``kafka="tansu"``: the Tansu broker of
    ``tansu_service``, whatever the run's broker), with a unique consumer group and
    Redis key prefix. ``topics=True`` also makes a fresh topic for every entry of the topic registry
    (``partitions`` each, compacted where the registry says so).
    ``redis=False`` disables Redis in the settings (and starts none); ``kafka=False`` starts no Kafka.
    """
    used_redis: list[RedisService] = []

    def make(
        *, kafka: bool | str = True, redis: bool = True, topics: bool = False, partitions: int = 1, **overrides: Any
    ) -> Settings:
        values: dict[str, Any] = {
            "kafka_client_id": "moderator-test",
            "kafka_group_id": unique_name("g"),
            "redis_key_prefix": redis_key_prefix + "emb:",
        }
        if kafka:
            ks: KafkaService = request.getfixturevalue("tansu_service" if kafka == "tansu" else "kafka_service")
            values["kafka_bootstrap_servers"] = ks.bootstrap_servers
            values["kafka_api_version"] = ks.api_version
            if ks.broker == "tansu":  # its group joins take about half the session timeout
                values.update(kafka_session_timeout_ms=6_000, kafka_heartbeat_interval_ms=1_000)
            if topics:
                names = {t.setting: unique_name(t.default) for t in TOPICS}
                ks.create_topics(
                    [NewTopic(names[t.setting], t.partitions_for(partitions), t.compacted) for t in TOPICS]
                )
                values.update(names)
        if redis:
            rs: RedisService = request.getfixturevalue("redis_service")
            values["redis_url"] = rs.url
            values["redis_enabled"] = True
            used_redis.append(rs)
        else:
            values["redis_enabled"] = False
        values.update(overrides)
        return Settings(**values)

    yield make
    if used_redis:
        import redis as redis_lib

        client = redis_lib.Redis.from_url(used_redis[0].url, socket_timeout=5, socket_connect_timeout=5)
        try:
            _delete_prefixed(client, redis_key_prefix)
        finally:
            client.close()
