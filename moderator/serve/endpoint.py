"""The endpoint, run: its web server on a thread, its decider, and the stages it feeds (see the package)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer

from moderator.banks.store import Banks
from moderator.config import Settings
from moderator.events import MAX_METADATA_BYTES
from moderator.fetch import Fetcher
from moderator.observability import get_logger
from moderator.policy import PolicyRegistry
from moderator.serve.app import ServeConfig, create_app
from moderator.serve.decide import Decider
from moderator.serve.keys import KeysFile
from moderator.serve.store import DecisionStore
from moderator.web_server import WebServer
from moderator.worker.event import Decided, Event, ImageEngine
from moderator.worker.stages import build_stages

log = get_logger(__name__)


class _Replies:
    """The stages' sink when no stream worker runs: every event is a request's, answered to it."""

    def decided(self, result: Decided) -> None:
        assert result.event.reply is not None
        result.event.reply.decided(result)

    def failed(self, e: Event, reason: str, message: str) -> None:
        assert e.reply is not None
        e.reply.failed(reason, message)


class Pipeline:
    """The image stage and the micro-batcher of an endpoint that runs without a stream worker."""

    def __init__(self, settings: Settings, engine: ImageEngine, registry: PolicyRegistry, banks: Banks,
                 fetcher: Fetcher) -> None:  # fmt: skip
        self.images, self.batches = build_stages(_Replies(), settings, engine, registry, banks, fetcher)
        self.batches.start()

    def submit(self, e: Event) -> None:
        self.images.submit(e)

    def stop(self, timeout: float = 10.0) -> None:
        self.batches.stop(timeout)
        self.images.close()


def max_request_bytes(settings: Settings) -> int:
    """A request's body at most: the largest inline image (base64: 4/3) with its envelope, or a
    /v1/moderations request's data URLs."""
    return settings.image_max_bytes * 4 // 3 + MAX_METADATA_BYTES + 64 * 1024


class Endpoint:
    def __init__(
        self,
        settings: Settings,
        keys: KeysFile,
        registry: PolicyRegistry,
        fetcher: Fetcher,
        producer: KafkaProducer,
        submit: Callable[[Event], None],
        redis: Any,
        *,
        on_stop: Callable[[], None] = lambda: None,
    ) -> None:
        self.on_stop = on_stop  # what the endpoint's own stages and clients need to stop
        store = DecisionStore(redis, settings.serve_redis_prefix, settings.serve_idempotency_ttl_s,
                              retry_after_s=settings.redis_retry_after_s)  # fmt: skip
        self.decider = Decider(settings, registry, fetcher, producer, submit, store)
        self.web = create_app(
            ServeConfig(
                keys=keys, rate_per_s=settings.serve_rate_per_s, burst=settings.serve_burst,
                timeout_s=settings.serve_timeout_s, max_timeout_s=settings.serve_max_timeout_s,
                max_request_bytes=max_request_bytes(settings), max_inputs=settings.serve_max_inputs,
                image_max_bytes=settings.image_max_bytes,
            ),
            self.decider,
        )  # fmt: skip
        self.web_server = WebServer(self.web, settings.serve_host, settings.serve_port, backlog=1024, name="serve")

    @property
    def url(self) -> str:
        return self.web_server.url

    def start(self) -> Endpoint:
        self.web_server.start()
        log.info("serve_started", url=self.url)
        return self

    @property
    def serving(self) -> bool:
        return self.web_server.running

    def stop(self) -> None:
        """Stop taking requests (those under way are answered within uvicorn's grace period); then the
        endpoint's own stages and producer (what they hold is still decided and published), then its threads.
        Every answered decision was published before it was answered."""
        self.web_server.stop()
        self.on_stop()
        self.decider.close()
