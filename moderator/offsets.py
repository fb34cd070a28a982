"""Per-partition done-watermarks, pure: which offset may be committed without losing anything.

Events of a partition are *started* in offset order (as the consumer delivers them) and *finished*
in any order (when the broker acknowledged their decision or dead-letter record). The committable
offset of a partition is the lowest offset still unfinished, or one past the highest finished when
nothing is pending: Kafka's "next offset to read". Committing it never skips an unfinished event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class _Partition:
    __slots__ = ("done", "next_commit", "order", "passed")

    def __init__(self) -> None:
        self.order: deque[int] = deque()  # started offsets, ascending
        self.done: set[int] = set()  # finished offsets still behind an unfinished one
        self.next_commit: int | None = None  # committable offset (None: nothing finished yet)
        self.passed: deque[int] = deque()  # finished, below the watermark, not yet committed


class OffsetTracker(Generic[P]):
    def __init__(self) -> None:
        self._parts: dict[P, _Partition] = {}
        self._committed: dict[P, int] = {}

    def start(self, partition: P, offset: int) -> bool:
        """Track a delivered event. False for a re-delivery (an offset at or below one already
        started): it is a duplicate of an event tracked before, so it must not move the watermark."""
        part = self._parts.setdefault(partition, _Partition())
        last = part.order[-1] if part.order else (part.next_commit - 1 if part.next_commit is not None else None)
        if last is not None and offset <= last:
            return False
        part.order.append(offset)
        return True

    def finish(self, partition: P, offset: int) -> None:
        """Mark an event done. Unknown partitions (revoked meanwhile) and offsets are ignored."""
        part = self._parts.get(partition)
        if part is None or not part.order or offset < part.order[0]:
            return
        part.done.add(offset)
        while part.order and part.order[0] in part.done:
            head = part.order.popleft()
            part.done.discard(head)
            part.passed.append(head)
            part.next_commit = head + 1

    def pending(self, partition: P | None = None) -> int:
        """Started and not yet finished events (of one partition, or of all)."""
        parts = [self._parts.get(partition)] if partition is not None else list(self._parts.values())
        return sum(len(p.order) - len(p.done) for p in parts if p is not None)

    def uncommitted(self) -> int:
        """Started events whose offset is not committed yet: what a crash now would re-process."""
        return sum(len(p.order) + len(p.passed) for p in self._parts.values())

    def committable(self) -> dict[P, int]:
        """Offsets to commit now: the partitions whose watermark moved since :meth:`mark_committed`."""
        out = {}
        for tp, part in self._parts.items():
            if part.next_commit is not None and part.next_commit != self._committed.get(tp):
                out[tp] = part.next_commit
        return out

    def mark_committed(self, offsets: dict[P, int]) -> None:
        self._committed.update(offsets)
        for tp, committed in offsets.items():
            part = self._parts.get(tp)
            while part is not None and part.passed and part.passed[0] < committed:
                part.passed.popleft()

    def watermark(self, partition: P) -> int | None:
        part = self._parts.get(partition)
        return part.next_commit if part else None

    def resume_point(self, partition: P) -> int | None:
        """The first offset not yet finished: where a consumer must resume to miss nothing."""
        part = self._parts.get(partition)
        if part is None:
            return None
        return part.order[0] if part.order else part.next_commit

    def first_uncommitted(self, partition: P) -> int | None:
        """The first offset not yet committed (finished or not): where a consumer must resume when
        finished-but-uncommitted work is lost with the partition (the exactly-once mode's held records)."""
        part = self._parts.get(partition)
        if part is None:
            return None
        return part.passed[0] if part.passed else self.resume_point(partition)

    def drop(self, partitions: list[P] | set[P]) -> None:
        """Forget partitions (revoked or lost): late finishes for them are ignored."""
        for tp in partitions:
            self._parts.pop(tp, None)
            self._committed.pop(tp, None)

    def partitions(self) -> list[P]:
        return list(self._parts)
