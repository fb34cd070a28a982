"""Benchmark options: what to run, on what, and how much; refused up front when they cannot work."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch

from moderator.random_init import ARCHITECTURES

CONTENDERS = ("reference", "engine", "worker", "ceiling", "replay", "banks", "animated", "http", "eos")
DEFAULT_CONTENDERS = ("reference", "engine", "worker", "ceiling", "replay")  # banks, animated, http, eos: by name


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why and what to change."""


@dataclass(frozen=True)
class BenchOptions:
    arch: str = "ViT-B/32"  # architecture: its real checkpoint when cached locally, else random weights
    model: str | None = None  # a checkpoint (hub id or directory) instead of the arch's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # image tower precision of the main contenders (auto: fp32 on CPU, fp16 on CUDA)
    precisions: tuple[str, ...] = ()  # the ceiling and the worker of each, side by side (() = dtype's only)
    images: int = 384  # images through the engine and the worker (cycled from `distinct` generated ones)
    distinct: int = 128  # distinct generated JPEGs
    sizes: tuple[tuple[int, int, int], ...] = ((640, 480, 1),)  # (width, height, weight) of the size mix
    source: str = "inline"  # inline: base64 in the event; url: served by a local HTTP server, fetched
    prompts: int = 12  # texts in the benchmark policy (= candidate labels of the reference)
    batch: int = 32
    max_delay_ms: float = 20.0
    decode_threads: int = 0  # 0: the core count
    decode_schedule: str = "auto"  # auto | overlap | before_forward (the worker's setting)
    reference_images: int = 24
    ceiling_batches: int = 6
    contenders: tuple[str, ...] = ("reference", "engine", "worker", "ceiling", "replay")
    log_records: int = 200_000  # embedding records in the replay contender's synthetic log
    bank_sizes: tuple[int, ...] = (10_000, 100_000)  # entries of the banks contender's banks
    feed: str = "kafka"  # kafka | queue
    partitions: int = 4
    kafka_bootstrap: str | None = None  # an existing broker instead of a local stack
    kafka_api_version: str | None = None
    redis_url: str | None = None  # an existing Redis instead of the local stack's
    load_levels: tuple[int, ...] = (25, 50, 75, 100)  # % of the worker's measured maximum
    load_seconds: float = 15.0
    http_clients: int = 4  # the http contender's closed-loop clients
    http_stream_pct: int = 50  # the http contender's mixed phase: stream events at this % of the stream's capacity
    sweep_batch: tuple[int, ...] = ()
    sweep_prompts: tuple[int, ...] = ()
    seed: int = 0

    @property
    def needs_kafka(self) -> bool:
        workers = any(c in self.contenders for c in ("worker", "banks", "animated", "http"))
        return "replay" in self.contenders or (workers and self.feed == "kafka")

    @property
    def threads(self) -> int:
        return self.decode_threads or os.cpu_count() or 1

    def check(self) -> None:
        """Raise :class:`BenchError` naming the first option that cannot work."""
        if self.model is None and self.arch not in ARCHITECTURES:
            raise BenchError(f"unknown architecture {self.arch!r}: one of {', '.join(ARCHITECTURES)}, or --model")
        unknown = set(self.contenders) - set(CONTENDERS)
        if unknown or not self.contenders:
            raise BenchError(f"contenders are {', '.join(CONTENDERS)}; got {', '.join(self.contenders)}")
        if self.feed not in ("kafka", "queue") or self.source not in ("inline", "url"):
            raise BenchError("feed is kafka or queue; source is inline or url")
        if "replay" in self.contenders and self.feed != "kafka":
            raise BenchError("the replay contender reads the embeddings log from Kafka: --feed kafka")
        if "http" in self.contenders and self.feed != "kafka":
            raise BenchError("the http contender publishes every decision to Kafka: --feed kafka")
        if self.http_clients < 1 or not 0 < self.http_stream_pct <= 100:
            raise BenchError("http-clients must be at least 1, http-stream-pct in 1..100")
        for name in (
            "images",
            "distinct",
            "prompts",
            "batch",
            "reference_images",
            "ceiling_batches",
            "partitions",
            "log_records",
        ):
            if getattr(self, name) < 1:
                raise BenchError(f"{name.replace('_', '-')} must be at least 1")
        if any(n < 1 for n in self.bank_sizes) or ("banks" in self.contenders and not self.bank_sizes):
            raise BenchError("bank-sizes: one or more entry counts, each at least 1")
        bad = set(self.precisions) - {"float32", "bfloat16", "float16", "int8"}
        if bad:
            raise BenchError(f"precisions are float32, bfloat16, float16, int8; got {', '.join(sorted(bad))}")
        if self.load_seconds <= 0 or self.decode_threads < 0 or self.max_delay_ms < 0:
            raise BenchError("load-seconds must be positive, decode-threads and max-delay-ms not negative")


def parse_sizes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"640x480"`` or ``"640x480:3,1280x720:1"`` (weights) to ``((w, h, weight), ...)``."""
    out = []
    for part in text.split(","):
        dims, _, weight = part.strip().partition(":")
        w, sep, h = dims.partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or (weight and not weight.isdigit()):
            raise BenchError(f"bad size {part!r}: expected WIDTHxHEIGHT[:WEIGHT], e.g. 640x480:3,1280x720:1")
        if int(w) < 1 or int(h) < 1 or (weight and int(weight) < 1):
            raise BenchError(f"bad size {part!r}: width, height and weight must be >= 1")
        out.append((int(w), int(h), int(weight or 1)))
    return tuple(out)


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BenchError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise BenchError(f"expected positive integers, got {text!r}")
    return values


def _precisions(args: argparse.Namespace) -> tuple[str, ...]:
    from moderator.bench.precisions import available_precisions
    from moderator.clip import resolve_device

    if args.precisions == "auto":
        return available_precisions(resolve_device(args.device), args.dtype)
    return tuple(p.strip() for p in args.precisions.split(",") if p.strip())


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    quick, sweeps = args.quick, not (args.quick or args.no_sweeps)

    def pick(value: Any, normal: Any, on_cuda: Any, on_quick: Any) -> Any:
        if value is not None:
            return value
        return on_quick if quick else (on_cuda if cuda else normal)

    return BenchOptions(
        arch=args.arch, model=args.model, device=args.device, dtype=args.dtype, precisions=_precisions(args),
        images=pick(args.images, 384, 4096, 256 if not cuda else 1024), distinct=args.distinct,
        sizes=parse_sizes(args.sizes), source=args.source, prompts=args.prompts, batch=args.batch,
        max_delay_ms=args.max_delay_ms, decode_threads=args.decode_threads, decode_schedule=args.decode_schedule,
        reference_images=pick(args.reference_images, 24, 64, 8), ceiling_batches=6 if quick else 10,
        contenders=tuple(c.strip() for c in args.contenders.split(",") if c.strip()) if args.contenders else
        tuple(c for c in DEFAULT_CONTENDERS if c != "replay" or args.feed == "kafka"), feed=args.feed,
        log_records=pick(args.log_records, 200_000, 200_000, 50_000),
        bank_sizes=parse_ints(args.bank_sizes) if args.bank_sizes else (10_000, 100_000),
        partitions=args.partitions, kafka_bootstrap=args.kafka_bootstrap, kafka_api_version=args.kafka_api_version,
        redis_url=args.redis_url,
        load_levels=parse_ints(args.load) if args.load else ((50,) if quick else (25, 50, 75, 100)),
        load_seconds=pick(args.load_seconds, 15.0, 10.0, 6.0), http_clients=args.http_clients,
        http_stream_pct=args.http_stream_pct,
        sweep_batch=parse_ints(args.sweep_batch) if args.sweep_batch else
        (((32, 64, 128, 256, 512) if cuda else (1, 8, 16, 32, 64)) if sweeps else ()),
        sweep_prompts=parse_ints(args.sweep_prompts) if args.sweep_prompts else ((12, 48, 192, 768) if sweeps else ()),
    )  # fmt: skip
