"""The endpoint, run: its web server on a thread, its decider, and the stages it feeds (see the package)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
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
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (with proto 0, a
        # response written as headers then body waits ~40 ms for the client's delayed ACK)
        family = socket.AF_INET6 if ":" in settings.serve_host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((settings.serve_host, settings.serve_port))
        self._sock.listen(1024)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.web,
                log_config=None,
                access_log=False,
                server_header=False,
                lifespan="off",
                timeout_graceful_shutdown=3,
                proxy_headers=False,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> Endpoint:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="serve")  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the endpoint's web server did not start")
            time.sleep(0.02)
        log.info("serve_started", url=self.url)
        return self

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.server.started

    def stop(self) -> None:
        """Stop taking requests (those under way are answered within uvicorn's grace period); then the
        endpoint's own stages and producer (what they hold is still decided and published), then its threads.
        Every answered decision was published before it was answered."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        else:
            self._sock.close()
        self.on_stop()
        self.decider.close()
