"""What a reviewer can do, independent of the web pages: claim, judge, skip, and the grid's batch.

Items are named by their handle (event id and image sha256, hashed: ``ReviewItem.handle``). Every
action is checked against the lease in Redis (:mod:`~moderator.console.leases`): a reviewer sees and
judges only the items they hold, and a verdict from anyone else is refused. Verdicts are attributed to
the authenticated reviewer the web layer passes in, and name the image bytes they judged. An item drawn
for double review goes, after its first verdict, to a second reviewer (never the same one), whose
verdict is published beside the first, never replacing it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from moderator import observability as obs
from moderator.console.auth import USERNAME_RE, Role, at_least
from moderator.console.banks import BankRefused, ConsoleBanks
from moderator.console.feeds import ConsoleFeeds
from moderator.console.images import ImageChanged, ReviewImages
from moderator.console.leases import Leases
from moderator.console.queue import Queued, ReviewQueue
from moderator.console.routing import Routing
from moderator.events import (
    FINAL_VERDICTS,
    AppealDecision,
    Decision,
    Verdict,
    VerdictKind,
    epoch_of,
    item_handle,
    utc_now,
)

log = obs.get_logger(__name__)


class ConsoleError(Exception):
    """An action that cannot be done; ``status`` is the HTTP status it maps to."""

    status = 400


class NotYours(ConsoleError):
    status = 409


class NotFound(ConsoleError):
    status = 404


class Forbidden(ConsoleError):
    """The reviewer's role does not allow it (a lead's or an admin's action)."""

    status = 403


@dataclass(frozen=True)
class Person:
    """The authenticated reviewer and their role (from the accounts file or the proxy's group header)."""

    name: str
    role: Role = "reviewer"

    @property
    def lead(self) -> bool:
        return at_least(self.role, "lead")


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
        images: ReviewImages,
        scan_limit: int = 500,
        banks: ConsoleBanks | None = None,
        max_leases: int = 25,
        routing: Routing | None = None,
    ) -> None:
        self.queue = queue
        self.leases = leases
        self.feeds = feeds
        self.images = images
        self.banks = banks  # where a confirmed image may also go (MODERATOR_CONSOLE_BANKS)
        self.scan_limit = scan_limit  # candidates looked at per claim (their leases in one round trip)
        self.max_leases = max_leases  # items one reviewer may hold at once (across replicas)
        self.routing = routing or Routing.build([], [])  # named queues and who may work them
        self._claims: dict[str, tuple[str, float]] = {}  # made here: handle -> (reviewer, expiry)
        self._skipped: dict[tuple[str, str], float] = {}  # (reviewer, handle) -> until when
        self._lock = threading.Lock()

    # --- claims ---------------------------------------------------------------------------------------
    def claim_next(
        self,
        who: Person,
        count: int = 1,
        escalated: bool = False,
        exclude: frozenset[str] = frozenset(),
        queue: str | None = None,
    ) -> list[Queued]:
        """Claim up to ``count`` items: the first by priority, then age, that nobody holds and ``who``
        may judge (a first verdict, or a second opinion on another reviewer's; escalations: leads only,
        and an assigned one only its lead), and not those in ``exclude``, nor those ``who`` skipped while
        their lease would have run; only from the queues ``who``'s role may work (``queue``: that one).
        Never more than ``max_leases`` held at once."""
        if escalated and not who.lead:
            raise Forbidden("only a lead finalizes an escalation")
        queues = self.routing.queues_for(who.role)
        if queue is not None:
            if not self.routing.may_work(queue, who.role):
                raise Forbidden(f"the {queue} queue is not one your role works")
            queues = [queue]
        count = min(count, self._room(who.name))
        now = time.time()
        got: list[Queued] = []
        candidates = [
            q for q in self.queue.pending("escalated" if escalated else "new", for_reviewer=who.name, queues=queues)
            if q.handle not in exclude and self._skipped.get((who.name, q.handle), 0) < now
            and (not escalated or self._assigned_ok(q.handle, who))
        ][: self.scan_limit]  # fmt: skip
        held = self.leases.holders([q.handle for q in candidates])
        for q in candidates:
            if len(got) >= count:
                break
            holder = held.get(q.handle)
            if holder is not None and holder != who.name:
                continue
            before = self.queue.stage(q.handle)
            if before is None or not self.leases.claim(q.handle, who.name):  # atomic: another may have won it
                continue
            if self.queue.stage(q.handle) != before or self._behind(q.handle):
                self.leases.release(q.handle, who.name)  # judged meanwhile, here or on another replica
                continue
            aside = self.leases.aside(q.handle)
            if aside is not None:  # another replica found its image changed
                self.queue.set_aside(q.handle, aside)
                self.leases.release(q.handle, who.name)
                continue
            self._claimed(q.handle, who.name)
            got.append(q)
        return got

    def _behind(self, handle: str) -> bool:
        """Whether another replica published a verdict on the item that this one has not read yet."""
        known, latest = self.queue.revisions(handle), self.leases.judged(handle)
        return latest[0] > known[0] or latest[1] > known[1]

    def _room(self, name: str) -> int:
        held = len(self.leases.held_by(name))
        if held >= self.max_leases:
            raise ConsoleError(f"you hold {held} items, the most one reviewer may (MODERATOR_CONSOLE_MAX_LEASES):"
                               " judge or skip some first")  # fmt: skip
        return self.max_leases - held

    def _assigned_ok(self, handle: str, who: Person) -> bool:
        current = self.queue.verdict(handle)
        assigned = current.assigned_to if current is not None else None
        return assigned is None or assigned == who.name or who.role == "admin"

    def claim(self, handle: str, who: Person) -> Queued:
        """Claim one given item (from a list, or to change a verdict): an escalated one, or one another
        reviewer judged, only as a lead."""
        queued = self.queue.get(handle)
        if queued is None:
            raise NotFound("no such review item is waiting")
        self._may_judge(handle, who)
        if self.leases.holder(handle) != who.name:
            self._room(who.name)
        if not self.leases.claim(handle, who.name):
            raise NotYours(
                f"{queued.item.event_id} is being reviewed by {self.leases.holder(handle) or 'someone else'}"
            )
        if self._behind(handle):
            self.leases.release(handle, who.name)
            raise NotYours(f"{queued.item.event_id} was just judged on another console: try again in a moment")
        self._claimed(handle, who.name)
        return queued

    def _may_judge(self, handle: str, who: Person) -> None:
        queued = self.queue.get(handle)
        if queued is not None and not self.routing.may_work(queued.queue, who.role):
            raise Forbidden(f"the {queued.queue} queue is not one your role works")
        if queued is not None and queued.item.appeal_id is not None and not who.lead:
            raise Forbidden("only a lead decides an appeal")
        if who.lead:
            if not self._assigned_ok(handle, who) and self.queue.stage(handle) == "escalated":
                current = self.queue.verdict(handle)
                raise Forbidden(f"this escalation is assigned to {current.assigned_to if current else 'another lead'}")
            return
        stage = self.queue.stage(handle)
        if stage == "escalated":
            raise Forbidden("only a lead finalizes an escalation")
        current = self.queue.verdict(handle)
        if stage is None and current is not None and current.reviewer != who.name:
            second = self.queue.second_opinion(handle)
            if second is None or second.reviewer != who.name:
                raise Forbidden(f"only a lead changes another reviewer's verdict ({current.reviewer}'s)")

    def held(self, handle: str, reviewer: str) -> Queued:
        """The item, if ``reviewer`` holds its lease (renewed: they are looking at it)."""
        queued = self.queue.get(handle)
        if queued is None:
            raise NotFound("no such review item is waiting (it may have a verdict already)")
        if not self.leases.renew(handle, reviewer):
            holder = self.leases.holder(handle)
            event_id = queued.item.event_id
            raise NotYours(f"{event_id} is held by {holder}" if holder else f"your claim on {event_id} has expired")
        return queued

    def image(self, handle: str, reviewer: str, original: bool = False) -> bytes:
        """The held item's image as the browser gets it: a small, blurred, gray rendition, or with
        ``original`` (only once the reviewer revealed it) the image itself. Bytes other than the ones the
        worker scored are refused, and the item is set aside (never handed out again here), logged and
        counted."""
        queued = self.held(handle, reviewer)
        if queued.set_aside is not None:  # refused once: not fetched again
            raise ImageChanged(queued.set_aside)
        if original and not self.leases.revealed(handle, reviewer):
            raise Forbidden("reveal the image first (the original is served only after a reveal)")
        try:
            return self.images.jpeg(queued.item) if original else self.images.blurred(queued.item)
        except ImageChanged as exc:
            self.queue.set_aside(handle, str(exc))
            self.leases.set_aside(handle, str(exc))  # on every replica
            obs.CONSOLE_IMAGE_CHANGED.inc()
            log.warning("console_image_changed", event_id=queued.item.event_id, sha256=queued.item.image.sha256,
                        url=queued.item.image.url, reviewer=reviewer)  # fmt: skip
            raise

    def reveal(self, handle: str, reviewer: str) -> None:
        """``reviewer`` chose to see the held item's image: its original may now be served to them."""
        queued = self.held(handle, reviewer)
        self.leases.mark_revealed(handle, reviewer)
        obs.CONSOLE_REVEALS.inc()
        log.info("console_reveal", event_id=queued.item.event_id, reviewer=reviewer)

    def mine(self, reviewer: str) -> list[Queued]:
        """The items ``reviewer`` holds now, claimed on any replica (the grid's page)."""
        return [q for h in self.leases.held_by(reviewer) if (q := self.queue.get(h)) is not None]

    def skip(self, handle: str, reviewer: str) -> None:
        self.leases.release(handle, reviewer)
        with self._lock:
            self._claims.pop(handle, None)
            self._skipped[(reviewer, handle)] = time.time() + self.leases.ttl_ms / 1000

    def _claimed(self, handle: str, reviewer: str) -> None:
        obs.CONSOLE_CLAIMS.inc()
        with self._lock:
            self._claims[handle] = (reviewer, time.time() + self.leases.ttl_ms / 1000)

    def expire_claims(self) -> None:
        """Count the claims made here that expired without a verdict (their items are back in the queue)."""
        now = time.time()
        with self._lock:
            overdue = [(h, r) for h, (r, until) in self._claims.items() if until < now]
        if not overdue:
            return
        held = self.leases.holders([h for h, _ in overdue])
        for handle, reviewer in overdue:
            if held.get(handle) == reviewer:  # renewed since: still theirs
                with self._lock:
                    self._claims[handle] = (reviewer, now + self.leases.expires_in(handle))
                continue
            with self._lock:
                self._claims.pop(handle, None)
            if self.queue.stage(handle) is not None:
                obs.CONSOLE_LEASE_EXPIRIES.inc()
                log.info("console_lease_expired", handle=handle, reviewer=reviewer)

    # --- verdicts ------------------------------------------------------------------------------------
    def second_opinion(self, handle: str, reviewer: str) -> bool:
        """Whether ``reviewer``'s verdict on this item is a second opinion (double review): the item waits
        for one and the first verdict is someone else's, or it is the second reviewer's own to change."""
        first = self.queue.verdict(handle)
        second = self.queue.second_opinion(handle)
        if second is not None and second.reviewer == reviewer:
            return True
        return self.queue.stage(handle) == "second" and first is not None and first.reviewer != reviewer

    def submit(
        self,
        handle: str,
        who: Person,
        verdict: VerdictKind,
        categories: list[str],
        note: str = "",
        bank: str | None = None,
        assign: str | None = None,
    ) -> Submitted:
        """Publish ``who``'s verdict on an item they hold; an identical resubmission publishes nothing.
        With ``bank`` (a confirm, a lead's), the image goes to that known-image bank first (nothing is
        published if it cannot: its bytes must be the ones the worker scored). An escalation may be
        ``assign``-ed to a named lead. A final verdict on an escalation, and a change of another
        reviewer's verdict, are a lead's."""
        reviewer = who.name
        categories = sorted(set(categories)) if verdict == "confirm" else []
        second = self.second_opinion(handle, reviewer)
        current = self.queue.second_opinion(handle) if second else self.queue.verdict(handle)
        same = (verdict, categories, reviewer, note[:2000], assign if verdict == "escalate" else None)
        unchanged = current is not None and same == (
            current.verdict, current.categories, current.reviewer, current.note, current.assigned_to
        )  # fmt: skip
        if unchanged and bank is None and current is not None:
            return Submitted(current, published=False)  # a double submission: nothing changes
        queued = self.held(handle, reviewer)
        self._may_judge(handle, who)
        item = queued.item
        if queued.set_aside is not None and verdict != "escalate":
            raise ConsoleError(f"{queued.set_aside}: it can only be escalated")
        if second and verdict not in FINAL_VERDICTS:
            raise ConsoleError("a second opinion is confirm or overturn (escalation is the first reviewer's)")
        if assign is not None and (verdict != "escalate" or not USERNAME_RE.match(assign)):
            raise ConsoleError("only an escalation is assigned, to a lead's account name")
        unknown = sorted(set(categories) - set(item.scores))
        if unknown:
            raise ConsoleError(f"unknown categories {unknown} (the policy's are {sorted(item.scores)})")
        if verdict == "confirm" and not categories:
            raise ConsoleError("confirm needs at least one category")
        if bank is not None and not who.lead:
            raise Forbidden("only a lead adds an image to a bank")
        revision = (current.revision + 1) if current is not None else 1
        if item.appeal_id is not None:  # a revision of the event's verdict: after its latest, appeal or not
            if verdict not in FINAL_VERDICTS or bank is not None:
                raise ConsoleError("an appeal is upheld (confirm) or overturned, nothing else")
            before = self.queue.verdict(item_handle(item.event_id, item.image.sha256 or None))
            revision = max(revision, (before.revision + 1) if before is not None else 1)
        slot = handle + ("#second" if second else "")
        if not self.leases.reserve_revision(slot, revision, reviewer):  # one publisher per revision
            raise NotYours("this verdict is being published already (a second submit): reload the page")
        try:
            if bank is not None:
                if verdict != "confirm" or self.banks is None:
                    raise ConsoleError("only a confirmed image goes to a bank, and only to one the console offers")
                try:
                    note_text = ", ".join(categories) + (f": {note}" if note else "")
                    entry = self.banks.add(item, bank, reviewer, note_text)
                except BankRefused as exc:
                    raise ConsoleError(str(exc)) from None
                log.info("bank_entry_added", event_id=item.event_id, bank=bank, reviewer=reviewer,
                         pdq_quality=entry.pdq_quality)  # fmt: skip
            judged = Decision(decision=item.decision, scores=item.scores, triggered=item.reasons, policy=item.policy,
                              model=item.model, image_precision=item.image_precision)  # fmt: skip
            record = Verdict(
                event_id=item.event_id, verdict=verdict, categories=categories, reviewer=reviewer,
                note=note[:2000], revision=revision, judged=judged, sampled=item.sampled,
                sample_rate=item.sample_rate, retroactive=item.retroactive, image_sha256=item.image.sha256 or None,
                second_opinion=second, role=who.role, assigned_to=assign if verdict == "escalate" else None,
                appeal=item.appeal_id is not None, appeal_id=item.appeal_id,
                decided_at=item.decided_at, reviewed_at=utc_now(),
            )  # fmt: skip
            self.feeds.publish(record)
            if item.appeal_id is not None:
                self.feeds.publish_appeal_decision(AppealDecision(
                    appeal_id=item.appeal_id, event_id=item.event_id, decision=item.decision,
                    outcome="upheld" if verdict == "confirm" else "overturned", categories=categories,
                    reviewer=reviewer, note=note[:2000], appealed_at=item.appealed_at or item.decided_at,
                    decided_at=record.reviewed_at,
                ))  # fmt: skip
        except Exception:
            self.leases.release_revision(slot, revision, reviewer)  # not published: it may be tried again
            raise
        self.leases.mark_judged(handle, *self.queue.revisions(handle))  # before the lease goes: every replica
        self.leases.release(handle, reviewer)
        with self._lock:
            self._claims.pop(handle, None)
        obs.CONSOLE_VERDICTS.labels(verdict=verdict).inc()
        decided = _seconds_since(item.decided_at)
        if decided is not None:
            obs.CONSOLE_DECISION_TO_VERDICT.observe(decided)
        log.info("verdict", event_id=item.event_id, verdict=verdict, categories=categories, reviewer=reviewer,
                 role=who.role, revision=record.revision, second_opinion=second, assigned_to=assign)  # fmt: skip
        return Submitted(record, published=True)


def _seconds_since(iso: str) -> float | None:
    at = epoch_of(iso)
    return max(0.0, time.time() - at) if at is not None else None
