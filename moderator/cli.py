"""The ``moderator`` command line.

Each command builds what it needs through the composition root (:class:`moderator.app.App`). Commands
a person runs at a terminal print tables; with ``--json``, or when the output is not a terminal, they
print JSON lines. Exit codes: 0 success; 1 the command ran and found a problem (an invalid policy, an
unreadable image); 2 a start-up or configuration error, with a message saying what to fix.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moderator import terminal
from moderator.config import ConfigError, Settings, load_settings
from moderator.observability import configure_logging, get_logger
from moderator.topics import TOPICS

log = get_logger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "model", None):
        overrides["model_id"] = args.model
    return load_settings(**overrides)


def _app(args: argparse.Namespace) -> Any:
    from moderator.app import App

    return App(_settings(args))


# ==================================================================================================
# Images and policies


def cmd_classify(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from moderator.clip import PIPELINE_TEMPLATE, zero_shot_probs
    from moderator.frames import frame_maxima
    from moderator.images import ImageError, ImageLimits, ImageLoader, Loaded

    if bool(args.label) == bool(args.policy):
        print("classify needs either --label (one or more) or --policy FILE", file=sys.stderr)
        return 2
    app = _app(args)
    engine = app.engine
    policy = app.load_policy(args.policy) if args.policy else None
    text = None
    if policy is None:
        template = args.template or PIPELINE_TEMPLATE
        prompts = [template.replace("{}", lb) if "{}" in template else lb for lb in args.label]
        text = torch.from_numpy(app.encoder.encode(prompts)).to(engine.device)
    loader = ImageLoader(ImageLimits.from_settings(app.settings, engine.tower.precision), engine.spec,
                         app.settings.decode_threads)  # fmt: skip
    failed = 0
    paths = list(args.images)
    try:
        for start in range(0, len(paths), app.settings.max_batch_size):
            chunk = paths[start : start + app.settings.max_batch_size]
            datas: list[bytes | None] = []
            for p in chunk:
                try:
                    datas.append(Path(p).read_bytes())
                except OSError:
                    datas.append(None)
            # An animation or a video: every sampled frame, decided as the worker decides it (max over frames).
            results = loader.load_frames_many([d if d is not None else b"" for d in datas])
            loaded = {i: r for i, r in enumerate(results) if isinstance(r, Loaded) and datas[i] is not None}
            row_of = {i: n for n, i in enumerate(loaded)}
            decisions, probs = [], []
            if loaded:
                tower = engine.tower
                embs = engine.encode_images(np.concatenate([r.pixels for r in loaded.values()]), tower)
                if policy is not None:
                    decisions = policy.decisions_over_frames(embs, [r.frames for r in loaded.values()],
                                                             image_precision=tower.precision)  # fmt: skip
                if text is not None:
                    per_frame = zero_shot_probs(embs, text, engine.logit_scale).cpu().numpy()
                    probs = frame_maxima(per_frame, [len(r.pixels) for r in loaded.values()])[0].tolist()
            for i, p in enumerate(chunk):
                res = results[i]
                out: dict[str, Any]
                if datas[i] is None:
                    out = {"image": p, "error": "unreadable_file", "message": f"cannot read {p}"}
                elif isinstance(res, ImageError):
                    out = {"image": p, "error": res.reason, "message": str(res)}
                elif policy is not None:
                    out = {"image": p, **decisions[row_of[i]].model_dump(mode="json")}
                else:  # an animation's or video's: each label's highest probability over its frames
                    out = {"image": p, "scores": dict(zip(args.label, probs[row_of[i]], strict=True)),
                           "model": engine.fingerprint, "image_precision": engine.precision}  # fmt: skip
                failed += "error" in out
                print(json.dumps(out), flush=True)
    finally:
        loader.close()
    return 1 if failed else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from moderator.comparison import METRICS, check, parse_fail_if
    from moderator.replay import render, run_replay

    try:
        conditions = [parse_fail_if(expr, set(METRICS)) for expr in args.fail_if]
    except ValueError as exc:
        print(f"moderator: {exc}", file=sys.stderr)
        return 2
    from moderator.app import App
    from moderator.clip import resolve_device
    from moderator.precision import PrecisionUnavailable, resolve_precision

    baseline = Path(args.baseline) if args.baseline else None
    settings = _settings(args)
    precision = args.image_precision
    if precision is None:  # the embeddings the worker of these settings logs
        try:
            precision = resolve_precision(settings.dtype, resolve_device(settings.device))
        except PrecisionUnavailable:
            precision = settings.dtype
    # Replay decides stored embeddings: it needs the text tower only, never a reduced image tower.
    app = App(settings.model_copy(update={"dtype": "float32"}))
    report = run_replay(app, Path(args.policy), baseline, limit=args.max, tolerance=args.tolerance,
                        image_precision=precision)  # fmt: skip
    missing = [c.text for c in conditions if c.metric not in report["metrics"]]
    if missing:
        print(
            f"moderator: --fail-if {', '.join(missing)}: no reviewer verdicts on the replayed events", file=sys.stderr
        )
        return 2
    failed = check(conditions, report["metrics"])
    report["fail_if"] = {"conditions": [c.text for c in conditions], "failed": failed}
    if terminal.wants_json(args.json):
        print(json.dumps(report))
    else:
        print(render(report, failed))
    return 1 if failed else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from moderator.calibrate import CalibrateError, Options, run_calibrate, summary_rows

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    try:
        opts = Options(
            policy=args.policy, policy_file=Path(args.policy_file) if args.policy_file else None,
            target_precision=args.target_precision, target_recall=args.target_recall, min_samples=args.min_samples,
            confidence=args.confidence, joint=args.joint, max_review_share=args.max_review_share,
            since=_iso_time(args.since, "--since"), until=_iso_time(args.until, "--until"),
            holdout_after=_iso_time(args.holdout_after, "--holdout-after"), include_appeals=args.include_appeals,
            out=Path(args.out) if args.out else Path("calibration") / f"{args.policy}-{stamp}",
        )  # fmt: skip
    except (CalibrateError, ConfigError) as exc:
        print(f"moderator calibrate: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_calibrate(_app(args), opts)
    except CalibrateError as exc:
        print(f"moderator calibrate: {exc}", file=sys.stderr)
        return 2
    if terminal.wants_json(args.json):
        print(json.dumps(report))
        return 0
    print(terminal.table(summary_rows(report), ["category", "threshold", "target", "current", "proposed", "estimate",
                                                "lower_bound", "verdicts", "why_not"]))  # fmt: skip
    print(
        f"\n{report['window']['decisions']} decisions, {report['verdicts']} verdicts; report, plots and the "
        f"proposal in {opts.out}/"
    )
    print(f"guarantee: {report['guarantee']}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    if report["proposed_file"]:
        replay = report["replay"]
        print(f"proposed policy: {report['proposed_file']} (check: moderator policy check {report['proposed_file']})")
        if replay:
            volume = replay["volume"]
            print(f"replayed on {replay['replayed']} logged events: review {volume['baseline']['review']} -> "
                  f"{volume['candidate']['review']}, flag {volume['baseline']['flag']} -> {volume['candidate']['flag']}"
                  f" (transitions in {opts.out}/replay.txt)")  # fmt: skip
    else:
        print("no threshold proposed: see why_not")
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    from moderator.replay import render_shadow, shadow_report

    report = shadow_report(_app(args), args.policy, args.max)
    print(json.dumps(report) if terminal.wants_json(args.json) else render_shadow(report))
    return 0


def _iso_time(text: str | None, flag: str) -> Any:
    """An ISO 8601 time from the command line (UTC when it names no zone); ConfigError when it is not one."""
    from datetime import datetime, timezone

    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected an ISO 8601 time, e.g. 2026-12-01T00:00:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def cmd_verdicts_export(args: argparse.Namespace) -> int:
    from moderator.verdict_log import read_all, row, select, to_csv

    chosen = select(read_all(_app(args)), _iso_time(args.since, "--since"), _iso_time(args.until, "--until"),
                    current=args.current)  # fmt: skip
    if args.format == "csv":
        sys.stdout.write(to_csv(chosen))
    else:
        for v in chosen:
            print(json.dumps(row(v)))
    print(f"{len(chosen)} verdicts", file=sys.stderr)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    import signal

    from moderator.app import App
    from moderator.console import Console, ConsoleConfigError

    try:
        console = Console(App(load_settings()), dev=args.dev)
    except ConsoleConfigError as exc:
        print(f"moderator console: {exc}", file=sys.stderr)
        return 2
    console.start()
    if console.dev_login is not None:
        name, password = console.dev_login
        bar = "!" * 78
        lines = ["DEVELOPMENT MODE: a throwaway reviewer account, not for real content or reviewers.",
                 f"Sign in at {console.url} as {name} / {password}"]  # fmt: skip
        print("\n".join([bar, *(f"! {line}" for line in lines), bar]), file=sys.stderr, flush=True)
    print(f"moderator console: {console.url}", flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: console.web_server.request_stop())
    try:
        console.wait()
    except KeyboardInterrupt:
        pass
    finally:
        console.stop()
    return 0


def cmd_console_add_user(args: argparse.Namespace) -> int:
    import getpass

    from moderator.console.auth import USERNAME_RE, hash_password

    ln = load_settings().console_scrypt_ln

    if not USERNAME_RE.match(args.name):
        print("moderator console add-user: a name is 1-64 of letters, digits and _ . @ -", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if password != getpass.getpass("again: "):
            print("moderator console add-user: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("moderator console add-user: a password has at least 8 characters", file=sys.stderr)
        return 1
    role = "" if args.role == "reviewer" else f"{args.role}:"
    print(f"{args.name}:{role}{hash_password(password, ln=ln)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from moderator.app import App
    from moderator.serve.keys import KeysError

    try:
        return int(App(load_settings()).serve_endpoint())
    except KeysError as exc:
        print(f"moderator serve: {exc}", file=sys.stderr)
        return 2


def cmd_serve_add_key(args: argparse.Namespace) -> int:
    from moderator.serve.keys import key_line, new_key

    key = new_key()
    try:
        line = key_line(args.name, key, args.rate)
    except ValueError as exc:
        print(f"moderator serve add-key: {exc}", file=sys.stderr)
        return 2
    print(f"API key for {args.name} (shown once; the file keeps only its hash): {key}", file=sys.stderr)
    print(line)
    return 0


# ==================================================================================================
# The worker and its topics


def cmd_run(args: argparse.Namespace) -> int:
    from moderator.app import App
    from moderator.serve.keys import KeysError

    try:
        return App(load_settings()).serve()
    except KeysError as exc:  # MODERATOR_SERVE_IN_WORKER without usable keys
        print(f"moderator run: {exc}", file=sys.stderr)
        return 2


def _image_files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(c) for c in sorted(path.iterdir()) if c.is_file() and not c.name.startswith("."))
        else:
            out.append(p)
    return out


def cmd_produce(args: argparse.Namespace) -> int:
    from moderator.app import App

    app = App(load_settings())
    producer = app.producer()
    topic = args.topic or app.settings.topic("images")
    failed = 0
    for item in _image_files(args.items):
        is_url = item.startswith(("http://", "https://"))
        if (args.mode == "url" and not is_url) or (args.mode == "inline" and is_url):
            print(f"moderator: {item}: --{args.mode} needs {'http(s) URLs' if args.mode == 'url' else 'files'}",
                  file=sys.stderr)  # fmt: skip
            failed += 1
            continue
        event_id = f"{args.id_prefix}{uuid.uuid4().hex}"
        image = {"url": item} if is_url else {"data": base64.b64encode(Path(item).read_bytes()).decode()}
        event: dict[str, object] = {"id": event_id, "image": image, "metadata": {"source": item}}
        if args.policy:
            event["policy"] = args.policy
        meta = producer.send(topic, key=event_id.encode(), value=json.dumps(event).encode()).get(timeout=30)
        print(json.dumps({"id": event_id, "item": item, "topic": topic, "partition": meta.partition,
                          "offset": meta.offset}))  # fmt: skip
    producer.flush()
    producer.close()
    return 1 if failed else 0


def cmd_tail(args: argparse.Namespace) -> int:
    from moderator.app import App
    from moderator.clients import TopicError

    app = App(load_settings())
    try:
        consumer = app.reader([args.which], from_beginning=args.from_beginning)
    except TopicError as exc:
        print(f"moderator: {exc}", file=sys.stderr)
        return 1
    seen = 0
    idle_until = time.monotonic() + args.idle_timeout if args.idle_timeout else None
    try:
        while args.max is None or seen < args.max:
            batch = consumer.poll(timeout_ms=200)
            records = [r for part in batch.values() for r in part]
            for r in records[: None if args.max is None else args.max - seen]:
                print((r.value or b"").decode("utf-8", errors="replace"), flush=True)
                seen += 1
            if batch and args.idle_timeout:
                idle_until = time.monotonic() + args.idle_timeout
            if idle_until is not None and time.monotonic() > idle_until:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close(autocommit=False)
    return 0


def cmd_topics_list(args: argparse.Namespace) -> int:
    settings = load_settings()
    rows = [{"key": t.key, "topic": settings.topic(t.key), "env": t.env, "record": t.record, "role": t.role,
             "compacted": t.compacted, "partitions": t.partitions, "doc": t.doc} for t in TOPICS]  # fmt: skip
    terminal.emit(rows, ["key", "topic", "record", "role", "compacted", "partitions", "doc"],
                  as_json=terminal.wants_json(args.json))  # fmt: skip
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from moderator.clients import TopicError, create_topics

    settings = load_settings()
    topics = settings.new_topics(args.partitions)
    try:
        create_topics(settings.kafka_bootstrap_servers, settings.kafka_api_version, topics, timeout=args.timeout)
    except TopicError as exc:
        print(f"moderator: {exc}", file=sys.stderr)
        return 1
    for t in topics:
        print(json.dumps({"topic": t.name, "partitions": t.partitions, "compacted": t.compacted}))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from moderator.events import schemas

    all_schemas = schemas()
    print(json.dumps(all_schemas if args.name is None else all_schemas[args.name], indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moderator.demo import run_demo

    return run_demo(count=args.count, console=args.console)


# ==================================================================================================
# Checkpoints


def cmd_models(args: argparse.Namespace) -> int:
    from moderator.clip import SUPPORTED_CHECKPOINTS, checkpoint_available

    settings = load_settings()
    rows = [{"model": info.model_id, "architecture": info.architecture, "image_size": info.image_size,
             "patch_size": info.patch_size, "embed_dim": info.embed_dim,
             "available_locally": checkpoint_available(info.model_id, settings.model_cache_dir),
             "default": info.model_id == settings.model_id, "note": info.note}
            for info in SUPPORTED_CHECKPOINTS.values()]  # fmt: skip
    terminal.emit(rows, ["model", "architecture", "image_size", "embed_dim", "available_locally", "note"],
                  headers=["checkpoint", "architecture", "input", "embedding", "local", "note"],
                  as_json=terminal.wants_json(args.json))  # fmt: skip
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from moderator.random_init import build_clip_checkpoint

    out = build_clip_checkpoint(args.dir, args.arch, seed=args.seed)
    print(json.dumps({"dir": str(out), "architecture": args.arch, "seed": args.seed, "random_init": True}))
    return 0


# ==================================================================================================
# The parser


def build_parser() -> argparse.ArgumentParser:
    from moderator.banks.cli import register_cli as register_bank
    from moderator.bench.cli import register_cli as register_bench
    from moderator.onnx_export import register_cli as register_export
    from moderator.policy.cli import register_cli as register_policy
    from moderator.stack.cli import register_cli as register_stack

    parser = argparse.ArgumentParser(prog="moderator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the stream worker: images topic in; decisions, review, dead letters out")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("classify", help="zero-shot scores (or policy decisions) for image files, one JSON line each")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", help="checkpoint id or local directory (default: MODERATOR_MODEL_ID)")
    p.add_argument("--label", action="append", default=[], help="a candidate label; repeat for more")
    p.add_argument("--template", help="prompt template, {} = the label (default: This is a photo of {}.)")
    p.add_argument("--policy", help="a policy file: print one decision per image instead of label scores")
    p.set_defaults(func=cmd_classify)

    register_policy(sub)
    register_bank(sub)

    p = sub.add_parser("replay", help="re-decide logged embeddings under a candidate policy; compare with the live one")
    p.add_argument("--policy", required=True, help="the candidate: a policy file or directory")
    p.add_argument("--baseline", help="compare with this policy file or directory (default: the live decisions)")
    p.add_argument("--max", type=int, help="read at most N records of the embeddings log")
    p.add_argument("--tolerance", type=float, help="score error of the stored embeddings (default: from their dtype)")
    p.add_argument("--image-precision", choices=["float32", "bfloat16", "float16", "int8"],
                   help="replay embeddings of this image precision (default: what MODERATOR_DTYPE serves)")  # fmt: skip
    p.add_argument(
        "--fail-if",
        action="append",
        default=[],
        metavar="EXPR",
        help="exit 1 when it holds, e.g. flag_recall_drop>0.02 or review_volume_increase>0.2 (repeatable)",
    )
    p.add_argument("--model", help="checkpoint id or local directory (default: MODERATOR_MODEL_ID)")
    p.add_argument("--json", action="store_true", help="one JSON object (the default when not on a terminal)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("calibrate", help="propose thresholds from reviewer verdicts: bounds, plots, a replay")
    p.add_argument("--policy", required=True, help="the policy's name")
    p.add_argument("--policy-file", help="its file (default: found by name in MODERATOR_POLICY_DIR, or published)")
    p.add_argument("--target-precision", type=float, help="of flag decisions (default: each category's target)")
    p.add_argument("--target-recall", type=float, help="of flag-or-review (default: each category's target)")
    p.add_argument("--min-samples", type=int, default=30, help="fewest verdicts a threshold may rest on")
    p.add_argument("--confidence", type=float, default=0.95, help="of the lower bounds (default 0.95)")
    p.add_argument(
        "--joint",
        action="store_true",
        help="the confidence holds for all proposals together (Bonferroni), not for each one",
    )
    p.add_argument(
        "--max-review-share",
        type=float,
        default=0.5,
        help="no review threshold that sends more than this share of the traffic to review (default 0.5)",
    )
    p.add_argument("--since", help="only decisions made at or after this time (ISO 8601)")
    p.add_argument("--until", help="only decisions made before this time (e.g. to leave out a queue not yet worked)")
    p.add_argument("--holdout-after", help="choose on the decisions before this time, measure on those after it")
    p.add_argument("--out", help="the report's directory (default: calibration/<policy>-<time>)")
    p.add_argument("--model", help="checkpoint id or local directory (default: MODERATOR_MODEL_ID)")
    p.add_argument("--json", action="store_true", help="one JSON object (the default when not on a terminal)")
    p.add_argument("--include-appeals", action="store_true",
                   help="an appeal's verdict replaces the event's earlier one (left out by default: appeals are"
                   " chosen by users, not sampled)")  # fmt: skip
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("shadow", help="live vs shadow policies: agreement and transitions, from the shadow topic")
    p.add_argument("--policy", help="only this shadow policy")
    p.add_argument("--max", type=int, help="read at most N records")
    p.add_argument("--json", action="store_true", help="one JSON object (the default when not on a terminal)")
    p.set_defaults(func=cmd_shadow)

    p = sub.add_parser("console", help="the review console: reviewers decide in a browser, verdicts go to Kafka")
    p.add_argument("--dev", action="store_true", help="development only: a throwaway account, said on every page")
    p.set_defaults(func=cmd_console)
    csub = p.add_subparsers(dest="console_command")
    pa = csub.add_parser("add-user", help="print a reviewer accounts-file line (asks for the password)")
    pa.add_argument("name")
    pa.add_argument("--role", choices=("reviewer", "lead", "admin"), default="reviewer",
                    help="lead: finalizes escalations, changes others' verdicts, adds to banks; admin: also sees who"
                    " holds what")  # fmt: skip
    pa.set_defaults(func=cmd_console_add_user)

    p = sub.add_parser("serve", help="the synchronous endpoint: decide before publishing (HTTP, OpenAI-compatible)")
    p.set_defaults(func=cmd_serve)
    ssub = p.add_subparsers(dest="serve_command")
    pk = ssub.add_parser("add-key", help="make an API key: the key on stderr (once), its keys-file line on stdout")
    pk.add_argument("name")
    pk.add_argument("--rate", help="its rate in images, e.g. 50/s or 600/min (default MODERATOR_SERVE_RATE_PER_S)")
    pk.set_defaults(func=cmd_serve_add_key)

    p = sub.add_parser("verdicts", help="the reviewers' verdicts: export them for QA")
    vsub = p.add_subparsers(dest="verdicts_command", required=True)
    pv = vsub.add_parser("export", help="every verdict record (or the current ones) as CSV or JSON lines")
    pv.add_argument("--since", help="only verdicts given at or after this time (ISO 8601)")
    pv.add_argument("--until", help="only verdicts given before this time")
    pv.add_argument("--current", action="store_true", help="only the latest revision of each verdict")
    pv.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    pv.set_defaults(func=cmd_verdicts_export)

    p = sub.add_parser("produce", help="publish image events (files inline, http(s) URLs by reference)")
    p.add_argument("items", nargs="+", metavar="PATH_OR_URL", help="image files, directories or URLs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--inline", dest="mode", action="store_const", const="inline", help="files, base64 inline")
    mode.add_argument("--url", dest="mode", action="store_const", const="url", help="URLs, fetched by the worker")
    p.add_argument("--policy", help="the policy to decide with (default: the worker's default policy)")
    p.add_argument("--topic", help="default: MODERATOR_TOPIC_IMAGES")
    p.add_argument("--id-prefix", default="", help="prefix of the generated event ids")
    p.set_defaults(func=cmd_produce, mode=None)

    p = sub.add_parser("tail", help="print the records of a topic as JSON lines")
    p.add_argument("which", choices=[t.key.replace("_", "-") for t in TOPICS if t.role != "input"],
                   metavar="TOPIC", help="a topic of the registry: " + ", ".join(
                       t.key.replace("_", "-") for t in TOPICS if t.role != "input"))  # fmt: skip
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--max", type=int, help="stop after N records")
    p.add_argument("--idle-timeout", type=float, help="stop after S seconds without a record")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("topics", help="the topics this product uses: list them, create them")
    tsub = p.add_subparsers(dest="topics_command", required=True)
    tl = tsub.add_parser("list", help="every topic of the registry, with its setting and record")
    tl.add_argument("--json", action="store_true", help="JSON lines (the default when not on a terminal)")
    tl.set_defaults(func=cmd_topics_list)
    tc = tsub.add_parser("create", help="create every topic (brokers >= 0.10.1; existing ones are left alone)")
    tc.add_argument("--partitions", type=int, help="partitions per topic (default: the registry's)")
    tc.add_argument("--timeout", type=float, default=60.0)
    tc.set_defaults(func=cmd_topics_create)

    p = sub.add_parser("schema", help="JSON schemas of the input event and every output record")
    p.add_argument("name", nargs="?", choices=sorted({t.record for t in TOPICS}))
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("demo", help="the main job end to end on a local stack, with sample images")
    p.add_argument("--count", type=int, default=24, help="sample images to publish")
    p.add_argument("--console", action="store_true",
                   help="then serve the review console on that stack (a development login) until Ctrl-C")  # fmt: skip
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="the supported checkpoints and whether each is available locally")
    p.add_argument("--json", action="store_true", help="JSON lines (the default when not on a terminal)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("random-checkpoint", help="write a randomly initialized CLIP checkpoint (tests, demos)")
    p.add_argument("dir")
    p.add_argument("--arch", default="tiny", help="tiny | ViT-B/32 | ViT-B/16 | ViT-L/14")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_random_checkpoint)

    register_bench(sub)
    register_export(sub)
    register_stack(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format, settings.kafka_log_level)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"moderator: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from moderator.clip import ModelLoadError
        from moderator.policy import PolicyError

        if isinstance(exc, (ModelLoadError, PolicyError)):
            print(f"moderator: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
