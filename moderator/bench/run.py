"""The whole benchmark: every contender and sweep asked for, one process, one report."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from moderator import clients
from moderator.app import App
from moderator.bench.animated_run import run_animated_contender
from moderator.bench.banks_run import run_banks_contender
from moderator.bench.eos_run import run_eos_contender
from moderator.bench.http_run import run_http_contender
from moderator.bench.inputs import ImageServer, bench_policy, make_images, prompt_bank
from moderator.bench.measure import (
    Result,
    make_reference,
    prompt_tokens,
    run_ceiling,
    run_engine,
    run_reference,
    sweep_batch,
    sweep_prompts,
)
from moderator.bench.options import BenchOptions
from moderator.bench.precisions import (
    PrecisionRun,
    draft_agreement,
    load_precisions,
    precisions_report,
    worker_options,
)
from moderator.bench.replay_run import run_replay_contender
from moderator.bench.worker_run import run_worker_contender
from moderator.clip import PIPELINE_TEMPLATE, SUPPORTED_CHECKPOINTS, ClipEngine, checkpoint_available, zero_shot_probs
from moderator.config import load_settings
from moderator.images import ImageLimits, ImageLoader
from moderator.random_init import cached_random_checkpoint, is_random_init
from moderator.stack import LocalStack, default_cache_dir
from moderator.topics import TOPICS, NewTopic


def resolve_model(opts: BenchOptions) -> tuple[str, str]:
    """(what to load, where the reference pipeline loads it from): the named checkpoint, the arch's
    real checkpoint when it is in the local Hugging Face cache, else random weights of the arch."""
    if opts.model:
        return opts.model, _local_path(opts.model)
    real = next((c.model_id for c in SUPPORTED_CHECKPOINTS.values() if c.architecture == opts.arch), None)
    if real is not None and checkpoint_available(real):
        return real, _local_path(real)
    path = str(cached_random_checkpoint(default_cache_dir(), opts.arch))
    return path, path


def _local_path(model: str) -> str:
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    from huggingface_hub import snapshot_download

    return snapshot_download(model, local_files_only=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_jiffies() -> tuple[int, int] | None:
    """(all CPU time, the part the hypervisor took: steal) from ``/proc/stat``, in clock ticks; None
    where there is no such file."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7]


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time the hypervisor gave to others between two readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return round((after[1] - before[1]) / (after[0] - before[0]), 3)


def _machine(engine: ClipEngine) -> dict[str, Any]:
    import transformers

    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(engine.device)}  # fmt: skip
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


def run_bench(
    opts: BenchOptions,
    progress: Callable[[str], None] = lambda s: None,
    create_topics: Callable[[list[NewTopic]], None] | None = None,
) -> dict[str, Any]:
    """Run every contender and sweep asked for; return the report (see ``report.render_table``).

    ``create_topics(topics)`` makes the benchmark's topics on an existing broker (default: the
    CreateTopics API, Kafka >= 0.10.1); a local stack makes its own.
    """
    opts.check()
    jiffies = cpu_jiffies()
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="moderator-bench-"))
    progress("model")
    model_id, model_path = resolve_model(opts)
    gate = load_settings()  # the precision gate's floors and probe size, the int8 calibration (MODERATOR_*)
    engine = ClipEngine.load(model_id, device=opts.device, dtype=opts.dtype, max_batch_size=opts.batch,
                             local_files_only=not Path(model_id).is_dir(), min_cosine=gate.precision_min_cosine,
                             probe_images=gate.precision_probe_images,
                             int8_calibration_images=gate.int8_calibration_images,
                             int8_calibration_dir=gate.int8_calibration_dir,
                             int8_smooth_quant_alpha=gate.int8_smooth_quant_alpha)  # fmt: skip
    random_init = is_random_init(model_path) is not None
    if random_init:
        notes.append(f"random weights of the {opts.arch} architecture (no real checkpoint in the local cache):"
                     " speed is the real architecture's, decisions are meaningless")  # fmt: skip
    progress("images")
    distinct = make_images(opts.sizes, min(opts.distinct, max(opts.images, 1)), opts.seed, opts.threads)
    images = [distinct[i % len(distinct)] for i in range(opts.images)]
    texts = prompt_bank(opts.prompts)
    policy_dir = tmp / "policies"
    policy_dir.mkdir()
    (policy_dir / "bench.yaml").write_text(yaml.safe_dump(bench_policy(texts).model_dump(mode="json"), sort_keys=False))

    stack: LocalStack | None = None
    server: ImageServer | None = None
    loader = ImageLoader(ImageLimits(), engine.spec, opts.threads)
    report: dict[str, Any] = {}
    try:
        overrides: dict[str, Any] = {"redis_enabled": False}
        if opts.needs_kafka:
            progress("stack")
            stack, overrides, create_topics = _kafka_and_redis(opts, tmp / "stack", create_topics)
        if opts.source == "url":
            server = ImageServer(distinct, tmp / "images")
            overrides["fetch_allow_networks"] = ("127.0.0.0/8",)
        settings = load_settings(
            **overrides, model_id=model_id, device=str(engine.device), policy_dir=policy_dir, default_policy="bench",
            max_batch_size=opts.batch, max_delay_ms=opts.max_delay_ms, decode_threads=opts.threads,
            decode_schedule=opts.decode_schedule,
            max_in_flight=max(256, 4 * opts.batch), kafka_group_id=f"moderator-bench-{uuid.uuid4().hex[:8]}",
            http_port=0, log_level="WARNING",
        )  # fmt: skip
        app = App(settings, engine=engine)
        runs: dict[str, PrecisionRun] = {}
        if opts.precisions:
            progress("precisions: " + ", ".join(opts.precisions))
            runs = load_precisions(opts, model_id, engine, app)
        encoder = app.encoder
        t0 = time.perf_counter()
        policy = app.compile(bench_policy(texts))
        compile_s = time.perf_counter() - t0

        sizes = [f"{w}x{h}" + (f":{k}" if len(opts.sizes) > 1 else "") for w, h, k in opts.sizes]
        report = {
            "config": {k: v for k, v in asdict(opts).items() if k not in ("kafka_bootstrap", "redis_url")},
            "machine": _machine(engine),
            "model": {"id": model_id, "fingerprint": engine.fingerprint, "architecture": opts.arch,
                      "random_init": random_init, "dtype": engine.precision, "image_tower": engine.image_tower},
            "inputs": {"sizes": sizes, "distinct_images": len(distinct),
                       "mean_jpeg_bytes": int(np.mean([len(d) for d in distinct])), "source": opts.source,
                       "prompts": len(texts), "prompt_template": PIPELINE_TEMPLATE,
                       "mean_prompt_tokens": prompt_tokens(engine, [PIPELINE_TEMPLATE.format(t) for t in texts]),
                       "policy_compile_s": round(compile_s, 3)},
            "contenders": {}, "ratios": {}, "sweeps": {}, "notes": notes,
        }  # fmt: skip
        contenders: dict[str, Any] = report["contenders"]
        h, w = engine.spec.output_hw
        batch_pixels = loader.batch(images[: opts.batch])
        if len(batch_pixels) < opts.batch:  # fewer images than one batch: repeat them
            batch_pixels = np.resize(batch_pixels, (opts.batch, h, w, 3))

        # The ceiling is measured in three slices (first, before the worker, last) and the median
        # kept, so that a slow or fast spell of a shared machine does not skew every ratio.
        slices: list[Result] = []

        def ceiling_slice() -> None:
            if "ceiling" in opts.contenders:
                progress("ceiling")
                slices.append(run_ceiling(engine, batch_pixels, opts.ceiling_batches))
                for run in runs.values():  # each precision's slice beside it (the main one's is the same)
                    run.slices.append(slices[-1] if run.engine is engine else
                                      run_ceiling(run.engine, batch_pixels, opts.ceiling_batches))  # fmt: skip

        ceiling_slice()
        if "engine" in opts.contenders:
            progress("engine")
            contenders["engine"] = run_engine(
                engine, policy, images, opts.batch, loader, opts.decode_schedule
            ).to_dict()
        reference = None
        if "reference" in opts.contenders or opts.sweep_prompts:
            reference = make_reference(model_path, engine)
        if "reference" in opts.contenders:
            progress("reference")
            ref_images = images[: opts.reference_images]
            ref = run_reference(reference, engine.device, ref_images, texts)
            theirs = np.array([[s[t] for t in policy.texts] for s in ref.extra.pop("scores")])
            ours = zero_shot_probs(engine.encode_images(loader.batch(ref_images)),
                                   policy.matrix.T, engine.logit_scale).cpu().numpy()  # fmt: skip
            contenders["reference"] = ref.to_dict() | {
                "max_abs_probability_difference_vs_engine": float(np.abs(ours - theirs).max())
            }
        ceiling_slice()
        if "worker" in opts.contenders:
            progress("worker")
            contenders["worker"] = run_worker_contender(opts, app, distinct, server, notes)
        if "replay" in opts.contenders:
            progress("replay")
            assert create_topics is not None
            contenders["replay"] = run_replay_contender(opts, app, policy, policy_dir, contenders.get("worker"),
                                                        create_topics)  # fmt: skip
        if "banks" in opts.contenders:  # after the replay: the replay's "same events" are the worker's alone
            contenders["banks"] = run_banks_contender(opts, app, bench_policy(texts), distinct, server, tmp, progress)
        if "animated" in opts.contenders:
            progress("animated: worker, stills; a 10% animated mix; stills again")
            contenders["animated"] = run_animated_contender(opts, app, distinct, server)
        if "eos" in opts.contenders:
            progress("eos: a Tansu broker; the worker at-least-once, exactly-once, at-least-once again")
            contenders["eos"] = run_eos_contender(opts, app, distinct, server, tmp / "tansu")
        if "http" in opts.contenders:
            progress("http")
            contenders["http"] = run_http_contender(opts, app, distinct, server, notes)
        for p, run in runs.items():
            run.jpeg_draft = draft_agreement(run, policy, distinct)
            if "worker" in opts.contenders:
                if run.engine is engine:
                    run.worker = contenders["worker"]
                else:
                    progress(f"worker, {p}")
                    run.worker = run_worker_contender(worker_options(opts), run.app, distinct, server, [])
        ceiling_slice()
        if slices:
            median = sorted(slices, key=lambda r: r.images_per_s)[len(slices) // 2]
            contenders["ceiling"] = median.to_dict() | {
                "slices_images_per_s": [round(r.images_per_s, 2) for r in slices]
            }

        if opts.sweep_batch:
            progress("sweep: batch size")
            report["sweeps"]["batch"] = sweep_batch(engine, policy, images, loader, opts)
        if opts.sweep_prompts:
            progress("sweep: prompts")
            report["sweeps"]["prompts"] = sweep_prompts(engine, encoder, reference, images, loader, opts)
        report["ratios"] = ratios(contenders)
        steal = steal_share(jiffies, cpu_jiffies())
        report["machine"]["steal_share"] = steal
        if steal is not None and steal >= 0.05:
            notes.append(f"the hypervisor gave {steal:.0%} of this machine's CPU time to others during the run"
                         " (steal, /proc/stat): every figure is slower than the machine's own, and ratios of"
                         " contenders measured at different times are noisy; run again when it is quiet")  # fmt: skip
        if runs:
            report["precisions"] = precisions_report(runs)
    finally:
        loader.close()
        if server is not None:
            server.close()
        if stack is not None:
            stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _kafka_and_redis(
    opts: BenchOptions, stack_dir: Path, create_topics: Callable[[list[NewTopic]], None] | None
) -> tuple[LocalStack | None, dict[str, Any], Callable[[list[NewTopic]], None]]:
    """The worker's services: the ones named in ``opts``, a local stack for the others; fresh
    topics. Returns the stack (to stop), the settings that point at all of it, and how to make topics."""
    stack, overrides = None, {}
    if opts.kafka_bootstrap is None or opts.redis_url is None:
        stack = LocalStack(stack_dir)
        info = stack.start(kafka=opts.kafka_bootstrap is None, redis=opts.redis_url is None)
        overrides.update(info.settings_overrides())
    if opts.kafka_bootstrap is not None:
        overrides.update(kafka_bootstrap_servers=opts.kafka_bootstrap, kafka_api_version=opts.kafka_api_version)
    if opts.redis_url is not None:
        overrides["redis_url"] = opts.redis_url
    run = uuid.uuid4().hex[:8]
    names = {t.setting: f"bench-{run}-{t.default}" for t in TOPICS}  # fresh topics, every one of the registry
    topics = [NewTopic(names[t.setting], t.partitions_for(opts.partitions), t.compacted) for t in TOPICS]
    if stack is not None and stack.kafka_running:
        create_topics = stack.create_topics
    elif create_topics is None:
        bootstrap, api = str(overrides["kafka_bootstrap_servers"]), opts.kafka_api_version
        create_topics = lambda new: clients.create_topics(bootstrap, api, new)  # noqa: E731
    try:
        create_topics(topics)
    except BaseException:
        if stack is not None:
            stack.stop()
        raise
    settings = {**overrides, **names, "redis_key_prefix": "moderator-bench:emb:"}  # text embeddings shared by runs
    return stack, settings, create_topics


def ratios(contenders: dict[str, Any]) -> dict[str, float]:
    rate = {k: v["images_per_s"] for k, v in contenders.items() if v.get("images_per_s")}  # (http: none of its own)
    out = {}
    for a, b in (("worker", "ceiling"), ("worker", "reference"), ("engine", "reference"), ("engine", "ceiling"),
                 ("worker", "engine")):  # fmt: skip
        if a in rate and b in rate:
            out[f"{a}_over_{b}"] = round(rate[a] / rate[b], 3)
    return out
