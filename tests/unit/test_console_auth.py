"""The console's pure identity parts: accounts and roles, the trusted proxy, the login guard, Host names."""

from __future__ import annotations

import time

import pytest

from moderator.config import Settings
from moderator.console.auth import (
    Accounts,
    AccountsError,
    AccountsFile,
    LoginGuard,
    at_least,
    hash_password,
    header_once,
    parse_networks,
    peer_trusted,
    role_of_groups,
    verify_password,
)
from moderator.console.security import host_name


def test_accounts_carry_roles_and_the_default_is_reviewer():
    h = hash_password("pw-123456", ln=10)
    accounts = Accounts.parse(f"# team\nalice:{h}\nlena:lead:{h}\n\nroot:admin:{h}\n")
    assert {n: a.role for n, a in accounts.accounts.items()} == {"alice": "reviewer", "lena": "lead", "root": "admin"}
    assert accounts.check("lena", "pw-123456").role == "lead"
    assert accounts.check("lena", "wrong") is None and accounts.check("nobody", "pw-123456") is None
    assert at_least("admin", "lead") and at_least("lead", "lead") and not at_least("reviewer", "lead")
    with pytest.raises(AccountsError, match=r":1: .*ROLE one of reviewer, lead, admin"):
        Accounts.parse(f"eve:boss:{h}\n")
    with pytest.raises(AccountsError, match="no reviewer accounts"):
        Accounts.parse("# nobody\n")


def test_a_costlier_scrypt_hash_verifies_instead_of_failing_on_memory():
    # ln=16 needs 64 MiB: the first version's fixed maxmem made every such login a 500.
    encoded = hash_password("correct horse", ln=16)
    assert encoded.startswith("$scrypt$ln=16,")
    assert verify_password("correct horse", encoded) and not verify_password("wrong horse", encoded)
    assert not verify_password("x", encoded.replace("ln=16", "ln=30"))  # refused, not computed
    with pytest.raises(ValueError, match="choose 10 to 20"):
        hash_password("x", ln=21)


def test_the_accounts_file_is_read_again_when_it_changes(tmp_path, monkeypatch):
    h = hash_password("pw-123456", ln=10)
    path = tmp_path / "reviewers.txt"
    path.write_text(f"alice:{h}\nbob:{h}\n")
    errors: list[str] = []
    accounts = AccountsFile(path, on_error=errors.append)
    assert accounts.current().role("bob") == "reviewer"
    path.write_text(f"alice:lead:{h}\n")  # bob removed, alice promoted
    accounts._checked -= 2  # as if a second had passed
    assert accounts.current().role("bob") is None and accounts.current().role("alice") == "lead"
    path.write_text("garbage\n")
    accounts._checked -= 2
    assert accounts.current().role("alice") == "lead"  # the last good accounts stay
    assert errors and "expected NAME:$scrypt$" in errors[0]


def test_only_the_tcp_peer_in_a_trusted_range_and_exactly_one_header_count():
    nets = parse_networks(["10.0.0.0/8", "127.0.0.1", "fd00::/8"])
    assert peer_trusted("10.2.3.4", nets) and peer_trusted("127.0.0.1", nets) and peer_trusted("fd00::1", nets)
    assert not peer_trusted("11.0.0.1", nets) and not peer_trusted(None, nets) and not peer_trusted("junk", nets)
    assert header_once(["alice"]) == "alice"
    assert header_once(["alice", "mallory"]) is None  # a second copy: whose is it?
    assert header_once([]) is None and header_once(["  "]) is None
    with pytest.raises(ValueError, match="not an IP address or CIDR range"):
        parse_networks(["10.0.0.0/33"])
    with pytest.raises(ValueError, match="CIDR"):
        Settings(console_trusted_proxies=("example.org",))


def test_roles_from_proxy_groups():
    leads, admins = ("t-leads",), ("t-admins",)
    assert role_of_groups("staff, t-leads", leads, admins) == "lead"
    assert role_of_groups("t-leads t-admins", leads, admins) == "admin"
    assert role_of_groups("", leads, admins) == "reviewer" and role_of_groups("t-leadsx", leads, admins) == "reviewer"


def test_the_login_guard_waits_longer_after_each_failure_and_forgets_on_success():
    now = [1000.0]
    guard = LoginGuard(free=3, base_s=1.0, max_s=60.0, clock=lambda: now[0])
    key = ["account:alice"]
    for _ in range(3):
        guard.failed(key)
    assert guard.wait(key) == 0  # the free tries
    waits = []
    for _ in range(8):
        guard.failed(key)
        waits.append(guard.wait(key))
        now[0] += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]  # doubling, capped
    assert guard.wait(["account:bob"]) == 0  # another account is not affected
    guard.succeeded(key)
    assert guard.wait(key) == 0
    guard.failed(["ip:1"])
    now[0] += 7200  # long quiet: the count starts over
    for _ in range(3):
        guard.failed(["ip:1"])
    assert guard.wait(["ip:1"]) == 0


def test_the_login_guard_stays_bounded_under_a_flood_of_names():
    guard = LoginGuard(free=1, max_keys=1000, clock=time.monotonic)
    for i in range(5000):
        guard.failed([f"account:user{i}"])
    assert len(guard._failures) <= 1000


def test_host_names_from_host_headers():
    assert host_name("127.0.0.1:8081") == "127.0.0.1"
    assert host_name("[::1]:8081") == "::1" and host_name("[::1]") == "::1"
    assert host_name("Review.Example.org") == "review.example.org"
    assert host_name("evil.example:80") == "evil.example"


def test_a_short_secret_key_is_refused_at_start_up():
    with pytest.raises(ValueError, match="at least 32 characters"):
        Settings(console_secret_key="short")
    assert Settings(console_secret_key="x" * 32).console_secret_key is not None


def test_the_verdict_log_selects_by_time_keeps_revisions_and_quotes_formulas():
    from moderator.events import Decision, PolicyRef, Verdict
    from moderator.verdict_log import select, to_csv

    policy = PolicyRef(name="p", version="v1")
    judged = Decision(decision="review", scores={"weapons": 0.4}, triggered=[], policy=policy, model="m")

    def v(rev: int, at: str, note: str = "", second: bool = False) -> Verdict:
        return Verdict(event_id="e1", verdict="overturn", reviewer="rita", revision=rev, judged=judged, note=note,
                       image_sha256="ab", second_opinion=second, decided_at="2026-12-01T00:00:00Z",
                       reviewed_at=at)  # fmt: skip

    log = [v(1, "2026-12-01T10:00:00Z"), v(2, "2026-12-02T10:00:00Z", note="=HYPERLINK(\"x\")"),
           v(1, "2026-12-02T11:00:00Z", second=True)]  # fmt: skip
    from datetime import datetime, timezone

    day2 = datetime(2026, 12, 2, tzinfo=timezone.utc)
    assert [x.revision for x in select(log, since=day2)] == [2, 1]
    assert [x.revision for x in select(log, until=day2)] == [1]
    assert [(x.revision, x.second_opinion) for x in select(log, current=True)] == [(2, False), (1, True)]
    text = to_csv(select(log))
    assert text.splitlines()[0].startswith("reviewed_at,event_id,image_sha256,revision,verdict")
    assert "'=HYPERLINK" in text and ",=HYPERLINK" not in text


def test_the_team_figures_from_waiting_items_and_verdicts():
    from datetime import datetime, timezone

    from moderator.console.team import duration, team_stats
    from moderator.events import Decision, PolicyRef, Trigger, Verdict

    now = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc).timestamp()

    def v(event: str, verdict: str, reviewer: str, at: str, cats: tuple[str, ...], rev: int = 1) -> Verdict:
        judged = Decision(decision="review", scores={c: 0.5 for c in cats}, policy=PolicyRef(name="p", version="v"),
                          triggered=[Trigger(category=c, rule="review", score=0.5, threshold=0.4) for c in cats],
                          model="m")  # fmt: skip
        return Verdict(event_id=event, verdict=verdict, reviewer=reviewer, revision=rev, judged=judged,
                       categories=list(cats) if verdict == "confirm" else [], image_sha256="s" + event,
                       decided_at="2026-12-03T11:00:00Z", reviewed_at=at)  # fmt: skip

    verdicts = [
        v("a", "overturn", "rita", "2026-12-03T11:10:00Z", ("weapons",)),
        v("b", "confirm", "rita", "2026-12-03T11:20:00Z", ("weapons", "drugs")),
        v("c", "escalate", "sam", "2026-12-02T11:00:00Z", ("drugs",)),  # (reviewed before its decision: 0 s)
        v("c", "overturn", "lena", "2026-12-03T11:30:00Z", ("drugs",), rev=2),  # the final verdict counts
        v("old", "overturn", "sam", "2026-10-01T00:00:00Z", ("weapons",)),  # outside the 14 days
    ]
    waiting = [("new", "2026-12-03T10:00:00Z"), ("new", "2026-12-03T11:00:00Z"), ("escalated", "2026-12-01T12:00:00Z")]
    stats = team_stats(waiting, verdicts, now)
    new = next(r for r in stats.stages if r.stage == "new")
    assert (new.waiting, new.oldest_s, new.median_s) == (2, 7200, 5400)
    assert next(r for r in stats.stages if r.stage == "escalated").oldest_s == 2 * 86_400
    assert [(r.day, r.reviewer, r.verdicts) for r in stats.reviewer_days] == [
        ("2026-12-03", "lena", 1), ("2026-12-03", "rita", 2), ("2026-12-02", "sam", 1)]  # fmt: skip
    assert {r.category: (r.judged, r.overturned) for r in stats.categories} == {"weapons": (2, 1), "drugs": (2, 1)}
    assert stats.to_verdict_n == 3 and stats.to_verdict_p50_s == 10 * 60  # first verdicts: 0, 10 and 20 min
    assert duration(95) == "1 min 35 s" and duration(None) == "\u2013" and duration(90_000) == "1 d 1 h"


def test_routing_first_match_wins_and_roles_decide_who_works_a_queue():
    from moderator.console.routing import QueueSpec, RouteSpec, Routing, RoutingError
    from moderator.events import ImageRef, PolicyRef, ReviewItem, Source, Trigger

    def item(category: str, sampled: bool = False) -> ReviewItem:
        return ReviewItem(event_id="e", decision="review", priority=1, scores={category: 0.5}, sampled=sampled,
                          reasons=[Trigger(category=category, rule="review", score=0.5, threshold=0.4)],
                          image=ImageRef(url="https://x/y.jpg", sha256="ab", bytes=1), model="m",
                          policy=PolicyRef(name="p", version="v"), decided_at="2026-12-03T00:00:00Z",
                          source=Source(topic="images", partition=0, offset=1))  # fmt: skip

    routing = Routing.build(
        [QueueSpec(name="leads", roles=("lead", "admin")), QueueSpec(name="audit")],
        [RouteSpec(queue="audit", sampled=True), RouteSpec(queue="leads", category="self-harm"),
         RouteSpec(queue="leads", category="weapons", policy="other")],
    )  # fmt: skip
    assert routing.queue_of(item("self-harm")) == "leads"
    assert routing.queue_of(item("self-harm", sampled=True)) == "audit"  # the first rule that matches
    assert routing.queue_of(item("weapons")) == "default"  # policy p, not other
    assert routing.queues_for("reviewer") == ["audit", "default"] and not routing.may_work("leads", "reviewer")
    assert routing.queues_for("lead") == ["leads", "audit", "default", "appeals"]
    assert not routing.may_work("nope", "admin") and not routing.may_work("appeals", "reviewer")
    appeal = item("self-harm").model_copy(update={"appeal_id": "a1"})
    assert routing.queue_of(appeal) == "appeals"  # appeals to their own queue, not by the category rule
    assert Routing.build([], [RouteSpec(queue="default", appeal=True)]).queue_of(appeal) == "default"
    with pytest.raises(RoutingError, match="not in MODERATOR_CONSOLE_QUEUES"):
        Routing.build([], [RouteSpec(queue="typo")])
