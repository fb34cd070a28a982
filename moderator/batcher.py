"""Size-or-deadline micro-batching (Triton's dynamic-batcher rule), pure: no I/O, no clock of its own.

A batch is ready when it holds ``max_size`` items (by weight: an animation's frames are rows of
the batch, each item weighs its rows), or when its oldest item has waited ``max_delay_s``. The
caller passes the time (``time.monotonic()`` in production, plain numbers in
tests) and sleeps until :meth:`MicroBatcher.deadline`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Pending(Generic[T]):
    item: T
    since: float  # when the item entered the batcher
    weight: int = 1  # the rows it takes in a batch


class MicroBatcher(Generic[T]):
    def __init__(self, max_size: int, max_delay_s: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        if max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._queue: deque[Pending[T]] = deque()
        self.weight = 0  # of the items waiting

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, item: T, now: float, weight: int = 1) -> None:
        if weight < 1:
            raise ValueError("weight must be >= 1")
        self._queue.append(Pending(item, now, weight))
        self.weight += weight

    def deadline(self) -> float | None:
        """When the oldest waiting item's delay runs out (None when empty)."""
        return self._queue[0].since + self.max_delay_s if self._queue else None

    def ready(self, now: float) -> bool:
        if not self._queue:
            return False
        return self.weight >= self.max_size or now >= self._queue[0].since + self.max_delay_s

    def take(self, now: float, force: bool = False) -> list[Pending[T]]:
        """The next batch (oldest first, at most ``max_size`` by weight, at least one item) if ready,
        or if ``force``; else []."""
        if not (force or self.ready(now)):
            return []
        out: list[Pending[T]] = []
        taken = 0
        while self._queue and (not out or taken + self._queue[0].weight <= self.max_size):
            item = self._queue.popleft()
            taken += item.weight
            out.append(item)
        self.weight -= taken
        return out
