"""``moderator bank ...``: add known images to banks, import and export hash lists, list, remove, and
scan the embeddings log for earlier events that match."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from moderator import terminal
from moderator.config import load_settings
from moderator.policy.spec import NAME_RE


def _bank_name(text: str) -> str:
    import re

    if not re.match(NAME_RE, text):
        raise argparse.ArgumentTypeError(f"{text!r}: lowercase letters, digits, '.', '_' and '-'; at most 64")
    return text


def _author(given: str | None) -> str:
    from moderator.policy.topic import author_name

    return author_name(given)


def cmd_add(args: argparse.Namespace) -> int:
    from moderator.app import App
    from moderator.banks.entries import LowQuality, from_image
    from moderator.banks.store import publish
    from moderator.images import ImageError, ImageLimits

    if args.from_verdicts:
        return _add_from_verdicts(args)
    if not args.images:
        print("moderator bank add: name IMAGE files, or --from-verdicts", file=sys.stderr)
        return 2
    if args.id and len(args.images) > 1:
        print("moderator bank add: --id names one image", file=sys.stderr)
        return 2
    app = App(load_settings())
    engine = None if args.no_embedding else app.engine
    limits = ImageLimits.from_settings(app.settings)
    entries, rows, failed = [], [], 0
    for path in args.images:
        try:
            data = Path(path).read_bytes()
            entry = from_image(args.name, data, limits=limits, engine=engine, spec=engine.spec if engine else None,
                               source=f"image:{Path(path).name}", added_by=_author(args.author), label=args.label,
                               entry_id=args.id)  # fmt: skip
        except (OSError, ImageError, LowQuality) as exc:
            failed += 1
            reason = getattr(exc, "reason", "low_quality" if isinstance(exc, LowQuality) else "unreadable_file")
            rows.append({"image": path, "result": f"refused: {reason}", "id": None, "pdq_quality": None})
            print(f"{path}: {exc}", file=sys.stderr)
            continue
        entries.append(entry)
        rows.append({"image": path, "result": "added", "id": entry.id, "pdq_quality": entry.pdq_quality,
                     "embedding": entry.model is not None})  # fmt: skip
    publish(app.settings, entries)
    terminal.emit(rows, ["image", "result", "id", "pdq_quality", "embedding"], as_json=terminal.wants_json(args.json))
    return 1 if failed else 0


def _add_from_verdicts(args: argparse.Namespace) -> int:
    from moderator.app import App
    from moderator.banks.entries import from_verdict
    from moderator.banks.store import publish
    from moderator.events import EmbeddingRecord
    from moderator.replay import read_verdicts

    settings = load_settings()
    app = App(settings)
    confirmed = [v for v in read_verdicts(app).current.values() if v.verdict == "confirm"
                 and (not args.category or set(args.category) & set(v.categories))
                 and (not args.since or v.reviewed_at >= args.since)]  # fmt: skip
    wanted = {v.event_id for v in confirmed}
    logged: dict[str, EmbeddingRecord] = {}
    if wanted:
        from moderator.clients import read_to_end

        def apply(record: Any) -> None:
            key = record.key.decode("utf-8", errors="replace") if record.key else ""
            if key in wanted:
                if record.value is None:
                    logged.pop(key, None)
                else:
                    logged[key] = EmbeddingRecord.model_validate_json(record.value)

        reader = app.reader(["embeddings"])
        try:
            read_to_end(reader, apply)
        finally:
            reader.close(autocommit=False)
    author = _author(args.author)
    entries = [e for v in confirmed if (e := from_verdict(args.name, v, logged.get(v.event_id), added_by=author))]
    publish(settings, entries)
    out = {"confirmed_verdicts": len(confirmed), "added": len(entries),
           "not_in_log_or_another_image": len(confirmed) - len(entries),
           "with_pdq": sum(e.pdq is not None for e in entries)}  # fmt: skip
    terminal.emit([out], list(out), as_json=terminal.wants_json(args.json))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from moderator.banks.entries import parse_hash_list
    from moderator.banks.store import publish

    text = Path(args.file).read_text(encoding="utf-8-sig")
    parsed = parse_hash_list(text, args.name, source=f"csv:{Path(args.file).name}", added_by=_author(args.author),
                             label=args.label)  # fmt: skip
    for number, why in parsed.invalid[:20]:
        print(f"{args.file}:{number}: {why}", file=sys.stderr)
    if len(parsed.invalid) > 20:
        print(f"... and {len(parsed.invalid) - 20} more invalid lines", file=sys.stderr)
    if parsed.invalid and not args.skip_invalid:
        print(f"moderator bank import: {len(parsed.invalid)} invalid line(s); nothing was imported "
              "(--skip-invalid imports the rest)", file=sys.stderr)  # fmt: skip
        return 1
    publish(load_settings(), parsed.entries)
    out = {"bank": args.name, "imported": len(parsed.entries), "refused_low_quality": parsed.low_quality,
           "invalid": len(parsed.invalid), "duplicates": parsed.duplicates,
           "other_signal_types": parsed.skipped_other_signal,
           "false_positive_opinions": parsed.false_positive_opinions}  # fmt: skip
    terminal.emit([out], list(out), as_json=terminal.wants_json(args.json))
    if parsed.low_quality:
        print(f"{parsed.low_quality} hash(es) of quality below 50 refused (they match too much)", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moderator.banks.entries import export_hash_list
    from moderator.banks.store import read_entries

    entries = sorted((e for e in read_entries(load_settings()).values() if e.bank == args.name), key=lambda e: e.id)
    sys.stdout.write(export_hash_list(entries))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from moderator.banks.store import read_entries

    entries = list(read_entries(load_settings()).values())
    as_json = terminal.wants_json(args.json)
    if args.name:
        mine = sorted((e for e in entries if e.bank == args.name), key=lambda e: e.added_at)
        if not mine:
            print(f"moderator bank list: bank {args.name!r} has no entries", file=sys.stderr)
            return 1
        rows = [{"id": e.id, "pdq": (e.pdq or "")[:16] + ("…" if e.pdq else ""), "quality": e.pdq_quality,
                 "embedding": e.model or "", "label": e.label, "source": e.source, "added_by": e.added_by,
                 "added_at": e.added_at} for e in mine]  # fmt: skip
        if as_json:
            terminal.emit([e.model_dump(exclude={"embedding"}) for e in mine], [], as_json=True)
        else:
            terminal.emit(rows, ["id", "pdq", "quality", "embedding", "label", "source", "added_at"], as_json=False)
        return 0
    banks: dict[str, dict[str, Any]] = {}
    for e in entries:
        b = banks.setdefault(e.bank, {"bank": e.bank, "entries": 0, "pdq": 0, "embeddings": Counter(), "last": ""})
        b["entries"] += 1
        b["pdq"] += e.pdq is not None
        if e.model:
            b["embeddings"][e.model] += 1
        b["last"] = max(b["last"], e.added_at)
    rows = [{"bank": b["bank"], "entries": b["entries"], "pdq": b["pdq"],
             "embeddings": ", ".join(f"{n} {m}" for m, n in b["embeddings"].most_common()) or "0",
             "last_added": b["last"]} for b in sorted(banks.values(), key=lambda b: b["bank"])]  # fmt: skip
    if not rows and not as_json:
        print("no banks yet: moderator bank add NAME IMAGE..., or moderator bank import NAME FILE", file=sys.stderr)
    terminal.emit(rows, ["bank", "entries", "pdq", "embeddings", "last_added"], as_json=as_json)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from moderator.banks.store import publish, read_entries

    settings = load_settings()
    mine = {e.id for e in read_entries(settings).values() if e.bank == args.name}
    ids = sorted(mine) if args.all else args.ids
    if not ids:
        print("moderator bank remove: name entry ids, or --all", file=sys.stderr)
        return 2
    unknown = [i for i in ids if i not in mine]
    for i in unknown:
        print(f"moderator bank remove: {args.name} has no entry {i!r}", file=sys.stderr)
    gone = [i for i in ids if i in mine]
    publish(settings, removed=[f"{args.name}/{i}" for i in gone])
    print(json.dumps({"bank": args.name, "removed": len(gone), "unknown": len(unknown)}))
    return 1 if unknown else 0


def _negative_in(settings: Any, bank: str) -> list[str]:
    """The served policies (directory or published) that use ``bank`` as a negative (known-benign) bank."""
    from moderator.policy import PolicySpec, load_spec, policy_files

    specs: list[PolicySpec] = []
    if settings.policy_source == "kafka":
        from moderator.policy.topic import live, read_published

        specs = [PolicySpec.model_validate(r.spec) for r in live(read_published(settings)).values()]
    else:
        for path in policy_files([settings.policy_dir]) if settings.policy_dir.is_dir() else []:
            try:
                specs.append(load_spec(path))
            except Exception:  # an invalid file is `policy check`'s business
                continue
    return [s.name for s in specs if any(r.name == bank and r.negative for r in s.banks)]


def cmd_scan(args: argparse.Namespace) -> int:
    from moderator.app import App
    from moderator.banks.scan import review_item, scan
    from moderator.banks.store import read_entries
    from moderator.events import EmbeddingRecord
    from moderator.replay import read_log

    app = App(load_settings())
    if args.publish_review:
        negative = _negative_in(app.settings, args.name)
        if negative:
            print(f"moderator bank scan: {args.name!r} is a negative (known-benign) bank in {', '.join(negative)}: "
                  "its matches are not sent to review", file=sys.stderr)  # fmt: skip
            return 2
    entries = [e for e in read_entries(app.settings).values() if e.bank == args.name
               and (not args.added_since or e.added_at >= args.added_since)]  # fmt: skip
    if not entries:
        print(f"moderator bank scan: bank {args.name!r} has no entries" + (" added since then" if args.added_since
              else ""), file=sys.stderr)  # fmt: skip
        return 1
    logged = read_log(app, app.engine.fingerprint, image_precision=None, keep_values=args.publish_review)
    found = scan(logged, entries, app.engine.fingerprint, pdq_distance=args.pdq_distance, cosine=args.cosine)
    new = [f for f in found if not f.already_matched]
    published = 0
    if args.publish_review and new:
        producer = app.producer()
        try:
            futures = []
            for f in new:
                item = review_item(f, EmbeddingRecord.model_validate_json(logged.values[f.row]), args.severity)
                futures.append(producer.send(app.settings.topic("review"), key=f.event_id.encode(),
                                             value=item.model_dump_json().encode()))  # fmt: skip
            for fut in futures:
                fut.get(timeout=30)
            published = len(futures)
        finally:
            producer.close(timeout=5)
    rows = [f.to_dict() for f in found]
    as_json = terminal.wants_json(args.json)
    terminal.emit(rows, ["event_id", "entry", "pdq_distance", "cosine", "live_decision", "already_matched"],
                  as_json=as_json)  # fmt: skip
    summary = {"events_scanned": len(logged.ids), "entries": len(entries), "matches": len(found),
               "new": len(new), "published_for_review": published,
               "skipped_other_model": logged.skipped_other_model}  # fmt: skip
    if as_json:
        print(json.dumps({"summary": summary}))
    else:
        print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in summary.items()), file=sys.stderr)
    return 0


def register_cli(sub: Any) -> None:
    """Add ``bank add|import|export|list|remove|scan`` to the ``moderator`` command line."""
    p = sub.add_parser("bank", help="known-image banks: add, import, export, list, remove, scan past events")
    bsub = p.add_subparsers(dest="bank_command", required=True)

    def common(q: argparse.ArgumentParser, author: bool = True) -> None:
        q.add_argument("--json", action="store_true", help="JSON lines (the default when not on a terminal)")
        if author:
            q.add_argument("--author", help="who (default: the OS user)")

    ba = bsub.add_parser("add", help="add image files (PDQ hash + CLIP embedding), or confirmed events")
    ba.add_argument("name", type=_bank_name)
    ba.add_argument("images", nargs="*", metavar="IMAGE")
    ba.add_argument("--label", default="", help="kept with each entry, shown in decisions")
    ba.add_argument("--id", help="the entry's id (one image; default: from the image's SHA-256)")
    ba.add_argument("--no-embedding", action="store_true", help="PDQ only: loads no model")
    ba.add_argument(
        "--from-verdicts",
        action="store_true",
        help="add every event reviewers confirmed (its hash and embedding from the embeddings log)",
    )
    ba.add_argument("--category", action="append", help="with --from-verdicts: only verdicts confirming this")
    ba.add_argument("--since", help="with --from-verdicts: only verdicts given since (ISO 8601)")
    common(ba)
    ba.set_defaults(func=cmd_add)

    bi = bsub.add_parser("import", help="import a PDQ hash list (hash,quality,id CSV; ThreatExchange forms)")
    bi.add_argument("name", type=_bank_name)
    bi.add_argument("file")
    bi.add_argument("--label", default="", help="kept with every entry")
    bi.add_argument("--skip-invalid", action="store_true", help="import the valid lines when some are invalid")
    common(bi)
    bi.set_defaults(func=cmd_import)

    be = bsub.add_parser("export", help="print a bank's hashes as hash,quality,id lines")
    be.add_argument("name", type=_bank_name)
    be.set_defaults(func=cmd_export)

    bl = bsub.add_parser("list", help="every bank with its counts; with a name, its entries")
    bl.add_argument("name", nargs="?", type=_bank_name)
    common(bl, author=False)
    bl.set_defaults(func=cmd_list)

    br = bsub.add_parser("remove", help="remove entries (tombstones: every worker drops them)")
    br.add_argument("name", type=_bank_name)
    br.add_argument("ids", nargs="*", metavar="ID")
    br.add_argument("--all", action="store_true", help="every entry of the bank")
    br.set_defaults(func=cmd_remove)

    bs = bsub.add_parser("scan", help="find earlier events that match the bank (from the embeddings log)")
    bs.add_argument("name", type=_bank_name)
    bs.add_argument("--pdq-distance", type=int, default=31, help="largest PDQ distance (default 31)")
    bs.add_argument("--no-pdq", dest="pdq_distance", action="store_const", const=None, help="no PDQ matching")
    bs.add_argument("--cosine", type=float, help="also match embeddings at least this similar (model-dependent)")
    bs.add_argument("--added-since", help="only entries added since (ISO 8601)")
    bs.add_argument(
        "--publish-review",
        action="store_true",
        help="publish each new match to the review topic as a retroactive review item",
    )
    bs.add_argument("--severity", help="the severity of published items (their priority)")
    common(bs, author=False)
    bs.set_defaults(func=cmd_scan)
