"""``moderator export onnx DIR [--int8]``: the image and text towers as ONNX, for another runtime.

Another runtime (Triton, an edge device, a browser) can serve the same model and reproduce the same
scores from what this writes to ``DIR``:

- ``image_tower.onnx``: ``pixel_values`` float32 ``[batch, 3, H, W]`` (normalized, see below) to
  ``image_embeds`` float32 ``[batch, D]``, not yet L2-normalized; the batch dimension is dynamic;
- ``text_tower.onnx``: ``input_ids``, ``attention_mask`` int64 ``[batch, seq]`` (both dynamic; seq up
  to the checkpoint's maximum) to ``text_embeds`` float32 ``[batch, D]``, not yet normalized;
- ``image_tower_int8.onnx`` (``--int8``): the image tower statically quantized by NNCF (QDQ, the
  TRANSFORMER preset with SmoothQuant, calibrated like ``MODERATOR_DTYPE=int8``);
- ``processor/``: the tokenizer and image processor files (``save_pretrained``);
- ``moderator-onnx.json``: the model fingerprint, each file's inputs and outputs, the preprocessing
  spec (resize, crop, interpolation, rescale, mean, std), the logit scale and how scores are made,
  and the checks below with their figures.

Checks, with onnxruntime on the CPU against the torch towers (the command fails if one fails): fp32
towers on random inputs at batch 1 and 33, max abs difference <= 1e-4; the int8 tower through the
precision gate: its embeddings of the probe set against the fp32 torch tower (min cosine >=
``MODERATOR_PRECISION_MIN_COSINE``) and, when the policy directory loads, decision agreement under
each policy (>= ``MODERATOR_PRECISION_MIN_AGREEMENT``).

Needs the ``onnx`` extra (onnx, onnxscript: torch's exporter; onnxruntime: the checks), and the
``int8`` extra for ``--int8`` (NNCF).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderator.clip import ClipEngine, config_int
from moderator.config import Settings, load_settings
from moderator.observability import get_logger
from moderator.precision import PROBE_SEED, Probe, VisionTower, generated_images

log = get_logger(__name__)

FORMAT = "moderator-onnx/1"
TOLERANCE = 1e-4  # max abs difference of the fp32 towers, onnxruntime vs torch
CHECK_BATCHES = (1, 33)
INSTALL_HINT = "pip install 'moderator[onnx]' (onnx, onnxscript, onnxruntime)"


class ExportError(Exception):
    """The export cannot run or a check failed; the message says which and what to do."""


class TextTower(torch.nn.Module):
    """``text_model`` + ``text_projection``: token ids and mask to un-normalized text embeddings."""

    def __init__(self, text_model: torch.nn.Module, text_projection: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        out: torch.Tensor = self.text_projection(pooled)
        return out


def _onnx_export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
                 output: str, dynamic: dict[str, dict[int, Any]]) -> None:  # fmt: skip
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it; say so before it fails deep inside)
    except ImportError:
        raise ExportError(f"moderator export onnx needs onnx and onnxscript: {INSTALL_HINT}") from None
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms", ...
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torch internals' deprecation notices, tracer notes
        program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=inputs, output_names=[output],
                                    dynamic_shapes=dynamic, optimize=True, verbose=False)  # fmt: skip
    onnx_log.setLevel(level)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for {path.name}")
    program.save(str(path))  # one file: the weights inline (each tower is far below 2 GB)


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(f"the checks need onnxruntime: {INSTALL_HINT}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _random_tokens(batch: int, max_len: int, vocab: int, eos: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids of random lengths (2..max_len), each ending in ``eos``, padded with a mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (batch,), generator=g)
    seq = int(lengths.max())
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids[torch.arange(batch), lengths - 1] = eos
    return ids * mask + eos * (1 - mask), mask


def export_onnx(engine: ClipEngine, out: Path, settings: Settings, *, int8: bool = False) -> dict[str, Any]:
    """Export the towers of ``engine`` (loaded with ``fuse=False``: plain layers) to ``out``, check them
    with onnxruntime, write ``moderator-onnx.json``; return its content."""
    if engine.image_tower != "plain" or engine.precision != "float32":
        raise ExportError("export needs the engine's plain fp32 layers: load it with fuse=False, dtype float32")
    out.mkdir(parents=True, exist_ok=True)
    model, spec = engine.model, engine.spec
    h, w = spec.output_hw
    image = VisionTower(model.vision_model, model.visual_projection)
    text = TextTower(model.text_model, model.text_projection).eval()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=4096)
    _onnx_export(image, (torch.randn(2, 3, h, w),), out / "image_tower.onnx", ["pixel_values"], "image_embeds",
                 {"pixel_values": {0: batch}})  # fmt: skip
    seconds["export_image"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    max_len = engine.max_text_tokens
    sample = engine.tokenizer(["a photo of a cat", "a handgun or rifle"], padding=True, return_tensors="pt")
    tb, ts = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=max_len)
    _onnx_export(text, (sample["input_ids"], sample["attention_mask"]), out / "text_tower.onnx",
                 ["input_ids", "attention_mask"], "text_embeds",
                 {"input_ids": {0: tb, 1: ts}, "attention_mask": {0: tb, 1: ts}})  # fmt: skip
    seconds["export_text"] = time.perf_counter() - t0
    engine.tokenizer.save_pretrained(str(out / "processor"))
    engine.image_processor.save_pretrained(str(out / "processor"))

    # Checks: onnxruntime against torch, fp32, random inputs at batch 1 and 33.
    checks: dict[str, Any] = {"tolerance": TOLERANCE}
    image_session, text_session = _session(out / "image_tower.onnx"), _session(out / "text_tower.onnx")
    vocab = config_int(model.config.text_config, "vocab_size")
    eos = config_int(model.config.text_config, "eos_token_id")
    with torch.inference_mode():
        for b in CHECK_BATCHES:
            x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b))
            ours = image_session.run(None, {"pixel_values": x.numpy()})[0]
            checks[f"image_batch_{b}_max_abs_diff"] = float(np.abs(ours - image(x).numpy()).max())
            ids, mask = _random_tokens(b, max_len, vocab, eos, seed=b)
            ours = text_session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            checks[f"text_batch_{b}_max_abs_diff"] = float(np.abs(ours - text(ids, mask).numpy()).max())
    worst = {k: v for k, v in checks.items() if k.endswith("max_abs_diff") and not v <= TOLERANCE}
    if worst:
        raise ExportError(f"onnxruntime disagrees with torch beyond {TOLERANCE}: {worst}")

    files: dict[str, Any] = {
        "image_tower": {"file": "image_tower.onnx", "precision": "float32",
                        "inputs": {"pixel_values": {"shape": ["batch", 3, h, w], "dtype": "float32"}},
                        "outputs": {"image_embeds": {"shape": ["batch", engine.embed_dim], "dtype": "float32"}}},
        "text_tower": {"file": "text_tower.onnx", "precision": "float32",
                       "inputs": {"input_ids": {"shape": ["batch", "seq"], "dtype": "int64"},
                                  "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64"}},
                       "outputs": {"text_embeds": {"shape": ["batch", engine.embed_dim], "dtype": "float32"}},
                       "max_tokens": max_len},
    }  # fmt: skip
    if int8:
        t0 = time.perf_counter()
        files["image_tower_int8"] = _int8(engine, out, settings)
        seconds["int8"] = time.perf_counter() - t0
    import onnxruntime

    manifest = {
        "format": FORMAT,
        "model": engine.fingerprint,
        "model_id": engine.model_id,
        "embed_dim": engine.embed_dim,
        "logit_scale": engine.logit_scale,
        "scoring": "L2-normalize both embeddings; probabilities = softmax(logit_scale * image @ texts.T)",
        "files": files,
        "processor": "processor/ (tokenizer and image processor, save_pretrained)",
        "preprocessing": {
            "input": "RGB, uint8, EXIF orientation applied; alpha dropped",
            "resize_shortest_edge": spec.shortest_edge,
            "resize_hw": list(spec.resize_hw) if spec.resize_hw else None,
            "center_crop_hw": list(spec.crop_hw) if spec.crop_hw else None,
            "interpolation": {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(spec.resample, "bicubic"),
            "rescale_factor": spec.rescale_factor,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "pixel_values": "(uint8 * rescale_factor - mean) / std per channel, layout [batch, 3, H, W]",
        },
        "checks": {**checks, "onnxruntime": onnxruntime.__version__},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    (out / "moderator-onnx.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _int8(engine: ClipEngine, out: Path, settings: Settings) -> dict[str, Any]:
    """The image tower quantized by NNCF (QDQ in ONNX), checked through the precision gate."""
    try:
        import nncf
        import onnx
    except ImportError:
        raise ExportError("--int8 needs NNCF: pip install 'moderator[int8]'") from None
    from moderator.int8 import calibration_images, no_telemetry, quantization_options

    no_telemetry()
    calib = engine.pixel_values(
        calibration_images(engine.spec, settings.int8_calibration_images, settings.int8_calibration_dir)
    ).numpy()
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(onnx.load(str(out / "image_tower.onnx")),
                                  nncf.Dataset([{"pixel_values": calib[i : i + 1]} for i in range(len(calib))]),
                                  subset_size=len(calib),
                                  **quantization_options(settings.int8_smooth_quant_alpha))  # fmt: skip
    onnx.save(quantized, str(out / "image_tower_int8.onnx"))
    session = _session(out / "image_tower_int8.onnx")
    probe_pixels = generated_images(engine.spec, settings.precision_probe_images, PROBE_SEED)
    reference = engine.encode_images(probe_pixels, engine.base)
    candidate = torch.cat([
        torch.nn.functional.normalize(torch.from_numpy(
            session.run(None, {"pixel_values": engine.pixel_values(probe_pixels[i : i + 32]).numpy()})[0]), dim=-1)
        for i in range(0, len(probe_pixels), 32)
    ])  # fmt: skip
    probe = Probe("int8", reference, candidate)
    gate: dict[str, Any] = {**probe.figures(), "min_cosine_floor": settings.precision_min_cosine}
    problems = []
    if probe.min_cosine < settings.precision_min_cosine:
        problems.append(f"min cosine {probe.min_cosine:.5f} < {settings.precision_min_cosine}")
    agreement = _policy_agreement(engine, settings, probe)
    if agreement is not None:
        gate.update(agreement=agreement, min_agreement_floor=settings.precision_min_agreement)
        problems += [f"agreement under {n} {v:.2%} < {settings.precision_min_agreement:.2%}"
                     for n, v in agreement.items() if v < settings.precision_min_agreement]  # fmt: skip
    else:
        gate["agreement"] = f"not measured: no loadable policy directory at {settings.policy_dir}"
    if problems:
        (out / "image_tower_int8.onnx").unlink()
        raise ExportError("the int8 image tower fails the precision gate (not written): " + "; ".join(problems))
    return {"file": "image_tower_int8.onnx", "precision": "int8",
            "quantization": "NNCF static post-training quantization (QDQ), TRANSFORMER preset, SmoothQuant alpha "
                            f"{settings.int8_smooth_quant_alpha}",
            "calibration": str(settings.int8_calibration_dir or "generated photo-like images"),
            "calibration_images": len(calib), "inputs": {"pixel_values": {"shape": ["batch", 3, *engine.spec.output_hw],
                                                                          "dtype": "float32"}},
            "outputs": {"image_embeds": {"shape": ["batch", engine.embed_dim], "dtype": "float32"}},
            "gate": gate}  # fmt: skip


def _policy_agreement(engine: ClipEngine, settings: Settings, probe: Probe) -> dict[str, float] | None:
    """Decision agreement under each policy of the policy directory, or None when it does not load."""
    from moderator.embedding_cache import TextEmbeddingCache, TextEncoder
    from moderator.gate import agreement, policies_of
    from moderator.policy import PolicyError, PolicyRegistry, compile_policy
    from moderator.policy.directory import DirectorySource

    encoder = TextEncoder(engine, TextEmbeddingCache(engine.fingerprint, engine.embed_dim))
    source = DirectorySource(settings.policy_dir, settings.policy_strict)
    registry = PolicyRegistry(source, lambda spec, src: compile_policy(spec, encoder, src), settings.default_policy)
    try:
        policy_set = registry.load_initial()
    except PolicyError:
        return None
    return {p.spec.name: round(agreement(p, probe), 6) for p in policies_of(policy_set)}


# ==================================================================================================
# The command line


def cmd_export_onnx(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {"model_id": args.model} if args.model else {}
    settings = load_settings(**overrides)
    engine = ClipEngine.load(settings.model_id, revision=settings.model_revision, device="cpu", dtype="float32",
                             local_files_only=settings.model_local_files_only, cache_dir=settings.model_cache_dir,
                             warm_up=False, fuse=False)  # fmt: skip
    try:
        manifest = export_onnx(engine, Path(args.dir), settings, int8=args.int8)
    except ExportError as exc:
        print(f"moderator export onnx: {exc}", file=sys.stderr)
        return 1 if "disagrees" in str(exc) or "fails the precision gate" in str(exc) else 2
    print(json.dumps({"dir": args.dir, "model": manifest["model"], "files": sorted(manifest["files"]),
                      "checks": manifest["checks"]}))  # fmt: skip
    return 0


def register_cli(sub: Any) -> None:
    """Add ``export onnx`` to the ``moderator`` command line."""
    p = sub.add_parser("export", help="the model for another runtime: export onnx DIR")
    esub = p.add_subparsers(dest="export_command", required=True)
    pe = esub.add_parser("onnx", help="image and text towers as ONNX (dynamic batch), checked with onnxruntime")
    pe.add_argument("dir", help="output directory")
    pe.add_argument("--int8", action="store_true", help="also the image tower quantized to int8 (NNCF), gated")
    pe.add_argument("--model", help="checkpoint id or local directory (default: MODERATOR_MODEL_ID)")
    pe.set_defaults(func=cmd_export_onnx)
