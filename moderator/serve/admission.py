"""The admission queue: how many images the endpoint holds at once, and who is turned away (pure).

A request of ``n`` images is admitted when the images already admitted and not yet answered, plus
``n``, stay within ``capacity``; and, once the endpoint has measured how fast it answers, when the
wait that pace predicts for it fits before its deadline. The pace is images answered per second of
*busy* time (while anything was pending), so that an idle hour does not read as a slow endpoint.
Otherwise it is refused at once with a ``Retry-After`` (the time the pending images should take to
drain, 1 s to 60 s): under overload a request gets 503 in microseconds, never a wait it cannot
survive. The caller passes the time and calls :meth:`Admission.release` when a request is answered
(decided, failed or timed out).

One thread uses it (the endpoint's event loop).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

PACE_WINDOW = 256  # answers (requests) the pace is measured over
PACE_MIN_SAMPLES = 8  # fewer images answered in the window: no prediction yet, only the capacity bound


@dataclass(frozen=True)
class Refusal:
    why: str  # "full" | "too_slow"
    retry_after_s: int
    predicted_wait_s: float | None


class Admission:
    def __init__(self, capacity: int, batch_size: int = 1) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError("capacity and batch_size must be >= 1")
        self.capacity = capacity
        self.batch_size = batch_size
        self.pending = 0
        self._busy_s = 0.0  # time with images pending, in all
        self._load = 0.0  # pending images x seconds, in all (its ratio to busy time: the mean queue)
        self._changed = 0.0  # when pending last changed
        # (busy time, load, images) at each answer
        self._answered: deque[tuple[float, float, int]] = deque(maxlen=PACE_WINDOW)

    def _tick(self, now: float) -> tuple[float, float]:
        if self.pending > 0:
            dt = max(0.0, now - self._changed)
            self._busy_s += dt
            self._load += dt * self.pending
        self._changed = now
        return self._busy_s, self._load

    def pace(self, now: float) -> float | None:
        """Images the endpoint can answer per second, from those answered per busy second between the
        window's first answer and its last (None until enough were). A pace measured with fewer images
        pending than a batch holds is scaled up to a full batch's: requests one at a time say little of
        what a burst of them costs, since they share batches (an estimate that errs towards admitting; the
        deadline bounds the wait either way)."""
        if len(self._answered) < 2:
            return None
        images = sum(n for _, _, n in list(self._answered)[1:])
        span = self._answered[-1][0] - self._answered[0][0]
        if images < PACE_MIN_SAMPLES or span <= 0:
            return None
        queue = (self._answered[-1][1] - self._answered[0][1]) / span  # mean images pending while busy
        return images / span * max(1.0, self.batch_size / max(queue, 1.0))

    def predicted_wait(self, n: int, now: float) -> float | None:
        pace = self.pace(now)
        return None if pace is None else (self.pending + n) / pace

    def admit(self, n: int, now: float, deadline: float) -> Refusal | None:
        """Admit ``n`` images (None) or say why not."""
        wait = self.predicted_wait(n, now)
        if self.pending + n > self.capacity:
            return Refusal("full", self._retry_after(wait), wait)
        if wait is not None and self.pending > 0 and now + wait > deadline:
            return Refusal("too_slow", self._retry_after(wait), wait)
        self._tick(now)
        self.pending += n
        return None

    def release(self, n: int, now: float, answered: bool) -> None:
        """``n`` admitted images left: ``answered`` when they were decided or failed (they count in the
        pace), not when their request timed out."""
        busy, load = self._tick(now)
        self.pending = max(0, self.pending - n)
        if answered:
            self._answered.append((busy, load, n))

    @staticmethod
    def _retry_after(wait: float | None) -> int:
        return min(60, max(1, math.ceil(round(wait, 6)))) if wait is not None else 1
