"""A function called every few seconds on its own thread: how the policy registry and the bank store
follow their sources."""

from __future__ import annotations

import threading
from collections.abc import Callable

from moderator.observability import get_logger

log = get_logger(__name__)


class Periodic:
    """Calls ``fn`` every ``interval_s`` on a daemon thread until :meth:`stop`; an exception is logged
    (as ``error_event``) and the next call happens anyway."""

    def __init__(self, fn: Callable[[], object], interval_s: float, name: str, error_event: str) -> None:
        self.fn = fn
        self.interval_s = interval_s
        self.name = name
        self.error_event = error_event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.fn()
                except Exception:
                    log.exception(self.error_event)

        self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
