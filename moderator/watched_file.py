"""A file of credentials read again when it changes: the console's accounts, ``moderator serve``'s keys.

Checked at most once a second (its modification time and size); a file that became unreadable or
invalid keeps the last good contents in use, and ``on_error`` says so once per change. The first read
happens at construction and raises: a bad file fails start-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class WatchedFile(Generic[T]):
    def __init__(
        self,
        path: Path,
        load: Callable[[Path], T],
        errors: tuple[type[Exception], ...],
        on_error: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.path = Path(path)
        self.on_error = on_error
        self._load, self._errors = load, errors
        self._value = load(self.path)  # fails fast at start-up
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> T:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return self._value
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._value = self._load(self.path)
                except self._errors as exc:
                    self.on_error(str(exc))
        return self._value
