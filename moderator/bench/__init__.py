"""``moderator bench``: the reference pipeline, the engine, the whole worker and the ceiling, side by side.

One process, one machine, the same weights and the same images for every contender:

- **reference**: ``transformers.pipeline("zero-shot-image-classification")`` called once per image
  with the policy's prompts as candidate labels: what a team would write without moderator;
- **engine**: JPEG bytes decoded on a thread pool on the worker's schedule (on the CPU each batch
  just before its forward, on a GPU one batch ahead), the batched image tower, the compiled policy
  (text embeddings computed once, cached);
- **worker**: :class:`moderator.worker.Worker` end to end: events produced to the real Kafka,
  decisions consumed from it, Redis as the text cache (``feed="kafka"``); or, on a machine without
  a broker, the same worker fed from an in-process queue (``feed="queue"``,
  :class:`~moderator.worker.feed.QueueFeed`);
- **ceiling**: the bare image tower at the same batch size and precision on pre-made device
  tensors: the most any pipeline could reach on this hardware with this model.

Per contender: images/s; for the engine and the worker, a per-stage breakdown read from
``moderator_stage_seconds`` (the metric production workers export); for the worker, produce-to-
decision latency at fixed offered loads. Sweeps: throughput vs batch size, vs number of prompts,
and latency vs offered load. The result is a table on stdout and a JSON document with every figure.

Modules: ``options.py`` (what to run), ``inputs.py`` (images, prompts, events), ``measure.py`` (one
contender at a time, sweeps), ``worker_run.py`` (the worker contender), ``run.py`` (the whole run),
``report.py`` (the table), ``cli.py``.
"""

from moderator.bench.options import BenchError, BenchOptions
from moderator.bench.report import render_table
from moderator.bench.run import run_bench

__all__ = ["BenchError", "BenchOptions", "render_table", "run_bench"]
