"""``moderator policy ...``: check and explain policy files; publish, roll back and follow the policies
a fleet serves (the policies topic)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moderator import terminal
from moderator.config import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "model", None):
        overrides["model_id"] = args.model
    return load_settings(**overrides)


def _app(args: argparse.Namespace) -> Any:
    from moderator.app import App

    return App(_settings(args))


def cmd_policy_check(args: argparse.Namespace) -> int:
    from moderator.policy import PolicyError, load_spec, policy_files

    paths = [Path(p) for p in (args.paths or [str(load_settings().policy_dir)])]
    missing = [p for p in paths if not p.exists()]
    files = policy_files([p for p in paths if p.exists()])
    failed = bool(missing) or not files
    for p in missing:
        print(f"{p}: no such file or directory", file=sys.stderr)
    if not files and not missing:
        print("no policy files (*.yaml, *.yml) found", file=sys.stderr)
    names: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for path in files:
        try:
            spec = load_spec(path)
        except PolicyError as exc:
            failed = True
            for problem in exc.errors:
                print(problem, file=sys.stderr)
            continue
        if spec.name in names:
            failed = True
            print(f"{path}: name: policy {spec.name!r} is already defined in {names[spec.name]}", file=sys.stderr)
            continue
        names[spec.name] = path
        cats = [
            {"name": c.name, "flag": c.flag, "review": c.review, "enabled": c.enabled,
             "descriptions": len(c.descriptions), "contrasts": len(c.contrasts)}
            for c in spec.categories
        ]  # fmt: skip
        rows.append({"file": str(path), "policy": spec.name, "version": spec.version(), "default": spec.default,
                     "categories": cats})  # fmt: skip
    if terminal.wants_json(args.json):
        terminal.emit(rows, [], as_json=True)
    else:
        for r in rows:
            default = " (default)" if r["default"] else ""
            print(f"{r['policy']}{default}  {r['version']}  {r['file']}")
            print(terminal.table(r["categories"], ["name", "flag", "review", "enabled", "descriptions", "contrasts"]))
            print()
        print(f"{len(rows)} valid, {'some' if failed else 'none'} invalid", file=sys.stderr)
    return 1 if failed else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from moderator.images import ImageError, ImageLimits, load_frames
    from moderator.policy import explain

    app = _app(args)
    policy = app.load_policy(args.policy)
    limits = ImageLimits.from_settings(app.settings, app.engine.tower.precision)
    failed = 0
    for path in args.images:
        try:
            loaded = load_frames(Path(path).read_bytes(), limits, app.engine.spec, with_pdq=False)
        except (OSError, ImageError) as exc:
            failed += 1
            reason = exc.reason if isinstance(exc, ImageError) else "unreadable_file"
            print(json.dumps({"image": path, "error": reason, "message": str(exc)}))
            continue
        tower = app.engine.tower
        embeds = app.engine.encode_images(loaded.pixels, tower)  # a row per sampled frame
        report = explain(policy, embeds, args.top, tower.precision, loaded.frames)
        print(json.dumps({"image": path, **report}, indent=2 if args.pretty else None))
    return 1 if failed else 0


def cmd_publish(args: argparse.Namespace) -> int:
    from moderator.events import PublishedPolicy
    from moderator.policy.spec import PolicyError
    from moderator.policy.topic import author_name, live, publish, read_published, record, validate

    settings = load_settings()
    published = live(read_published(settings))
    try:
        candidates = validate([Path(p) for p in args.paths], settings, published)
    except PolicyError as exc:
        for problem in exc.errors:
            print(problem, file=sys.stderr)
        print(f"moderator policy publish: {len(exc.errors)} problem(s); nothing was published", file=sys.stderr)
        return 1
    author = author_name(args.author)
    out: list[PublishedPolicy] = []
    rows: list[dict[str, str | None]] = []
    for c in candidates:
        current = published.get(c.spec.name)
        if current is not None and current.version == c.spec.version() and current.yaml == c.text:
            rows.append({"policy": c.spec.name, "version": c.spec.version(), "result": "unchanged"})
            continue
        out.append(record(c.spec, c.text, author, args.message, "publish", current.version if current else None))
        rows.append({"policy": c.spec.name, "version": c.spec.version(), "result": "published",
                     "replaces": current.version if current else None})  # fmt: skip
    publish(settings, out)
    terminal.emit(rows, ["policy", "version", "result", "replaces"], as_json=terminal.wants_json(args.json))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from moderator.policy.topic import history, read_published

    rows = history(read_published(load_settings()), args.name)
    if not rows:
        print(f"moderator policy history: nothing published for {args.name!r}", file=sys.stderr)
        return 1
    terminal.emit(rows, ["version", "action", "author", "published_at", "live", "message"],
                  as_json=terminal.wants_json(args.json))  # fmt: skip
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from moderator.policy.spec import parse_spec
    from moderator.policy.topic import author_name, live, publish, read_published, record

    settings = load_settings()
    records = read_published(settings)
    current = live(records).get(args.name)
    if current is None:
        print(f"moderator policy rollback: nothing published for {args.name!r}", file=sys.stderr)
        return 1
    earlier = [r for r in records if r.name == args.name and r.version != current.version]
    if args.version:
        earlier = [r for r in earlier if r.version == args.version or r.version.endswith(args.version)]
    if not earlier:
        which = f"no version {args.version}" if args.version else "no earlier version"
        print(f"moderator policy rollback: {args.name} has {which} (live: {current.version})", file=sys.stderr)
        return 1
    target = earlier[-1]  # the latest publication of it
    spec = parse_spec(target.yaml, f"{args.name}@{target.version}")
    message = args.message or f"rollback from {current.version}"
    publish(settings, [record(spec, target.yaml, author_name(args.author), message, "rollback", current.version)])
    print(json.dumps({"policy": args.name, "version": target.version, "replaces": current.version}))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from moderator.policy.topic import live, read_published

    rows = [{"policy": r.name, "version": r.version, "role": f"shadow of {r.spec['shadow_of']}"
             if r.spec.get("shadow_of") else "default" if r.spec.get("default") else "live",
             "author": r.author, "published_at": r.published_at, "action": r.action}
            for r in sorted(live(read_published(load_settings())).values(), key=lambda r: r.name)]  # fmt: skip
    if not rows:
        print("moderator policy status: no policy has been published", file=sys.stderr)
        return 1
    terminal.emit(rows, ["policy", "version", "role", "author", "published_at", "action"],
                  as_json=terminal.wants_json(args.json))  # fmt: skip
    return 0


def register_cli(sub: Any) -> None:
    """Add ``policy check|explain|publish|history|rollback|status`` to the ``moderator`` command line."""
    p = sub.add_parser("policy", help="policy files: check, explain; publish, history, rollback, status")
    psub = p.add_subparsers(dest="policy_command", required=True)
    pc = psub.add_parser("check", help="validate policy files or directories; show name, version, categories")
    pc.add_argument("paths", nargs="*", metavar="PATH", help="files or directories (default: MODERATOR_POLICY_DIR)")
    pc.add_argument("--json", action="store_true", help="JSON lines (the default when not on a terminal)")
    pc.set_defaults(func=cmd_policy_check)
    pe = psub.add_parser("explain", help="per category: score, thresholds, closest texts, the rule that fired")
    pe.add_argument("images", nargs="+", metavar="IMAGE")
    pe.add_argument("--policy", required=True, help="the policy file")
    pe.add_argument("--model", help="checkpoint id or local directory (default: MODERATOR_MODEL_ID)")
    pe.add_argument("--top", type=int, default=3, help="closest texts to show per list")
    pe.add_argument("--pretty", action="store_true", help="indented JSON")
    pe.set_defaults(func=cmd_policy_explain)

    pp = psub.add_parser("publish", help="validate policy files as the workers would, then publish them to the fleet")
    pp.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    pp.add_argument("--message", default="", help="why: kept with the version")
    pp.add_argument("--author", help="who (default: the OS user)")
    pp.add_argument("--json", action="store_true", help="JSON lines (the default when not on a terminal)")
    pp.set_defaults(func=cmd_publish)
    ph = psub.add_parser("history", help="every published version of a policy, with author and time")
    ph.add_argument("name")
    ph.add_argument("--json", action="store_true", help="JSON lines (the default when not on a terminal)")
    ph.set_defaults(func=cmd_history)
    pr = psub.add_parser("rollback", help="publish an earlier version of a policy again (default: the one before)")
    pr.add_argument("name")
    pr.add_argument("version", nargs="?", help="the version (or its last characters)")
    pr.add_argument("--message", default="", help="why")
    pr.add_argument("--author", help="who (default: the OS user)")
    pr.set_defaults(func=cmd_rollback)
    ps = psub.add_parser("status", help="the live version of every published policy, and the shadows")
    ps.add_argument("--json", action="store_true", help="JSON lines (the default when not on a terminal)")
    ps.set_defaults(func=cmd_status)
