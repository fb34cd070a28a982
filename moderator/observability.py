"""Logs, metrics and health endpoints.

- Logs: structlog, JSON lines (one object per line, ``event`` plus key/values) or, on a TTY, the
  console renderer. Call :func:`configure_logging` once at start-up.
- Metrics: every Prometheus metric of the process is registered here, in one place, on
  :data:`REGISTRY`.
- HTTP: :class:`HealthServer` serves ``/metrics``, ``/healthz`` (the process is alive) and
  ``/readyz`` (every readiness check passes) from a daemon thread.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# --------------------------------------------------------------------------------------------------
# Logging


class _LineLogger:
    """Writes each line to a file, or to the *current* ``sys.stderr`` (which tests and daemons may swap)."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            print(message, file=self._file or sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _StderrHandler(logging.StreamHandler):
    """A logging handler that writes to the *current* ``sys.stderr``, as :class:`_LineLogger` does."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class _ClosingNoise(logging.Filter):
    """kafka-python 3 logs "Metadata refresh: failed Cancelled" at error level when a client is closed
    while a refresh is in flight: the client closing, not a failure. Those lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata refresh: failed Cancelled")


def configure_logging(
    level: str = "INFO", fmt: str = "auto", kafka_level: str = "WARNING", path: Path | None = None
) -> None:
    """Route structlog (and the standard library's logging) to stderr as JSON lines or console text,
    or, with ``path``, to that file as JSON lines (a command that prints for a person: the demo)."""
    file = path.open("a", encoding="utf-8") if path is not None else None
    use_console = file is None and (fmt == "console" or (fmt == "auto" and sys.stderr.isatty()))
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _LineLogger(file),
        cache_logger_on_first_use=False,
    )
    # Libraries (kafka-python, transformers) log through the standard library: the same format on the
    # same stream (JSON lines with their logger's name), and only from WARNING up unless asked.
    handler: logging.Handler = logging.StreamHandler(file) if file is not None else _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(logging.getLevelName(kafka_level.upper()))
    cluster = logging.getLogger("kafka.cluster")
    if not any(isinstance(f, _ClosingNoise) for f in cluster.filters):
        cluster.addFilter(_ClosingNoise())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


# --------------------------------------------------------------------------------------------------
# Metrics: one registry, every metric declared here.

REGISTRY = CollectorRegistry(auto_describe=True)

# Text-embedding cache (embedding_cache.py)
TEXT_CACHE_HITS = Counter(
    "moderator_text_cache_hits_total", "Text embeddings served from a cache", ["layer"], registry=REGISTRY
)
TEXT_CACHE_MISSES = Counter("moderator_text_cache_misses_total", "Text embeddings found in no cache", registry=REGISTRY)
TEXT_CACHE_REDIS_ERRORS = Counter(
    "moderator_text_cache_redis_errors_total",
    "Redis errors and timeouts (the cache fails open)",
    registry=REGISTRY,
)
TEXT_CACHE_REJECTED = Counter(
    "moderator_text_cache_rejected_total",
    "Cached values ignored because of a wrong dtype, shape or format",
    registry=REGISTRY,
)
TEXTS_ENCODED = Counter("moderator_texts_encoded_total", "Texts run through the text tower", registry=REGISTRY)

# Engine (clip.py, images.py)
IMAGES_ENCODED = Counter("moderator_images_encoded_total", "Images run through the image tower", registry=REGISTRY)
IMAGE_ERRORS = Counter(
    "moderator_image_errors_total",
    "Images rejected before the model, by reason",
    ["reason"],
    registry=REGISTRY,
)
# The image tower's precision (clip.py, precision.py, gate.py)
IMAGE_PRECISION = Gauge(
    "moderator_image_precision", "1 for the image tower precision serving now, 0 for the others", ["precision"],
    registry=REGISTRY,
)  # fmt: skip
PRECISION_PROBE_COSINE = Gauge(
    "moderator_precision_gate_cosine",
    "Cosine of the reduced-precision tower's probe embeddings with the fp32 tower's (stat: min, mean)",
    ["precision", "stat"],
    registry=REGISTRY,
)
PRECISION_AGREEMENT = Gauge(
    "moderator_precision_gate_agreement",
    "Share of probe images whose decision under a policy is the same at the reduced precision as in fp32",
    ["precision", "policy"],
    registry=REGISTRY,
)
PRECISION_FALLBACKS = Counter(
    "moderator_precision_fallbacks_total",
    "Times the image tower fell back to fp32 (reason: cosine, agreement, error: the tower could not be built)",
    ["reason"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "moderator_stage_seconds",
    "Seconds per unit of work in each stage: per image (fetch, decode, preprocess), per batch (transfer:"
    " to the device and normalized, forward: the image tower, score, publish: records built and handed to"
    " the producer), per record (produce: send to broker ack), per commit (commit), per exactly-once"
    " transaction (transaction: begin to committed)",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)

# Policies (policy.py)
POLICY_RELOADS = Counter(
    "moderator_policy_reloads_total",
    "Policy versions loaded (ok) or refused as invalid (error), from files or the policies topic",
    ["result"],
    registry=REGISTRY,
)
POLICY_INFO = Gauge(
    "moderator_policy_info",
    "1 for every policy version this process serves: watch a fleet converge on a published version",
    ["policy", "version", "role", "source"],
    registry=REGISTRY,
)

# Known-image banks (moderator/banks/)
BANK_ENTRIES = Gauge("moderator_bank_entries", "Entries of each bank this worker matches against", ["bank"],
                     registry=REGISTRY)  # fmt: skip
BANK_MATCHES = Counter(
    "moderator_bank_matches_total",
    "Bank rules fired, by bank and kind (positive, negative)",
    ["bank", "kind"],
    registry=REGISTRY,
)

# The worker (moderator/worker/)
EVENTS_IN = Counter("moderator_events_total", "Events received from the images topic", registry=REGISTRY)
DECISIONS = Counter("moderator_decisions_total", "Decisions published, by outcome", ["outcome"], registry=REGISTRY)
DEAD_LETTERS = Counter(
    "moderator_dead_letters_total", "Events dead-lettered, by reason code", ["reason"], registry=REGISTRY
)
IN_FLIGHT = Gauge("moderator_in_flight_events", "Events received and not yet acknowledged", registry=REGISTRY)
TRANSACTIONS = Counter(
    "moderator_transactions_total",
    "Exactly-once transactions, by outcome (committed, aborted)",
    ["outcome"],
    registry=REGISTRY,
)
BACKPRESSURE_PAUSES = Counter(
    "moderator_backpressure_pauses_total", "Times the consumer paused at max_in_flight", registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "moderator_batch_size", "Images per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY
)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
EVENT_LATENCY = Histogram(
    "moderator_event_seconds", "From receipt to decision published", buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
END_TO_END = Histogram(
    "moderator_end_to_end_seconds",
    "From the event's Kafka timestamp to its decision (brokers that keep timestamps)",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)

# The review console (moderator/console/)
CONSOLE_QUEUE = Gauge(
    "moderator_console_queue_depth", "Review items waiting, by state", ["state"], registry=REGISTRY
)  # state: pending (no verdict yet), escalated (waiting for a final verdict), second (waiting for a second
# reviewer's verdict: double review), set_aside (its image changed since it was scored: not handed out)
CONSOLE_CLAIMS = Counter("moderator_console_claims_total", "Review items claimed by a reviewer", registry=REGISTRY)
CONSOLE_LEASE_EXPIRIES = Counter(
    "moderator_console_lease_expiries_total",
    "Claims that expired without a verdict (the item returned)",
    registry=REGISTRY,
)
CONSOLE_VERDICTS = Counter(
    "moderator_console_verdicts_total", "Verdicts published, by verdict", ["verdict"], registry=REGISTRY
)
CONSOLE_DECISION_TO_VERDICT = Histogram(
    "moderator_console_decision_to_verdict_seconds",
    "From the decision to its verdict",
    buckets=(60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86_400, 3 * 86_400, 7 * 86_400),
    registry=REGISTRY,
)
CONSOLE_IMAGE_CHANGED = Counter(
    "moderator_console_image_changed_total",
    "Review items whose image bytes differ from those the worker scored (refused, set aside)",
    registry=REGISTRY,
)
CONSOLE_LOGIN_REFUSED = Counter(
    "moderator_console_logins_refused_total",
    "Sign-ins refused before a password was checked (backoff: too many failures; busy: the hash pool is full)",
    ["why"],
    registry=REGISTRY,
)
CONSOLE_REVEALS = Counter(
    "moderator_console_images_revealed_total",
    "Images reviewers unblurred: an exposure figure to watch (per reviewer: the console_reveal log lines;"
    " metrics name no person)",
    registry=REGISTRY,
)

# The synchronous endpoint (moderator/serve/)
SERVE_REQUESTS = Counter(
    "moderator_serve_requests_total", "Requests answered, by route and status", ["route", "status"], registry=REGISTRY
)
SERVE_SECONDS = Histogram(
    "moderator_serve_request_seconds", "From a request's arrival to its answer (decided ones)", ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY,
)  # fmt: skip
SERVE_PENDING = Gauge("moderator_serve_pending_images", "Images admitted and not yet answered", registry=REGISTRY)
SERVE_REFUSED = Counter(
    "moderator_serve_refused_total",
    "Requests refused before deciding (full: admission queue; too_slow: would miss its deadline; rate: key's rate;"
    " timeout: deadline passed)",
    ["why"],
    registry=REGISTRY,
)
SERVE_REPLAYED = Counter(
    "moderator_serve_replayed_total", "Images answered from the idempotency store (same id, same bytes)",
    registry=REGISTRY,
)  # fmt: skip

READY = Gauge("moderator_ready", "1 when every readiness check passes", registry=REGISTRY)


# --------------------------------------------------------------------------------------------------
# HTTP: /metrics, /healthz, /readyz

ReadinessCheck = Callable[[], bool]


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread.

    ``/readyz`` answers 200 when every registered check returns True, else 503 with the failing
    check names in a JSON body.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 8080) -> None:
        self._checks: dict[str, ReadinessCheck] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b'{"status": "ok"}\n', "application/json")
                elif path == "/readyz":
                    failing = server.failing_checks()
                    READY.set(0 if failing else 1)
                    body = {"status": "ready" if not failing else "not ready", "failing": failing}
                    self._send(200 if not failing else 503, json.dumps(body).encode() + b"\n", "application/json")
                else:
                    self._send(404, b'{"status": "not found"}\n', "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # silence per-request lines
                return

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def failing_checks(self) -> list[str]:
        failing = []
        for name, check in list(self._checks.items()):
            try:
                ok = bool(check())
            except Exception:
                ok = False
            if not ok:
                failing.append(name)
        return failing

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
