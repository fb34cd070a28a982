"""Engine vs the reference zero-shot pipeline, in one process, on the same weights and images.

    python benchmarks/engine_vs_reference.py [--arch ViT-B/32] [--images 64] [--labels 12] [--batch 32]

reference: transformers.pipeline("zero-shot-image-classification") called once per image (what a
team would write without moderator). engine: decode on a thread pool + batched image tower + one
matrix product against cached text embeddings. Reports images/s of both and the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from moderator.clip import ClipEngine, zero_shot_probs
from moderator.images import ImageLimits, ImageLoader
from moderator.testing import build_clip_checkpoint, jpeg_bytes, photo_like


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B/32")
    ap.add_argument("--model-dir", help="an existing checkpoint directory (default: random weights of --arch)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--reference-images", type=int, default=24)
    ap.add_argument("--labels", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    model_dir = args.model_dir or build_clip_checkpoint(tempfile.mkdtemp(prefix="bench-clip-"), args.arch)
    images = [jpeg_bytes(photo_like(640, 480, seed=i)) for i in range(args.images)]
    labels = [f"label number {i}" for i in range(args.labels)]

    pipe = pipeline("zero-shot-image-classification", model=str(model_dir), device="cpu", dtype=torch.float32)
    pipe(Image.open(io.BytesIO(images[0])), candidate_labels=labels)  # warm-up
    t0 = time.perf_counter()
    for data in images[: args.reference_images]:
        pipe(Image.open(io.BytesIO(data)), candidate_labels=labels)
    reference = args.reference_images / (time.perf_counter() - t0)

    engine = ClipEngine.load(str(model_dir), device="cpu", dtype="float32", max_batch_size=args.batch)
    loader = ImageLoader(ImageLimits(), engine.spec, threads=2)
    text = engine.encode_texts([f"This is a photo of {lb}." for lb in labels])
    t0 = time.perf_counter()
    background = ThreadPoolExecutor(1)  # orchestrates the next batch's decode (which uses the loader's pool)
    pending = background.submit(loader.load_many, images[: args.batch])
    for start in range(0, len(images), args.batch):
        batch = pending.result()
        nxt = start + args.batch
        if nxt < len(images):  # decode the next batch while the model runs this one
            pending = background.submit(loader.load_many, images[nxt : nxt + args.batch])
        zero_shot_probs(engine.encode_images(np.stack(batch)), text, engine.logit_scale).cpu()
    engine_rate = len(images) / (time.perf_counter() - t0)
    loader.close()
    result = {
        "arch": args.arch, "threads": torch.get_num_threads(), "labels": args.labels, "batch": args.batch,
        "input": "640x480 JPEG", "reference_images_per_s": round(reference, 2),
        "engine_images_per_s": round(engine_rate, 2), "engine_over_reference": round(engine_rate / reference, 2),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
