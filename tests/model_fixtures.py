"""Model fixtures: tiny and full-size randomly initialized CLIP checkpoints, built once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from moderator.random_init import build_clip_checkpoint


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP (32 px input, 16-dim embeddings) saved with save_pretrained."""
    return build_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip"), "tiny", seed=0)


@pytest.fixture(scope="session")
def b32_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialized CLIP with the ViT-B/32 architecture (224 px input, 512-dim embeddings)."""
    return build_clip_checkpoint(tmp_path_factory.mktemp("b32-clip"), "ViT-B/32", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_clip_dir: Path):  # type: ignore[no-untyped-def]
    from moderator.clip import ClipEngine

    return ClipEngine.load(str(tiny_clip_dir), device="cpu")
