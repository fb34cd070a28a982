"""The review console in a real headless Chromium (Debian's, driven by Playwright), on the real Kafka
and Redis, with review items the real worker decided."""

from __future__ import annotations

import http.cookiejar
import http.server
import io
import json
import os
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
from PIL import Image

from moderator.app import App
from moderator.banks.store import read_entries
from moderator.clients import make_reader, read_to_end
from moderator.config import Settings
from moderator.console import Console
from moderator.console.auth import hash_password
from moderator.console.service import Person
from moderator.samples import jpeg_bytes, photo_like
from moderator.topics import TOPICS, NewTopic

from .harness import inline_event, review_items_scored, wait_until

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MODERATOR_TEST_ARTIFACTS", ROOT / ".test-artifacts"))
CHROMIUM = os.environ.get("MODERATOR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--no-first-run", "--disable-gpu", "--disable-quic", "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost",
]  # fmt: skip
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}
ROLES = {"alice": "lead", "bob": "reviewer"}  # alice adds to banks and finalizes escalations
ALICE, BOB = Person("alice", "lead"), Person("bob")


class ImageHost:
    """A "CDN" on loopback: what it served, and to whom (the console's fetcher, or a browser)."""

    def __init__(self) -> None:
        self.image = jpeg_bytes(photo_like(120, 90, seed=77))
        self.hits: list[str] = []  # user agents
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.hits.append(self.headers.get("User-Agent", ""))
                self.send_response(200)
                self.send_header("Content-Length", str(len(host.image)))
                self.end_headers()
                self.wfile.write(host.image)

            def log_message(self, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.netloc = f"127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.server.shutdown()


@pytest.fixture(scope="module")
def reviewed(kafka_service, redis_service, tiny_clip_dir, tmp_path_factory, image_host) -> Settings:
    """40 events (one by URL) through the worker under a policy that sends every event to review."""
    tmp = tmp_path_factory.mktemp("console")
    run = uuid.uuid4().hex[:8]
    names = {t.setting: f"console-{run}-{t.default}" for t in TOPICS}
    kafka_service.create_topics([NewTopic(names[t.setting], t.partitions_for(2), t.compacted) for t in TOPICS])
    policies = tmp / "policies"
    shutil.copytree(ROOT / "policies", policies)
    raw = yaml.safe_load((policies / "community-standards.yaml").read_text())
    raw["categories"][2]["review"] = 0.0  # weapons: everything reaches review
    (policies / "community-standards.yaml").write_text(yaml.safe_dump(raw))
    accounts = tmp / "reviewers.txt"
    accounts.write_text("".join(f"{n}:{ROLES[n]}:{hash_password(p, ln=12)}\n" for n, p in PASSWORDS.items()))
    settings = Settings(
        kafka_bootstrap_servers=kafka_service.bootstrap_servers, kafka_api_version=kafka_service.api_version,
        kafka_group_id=f"console-{run}", redis_url=redis_service.url, model_id=str(tiny_clip_dir), device="cpu",
        policy_dir=policies, max_batch_size=16, fetch_allow_networks=("127.0.0.0/8",), http_port=0,
        console_accounts_file=accounts, console_port=0, **names,
    )  # fmt: skip
    items = [(f"c-{i:03d}", inline_event(f"c-{i:03d}", jpeg_bytes(photo_like(64, 48, seed=500 + i))))
             for i in range(39)]  # fmt: skip
    url = f"http://{image_host.netloc}/u.jpg"
    items.append(("c-url", json.dumps({"id": "c-url", "image": {"url": url}}).encode()))
    review_items_scored(settings, items, tmp / "worker.log")  # 40 review items
    return settings


def _console_settings(reviewed: Settings, **overrides: Any) -> Settings:
    """The reviewed items, seen by a new console: its own group, verdicts topic and leases."""
    run = uuid.uuid4().hex[:8]
    values = {"console_group_id": f"console-{run}", "console_redis_prefix": f"test-console-{run}:", **overrides}
    return reviewed.model_copy(update=values)


@pytest.fixture
def console(reviewed, kafka_service) -> Iterator[Console]:
    topic = f"verdicts-{uuid.uuid4().hex[:8]}"
    kafka_service.create_topics([NewTopic(topic, 1, compacted=True)])
    c = Console(App(_console_settings(reviewed, topic_verdicts=topic, console_banks=("confirmed-weapons",))),
                health=False).start()  # fmt: skip
    wait_until(lambda: c.queue.depth()["new"] == 40)
    yield c
    c.stop()


def _verdicts(settings: Settings) -> list[dict[str, Any]]:
    reader = make_reader(settings, [settings.topic("verdicts")])
    out: list[dict[str, Any]] = []
    read_to_end(reader, lambda r: out.append(json.loads(r.value)))
    reader.close(autocommit=False)
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _login(browser: Any, console: Console, name: str) -> tuple[Any, Any, list[str]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=console.url,
                                  reduced_motion="reduce")  # fmt: skip
    requests: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    page.goto("/")
    assert page.url.endswith("/login")  # not signed in: to the login page
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_url(console.url + "/")
    return context, page, requests


def _filter(page: Any, selector: str) -> str:
    return str(page.eval_on_selector(selector, "el => getComputedStyle(el).filter"))


def test_a_reviewer_claims_reveals_and_confirms_with_the_keyboard(browser, console):
    context, page, requests = _login(browser, console, "alice")
    assert "40 items waiting" in page.inner_text("h1")
    page.keyboard.press("n")
    page.wait_for_url(re.compile(r".*/item/[0-9a-f]{32}$"))  # items are named by an opaque handle
    handle = page.url.rsplit("/item/", 1)[1]
    event_id = console.queue.get(handle).item.event_id
    page.wait_for_function("() => document.querySelector('#shield img').complete")
    assert _filter(page, "#shield img") == "blur(28px) grayscale(1)"  # blurred and gray by default
    served = Image.open(io.BytesIO(page.request.get(f"/image/{handle}").body()))  # and so are its bytes
    assert max(served.size) <= 96 and served.mode == "L"  # opening the image in a new tab shows no more
    assert page.request.get(f"/image/{handle}/original").status == 403  # the original: only after a reveal
    page.keyboard.press("r")
    assert _filter(page, "#shield img") == "none"
    page.wait_for_function("() => document.querySelector('#shield img').src.endsWith('/original')")
    original = Image.open(io.BytesIO(page.request.get(f"/image/{handle}/original").body()))
    assert original.mode == "RGB" and original.size == (64, 48)  # revealed: the image itself
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console-item.png"))
    checked = page.eval_on_selector_all("input[name=category]:checked", "els => els.map(e => e.value)")
    fired = sorted({t.category for t in console.queue.get(handle).item.reasons})
    assert "weapons" in fired and sorted(checked) == fired  # the fired categories, pre-checked
    page.select_option("select[name=bank]", "confirmed-weapons")  # and into the bank it goes
    page.focus("#note")
    page.keyboard.press("Escape")
    with page.expect_navigation():
        page.keyboard.press("c")
    assert page.url.rsplit("/item/", 1)[1] != handle  # on to the next one
    wait_until(lambda: any(v["event_id"] == event_id for v in _verdicts(console.app.settings)))
    [verdict] = [v for v in _verdicts(console.app.settings) if v["event_id"] == event_id]
    assert (verdict["verdict"], verdict["categories"], verdict["reviewer"]) == ("confirm", fired, "alice")
    assert verdict["judged"]["decision"] == "review" and verdict["revision"] == 1
    assert verdict["image_sha256"] == console.queue.get(handle).item.image.sha256  # the bytes it judged
    entries = read_entries(console.app.settings)
    assert set(entries) == {f"confirmed-weapons/{event_id}"}
    entry = entries[f"confirmed-weapons/{event_id}"]
    assert entry.pdq is not None and entry.added_by == "alice" and entry.source == f"console:{event_id}"
    assert all(u.startswith(console.url) for u in requests), [u for u in requests if not u.startswith(console.url)]
    # The grid: a batch claimed, tiles blurred, judged with the keyboard.
    page.goto("/")
    page.keyboard.press("g")
    page.wait_for_url(console.url + "/grid")
    page.wait_for_function("() => [...document.querySelectorAll('.tile img')].every(i => i.complete)")
    assert page.locator(".tile").count() == 12
    page.keyboard.press("r")
    page.screenshot(path=str(ARTIFACTS / "console-grid.png"))
    page.keyboard.press("o")
    page.wait_for_selector(".tile.done")
    assert page.inner_text(".tile.done .status") == "overturn"
    context.close()


def test_two_reviewers_claiming_at_once_never_get_the_same_item(console):
    def session(name: str) -> tuple[urllib.request.OpenerDirector, str]:
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect())
        html = opener.open(console.url + "/login").read().decode()
        token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
        form = urllib.parse.urlencode({"username": name, "password": PASSWORDS[name], "csrf_token": token})
        _post(opener, console.url + "/login", form)
        html = opener.open(console.url + "/").read().decode()
        return opener, re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)

    sessions = [session("alice"), session("bob")]
    claimed: dict[int, list[str]] = {0: [], 1: []}

    def review(i: int) -> None:  # as fast as a reviewer can: claim, judge (which claims the next), ...
        opener, token = sessions[i]
        location = _post(opener, console.url + "/claim", urllib.parse.urlencode({"csrf_token": token}))
        for _ in range(10):
            handle = location.rsplit("/item/", 1)[1]
            claimed[i].append(console.queue.get(handle).item.event_id)
            form = urllib.parse.urlencode({"csrf_token": token, "verdict": "overturn"})
            location = _post(opener, f"{console.url}/item/{handle}/verdict", form)

    threads = [threading.Thread(target=review, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed[0])) == 10 and len(set(claimed[1])) == 10
    assert not set(claimed[0]) & set(claimed[1])  # never the same item
    verdicts = _verdicts(console.app.settings)
    assert sorted(v["event_id"] for v in verdicts) == sorted(claimed[0] + claimed[1])  # each judged once
    assert {v["reviewer"] for v in verdicts if v["event_id"] in claimed[0]} == {"alice"}


def test_an_expired_lease_returns_its_item(reviewed, kafka_service):
    topic = f"verdicts-{uuid.uuid4().hex[:8]}"
    kafka_service.create_topics([NewTopic(topic, 1, compacted=True)])
    c = Console(App(_console_settings(reviewed, topic_verdicts=topic, console_lease_s=1.5)), health=False).start()
    try:
        wait_until(lambda: c.queue.depth()["new"] == 40)
        [first] = c.service.claim_next(ALICE)
        [other] = c.service.claim_next(BOB)
        assert other.handle != first.handle  # held: bob gets the next one
        time.sleep(2.0)
        [again] = c.service.claim_next(BOB, exclude=frozenset({other.handle}))
        assert again.handle == first.handle  # alice's claim expired: back in the queue
        from moderator.console.service import NotYours

        with pytest.raises(NotYours):  # a verdict only from the lease holder
            c.service.submit(first.handle, ALICE, "overturn", [])
        wait_until(lambda: _metric("moderator_console_lease_expiries_total") >= 1, timeout=5)
    finally:
        c.stop()


def test_not_signed_in_and_missing_csrf_are_refused(browser, console):
    opener = urllib.request.build_opener(_NoRedirect())
    handle = next(q.handle for q in console.queue.pending() if q.item.event_id == "c-001")
    for path in ("/", "/grid", f"/item/{handle}", f"/image/{handle}", f"/image/{handle}/original", "/admin"):
        response = opener.open(console.url + path)
        assert response.status == 303 and response.headers["Location"] == "/login", path
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(urllib.request.Request(console.url + "/api/verdict", data=b"{}", method="POST"))
    assert refused.value.code == 403  # no session, no token
    context, page, _ = _login(browser, console, "bob")
    headers = page.request.get("/").headers
    assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in headers[
        "content-security-policy"]  # fmt: skip
    cookie = next(c for c in context.cookies() if c["name"] == "moderator_console")  # a session id, nothing else
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    token = page.get_attribute('meta[name="csrf-token"]', "content")
    c002 = next(q.handle for q in console.queue.pending() if q.item.event_id == "c-002")
    body = {"handle": c002, "verdict": "overturn", "categories": []}
    assert page.request.post("/api/verdict", data=body).status == 403  # signed in, but no token
    assert page.request.post("/api/verdict", data=body, headers={"X-CSRF-Token": "forged"}).status == 403
    assert page.request.post("/claim", form={"csrf_token": "forged"}, max_redirects=0).status == 403
    ok = page.request.post("/api/verdict", data=body, headers={"X-CSRF-Token": token})
    assert ok.status == 409  # the token passes; bob holds no lease on c-002, so no verdict from him
    assert _verdicts(console.app.settings) == []
    context.close()


def test_a_url_image_is_served_by_the_console_and_the_page_never_requests_its_host(browser, console, image_host):
    context, page, requests = _login(browser, console, "alice")
    handle = next(q.handle for q in console.queue.pending() if q.item.event_id == "c-url")
    page.request.post(f"/claim/{handle}", form={"csrf_token": page.get_attribute('meta[name="csrf-token"]', "content")})
    page.goto(f"/item/{handle}")
    page.wait_for_function("() => document.querySelector('#shield img').naturalWidth > 0")
    page.keyboard.press("r")
    page.wait_for_function("() => document.querySelector('#shield img').src.endsWith('/original')")
    assert not [u for u in requests if image_host.netloc in u]  # the browser never asked the image's host
    assert image_host.hits and all(ua.startswith("moderator/") for ua in image_host.hits)  # the console did
    jpeg = page.request.get(f"/image/{handle}/original")
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.body()[:2] == b"\xff\xd8"
    context.close()


def test_a_restarted_console_does_not_show_judged_items(reviewed, kafka_service):
    topic = f"verdicts-{uuid.uuid4().hex[:8]}"
    kafka_service.create_topics([NewTopic(topic, 1, compacted=True)])
    settings = _console_settings(reviewed, topic_verdicts=topic)
    first = Console(App(settings), health=False).start()
    try:
        wait_until(lambda: first.queue.depth()["new"] == 40)
        claimed = first.service.claim_next(ALICE, count=5)
        for q in claimed:
            first.service.submit(q.handle, ALICE, "overturn", [])
        judged = [q.item.event_id for q in claimed]
        again = first.service.submit(claimed[0].handle, ALICE, "overturn", [])
        assert not again.published  # the same verdict twice: no second record
        time.sleep(2.5)  # one commit interval: the done-watermark goes to the broker
    finally:
        first.stop()
    second = Console(App(settings), health=False).start()
    try:
        wait_until(lambda: second.queue.depth()["new"] == 35)
        pending = {q.item.event_id for q in second.queue.pending()}
        assert not pending & set(judged) and len(pending) == 35
        assert len(_verdicts(settings)) == 5
    finally:
        second.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None

    def http_error_303(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        return fp

    http_error_302 = http_error_303


def _post(opener: urllib.request.OpenerDirector, url: str, form: str) -> str:
    response = opener.open(urllib.request.Request(url, data=form.encode(), method="POST"))
    assert response.status == 303, response.status
    return str(response.headers["Location"])


def _metric(name: str) -> float:
    from prometheus_client import generate_latest

    from moderator.observability import REGISTRY

    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_dev_login_is_a_throwaway_account(reviewed, tmp_path):
    settings = reviewed.model_copy(update={"console_accounts_file": None})
    from moderator.console import ConsoleConfigError

    with pytest.raises(ConsoleConfigError, match="MODERATOR_CONSOLE_ACCOUNTS_FILE"):
        Console(App(settings), health=False)
    c = Console(App(settings), dev=True, health=False)
    try:
        name, password = c.dev_login
        assert name == "dev" and len(password) >= 12
    finally:
        c.stop()
