"""Measuring one contender: the engine, the reference pipeline, the ceiling; stage accounting; sweeps."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moderator import observability as obs
from moderator.bench.inputs import bench_policy, prompt_bank
from moderator.bench.options import BenchError, BenchOptions
from moderator.clip import ClipEngine, synchronize
from moderator.embedding_cache import TextEncoder
from moderator.images import ImageError, ImageLoader
from moderator.policy import CompiledPolicy, compile_policy
from moderator.worker.stages import decode_schedule

STAGES = ("fetch", "decode", "preprocess", "pdq", "transfer", "forward", "banks", "score", "publish", "produce",
          "commit", "transaction")  # fmt: skip
ENGINE_THREAD_STAGES = ("transfer", "forward", "banks", "score", "publish")  # the model's part of the engine thread


def stage_totals() -> dict[str, tuple[float, float]]:
    """``moderator_stage_seconds``: stage -> (count, seconds), cumulative since the process started."""
    out: dict[str, list[float]] = {}
    for metric in obs.STAGE_SECONDS.collect():
        for sample in metric.samples:
            stage = sample.labels.get("stage")
            if stage is None:
                continue
            if sample.name.endswith("_count"):
                out.setdefault(stage, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(stage, [0.0, 0.0])[1] = sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_breakdown(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], images: int
) -> dict[str, dict[str, float]]:
    """Per stage, what happened between two :func:`stage_totals`: count, seconds, ms per image."""
    out = {}
    for stage in STAGES:
        count = after.get(stage, (0.0, 0.0))[0] - before.get(stage, (0.0, 0.0))[0]
        seconds = after.get(stage, (0.0, 0.0))[1] - before.get(stage, (0.0, 0.0))[1]
        if count > 0:
            out[stage] = {"count": round(count), "seconds": round(seconds, 4),
                          "ms_per_image": round(1000 * seconds / max(images, 1), 3)}  # fmt: skip
    return out


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    if len(seconds) == 0:
        return {}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)} | {
        "max_ms": round(float(ms.max()), 1)
    }


@dataclass
class Result:
    images: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"images_per_s": round(self.images_per_s, 2), "images": self.images,
                "seconds": round(self.seconds, 3), **self.extra}  # fmt: skip


def run_ceiling(engine: ClipEngine, pixels: np.ndarray, batches: int) -> Result:
    """The bare image tower serving now on a pre-made, normalized device tensor of one batch, ``batches``
    times (the normalized fp32 pixels go in: each tower casts them to its own precision itself)."""
    tower = engine.tower
    with torch.inference_mode():
        x = engine.pixel_values(pixels)
        tower(x)  # warm-up at this shape
        synchronize(engine.device)
        t0 = time.perf_counter()
        for _ in range(batches):
            tower(x)
        synchronize(engine.device)
        seconds = time.perf_counter() - t0
    return Result(batches * len(pixels), seconds, {"batch": len(pixels), "image_precision": tower.precision})


def run_engine(
    engine: ClipEngine, policy: CompiledPolicy, images: Sequence[bytes], batch: int, loader: ImageLoader, schedule: str
) -> Result:
    """JPEG bytes to decisions, batched, decoding as the worker would (``schedule``, see
    :func:`moderator.worker.stages.decode_schedule`): each batch just before its forward, or one batch
    ahead beside the model (overlap: on the loader's pool; pipelined: on a pool at idle priority, beside a
    tower that runs a batch in one native call only)."""
    mode = decode_schedule(schedule, engine.device)
    if mode == "pipelined" and not engine.tower.one_call:
        mode = "before_forward"  # as the worker: decoding ahead stalls a tower that dispatches from Python
    ahead = None if mode == "before_forward" else loader
    if mode == "pipelined":
        ahead = ImageLoader(loader.limits, loader.spec, loader.threads, idle=True)

    def load(chunk: Sequence[bytes], on: ImageLoader) -> np.ndarray:
        try:
            return on.batch(chunk)
        except ImageError as exc:
            raise BenchError(f"a benchmark image failed to decode: {exc}") from None

    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    policy.decisions(engine.encode_images(load(chunks[0], loader)))  # warm-up at this batch size
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="bench-prefetch")
    try:
        before = stage_totals()
        t0 = time.perf_counter()
        pending = prefetch.submit(load, chunks[0], ahead) if ahead is not None else None
        decided = 0
        for k, chunk in enumerate(chunks):
            if pending is not None:
                pixels = pending.result()
                if k + 1 < len(chunks) and ahead is not None:
                    pending = prefetch.submit(load, chunks[k + 1], ahead)
            else:
                pixels = load(chunk, loader)
            decided += len(policy.decisions(engine.encode_images(pixels)))
        seconds = time.perf_counter() - t0
        after = stage_totals()
    finally:
        prefetch.shutdown(wait=True)
        if ahead is not None and ahead is not loader:
            ahead.close()
    assert decided == len(images)
    extra = {"batch": batch, "decode": mode}
    return Result(len(images), seconds, extra | {"stages": stage_breakdown(before, after, len(images))})


def make_reference(model_path: str, engine: ClipEngine) -> Any:
    """The reference: ``transformers.pipeline`` on the same weights, device and precision."""
    from transformers import pipeline

    return pipeline("zero-shot-image-classification", model=model_path, device=engine.device, dtype=engine.dtype)


def run_reference(pipe: Any, device: torch.device, images: Sequence[bytes], texts: Sequence[str]) -> Result:
    """The pipeline once per image, the policy's texts as candidate labels, its default template
    (``extra["scores"]``: per image, label -> probability)."""
    from PIL import Image

    labels = list(texts)

    def call(data: bytes) -> dict[str, float]:
        out = pipe(Image.open(io.BytesIO(data)), candidate_labels=labels)  # as a team would call it
        return {r["label"]: float(r["score"]) for r in out}

    call(images[0])  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    scores = [call(d) for d in images]
    synchronize(device)
    return Result(len(images), time.perf_counter() - t0, {"scores": scores})


def prompt_tokens(engine: ClipEngine, texts: Sequence[str]) -> float:
    """Mean tokens per prompt, start and end included (the reference's text-tower cost grows with it)."""
    ids = engine.tokenizer(list(texts), truncation=True, max_length=engine.max_text_tokens)["input_ids"]
    return round(float(np.mean([len(i) for i in ids])), 2)


def sweep_batch(engine: ClipEngine, policy: CompiledPolicy, images: Sequence[bytes], loader: ImageLoader,
                opts: BenchOptions) -> list[dict[str, Any]]:  # fmt: skip
    """Engine and ceiling images/s at each batch size (same images, cycled to at least 2 batches)."""
    out = []
    saved = engine.max_batch_size
    try:
        for b in opts.sweep_batch:
            engine.max_batch_size = b
            n = max(2 * b, min(len(images), 4 * opts.batch))
            subset = [images[i % len(images)] for i in range(n)]
            pixels = loader.batch(subset[:b])
            eng = run_engine(engine, policy, subset, b, loader, opts.decode_schedule)
            ceil = run_ceiling(engine, pixels, max(2, opts.ceiling_batches * opts.batch // b))
            out.append({"batch": b, "engine_images_per_s": round(eng.images_per_s, 2),
                        "ceiling_images_per_s": round(ceil.images_per_s, 2),
                        "engine_over_ceiling": round(eng.images_per_s / ceil.images_per_s, 3)})  # fmt: skip
    finally:
        engine.max_batch_size = saved
    return out


def sweep_prompts(engine: ClipEngine, encoder: TextEncoder, reference: Any, images: Sequence[bytes],
                  loader: ImageLoader, opts: BenchOptions) -> list[dict[str, Any]]:  # fmt: skip
    """Engine images/s as the policy grows (its text matrix is compiled once, through the cache), and
    the reference's images/s with the same prompts as candidate labels (on a few images)."""
    out = []
    n_engine = min(len(images), 4 * opts.batch)
    for p in opts.sweep_prompts:
        texts = prompt_bank(p)
        spec = bench_policy(texts, name=f"bench-{p}")
        encoded = encoder.texts_encoded
        t0 = time.perf_counter()
        policy = compile_policy(spec, encoder)
        cold, encoded_cold = time.perf_counter() - t0, encoder.texts_encoded - encoded
        t0 = time.perf_counter()
        compile_policy(spec, encoder)
        warm, encoded_warm = time.perf_counter() - t0, encoder.texts_encoded - encoded - encoded_cold
        eng = run_engine(engine, policy, images[:n_engine], opts.batch, loader, opts.decode_schedule)
        ref = run_reference(reference, engine.device, images[: max(2, min(8, opts.reference_images // 4))], texts)
        out.append({"prompts": p, "engine_images_per_s": round(eng.images_per_s, 2),
                    "reference_images_per_s": round(ref.images_per_s, 3),
                    "engine_over_reference": round(eng.images_per_s / ref.images_per_s, 2),
                    "compile_s_first": round(cold, 3), "compile_s_again": round(warm, 4),
                    "texts_encoded_first": encoded_cold, "texts_encoded_again": encoded_warm})  # fmt: skip
    return out
