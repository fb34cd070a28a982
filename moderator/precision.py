"""The image tower's precision: which ones this machine runs well, the towers that run them, and the probe
that compares a reduced-precision tower with the fp32 one.

Precisions (``MODERATOR_DTYPE``; the text tower is always fp32):

- ``float32``: on the CPU the fused oneDNN tower (``onednn.py``), the reference every other precision
  is compared with;
- ``bfloat16`` (CPU): the tower cast to bf16, then fused. Only where the CPU has native bf16 products
  (``avx512_bf16`` or ``amx_bf16``); elsewhere oneDNN emulates them at ~0.4x the fp32 speed, so the
  setting is refused with a message saying so;
- ``int8`` (CPU): OpenVINO with NNCF's static quantization (``int8.py``);
- ``float16``: on CUDA (``auto`` there).

A reduced-precision tower never serves unchecked: the engine embeds the probe set (generated
photo-like images, fixed seeds) with both towers and keeps the reduced one only when the embeddings
agree (:class:`Probe`); the decisions under every loaded policy are compared where the policies are
loaded (``gate.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, get_args

import numpy as np
import torch
from PIL import Image

from moderator.events import ImagePrecision
from moderator.images import PreprocessSpec, preprocess
from moderator.onednn import fuse_cpu_image_tower, image_features
from moderator.samples import photo_like

PRECISIONS: tuple[ImagePrecision, ...] = get_args(ImagePrecision)
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_SEED = 7_000_000  # the probe set's images: seeds PROBE_SEED, PROBE_SEED + 1, ...


class PrecisionUnavailable(Exception):
    """The precision asked for cannot run well here; the message says why and what to set instead."""


def native_bf16(caps: Mapping[str, object] | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (``torch.cpu.get_capabilities()`` unless given).

    x86: ``avx512_bf16`` or ``amx_bf16``; arm64: ``bf16`` or ``sve_bf16``. Not
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which is also true where bf16 is emulated.
    """
    caps = torch.cpu.get_capabilities() if caps is None else caps
    if caps.get("architecture") == "x86_64":
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return bool(caps.get("bf16") or caps.get("sve_bf16"))


def resolve_precision(setting: str, device: torch.device, caps: Mapping[str, object] | None = None) -> ImagePrecision:
    """``MODERATOR_DTYPE`` on ``device``: ``auto`` is fp16 on CUDA and fp32 elsewhere (the CPU's
    reduced precisions are opt-in: see the README's Precision section); an unsuitable one raises
    :class:`PrecisionUnavailable`."""
    if setting == "auto":
        return "float16" if device.type == "cuda" else "float32"
    if setting not in PRECISIONS:
        raise PrecisionUnavailable(f"MODERATOR_DTYPE={setting}: not one of auto, {', '.join(PRECISIONS)}")
    if setting == "int8" and device.type != "cpu":
        raise PrecisionUnavailable(
            f"MODERATOR_DTYPE=int8 runs on the CPU only (device {device}); use float16 or bfloat16 there"
        )
    if setting == "bfloat16" and device.type == "cpu" and not native_bf16(caps):
        raise PrecisionUnavailable(
            "MODERATOR_DTYPE=bfloat16: this CPU has no native bf16 products (avx512_bf16 or amx_bf16), so"
            " bf16 would be emulated, about 2.6x slower than float32; use float32, or int8"
        )
    return setting


# ==================================================================================================
# Towers


class VisionTower(torch.nn.Module):
    """``vision_model`` + ``visual_projection``: normalized pixels ``[B, 3, H, W]`` to un-normalized
    image embeddings ``[B, D]`` (``CLIPModel.get_image_features``), without the text tower."""

    def __init__(self, vision_model: torch.nn.Module, visual_projection: torch.nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_features(self, pixel_values)


class ImageTower(Protocol):
    """One way to run the image tower: normalized float32 pixels in, un-normalized float32 embeddings out."""

    precision: ImagePrecision
    kind: str  # how it runs: "onednn-fused", "plain", "openvino-int8"
    # A batch is one call into native code that holds no GIL (OpenVINO): threads beside it at idle priority
    # cannot stall it. A torch tower dispatches each operator from Python: a thread that holds the GIL
    # while it waits for a core stalls every dispatch (worker/stages.py decodes ahead only beside one call).
    one_call: bool

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TorchTower:
    """A PyTorch image tower in ``dtype`` (the input is cast to it, the output back to float32)."""

    module: torch.nn.Module
    dtype: torch.dtype
    precision: ImagePrecision
    kind: str
    one_call: bool = False  # operators dispatched from Python (see ImageTower)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return image_features(self.module, pixels.to(self.dtype)).float()


def plain_copy(model: Any) -> VisionTower:
    """A separate copy of a CLIP model's image tower (its plain layers: before any fusing)."""
    return VisionTower(copy.deepcopy(model.vision_model), copy.deepcopy(model.visual_projection)).eval()


def bf16_cpu_tower(plain: VisionTower, image_size: int) -> TorchTower:
    """A plain image tower (:func:`plain_copy`) cast to bf16 in place, then fused (``onednn.py``): ~1.9x
    the fused fp32 tower on a CPU with native bf16 (ViT-B/32, measured), embeddings within cosine
    ~0.9999 of fp32."""
    tower = plain.to(torch.bfloat16)
    fused = fuse_cpu_image_tower(tower, torch.bfloat16, image_size)
    return TorchTower(tower, torch.bfloat16, "bfloat16", "onednn-fused" if fused else "plain")


# ==================================================================================================
# The probe set


def generated_images(spec: PreprocessSpec, count: int, seed: int) -> np.ndarray:
    """``count`` photo-like images of varied sizes and aspect ratios, resized and cropped as the worker
    does: uint8 ``[count, H, W, 3]``. Deterministic under ``seed``."""
    rng = np.random.default_rng(seed)
    h, w = spec.output_hw
    out = np.empty((count, h, w, 3), dtype=np.uint8)
    for i in range(count):
        width, height = int(rng.integers(w, 2 * w + 1)), int(rng.integers(h, 2 * h + 1))
        out[i] = preprocess(Image.fromarray(photo_like(width, height, seed=seed + i)), spec)
    return out


@dataclass(frozen=True)
class Probe:
    """The probe set embedded by the fp32 tower (``reference``) and by a reduced one (``candidate``),
    both L2-normalized ``[N, D]``: the evidence the gate judges, kept to judge policies loaded later."""

    precision: ImagePrecision
    reference: torch.Tensor
    candidate: torch.Tensor

    @property
    def cosines(self) -> torch.Tensor:
        return (self.reference * self.candidate).sum(-1)

    @property
    def min_cosine(self) -> float:
        return float(self.cosines.min()) if len(self.reference) else 1.0

    @property
    def mean_cosine(self) -> float:
        return float(self.cosines.mean()) if len(self.reference) else 1.0

    def figures(self) -> dict[str, float | int]:
        return {"probe_images": len(self.reference), "min_cosine": round(self.min_cosine, 6),
                "mean_cosine": round(self.mean_cosine, 6)}  # fmt: skip
