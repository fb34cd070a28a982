"""Effect of JPEG draft mode (DCT-domain downscaling while decoding) on speed and on scores.

    python benchmarks/jpeg_draft.py [--arch ViT-B/32] [--images 24]

Large photo-like JPEGs (1600x1200 to 4000x3000) are decoded and preprocessed with draft mode off
and on; reports decode+preprocess images/s of both, and the largest absolute change of a zero-shot
probability (12 labels) and of an embedding coordinate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from moderator.clip import ClipEngine, zero_shot_probs
from moderator.images import ImageLimits, load_image
from moderator.random_init import build_clip_checkpoint
from moderator.samples import jpeg_bytes, photo_like


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B/32")
    ap.add_argument("--images", type=int, default=24)
    args = ap.parse_args()
    engine = ClipEngine.load(str(build_clip_checkpoint(tempfile.mkdtemp(), args.arch)), device="cpu")
    sizes = [(1600, 1200), (2048, 1536), (3000, 2000), (4000, 3000)]
    images = [jpeg_bytes(photo_like(*sizes[i % 4], seed=i), quality=90) for i in range(args.images)]
    text = engine.encode_texts([f"This is a photo of label {i}." for i in range(12)])
    out = {}
    for draft in (False, True):
        limits = ImageLimits(jpeg_draft=draft)
        t0 = time.perf_counter()
        pixels = np.stack([load_image(d, limits, engine.spec) for d in images])
        out[draft] = (len(images) / (time.perf_counter() - t0), engine.encode_images(pixels))
    probs = [zero_shot_probs(out[d][1], text, engine.logit_scale) for d in (False, True)]
    print(json.dumps({
        "arch": args.arch, "images": len(images), "sizes": "1600x1200..4000x3000 JPEG q90",
        "decode_images_per_s_exact": round(out[False][0], 1), "decode_images_per_s_draft": round(out[True][0], 1),
        "max_abs_probability_change": float((probs[0] - probs[1]).abs().max()),
        "max_abs_embedding_change": float((out[False][1] - out[True][1]).abs().max()),
        "min_cosine_exact_vs_draft": float((out[False][1] * out[True][1]).sum(-1).min()),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
