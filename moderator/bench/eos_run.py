"""The exactly-once contender: what transactions cost the worker against at-least-once, in one run.

A Tansu broker of its own (a broker with transactions; the run's other contenders may be on Kafka
0.9, which has none), fresh topics per run, and the whole worker three times on the benchmark's
events: at-least-once, exactly-once (``MODERATOR_PROCESSING_GUARANTEE=exactly-once``), at-least-once
again; the at-least-once figure is the mean of the two, so that a slow or fast spell of a shared
machine does not pass for the transactions' cost. Each run is a backlog, then latency at 50% of
its own capacity (an exactly-once decision is published when its transaction commits).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from moderator.app import App
from moderator.bench.inputs import ImageServer
from moderator.bench.options import BenchOptions
from moderator.bench.worker_run import run_worker_contender
from moderator.stack import LocalStack
from moderator.topics import TOPICS, NewTopic

GUARANTEES = ("at-least-once", "exactly-once", "at-least-once")
LABELS = ("at-least-once", "exactly-once", "at-least-once again")


def run_eos_contender(
    opts: BenchOptions, app: App, distinct: Sequence[bytes], server: ImageServer | None, stack_dir: Path
) -> dict[str, Any]:
    stack = LocalStack(stack_dir, broker="tansu")
    info = stack.start(kafka=True, redis=False)
    runs: list[dict[str, Any]] = []
    try:
        wopts = replace(opts, feed="kafka", load_levels=(50,))
        for guarantee in GUARANTEES:
            run = uuid.uuid4().hex[:8]
            names = {t.setting: f"bench-eos-{run}-{t.default}" for t in TOPICS}
            stack.create_topics([NewTopic(names[t.setting], t.partitions_for(opts.partitions), t.compacted)
                                 for t in TOPICS])  # fmt: skip
            settings = app.settings.model_copy(update={
                **names, "kafka_bootstrap_servers": info.kafka_bootstrap, "kafka_api_version": None,
                "kafka_group_id": f"moderator-bench-{run}", "processing_guarantee": guarantee,
                "transactional_id": f"moderator-bench-{run}", "banks_enabled": False,
                # Tansu's group joins take about half the session timeout
                "kafka_session_timeout_ms": 6_000, "kafka_heartbeat_interval_ms": 1_000,
            })  # fmt: skip
            out = run_worker_contender(wopts, App(settings, engine=app.engine), distinct, server, [])
            runs.append({"guarantee": guarantee, **out})
    finally:
        stack.stop()
    alo = (runs[0]["images_per_s"] + runs[2]["images_per_s"]) / 2
    eos = runs[1]
    return {
        "broker": f"tansu {info.kafka_version}",
        "at_least_once_images_per_s": round(alo, 2),
        "at_least_once_runs_images_per_s": [runs[0]["images_per_s"], runs[2]["images_per_s"]],
        "exactly_once_images_per_s": eos["images_per_s"],
        "exactly_once_vs_at_least_once": round(eos["images_per_s"] / alo, 4) if alo else None,
        "transaction_interval_ms": app.settings.transaction_interval_ms,
        "latency_at_50pct": {label: r["latency"][0] for label, r in zip(LABELS, runs, strict=True) if r["latency"]},
        "transaction_ms": eos["stages"].get("transaction", {}),
    }
