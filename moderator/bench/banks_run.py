"""The banks contender: what known-image banks cost the worker, and what their parts cost.

- **worker with a bank**: the whole worker on the same events with no bank, with a bank of each size
  asked for (``--bank-sizes``, default 10,000 and 100,000 entries: each a PDQ hash and an embedding of
  the model), and with no bank again; the no-bank figure is the mean of the two, so that a slow or fast
  spell of a shared machine does not pass for the bank's cost. The bank policy is the benchmark's
  policy with one bank rule (PDQ <= 31 bits, cosine >= 0.95). Entries are random hashes and random
  unit vectors (no match), plus the PDQ hashes of one distinct image in 64 (they match, so the hit path
  runs): random weights put every image's embedding near every other's, so planted embeddings would
  match everything and measure nothing real.
- **PDQ per image**: hashing the decoded benchmark images (all 8 rotations and mirrors), one thread.
- **search per batch**: one batch's images (8 hashes each) against N hashes, FAISS's binary index and
  numpy's vectorised popcount side by side (where is the crossover?), and the batch's embeddings
  against N embeddings.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from moderator.app import App
from moderator.banks.index import BankIndex, Entry, hamming_pairs
from moderator.banks.pdq import PdqHash, hash_image
from moderator.banks.store import FixedBanks
from moderator.bench.inputs import ImageServer
from moderator.bench.options import BenchOptions
from moderator.bench.precisions import worker_options
from moderator.bench.worker_run import run_worker_contender
from moderator.policy import PolicySpec

BANK = "bench-bank"
PLANT_EVERY = 64
SEARCH_SIZES = (1_000, 10_000, 100_000)


def synthetic_bank(size: int, dim: int, model: str, planted: Sequence[PdqHash], seed: int = 0) -> BankIndex:
    """``size`` entries: random PDQ hashes and random unit embeddings of ``model``, the planted hashes first."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 256, size=(size, 32), dtype=np.uint8)
    vectors = rng.standard_normal((size, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    halves = vectors.astype(np.float16)
    for i, h in enumerate(planted[:size]):
        hashes[i] = h.variants[0]
    return BankIndex([Entry(BANK, f"e{i}", "", hashes[i], halves[i], model) for i in range(size)], model)


def _decoded(distinct: Sequence[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(d)).convert("RGB") for d in distinct]


def pdq_cost(images: Sequence[Image.Image]) -> dict[str, Any]:
    hash_image(images[0])  # warm-up
    t0 = time.perf_counter()
    for img in images:
        hash_image(img)
    per = (time.perf_counter() - t0) / len(images)
    return {
        "ms_per_image": round(per * 1000, 3),
        "images": len(images),
        "size": f"{images[0].width}x{images[0].height}",
    }


def search_costs(batch: int, dim: int, sizes: Sequence[int] = SEARCH_SIZES, repeats: int = 5) -> list[dict[str, Any]]:
    """ms per batch of ``batch`` images (8 hashes each; their embeddings) against banks of each size."""
    rng = np.random.default_rng(1)
    queries = [PdqHash(rng.integers(0, 256, size=(8, 32), dtype=np.uint8), 100) for _ in range(batch)]
    flat = np.concatenate([q.variants for q in queries])
    embeds = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)
    out = []
    for size in sizes:
        index = synthetic_bank(size, dim, "m", [])
        hashes = np.stack([e.pdq for e in index.entries if e.pdq is not None])

        def best(fn: Any) -> float:
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return round(min(times) * 1000, 3)

        out.append({
            "entries": size,
            "pdq_faiss_ms": best(lambda index=index: index.search(queries, None, 31, None)),
            "pdq_numpy_ms": best(lambda hashes=hashes: hamming_pairs(flat, hashes, 31)),
            "embedding_ms": best(lambda index=index: index.search([None] * batch, embeds, None, 0.95)),
        })  # fmt: skip
    return out


def bank_app(app: App, policy: PolicySpec, directory: Path) -> App:
    """An app on the same engine whose policy is the benchmark's with one bank rule."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = policy.model_dump(mode="json")
    raw["banks"] = [{"name": BANK, "decision": "review", "pdq_distance": 31, "cosine": 0.95}]
    (directory / f"{policy.name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return App(app.settings.model_copy(update={"policy_dir": directory}), engine=app.engine)


def run_banks_contender(
    opts: BenchOptions,
    app: App,
    policy: PolicySpec,
    distinct: Sequence[bytes],
    server: ImageServer | None,
    work_dir: Path,
    progress: Any = lambda s: None,
) -> dict[str, Any]:
    engine = app.engine
    images = _decoded(distinct)
    planted = [hash_image(img) for img in images[::PLANT_EVERY]]
    banked = bank_app(app, policy, work_dir / "bank-policies")
    wopts = worker_options(opts)
    runs: dict[str, Any] = {}
    progress("banks: worker, no bank")
    runs["none_before"] = run_worker_contender(wopts, banked, distinct, server, [], banks=FixedBanks())
    for size in opts.bank_sizes:
        progress(f"banks: worker, {size:,} entries")
        t0 = time.perf_counter()
        index = synthetic_bank(size, engine.embed_dim, engine.fingerprint, planted)
        build_s = time.perf_counter() - t0
        runs[str(size)] = run_worker_contender(wopts, banked, distinct, server, [], banks=FixedBanks(index)) | {
            "index_build_s": round(build_s, 2)
        }
        del index
    progress("banks: worker, no bank again")
    runs["none_after"] = run_worker_contender(wopts, banked, distinct, server, [], banks=FixedBanks())
    base = (runs["none_before"]["images_per_s"] + runs["none_after"]["images_per_s"]) / 2
    workers = {
        name: {"images_per_s": r["images_per_s"], "cost_vs_no_bank": round(1 - r["images_per_s"] / base, 4),
               "stages": {k: v for k, v in r.get("stages", {}).items() if k in ("pdq", "banks", "score", "decode")},
               **({"index_build_s": r["index_build_s"]} if "index_build_s" in r else {})}
        for name, r in runs.items()
    }  # fmt: skip
    progress("banks: PDQ and search costs")
    pdq = pdq_cost(images)
    per_image_ms = 1000 / base
    return {
        "no_bank_images_per_s": round(base, 2),
        "workers": workers,
        "pdq": pdq | {"share_of_worker_time_per_image": round(pdq["ms_per_image"] / per_image_ms, 4)},
        "search_per_batch": search_costs(opts.batch, engine.embed_dim),
        "planted_matches": f"1 distinct image in {PLANT_EVERY} is in every bank (PDQ)",
    }
