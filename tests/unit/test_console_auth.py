"""The console's pure identity parts: accounts and roles, the trusted proxy, the login guard, Host names."""

from __future__ import annotations

import contextlib

import pytest

from moderator.config import Settings
from moderator.console.auth import (
    Accounts,
    AccountsError,
    AccountsFile,
    at_least,
    backoff_s,
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


def test_the_login_backoff_doubles_after_the_free_tries_up_to_a_cap():
    waits = [backoff_s(n, free=3, base_s=1.0, max_s=60.0) for n in range(1, 13)]
    assert waits == [0, 0, 0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


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


def _asgi(app, path: str, host: str = "127.0.0.1:8081") -> tuple[int, dict[str, str]]:  # type: ignore[no-untyped-def]
    """One GET through an ASGI app, without a server: (status, headers of the response)."""
    import asyncio

    messages: list[dict] = []  # type: ignore[type-arg]

    async def receive() -> dict:  # type: ignore[type-arg]
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:  # type: ignore[type-arg]
        messages.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", host.encode())], "scheme": "http", "server": ("127.0.0.1", 8081),
             "client": ("127.0.0.1", 5000), "root_path": "", "http_version": "1.1"}  # fmt: skip

    async def run() -> None:
        with contextlib.suppress(RuntimeError):  # Starlette re-raises after sending its 500
            await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in messages if m["type"] == "http.response.start")
    headers: dict[str, str] = {}
    for k, v in start["headers"]:
        headers.setdefault(k.decode().lower(), v.decode())
        if k.decode().lower() == "set-cookie":
            headers["set-cookie"] = v.decode()
    return start["status"], headers


def test_error_pages_get_the_security_headers_and_tls_cookies_are_host_prefixed():
    import redis
    from starlette.applications import Starlette
    from starlette.routing import Route

    from moderator.console.app import WebConfig, create_app
    from moderator.console.queue import ReviewQueue
    from moderator.console.security import HostCheckMiddleware, SecurityHeadersMiddleware
    from moderator.console.sessions import Sessions
    from moderator.stack import free_port

    def boom(request):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    wrapped = SecurityHeadersMiddleware(HostCheckMiddleware(Starlette(routes=[Route("/boom", boom)]), ["127.0.0.1"]))
    status, headers = _asgi(wrapped, "/boom")
    assert status == 500 and "default-src 'none'" in headers["content-security-policy"]  # a 500 has them too
    assert _asgi(wrapped, "/boom", host="evil.example")[0] == 400

    config = WebConfig(secret_key="k" * 32, accounts=None, trusted_user_header=None, trusted_proxies=(), https=True,
                       allowed_origins=frozenset(), allowed_hosts=frozenset({"127.0.0.1"}), grid_size=4, lease_s=60,
                       dev=False)  # fmt: skip
    never = Sessions(redis.Redis(port=free_port()), "p:", 60, 60)  # never asked: nobody is signed in
    app = create_app(config, ReviewQueue(), None, never)  # type: ignore[arg-type]
    assert isinstance(app, SecurityHeadersMiddleware) and isinstance(app.app, HostCheckMiddleware)  # outermost
    status, headers = _asgi(app, "/login")
    assert status == 200 and headers["set-cookie"].startswith("__Host-moderator_console=")
    assert "secure" in headers["set-cookie"].lower() and "path=/" in headers["set-cookie"].lower()
    assert "domain=" not in headers["set-cookie"].lower() and "strict-transport-security" in headers


def test_readiness_fails_when_redis_does_not_answer():
    import redis

    from moderator.console import redis_ready
    from moderator.stack import free_port

    assert not redis_ready(redis.Redis(port=free_port(), socket_connect_timeout=0.5))
