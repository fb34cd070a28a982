"""``moderator bench``: options from the command line, the run, the table and the JSON report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from moderator import observability as obs
from moderator.bench.options import BenchError, options_from_args
from moderator.bench.report import render_table
from moderator.bench.run import run_bench


def cmd_bench(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    obs.configure_logging("WARNING", "json", kafka_level="ERROR")  # the stack's start-up probes warn
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        opts = options_from_args(args)
        t0 = time.monotonic()
        report = run_bench(opts, lambda stage: print(f"[bench {time.monotonic() - t0:6.1f}s] {stage}",
                                                     file=sys.stderr, flush=True))  # fmt: skip
    except BenchError as exc:
        print(f"moderator bench: {exc}", file=sys.stderr)
        return 2
    report["wall_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(report, indent=2)
    path = args.json_path or f"bench-{opts.arch.replace('/', '-')}-{report['machine']['device'].replace(':', '')}.json"
    if path == "-":
        print(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(render_table(report))
    print(f"\n({report['wall_s']} s; JSON: {path})")
    return 0


def register_cli(sub: Any) -> None:
    """Add ``bench`` to the ``moderator`` command line."""
    p = sub.add_parser(
        "bench",
        help="reference pipeline vs engine vs worker vs ceiling, side by side: a table and a JSON file",
        description="Runs every contender in one process on the same weights and images; see benchmarks/README.md.",
    )
    p.add_argument("--quick", action="store_true", help="fewer images, one load level, no sweeps")
    p.add_argument("--arch", default="ViT-B/32", help="ViT-B/32 | ViT-B/16 | ViT-L/14 | tiny (default ViT-B/32)")
    p.add_argument("--model", help="a checkpoint (a hub id in the local cache, or a directory) instead of --arch's")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16", "int8"],
        help="the image tower precision of the main contenders (auto: float32 on CPU, float16 on CUDA)",
    )
    p.add_argument("--precisions", default="auto",
                   help="the ceiling and the worker per image-tower precision, with their agreement figures, e.g."
                        " float32,bfloat16,int8 (auto: on the CPU float32, bfloat16 where native, int8 where"
                        " OpenVINO is installed; on CUDA the --dtype alone)")  # fmt: skip
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
    p.add_argument("--decode-schedule", choices=["auto", "overlap", "before_forward", "pipelined"], default="auto",
                   help="when images are decoded (MODERATOR_DECODE_SCHEDULE; auto: pipelined on CPU)")  # fmt: skip
    p.add_argument("--reference-images", type=int, help="images through the reference (default 24; CUDA 64)")
    p.add_argument(
        "--contenders",
        help="comma-separated (default: reference,engine,worker,ceiling, and replay with --feed kafka; "
        "also: banks, animated, http, eos: exactly-once against at-least-once on a Tansu broker)",
    )
    p.add_argument(
        "--log-records", type=int, help="records of the replay contender's embeddings log (default 200000; quick 50000)"
    )
    p.add_argument("--bank-sizes", help="entries of the banks contender's banks (default 10000,100000)")
    p.add_argument("--feed", choices=["kafka", "queue"], default="kafka",
                   help="queue: the worker fed from an in-process queue, for machines without Kafka")  # fmt: skip
    p.add_argument("--partitions", type=int, default=4, help="partitions of the benchmark's images topic")
    p.add_argument("--kafka", dest="kafka_bootstrap", help="an existing broker (host:port) instead of a local stack")
    p.add_argument("--kafka-api-version", help='with --kafka, for brokers that cannot be probed ("0.9")')
    p.add_argument("--redis", dest="redis_url", help="an existing Redis (URL) instead of a local one")
    p.add_argument("--load", help="offered loads in %% of the measured maximum (default 25,50,75,100; quick 50)")
    p.add_argument("--http-clients", type=int, default=4, help="the http contender's closed-loop clients (default 4)")
    p.add_argument(
        "--http-stream-pct",
        type=int,
        default=50,
        help="the http contender's mixed load: stream events at this %% of its capacity (default 50)",
    )
    p.add_argument("--load-seconds", type=float, help="seconds per load level (default 15; CUDA 10; quick 6)")
    p.add_argument("--sweep-batch", help="batch sizes (default 1,8,16,32,64; CUDA 32,64,128,256,512)")
    p.add_argument("--sweep-prompts", help="prompt counts (default 12,48,192,768)")
    p.add_argument("--no-sweeps", action="store_true", help="no batch or prompt sweeps (--quick implies it)")
    p.add_argument("--json", dest="json_path", help="report path (default bench-<arch>-<device>.json; - = stdout)")
    p.set_defaults(func=cmd_bench)
