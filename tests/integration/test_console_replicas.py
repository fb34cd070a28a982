"""One queue behind several console replicas: three ``moderator console`` processes on one review topic,
six scripted reviewers spread over them, one replica SIGKILLed midway (real Kafka and Redis).

The review items are the records the worker writes (``ReviewItem``), each naming its inline image on
the images topic, produced directly: the console is what is under test, and 1,000 of them through the
model would only add minutes.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.cookiejar
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from typing import Any

import pytest

from moderator.clients import make_producer
from moderator.config import Settings
from moderator.console.auth import hash_password
from moderator.events import ImageRef, PolicyRef, ReviewItem, Source, Trigger, utc_now
from moderator.samples import jpeg_bytes, photo_like
from moderator.topics import TOPICS, NewTopic

from .test_console import _verdicts

pytestmark = pytest.mark.integration

ITEMS = 1000
REVIEWERS = [f"r{i}" for i in range(6)]
PASSWORD = "replica-password-1"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def http_error_303(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        return fp


def _items(settings: Settings) -> None:
    producer = make_producer(settings, linger_ms=20)
    images = [jpeg_bytes(photo_like(48, 36, seed=i)) for i in range(16)]
    sent = []
    for i in range(ITEMS):
        event_id = f"rep-{i:04d}"
        value = json.dumps({"id": event_id, "image": {"data": base64.b64encode(images[i % 16]).decode()}}).encode()
        sent.append((event_id, images[i % 16], producer.send(settings.topic("images"), key=event_id.encode(),
                                                             value=value)))  # fmt: skip
    producer.flush()
    for i, (event_id, image, future) in enumerate(sent):
        meta = future.get(timeout=60)
        source = Source(topic=meta.topic, partition=meta.partition, offset=meta.offset)
        item = ReviewItem(
            event_id=event_id, decision="review", priority=i % 7, scores={"weapons": 0.5},
            reasons=[Trigger(category="weapons", rule="review", score=0.5, threshold=0.4)],
            image=ImageRef(inline_source=source, sha256=hashlib.sha256(image).hexdigest(), bytes=len(image)),
            policy=PolicyRef(name="p", version="sha256:p"), model="m", source=source, decided_at=utc_now(),
        )  # fmt: skip
        producer.send(settings.topic("review"), key=event_id.encode(), value=item.model_dump_json().encode())
    producer.flush()
    producer.close()


class Reviewer:
    """A person at a browser, scripted: claim, look at the page, overturn, and on; when their replica
    dies, they open another one (the session is in Redis: the same cookie works there)."""

    def __init__(self, name: str, urls: list[str], first: int) -> None:
        self.name, self.urls, self.at = name, urls, first
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())
        self.shown: list[tuple[str, float]] = []  # (event id on the item page, when)
        self.switches = 0
        self.token = ""

    def _open(self, path: str, form: dict[str, str] | None = None) -> Any:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        return self.opener.open(urllib.request.Request(self.urls[self.at] + path, data=data), timeout=30)

    def sign_in(self) -> None:
        page = self._open("/").read().decode()
        if "csrf_token" in page and 'name="password"' not in page:
            self.token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
            return
        token = re.search(r'name="csrf_token" value="([^"]+)"', self._open("/login").read().decode()).group(1)
        self._open("/login", {"username": self.name, "password": PASSWORD, "csrf_token": token})
        page = self._open("/").read().decode()
        self.token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)

    def run(self, stop: threading.Event, dead: set[int]) -> None:
        location = None
        while not stop.is_set():
            try:
                if not self.token:
                    self.sign_in()
                if location is None or "/item/" not in location:
                    location = self._open("/claim", {"csrf_token": self.token}).headers["Location"]
                    if "/item/" not in location:
                        time.sleep(0.3)  # nothing to claim right now
                        continue
                page = self._open(location).read().decode()
                self.shown.append((re.search(r'<h1 class="mono">([^<]+)</h1>', page).group(1), time.monotonic()))
                location = self._open(location + "/verdict", {"csrf_token": self.token, "verdict": "overturn"}).headers[
                    "Location"]  # fmt: skip
            except urllib.error.HTTPError:  # a refusal (e.g. taken meanwhile): claim again
                location = None
            except (OSError, http.client.HTTPException):  # the replica is gone (or going): another one
                if self.at in dead:
                    self.at = next(i for i in range(len(self.urls)) if i not in dead)
                    self.switches += 1
                self.token, location = "", None
                time.sleep(0.2)


def test_three_replicas_one_queue_a_replica_killed_every_item_judged_once(kafka_service, redis_service, tmp_path):
    run = uuid.uuid4().hex[:8]
    names = {t.setting: f"rep-{run}-{t.default}" for t in TOPICS}
    kafka_service.create_topics([NewTopic(names[t.setting], t.partitions_for(4), t.compacted) for t in TOPICS])
    settings = Settings(kafka_bootstrap_servers=kafka_service.bootstrap_servers,
                        kafka_api_version=kafka_service.api_version, redis_url=redis_service.url, **names)  # fmt: skip
    _items(settings)
    accounts = tmp_path / "team.txt"
    line = hash_password(PASSWORD, ln=10)
    accounts.write_text("".join(f"{name}:{line}\n" for name in REVIEWERS))
    env = {
        **os.environ, "MODERATOR_KAFKA_BOOTSTRAP_SERVERS": kafka_service.bootstrap_servers,
        "MODERATOR_KAFKA_API_VERSION": kafka_service.api_version or "", "MODERATOR_REDIS_URL": redis_service.url,
        "MODERATOR_CONSOLE_ACCOUNTS_FILE": str(accounts), "MODERATOR_CONSOLE_PORT": "0", "MODERATOR_HTTP_PORT": "0",
        "MODERATOR_CONSOLE_LEASE_S": "3", "MODERATOR_CONSOLE_GROUP_ID": f"rep-{run}",
        "MODERATOR_CONSOLE_REDIS_PREFIX": f"rep-{run}:", "MODERATOR_CONSOLE_SECRET_KEY": "s" * 40,
        "MODERATOR_LOG_LEVEL": "WARNING",
        **{f"MODERATOR_{k.upper()}": v for k, v in names.items()},
    }  # fmt: skip
    logs = [open(tmp_path / f"console-{i}.log", "w") for i in range(3)]  # noqa: SIM115
    replicas = [subprocess.Popen([sys.executable, "-m", "moderator.cli", "console"], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=logs[i]) for i in range(3)]  # fmt: skip
    try:
        urls = [p.stdout.readline().strip().rsplit(" ", 1)[-1] for p in replicas]  # type: ignore[union-attr]
        assert all(u.startswith("http://") for u in urls), [
            (tmp_path / f"console-{i}.log").read_text() for i in range(3)
        ]
        for i in range(3):  # every replica has the whole queue (not its share of the partitions)
            looker = Reviewer(REVIEWERS[i], urls, i)
            looker.sign_in()
            deadline = time.monotonic() + 60
            while f"{ITEMS} items waiting" not in looker._open("/").read().decode():
                assert time.monotonic() < deadline, f"replica {i} does not show all {ITEMS} items"
                time.sleep(0.3)
        reviewers = [Reviewer(name, urls, i % 3) for i, name in enumerate(REVIEWERS)]
        stop, dead = threading.Event(), set[int]()
        threads = [threading.Thread(target=r.run, args=(stop, dead), daemon=True) for r in reviewers]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 240
        while sum(len(r.shown) for r in reviewers) < ITEMS // 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        replicas[0].send_signal(signal.SIGKILL)  # midway: its reviewers move to the others
        replicas[0].wait(10)
        killed_at = time.monotonic()
        dead.add(0)
        while time.monotonic() < deadline:
            judged = {v["event_id"] for v in _verdicts(settings)}
            if len(judged) >= ITEMS:
                break
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        records = _verdicts(settings)
        per_event = Counter(v["event_id"] for v in records)
        assert len(per_event) == ITEMS  # none lost
        assert set(per_event.values()) == {1}, [e for e, n in per_event.items() if n > 1]  # each judged once
        shown = Counter(event for r in reviewers for event, _ in r.shown)
        twice = {e for e, n in shown.items() if n > 1}
        # shown twice only: what a reviewer of the killed replica was looking at when it died (its lease
        # then ran out and someone else got it)
        at_kill = {next((e for e, when in reversed(r.shown) if when <= killed_at), None) for r in reviewers[0::3]}
        assert twice <= at_kill, twice - at_kill
        assert all(r.switches >= 1 for r in reviewers[0::3])  # they moved to a live replica
        served = Counter(v["reviewer"] for v in records)
        assert set(served) == set(REVIEWERS)  # every reviewer worked the one queue
        assert all(p.poll() is None for p in replicas[1:])
    finally:
        for p in replicas:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in replicas:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
