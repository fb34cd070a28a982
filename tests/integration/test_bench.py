"""`moderator bench` end to end: through the real Kafka and Redis, from the command line, and the
GPU script run on the CPU. The tiny model keeps it fast; what is checked is that every figure is
there, measured, and consistent, never how fast anything was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moderator.bench import BenchOptions, render_table, run_bench

ROOT = Path(__file__).resolve().parents[2]
PIPELINE_STAGES = {"decode", "preprocess", "transfer", "forward", "score", "publish", "produce"}


def _check_contender_rates(report: dict) -> None:
    rates = {k: v["images_per_s"] for k, v in report["contenders"].items() if "images_per_s" in v}
    assert all(r > 0 for r in rates.values()), rates
    for name, value in report["ratios"].items():
        a, b = name.split("_over_")
        assert value == pytest.approx(rates[a] / rates[b], rel=0.01, abs=1e-3), name


def test_bench_through_real_kafka_and_redis(kafka_service, redis_service, tiny_clip_dir):
    opts = BenchOptions(
        arch="tiny", model=str(tiny_clip_dir), images=96, distinct=16, batch=16, reference_images=4,
        ceiling_batches=2, load_levels=(50,), load_seconds=2, kafka_bootstrap=kafka_service.bootstrap_servers,
        kafka_api_version=kafka_service.api_version, redis_url=redis_service.url, sweep_batch=(8,),
        sweep_prompts=(4, 20), log_records=3000, bank_sizes=(500, 5000),
        contenders=("reference", "engine", "worker", "ceiling", "replay", "banks", "animated"),
    )  # fmt: skip
    report = run_bench(opts, create_topics=kafka_service.create_topics)
    assert set(report["contenders"]) == {"reference", "engine", "worker", "ceiling", "replay", "banks", "animated"}
    _check_contender_rates(report)
    banks = report["contenders"]["banks"]
    assert set(banks["workers"]) == {"none_before", "500", "5000", "none_after"}
    assert all(w["images_per_s"] > 0 for w in banks["workers"].values())
    assert "banks" in banks["workers"]["5000"]["stages"] and "pdq" in banks["workers"]["5000"]["stages"]
    assert [s["entries"] for s in banks["search_per_batch"]] == [1_000, 10_000, 100_000]
    assert banks["pdq"]["ms_per_image"] > 0
    assert "known-image banks" in render_table(report)
    animated = report["contenders"]["animated"]  # 2 of the 16 distinct inputs are 8-frame GIFs
    assert animated["rows_per_input"] == pytest.approx((14 + 2 * 8) / 16, abs=1e-3)
    assert animated["mix_images_per_s"] > 0 and all(r > 0 for r in animated["stills_runs_images_per_s"])
    assert animated["mix_vs_stills"] == pytest.approx(animated["mix_images_per_s"] / animated["stills_images_per_s"],
                                                      abs=1e-3)  # fmt: skip
    assert "animated inputs" in render_table(report)
    assert set(report["ratios"]) >= {"worker_over_ceiling", "worker_over_reference", "engine_over_reference"}

    worker = report["contenders"]["worker"]
    assert worker["feed"] == "kafka" and worker["images"] == 96 and worker["partitions"] == 4
    stages = worker["stages"]
    assert set(stages) >= PIPELINE_STAGES and "fetch" not in stages, stages
    assert stages["decode"]["count"] == stages["preprocess"]["count"] == 96  # each event decoded once
    assert 96 // 16 <= stages["forward"]["count"] <= 96
    # A decision per event (plus review items); an ack may come after the decision was read.
    assert stages["produce"]["count"] >= 96 - 16
    [load] = worker["latency"]
    assert load["load_pct"] == 50 and load["decided"] == load["events"] >= 10
    assert load["p50_ms"] <= load["p95_ms"] <= load["p99_ms"] <= load["max_ms"]

    engine = report["contenders"]["engine"]
    # The CPU's schedule is pipelined; beside a torch tower (this fp32 one) it decodes each batch when it
    # runs, as the worker does.
    assert engine["decode"] == "before_forward"
    assert {"decode", "preprocess", "transfer", "forward", "score"} <= set(engine["stages"])
    assert report["contenders"]["reference"]["max_abs_probability_difference_vs_engine"] < 1e-4
    assert len(report["contenders"]["ceiling"]["slices_images_per_s"]) == 3
    assert report["inputs"]["prompts"] == 12 and report["model"]["random_init"]

    [batch] = report["sweeps"]["batch"]
    assert batch["batch"] == 8 and batch["engine_images_per_s"] > 0 and batch["ceiling_images_per_s"] > 0
    small, large = report["sweeps"]["prompts"]
    assert (small["prompts"], large["prompts"]) == (4, 20)
    assert small["texts_encoded_first"] == 0  # its 4 prompts are among the 12 already compiled
    assert large["texts_encoded_first"] == 8 and large["texts_encoded_again"] == 0  # the text cache at work

    replay = report["contenders"]["replay"]
    same, log = replay["same_events"], replay["log"]
    decided = worker["images"] + load["decided"]
    assert same["replayed"] == decided  # the worker's own events, each once, from its embeddings log
    assert log["replayed"] == log["records"] == 3000
    for x in (same, log):
        assert set(x["seconds"]) == {"read", "parse", "decode", "decide"} and x["per_s"] > 0
        assert x["over_worker"] == pytest.approx(x["per_s"] / worker["images_per_s"], rel=0.01)

    table = render_table(report)
    for name in ("reference", "engine", "worker", "ceiling", "latency vs offered load", "throughput vs prompts",
                 "3,000-record log"):  # fmt: skip
        assert name in table
    json.dumps(report)  # every figure is plain JSON


def test_bench_http_contender_under_a_mixed_load(kafka_service, redis_service, tiny_clip_dir):
    """The endpoint inside the worker: HTTP alone, then HTTP beside stream events at half the stream's measured
    capacity; every phase's figures are there and consistent."""
    opts = BenchOptions(
        arch="tiny", model=str(tiny_clip_dir), images=64, distinct=8, batch=8, contenders=("http",),
        load_seconds=2, http_clients=2, kafka_bootstrap=kafka_service.bootstrap_servers,
        kafka_api_version=kafka_service.api_version, redis_url=redis_service.url,
    )  # fmt: skip
    report = run_bench(opts, create_topics=kafka_service.create_topics)
    h = report["contenders"]["http"]
    assert h["stream_alone_images_per_s"] > 0
    for x in (h["http_alone"], h["mixed"]["http"]):
        assert x["clients"] == 2 and x["requests"] >= 2 and x["statuses"].get("200", 0) >= 2
        assert 0 < x["p50_ms"] <= x["p95_ms"] <= x["p99_ms"] <= x["max_ms"] and x["decided_per_s"] > 0
    stream = h["mixed"]["stream"]
    assert h["mixed"]["stream_pct"] == 50
    assert stream["offered_per_s"] == pytest.approx(h["stream_alone_images_per_s"] / 2, rel=0.01)
    assert stream["decided"] == stream["events"] and stream["achieved_per_s"] > 0
    table = render_table(report)
    assert "http alone" in table and "mixed, stream" in table
    json.dumps(report)


def test_bench_url_source_through_the_in_process_feed(tiny_clip_dir):
    opts = BenchOptions(
        arch="tiny", model=str(tiny_clip_dir), images=48, distinct=8, batch=8, source="url", feed="queue",
        contenders=("engine", "worker"), load_levels=(50,), load_seconds=1,
    )  # fmt: skip
    report = run_bench(opts)
    worker = report["contenders"]["worker"]
    assert worker["feed"] == "queue"
    assert worker["stages"]["fetch"]["count"] == 48  # every image fetched from the local HTTP server
    assert worker["latency"][0]["decided"] == worker["latency"][0]["events"]
    assert any("in-process queue" in note for note in report["notes"])
    assert "ceiling" not in report["contenders"] and "worker_over_ceiling" not in report["ratios"]


def test_bench_per_precision_in_one_run(tiny_clip_dir):
    opts = BenchOptions(
        arch="tiny", model=str(tiny_clip_dir), images=48, distinct=8, batch=8, feed="queue",
        contenders=("worker", "ceiling"), precisions=("float32", "int8"), load_levels=(50,), load_seconds=1,
        ceiling_batches=2,
    )  # fmt: skip
    report = run_bench(opts)
    fp32, int8 = report["precisions"]["float32"], report["precisions"]["int8"]
    assert fp32["ceiling"] == report["contenders"]["ceiling"] and fp32["worker"] == report["contenders"]["worker"]
    assert fp32["ceiling_over_float32_ceiling"] == 1.0 and fp32["gate"]["serving"] == "float32"
    assert len(int8["ceiling"]["slices_images_per_s"]) == 3 and int8["worker"]["images"] == 48
    assert int8["worker"]["latency"] == []  # the latency levels are the main precision's
    assert int8["ceiling"]["image_precision"] == int8["gate"]["serving"]
    for what in ("ceiling", "worker"):
        ratio = int8[f"{what}_over_float32_ceiling"]
        assert ratio == pytest.approx(int8[what]["images_per_s"] / fp32["ceiling"]["images_per_s"], rel=0.01, abs=6e-4)
    gate = int8["gate"]
    assert gate["probe_images"] == 200 and gate["min_cosine"] >= 0.99 and set(gate["agreement"]) == {"bench"}
    assert gate["image_tower"] == ("openvino-int8" if gate["serving"] == "int8" else "onednn-fused")
    # MODERATOR_IMAGE_JPEG_DRAFT=auto: exact decoding at fp32, DCT-scaled for the reduced precision
    assert fp32["jpeg_draft"] == {"on": False, "images": 8}
    draft = int8["jpeg_draft"]
    assert draft["on"] is (gate["serving"] != "float32") and draft["images"] == 8
    if draft["on"]:
        assert 0.9 < draft["min_cosine"] <= draft["mean_cosine"] <= 1.0 + 1e-6 and 0.0 <= draft["agreement"] <= 1.0
    table = render_table(report)
    assert "image tower per precision" in table and "int8 worker stages" in table
    json.dumps(report)


def _env(tmp_path: Path) -> dict[str, str]:
    # The random-init tiny checkpoint is built into this cache (not the user's).
    return {**os.environ, "MODERATOR_STACK_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def test_bench_command_line(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "moderator.cli", "bench", "--quick", "--arch", "tiny", "--feed", "kafka",
         "--contenders", "engine,worker,ceiling", "--images", "48", "--batch", "8", "--load-seconds", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["images"] == 48 and report["model"]["architecture"] == "tiny"
    assert report["wall_s"] > 0 and not report["sweeps"]  # --quick: no sweeps
    _check_contender_rates(report)
    assert "worker" in done.stdout and "ceiling" in done.stdout and str(out) in done.stdout
    # a person reads tables and progress, never log lines: none while the local stack starts, none after
    # it stops (every Kafka client is closed first)
    logged = [line for line in (done.stdout + done.stderr).splitlines() if line.lstrip().startswith("{")]
    assert not logged, logged[:5]

    bad = subprocess.run([sys.executable, "-m", "moderator.cli", "bench", "--sizes", "640"],
                         capture_output=True, text=True, timeout=120, env=_env(tmp_path))  # fmt: skip
    assert bad.returncode == 2 and "bad size '640'" in bad.stderr


def test_gpu_script_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh as on a GPU machine without Kafka, with the device and model overridden."""
    env = _env(tmp_path) | {
        "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "BENCH_DEVICE": "cpu", "BENCH_DTYPE": "float32",
        "BENCH_ARCHS": "tiny", "BENCH_BATCH": "8",
        "BENCH_ARGS": "--quick --images 32 --reference-images 2 --load-seconds 1",
    }  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-tiny.json").read_text())
    assert set(report["contenders"]) == {"reference", "engine", "worker", "ceiling"}
    assert report["contenders"]["worker"]["feed"] == "queue"
    assert any("in-process queue" in note for note in report["notes"])
    assert report["machine"]["device"] == "cpu" and report["config"]["batch"] == 8
    assert "in-process queue" in (tmp_path / "out" / "gpu-tiny.txt").read_text()


def test_bench_eos_contender_prices_exactly_once_against_at_least_once(tiny_clip_dir):
    """Its own Tansu broker (the run needs no other): the worker at-least-once, exactly-once, at-least-once
    again, each with its throughput and latency at half its capacity; the table says the ratio."""
    opts = BenchOptions(arch="tiny", model=str(tiny_clip_dir), images=96, distinct=8, batch=8, contenders=("eos",),
                        load_seconds=2)  # fmt: skip
    report = run_bench(opts)
    e = report["contenders"]["eos"]
    assert e["broker"].startswith("tansu") and len(e["at_least_once_runs_images_per_s"]) == 2
    assert e["exactly_once_images_per_s"] > 0 and e["exactly_once_vs_at_least_once"] == pytest.approx(
        e["exactly_once_images_per_s"] / e["at_least_once_images_per_s"], rel=0.01
    )
    assert set(e["latency_at_50pct"]) == {"at-least-once", "exactly-once", "at-least-once again"}
    assert e["transaction_ms"]["count"] >= 1  # the exactly-once run committed transactions
    assert "exactly-once (tansu" in render_table(report)
    json.dumps(report)
