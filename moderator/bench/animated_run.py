"""The animated contender: what sampled frames cost the worker against stills only, in one run.

The whole worker on the benchmark's events three times: stills only, then a mix where one input in
ten is an animated GIF of ``FRAMES`` frames (the same size as the stills, every frame a sampled one),
then stills again; the stills figure is the mean of the two, so that a slow or fast spell of a shared
machine does not pass for the frames' cost. Inputs per second and model rows (frames) per second are
both reported: an 8-frame GIF is 8 rows of the image tower, so the mix's 10% animated inputs are
about 44% of its rows.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from moderator.app import App
from moderator.bench.inputs import ImageServer
from moderator.bench.options import BenchOptions
from moderator.bench.precisions import worker_options
from moderator.bench.worker_run import run_worker_contender
from moderator.samples import animation_bytes

FRAMES = 8
ANIMATED_EVERY = 10  # one input in ten


def animated_mix(distinct: Sequence[bytes]) -> tuple[list[bytes], float]:
    """The distinct inputs with one in ten replaced by a GIF of ``FRAMES`` distinct frames (made of the
    stills that follow it), and the mean model rows per input of the mix."""
    stills = [Image.open(io.BytesIO(d)).convert("RGB") for d in distinct]
    out = list(distinct)
    animated = 0
    for i in range(0, len(out), ANIMATED_EVERY):
        frames = [stills[(i + k) % len(stills)] for k in range(FRAMES)]
        size = frames[0].size
        out[i] = animation_bytes([np.asarray(f.resize(size)) for f in frames], "GIF", 100)
        animated += 1
    return out, (len(out) - animated + animated * FRAMES) / len(out)


def run_animated_contender(
    opts: BenchOptions, app: App, distinct: Sequence[bytes], server: ImageServer | None
) -> dict[str, Any]:
    mix, rows_per_input = animated_mix(distinct)
    wopts = worker_options(opts)
    before = run_worker_contender(wopts, app, distinct, server, [])
    mixed = run_worker_contender(wopts, app, mix, server, [])
    after = run_worker_contender(wopts, app, distinct, server, [])
    stills = (before["images_per_s"] + after["images_per_s"]) / 2

    def stages(run: dict[str, Any]) -> dict[str, float]:
        return {k: v["ms_per_image"] for k, v in run.get("stages", {}).items()
                if k in ("decode", "preprocess", "pdq", "forward", "score")}  # fmt: skip

    return {
        "stills_images_per_s": round(stills, 2),
        "stills_runs_images_per_s": [before["images_per_s"], after["images_per_s"]],
        "mix_images_per_s": mixed["images_per_s"],
        "mix_rows_per_s": round(mixed["images_per_s"] * rows_per_input, 2),
        "mix_vs_stills": round(mixed["images_per_s"] / stills, 4) if stills else None,
        "rows_per_input": round(rows_per_input, 3),
        "mix": f"1 input in {ANIMATED_EVERY} an animated GIF of {FRAMES} frames (each one a sampled frame)",
        "stages_ms_per_input": {"stills": stages(before), "mix": stages(mixed)},
    }
