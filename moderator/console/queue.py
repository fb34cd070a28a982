"""The review queue, pure: review items not yet judged, by priority then age, and the verdicts known.

An item is an event id *and* the image's sha256 (its ``handle``): an id re-used for other bytes is a new
item, and a verdict applies to the bytes it names. Items come from the review topic (``add_item``),
verdicts from the verdicts topic (``add_verdict``). An item leaves the queue when it has a final verdict
(confirm or overturn) and, when drawn for double review, a second reviewer's final verdict too; an
escalated one waits in the escalated list for a final verdict; one whose image changed since it was
scored is set aside (``set_aside``): it is never handed out again by this console.

Per partition of the review topic, the committable offset is the lowest one whose item is not done
(:class:`~moderator.offsets.OffsetTracker`): a restarted console reads again from there, and the
verdicts topic tells it which of those items are already judged. Thread-safe (the feed thread adds, the
web threads read).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import Literal

from moderator.events import FINAL_VERDICTS, ReviewItem, Verdict
from moderator.offsets import OffsetTracker

Stage = Literal["new", "escalated", "second"]
HISTORY = 200_000  # verdict records kept for the lead's page


@dataclass
class Queued:
    item: ReviewItem
    offsets: list[tuple[Hashable, int]] = field(default_factory=list)  # its records (duplicates after a crash)
    arrived: float = field(default_factory=time.time)
    set_aside: str | None = None  # why it is not handed out (its image changed since it was scored)
    queue: str = "default"  # the named queue its route chose (routing.py)
    handle: str = field(init=False)  # the item's handle, hashed once (asked for every item scanned)

    def __post_init__(self) -> None:
        self.handle = self.item.handle  # a merged record of the item has the same one

    @property
    def sort_key(self) -> tuple[int, str]:
        return (-self.item.priority, self.item.decided_at)  # priority first, then the oldest


def _merge(old: ReviewItem, new: ReviewItem) -> ReviewItem:
    """Two records of one item (a re-delivery, or a bank scan's retroactive finding of a pending item):
    the latest, keeping why it was drawn (an audit sample stays one, a second review stays asked for)."""
    keep: dict[str, object] = {}
    if old.sampled and not new.sampled:
        keep.update(sampled=True, sample_rate=old.sample_rate)
    if old.second_review and not new.second_review:
        keep["second_review"] = True
    if old.retroactive and not new.retroactive:
        keep["retroactive"] = True
    return new.model_copy(update=keep) if keep else new


class ReviewQueue:
    def __init__(self, keep_done: int = 20_000, route: Callable[[ReviewItem], str] = lambda item: "default") -> None:
        self._lock = threading.Lock()
        self.route = route  # the named queue of an item
        self._items: dict[str, Queued] = {}  # by handle: not done (escalated and second-review ones included)
        self._verdicts: dict[str, Verdict] = {}  # by handle: the current verdict of every item seen
        self._seconds: dict[str, Verdict] = {}  # by handle: second opinions (double review)
        self._legacy: dict[str, Verdict] = {}  # by event id: verdicts that name no image (older records)
        self._tracker: OffsetTracker[Hashable] = OffsetTracker()
        self._order: list[Queued] | None = None  # pending items sorted; None when it must be rebuilt
        self._done: OrderedDict[str, Queued] = OrderedDict()  # recently judged: a verdict may still change
        self.keep_done = keep_done
        # every verdict record read, once (a console reads its own back): the lead's page
        self._history: OrderedDict[tuple[str, int], Verdict] = OrderedDict()

    # --- state of one item (under the lock) -----------------------------------------------------------
    def _verdict(self, q: Queued) -> Verdict | None:
        return self._verdicts.get(q.handle) or self._legacy.get(q.item.event_id)

    def _stage(self, q: Queued) -> Stage | None:
        """Where the item is: waiting for a first verdict, escalated, waiting for a second opinion; None: done."""
        v = self._verdict(q)
        if v is None:
            return "new"
        if v.verdict not in FINAL_VERDICTS:
            return "escalated"
        second = self._seconds.get(q.handle)
        if q.item.second_review and (second is None or second.verdict not in FINAL_VERDICTS):
            return "second"
        return None

    def _settle(self, handle: str) -> None:
        """Move an item between the waiting ones and the recently done ones as its verdicts say."""
        queued = self._items.get(handle) or self._done.get(handle)
        if queued is None:
            return
        done = self._stage(queued) is None
        if done and handle in self._items:
            del self._items[handle]
            for partition, offset in queued.offsets:
                self._tracker.finish(partition, offset)
            queued.offsets = []
            self._done[handle] = queued
            while len(self._done) > self.keep_done:
                self._done.popitem(last=False)
        elif not done and handle in self._done:  # a final verdict changed to escalate: waiting again
            self._items[handle] = self._done.pop(handle)
        self._order = None

    # --- from the topics ----------------------------------------------------------------------------
    def add_item(self, partition: Hashable, offset: int, item: ReviewItem) -> None:
        with self._lock:
            tracked = self._tracker.start(partition, offset)
            handle = item.handle
            queued = self._items.get(handle)
            if queued is None:
                queued = Queued(item, queue=self.route(item))
                if self._stage(queued) is None:  # judged already (a restart reads it again)
                    if tracked:
                        self._tracker.finish(partition, offset)
                    return
                self._items[handle] = queued
            else:
                queued.item = _merge(queued.item, item)
                queued.queue = self.route(queued.item)
            if tracked:
                queued.offsets.append((partition, offset))
            self._order = None

    def add_verdict(self, verdict: Verdict) -> None:
        with self._lock:
            if (verdict.key, verdict.revision) not in self._history:
                self._history[(verdict.key, verdict.revision)] = verdict
                if len(self._history) > HISTORY:
                    self._history.popitem(last=False)
            if verdict.image_sha256 is None:  # an older record: it judges the event id's item
                current = self._legacy.get(verdict.event_id)
                if current is None or current.revision <= verdict.revision:
                    self._legacy[verdict.event_id] = verdict
                for handle in [h for h, q in self._items.items() if q.item.event_id == verdict.event_id]:
                    self._settle(handle)
                return
            into = self._seconds if verdict.second_opinion else self._verdicts
            current = into.get(verdict.handle)
            if current is not None and current.revision > verdict.revision:
                return  # an older revision read late
            into[verdict.handle] = verdict
            self._settle(verdict.handle)

    def set_aside(self, handle: str, why: str) -> None:
        """Never hand this item out again (its image changed since it was scored); it stays waiting."""
        with self._lock:
            queued = self._items.get(handle)
            if queued is not None:
                queued.set_aside = why
                self._order = None

    # --- for the pages --------------------------------------------------------------------------------
    def pending(
        self, stage: Stage = "new", for_reviewer: str | None = None, queues: Collection[str] | None = None
    ) -> list[Queued]:
        """Items waiting in ``stage``, by priority then age (of ``queues`` only, when given). With
        ``for_reviewer``: the ones that reviewer may claim now (a first verdict, or a second opinion on
        someone else's), never the set-aside ones."""
        with self._lock:
            if self._order is None:
                self._order = sorted(self._items.values(), key=lambda q: q.sort_key)
            out = []
            for q in self._order:
                if queues is not None and q.queue not in queues:
                    continue
                where = self._stage(q)
                if for_reviewer is None:
                    if where == stage:
                        out.append(q)
                    continue
                if q.set_aside is not None:
                    continue
                if where == stage or (stage == "new" and where == "second" and self._first(q) != for_reviewer):
                    out.append(q)
            return out

    def _first(self, q: Queued) -> str | None:
        v = self._verdict(q)
        return v.reviewer if v is not None else None

    def get(self, handle: str) -> Queued | None:
        """A waiting item, or a recently judged one (whose verdict may be changed)."""
        with self._lock:
            return self._items.get(handle) or self._done.get(handle)

    def stage(self, handle: str) -> Stage | None:
        with self._lock:
            q = self._items.get(handle) or self._done.get(handle)
            return self._stage(q) if q is not None else None

    def judged_by(self, reviewer: str, limit: int = 50) -> list[tuple[Queued, Verdict]]:
        """``reviewer``'s most recent verdicts on items still at hand, newest first."""
        with self._lock:
            mine = []
            for q in [*self._done.values(), *self._items.values()]:
                for v in (self._verdict(q), self._seconds.get(q.handle)):
                    if v is not None and v.reviewer == reviewer:
                        mine.append((q, v))
        return sorted(mine, key=lambda qv: qv[1].reviewed_at, reverse=True)[:limit]

    def verdict(self, handle: str) -> Verdict | None:
        with self._lock:
            q = self._items.get(handle) or self._done.get(handle)
            return self._verdict(q) if q is not None else self._verdicts.get(handle)

    def second_opinion(self, handle: str) -> Verdict | None:
        with self._lock:
            return self._seconds.get(handle)

    def revisions(self, handle: str) -> tuple[int, int]:
        """The revisions of the item's verdict and second opinion known here (0: none)."""
        with self._lock:
            q = self._items.get(handle) or self._done.get(handle)
            first = self._verdict(q) if q is not None else self._verdicts.get(handle)
            second = self._seconds.get(handle)
            return (first.revision if first else 0, second.revision if second else 0)

    def depth(self) -> dict[str, int]:
        """Items waiting per stage (new, escalated, second), and those set aside."""
        with self._lock:
            out = {"new": 0, "escalated": 0, "second": 0, "set_aside": 0}
            for q in self._items.values():
                if q.set_aside is not None:
                    out["set_aside"] += 1
                else:
                    out[self._stage(q) or "new"] += 1
            return out

    def history(self) -> list[Verdict]:
        """Every verdict record read (the latest 200,000), in the order read."""
        with self._lock:
            return list(self._history.values())

    def depth_by_queue(self) -> dict[str, int]:
        """Items a reviewer may claim now (new or for a second opinion), per named queue."""
        with self._lock:
            out: dict[str, int] = {}
            for q in self._items.values():
                if q.set_aside is None and self._stage(q) in ("new", "second"):
                    out[q.queue] = out.get(q.queue, 0) + 1
            return out

    def waiting(self) -> list[tuple[str, str]]:
        """(stage, decided_at) of every waiting item; set-aside ones as ``set_aside``."""
        with self._lock:
            return [("set_aside" if q.set_aside is not None else (self._stage(q) or "new"), q.item.decided_at)
                    for q in self._items.values()]  # fmt: skip

    def committable(self) -> dict[Hashable, int]:
        with self._lock:
            return self._tracker.committable()

    def mark_committed(self, offsets: dict[Hashable, int]) -> None:
        with self._lock:
            self._tracker.mark_committed(offsets)
