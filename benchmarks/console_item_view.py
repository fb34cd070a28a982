"""How fast the review console serves a reviewer with a deep queue (a benchmark, not a test).

A local stack, ``--items`` review items (10,000 by default) on the review topic, each naming its own
inline image on the images topic, and ``moderator console`` in its own process. A client then signs
in and reviews ``--rounds`` items the way a reviewer does: claim the next item (POST /claim), load its
page (GET /item/...), its blurred image (GET /image/..., read back from Kafka, checked, re-encoded),
reveal it (POST /api/revealed) and load the original, and give a verdict, which claims the next
(POST). Prints p50/p95/p99 of each step, and of the item view (page + blurred image).

Then the same again while a **login flood** runs: ``--flood`` (500) failed sign-ins from 8 threads,
each as a different client address (``X-Forwarded-For``, believed from loopback as from a trusted
proxy: so every one gets hashed, the per-address wait never applies), and prints the p95 of "verdict and
the next claim" idle and under the flood, and their ratio.

    python benchmarks/console_item_view.py [--items 10000] [--rounds 300] [--flood 500]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.cookiejar
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from moderator.clients import make_producer
from moderator.config import load_settings
from moderator.console.auth import hash_password
from moderator.events import ImageRef, PolicyRef, ReviewItem, Source, Trigger, utc_now
from moderator.samples import jpeg_bytes, photo_like
from moderator.stack import LocalStack, free_port


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def http_error_303(self, req, fp, code, msg, headers):  # type: ignore[no-untyped-def]
        return fp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--flood", type=int, default=500, help="failed sign-ins in the second phase (0: none)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    stack = LocalStack(tmp / "stack")
    console = None
    try:
        info = stack.start(kafka=True, redis=True)
        settings = load_settings(**info.settings_overrides())
        stack.create_topics(settings.new_topics(partitions=4))
        producer = make_producer(settings, linger_ms=20)
        t0 = time.monotonic()
        images = [jpeg_bytes(photo_like(320, 240, seed=i)) for i in range(64)]
        rng = np.random.default_rng(0)
        categories = ["weapons", "drugs", "gore", "nudity", "hate-symbols", "self-harm"]
        futures = []
        for i in range(args.items):
            event_id = f"bench-{i:06d}"
            value = json.dumps({"id": event_id, "image": {"data": base64.b64encode(images[i % 64]).decode()}})
            futures.append(
                (event_id, producer.send(settings.topic("images"), key=event_id.encode(), value=value.encode()))
            )
        producer.flush()
        for i, (event_id, future) in enumerate(futures):
            meta = future.get(timeout=60)
            image = images[i % 64]
            scores = {c: float(s) for c, s in zip(categories, rng.uniform(0, 1, len(categories)), strict=True)}
            top = max(scores, key=scores.__getitem__)
            reasons = [Trigger(category=top, rule="review", score=scores[top], threshold=0.5)]
            item = ReviewItem(
                event_id=event_id, decision="review", priority=int(rng.integers(0, 100)),
                image=ImageRef(inline_source=Source(topic=meta.topic, partition=meta.partition, offset=meta.offset),
                               sha256=hashlib.sha256(image).hexdigest(), bytes=len(image)),
                scores=scores, reasons=reasons, policy=PolicyRef(name="bench", version="sha256:bench"),
                model="bench", source=Source(topic=meta.topic, partition=meta.partition, offset=meta.offset),
                decided_at=utc_now(),
            )  # fmt: skip
            producer.send(settings.topic("review"), key=event_id.encode(), value=item.model_dump_json().encode())
        producer.flush()
        producer.close()
        print(f"{args.items} review items (and their images) produced in {time.monotonic() - t0:.1f} s", flush=True)
        accounts = tmp / "reviewers.txt"
        accounts.write_text(f"bench:{hash_password('bench-password')}\n")
        port = free_port()
        env = {**os.environ, **info.env(), "MODERATOR_CONSOLE_ACCOUNTS_FILE": str(accounts),
               "MODERATOR_CONSOLE_PORT": str(port), "MODERATOR_HTTP_PORT": "0",
               "MODERATOR_LOG_LEVEL": "WARNING"}  # fmt: skip
        console = subprocess.Popen([sys.executable, "-m", "moderator.cli", "console"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        assert console.stdout is not None
        url = console.stdout.readline().strip().rsplit(" ", 1)[-1]
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect())
        token = _token(opener.open(url + "/login").read().decode())
        _post(opener, url + "/login", {"username": "bench", "password": "bench-password", "csrf_token": token})
        deadline = time.monotonic() + 120
        while f"{args.items} items waiting" not in (page := opener.open(url + "/").read().decode()):
            assert time.monotonic() < deadline, "the console did not load every item"
            time.sleep(0.5)
        token = _token(page)
        location = _post(opener, url + "/claim", {"csrf_token": token})
        idle, location = _review(opener, url, token, location, args.rounds)
        _table(f"{args.rounds} items reviewed with {args.items} queued", idle)
        if args.flood:
            done = threading.Event()
            counts = {"attempts": 0}
            flooders = [threading.Thread(target=_flood, args=(url, args.flood // 8, f"10.9.{t}.", counts))
                        for t in range(8)]  # fmt: skip
            for t in flooders:
                t.start()
            threading.Thread(target=lambda: ([t.join() for t in flooders], done.set())).start()
            flooded, location = _review(opener, url, token, location, args.rounds, until=done)
            _table(f"{len(flooded['verdict'])} more while {counts['attempts']} failed sign-ins ran", flooded)
            p_idle = float(np.percentile(idle["verdict"], 95)) * 1000
            p_flood = float(np.percentile(flooded["verdict"], 95)) * 1000
            print(f"\nverdict + next claim p95: idle {p_idle:.1f} ms, under the login flood {p_flood:.1f} ms"
                  f" ({p_flood / p_idle:.2f}x)")  # fmt: skip
        return 0
    finally:
        if console is not None:
            console.terminate()
            console.wait(30)
        stack.stop()


def _review(opener, url, token, location, rounds, until=None):  # type: ignore[no-untyped-def]
    """Review ``rounds`` items (or until ``until`` is set) from ``location``; the timings per step."""
    steps: dict[str, list[float]] = {"page": [], "image": [], "reveal": [], "original": [], "verdict": [],
                                     "item view": []}  # fmt: skip
    done = 0
    while (until is None and done < rounds) or (until is not None and not until.is_set()):
        item_url = url + location
        handle = location.rsplit("/", 1)[1]
        image_url = url + "/image/" + handle
        page_s = _time(lambda u=item_url: opener.open(u).read())
        image_s = _time(lambda u=image_url: opener.open(u).read())
        body = json.dumps({"handle": handle}).encode()
        headers = {"Content-Type": "application/json", "X-CSRF-Token": token}
        reveal = urllib.request.Request(url + "/api/revealed", data=body, method="POST", headers=headers)
        steps["reveal"].append(_time(lambda r=reveal: opener.open(r).read()))
        steps["original"].append(_time(lambda u=image_url + "/original": opener.open(u).read()))
        steps["page"].append(page_s)
        steps["image"].append(image_s)
        steps["item view"].append(page_s + image_s)
        form = {"csrf_token": token, "verdict": "overturn"}
        location = _timed(steps["verdict"], lambda u=item_url + "/verdict", f=form: _post(opener, u, f))
        done += 1
    return steps, location


def _flood(url: str, attempts: int, prefix: str, counts: dict[str, int]) -> None:
    """Failed sign-ins, each from another address."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect())
    token = _token(opener.open(url + "/login").read().decode())
    for i in range(attempts):
        form = urllib.parse.urlencode({"username": f"nobody{i}", "password": "wrong", "csrf_token": token}).encode()
        request = urllib.request.Request(url + "/login", data=form, method="POST",
                                         headers={"X-Forwarded-For": f"{prefix}{i % 250}"})  # fmt: skip
        try:
            opener.open(request).read()
        except urllib.error.HTTPError as exc:
            exc.read()
        counts["attempts"] += 1


def _table(title: str, steps: dict[str, list[float]]) -> None:
    print(f"\n{title}:")
    print(f"{'step':<12}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    for name, values in steps.items():
        ms = np.array(values) * 1000
        print(f"{name:<12}{np.percentile(ms, 50):>10.1f}{np.percentile(ms, 95):>10.1f}{np.percentile(ms, 99):>10.1f}")


def _token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def _post(opener: urllib.request.OpenerDirector, url: str, form: dict[str, str]) -> str:
    response = opener.open(urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST"))
    assert response.status == 303, response.status
    return str(response.headers["Location"])


def _time(call) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _timed(into: list[float], call):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    result = call()
    into.append(time.perf_counter() - t0)
    return result


if __name__ == "__main__":
    sys.exit(main())
