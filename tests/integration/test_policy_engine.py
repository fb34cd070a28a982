"""Policies on the real engine (tiny CLIP) and the real Redis: caching, fidelity, hot reload."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import pipeline

from moderator.clients import make_redis
from moderator.embedding_cache import TextEmbeddingCache, TextEncoder
from moderator.observability import POLICY_RELOADS
from moderator.policy import InvalidPolicy, PolicyError, PolicyRegistry, PolicySpec, compile_policy, load_spec
from moderator.policy.directory import DirectorySource
from moderator.samples import photo_like

POLICY = {
    "name": "alpha",
    "templates": ["a photo of {}.", "an image containing {}."],
    "neutral": ["a landscape", "a plate of food"],
    "categories": [
        {"name": "weapons", "descriptions": ["a handgun", "a rifle"], "contrasts": ["a toy water pistol"],
         "flag": 0.9, "review": 0.5},
        {"name": "gore", "descriptions": ["graphic injury with blood"], "contrasts": ["red paint"],
         "flag": 0.9, "review": 0.5},
    ],
}  # fmt: skip


def encoder_for(engine, url: str, prefix: str) -> TextEncoder:
    cache = TextEmbeddingCache(engine.fingerprint, engine.embed_dim, make_redis(url, 500, 500), prefix=prefix)
    return TextEncoder(engine, cache)


def test_changing_one_description_encodes_only_its_prompts(tiny_engine, redis_service, redis_key_prefix,
                                                           redis_client):  # fmt: skip
    worker = encoder_for(tiny_engine, redis_service.url, redis_key_prefix)
    spec = PolicySpec.model_validate(POLICY)
    first = compile_policy(spec, worker)
    n_texts = 2 + 1 + 1 + 1 + 2  # descriptions, contrasts, neutral
    assert worker.texts_encoded == n_texts * 2  # one prompt per template
    edited = {**POLICY, "categories": [{**POLICY["categories"][0], "descriptions": ["a handgun", "a shotgun"]},
                                       POLICY["categories"][1]]}  # fmt: skip
    second = compile_policy(PolicySpec.model_validate(edited), worker)
    assert worker.texts_encoded == n_texts * 2 + 2  # "a shotgun" under both templates, nothing else
    assert first.version != second.version
    other_worker = encoder_for(tiny_engine, redis_service.url, redis_key_prefix)
    again = compile_policy(PolicySpec.model_validate(edited), other_worker)
    assert other_worker.texts_encoded == 0
    assert torch.equal(again.matrix, second.matrix)


def test_policy_score_equals_reference_pipeline(tiny_engine, tiny_clip_dir):
    """One description per category, the others as contrasts: the pipeline's candidate set."""
    labels = ["a handgun", "graphic injury with blood", "a cat", "a beach at sunset"]
    spec = PolicySpec.model_validate({
        "name": "ref",
        "templates": ["This is a photo of {}."],
        "categories": [
            {"name": f"c{i}", "descriptions": [lb], "contrasts": [o for o in labels if o != lb],
             "flag": 1.0, "review": 1.0}
            for i, lb in enumerate(labels)
        ],
    })  # fmt: skip
    policy = compile_policy(spec, TextEncoder(tiny_engine, TextEmbeddingCache(tiny_engine.fingerprint, 16)))
    pipe = pipeline("zero-shot-image-classification", model=str(tiny_clip_dir), device="cpu")
    from moderator.images import preprocess

    for seed in range(5):
        img = Image.fromarray(photo_like(120, 90, seed=seed))
        scores = policy.scores(tiny_engine.encode_images(preprocess(img, tiny_engine.spec)[None]))[0]
        ref = {r["label"]: r["score"] for r in pipe(img, candidate_labels=labels)}
        assert np.allclose(scores, [ref[lb] for lb in labels], atol=1e-5)


def test_pinned_policy_refuses_another_model(tiny_engine):
    spec = PolicySpec.model_validate({**POLICY, "model": "openai/clip-vit-large-patch14"})
    with pytest.raises(PolicyError, match="pinned"):
        compile_policy(spec, TextEncoder(tiny_engine, TextEmbeddingCache(tiny_engine.fingerprint, 16)))


# --- hot reload ----------------------------------------------------------------------------------


def variant(threshold: float, name: str = "alpha") -> dict:
    cats = [dict(c) for c in POLICY["categories"]]
    cats[0]["review"] = threshold
    return {**POLICY, "name": name, "categories": cats}


def wait_until(pred, timeout: float = 2.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s")


def test_hot_reload_under_load(tiny_engine, tmp_path):
    encoder = TextEncoder(tiny_engine, TextEmbeddingCache(tiny_engine.fingerprint, 16))
    d = tmp_path / "policies"
    d.mkdir()
    a = d / "alpha.yaml"
    a.write_text(yaml.safe_dump(variant(0.5)))
    registry = PolicyRegistry(DirectorySource(d), lambda spec, src: compile_policy(spec, encoder, src), interval_s=0.1)
    registry.load_initial()
    versions = [PolicySpec.model_validate(variant(t)).version() for t in (0.5, 0.4, 0.3, 0.2)]
    assert registry.current.get(None).version == versions[0]

    embs = tiny_engine.encode_images(np.stack([np.asarray(Image.fromarray(photo_like(32, 32, s))) for s in range(8)]))
    seen: list[str] = []
    stop = threading.Event()
    problems: list[str] = []

    def score_batches() -> None:
        while not stop.is_set():
            snapshot = registry.current  # a batch takes one snapshot ...
            decisions = snapshot.get("alpha").decisions(embs)
            time.sleep(0.005)
            batch_versions = {dec.policy.version for dec in decisions}  # ... and finishes with it
            if len(batch_versions) != 1:
                problems.append(f"mixed versions in one batch: {batch_versions}")
            seen.extend(batch_versions)

    errors_before = POLICY_RELOADS.labels(result="error")._value.get()
    registry.start()
    scorer = threading.Thread(target=score_batches)
    scorer.start()
    try:
        # 1. an editor that writes in place
        time.sleep(0.05)
        a.write_text(yaml.safe_dump(variant(0.4)))
        took = wait_until(lambda: registry.current.get("alpha").version == versions[1])
        assert took < 2.0
        # 2. an editor that writes a temporary file and renames it over the original
        tmp = d / ".alpha.yaml.swp"
        tmp.write_text(yaml.safe_dump(variant(0.3)))
        os.replace(tmp, a)
        wait_until(lambda: registry.current.get("alpha").version == versions[2])
        # 3. a broken edit: never goes live, the last good version keeps serving
        a.write_text("name: alpha\ncategories: [\n")
        wait_until(lambda: POLICY_RELOADS.labels(result="error")._value.get() > errors_before)
        time.sleep(0.3)
        assert registry.current.get("alpha").version == versions[2]
        a.write_text(yaml.safe_dump({**variant(0.2), "categories": [{**POLICY["categories"][0], "review": 0.95}]}))
        time.sleep(0.4)  # thresholds out of order: invalid too
        assert registry.current.get("alpha").version == versions[2]
        # 4. the fix goes live
        a.write_text(yaml.safe_dump(variant(0.2)))
        wait_until(lambda: registry.current.get("alpha").version == versions[3])
        # 5. added, renamed and removed files
        b = d / "beta.yml"
        b.write_text(yaml.safe_dump(variant(0.5, name="beta")))
        wait_until(lambda: "beta" in registry.current.policies)
        os.rename(a, d / "alpha-renamed.yaml")
        wait_until(lambda: registry.current.policies["alpha"].source.endswith("alpha-renamed.yaml"))
        b.unlink()
        wait_until(lambda: "beta" not in registry.current.policies)
        time.sleep(0.1)
    finally:
        stop.set()
        scorer.join()
        registry.stop()
    assert not problems, problems[:3]
    assert set(seen) <= set(versions)  # no decision ever carried an invalid version
    order = [versions.index(v) for v in seen]
    assert order == sorted(order)  # after a swap, every decision carries the new version
    assert set(order) == {0, 1, 2, 3}


def test_start_with_an_invalid_file_serves_the_others_unless_strict(tiny_engine, tmp_path):
    encoder = TextEncoder(tiny_engine, TextEmbeddingCache(tiny_engine.fingerprint, 16))
    d = tmp_path / "p"
    d.mkdir()
    (d / "good.yaml").write_text(yaml.safe_dump({**POLICY, "default": True}))
    (d / "bad.yaml").write_text(yaml.safe_dump({**POLICY, "name": "bad", "colour": "red"}))
    errors_before = POLICY_RELOADS.labels(result="error")._value.get()
    registry = PolicyRegistry(DirectorySource(d), lambda spec, src: compile_policy(spec, encoder, src))
    current = registry.load_initial()
    assert set(current.policies) == {"alpha"} and current.get(None).spec.name == "alpha"
    assert POLICY_RELOADS.labels(result="error")._value.get() == errors_before + 1
    with pytest.raises(InvalidPolicy, match="colour") as info:
        current.get("bad")  # its own reason, not "unknown"
    assert info.value.reason == "invalid_policy"
    strict = PolicyRegistry(DirectorySource(d, strict=True), lambda spec, src: compile_policy(spec, encoder, src))
    with pytest.raises(PolicyError) as refused:
        strict.load_initial()
    assert "bad.yaml" in str(refused.value) and "colour" in str(refused.value)
    with pytest.raises(PolicyError, match="does not exist"):
        PolicyRegistry(DirectorySource(tmp_path / "missing"), lambda s, src: None).load_initial()  # type: ignore[arg-type]


def test_policy_check_cli(tmp_path, capsys):
    from moderator.cli import main

    root = Path(__file__).resolve().parents[2]
    assert main(["policy", "check", str(root / "policies")]) == 0
    out = capsys.readouterr().out
    assert "community-standards" in out and "kids-platform" in out and "sha256:" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncategories: [{name: c, descriptions: [a], flag: 0.2, review: 0.5}]\n")
    assert main(["policy", "check", str(root / "policies"), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: categories[0](c): Value error, review threshold 0.5 must not exceed flag threshold 0.2" in err
    assert load_spec(root / "policies/kids-platform.yaml").name == "kids-platform"
