"""A verdict judges the image that was scored: images that change at their URL after the worker scored
them, event ids re-used for other bytes, and double review, on the real worker, Kafka, Redis and (for
what a reviewer sees) a real headless Chromium."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from moderator.app import App
from moderator.banks.store import read_entries
from moderator.config import Settings
from moderator.console import Console
from moderator.console.auth import hash_password
from moderator.console.service import ConsoleError
from moderator.samples import jpeg_bytes, photo_like
from moderator.topics import TOPICS, NewTopic

from .harness import Outputs, WorkerProcess, inline_event, produce, wait_until
from .test_console import ALICE, ARTIFACTS, BOB, PASSWORDS, ROLES, _login, _verdicts, browser  # noqa: F401 (a fixture)

A = jpeg_bytes(photo_like(160, 120, seed=901))
B = jpeg_bytes(photo_like(160, 120, seed=902))
X = jpeg_bytes(photo_like(96, 72, seed=903))
Y = jpeg_bytes(photo_like(96, 72, seed=904))


class ChangingHost:
    """An uploader's server that answers each path with a list of bodies in turn (the last one after)."""

    def __init__(self, bodies: dict[str, list[bytes]]) -> None:
        self.bodies = bodies
        self.served: dict[str, int] = {p: 0 for p in bodies}
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                queue = host.bodies[self.path]
                body = queue[min(host.served[self.path], len(queue) - 1)]
                host.served[self.path] += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def host() -> Iterator[ChangingHost]:
    h = ChangingHost({"/aab.jpg": [A, A, B], "/ab.jpg": [A, B]})
    yield h
    h.server.shutdown()


@pytest.fixture(scope="module")
def scored(kafka_service, redis_service, tiny_clip_dir, tmp_path_factory, host) -> Settings:
    """Six events through the worker under a policy that reviews everything and double-reviews it all:
    two URL images whose server changes its answer, one event id used for two images, two more."""
    tmp = tmp_path_factory.mktemp("integrity")
    run = uuid.uuid4().hex[:8]
    names = {t.setting: f"integrity-{run}-{t.default}" for t in TOPICS}
    kafka_service.create_topics([NewTopic(names[t.setting], t.partitions_for(2), t.compacted) for t in TOPICS])
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "integrity.yaml").write_text(yaml.safe_dump({
        "name": "integrity", "default": True, "double_review": 1.0,
        "categories": [{"name": "weapons", "descriptions": ["a handgun"], "flag": 1.0, "review": 0.0}],
        "neutral": ["a landscape"],
    }))  # fmt: skip
    accounts = tmp / "reviewers.txt"
    accounts.write_text("".join(f"{n}:{ROLES[n]}:{hash_password(p, ln=12)}\n" for n, p in PASSWORDS.items()))
    settings = Settings(
        kafka_bootstrap_servers=kafka_service.bootstrap_servers, kafka_api_version=kafka_service.api_version,
        kafka_group_id=f"integrity-{run}", redis_url=redis_service.url, model_id=str(tiny_clip_dir), device="cpu",
        policy_dir=policies, max_batch_size=8, fetch_allow_networks=("127.0.0.0/8",), http_port=0,
        console_accounts_file=accounts, console_port=0, console_banks=("known",), **names,
    )  # fmt: skip
    worker = WorkerProcess(settings, tmp / "worker.log")
    out = Outputs(settings, kinds=("review",))
    try:
        worker.wait_for("partitions_assigned")
        url = [(e, json.dumps({"id": e, "image": {"url": f"{host.base}/{p}"}}).encode())
               for e, p in (("c-aab", "aab.jpg"), ("c-ab", "ab.jpg"))]  # fmt: skip
        produce(settings, [*url, ("dup", inline_event("dup", X)), ("d-1", inline_event("d-1", A)),
                           ("d-2", inline_event("d-2", B))])  # fmt: skip

        def reviewed(n: int) -> bool:
            out.poll()
            return len(out.records["review"]) >= n

        wait_until(lambda: reviewed(5), timeout=120, what="5 review items")
        produce(settings, [("dup", inline_event("dup", Y))])  # the same id, other bytes, later
        wait_until(lambda: reviewed(6), timeout=60, what="the second image under the same id")
    finally:
        out.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.tail()
    assert host.served == {"/aab.jpg": 1, "/ab.jpg": 1}  # the worker fetched each once: it scored A
    return settings


def _console(scored: Settings, kafka_service: Any, topic: str | None = None, waiting: int = 6) -> Console:
    run = uuid.uuid4().hex[:8]
    if topic is None:
        topic = f"verdicts-{run}"
        kafka_service.create_topics([NewTopic(topic, 1, compacted=True)])
    settings = scored.model_copy(update={"console_group_id": f"integrity-{run}", "topic_verdicts": topic,
                                         "console_redis_prefix": f"test-integrity-{run}:"})  # fmt: skip
    c = Console(App(settings), health=False).start()
    wait_until(lambda: sum(c.queue.depth().values()) == waiting, what=f"{waiting} items waiting")
    return c


def _handle(c: Console, event_id: str, data: bytes | None = None) -> str:
    sha = hashlib.sha256(data).hexdigest() if data is not None else None
    return next(q.handle for q in c.queue.pending() if q.item.event_id == event_id
                and (sha is None or q.item.image.sha256 == sha))  # fmt: skip


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((80, 60)), dtype=float)


def test_an_image_that_changed_since_it_was_scored_is_refused_never_shown(browser, scored, kafka_service, host):  # noqa: F811
    c = _console(scored, kafka_service)
    try:
        context, page, _ = _login(browser, c, "alice")
        token = page.get_attribute('meta[name="csrf-token"]', "content")
        # c-ab: its server now answers B. The page refuses, shows no image; the image route gives none.
        ab = _handle(c, "c-ab")
        page.request.post(f"/claim/{ab}", form={"csrf_token": token})
        page.goto(f"/item/{ab}")
        assert "has changed since it was scored" in page.inner_text("#refused")
        assert page.locator("#shield img").count() == 0
        image = page.request.get(f"/image/{ab}")
        assert image.status != 200 and not image.headers["content-type"].startswith("image/")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console-image-changed.png"))
        assert c.queue.depth()["set_aside"] == 1  # set aside: never handed out again
        assert ab not in {q.handle for q in c.queue.pending(for_reviewer="bob")}
        with pytest.raises(ConsoleError, match="only be escalated"):
            c.service.submit(ab, ALICE, "confirm", ["weapons"])
        c.service.skip(ab, "alice")  # free to claim: only being set aside keeps it from anyone
        other = Console(App(c.app.settings), health=False).start()  # another replica: it is set aside there too
        try:
            wait_until(lambda: sum(other.queue.depth().values()) == 6)
            claimed = other.service.claim_next(BOB, count=10)
            assert claimed and ab not in {q.handle for q in claimed} and other.queue.depth()["set_aside"] == 1
            for q in claimed:
                other.service.skip(q.handle, "bob")
        finally:
            other.stop()
        # c-aab: its server still answers A once more: the reviewer sees A (checked, then cached) ...
        aab = _handle(c, "c-aab")
        page.request.post(f"/claim/{aab}", form={"csrf_token": token})
        page.goto(f"/item/{aab}")
        page.wait_for_function("() => document.querySelector('#shield img').naturalWidth > 0")
        page.keyboard.press("r")
        page.wait_for_function("() => document.querySelector('#shield img').src.endsWith('/original')")
        shown = _pixels(page.request.get(f"/image/{aab}/original").body())
        assert np.abs(shown - _pixels(A)).mean() < 8 < np.abs(shown - _pixels(B)).mean()
        # ... and a bank add, which reads the image again (now B), is refused: no entry, no verdict.
        page.select_option("select[name=bank]", "known")
        with page.expect_navigation():
            page.click("button.confirm")
        assert "cannot be hashed" in page.inner_text("main") and "changed since it was scored" in page.inner_text(
            "main"
        )
        assert read_entries(c.app.settings) == {}
        assert _verdicts(c.app.settings) == []
        assert host.served == {"/aab.jpg": 3, "/ab.jpg": 2}
        context.close()
    finally:
        c.stop()


def test_a_re_used_event_id_with_other_bytes_is_a_new_item(scored, kafka_service):
    c = _console(scored, kafka_service)
    topic = c.app.settings.topic("verdicts")
    try:
        first, second = _handle(c, "dup", X), _handle(c, "dup", Y)
        assert first != second  # one id, two images: two items
        c.service.claim(first, ALICE)
        c.service.submit(first, ALICE, "overturn", [])
        c.service.claim(first, BOB)
        c.service.submit(first, BOB, "overturn", [])  # the second opinion (double review)
        assert c.queue.stage(first) is None and c.queue.stage(second) == "new"  # Y still waits
        records = [v for v in _verdicts(c.app.settings) if v["event_id"] == "dup"]
        assert {v["image_sha256"] for v in records} == {hashlib.sha256(X).hexdigest()}
        time.sleep(2.5)  # the done-watermark is committed
    finally:
        c.stop()
    again = _console(scored, kafka_service, topic, waiting=5)  # a restart: X judged, Y waiting
    try:
        assert again.queue.stage(first) is None and again.queue.stage(second) == "new"
        assert "dup" in {q.item.event_id for q in again.queue.pending()}
    finally:
        again.stop()


def test_double_review_asks_another_reviewer_and_keeps_both_verdicts(scored, kafka_service):
    c = _console(scored, kafka_service)
    try:
        handle = _handle(c, "d-1")
        c.service.claim(handle, ALICE)
        c.service.submit(handle, ALICE, "confirm", ["weapons"])
        assert c.queue.stage(handle) == "second"
        assert handle not in {q.handle for q in c.service.claim_next(ALICE, count=10)}  # never the same one
        [got] = [q for q in c.service.claim_next(BOB, count=10) if q.handle == handle]
        with pytest.raises(ConsoleError, match="second opinion"):
            c.service.submit(handle, BOB, "escalate", [])
        c.service.submit(got.handle, BOB, "overturn", [])
        assert c.queue.stage(handle) is None
        records = [v for v in _verdicts(c.app.settings) if v["event_id"] == "d-1"]
        assert sorted((v["reviewer"], v["verdict"], v["second_opinion"]) for v in records) == [
            ("alice", "confirm", False), ("bob", "overturn", True)]  # fmt: skip
    finally:
        c.stop()
