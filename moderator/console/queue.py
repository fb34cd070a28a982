"""The review queue, pure: review items not yet judged, by priority then age, and the verdicts known.

Items come from the review topic (``add_item``), verdicts from the verdicts topic (``add_verdict``).
An item leaves the queue when its event has a final verdict (confirm or overturn); an escalated one
waits in the escalated list for a final verdict. Per partition of the review topic, the committable
offset is the lowest one whose event has no final verdict yet (:class:`~moderator.offsets.OffsetTracker`):
a restarted console reads again from there, and the verdicts topic tells it which of those items are
already judged. Thread-safe (the feed thread adds, the web threads read).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from moderator.events import FINAL_VERDICTS, ReviewItem, Verdict
from moderator.offsets import OffsetTracker


@dataclass
class Queued:
    item: ReviewItem
    offsets: list[tuple[Hashable, int]] = field(default_factory=list)  # its records (duplicates after a crash)
    arrived: float = field(default_factory=time.time)

    @property
    def sort_key(self) -> tuple[int, str]:
        return (-self.item.priority, self.item.decided_at)  # priority first, then the oldest


class ReviewQueue:
    def __init__(self, keep_done: int = 20_000) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Queued] = {}  # not finally judged (escalated ones included)
        self._verdicts: dict[str, Verdict] = {}  # the current verdict of every event seen
        self._tracker: OffsetTracker[Hashable] = OffsetTracker()
        self._order: list[Queued] | None = None  # pending items sorted; None when it must be rebuilt
        self._done: OrderedDict[str, Queued] = OrderedDict()  # recently judged: a verdict may still change
        self.keep_done = keep_done

    # --- from the topics ----------------------------------------------------------------------------
    def add_item(self, partition: Hashable, offset: int, item: ReviewItem) -> None:
        with self._lock:
            tracked = self._tracker.start(partition, offset)
            verdict = self._verdicts.get(item.event_id)
            if verdict is not None and verdict.verdict in FINAL_VERDICTS:
                if tracked:
                    self._tracker.finish(partition, offset)
                return
            queued = self._items.get(item.event_id)
            if queued is None:
                queued = self._items[item.event_id] = Queued(item)
            else:
                queued.item = item  # a re-delivered decision of the same event: the latest one
            if tracked:
                queued.offsets.append((partition, offset))
            self._order = None

    def add_verdict(self, verdict: Verdict) -> None:
        with self._lock:
            current = self._verdicts.get(verdict.event_id)
            if current is not None and current.revision > verdict.revision:
                return  # an older revision read late
            self._verdicts[verdict.event_id] = verdict
            if verdict.verdict in FINAL_VERDICTS:
                queued = self._items.pop(verdict.event_id, None)
                if queued is not None:
                    for partition, offset in queued.offsets:
                        self._tracker.finish(partition, offset)
                    self._done[verdict.event_id] = queued
                    while len(self._done) > self.keep_done:
                        self._done.popitem(last=False)
            elif verdict.event_id in self._done:  # a final verdict changed to escalate: waiting again
                self._items[verdict.event_id] = self._done.pop(verdict.event_id)
            self._order = None

    def drop(self, partitions: Iterable[Hashable]) -> None:
        """Partitions of the review topic this console no longer owns (a rebalance): forget their items."""
        gone = set(partitions)
        with self._lock:
            self._tracker.drop(gone)
            for event_id in [e for e, q in self._items.items() if any(p in gone for p, _ in q.offsets)]:
                del self._items[event_id]
            self._order = None

    # --- for the pages --------------------------------------------------------------------------------
    def pending(self, escalated: bool = False) -> list[Queued]:
        """Items waiting for a verdict (or, ``escalated``, for a final one), by priority then age."""
        with self._lock:
            if self._order is None:
                self._order = sorted(self._items.values(), key=lambda q: q.sort_key)
            order = self._order
            verdicts = self._verdicts
            return [q for q in order if (q.item.event_id in verdicts) == escalated]

    def get(self, event_id: str) -> Queued | None:
        """A waiting item, or a recently judged one (whose verdict may be changed)."""
        with self._lock:
            return self._items.get(event_id) or self._done.get(event_id)

    def waiting(self, event_id: str) -> bool:
        with self._lock:
            return event_id in self._items

    def judged_by(self, reviewer: str, limit: int = 50) -> list[tuple[Queued, Verdict]]:
        """``reviewer``'s most recent verdicts on items still at hand, newest first."""
        with self._lock:
            mine = [(q, v) for e, q in self._done.items() if (v := self._verdicts[e]).reviewer == reviewer]
        return sorted(mine, key=lambda qv: qv[1].reviewed_at, reverse=True)[:limit]

    def verdict(self, event_id: str) -> Verdict | None:
        with self._lock:
            return self._verdicts.get(event_id)

    def depth(self) -> tuple[int, int]:
        """(items waiting for a first verdict, escalated items waiting for a final one)."""
        with self._lock:
            escalated = sum(1 for e in self._items if e in self._verdicts)
            return len(self._items) - escalated, escalated

    def committable(self) -> dict[Hashable, int]:
        with self._lock:
            return self._tracker.committable()

    def mark_committed(self, offsets: dict[Hashable, int]) -> None:
        with self._lock:
            self._tracker.mark_committed(offsets)
