"""The worker's consumer loop: receive, parse, hand to the stages; backpressure, commits, shutdown."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from moderator import observability as obs
from moderator import tracing
from moderator.banks.store import Banks
from moderator.clients import headers_enabled
from moderator.config import Settings
from moderator.errors import ReasonError
from moderator.events import parse_event
from moderator.fetch import Fetcher
from moderator.policy import PolicyRegistry
from moderator.worker.checkpoint import Checkpoint, describe
from moderator.worker.event import Decided, Event, ImageEngine
from moderator.worker.outputs import Outputs, Publisher
from moderator.worker.rebalance import RebalanceListener, rebalance_wait_budget
from moderator.worker.stages import build_stages
from moderator.worker.transactions import Transactions

log = obs.get_logger(__name__)

EXIT_OK = 0  # stopped; every received event done and committed
EXIT_PUBLISH_FAILED = 1  # a record could not be published after every retry, or transactions failed (uncommitted)
EXIT_UNFINISHED = 3  # stopped at the shutdown deadline with events not done (they stay uncommitted)


def _record_timestamp(ts: Any) -> int | None:
    return int(ts) if isinstance(ts, int) and ts >= 0 else None


class Worker:
    """Consumes the images topic and decides every event; see the package docstring for the threads.

    The Kafka clients are given (``moderator.app.App.worker`` builds them from the settings; the
    benchmark and the unit tests give an in-process :class:`~moderator.worker.feed.QueueFeed`), and
    so are the banks (the followed banks topic, or a fixed index).
    """

    def __init__(
        self,
        settings: Settings,
        engine: ImageEngine,
        registry: PolicyRegistry,
        *,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        fetcher: Fetcher,
        banks: Banks,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.consumer = consumer
        self.producer = producer
        self.topic = settings.topic("images")
        headers = headers_enabled(settings, producer)
        self.transactions = None
        if settings.exactly_once:
            self.transactions = Transactions(producer, consumer, settings.worker_transactional_id(), headers)
        interval_ms = settings.transaction_interval_ms if settings.exactly_once else settings.commit_interval_ms
        self.checkpoint = Checkpoint(consumer, settings.max_in_flight, interval_ms / 1000, self.transactions,
                                     settings.publish_retries)  # fmt: skip
        self.outputs = Outputs(settings, headers)
        self.publisher = Publisher(producer, self.checkpoint, settings.publish_retries)
        self.images, self.batches = build_stages(self, settings, engine, registry, banks, fetcher)
        self._stopping = threading.Event()
        self.assigned = self.checkpoint.assigned  # set while partitions are assigned (readiness)

    # --- the stages' sink ---------------------------------------------------------------------------
    def decided(self, result: Decided) -> None:
        if result.event.reply is not None:  # a synchronous request beside the stream (moderator serve)
            result.event.reply.decided(result)
            return
        self.publisher.send(result.event, self.outputs.decided(result))

    def failed(self, e: Event, reason: str, message: str) -> None:
        if e.reply is not None:  # answered to its requester, not dead-lettered
            e.reply.failed(reason, message)
            return
        self.publisher.send(e, [self.outputs.dead_letter(e, reason, message)])

    # --- the consumer's thread --------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> int:
        """Consume until stopped (SIGTERM/SIGINT or :meth:`stop`); returns an exit code (``EXIT_*``)."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop(f"signal {signum}"))
        if self.settings.fetch_allow_networks:
            log.warning("fetch_private_networks_allowed", networks=list(self.settings.fetch_allow_networks))
        self._wait_for_topic()
        if self.transactions is not None:
            self.transactions.start()  # fences an earlier instance of this worker, aborts what it left open
        listener = RebalanceListener(self.checkpoint, self.consumer, rebalance_wait_budget(self.settings))
        self.consumer.subscribe([self.topic], listener=listener)
        # One metadata refresh after subscribing, before the first join: kafka-python builds the
        # snapshot it compares assignments against from metadata updates; without one, the first
        # refresh after joining looks like a partition change and rebalances for nothing.
        self.consumer.topics()
        self.batches.start()
        log.info("worker_started", topic=self.topic, group=self.settings.kafka_group_id,
                 model=self.engine.fingerprint, image_precision=self.engine.tower.precision,
                 policies=sorted(self.registry.current.policies))  # fmt: skip
        try:
            while not self._stopping.is_set():
                for tp, records in self.consumer.poll(timeout_ms=100).items():
                    for record in records:
                        self._receive(tp, record)
                if not self.publisher.resend_refused():
                    self.stop(self.publisher.fatal or "publishing failed")
                self.checkpoint.backpressure()
                self.checkpoint.maybe_commit()
                if self.checkpoint.fatal is not None:
                    self.stop(self.checkpoint.fatal)
            return self._shutdown()
        except Exception:
            log.exception("worker_crashed")
            self._stopping.set()
            self.images.ready.put(None)
            raise

    def stop(self, why: str = "requested") -> None:
        if not self._stopping.is_set():
            log.info("worker_stopping", why=why)
            self._stopping.set()

    def _wait_for_topic(self, timeout: float = 30.0) -> None:
        """Have the topic's partitions in the consumer's metadata before joining the group.

        kafka-python compares the partitions it assigned against later metadata; joining before the
        topic is known makes it see a change on the next refresh and rebalance for nothing.
        """
        deadline = time.monotonic() + timeout
        while not self.consumer.partitions_for_topic(self.topic):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"topic {self.topic!r} does not exist (or has no partitions) on "
                    f"{self.settings.kafka_bootstrap_servers}: create it (moderator topics create),"
                    " or set MODERATOR_TOPIC_IMAGES"
                )
            time.sleep(0.2)

    def _receive(self, tp: TopicPartition, record: Any) -> None:
        obs.EVENTS_IN.inc()
        e = Event(self.checkpoint.receive(tp, record.offset), record.key, record.value or b"",
                  _record_timestamp(record.timestamp), time.monotonic())  # fmt: skip
        if self.outputs.headers:
            e.trace = tracing.from_headers(record.headers)
        try:
            e.parsed = parse_event(record.key, record.value, self.settings.input_format == "raw",
                                   self.settings.image_max_bytes)  # fmt: skip
            self.registry.current.get(e.parsed.policy)
        except ReasonError as exc:
            self.failed(e, exc.reason, str(exc))
            return
        self.images.submit(e)

    def _shutdown(self) -> int:
        """The checkpoint's shutdown steps (``checkpoint.py``), then close the clients."""
        closed = self.checkpoint.close(
            time.monotonic() + self.settings.shutdown_timeout_s,
            resend=self.publisher.resend_refused,
            stop_engine=self.batches.stop,
            flush=lambda timeout: self.producer.flush(timeout=timeout),
        )
        self.images.close()
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=5)
        log.info("worker_stopped", unfinished=closed.unfinished, committed=describe(closed.committed))
        fatal = self.publisher.fatal or self.checkpoint.fatal
        if fatal is not None:
            log.error("worker_failed", reason=fatal)
            return EXIT_PUBLISH_FAILED
        return EXIT_OK if closed.unfinished == 0 else EXIT_UNFINISHED
