"""Helpers for worker tests: worker processes, event producers, output collectors."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from moderator.clients import make_producer, make_reader
from moderator.config import ENV_PREFIX, Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The MODERATOR_* environment that reproduces ``settings`` in another process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        raw = getattr(settings, name)
        if hasattr(raw, "get_secret_value"):
            value = raw.get_secret_value()
        if value is None:
            continue
        env[ENV_PREFIX + name.upper()] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


class WorkerProcess:
    """``moderator run`` (or another long-running ``command``: ``serve``) in a subprocess, its log in a file."""

    def __init__(self, settings: Settings, log_path: Path, command: str = "run", **overrides: Any) -> None:
        self.settings = settings.model_copy(update=overrides) if overrides else settings
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(settings_env(self.settings))
        env.update(
            {"MODERATOR_LOG_FORMAT": "json", "MODERATOR_KAFKA_LOG_LEVEL": "INFO", "TOKENIZERS_PARALLELISM": "false"}
        )
        if self.settings.http_port == 8080:  # the default: take a free port instead
            env["MODERATOR_HTTP_PORT"] = "0"
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moderator.cli", command], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    def wait_for(self, event: str, timeout: float = 120.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(event) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} within {timeout}s:\n{self.tail()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


def inline_event(event_id: str, data: bytes, **extra: Any) -> bytes:
    return json.dumps({"id": event_id, "image": {"data": base64.b64encode(data).decode()}, **extra}).encode()


def produce(settings: Settings, items: Iterable[tuple[str, bytes]], topic: str | None = None) -> int:
    producer = make_producer(settings)
    n = 0
    for key, value in items:
        producer.send(topic or settings.topic("images"), key=key.encode(), value=value)
        n += 1
    producer.flush()
    producer.close()
    return n


def review_items_scored(settings: Settings, items: list[tuple[str, bytes]], log: Path, timeout: float = 120) -> None:
    """Run the real worker over ``items`` (event id, event) until each has its review record; stop it."""
    worker = WorkerProcess(settings, log)
    out = Outputs(settings, kinds=("review",))
    try:
        worker.wait_for("partitions_assigned")
        produce(settings, items)
        wanted = {event_id for event_id, _ in items}
        deadline = time.monotonic() + timeout
        while not wanted <= set(out.ids("review")) and time.monotonic() < deadline:
            out.poll()
        assert set(out.ids("review")) == wanted, worker.tail()
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()


class Outputs:
    """Reads the decisions, review and dead-letter topics from the beginning, incrementally."""

    def __init__(self, settings: Settings, kinds: Iterable[str] = ("decisions", "review", "dead_letters")) -> None:
        self.names = {settings.topic(k): "dead" if k == "dead_letters" else k for k in kinds}
        self.consumer = make_reader(settings, list(self.names))
        self.records: dict[str, list[dict[str, Any]]] = {kind: [] for kind in self.names.values()}

    def poll(self) -> None:
        for tp, recs in self.consumer.poll(timeout_ms=200).items():
            for r in recs:
                self.records[self.names[tp.topic]].append(json.loads(r.value))

    def ids(self, kind: str) -> list[str]:
        return [r["event_id"] for r in self.records[kind]]

    def decided(self) -> set[str]:
        return set(self.ids("decisions")) | {i for i in self.ids("dead") if i}

    def wait_for(self, ids: set[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if ids <= self.decided():
                time.sleep(0.5)  # let late duplicates, if any, arrive too
                self.poll()
                return
        missing = ids - self.decided()
        raise AssertionError(f"{len(missing)} event(s) without a record after {timeout}s, e.g. {sorted(missing)[:5]}")

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll ``condition`` every 50 ms until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)
