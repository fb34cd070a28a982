"""The shared text-embedding cache on the real Redis: sharing, fail-open, validation, isolation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
from structlog.testing import capture_logs

from moderator.clients import make_redis
from moderator.clip import ClipEngine
from moderator.embedding_cache import TextEmbeddingCache, TextEncoder, encode_value
from moderator.random_init import build_clip_checkpoint
from moderator.stack import LocalStack

PROMPTS = [f"a photo of {thing}." for thing in ("a handgun", "a rifle", "a cat", "blood", "a beach", "a crowd")]

WORKER = textwrap.dedent(
    """
    import json, sys, hashlib
    from moderator.clip import ClipEngine
    from moderator.clients import make_redis
    from moderator.embedding_cache import TextEmbeddingCache, TextEncoder
    model_dir, url, prefix, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    engine = ClipEngine.load(model_dir, device="cpu", warm_up=False)
    client = make_redis(url, 1000, 1000)
    cache = TextEmbeddingCache(engine.fingerprint, engine.embed_dim, client, prefix=prefix)
    encoder = TextEncoder(engine, cache)
    vecs = encoder.encode(prompts)
    print(json.dumps({"encoded": encoder.texts_encoded, "vectors": vecs.tobytes().hex()}))
    """
)


def run_worker(model_dir, url, prefix, prompts):
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(model_dir), url, prefix, json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_encoder(engine, client, prefix, **kw):
    return TextEncoder(engine, TextEmbeddingCache(engine.fingerprint, engine.embed_dim, client, prefix=prefix, **kw))


def test_second_process_encodes_nothing_and_gets_identical_vectors(
    tiny_clip_dir, redis_service, redis_key_prefix, redis_client
):
    first = run_worker(tiny_clip_dir, redis_service.url, redis_key_prefix, PROMPTS)
    assert first["encoded"] == len(PROMPTS)
    second = run_worker(tiny_clip_dir, redis_service.url, redis_key_prefix, [*PROMPTS, "a new prompt"])
    assert second["encoded"] == 1  # only the prompt the first process never saw
    n, d = len(PROMPTS), 16 * 4
    assert second["vectors"][: n * d * 2] == first["vectors"]  # bit-identical
    assert len(redis_client.keys(redis_key_prefix + "*")) == len(PROMPTS) + 1


def test_wrong_dim_entry_is_detected_recomputed_and_overwritten(tiny_engine, redis_client, redis_key_prefix):
    enc = make_encoder(tiny_engine, redis_client, redis_key_prefix)
    key = enc.cache.key(PROMPTS[0])
    redis_client.set(key, encode_value(np.ones(tiny_engine.embed_dim + 3, dtype=np.float32)))
    redis_client.set(enc.cache.key(PROMPTS[1]), b"garbage")
    redis_client.set(enc.cache.key(PROMPTS[2]), np.ones(tiny_engine.embed_dim, dtype=np.float64).tobytes())
    with capture_logs() as logs:
        got = enc.encode(PROMPTS[:3])
    assert enc.texts_encoded == 3
    assert sum(1 for e in logs if e["event"] == "text_cache_value_rejected") == 3
    want = tiny_engine.encode_texts(PROMPTS[:3]).numpy()
    assert np.allclose(got, want, atol=1e-6)
    fresh = make_encoder(tiny_engine, redis_client, redis_key_prefix)
    assert np.array_equal(fresh.encode(PROMPTS[:3]), got)  # overwritten with good values ...
    assert fresh.texts_encoded == 0  # ... that a new worker reads


def test_entries_of_another_model_are_never_used(tmp_path, redis_client, redis_key_prefix):
    a = ClipEngine.load(str(build_clip_checkpoint(tmp_path / "a", seed=1)), device="cpu", warm_up=False)
    b = ClipEngine.load(str(build_clip_checkpoint(tmp_path / "b", seed=2)), device="cpu", warm_up=False)
    enc_a = make_encoder(a, redis_client, redis_key_prefix)
    vec_a = enc_a.encode(PROMPTS)
    enc_b = make_encoder(b, redis_client, redis_key_prefix)
    vec_b = enc_b.encode(PROMPTS)
    assert enc_b.texts_encoded == len(PROMPTS)  # nothing of model a's was read
    assert np.allclose(vec_b, b.encode_texts(PROMPTS).numpy(), atol=1e-6)
    assert not np.allclose(vec_a, vec_b)
    assert len(redis_client.keys(redis_key_prefix + "*")) == 2 * len(PROMPTS)


def test_redis_stopped_mid_run_fails_open_and_says_so_once(tiny_engine, tmp_path):
    own = LocalStack(tmp_path / "redis")
    info = own.start(kafka=False, redis=True)
    client = make_redis(info.redis_url, 100, 100)
    enc = make_encoder(tiny_engine, client, "t:", lru_size=0, retry_after_s=0.0)
    warm = enc.encode(PROMPTS)
    assert enc.texts_encoded == len(PROMPTS)
    own.stop()
    with capture_logs() as logs:
        for _ in range(5):  # several calls during the outage: computed locally, one warning
            again = enc.encode(PROMPTS)
    assert np.allclose(again, warm, atol=1e-6)
    assert [e["event"] for e in logs].count("redis_unavailable") == 1
    assert enc.texts_encoded == 6 * len(PROMPTS)


def test_classify_works_with_redis_down(capsys, monkeypatch, tiny_clip_dir, tmp_path):
    from PIL import Image

    from moderator.cli import main
    from moderator.stack import free_port

    image = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(image)
    monkeypatch.setenv("MODERATOR_MODEL_ID", str(tiny_clip_dir))
    monkeypatch.setenv("MODERATOR_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    code = main(["classify", str(image), "--label", "a cat", "--label", "a dog"])
    out, err = capsys.readouterr()
    assert code == 0
    row = json.loads(out.splitlines()[-1])
    assert abs(sum(row["scores"].values()) - 1) < 1e-6
    assert err.count("redis_unavailable") == 1


def test_stalled_redis_costs_at_most_a_timeout(tiny_engine):
    """A Redis that accepts connections and never answers: bounded by the socket timeout, then local."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    client = make_redis(f"redis://127.0.0.1:{server.getsockname()[1]}/0", 100, 100)
    enc = make_encoder(tiny_engine, client, "stall:", retry_after_s=60)
    try:
        t0 = time.perf_counter()
        enc.encode(["stalled"])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        enc.encode(["stalled too"])  # Redis is skipped for retry_after_s: no second wait
        second = time.perf_counter() - t0
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert enc.texts_encoded == 2
    assert first < 0.5, first
    assert second < 0.09, second
