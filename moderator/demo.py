"""``moderator demo``: the main job end to end on a local stack, in one command.

Brings up a real Kafka + Redis (``moderator.stack``), publishes a small set of generated sample
images (and a few bad inputs, to show the dead-letter path), runs the worker until every event has a
record, prints the decisions, the review feed and the dead letters, and stops everything. What it
prints is for a person: a progress line and tables; the JSON logs of the stack and the worker go to
a file it names.

Model: the configured checkpoint (``MODERATOR_MODEL_ID``) when it can be loaded. When its weights
cannot be fetched, a banner says so and a randomly initialized model of the same architecture
runs instead; every decision then carries a ``random-init:`` model fingerprint. Never silently.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

from moderator.app import App
from moderator.clip import SUPPORTED_CHECKPOINTS, ClipEngine, ModelLoadError
from moderator.config import Settings, load_settings
from moderator.observability import configure_logging
from moderator.policy import PolicyError
from moderator.random_init import cached_random_checkpoint
from moderator.samples import jpeg_bytes, photo_like
from moderator.stack import LocalStack, default_cache_dir

Outputs = dict[str, dict[str, list[dict[str, Any]]]]  # topic key -> event id -> records


def banner(lines: list[str]) -> None:
    width = max(len(line) for line in lines) + 4
    print("!" * width)
    for line in lines:
        print(f"! {line.ljust(width - 4)} !")
    print("!" * width, flush=True)


def load_demo_engine(settings: Settings) -> ClipEngine:
    """The configured checkpoint, or (with a banner) a random-init model of its architecture."""
    try:
        if not settings.model_local_files_only and not Path(settings.model_id).is_dir() and not _hub_reachable():
            # Offline: say so at once instead of waiting out the hub client's retries.
            settings = settings.model_copy(update={"model_local_files_only": True})
        return ClipEngine.from_settings(settings)
    except ModelLoadError as exc:
        info = SUPPORTED_CHECKPOINTS.get(settings.model_id)
        arch = info.architecture if info else "ViT-B/32"
        first = str(exc).splitlines()[0]
        reason = first.split(": ", 1)[-1]
        banner([
            f"The weights of {settings.model_id} cannot be loaded here",
            f"({reason[:90]}{'...' if len(reason) > 90 else ''}).",
            f"Running a RANDOMLY INITIALIZED {arch} instead: its decisions are meaningless,",
            "and every decision says so (model fingerprint 'random-init:...').",
            "For real decisions: download the weights and set MODERATOR_MODEL_ID.",
        ])  # fmt: skip
        target = cached_random_checkpoint(default_cache_dir(), arch)
        return ClipEngine.from_settings(settings.model_copy(update={"model_id": str(target)}))


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    host = urlsplit(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def sample_events(count: int) -> list[tuple[str, dict[str, Any] | bytes]]:
    """Generated photo-like JPEGs (most name no policy: the default decides them), plus three bad inputs."""
    events: list[tuple[str, dict[str, Any] | bytes]] = []
    sizes = [(640, 480), (480, 640), (800, 600), (1024, 768), (320, 240)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        data = jpeg_bytes(photo_like(w, h, seed=1000 + i))
        policy = "kids-platform" if i % 4 == 3 else None
        event: dict[str, Any] = {"id": f"demo-{i:03d}", "image": {"data": base64.b64encode(data).decode()},
                                 "metadata": {"uploader": f"user-{i % 7}", "surface": policy or "public"}}  # fmt: skip
        if policy:
            event["policy"] = policy
        events.append((event["id"], event))
    text = base64.b64encode(b"this is not an image\n").decode()
    cut = base64.b64encode(jpeg_bytes(photo_like(640, 480, seed=7))[:3000]).decode()
    events.append(("demo-bad-text", {"id": "demo-bad-text", "image": {"data": text}}))
    events.append(("demo-bad-truncated", {"id": "demo-bad-truncated", "image": {"data": cut}}))
    events.append(("demo-bad-json", b"{this is not json"))
    return events


class Progress:
    """One line a person can watch: rewritten in place on a terminal, a few lines otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stdout.isatty()
        self._last = -1

    def update(self, done: int, elapsed: float) -> None:
        step = done * 4 // max(self.total, 1)  # without a terminal: 0%, 25%, 50%, 75%, 100%
        if not self.tty and step == self._last:
            return
        self._last = step
        line = f"deciding: {done}/{self.total} events have a record ({elapsed:.1f}s)"
        print(f"\r{line}" if self.tty else line, end="" if self.tty and done < self.total else "\n", flush=True)


def collect_outputs(app: App, want: set[str], timeout: float, progress: Progress) -> Outputs:
    """Read the worker's output topics until every wanted event has a decision or a dead letter."""
    keys = ["decisions", "review", "dead_letters"]
    by_topic = {app.settings.topic(k): k for k in keys}
    reader = app.reader(keys)
    out: Outputs = {k: {} for k in keys}
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        while time.monotonic() < deadline:
            for tp, records in reader.poll(timeout_ms=200).items():
                for r in records:
                    rec = json.loads(r.value)
                    eid = rec.get("event_id") or (r.key or b"").decode()
                    out[by_topic[tp.topic]].setdefault(eid, []).append(rec)
            done = want & (set(out["decisions"]) | set(out["dead_letters"]))
            progress.update(len(done), time.monotonic() - t0)
            if done == want:
                break
    finally:
        reader.close(autocommit=False)
    return out


def print_report(ids: list[str], out: Outputs) -> None:
    print()
    print(f"{'event':<20} {'decision':<9} {'policy':<22} {'top category':<24} {'score':>6}  model")
    print("-" * 110)
    for eid in ids:
        if eid in out["decisions"]:
            d = out["decisions"][eid][-1]
            top = max(d["scores"].items(), key=lambda kv: kv[1])
            print(f"{eid:<20} {d['decision']:<9} {d['policy']['name']:<22} {top[0]:<24} {top[1]:>6.3f}  "
                  f"{d['model'][:40]}")  # fmt: skip
        elif eid in out["dead_letters"]:
            dl = out["dead_letters"][eid][-1]
            print(f"{eid:<20} {'DEAD':<9} {'-':<22} {dl['reason']:<24} {'':>6}  {dl['message'][:40]}")
        else:
            print(f"{eid:<20} MISSING")
    print()
    review = [r[-1] for r in out["review"].values()]
    print(f"review feed: {len(review)} item(s), highest priority first")
    for r in sorted(review, key=lambda r: -r["priority"]):
        reasons = ", ".join(f"{t['category']} {t['score']:.2f}>={t['threshold']}" for t in r["reasons"])
        if r.get("sampled"):
            reasons = f"audit sample of an {r['decision']} decision (rate {r['sample_rate']:g}) {reasons}".rstrip()
        print(f"  priority {r['priority']:>3}  {r['event_id']:<20} {r['policy']['name']:<20} {reasons}")
    print()


def audited_policies(source: Path, target: Path) -> Path:
    """The policy directory with half of community-standards' allow decisions (and every flag) sampled
    for audit, so that the console has items to show even when the model allows nearly everything."""
    if not source.is_dir():
        raise PolicyError([(str(source), "", "policy directory does not exist (set MODERATOR_POLICY_DIR)")])
    shutil.copytree(source, target)
    path = target / "community-standards.yaml"
    path.write_text(path.read_text() + "\n# Added by `moderator demo --console`:\naudit: {allow: 0.5, flag: 1.0}\n")
    return target


def serve_console(app: App) -> None:
    """The review console on the demo's stack until Ctrl-C, with a throwaway development login."""
    from moderator.console import Console

    settings = app.settings
    if not port_free(settings.console_host, settings.console_port):
        settings = settings.model_copy(update={"console_port": 0})
    console = Console(App(settings, engine=app.engine), dev=True).start()
    name, password = console.dev_login or ("", "")
    pending = console.queue.depth()["new"]
    print(f"\nreview console: {console.url}  (development login: {name} / {password})")
    print(f"{pending} item(s) to review. Ctrl-C stops the console and the stack.", flush=True)
    try:
        console.wait()
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        console.stop()


def port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def run_demo(count: int = 24, log_path: Path | None = None, console: bool = False) -> int:
    env = load_settings()
    log_path = log_path or Path(tempfile.gettempdir()) / "moderator-demo.log"
    log_path.unlink(missing_ok=True)
    configure_logging(env.log_level, "json", "ERROR", path=log_path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()  # the weights load in a blink; a progress bar would only be noise
    hf_logging.set_verbosity_error()
    print(f"logs (JSON lines): {log_path}")
    with tempfile.TemporaryDirectory(prefix="moderator-demo-") as tmp:
        stack = LocalStack(Path(tmp) / "stack")
        print("starting a local Kafka + Redis ...", flush=True)
        try:
            info = stack.start(kafka=True, redis=True, topics=env.new_topics())
            overrides: dict[str, Any] = {
                **info.settings_overrides(),
                "kafka_group_id": "moderator-demo",
                "http_port": 0,
            }
            if console:
                overrides["policy_dir"] = audited_policies(env.policy_dir, Path(tmp) / "policies")
            settings = load_settings(**overrides)
            print(f"loading {settings.model_id} ...", flush=True)
            app = App(settings, engine=load_demo_engine(settings))
            policies = app.policies.current
            print(f"policies: {', '.join(sorted(policies.policies))} (default: {policies.default})", flush=True)
            worker = app.worker()
            thread = threading.Thread(target=lambda: worker.run(install_signals=False), name="worker")
            thread.start()
            events = sample_events(count)
            producer = app.producer()
            for eid, event in events:
                value = event if isinstance(event, bytes) else json.dumps(event).encode()
                producer.send(settings.topic("images"), key=eid.encode(), value=value)
            producer.flush()
            producer.close()
            print(f"published {len(events)} events to {settings.topic('images')}", flush=True)
            ids = [eid for eid, _ in events]
            t0 = time.monotonic()
            out = collect_outputs(app, set(ids), 300, Progress(len(ids)))
            elapsed = time.monotonic() - t0
            worker.stop("demo done")
            thread.join(timeout=60)
            print_report(ids, out)
            decided = sum(1 for i in ids if i in out["decisions"] or i in out["dead_letters"])
            print(f"{decided}/{len(ids)} events have a record, in {elapsed:.1f}s; model {app.engine.fingerprint}")
            if console:
                serve_console(app)
            return 0 if decided == len(ids) else 1
        finally:
            stack.stop()
