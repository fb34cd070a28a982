"""The composition root: every long-lived part of the product, built from the settings, in one place.

The CLI commands, the demo, the benchmark and the tests build what they need through :class:`App`
(engine, text encoder and cache, policy registry, fetcher, Kafka clients, the worker); nothing else
wires them together. Parts are built on first use, so a command that needs no model loads none.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, KafkaProducer

from moderator import clients
from moderator.banks.store import Banks, BankStore, FixedBanks
from moderator.clip import ClipEngine
from moderator.config import Settings
from moderator.embedding_cache import TextEmbeddingCache, TextEncoder
from moderator.fetch import Fetcher, FetchPolicy, parse_networks
from moderator.gate import PrecisionGate
from moderator.observability import HealthServer, get_logger
from moderator.policy import CompiledPolicy, PolicyRegistry, PolicySpec, compile_policy, load_spec
from moderator.policy.directory import DirectorySource
from moderator.policy.registry import PolicySource
from moderator.policy.topic import KafkaSource
from moderator.worker import Worker

if TYPE_CHECKING:
    from moderator.serve.endpoint import Endpoint
    from moderator.serve.keys import KeysFile

log = get_logger(__name__)


class App:
    def __init__(self, settings: Settings, *, engine: ClipEngine | None = None) -> None:
        self.settings = settings
        if engine is not None:
            self.__dict__["engine"] = engine  # a given engine (the demo's fallback, a test's)

    # --- the model and policies -------------------------------------------------------------------
    @cached_property
    def engine(self) -> ClipEngine:
        """The checkpoint of the settings; start-up errors fail fast, saying what to do. With a reduced
        image precision, its probe embeddings are checked as it loads (``precision.py``), its decisions
        under each policy by :attr:`gate` as the policies load."""
        return ClipEngine.from_settings(self.settings)

    @cached_property
    def gate(self) -> PrecisionGate:
        """Decision agreement of the reduced-precision tower under the policies (``gate.py``)."""
        return PrecisionGate(self.engine, self.settings.precision_min_agreement)

    @cached_property
    def text_cache(self) -> TextEmbeddingCache:
        s = self.settings
        client = None
        if s.redis_enabled:
            client = clients.make_redis(s.redis_url.get_secret_value(), s.redis_socket_timeout_ms,
                                        s.redis_connect_timeout_ms)  # fmt: skip
        return TextEmbeddingCache(self.engine.fingerprint, self.engine.embed_dim, client, prefix=s.redis_key_prefix,
                                  lru_size=s.text_cache_size, retry_after_s=s.redis_retry_after_s)  # fmt: skip

    @cached_property
    def encoder(self) -> TextEncoder:
        return TextEncoder(self.engine, self.text_cache)

    def compile(self, spec: PolicySpec, source: str = "<memory>") -> CompiledPolicy:
        return compile_policy(spec, self.encoder, source)

    def load_policy(self, path: str | Path) -> CompiledPolicy:
        """One policy file, validated, compiled and gated (``classify --policy``, ``policy explain``)."""
        policy = self.compile(load_spec(Path(path)), str(path))
        self.gate.check([policy])
        return policy

    @cached_property
    def policies(self) -> PolicyRegistry:
        """The policies of the configured source, loaded and compiled (not yet following: ``start()``)."""
        s = self.settings
        source: PolicySource = (
            KafkaSource(s, s.policy_allow_empty) if s.policy_source == "kafka"
            else DirectorySource(s.policy_dir, s.policy_strict)
        )  # fmt: skip
        # Every set is gated before it serves, the first one and each reload (``gate.py``).
        registry = PolicyRegistry(source, self.compile, s.default_policy, interval_s=0.25,
                                  before_swap=self.gate.check_set)  # fmt: skip
        registry.load_initial()
        return registry

    @cached_property
    def bank_store(self) -> BankStore:
        """The banks topic, read (not yet following: ``start()``). A missing topic fails start-up."""
        store = BankStore(self.settings, self.engine.fingerprint, self.engine.embed_dim)
        try:
            store.load()
        except clients.TopicError as exc:
            raise clients.TopicError(f"{exc} (or set MODERATOR_BANKS_ENABLED=false to run without banks)") from None
        return store

    def close(self) -> None:
        """Close the Kafka clients this app opened as they were needed (the banks topic's reader): before
        the broker goes away, so that none of them is left logging that it cannot reach it."""
        store = self.__dict__.pop("bank_store", None)
        if store is not None:
            store.stop()

    # --- I/O ----------------------------------------------------------------------------------------
    @cached_property
    def fetcher(self) -> Fetcher:
        s = self.settings
        return Fetcher(
            FetchPolicy(
                max_bytes=s.image_max_bytes,
                timeout_s=s.fetch_timeout_s,
                connect_timeout_s=s.fetch_connect_timeout_s,
                max_redirects=s.fetch_max_redirects,
                allowed_hosts=s.fetch_allowed_hosts,
                allow_networks=parse_networks(s.fetch_allow_networks),
            )
        )

    def producer(self, *, transactional_id: str | None = None, **overrides: Any) -> KafkaProducer:
        return clients.make_producer(self.settings, transactional_id=transactional_id, **overrides)

    def consumer(self, group_id: str | None = None, **overrides: Any) -> KafkaConsumer:
        return clients.make_consumer(self.settings, group_id, **overrides)

    def reader(self, keys: Sequence[str], *, from_beginning: bool = True, **overrides: Any) -> KafkaConsumer:
        """A group-less reader of the registry topics ``keys`` (``"decisions"``, ``"review"``, ...)."""
        topics = [self.settings.topic(k) for k in keys]
        return clients.make_reader(self.settings, topics, from_beginning=from_beginning, **overrides)

    # --- the worker ---------------------------------------------------------------------------------
    def worker(self, *, consumer: Any = None, producer: Any = None, banks: Banks | None = None) -> Worker:
        """The stream worker; ``consumer``/``producer`` replace the Kafka clients (an in-process feed),
        ``banks`` the banks topic (default: :attr:`bank_store` with Kafka clients, unless
        ``MODERATOR_BANKS_ENABLED=false``; no banks with an in-process feed)."""
        if banks is None:
            banks = self.bank_store if self.settings.banks_enabled and consumer is None else FixedBanks()
        if producer is None:  # exactly-once: the transactional producer
            txn_id = self.settings.worker_transactional_id() if self.settings.exactly_once else None
            producer = self.producer(transactional_id=txn_id)
        return Worker(
            self.settings, self.engine, self.policies,
            consumer=consumer if consumer is not None else self.consumer(),
            producer=producer,
            fetcher=self.fetcher, banks=banks,
        )  # fmt: skip

    # --- the synchronous endpoint -------------------------------------------------------------------
    @cached_property
    def api_keys(self) -> KeysFile:
        """The endpoint's API keys (``MODERATOR_SERVE_KEYS_FILE``): ``KeysError`` when missing or bad."""
        from moderator.serve.keys import load_keys

        return load_keys(self.settings)

    def endpoint(self, worker: Worker | None = None) -> Endpoint:
        """The synchronous endpoint (``moderator/serve/``): beside ``worker``, its requests in the worker's
        image stage and micro-batcher, published by its producer (an exactly-once worker's: by one of its
        own); else with stages and a producer of its own
        (banks as the worker's: the followed topic unless ``MODERATOR_BANKS_ENABLED=false``)."""
        from moderator.serve.endpoint import Endpoint, Pipeline

        s = self.settings
        redis = None
        if s.redis_enabled:
            redis = clients.make_redis(s.redis_url.get_secret_value(), s.redis_socket_timeout_ms,
                                       s.redis_connect_timeout_ms)  # fmt: skip
        if worker is not None and worker.transactions is None:
            return Endpoint(s, self.api_keys, self.policies, self.fetcher, worker.producer, worker.images.submit, redis)
        # Alone; or beside an exactly-once worker, whose producer sends only inside its transactions.
        pipeline = None
        if worker is None:
            pipeline = Pipeline(s, self.engine, self.policies, self.bank_store if s.banks_enabled else FixedBanks(),
                                self.fetcher)  # fmt: skip
        submit = pipeline.submit if pipeline is not None else worker.images.submit  # type: ignore[union-attr]
        producer = self.producer()

        def stop() -> None:
            if pipeline is not None:
                pipeline.stop()
            producer.flush(timeout=10)
            producer.close(timeout=5)

        return Endpoint(s, self.api_keys, self.policies, self.fetcher, producer, submit, redis, on_stop=stop)

    def serve_endpoint(self) -> int:
        """``moderator serve``: the endpoint alone, with its health server and policy reloads, until
        SIGTERM/SIGINT; the exit code."""
        _, engine, registry = self.api_keys, self.engine, self.policies  # start-up errors first, before any server
        store = self.bank_store.start() if self.settings.banks_enabled else None
        endpoint = self.endpoint().start()
        health = HealthServer(self.settings.http_host, self.settings.http_port).start()
        health.add_check("model_loaded", lambda: engine is not None)
        health.add_check("policies_compiled", lambda: bool(registry.current.policies))
        health.add_check("serving", lambda: endpoint.serving)
        registry.start()
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stopping.set())
        try:
            while not stopping.wait(0.5) and endpoint.serving:
                pass
        finally:
            log.info("serve_stopping")
            endpoint.stop()
            registry.stop()
            if store is not None:
                store.stop()
            health.stop()
        return 0

    def serve(self) -> int:
        """``moderator run``: the worker with its health server and policy reloads (and the synchronous
        endpoint, with ``MODERATOR_SERVE_IN_WORKER``); the exit code."""
        if self.settings.serve_in_worker:
            _ = self.api_keys
        engine, registry = self.engine, self.policies  # start-up errors first, before any server
        health = HealthServer(self.settings.http_host, self.settings.http_port).start()
        worker = self.worker()
        health.add_check("model_loaded", lambda: engine is not None)
        health.add_check("policies_compiled", lambda: bool(registry.current.policies))
        health.add_check("partitions_assigned", worker.assigned.is_set)
        endpoint = self.endpoint(worker) if self.settings.serve_in_worker else None
        if endpoint is not None:

            def stop(signum: int, frame: Any) -> None:  # the endpoint stops taking requests, then the worker
                endpoint.web_server.request_stop()
                worker.stop(f"signal {signum}")

            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, stop)
        registry.start()
        store = self.bank_store.start() if self.settings.banks_enabled else None
        try:
            if endpoint is not None:
                endpoint.start()
                health.add_check("serving", lambda: endpoint.serving)
            code = worker.run(install_signals=endpoint is None)
        finally:
            if endpoint is not None:
                endpoint.stop()
            registry.stop()
            if store is not None:
                store.stop()
            health.stop()
        stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
        if stuck:  # e.g. an image fetch past its deadline: the exit bound wins over waiting for it
            log.warning("exiting_with_threads_running", threads=stuck[:10])
            sys.stderr.flush()
            os._exit(code)
        return code
