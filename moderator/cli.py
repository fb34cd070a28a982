"""The ``moderator`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moderator import stack
from moderator.config import ConfigError, Settings, load_settings
from moderator.observability import configure_logging, get_logger

log = get_logger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "model", None):
        overrides["model_id"] = args.model
    return load_settings(**overrides)


def cmd_classify(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from moderator.clip import PIPELINE_TEMPLATE, ClipEngine, zero_shot_probs
    from moderator.embedding_cache import TextEncoder, cache_from_settings
    from moderator.images import ImageError, ImageLimits, ImageLoader

    settings = _settings(args)
    if bool(args.label) == bool(args.policy):
        print("classify needs either --label (one or more) or --policy FILE", file=sys.stderr)
        return 2
    engine = ClipEngine.from_settings(settings)
    encoder = TextEncoder(engine, cache_from_settings(settings, engine))
    policy = None
    if args.policy:
        from moderator.policy import compile_policy, load_spec

        policy = compile_policy(load_spec(Path(args.policy)), encoder, args.policy)
    else:
        template = args.template or PIPELINE_TEMPLATE
        prompts = [template.replace("{}", lb) if "{}" in template else lb for lb in args.label]
        text = torch.from_numpy(encoder.encode(prompts)).to(engine.device)
    loader = ImageLoader(ImageLimits.from_settings(settings), engine.spec, settings.decode_threads)
    failed = 0
    paths = list(args.images)
    try:
        for start in range(0, len(paths), settings.max_batch_size):
            chunk = paths[start : start + settings.max_batch_size]
            datas: list[bytes | None] = []
            for p in chunk:
                try:
                    datas.append(Path(p).read_bytes())
                except OSError:
                    datas.append(None)
            results = loader.load_many([d if d is not None else b"" for d in datas])
            good = [i for i, r in enumerate(results) if not isinstance(r, ImageError) and datas[i] is not None]
            rows: list = []
            if good:
                embs = engine.encode_images(np.stack([results[i] for i in good]))  # type: ignore[misc]
                if policy is not None:
                    rows = policy.decisions(embs)
                else:
                    rows = zero_shot_probs(embs, text, engine.logit_scale).cpu().tolist()
            row_of = {i: n for n, i in enumerate(good)}
            for i, p in enumerate(chunk):
                res = results[i]
                if datas[i] is None:
                    out = {"image": p, "error": "unreadable_file", "message": f"cannot read {p}"}
                elif isinstance(res, ImageError):
                    out = {"image": p, "error": res.reason, "message": str(res)}
                elif policy is not None:
                    out = {"image": p, **rows[row_of[i]].model_dump(mode="json")}
                else:
                    scores = dict(zip(args.label, rows[row_of[i]], strict=True))
                    out = {"image": p, "scores": scores, "model": engine.fingerprint}
                if "error" in out:
                    failed += 1
                print(json.dumps(out), flush=True)
    finally:
        loader.close()
    return 1 if failed else 0


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
    for path in files:
        try:
            spec = load_spec(path)
        except PolicyError as exc:
            failed = True
            for f, where, reason in exc.errors:
                print(f"{f}: {where + ': ' if where else ''}{reason}", file=sys.stderr)
            continue
        if spec.name in names:
            failed = True
            print(
                f"{path}: name: policy {spec.name!r} is already defined in {names[spec.name]}",
                file=sys.stderr,
            )
            continue
        names[spec.name] = path
        cats = [
            {
                "name": c.name,
                "flag": c.flag,
                "review": c.review,
                "enabled": c.enabled,
                "descriptions": len(c.descriptions),
                "contrasts": len(c.contrasts),
            }
            for c in spec.categories
        ]
        print(json.dumps({"file": str(path), "policy": spec.name, "version": spec.version(), "categories": cats}))
    return 1 if failed else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from moderator.clip import ClipEngine
    from moderator.embedding_cache import TextEncoder, cache_from_settings
    from moderator.images import ImageError, ImageLimits, load_image
    from moderator.policy import compile_policy, explain, load_spec

    settings = _settings(args)
    engine = ClipEngine.from_settings(settings)
    encoder = TextEncoder(engine, cache_from_settings(settings, engine))
    policy = compile_policy(load_spec(Path(args.policy)), encoder, args.policy)
    limits = ImageLimits.from_settings(settings)
    failed = 0
    for path in args.images:
        try:
            arr = load_image(Path(path).read_bytes(), limits, engine.spec)
        except (OSError, ImageError) as exc:
            failed += 1
            reason = exc.reason if isinstance(exc, ImageError) else "unreadable_file"
            print(json.dumps({"image": path, "error": reason, "message": str(exc)}))
            continue
        report = explain(policy, engine.encode_images(arr[None])[0], top=args.top)
        print(json.dumps({"image": path, **report}, indent=2 if args.pretty else None))
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from moderator.clip import ClipEngine
    from moderator.embedding_cache import TextEncoder, cache_from_settings
    from moderator.observability import HealthServer
    from moderator.pipeline import Worker
    from moderator.policy import PolicyRegistry, compile_policy

    settings = load_settings()
    engine = ClipEngine.from_settings(settings)  # start-up errors fail fast, with what to do
    encoder = TextEncoder(engine, cache_from_settings(settings, engine))
    registry = PolicyRegistry(
        settings.policy_dir, lambda spec, src: compile_policy(spec, encoder, src), settings.default_policy
    )
    registry.load_initial()
    health = HealthServer(settings.http_host, settings.http_port).start()
    worker = Worker(settings, engine, registry)
    health.add_check("model_loaded", lambda: True)
    health.add_check("policies_compiled", lambda: bool(registry.current.policies))
    health.add_check("partitions_assigned", worker.assigned.is_set)
    registry.start()
    try:
        code = worker.run()
    finally:
        registry.stop()
        health.stop()
    stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if stuck:  # e.g. an image fetch past its deadline: the exit bound wins over waiting for it
        log.warning("exiting_with_threads_running", threads=stuck[:10])
        sys.stderr.flush()
        os._exit(code)
    return code


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
    import base64
    import uuid

    from kafka import KafkaProducer

    settings = load_settings()
    producer = KafkaProducer(**settings.kafka_common(), acks="all", enable_idempotence=settings.idempotence,
                             max_request_size=64 * 1024 * 1024)  # fmt: skip
    topic = args.topic or settings.topic_images
    failed = 0
    for item in _image_files(args.items):
        is_url = item.startswith(("http://", "https://"))
        if args.mode == "url" and not is_url:
            print(f"moderator: {item}: --url needs http(s) URLs", file=sys.stderr)
            failed += 1
            continue
        if args.mode == "inline" and is_url:
            print(f"moderator: {item}: --inline needs files", file=sys.stderr)
            failed += 1
            continue
        event_id = f"{args.id_prefix}{uuid.uuid4().hex}"
        if is_url:
            image: dict[str, str] = {"url": item}
        else:
            image = {"data": base64.b64encode(Path(item).read_bytes()).decode()}
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
    import time

    from kafka import KafkaConsumer, TopicPartition

    settings = load_settings()
    topic = {"decisions": settings.topic_decisions, "review": settings.topic_review,
             "dead-letters": settings.topic_dead_letters}[args.which]  # fmt: skip
    consumer = KafkaConsumer(**settings.kafka_common(), group_id=None, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    if not parts:
        print(f"moderator: topic {topic!r} does not exist", file=sys.stderr)
        return 1
    consumer.assign(parts)
    if args.from_beginning:
        consumer.seek_to_beginning(*parts)
    else:
        consumer.seek_to_end(*parts)
    seen = 0
    idle_until = time.monotonic() + args.idle_timeout if args.idle_timeout else None
    try:
        while args.max is None or seen < args.max:
            batch = consumer.poll(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    print((r.value or b"").decode("utf-8", errors="replace"), flush=True)
                    seen += 1
                    if args.max is not None and seen >= args.max:
                        break
            if batch and args.idle_timeout:
                idle_until = time.monotonic() + args.idle_timeout
            if idle_until is not None and time.monotonic() > idle_until:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close(autocommit=False)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from moderator.events import schemas

    all_schemas = schemas()
    print(json.dumps(all_schemas if args.name is None else all_schemas[args.name], indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moderator.demo import run_demo

    return run_demo(count=args.count)


def cmd_models(args: argparse.Namespace) -> int:
    from moderator.clip import SUPPORTED_CHECKPOINTS, checkpoint_available

    settings = load_settings()
    for info in SUPPORTED_CHECKPOINTS.values():
        available = checkpoint_available(info.model_id, settings.model_cache_dir)
        print(
            json.dumps(
                {
                    "model": info.model_id,
                    "architecture": info.architecture,
                    "image_size": info.image_size,
                    "patch_size": info.patch_size,
                    "embed_dim": info.embed_dim,
                    "available_locally": available,
                    "note": info.note,
                }
            )
        )
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from moderator.testing import build_clip_checkpoint

    out = build_clip_checkpoint(args.dir, args.arch, seed=args.seed)
    print(json.dumps({"dir": str(out), "architecture": args.arch, "seed": args.seed, "random_init": True}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from moderator.bench import cmd_bench as run

    return run(args)


def _bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="reference pipeline vs engine vs worker vs ceiling, side by side: a table and a JSON file",
        description="Runs every contender in one process on the same weights and images; see benchmarks/README.md.",
    )
    p.add_argument("--quick", action="store_true", help="fewer images, one load level, no sweeps")
    p.add_argument("--arch", default="ViT-B/32", help="ViT-B/32 | ViT-B/16 | ViT-L/14 | tiny (default ViT-B/32)")
    p.add_argument("--model", help="a checkpoint (a hub id in the local cache, or a directory) instead of --arch's")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument(
        "--images",
        type=int,
        help="images through the engine and the worker (default 384, quick 256; CUDA 4096, quick 1024)",
    )
    p.add_argument("--distinct", type=int, default=128, help="distinct generated JPEGs, cycled (default 128)")
    p.add_argument("--sizes", default="640x480", help="size mix, e.g. 640x480:3,1280x720:1,320x240:1")
    p.add_argument("--source", choices=["inline", "url"], default="inline", help="url: served by a local HTTP server")
    p.add_argument("--prompts", type=int, default=12, help="prompts in the benchmark policy (default 12)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=20.0)
    p.add_argument("--decode-threads", type=int, default=0, help="default: the core count")
    p.add_argument("--decode-schedule", choices=["auto", "overlap", "before_forward"], default="auto",
                   help="when images are decoded (MODERATOR_DECODE_SCHEDULE; auto: before_forward on CPU)")  # fmt: skip
    p.add_argument("--reference-images", type=int, help="images through the reference (default 24; CUDA 64)")
    p.add_argument("--contenders", default="reference,engine,worker,ceiling")
    p.add_argument("--feed", choices=["kafka", "queue"], default="kafka",
                   help="queue: the worker fed from an in-process queue, for machines without Kafka")  # fmt: skip
    p.add_argument("--partitions", type=int, default=4, help="partitions of the benchmark's images topic")
    p.add_argument("--kafka", dest="kafka_bootstrap", help="an existing broker (host:port) instead of a local stack")
    p.add_argument("--kafka-api-version", help='with --kafka, for brokers that cannot be probed ("0.9")')
    p.add_argument("--redis", dest="redis_url", help="an existing Redis (URL) instead of a local one")
    p.add_argument("--load", help="offered loads in %% of the measured maximum (default 25,50,75,100; quick 50)")
    p.add_argument("--load-seconds", type=float, help="seconds per load level (default 15; CUDA 10; quick 6)")
    p.add_argument("--sweep-batch", help="batch sizes (default 1,8,16,32,64; CUDA 32,64,128,256,512)")
    p.add_argument("--sweep-prompts", help="prompt counts (default 12,48,192,768)")
    p.add_argument("--no-sweeps", action="store_true", help="no batch or prompt sweeps (--quick implies it)")
    p.add_argument("--json", dest="json_path", help="report path (default bench-<arch>-<device>.json; - = stdout)")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moderator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stack.register_cli(sub)

    p = sub.add_parser("classify", help="zero-shot scores (or policy decisions) for image files, one JSON line each")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", help="checkpoint id or local directory (default: MODERATOR_MODEL_ID)")
    p.add_argument("--label", action="append", default=[], help="a candidate label; repeat for more")
    p.add_argument(
        "--template", help="prompt template, {} = the label (default: the pipeline's, This is a photo of {}.)"
    )
    p.set_defaults(func=cmd_classify)

    p.add_argument("--policy", help="a policy file: print one decision per image instead of label scores")

    p = sub.add_parser("policy", help="policy files: check, explain")
    psub = p.add_subparsers(dest="policy_command", required=True)
    pc = psub.add_parser("check", help="validate policy files or directories; print name, version, categories")
    pc.add_argument("paths", nargs="*", metavar="PATH", help="files or directories (default: MODERATOR_POLICY_DIR)")
    pc.set_defaults(func=cmd_policy_check)
    pe = psub.add_parser("explain", help="per category: score, thresholds, closest texts, the rule that fired")
    pe.add_argument("images", nargs="+", metavar="IMAGE")
    pe.add_argument("--policy", required=True, help="the policy file")
    pe.add_argument("--model", help="checkpoint id or local directory (default: MODERATOR_MODEL_ID)")
    pe.add_argument("--top", type=int, default=3, help="closest texts to show per list")
    pe.add_argument("--pretty", action="store_true", help="indented JSON")
    pe.set_defaults(func=cmd_policy_explain)

    p = sub.add_parser("run", help="the stream worker: images topic in; decisions, review, dead letters out")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("produce", help="publish image events (files inline, http(s) URLs by reference)")
    p.add_argument("items", nargs="+", metavar="PATH_OR_URL", help="image files, directories or URLs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--inline", dest="mode", action="store_const", const="inline", help="files, base64 inline")
    mode.add_argument("--url", dest="mode", action="store_const", const="url", help="URLs, fetched by the worker")
    p.add_argument("--policy", help="the policy to decide with (default: the worker's default policy)")
    p.add_argument("--topic", help="default: MODERATOR_TOPIC_IMAGES")
    p.add_argument("--id-prefix", default="", help="prefix of the generated event ids")
    p.set_defaults(func=cmd_produce, mode=None)

    p = sub.add_parser("tail", help="print the records of an output topic as JSON lines")
    p.add_argument("which", choices=["decisions", "review", "dead-letters"])
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--max", type=int, help="stop after N records")
    p.add_argument("--idle-timeout", type=float, help="stop after S seconds without a record")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("demo", help="the main job end to end on a local stack, with sample images")
    p.add_argument("--count", type=int, default=24, help="sample images to publish")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("schema", help="JSON schemas of the input event and every output record")
    p.add_argument("name", nargs="?", choices=["ImageEvent", "DecisionRecord", "ReviewItem", "DeadLetter"])
    p.set_defaults(func=cmd_schema)

    _bench_parser(sub)

    p = sub.add_parser("models", help="the supported checkpoints and whether each is available locally")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("random-checkpoint", help="write a randomly initialized CLIP checkpoint (tests, demos)")
    p.add_argument("dir")
    p.add_argument("--arch", default="tiny", help="tiny | ViT-B/32 | ViT-B/16 | ViT-L/14")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_random_checkpoint)
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
