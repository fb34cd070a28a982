"""The int8 image tower (CPU): OpenVINO, quantized by NNCF's static post-training quantization.

Built when the model loads with ``MODERATOR_DTYPE=int8``, from the plain fp32 tower:

1. ``openvino.convert_model`` traces the tower (batch dimension dynamic);
2. ``nncf.quantize(..., model_type=TRANSFORMER)`` calibrates activation ranges on the calibration
   images and quantizes every matrix product of the encoder and the projection to int8 (weights per
   channel); the TRANSFORMER preset applies SmoothQuant first, which moves activation outliers (that
   trained CLIP towers have) into the weights, and keeps softmax, layer norms and GELU in fp32.
   SmoothQuant's strength is ``MODERATOR_INT8_SMOOTH_QUANT_ALPHA`` (default 0.6: OpenVINO's CLIP
   notebook measured 0.95, NNCF's default, ~10 zero-shot points below fp32 and 0.6 about 5);
3. the quantized model is compiled for the CPU with fp32 as its inference precision for what stays
   un-quantized (OpenVINO would otherwise pick bf16 on a CPU with bf16), on as many threads as torch.

Why this path (measured on a 2-core AVX-512 VNNI CPU, ViT-B/32): ~3.5x the fused fp32 torch tower;
activation scales fixed at calibration, so an image's embedding does not depend on its batch-mates
(onnxruntime's dynamic quantization computes one scale per batch, and collapses on activation
outliers); torchao's int8 gives no speed-up on such a CPU; ``torch.ao.quantization`` is deprecated.
Calibrate on your own traffic (``MODERATOR_INT8_CALIBRATION_DIR``): static ranges clip on images
unlike the calibration set.

OpenVINO and NNCF are an optional extra: ``pip install 'moderator[int8]'``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderator.events import ImagePrecision
from moderator.images import ImageError, ImageLimits, PreprocessSpec, load_image
from moderator.observability import get_logger
from moderator.precision import PrecisionUnavailable, VisionTower, generated_images

log = get_logger(__name__)

INSTALL_HINT = "pip install 'moderator[int8]' (OpenVINO and NNCF)"
CALIBRATION_SEED = 5_000_000  # generated calibration images: distinct from the probe set's seeds
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def no_telemetry() -> None:
    """OpenVINO's model converter and NNCF send usage telemetry to Intel unless a consent file
    (``opt_in_out --opt_out``) says no, and re-enable it each time they start. This process never sends
    any: the shared telemetry class's consent reads False whatever they set (every send checks it; the
    client-id and statistics files are only written with consent)."""
    try:
        from openvino_telemetry import main
    except ImportError:
        return
    main.Telemetry.consent = property(lambda self: False, lambda self, value: None)


def _openvino() -> Any:
    no_telemetry()
    try:
        import openvino
    except ImportError:
        raise PrecisionUnavailable(f"MODERATOR_DTYPE=int8 needs OpenVINO: {INSTALL_HINT}") from None
    return openvino


def calibration_images(spec: PreprocessSpec, count: int, directory: Path | None = None) -> np.ndarray:
    """uint8 ``[N, H, W, 3]``: up to ``count`` images of ``directory`` (sorted by name; undecodable
    ones skipped), or ``count`` generated photo-like images when there is no directory."""
    if directory is None:
        return generated_images(spec, count, CALIBRATION_SEED)
    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    out: list[np.ndarray] = []
    for path in files:
        if len(out) == count:
            break
        try:
            out.append(load_image(path.read_bytes(), ImageLimits(), spec))
        except (ImageError, OSError) as exc:
            log.warning("calibration_image_skipped", file=str(path), error=str(exc))
    if not out:
        raise PrecisionUnavailable(f"MODERATOR_INT8_CALIBRATION_DIR={directory}: no readable image in it")
    return np.stack(out)


class OpenVinoTower:
    """The compiled int8 model: normalized float32 pixels in, un-normalized float32 embeddings out.

    A batch is split across the model's streams (each a few threads of its own) and run at once: on a
    CPU shared with the worker's other threads (the Kafka consumer, decoding), a stream whose thread is
    preempted delays only its share of the batch, where one stream on every core would wait for its
    slowest thread at every layer (measured: ~15% more images/s with a busy neighbour on 2 cores).
    Every image runs through the same quantized model whatever its batch, so embeddings do not
    depend on batch-mates.
    """

    precision: ImagePrecision = "int8"
    kind = "openvino-int8"
    one_call = True  # one native call per part of the batch, the GIL released (see ImageTower)

    def __init__(self, compiled: Any, seconds: dict[str, float]) -> None:
        import openvino

        self.compiled = compiled
        self.seconds = seconds  # how long each build step took (logged with model_loaded)
        self.streams = max(1, int(compiled.get_property("NUM_STREAMS")))
        self._queue = openvino.AsyncInferQueue(compiled, self.streams)
        self._lock = threading.Lock()  # one batch at a time

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.detach().to(torch.float32).cpu().numpy())
        parts = [p for p in np.array_split(x, min(self.streams, len(x))) if len(p)] if len(x) else [x]
        out: list[np.ndarray | None] = [None] * len(parts)

        def done(request: Any, index: int) -> None:
            out[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

        with self._lock:
            self._queue.set_callback(done)
            for i, part in enumerate(parts):
                self._queue.start_async({0: np.ascontiguousarray(part)}, i)
            self._queue.wait_all()
        return torch.from_numpy(np.concatenate([o for o in out if o is not None]))


def quantization_options(smooth_quant_alpha: float) -> dict[str, Any]:
    """``nncf.quantize`` keyword arguments: the TRANSFORMER preset, SmoothQuant at this strength."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    smooth = AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha)
    return {"model_type": nncf.ModelType.TRANSFORMER,
            "advanced_parameters": AdvancedQuantizationParameters(smooth_quant_alphas=smooth)}  # fmt: skip


def int8_tower(tower: VisionTower, calibration: torch.Tensor, threads: int, smooth_quant_alpha: float) -> OpenVinoTower:
    """Quantize a plain fp32 :class:`VisionTower` to int8 with NNCF, calibrated on normalized pixels
    ``[N, 3, H, W]`` (SmoothQuant at ``smooth_quant_alpha``); compile it for the CPU on ``threads``."""
    ov = _openvino()
    try:
        import nncf
    except ImportError:
        raise PrecisionUnavailable(f"MODERATOR_DTYPE=int8 needs NNCF to quantize: {INSTALL_HINT}") from None
    from transformers.utils import logging as hf_logging

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tracing touches config attributes that warn (loss_type)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches (fixed here)
            model = ov.convert_model(tower.eval(), example_input=calibration[:2].clone())
    finally:
        hf_logging.set_verbosity(verbosity)
    seconds["convert"] = time.perf_counter() - t0
    nncf.set_log_level(logging.ERROR)
    samples = [calibration[i : i + 1].numpy() for i in range(len(calibration))]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # NNCF's progress bars
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(
            model, nncf.Dataset(samples), subset_size=len(samples), **quantization_options(smooth_quant_alpha)
        )
    seconds["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Streams (see OpenVinoTower): one per thread up to 2 threads (measured on 2 cores), else about 4
    # threads each (not measured here); unpinned, as the cores are shared with the worker's other
    # threads; fp32 for what stays un-quantized (OpenVINO would pick bf16 where the CPU has it).
    streams = threads if threads <= 2 else max(2, threads // 4)
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": streams,
        "PERFORMANCE_HINT": "THROUGHPUT",
        "ENABLE_CPU_PINNING": False,
        "INFERENCE_PRECISION_HINT": "f32",
    }
    compiled = ov.Core().compile_model(quantized, "CPU", config)
    seconds["compile"] = time.perf_counter() - t0
    return OpenVinoTower(compiled, {k: round(v, 2) for k, v in seconds.items()})
