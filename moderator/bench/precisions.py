"""Precisions side by side: the ceiling and the worker per image-tower precision, with the gate's figures.

In the run of the other contenders, one engine per precision asked for (``--precisions``; the CPU's
``auto``: float32, bfloat16 where the CPU multiplies bf16 natively, int8 where OpenVINO and NNCF are
installed), each loaded as ``moderator run`` loads it: the reduced tower built and checked against
fp32 on the probe set, then gated under the benchmark policy. Per precision:

- **ceiling**: the bare tower on pre-made tensors, measured in the run's three ceiling slices
  (interleaved with the other precisions' slices), median kept;
- **worker**: the whole worker on the same events (a backlog; the latency levels are measured for the
  main precision only), with its stage breakdown: where a goal is missed, it says which stage costs;
- **agreement**: the probe set's min and mean cosine with fp32, the decision agreement under the
  benchmark policy, and the precision that actually served (a gate failure serves fp32, and says so);
- **JPEG draft**: whether the worker of that precision decodes large JPEGs at a reduced DCT scale
  (``MODERATOR_IMAGE_JPEG_DRAFT=auto``: for the reduced precisions), and, through that precision's
  tower, the cosine of draft and exact embeddings and the agreement of their decisions under the
  benchmark policy, on the benchmark's distinct images.

Ratios are against the float32 ceiling of the same run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderator.app import App
from moderator.bench.measure import Result
from moderator.bench.options import BenchOptions
from moderator.clip import ClipEngine
from moderator.images import ImageLimits, load_image
from moderator.policy import CompiledPolicy
from moderator.precision import PRECISIONS, native_bf16


def available_precisions(device: torch.device, dtype: str) -> tuple[str, ...]:
    """What ``--precisions auto`` measures: on the CPU float32, bfloat16 where native, int8 where
    OpenVINO and NNCF are installed; on an accelerator, the ``--dtype`` alone."""
    if device.type != "cpu":
        return (dtype,)
    out = ["float32"]
    if native_bf16():
        out.append("bfloat16")
    if importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None:
        out.append("int8")
    return tuple(out)


@dataclass
class PrecisionRun:
    """One precision's engine, its app (settings, gated policies, worker) and what was measured."""

    requested: str
    engine: ClipEngine
    app: App
    slices: list[Result] = field(default_factory=list)
    worker: dict[str, Any] | None = None
    jpeg_draft: dict[str, Any] | None = None

    def gate(self) -> dict[str, Any]:
        e, s = self.engine, self.app.settings
        out: dict[str, Any] = {"serving": e.precision, "image_tower": e.image_tower}
        if e.probe is not None:
            out.update(e.probe.figures(), min_cosine_floor=s.precision_min_cosine,
                       min_agreement_floor=s.precision_min_agreement, agreement=dict(self.app.gate.last))  # fmt: skip
        if e.fallback_reason:
            out["fallback"] = e.fallback_reason
        return out

    def ceiling(self) -> dict[str, Any] | None:
        if not self.slices:
            return None
        median = sorted(self.slices, key=lambda r: r.images_per_s)[len(self.slices) // 2]
        return median.to_dict() | {"slices_images_per_s": [round(r.images_per_s, 2) for r in self.slices]}


def load_precisions(opts: BenchOptions, model_id: str, main: ClipEngine, app: App) -> dict[str, PrecisionRun]:
    """The main engine under its precision, and one more engine per other precision asked for; every
    app's policies loaded (so each reduced precision is gated before anything is measured)."""
    runs: dict[str, PrecisionRun] = {main.requested_precision: PrecisionRun(main.requested_precision, main, app)}
    for precision in opts.precisions:
        if precision in runs:
            continue
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        s = app.settings
        engine = ClipEngine.load(
            model_id, device=str(main.device), dtype=precision, max_batch_size=opts.batch,
            local_files_only=not Path(model_id).is_dir(), min_cosine=s.precision_min_cosine,
            probe_images=s.precision_probe_images, int8_calibration_images=s.int8_calibration_images,
            int8_calibration_dir=s.int8_calibration_dir, int8_smooth_quant_alpha=s.int8_smooth_quant_alpha,
        )  # fmt: skip
        runs[precision] = PrecisionRun(precision, engine, App(app.settings, engine=engine))
    for run in runs.values():
        run.app.policies  # noqa: B018  (loads and gates them)
    return runs


def draft_agreement(run: PrecisionRun, policy: CompiledPolicy, images: Sequence[bytes]) -> dict[str, Any]:
    """How the worker of ``run`` decodes JPEGs against exact decoding, through its tower: whether draft
    decoding is on for it, the embeddings' cosine, the decisions' agreement under ``policy``."""
    limits = ImageLimits.from_settings(run.app.settings, run.engine.precision)
    out: dict[str, Any] = {"on": limits.jpeg_draft, "images": len(images)}
    if not limits.jpeg_draft or not images:
        return out
    spec, tower = run.engine.spec, run.engine.tower
    exact = run.engine.encode_images(np.stack([load_image(d, ImageLimits(), spec) for d in images]), tower)
    draft = run.engine.encode_images(np.stack([load_image(d, limits, spec) for d in images]), tower)
    cosine = (exact * draft).sum(dim=1)
    same = [a.decision == b.decision for a, b in zip(policy.decisions(exact), policy.decisions(draft), strict=True)]
    return out | {"min_cosine": round(float(cosine.min()), 6), "mean_cosine": round(float(cosine.mean()), 6),
                  "agreement": round(sum(same) / len(same), 4)}  # fmt: skip


def worker_options(opts: BenchOptions) -> BenchOptions:
    """A further precision's worker: the backlog only (the latency levels are the main precision's)."""
    return replace(opts, load_levels=())


def precisions_report(runs: dict[str, PrecisionRun]) -> dict[str, Any]:
    fp32 = runs.get("float32")
    base = fp32.ceiling() if fp32 is not None else None
    base_rate = base["images_per_s"] if base else None
    out: dict[str, Any] = {}
    for precision, run in runs.items():
        entry: dict[str, Any] = {"requested": precision, "gate": run.gate()}
        ceiling = run.ceiling()
        if ceiling is not None:
            entry["ceiling"] = ceiling
        if run.worker is not None:
            entry["worker"] = run.worker
        if run.jpeg_draft is not None:
            entry["jpeg_draft"] = run.jpeg_draft
        if base_rate:
            for what in ("ceiling", "worker"):
                rate = entry.get(what, {}).get("images_per_s")
                if rate:
                    entry[f"{what}_over_float32_ceiling"] = round(rate / base_rate, 3)
        own, worker = (ceiling or {}).get("images_per_s"), entry.get("worker", {}).get("images_per_s")
        if own and worker:  # how much of its own tower's speed the worker keeps
            entry["worker_over_own_ceiling"] = round(worker / own, 3)
        out[precision] = entry
    return out
