"""The image tower's matrix products as fused, prepacked oneDNN primitives (CPU).

Each ``Linear`` of the vision encoder and the visual projection becomes one oneDNN primitive with a
prepacked weight; the MLP's activation runs as a post-op of its first product (QuickGELU as
``swish(1.702·x)/1.702``, the factors folded into the weights). Same fp32 arithmetic, embeddings
within ~3e-6 of the plain ``transformers`` tower, and faster: see :func:`fuse_cpu_image_tower`.
"""

from __future__ import annotations

from typing import Any

import torch

from moderator.observability import get_logger

log = get_logger(__name__)


class _OneDNNLinear(torch.nn.Module):
    """``act(x @ W.T + b)`` as one oneDNN primitive with a prepacked weight (CPU).

    The activation runs as a post-op of the matrix product, on the output while it is still in
    cache, instead of as separate passes over memory.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none", algorithm: str = "") -> None:
        super().__init__()
        self.out_features = int(weight.shape[0])
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self.act = act
        self.algorithm = algorithm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, x.shape[-1]), self.packed, self.bias, self.act, [], self.algorithm
        )
        return y.reshape(*x.shape[:-1], self.out_features)


# hidden_act -> (oneDNN post-op, its algorithm, scale folded into fc1 and out of fc2).
# quick_gelu(z) = z·sigmoid(1.702·z) = swish(1.702·z) / 1.702: fc1's weight and bias are scaled by
# 1.702 so that its output feeds swish directly, and fc2's weight by 1/1.702 to undo the factor.
_FUSED_ACTIVATIONS: dict[str, tuple[str, str, float]] = {
    "quick_gelu": ("swish", "", 1.702),
    "gelu": ("gelu", "none", 1.0),
    "gelu_new": ("gelu", "tanh", 1.0),
    "gelu_pytorch_tanh": ("gelu", "tanh", 1.0),
    "relu": ("relu", "", 1.0),
}


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The un-normalized image embeddings of a module with ``vision_model`` and ``visual_projection``
    (a ``CLIPModel``, or :class:`moderator.precision.VisionTower`): ``CLIPModel.get_image_features``."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    out: torch.Tensor = model.visual_projection(pooled)
    return out


def _fuse_image_tower(model: Any) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap the image tower's Linear layers for :class:`_OneDNNLinear` (activations fused into fc1).

    Returns (parent, attribute, original module) for every swap, so that :func:`_unfuse` can undo it.
    """
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def swap(parent: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
        swaps.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    hidden_act = getattr(model.vision_model.config, "hidden_act", None)
    act, algorithm, scale = _FUSED_ACTIVATIONS.get(str(hidden_act), ("", "", 1.0))
    for layer in model.vision_model.encoder.layers:
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lin = getattr(layer.self_attn, name)
            swap(layer.self_attn, name, _OneDNNLinear(lin.weight, lin.bias))
        mlp = layer.mlp
        fc1, fc2 = mlp.fc1, mlp.fc2
        if act:
            bias = None if fc1.bias is None else fc1.bias * scale
            swap(mlp, "fc1", _OneDNNLinear(fc1.weight * scale, bias, act, algorithm))
            swap(mlp, "activation_fn", torch.nn.Identity())
            swap(mlp, "fc2", _OneDNNLinear(fc2.weight / scale, fc2.bias))
        else:  # an activation oneDNN cannot fuse: the plain one between two fused products
            swap(mlp, "fc1", _OneDNNLinear(fc1.weight, fc1.bias))
            swap(mlp, "fc2", _OneDNNLinear(fc2.weight, fc2.bias))
    proj = model.visual_projection
    swap(model, "visual_projection", _OneDNNLinear(proj.weight, proj.bias))
    return swaps


def _unfuse(swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    for parent, name, original in reversed(swaps):
        setattr(parent, name, original)


def fuse_cpu_image_tower(model: torch.nn.Module, dtype: torch.dtype, image_size: int) -> bool:
    """On CPU, run the image tower's matrix products as fused, prepacked oneDNN primitives.

    About 1.35x faster than PyTorch's oneDNN Linear with its layout conversions, 2.3x faster than
    plain Linear (ViT-B/32, fp32, batch 32, ``moderator bench``); same fp32 arithmetic, embeddings
    agree to ~3e-6. The fused tower is checked against the plain one on two random images before it
    is kept: where this torch build lacks the primitives or they disagree, the plain layers stay
    (and a warning says so). Returns whether the fused tower is in use. ``model``: a ``CLIPModel`` or
    anything with its ``vision_model`` and ``visual_projection`` (:class:`moderator.precision.VisionTower`).
    """
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, image_size, image_size, generator=generator).to(dtype)
    with torch.inference_mode():
        plain = torch.nn.functional.normalize(image_features(model, probe).float(), dim=-1)
        swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        try:
            swaps = _fuse_image_tower(model)
            fused = image_features(model, probe).float()
            cosine = float((torch.nn.functional.normalize(fused, dim=-1) * plain).sum(-1).min())
        except (RuntimeError, NotImplementedError) as exc:
            _unfuse(swaps)
            log.warning("fused_image_tower_unavailable", error=f"{type(exc).__name__}: {exc}")
            return False
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    if not cosine >= 1 - tolerance:
        _unfuse(swaps)
        log.warning("fused_image_tower_disagrees", min_cosine=cosine, tolerance=tolerance)
        return False
    return True
