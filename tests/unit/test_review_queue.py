"""The console's review queue, pure: items are (event id, image sha256), verdicts apply to the bytes they
name, double review, retroactive findings of pending items, items set aside."""

from __future__ import annotations

import hashlib

from moderator.console.queue import ReviewQueue
from moderator.events import Decision, ImageRef, PolicyRef, ReviewItem, Source, Verdict, VerdictKind

SOURCE = Source(topic="images", partition=0, offset=0)


def item(event_id: str, image: bytes, **extra: object) -> ReviewItem:
    return ReviewItem(
        event_id=event_id, decision="review", priority=50,
        image=ImageRef(inline_source=SOURCE, sha256=hashlib.sha256(image).hexdigest(), bytes=len(image)),
        scores={"c": 0.5}, reasons=[], policy=PolicyRef(name="p", version="v"), model="m", source=SOURCE,
        decided_at="2026-12-01T00:00:00.000Z", **extra,
    )  # fmt: skip


def verdict(i: ReviewItem, kind: VerdictKind, reviewer: str = "alice", revision: int = 1, **extra: object) -> Verdict:
    judged = Decision(decision=i.decision, scores=i.scores, triggered=[], policy=i.policy, model=i.model)
    fields: dict[str, object] = {"image_sha256": i.image.sha256, **extra}
    return Verdict(
        event_id=i.event_id,
        verdict=kind,
        reviewer=reviewer,
        judged=judged,
        revision=revision,
        decided_at=i.decided_at,
        reviewed_at="2026-12-01T01:00:00.000Z",
        **fields,
    )  # type: ignore[arg-type]


def test_an_event_id_re_used_for_other_bytes_is_another_item() -> None:
    q = ReviewQueue()
    x, y = item("dup", b"x"), item("dup", b"y")
    q.add_item(0, 0, x)
    q.add_verdict(verdict(x, "overturn"))
    assert q.stage(x.handle) is None
    q.add_item(0, 1, y)  # the same id later, other bytes: not judged by the verdict on x
    assert q.stage(y.handle) == "new" and [p.handle for p in q.pending()] == [y.handle]
    assert q.committable() == {0: 1}  # x's record is done, y's waits
    assert x.handle != y.handle and len(x.handle) == 32 and x.handle.isalnum()


def test_a_verdict_read_before_its_item_and_an_older_record_naming_no_image() -> None:
    q = ReviewQueue()
    x = item("e", b"x")
    q.add_verdict(verdict(x, "confirm", categories=["c"]))
    q.add_item(0, 0, x)  # a restart: judged already, never queued again
    assert q.pending() == [] and q.committable() == {0: 1}
    legacy = item("old", b"o")
    q.add_item(0, 1, legacy)
    q.add_verdict(verdict(legacy, "overturn", image_sha256=None))  # written before verdicts named the bytes
    assert q.stage(legacy.handle) is None


def test_double_review_waits_for_another_reviewer() -> None:
    q = ReviewQueue()
    i = item("d", b"d", second_review=True)
    q.add_item(0, 0, i)
    q.add_verdict(verdict(i, "escalate"))
    assert q.stage(i.handle) == "escalated"
    q.add_verdict(verdict(i, "confirm", revision=2, categories=["c"]))
    assert q.stage(i.handle) == "second" and q.committable() == {}  # not done: nothing to commit
    assert q.pending(for_reviewer="alice") == []  # never the first reviewer
    assert [p.handle for p in q.pending(for_reviewer="bob")] == [i.handle]
    q.add_verdict(verdict(i, "overturn", reviewer="bob", second_opinion=True))
    assert q.stage(i.handle) is None and q.committable() == {0: 1}
    assert q.verdict(i.handle).verdict == "confirm" and q.second_opinion(i.handle).reviewer == "bob"
    assert [(v.reviewer, v.second_opinion) for _, v in q.judged_by("bob")] == [("bob", True)]


def test_a_retroactive_finding_of_a_pending_audit_sample_keeps_it_a_sample() -> None:
    q = ReviewQueue()
    sample = item("s", b"s", sampled=True, sample_rate=0.02)
    q.add_item(0, 0, sample)
    q.add_item(1, 0, item("s", b"s", retroactive=True))  # moderator bank scan --publish-review
    merged = q.get(sample.handle).item
    assert merged.sampled and merged.sample_rate == 0.02 and merged.retroactive


def test_an_item_set_aside_is_never_handed_out_but_still_waits() -> None:
    q = ReviewQueue()
    a, b = item("a", b"a"), item("b", b"b")
    q.add_item(0, 0, a)
    q.add_item(0, 1, b)
    q.set_aside(a.handle, "the image has changed since it was scored")
    assert [p.handle for p in q.pending(for_reviewer="alice")] == [b.handle]
    assert q.depth() == {"new": 1, "escalated": 0, "second": 0, "set_aside": 1}
    assert q.committable() == {}  # nothing lost: a restart reads it again
