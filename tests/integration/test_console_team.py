"""The console for a team: roles, and the security holes closed (real Kafka, Redis, worker, browser).

Events with ids that hold URL characters go through the real worker into review; a real console
serves them; reviewers, a lead and an admin sign in with a browser (Debian's chromium) or plain HTTP.
"""

from __future__ import annotations

import csv
import http.client
import http.cookiejar
import io
import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from moderator import cli
from moderator.app import App
from moderator.clients import make_reader, read_to_end
from moderator.config import Settings
from moderator.console import Console
from moderator.console.auth import hash_password
from moderator.console.service import ConsoleError, Forbidden, NotYours, Person
from moderator.events import Appeal, DecisionRecord
from moderator.replay import read_verdicts
from moderator.samples import jpeg_bytes, photo_like
from moderator.topics import TOPICS, NewTopic

from .harness import inline_event, produce, review_items_scored, wait_until
from .test_console import ARTIFACTS, ROOT, _metric, _NoRedirect, _verdicts, browser  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

TEAM = {"rita": ("reviewer", "rita-password-1"), "lena": ("lead", "lena-password-2"), "root": ("admin", "root-pw-345")}
ODD_IDS = ["a?b#c", "x/../../logout", "100%", "..", "%2e%2e/admin&x=1"]
RITA, LENA = Person("rita"), Person("lena", "lead")


@pytest.fixture(scope="module")
def team(kafka_service, redis_service, tiny_clip_dir, tmp_path_factory) -> Settings:
    """14 events (five with ids full of URL characters) scored by the worker; every one goes to review."""
    tmp = tmp_path_factory.mktemp("team")
    run = uuid.uuid4().hex[:8]
    names = {t.setting: f"team-{run}-{t.default}" for t in TOPICS}
    kafka_service.create_topics([NewTopic(names[t.setting], t.partitions_for(2), t.compacted) for t in TOPICS])
    policies = tmp / "policies"
    shutil.copytree(ROOT / "policies", policies)
    raw = yaml.safe_load((policies / "community-standards.yaml").read_text())
    raw["categories"][2]["review"] = 0.0  # weapons: everything reaches review
    (policies / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    accounts = tmp / "team.txt"
    accounts.write_text("".join(f"{n}:{role}:{hash_password(pw, ln=10)}\n" for n, (role, pw) in TEAM.items()))
    settings = Settings(
        kafka_bootstrap_servers=kafka_service.bootstrap_servers, kafka_api_version=kafka_service.api_version,
        kafka_group_id=f"team-{run}", redis_url=redis_service.url, model_id=str(tiny_clip_dir), device="cpu",
        policy_dir=policies, max_batch_size=16, http_port=0, console_accounts_file=accounts, console_port=0,
        console_banks=("known",), **names,
    )  # fmt: skip
    ids = ODD_IDS + [f"t-{i:02d}" for i in range(9)]
    images = [jpeg_bytes(photo_like(64, 48, seed=900 + n)) for n in range(len(ids))]
    review_items_scored(settings, [(i, inline_event(i, image)) for i, image in zip(ids, images, strict=True)],
                        tmp / "worker.log")  # fmt: skip
    return settings


def _start(team: Settings, kafka_service: Any, health: bool = False, **overrides: Any) -> Console:
    run = uuid.uuid4().hex[:8]
    topic = f"verdicts-{run}"
    kafka_service.create_topics([NewTopic(topic, 1, compacted=True)])
    values = {"console_group_id": f"team-{run}", "console_redis_prefix": f"team-{run}:", "topic_verdicts": topic}
    c = Console(App(team.model_copy(update={**values, **overrides})), health=health).start()
    wait_until(lambda: sum(c.queue.depth().values()) == 14)
    return c


@pytest.fixture
def console(team, kafka_service) -> Iterator[Console]:
    c = _start(team, kafka_service, console_max_leases=4)
    yield c
    c.stop()


def _login(chromium: Any, c: Console, name: str) -> tuple[Any, Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, base_url=c.url, reduced_motion="reduce")
    page = context.new_page()
    page.goto("/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", TEAM[name][1])
    page.click("button[type=submit]")
    page.wait_for_url(c.url + "/")
    return context, page


def _token(page: Any) -> str:
    return str(page.get_attribute('meta[name="csrf-token"]', "content"))


def _handle(c: Console, event_id: str) -> str:
    return next(q.handle for q in c.queue.pending() if q.item.event_id == event_id)


def _free(c: Console, n: int) -> list[str]:
    """``n`` waiting items nobody holds (the ones a verdict's "next" claimed are held)."""
    pending = [q.handle for q in c.queue.pending() if q.item.event_id.startswith("t-")]
    held = c.leases.holders(pending)
    return [h for h in pending if h not in held][:n]


def test_ids_with_url_characters_open_and_are_judged_in_a_browser(browser, console):  # noqa: F811
    context, page = _login(browser, console, "rita")
    page.keyboard.press("n")
    seen: list[str] = []
    for _ in range(5):  # judged with the keyboard, each verdict claims the next
        page.wait_for_url(re.compile(r".*/item/[0-9a-f]{32}$"))
        seen.append(page.inner_text("h1"))
        with page.expect_navigation():
            page.keyboard.press("o")
    rest = [i for i in ODD_IDS if i not in seen]
    for event_id in rest:  # the others by their handle, as from a list
        handle = _handle(console, event_id)
        page.request.post(f"/claim/{handle}", form={"csrf_token": _token(page)})
        page.goto(f"/item/{handle}")
        assert page.inner_text("h1") == event_id
        with page.expect_navigation():
            page.click("button.overturn")
        assert "/login" not in page.url  # "x/../../logout" never reached another route
    judged = {v["event_id"]: v for v in _verdicts(console.app.settings)}
    assert set(ODD_IDS) <= set(judged) and all(judged[i]["reviewer"] == "rita" for i in ODD_IDS)
    assert all(judged[i]["role"] == "reviewer" and judged[i]["verdict"] == "overturn" for i in ODD_IDS)
    page.goto("/")
    assert page.inner_text(".who").startswith("rita")  # still signed in
    context.close()


def test_only_a_lead_finalizes_an_escalation_changes_anothers_verdict_or_banks(browser, console, monkeypatch, capsys):  # noqa: F811
    rita, page = _login(browser, console, "rita")
    handle = _handle(console, "t-00")
    page.request.post(f"/claim/{handle}", form={"csrf_token": _token(page)})
    page.goto(f"/item/{handle}")
    assert page.locator("select[name=bank]").count() == 0  # a reviewer is not offered the banks
    page.fill("#assign", "lena")
    with page.expect_navigation():
        page.click("button.escalate")
    wait_until(lambda: console.queue.stage(handle) == "escalated")
    page.goto("/escalated")
    assert "lena" in page.inner_text("table.list") and page.locator("form[action='/claim?escalated=1']").count() == 0
    token = _token(page)
    assert page.request.post("/claim?escalated=1", form={"csrf_token": token}, max_redirects=0).status == 403
    assert page.request.post(f"/claim/{handle}", form={"csrf_token": token}, max_redirects=0).status == 403
    with pytest.raises(Forbidden):
        console.service.claim_next(RITA, escalated=True)
    # lena, the lead it was assigned to, takes it and confirms it
    lena, lpage = _login(browser, console, "lena")
    lpage.goto("/escalated")
    with lpage.expect_navigation():
        lpage.click("form[action='/claim?escalated=1'] button")
    assert lpage.url.endswith(f"/item/{handle}")
    assert lpage.locator("select[name=bank]").count() == 1  # a lead may add it to a bank
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    lpage.screenshot(path=str(ARTIFACTS / "console-lead-item.png"))
    with lpage.expect_navigation():
        lpage.click("button.confirm")
    wait_until(lambda: console.queue.stage(handle) is None)
    verdicts = _verdicts(console.app.settings)
    [final] = [v for v in verdicts if v["event_id"] == "t-00" and v["revision"] == 2]
    assert (final["verdict"], final["reviewer"], final["role"]) == ("confirm", "lena", "lead")
    # rita cannot change lena's verdict; lena could change rita's
    token = _token(page)
    assert page.request.post(f"/claim/{handle}", form={"csrf_token": token}, max_redirects=0).status == 403
    other, third = _free(console, 2)
    console.service.claim(other, RITA)
    console.service.submit(other, RITA, "overturn", [])
    console.service.claim(other, LENA)  # a lead may
    with pytest.raises(Forbidden, match="bank"):  # and a reviewer never banks, even through the service
        console.service.claim(third, RITA)
        console.service.submit(third, RITA, "confirm", ["weapons"], bank="known")
    rita.close()
    lena.close()
    # QA: the decision log, every revision, as CSV (moderator verdicts export)
    settings = console.app.settings
    env = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers, "LOG_LEVEL": "WARNING",
           "KAFKA_API_VERSION": settings.kafka_api_version or "",
           "TOPIC_VERDICTS": settings.topic_verdicts}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(f"MODERATOR_{name}", value)
    capsys.readouterr()
    assert cli.main(["verdicts", "export", "--since", "2000-01-01", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    t00 = [
        (r["revision"], r["verdict"], r["reviewer"], r["role"], r["assigned_to"])
        for r in rows
        if r["event_id"] == "t-00"
    ]
    assert t00 == [("1", "escalate", "rita", "reviewer", "lena"), ("2", "confirm", "lena", "lead", "")]
    assert cli.main(["verdicts", "export", "--current", "--format", "jsonl"]) == 0
    current = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [v["revision"] for v in current if v["event_id"] == "t-00"] == [2]


def test_a_reviewer_holds_at_most_max_leases_and_the_admin_sees_who_holds_what(browser, console):  # noqa: F811
    rita, page = _login(browser, console, "rita")
    page.request.post("/grid/claim", form={"csrf_token": _token(page)})
    page.goto("/grid")
    assert page.locator(".tile").count() == 4  # MODERATOR_CONSOLE_MAX_LEASES=4, though the grid is 12
    with pytest.raises(ConsoleError, match="MAX_LEASES"):
        console.service.claim_next(RITA)
    assert page.request.get("/admin").status == 403
    root, admin = _login(browser, console, "root")
    admin.goto("/admin")
    rows = admin.locator("#holds tbody tr").all_inner_texts()
    assert len(rows) == 4 and all(r.startswith("rita") for r in rows)
    admin.screenshot(path=str(ARTIFACTS / "console-admin.png"))
    rita.close()
    root.close()


def test_two_quick_submits_publish_one_revision(console):
    handle = _handle(console, "t-03")
    console.service.claim(handle, RITA)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def submit(verdict: Any) -> None:
        barrier.wait()
        try:
            console.service.submit(handle, RITA, verdict, ["weapons"] if verdict == "confirm" else [])
            outcomes.append("published")
        except (NotYours, ConsoleError) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=submit, args=(v,)) for v in ("confirm", "overturn")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["NotYours", "published"]
    assert len([v for v in _verdicts(console.app.settings) if v["event_id"] == "t-03"]) == 1


class _Session:
    """A person at curl: a cookie jar, no redirects followed."""

    def __init__(self, c: Console) -> None:
        self.c = c
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())

    def get(self, path: str) -> Any:
        try:
            return self.opener.open(self.c.url + path)
        except urllib.error.HTTPError as exc:
            return exc

    def token(self) -> str:
        html = self.get("/login" if not self.signed_in() else "/").read().decode()
        return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)

    def signed_in(self) -> bool:
        return self.get("/").status == 200

    def post(self, path: str, **form: str) -> Any:
        data = urllib.parse.urlencode(form).encode()
        try:
            return self.opener.open(urllib.request.Request(self.c.url + path, data=data, method="POST"))
        except urllib.error.HTTPError as exc:
            return exc

    def login(self, name: str, password: str | None = None) -> Any:
        return self.post("/login", username=name, password=password or TEAM[name][1], csrf_token=self.token())


def test_sessions_end_on_sign_out_on_account_removal_and_when_idle(team, kafka_service, tmp_path):
    accounts = tmp_path / "team.txt"
    accounts.write_text(Path(team.console_accounts_file).read_text())
    c = _start(team, kafka_service, console_accounts_file=accounts, console_idle_minutes=0.05)  # 3 s
    try:
        s = _Session(c)
        assert s.login("rita").status == 303 and s.signed_in()
        copied = list(s.jar)  # the cookie, kept by someone who had it
        assert s.post("/logout", csrf_token=s.token()).status == 303
        replay = _Session(c)
        for cookie in copied:
            replay.jar.set_cookie(cookie)
        assert not replay.signed_in()  # signing out ended the session itself, not just the cookie
        s.login("rita")
        accounts.write_text("".join(line + "\n" for line in accounts.read_text().splitlines() if "rita" not in line))
        time.sleep(1.2)  # the file is looked at once a second
        assert not s.signed_in()  # removed from the accounts file: signed out at the next request
        idle = _Session(c)
        idle.login("lena")
        for _ in range(3):
            time.sleep(1.5)
            assert idle.signed_in()  # in use: it lasts
        time.sleep(3.5)
        assert not idle.signed_in()  # idle longer than MODERATOR_CONSOLE_IDLE_MINUTES
    finally:
        c.stop()


def test_failed_logins_back_off_without_hashing_and_hosts_are_checked(console):
    s = _Session(console)
    before = _metric('moderator_console_logins_refused_total{why="backoff"}')
    for _ in range(5):  # the free tries
        assert s.login("lena", "wrong-password").status == 401
    refused = [s.login("lena", "wrong-password") for _ in range(20)]  # the 6th fails and earns a wait
    assert refused[0].status == 401 and {r.status for r in refused[1:]} == {429} and refused[1].headers["Retry-After"]
    assert s.login("lena").status == 429  # even the right password waits its turn
    assert _metric('moderator_console_logins_refused_total{why="backoff"}') - before >= 19
    assert _Session(console).login("rita").status == 303  # another account is not locked out
    # a Host the console does not serve: refused before anything else, with the security headers
    conn = http.client.HTTPConnection(*console.url.removeprefix("http://").split(":"))
    conn.request("GET", "/login", headers={"Host": "rebind.attacker.example"})
    response = conn.getresponse()
    assert response.status == 400 and "default-src 'none'" in response.getheader("Content-Security-Policy", "")
    conn.close()


def test_the_proxy_header_is_believed_only_from_a_trusted_peer_and_only_once(team, kafka_service):
    c = _start(team, kafka_service, health=True, console_trusted_user_header="X-Forwarded-User",
               console_trusted_groups_header="X-Forwarded-Groups", console_lead_groups=("leads",),
               console_trusted_proxies=("127.0.0.1/32",), http_port=0)  # fmt: skip
    host, port = c.url.removeprefix("http://").split(":")

    def get(headers: list[tuple[str, str]], source: str = "127.0.0.1") -> tuple[int, str]:
        conn = http.client.HTTPConnection(host, int(port), source_address=(source, 0))
        conn.putrequest("GET", "/", skip_host=True)
        conn.putheader("Host", f"{host}:{port}")
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read().decode()
        conn.close()
        return response.status, body

    try:
        status, body = get([("X-Forwarded-User", "alice"), ("X-Forwarded-Groups", "staff,leads")])
        assert status == 200 and 'class="who">alice <span class="tag">lead' in body
        # the same headers from a peer that is not the proxy, claiming to be forwarded by it: nobody
        assert get([("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-User", "alice")], source="127.0.0.2")[0] == 303
        # two copies of the header (one the client's own): nobody
        assert get([("X-Forwarded-User", "mallory"), ("X-Forwarded-User", "alice")])[0] == 303
        assert get([("X-Forwarded-User", "../admin")])[0] == 303  # not an account name
        ready = urllib.request.urlopen(f"http://127.0.0.1:{c.health.port}/readyz")
        assert ready.status == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{c.health.port}/metrics").read().decode()
        assert "moderator_console_images_revealed_total" in metrics and "reviewer=" not in metrics  # no names
    finally:
        c.stop()


def test_the_leads_page_shows_the_queue_the_reviewers_and_the_overturn_rate(browser, console):  # noqa: F811
    for handle in _free(console, 3):
        console.service.claim(handle, RITA)
        console.service.submit(handle, RITA, "overturn", [])
    rita, page = _login(browser, console, "rita")
    assert page.request.get("/team").status == 403  # a reviewer's figures are a lead's to see
    lena, lpage = _login(browser, console, "lena")
    lpage.goto("/team")
    stages = lpage.locator("#stages tbody tr").all_inner_texts()
    assert stages[0].split("\t")[:2] == ["new", "11"]  # 14 scored, 3 judged
    assert "rita\t3\t0\t3\t0" in lpage.inner_text("#reviewers")
    assert "weapons\t3\t3\t100%" in lpage.inner_text("#categories")  # every item fired weapons (review at 0)
    assert "3 verdicts" in lpage.inner_text("#to-verdict")
    lpage.screenshot(path=str(ARTIFACTS / "console-team.png"), full_page=True)
    rita.close()
    lena.close()


def test_named_queues_route_items_and_only_their_roles_work_them(browser, team, kafka_service):  # noqa: F811
    c = _start(team, kafka_service, console_queues=({"name": "weapons-leads", "roles": ["lead", "admin"]},),
               console_routes=({"category": "weapons", "policy": "community-standards", "queue": "weapons-leads"},
                               {"category": "drugs", "queue": "default"}))  # fmt: skip
    try:
        assert {q.queue for q in c.queue.pending()} == {"weapons-leads"}  # every item fired weapons
        assert c.service.claim_next(RITA) == []  # nothing in the queues a reviewer works
        with pytest.raises(Forbidden, match="weapons-leads"):
            c.service.claim(_handle(c, "t-04"), RITA)  # not by id either
        with pytest.raises(Forbidden):
            c.service.claim_next(RITA, queue="weapons-leads")
        lena, page = _login(browser, c, "lena")
        rows = page.locator("#queues tbody tr").all_inner_texts()
        assert [r.split("\t")[:2] for r in rows] == [["weapons-leads", "14"], ["default", "0"], ["appeals", "0"]]
        with page.expect_navigation():
            page.click("form[action='/claim?queue=weapons-leads'] button")
        assert "/item/" in page.url
        lena.close()
    finally:
        c.stop()


def test_an_appeal_goes_to_the_appeals_queue_a_lead_decides_it_and_the_platform_hears(browser, console):  # noqa: F811
    settings = console.app.settings
    decisions: list[DecisionRecord] = []
    reader = make_reader(settings, [settings.topic("decisions")])
    read_to_end(reader, lambda r: decisions.append(DecisionRecord.model_validate_json(r.value)))
    reader.close(autocommit=False)
    decision = next(d for d in decisions if d.event_id == "t-06")
    appeal = Appeal(appeal_id="ap-1", event_id="t-06", decision=decision, text="It is a toy, not a gun.")
    produce(settings, [("t-06", appeal.model_dump_json().encode())], topic=settings.topic("appeals"))
    wait_until(lambda: any(q.item.appeal_id == "ap-1" for q in console.queue.pending()))
    handle = next(q.handle for q in console.queue.pending() if q.item.appeal_id == "ap-1")
    assert next(q for q in console.queue.pending() if q.handle == handle).queue == "appeals"
    with pytest.raises(Forbidden):
        console.service.claim(handle, RITA)  # a reviewer does not decide appeals
    assert handle not in {q.handle for q in console.service.claim_next(RITA, count=4)}
    lena, page = _login(browser, console, "lena")
    assert ["appeals", "1"] in [r.split("\t")[:2] for r in page.locator("#queues tbody tr").all_inner_texts()]
    with page.expect_navigation():
        page.click("form[action='/claim?queue=appeals'] button")
    assert page.url.endswith(f"/item/{handle}")
    assert "It is a toy, not a gun." in page.inner_text("#appeal-text")
    assert page.locator("button.escalate").count() == 0
    page.screenshot(path=str(ARTIFACTS / "console-appeal.png"))
    with page.expect_navigation():
        page.click("button.overturn")
    wait_until(lambda: any(v.get("appeal") for v in _verdicts(settings)))
    [verdict] = [v for v in _verdicts(settings) if v.get("appeal")]
    assert (verdict["event_id"], verdict["appeal_id"], verdict["verdict"], verdict["role"]) == (
        "t-06",
        "ap-1",
        "overturn",
        "lead",
    )
    answers: list[dict[str, Any]] = []
    reader = make_reader(settings, [settings.topic("appeal_decisions")])
    read_to_end(reader, lambda r: answers.append(json.loads(r.value)))
    reader.close(autocommit=False)
    assert [(a["appeal_id"], a["outcome"], a["reviewer"], a["decision"]) for a in answers] == [
        ("ap-1", "overturned", "lena", decision.decision)]  # fmt: skip
    # calibration leaves appeal verdicts out unless asked: users choose what they appeal
    assert ("t-06", decision.image_sha256) not in read_verdicts(console.app).current
    assert read_verdicts(console.app, include_appeals=True).current[("t-06", decision.image_sha256)].appeal
    lena.close()
