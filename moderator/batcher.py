"""Size-or-deadline micro-batching (Triton's dynamic-batcher rule), pure: no I/O, no clock of its own.

A batch is ready when it holds ``max_size`` items (by weight: an animation's frames are rows of
the batch, each item weighs its rows), or when its oldest item has waited ``max_delay_s``. The
caller passes the time (``time.monotonic()`` in production, plain numbers in
tests) and sleeps until :meth:`MicroBatcher.deadline`.

An item may come with a ``due`` time of its own (a synchronous request, ``moderator serve``): it waits
in the *urgent* lane, which a batch takes first, and the batch is ready by its ``due`` time at the
latest (Triton's priority levels, with the request's own timeout). The stream's items keep their order
behind them; the urgent lane is bounded by the caller (the endpoint's admission queue), so the stream
is never starved for long.
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
    due: float | None = None  # an urgent item's own latest flush time
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
        self._urgent: deque[Pending[T]] = deque()
        self.weight = 0  # of the items waiting, both lanes

    def __len__(self) -> int:
        return len(self._queue) + len(self._urgent)

    def add(self, item: T, now: float, due: float | None = None, weight: int = 1) -> None:
        """Queue ``item`` (taking ``weight`` rows of a batch); with ``due``, in the urgent lane, to be
        flushed by ``due`` at the latest."""
        if weight < 1:
            raise ValueError("weight must be >= 1")
        (self._queue if due is None else self._urgent).append(Pending(item, now, due, weight))
        self.weight += weight

    def deadline(self) -> float | None:
        """When the next batch must run: the oldest item's delay, or an urgent item's due time (None when
        empty)."""
        times = [self._queue[0].since + self.max_delay_s] if self._queue else []
        if self._urgent:
            times.append(self._urgent[0].since + self.max_delay_s)
            times.append(min(p.due for p in self._urgent if p.due is not None))
        return min(times) if times else None

    def ready(self, now: float) -> bool:
        if not len(self):
            return False
        deadline = self.deadline()
        return self.weight >= self.max_size or (deadline is not None and now >= deadline)

    def take(self, now: float, force: bool = False) -> list[Pending[T]]:
        """The next batch (urgent items first, then the oldest; at most ``max_size`` by weight, at least
        one item) if ready, or if ``force``; else []."""
        if not (force or self.ready(now)):
            return []
        batch: list[Pending[T]] = []
        taken = 0
        for lane in (self._urgent, self._queue):
            while lane and (not batch or taken + lane[0].weight <= self.max_size):
                item = lane.popleft()
                taken += item.weight
                batch.append(item)
        self.weight -= taken
        return batch
