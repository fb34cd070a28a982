"""The CLIP engine: load a checkpoint, encode images and texts into L2-normalized embeddings.

One small wrapper around ``transformers.CLIPModel`` (open_clip's shape: ``encode_image`` /
``encode_text``, normalization explicit):

- images arrive as a ``uint8 [B, H, W, 3]`` batch already resized and cropped (``images.py``); they
  move to the device as uint8 (pinned memory, non-blocking on CUDA) and are rescaled and
  normalized there with the checkpoint's mean and std;
- the image tower runs in the configured precision (``precision.py``: fp16/bf16 on CUDA; fp32, bf16
  or int8 on the CPU, where a reduced precision serves only after its probe embeddings agree with the
  fp32 tower's); the text tower always runs in fp32: it only runs when a policy is compiled, and fp32
  text embeddings make the shared cache independent of the image tower's precision;
- every result is tagged with the model fingerprint: checkpoint id plus the resolved commit, or a
  hash of the weights for a local directory.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, CLIPModel

from moderator.config import Settings
from moderator.events import ImagePrecision
from moderator.images import PreprocessSpec
from moderator.observability import (
    IMAGE_PRECISION,
    IMAGES_ENCODED,
    PRECISION_FALLBACKS,
    PRECISION_PROBE_COSINE,
    STAGE_SECONDS,
    TEXTS_ENCODED,
    get_logger,
)
from moderator.onednn import fuse_cpu_image_tower
from moderator.precision import (
    PRECISIONS,
    PROBE_SEED,
    TORCH_DTYPES,
    ImageTower,
    PrecisionUnavailable,
    Probe,
    TorchTower,
    VisionTower,
    bf16_cpu_tower,
    generated_images,
    plain_copy,
    resolve_precision,
)
from moderator.random_init import is_random_init

log = get_logger(__name__)


class ModelLoadError(Exception):
    """The checkpoint cannot be loaded; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class CheckpointInfo:
    model_id: str
    architecture: str
    image_size: int
    patch_size: int
    embed_dim: int
    note: str


# The checkpoints this product supports. Loading one of them checks its config against this table.
SUPPORTED_CHECKPOINTS: dict[str, CheckpointInfo] = {
    c.model_id: c
    for c in (
        CheckpointInfo("openai/clip-vit-base-patch32", "ViT-B/32", 224, 32, 512, "fastest; the default"),
        CheckpointInfo("openai/clip-vit-base-patch16", "ViT-B/16", 224, 16, 512, "finer detail, ~4x B/32 cost"),
        CheckpointInfo("openai/clip-vit-large-patch14", "ViT-L/14", 224, 14, 768, "most accurate; GPU for throughput"),
        CheckpointInfo(
            "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
            "ViT-B/16",
            224,
            16,
            512,
            "OpenCLIP, LAION-2B, MIT license",
        ),
    )
}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; set MODERATOR_DEVICE=cpu")
    return dev


def _hash_weights(model_dir: Path) -> str:
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _resolved_commit(model_id: str, revision: str | None, local_files_only: bool, cache_dir: Path | None) -> str:
    """The commit hash a hub load resolved to, read off the snapshot path of its config."""
    from transformers.utils import cached_file

    path = cached_file(
        model_id, "config.json", revision=revision, local_files_only=local_files_only, cache_dir=cache_dir
    )
    match = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", str(path or ""))
    return match.group(1) if match else (revision or "unknown")


def _load_error(model_id: str, revision: str | None, local_files_only: bool, exc: Exception) -> ModelLoadError:
    rev = revision or "main"
    lines = [
        f"cannot load CLIP checkpoint {model_id!r} (revision {rev}, "
        f"{'local files only' if local_files_only else 'hub allowed'}): {type(exc).__name__}: {exc}",
        "Tried: a local directory of that name, then the Hugging Face cache"
        + ("" if local_files_only else ", then the hub")
        + ".",
        "To fix it, either:",
        f"  - download it where the hub is reachable: hf download {model_id}"
        + (f" --revision {revision}" if revision else "")
        + " (then copy the cache, or set HF_HOME), or",
        "  - point MODERATOR_MODEL_ID at a local directory holding config.json, the weights and the"
        " processor files (as written by save_pretrained), or",
        "  - for a demo or test without weights: moderator random-checkpoint DIR --arch ViT-B/32,"
        " then MODERATOR_MODEL_ID=DIR.",
    ]
    return ModelLoadError("\n".join(lines))


class ClipEngine:
    """A loaded CLIP checkpoint: ``encode_images`` and ``encode_texts`` return L2-normalized float32."""

    def __init__(
        self,
        model: CLIPModel,
        processor: Any,  # a CLIPProcessor (AutoProcessor's declared return type is wider)
        *,
        model_id: str,
        fingerprint: str,
        device: torch.device,
        tower: ImageTower,
        max_batch_size: int = 64,
    ) -> None:
        self.model = model
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.spec = PreprocessSpec.from_image_processor(self.image_processor)
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.device = device
        # The image towers built, by precision: the base one (fp32 on the CPU) and, when a reduced
        # precision was asked for, that one. ``tower`` is the one serving: read it once per batch.
        self.base = tower
        self.towers: dict[str, ImageTower] = {tower.precision: tower}
        self.tower: ImageTower = tower
        self.requested_precision: ImagePrecision = tower.precision
        self.probe: Probe | None = None  # the probe set embedded by both towers (reduced precisions)
        self.fallback_reason: str | None = None  # why the requested precision is not serving
        self.max_batch_size = max_batch_size
        self.embed_dim = config_int(model.config, "projection_dim")
        self.logit_scale = float(model.logit_scale.detach().float().exp().item())
        self.max_text_tokens = config_int(model.config.text_config, "max_position_embeddings")
        # Rescale and normalize folded into one affine map: x * scale + shift, per channel.
        std = torch.tensor(self.spec.std, dtype=torch.float32)
        mean = torch.tensor(self.spec.mean, dtype=torch.float32)
        self._scale = (self.spec.rescale_factor / std).view(1, 3, 1, 1).to(device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(device)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        local_files_only: bool = False,
        cache_dir: Path | None = None,
        max_batch_size: int = 64,
        warm_up: bool = True,
        min_cosine: float = 0.99,
        probe_images: int = 200,
        int8_calibration_images: int = 64,
        int8_calibration_dir: Path | None = None,
        int8_smooth_quant_alpha: float = 0.6,
        fuse: bool = True,
    ) -> ClipEngine:
        """Load any Hugging Face CLIP checkpoint by hub id or local directory.

        ``dtype`` is the image tower's precision (``precision.py``). On the CPU, ``bfloat16`` and
        ``int8`` build that tower beside the fp32 one and embed ``probe_images`` generated images with
        both: the reduced tower serves when every probe embedding's cosine with its fp32 one is at
        least ``min_cosine``; else the fp32 tower serves, and ``model_loaded`` says why. ``fuse=False``
        keeps the plain ``transformers`` layers (``moderator export onnx`` traces them).
        """
        dev = resolve_device(device)
        try:
            requested = resolve_precision(dtype, dev)
        except PrecisionUnavailable as exc:
            raise ModelLoadError(str(exc)) from None
        # On the CPU the fp32 tower is the base (and the fallback); on CUDA the asked dtype is.
        base_precision: ImagePrecision = requested if dev.type != "cpu" else "float32"
        base_dtype = TORCH_DTYPES[base_precision]
        local_dir = Path(model_id).expanduser()
        is_local = local_dir.is_dir()
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {}
        if not is_local:
            kwargs = {"revision": revision, "local_files_only": local_files_only, "cache_dir": cache_dir}
        try:
            model = CLIPModel.from_pretrained(str(local_dir) if is_local else model_id, dtype=torch.float32, **kwargs)
            processor = AutoProcessor.from_pretrained(str(local_dir) if is_local else model_id, **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_error(model_id, revision, local_files_only, exc) from None
        if type(model).__name__ != "CLIPModel":
            raise ModelLoadError(f"{model_id!r} is not a CLIP checkpoint ({type(model).__name__})")
        _check_registry(model_id, model)

        if is_local:
            marker = is_random_init(local_dir)
            digest = _hash_weights(local_dir)
            if marker:
                fingerprint = f"random-init:{marker.get('architecture')}@sha256:{digest}"
            else:
                fingerprint = f"local:{local_dir.resolve().name}@sha256:{digest}"
        else:
            commit = _resolved_commit(model_id, revision, local_files_only, cache_dir)
            fingerprint = f"{model_id}@{commit}"

        model.eval().requires_grad_(False).to(dev)
        image_size = config_int(model.config.vision_config, "image_size")
        plain = plain_copy(model) if requested != base_precision else None  # before fusing: its plain layers
        model.vision_model.to(base_dtype)
        model.visual_projection.to(base_dtype)
        fused = False
        if fuse and dev.type == "cpu" and base_dtype in (torch.float32, torch.bfloat16):
            fused = fuse_cpu_image_tower(model, base_dtype, image_size)
        base = TorchTower(VisionTower(model.vision_model, model.visual_projection), base_dtype, base_precision,
                          "onednn-fused" if fused else "plain")  # fmt: skip
        engine = cls(model, processor, model_id=model_id, fingerprint=fingerprint, device=dev, tower=base,
                     max_batch_size=max_batch_size)  # fmt: skip
        built: dict[str, Any] = {}
        if plain is not None:
            t1 = time.perf_counter()
            candidate: ImageTower | None = None
            try:
                candidate = engine._reduced_tower(
                    plain, requested, image_size, int8_calibration_images, int8_calibration_dir, int8_smooth_quant_alpha
                )
            except PrecisionUnavailable as exc:  # asked for what cannot run here: a configuration error
                raise ModelLoadError(str(exc)) from None
            except Exception as exc:  # the build itself failed (a checkpoint the converter cannot trace...)
                engine.requested_precision = requested
                engine._fell_back(f"the {requested} image tower could not be built: {type(exc).__name__}: {exc}",
                                  "error")  # fmt: skip
            del plain
            built["build_s"] = round(time.perf_counter() - t1, 2)
            if candidate is not None:
                built.update(getattr(candidate, "seconds", {}))
                engine.add_candidate(candidate, min_cosine=min_cosine, probe_images=probe_images)
        if warm_up:
            engine.warm_up()
        engine._publish_precision()
        log.info(
            "model_loaded",
            model=fingerprint,
            device=str(dev),
            image_precision=engine.precision,
            requested_precision=requested,
            image_tower=engine.image_tower,
            **({} if engine.probe is None else {**engine.probe.figures(), "min_cosine_floor": min_cosine}),
            **({"fallback": engine.fallback_reason} if engine.fallback_reason else {}),
            **({"reduced_tower_seconds": built} if built else {}),
            seconds=round(time.perf_counter() - t0, 2),
            embed_dim=engine.embed_dim,
            input_size=list(engine.spec.output_hw),
        )
        return engine

    def _reduced_tower(
        self,
        plain: VisionTower,
        precision: str,
        image_size: int,
        calibration_count: int,
        calibration_dir: Path | None,
        smooth_quant_alpha: float,
    ) -> ImageTower:
        """The bf16 or int8 tower (CPU), built from a plain fp32 copy of the image tower."""
        if precision == "bfloat16":
            return bf16_cpu_tower(plain, image_size)
        if precision == "int8":
            from moderator.int8 import calibration_images, int8_tower

            pixels = self.pixel_values(calibration_images(self.spec, calibration_count, calibration_dir)).clone()
            return int8_tower(plain, pixels, torch.get_num_threads(), smooth_quant_alpha)
        raise PrecisionUnavailable(f"no reduced-precision CPU tower for {precision}")

    # --- precision --------------------------------------------------------------------------------
    @property
    def precision(self) -> ImagePrecision:
        """The precision of the image tower serving now."""
        return self.tower.precision

    @property
    def dtype(self) -> torch.dtype:
        """The base tower's torch dtype (fp32 on the CPU): what the reference pipeline runs in."""
        return TORCH_DTYPES[self.base.precision]

    @property
    def image_tower(self) -> str:
        """How the serving image tower runs: ``onednn-fused``, ``plain`` or ``openvino-int8``."""
        return self.tower.kind

    def add_candidate(self, tower: ImageTower, *, min_cosine: float, probe_images: int) -> None:
        """Embed the probe set with the base tower and ``tower``; ``tower`` serves from now on when
        every probe cosine is at least ``min_cosine``, else the base tower keeps serving (and
        :attr:`fallback_reason` says why)."""
        self.requested_precision = tower.precision
        self.towers[tower.precision] = tower
        pixels = generated_images(self.spec, probe_images, PROBE_SEED)
        self.probe = Probe(tower.precision, self._embed(pixels, self.base), self._embed(pixels, tower))
        PRECISION_PROBE_COSINE.labels(precision=tower.precision, stat="min").set(self.probe.min_cosine)
        PRECISION_PROBE_COSINE.labels(precision=tower.precision, stat="mean").set(self.probe.mean_cosine)
        if self.probe.min_cosine >= min_cosine:
            self.tower = tower
            self.fallback_reason = None
        else:
            self._fell_back(
                f"{tower.precision} probe embeddings: min cosine {self.probe.min_cosine:.5f} with float32 is below"
                f" the floor {min_cosine} (MODERATOR_PRECISION_MIN_COSINE)",
                "cosine",
            )

    def fall_back(self, reason: str, kind: str = "agreement") -> None:
        """Serve the base (fp32) tower from now on, and say why (a log line, the metrics)."""
        if self.tower is self.base:
            return
        self.tower = self.base
        self._fell_back(reason, kind)
        self._publish_precision()
        log.warning("precision_fallback", requested_precision=self.requested_precision,
                    image_precision=self.precision, reason=reason)  # fmt: skip

    def _fell_back(self, reason: str, kind: str) -> None:
        self.fallback_reason = reason
        PRECISION_FALLBACKS.labels(reason=kind).inc()

    def _publish_precision(self) -> None:
        for precision in PRECISIONS:
            IMAGE_PRECISION.labels(precision=precision).set(1 if precision == self.precision else 0)

    @classmethod
    def from_settings(cls, settings: Settings) -> ClipEngine:
        return cls.load(
            settings.model_id,
            revision=settings.model_revision,
            device=settings.device,
            dtype=settings.dtype,
            local_files_only=settings.model_local_files_only,
            cache_dir=settings.model_cache_dir,
            max_batch_size=settings.max_batch_size,
            min_cosine=settings.precision_min_cosine,
            probe_images=settings.precision_probe_images,
            int8_calibration_images=settings.int8_calibration_images,
            int8_calibration_dir=settings.int8_calibration_dir,
            int8_smooth_quant_alpha=settings.int8_smooth_quant_alpha,
        )

    def warm_up(self) -> None:
        h, w = self.spec.output_hw
        self.encode_images(np.zeros((1, h, w, 3), dtype=np.uint8))
        self.encode_texts(["warm-up"])

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def pixel_values(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` (host) to normalized float32 ``[B, 3, H, W]`` on the device."""
        if isinstance(batch, np.ndarray):
            x = torch.from_numpy(batch if batch.flags.writeable else batch.copy())
        else:
            x = batch
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [B, H, W, 3] batch, got {tuple(x.shape)} {x.dtype}")
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            return x.permute(0, 3, 1, 2).float() * self._scale + self._shift
        # On the CPU: one converting copy into a contiguous [B, 3, H, W] buffer, then rescaled and shifted
        # in place: the same values as the expression above (the same two operations in the same order),
        # a third of its time (it made three full-size passes, and left the channels-last strides that
        # every tower then copied again).
        out = torch.empty((x.shape[0], 3, x.shape[1], x.shape[2]), dtype=torch.float32)
        out.copy_(x.permute(0, 3, 1, 2))
        return out.mul_(self._scale).add_(self._shift)

    @torch.inference_mode()
    def encode_images(self, batch: np.ndarray | Sequence[np.ndarray], tower: ImageTower | None = None) -> torch.Tensor:
        """Preprocessed uint8 images to L2-normalized float32 embeddings ``[B, D]`` on the device.

        ``tower``: one of :attr:`towers` (default: the one serving now; a caller that records the
        precision reads :attr:`tower` once and passes it). Per chunk of ``max_batch_size``, the seconds
        of ``transfer`` (to the device, rescaled and normalized) and ``forward`` (the image tower) go to
        ``moderator_stage_seconds``; on CUDA the device is synchronized at each boundary so that the
        split is real (the caller reads the embeddings right after, so the last synchronization costs
        nothing).
        """
        run = self.tower if tower is None else tower
        arr = batch if isinstance(batch, np.ndarray) else np.stack(list(batch))
        out = []
        for i in range(0, len(arr), self.max_batch_size):
            t0 = time.perf_counter()
            pixels = self.pixel_values(arr[i : i + self.max_batch_size])
            synchronize(self.device)
            t1 = time.perf_counter()
            out.append(torch.nn.functional.normalize(run(pixels), dim=-1))
            synchronize(self.device)
            STAGE_SECONDS.labels(stage="transfer").observe(t1 - t0)
            STAGE_SECONDS.labels(stage="forward").observe(time.perf_counter() - t1)
        IMAGES_ENCODED.inc(len(arr))
        if not out:
            return torch.empty((0, self.embed_dim), device=self.device)
        return torch.cat(out) if len(out) > 1 else out[0]

    @torch.inference_mode()
    def _embed(self, arr: np.ndarray, tower: ImageTower) -> torch.Tensor:
        """:meth:`encode_images` without the metrics (the probe set, at load time)."""
        out = [torch.nn.functional.normalize(tower(self.pixel_values(arr[i : i + self.max_batch_size])), dim=-1)
               for i in range(0, len(arr), self.max_batch_size)]  # fmt: skip
        return torch.cat(out) if out else torch.empty((0, self.embed_dim), device=self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts to L2-normalized float32 embeddings ``[N, D]`` on the device (uncached)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            ).to(self.device)
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
            ).pooler_output
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        TEXTS_ENCODED.inc(len(texts))
        if not out:
            return torch.empty((0, self.embed_dim), device=self.device)
        return torch.cat(out) if len(out) > 1 else out[0]


# The reference zero-shot pipeline's default hypothesis template: `classify --label` and the
# benchmark's policy use it too, so that their scores are the pipeline's scores.
PIPELINE_TEMPLATE = "This is a photo of {}."


def zero_shot_probs(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """softmax(logit_scale · cos) over the candidate texts, as the reference pipeline computes it."""
    logits = logit_scale * (image_embeds.float() @ text_embeds.float().T)
    return logits.softmax(dim=-1)


def config_int(config: object, name: str) -> int:
    """An integer field of a ``transformers`` config (typed loosely there: sub-configs may be dicts)."""
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    if not isinstance(value, int):
        raise ModelLoadError(f"the checkpoint's config has no integer {name!r} (got {value!r})")
    return value


def _check_registry(model_id: str, model: CLIPModel) -> None:
    info = SUPPORTED_CHECKPOINTS.get(model_id)
    if info is None:
        return
    vc = model.config.vision_config
    got = (config_int(vc, "image_size"), config_int(vc, "patch_size"), config_int(model.config, "projection_dim"))
    want = (info.image_size, info.patch_size, info.embed_dim)
    if got != want:
        raise ModelLoadError(
            f"{model_id} loaded with image_size/patch_size/embed_dim {got}, expected {want}: "
            "the files under that name are not that checkpoint"
        )


def checkpoint_available(model_id: str, cache_dir: Path | None = None) -> bool:
    """Whether a checkpoint can be loaded without the network (local dir or complete hub cache)."""
    if Path(model_id).expanduser().is_dir():
        return (Path(model_id).expanduser() / "config.json").is_file()
    from transformers.utils import cached_file

    try:
        for name in ("config.json",):
            if cached_file(model_id, name, local_files_only=True, cache_dir=cache_dir) is None:
                return False
        return any(
            cached_file(
                model_id,
                w,
                local_files_only=True,
                cache_dir=cache_dir,
                _raise_exceptions_for_missing_entries=False,
            )
            for w in ("model.safetensors", "pytorch_model.bin")
        )
    except (OSError, ValueError):
        return False
