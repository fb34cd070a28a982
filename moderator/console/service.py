"""What a reviewer can do, independent of the web pages: claim, judge, skip, and the grid's batch.

Every action is checked against the lease in Redis (:mod:`~moderator.console.leases`): a reviewer
sees and judges only the items they hold, and a verdict from anyone else is refused. Verdicts are
attributed to the authenticated reviewer the web layer passes in.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from moderator import observability as obs
from moderator.console.banks import BankRefused, ConsoleBanks
from moderator.console.feeds import ConsoleFeeds
from moderator.console.leases import Leases
from moderator.console.queue import Queued, ReviewQueue
from moderator.events import Decision, Verdict, VerdictKind, utc_now

log = obs.get_logger(__name__)


class ConsoleError(Exception):
    """An action that cannot be done; ``status`` is the HTTP status it maps to."""

    status = 400


class NotYours(ConsoleError):
    status = 409


class NotFound(ConsoleError):
    status = 404


@dataclass(frozen=True)
class Submitted:
    verdict: Verdict
    published: bool  # False: the same verdict was already current, nothing was published


class ReviewService:
    def __init__(
        self,
        queue: ReviewQueue,
        leases: Leases,
        feeds: ConsoleFeeds,
        scan_limit: int = 500,
        banks: ConsoleBanks | None = None,
    ) -> None:
        self.queue = queue
        self.leases = leases
        self.feeds = feeds
        self.banks = banks  # where a confirmed image may also go (MODERATOR_CONSOLE_BANKS)
        self.scan_limit = scan_limit  # candidates looked at per claim (their leases in one round trip)
        self._claims: dict[str, tuple[str, float]] = {}  # made here: event id -> (reviewer, expiry)
        self._skipped: dict[tuple[str, str], float] = {}  # (reviewer, event id) -> until when
        self._lock = threading.Lock()

    # --- claims ---------------------------------------------------------------------------------------
    def claim_next(
        self, reviewer: str, count: int = 1, escalated: bool = False, exclude: frozenset[str] = frozenset()
    ) -> list[Queued]:
        """Claim up to ``count`` items: the first by priority, then age, that nobody holds (and not those
        in ``exclude``, nor those ``reviewer`` skipped while their lease would have run)."""
        now = time.time()
        got: list[Queued] = []
        candidates = [
            q for q in self.queue.pending(escalated)
            if q.item.event_id not in exclude and self._skipped.get((reviewer, q.item.event_id), 0) < now
        ][: self.scan_limit]  # fmt: skip
        held = self.leases.holders([q.item.event_id for q in candidates])
        for q in candidates:
            if len(got) >= count:
                break
            holder = held.get(q.item.event_id)
            if holder is not None and holder != reviewer:
                continue
            if self.leases.claim(q.item.event_id, reviewer):  # atomic: another replica may have won it
                self._claimed(q.item.event_id, reviewer)
                got.append(q)
        return got

    def claim(self, event_id: str, reviewer: str) -> Queued:
        """Claim one given item (from a list, or to change one's verdict)."""
        queued = self.queue.get(event_id)
        if queued is None:
            raise NotFound(f"no review item {event_id!r} is waiting")
        if not self.leases.claim(event_id, reviewer):
            raise NotYours(f"{event_id} is being reviewed by {self.leases.holder(event_id) or 'someone else'}")
        self._claimed(event_id, reviewer)
        return queued

    def held(self, event_id: str, reviewer: str) -> Queued:
        """The item, if ``reviewer`` holds its lease (renewed: they are looking at it)."""
        queued = self.queue.get(event_id)
        if queued is None:
            raise NotFound(f"no review item {event_id!r} is waiting (it may have a verdict already)")
        if not self.leases.renew(event_id, reviewer):
            holder = self.leases.holder(event_id)
            raise NotYours(f"{event_id} is held by {holder}" if holder else f"your claim on {event_id} has expired")
        return queued

    def mine(self, reviewer: str) -> list[Queued]:
        """The items this console saw ``reviewer`` claim that they still hold (the grid's page)."""
        with self._lock:
            ids = [e for e, (r, until) in self._claims.items() if r == reviewer and until > time.time()]
        held = self.leases.holders(ids)
        return [q for e in ids if held.get(e) == reviewer and (q := self.queue.get(e)) is not None]

    def skip(self, event_id: str, reviewer: str) -> None:
        self.leases.release(event_id, reviewer)
        with self._lock:
            self._claims.pop(event_id, None)
            self._skipped[(reviewer, event_id)] = time.time() + self.leases.ttl_ms / 1000

    def _claimed(self, event_id: str, reviewer: str) -> None:
        obs.CONSOLE_CLAIMS.inc()
        with self._lock:
            self._claims[event_id] = (reviewer, time.time() + self.leases.ttl_ms / 1000)

    def expire_claims(self) -> None:
        """Count the claims made here that expired without a verdict (their items are back in the queue)."""
        now = time.time()
        with self._lock:
            overdue = [(e, r) for e, (r, until) in self._claims.items() if until < now]
        if not overdue:
            return
        held = self.leases.holders([e for e, _ in overdue])
        for event_id, reviewer in overdue:
            if held.get(event_id) == reviewer:  # renewed since: still theirs
                with self._lock:
                    self._claims[event_id] = (reviewer, now + self.leases.expires_in(event_id))
                continue
            with self._lock:
                self._claims.pop(event_id, None)
            if self.queue.get(event_id) is not None and self.queue.verdict(event_id) is None:
                obs.CONSOLE_LEASE_EXPIRIES.inc()
                log.info("console_lease_expired", event_id=event_id, reviewer=reviewer)

    # --- verdicts ------------------------------------------------------------------------------------
    def submit(
        self,
        event_id: str,
        reviewer: str,
        verdict: VerdictKind,
        categories: list[str],
        note: str = "",
        bank: str | None = None,
    ) -> Submitted:
        """Publish ``reviewer``'s verdict on an item they hold; an identical resubmission publishes nothing.
        With ``bank`` (a confirm), the image goes to that known-image bank first (nothing is published
        if it cannot)."""
        categories = sorted(set(categories)) if verdict == "confirm" else []
        current = self.queue.verdict(event_id)
        same = (verdict, categories, reviewer, note[:2000])
        unchanged = (
            current is not None and (current.verdict, current.categories, current.reviewer, current.note) == same
        )
        if unchanged and bank is None and current is not None:
            return Submitted(current, published=False)  # a double submission: nothing changes
        queued = self.held(event_id, reviewer)
        item = queued.item
        unknown = sorted(set(categories) - set(item.scores))
        if unknown:
            raise ConsoleError(f"unknown categories {unknown} (the policy's are {sorted(item.scores)})")
        if verdict == "confirm" and not categories:
            raise ConsoleError("confirm needs at least one category")
        if bank is not None:
            if verdict != "confirm" or self.banks is None:
                raise ConsoleError("only a confirmed image goes to a bank, and only to one the console offers")
            try:
                entry = self.banks.add(item, bank, reviewer, ", ".join(categories) + (f": {note}" if note else ""))
            except BankRefused as exc:
                raise ConsoleError(str(exc)) from None
            log.info("bank_entry_added", event_id=event_id, bank=bank, reviewer=reviewer, pdq_quality=entry.pdq_quality)
        judged = Decision(decision=item.decision, scores=item.scores, triggered=item.reasons, policy=item.policy,
                          model=item.model, image_precision=item.image_precision)  # fmt: skip
        record = Verdict(
            event_id=event_id, verdict=verdict, categories=categories, reviewer=reviewer, note=note[:2000],
            revision=(current.revision + 1) if current is not None else 1, judged=judged, sampled=item.sampled,
            sample_rate=item.sample_rate, decided_at=item.decided_at, reviewed_at=utc_now(),
        )  # fmt: skip
        self.feeds.publish(record)
        self.leases.release(event_id, reviewer)
        with self._lock:
            self._claims.pop(event_id, None)
        obs.CONSOLE_VERDICTS.labels(verdict=verdict).inc()
        decided = _seconds_since(item.decided_at)
        if decided is not None:
            obs.CONSOLE_DECISION_TO_VERDICT.observe(decided)
        log.info("verdict", event_id=event_id, verdict=verdict, categories=categories, reviewer=reviewer,
                 revision=record.revision)  # fmt: skip
        return Submitted(record, published=True)


def _seconds_since(iso: str) -> float | None:
    try:
        return max(0.0, time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None
