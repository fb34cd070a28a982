"""Image-tower precisions on the tiny CLIP: which ones a CPU runs, the reduced towers, the agreement gate
(cosine at load, decisions under each policy at start-up and on reload) and what decisions record."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moderator.app import App
from moderator.clip import ClipEngine, ModelLoadError
from moderator.config import Settings
from moderator.events import Decision, EmbeddingRecord, ReviewItem, schemas
from moderator.gate import agreement
from moderator.observability import PRECISION_FALLBACKS
from moderator.policy import PolicySpec, assemble, build_tables, load_spec
from moderator.precision import PROBE_SEED, Probe, generated_images, native_bf16, resolve_precision
from moderator.samples import jpeg_bytes, photo_like
from moderator.worker.feed import QueueFeed

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _fallbacks(reason: str) -> float:
    return PRECISION_FALLBACKS.labels(reason=reason)._value.get()


def _settings(policy_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"policy_dir": policy_dir, "redis_enabled": False, "max_batch_size": 8,
                                 "max_delay_ms": 5, "commit_interval_ms": 50, "shutdown_timeout_s": 10}  # fmt: skip
    return Settings(**(values | overrides))


def _int8_engine(model_dir: Path, **kwargs: object) -> ClipEngine:
    return ClipEngine.load(str(model_dir), device="cpu", dtype="int8", probe_images=64, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Which precisions a CPU runs


def test_native_bf16_is_read_off_the_cpu_capabilities():
    assert native_bf16({"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False})
    assert native_bf16({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": True})
    # AVX-512 alone (Skylake, Cascade Lake): oneDNN would emulate bf16, ~0.4x the fp32 speed.
    assert not native_bf16({"architecture": "x86_64", "avx512f": True, "avx512bw": True, "avx512_bf16": False})
    assert native_bf16({"architecture": "aarch64", "bf16": True})
    assert not native_bf16({"architecture": "aarch64", "sve": True})


def test_precision_settings_resolve_or_say_why_not():
    with_bf16 = {"architecture": "x86_64", "avx512_bf16": True}
    without = {"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": False}
    assert resolve_precision("auto", CPU, with_bf16) == "float32"  # the CPU's reduced precisions are opt-in
    assert resolve_precision("auto", torch.device("cuda"), with_bf16) == "float16"
    assert resolve_precision("bfloat16", CPU, with_bf16) == "bfloat16"
    assert resolve_precision("int8", CPU, without) == "int8"
    with pytest.raises(Exception, match="emulated") as refused:
        resolve_precision("bfloat16", CPU, without)
    assert "avx512_bf16" in str(refused.value) and "float32" in str(refused.value)
    with pytest.raises(Exception, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"), with_bf16)


def test_an_unknown_precision_stops_the_load_with_the_reason(tiny_clip_dir):
    with pytest.raises(ModelLoadError, match="MODERATOR_DTYPE=int4"):
        ClipEngine.load(str(tiny_clip_dir), device="cpu", dtype="int4", warm_up=False)


# --------------------------------------------------------------------------------------------------
# The reduced towers


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (the setting is refused here)")
def test_bf16_tower_serves_after_its_probe_agrees(tiny_clip_dir, tiny_engine):
    engine = ClipEngine.load(str(tiny_clip_dir), device="cpu", dtype="bfloat16", probe_images=64)
    assert (engine.precision, engine.image_tower, engine.fallback_reason) == ("bfloat16", "onednn-fused", None)
    assert engine.probe is not None and engine.probe.min_cosine >= 0.99 and len(engine.probe.reference) == 64
    assert not any(p.dtype == torch.bfloat16 for p in engine.model.text_model.parameters())  # text stays fp32
    images = generated_images(engine.spec, 8, seed=3)
    ours, fp32 = engine.encode_images(images), tiny_engine.encode_images(images)
    assert ((ours * fp32).sum(-1) >= 0.99).all() and not torch.equal(ours, fp32)
    assert torch.equal(engine.encode_images(images, engine.base), fp32)  # the fp32 tower kept beside it


def test_int8_tower_is_openvino_and_batch_independent(tiny_clip_dir):
    engine = _int8_engine(tiny_clip_dir)
    assert (engine.precision, engine.image_tower) == ("int8", "openvino-int8")
    assert engine.probe is not None and engine.probe.min_cosine >= 0.99
    images = generated_images(engine.spec, 33, seed=4)
    together = engine.encode_images(images)
    alone = torch.cat([engine.encode_images(images[i : i + 1]) for i in range(33)])
    # Static activation scales: an image's embedding does not depend on its batch-mates.
    assert together.shape == (33, engine.embed_dim) and (together - alone).abs().max() < 1e-5


def test_a_probe_below_the_cosine_floor_serves_fp32(tiny_clip_dir, tiny_engine):
    before = _fallbacks("cosine")
    engine = _int8_engine(tiny_clip_dir, min_cosine=1.0)  # no int8 tower reproduces fp32 exactly
    assert engine.precision == "float32" and engine.requested_precision == "int8"
    assert engine.fallback_reason is not None and "MODERATOR_PRECISION_MIN_COSINE" in engine.fallback_reason
    assert _fallbacks("cosine") == before + 1
    images = generated_images(engine.spec, 5, seed=5)
    assert torch.allclose(engine.encode_images(images), tiny_engine.encode_images(images), atol=1e-6)


def test_int8_calibrates_on_a_directory_of_your_images(tiny_clip_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ModelLoadError, match=r"MODERATOR_INT8_CALIBRATION_DIR=.*no readable image"):
        _int8_engine(tiny_clip_dir, int8_calibration_dir=tmp_path)
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(photo_like(60, 45, seed=100 + i)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")  # skipped, with a warning
    engine = _int8_engine(tiny_clip_dir, int8_calibration_dir=tmp_path, int8_calibration_images=10)
    assert engine.precision == "int8" and engine.probe is not None and engine.probe.min_cosine >= 0.99


# --------------------------------------------------------------------------------------------------
# The decision gate


def _policy(thresholds: list[tuple[float, float]]) -> PolicySpec:
    spec = load_spec(ROOT / "policies" / "kids-platform.yaml")
    cats = [
        c.model_copy(update={"review": r, "flag": f}) for c, (r, f) in zip(spec.categories, thresholds, strict=False)
    ]
    return spec.model_copy(update={"categories": cats, "name": "edge", "default": True})


def test_agreement_is_the_share_of_unchanged_outcomes():
    spec = PolicySpec.model_validate({"name": "p", "neutral": ["n"], "categories": [
        {"name": "c", "descriptions": ["d"], "flag": 0.9, "review": 0.5}]})  # fmt: skip
    texts, _ = build_tables(spec)
    assert texts == ["d", "n"]
    policy = assemble(spec, np.eye(2, dtype=np.float32), logit_scale=10.0, model="m")
    # score = softmax over (d, n) of 10·cos: on the d axis ~1 (flag), on the n axis ~0 (allow).
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    moved = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # the third one's outcome changes
    assert agreement(policy, Probe("int8", ref, ref)) == 1.0
    assert agreement(policy, Probe("int8", ref, moved)) == 0.75


def _edge_thresholds(app: App, engine: ClipEngine) -> list[tuple[float, float]]:
    """Review thresholds placed between the fp32 and the int8 score of the probe image they differ most
    on, per category: a policy whose decisions the int8 tower cannot reproduce."""
    assert engine.probe is not None
    policy = app.compile(_policy([(0.99, 1.0)] * 5))
    ref, got = policy.scores(engine.probe.reference), policy.scores(engine.probe.candidate)
    out = []
    for j in range(ref.shape[1]):
        i = int(np.abs(ref[:, j] - got[:, j]).argmax())
        out.append((float((ref[i, j] + got[i, j]) / 2), 1.0))
    return out


def _write(directory: Path, spec: PolicySpec) -> None:
    (directory / f"{spec.name}.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))


def test_a_policy_int8_cannot_reproduce_falls_back_at_start(tiny_clip_dir, tmp_path):
    engine = _int8_engine(tiny_clip_dir)
    app = App(_settings(tmp_path), engine=engine)
    _write(tmp_path, _policy(_edge_thresholds(app, engine)))
    before = _fallbacks("agreement")
    app.policies  # noqa: B018  (loads, compiles and gates the directory)
    assert engine.precision == "float32" and engine.requested_precision == "int8"
    assert "edge" in (engine.fallback_reason or "") and "MODERATOR_PRECISION_MIN_AGREEMENT" in engine.fallback_reason
    assert app.gate.last["edge"] < 0.995 and _fallbacks("agreement") == before + 1


def test_a_reload_is_gated_before_it_serves(tiny_clip_dir, tmp_path):
    engine = _int8_engine(tiny_clip_dir)
    app = App(_settings(tmp_path), engine=engine)
    _write(tmp_path, _policy([(0.99, 1.0)] * 5))  # thresholds above every probe score: nothing moves
    registry = app.policies
    assert engine.precision == "int8" and app.gate.last == {"edge": 1.0}
    served: list[str] = []
    gate_check = registry.before_swap
    assert gate_check is not None

    def watching(new_set):  # type: ignore[no-untyped-def]
        served.append(registry.current.policies["edge"].version)  # what serves while the new set is checked
        gate_check(new_set)

    registry.before_swap = watching
    old = registry.current.policies["edge"].version
    _write(tmp_path, _policy(_edge_thresholds(app, engine)))
    assert registry.refresh()
    assert served == [old]  # the old version still served while the new one was checked ...
    assert engine.precision == "float32"  # ... and fell back: the new one never ran on int8
    assert registry.current.policies["edge"].version != old


# --------------------------------------------------------------------------------------------------
# What decisions record


def test_decisions_and_logged_embeddings_record_the_image_precision(tiny_clip_dir, tmp_path):
    engine = _int8_engine(tiny_clip_dir)
    app = App(_settings(ROOT / "policies", precision_min_agreement=0.0), engine=engine)  # the gate passes
    feed = QueueFeed(app.settings.topic("images"))
    for i in range(4):
        data = jpeg_bytes(photo_like(40, 30, seed=i))
        feed.put(f"e{i}".encode(), json.dumps({"id": f"e{i}", "image": {"data": base64.b64encode(data).decode()},
                                               "policy": "kids-platform"}).encode())  # fmt: skip
    worker = app.worker(consumer=feed, producer=feed)
    thread = threading.Thread(target=lambda: worker.run(install_signals=False))
    thread.start()
    embeddings_topic = app.settings.topic("embeddings")
    while thread.is_alive() and sum(o.topic == embeddings_topic for o in feed.outputs_since(0, 0.2)) < 4:
        pass
    worker.stop("test done")
    thread.join(30)
    records = {o.topic: json.loads(o.value) for o in feed.outputs}
    assert records[app.settings.topic("decisions")]["image_precision"] == "int8"
    logged = records[embeddings_topic]
    assert logged["image_precision"] == "int8" and logged["live"]["image_precision"] == "int8"
    assert logged["model"] == engine.fingerprint  # the fingerprint names the weights; the precision is beside it


def test_the_wire_format_names_the_image_precision_and_reads_older_records():
    for record in ("DecisionRecord", "ReviewItem", "EmbeddingRecord", "ShadowDecisionRecord", "Verdict"):
        assert "image_precision" in json.dumps(schemas()[record]), record
    old = {"decision": "allow", "scores": {}, "triggered": [], "policy": {"name": "p", "version": "v"}, "model": "m"}
    assert Decision.model_validate(old).image_precision == "float32"  # written before the field existed
    with pytest.raises(ValueError):
        Decision.model_validate(old | {"image_precision": "int4"})
    assert "image_precision" in EmbeddingRecord.model_fields and "image_precision" in ReviewItem.model_fields


def test_probe_images_are_fixed(tiny_engine):
    a = generated_images(tiny_engine.spec, 3, PROBE_SEED)
    assert a.shape == (3, *tiny_engine.spec.output_hw, 3) and a.dtype == np.uint8
    assert np.array_equal(a, generated_images(tiny_engine.spec, 3, PROBE_SEED))


def test_openvino_and_nncf_telemetry_stays_off():
    """OpenVINO's tools turn their usage telemetry on (no consent file means yes) each time they start;
    after no_telemetry() the shared telemetry object never consents, whatever they set."""
    import openvino_telemetry

    from moderator.int8 import no_telemetry

    no_telemetry()
    telemetry = openvino_telemetry.Telemetry(app_name="ovc-test", app_version="0", tid="G-TEST", backend="ga4",
                                             enable_opt_in_dialog=False)  # fmt: skip
    telemetry.init(app_name="nncf-test", app_version="0", tid="G-TEST", backend="ga4", enable_opt_in_dialog=False)
    assert telemetry.consent is False
