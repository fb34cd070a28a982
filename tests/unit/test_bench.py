"""The benchmark's pure parts: inputs, policy, accounting, ratios, the table, collecting decisions."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from moderator.bench.inputs import _SUBJECTS, EventSource, bench_policy, make_images, prompt_bank, size_plan
from moderator.bench.measure import percentiles, stage_breakdown
from moderator.bench.options import BenchError, BenchOptions, parse_ints, parse_sizes
from moderator.bench.report import render_table
from moderator.bench.run import ratios
from moderator.bench.worker_run import _QueueTransport
from moderator.policy import build_tables
from moderator.random_init import VOCABULARY_WORDS, build_tokenizer
from moderator.worker.feed import QueueFeed
from moderator.worker.stages import decode_schedule


def test_size_mix_parses_and_keeps_its_proportions():
    assert parse_sizes("640x480") == ((640, 480, 1),)
    sizes = parse_sizes("640x480:3, 1280x720:1")
    assert sizes == ((640, 480, 3), (1280, 720, 1))
    plan = size_plan(sizes, 400)
    assert plan.count((640, 480)) == 300 and plan.count((1280, 720)) == 100
    for bad in ("640", "640x", "x480", "640x480:0", "0x480", "640x480:a", "640*480"):
        with pytest.raises(BenchError):
            parse_sizes(bad)
    assert parse_ints("25, 50,100") == (25, 50, 100)
    for bad in ("25,a", "0", "-5"):
        with pytest.raises(BenchError):
            parse_ints(bad)


def test_generated_images_are_photo_like_jpegs_of_the_mix():
    images = make_images(parse_sizes("64x48:2,40x90:1"), 6, seed=3, threads=2)
    assert len(set(images)) == 6  # all distinct
    sizes = [Image.open(io.BytesIO(d)).size for d in images]
    assert sizes == [(64, 48), (64, 48), (40, 90)] * 2
    assert all(Image.open(io.BytesIO(d)).format == "JPEG" for d in images)
    # Photo-like: compresses like a photo, far from flat colour (tiny) and from noise (huge).
    big = make_images(parse_sizes("640x480"), 2, seed=0)
    assert all(15_000 < len(d) < 150_000 for d in big), [len(d) for d in big]


def test_prompt_bank_is_distinct_plain_language_in_the_test_vocabulary():
    bank = prompt_bank(1080)
    assert len(set(bank)) == 1080
    assert prompt_bank(40) == list(_SUBJECTS)  # the first ones: every subject, plain
    words = {w for p in bank for w in re.findall(r"[a-z]+", p)}
    assert words <= set(VOCABULARY_WORDS), sorted(words - set(VOCABULARY_WORDS))
    with pytest.raises(BenchError):
        prompt_bank(1081)


def test_vocabulary_words_tokenize_about_as_real_clip_does():
    tok = build_tokenizer()
    ids = tok(["a photo of a dog", "pills on a table"])["input_ids"]
    assert [len(i) for i in ids] == [7, 6]  # start + one token per word + end
    assert all(len(tok(w)["input_ids"]) == 3 for w in VOCABULARY_WORDS)  # start, the word, end
    unknown = tok(["zqxj"])["input_ids"][0]
    assert len(unknown) == 6  # anything else: a token per character
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == "a photo of a dog"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12, 13, 100])
def test_bench_policy_holds_exactly_the_prompts(n):
    texts = prompt_bank(n)
    spec = bench_policy(texts)
    assert spec.templates == ["This is a photo of {}."]  # the reference pipeline's default template
    got, tables = build_tables(spec)
    assert sorted(got) == sorted(texts)
    assert tables.positive.any(dim=1).all()  # every category has descriptions
    with pytest.raises(BenchError):
        bench_policy([])


def test_stage_breakdown_is_the_difference_per_image():
    before = {"decode": (10.0, 1.0), "forward": (2.0, 4.0), "fetch": (5.0, 1.0)}
    after = {"decode": (42.0, 1.8), "forward": (3.0, 6.0), "fetch": (5.0, 1.0), "publish": (1.0, 0.01)}
    out = stage_breakdown(before, after, images=32)
    assert set(out) == {"decode", "forward", "publish"}  # fetch did not move
    assert out["decode"] == {"count": 32, "seconds": 0.8, "ms_per_image": 25.0}
    assert out["forward"]["ms_per_image"] == pytest.approx(62.5)
    assert list(out) == ["decode", "forward", "publish"]  # pipeline order


def test_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    seconds = rng.exponential(0.1, size=1000)
    out = percentiles(seconds)
    for q in (50, 95, 99):
        assert out[f"p{q}_ms"] == pytest.approx(np.percentile(seconds * 1000, q), abs=0.05)
    assert out["p50_ms"] <= out["p95_ms"] <= out["p99_ms"] <= out["max_ms"]
    assert percentiles([]) == {}


def _report() -> dict:
    return {
        "config": {"batch": 32},
        "machine": {"device": "cpu"},
        "model": {"architecture": "ViT-B/32", "random_init": True, "id": "x", "dtype": "float32"},
        "inputs": {"prompts": 12, "mean_prompt_tokens": 6.0, "sizes": ["640x480"], "mean_jpeg_bytes": 41000,
                   "source": "inline"},
        "contenders": {
            "reference": {"images_per_s": 5.0},
            "engine": {"images_per_s": 40.0, "stages": {"forward": {"ms_per_image": 20.0}}},
            "worker": {"images_per_s": 36.0, "feed": "kafka", "model_share_of_wall": 0.9,
                       "stages": {"decode": {"ms_per_image": 1.0}},
                       "latency": [{"load_pct": 50, "offered_per_s": 18.0, "achieved_per_s": 18.0,
                                    "p50_ms": 100.0, "p95_ms": 150.0, "p99_ms": 160.0}]},
            "ceiling": {"images_per_s": 45.0},
        },
        "sweeps": {},
        "notes": ["random weights"],
    }  # fmt: skip


def test_ratios_and_table():
    report = _report()
    report["ratios"] = ratios(report["contenders"])
    assert report["ratios"] == {"worker_over_ceiling": 0.8, "worker_over_reference": 7.2,
                                "engine_over_reference": 8.0, "engine_over_ceiling": 0.889,
                                "worker_over_engine": 0.9}  # fmt: skip
    table = render_table(report)
    rows = {r[0]: r for r in (line.split() for line in table.splitlines()) if len(r) > 3 and r[1][0].isdigit()}
    assert rows["worker"][1:4] == ["36.00", "7.20x", "0.80x"]
    assert rows["reference"][1:4] == ["5.00", "1.00x", "0.11x"]
    assert "p99 160.0 ms" in table and "note: random weights" in table
    assert ratios({"engine": {"images_per_s": 10.0}}) == {}  # nothing to compare with


def test_a_report_of_one_contender_prints_no_empty_tables():
    report = _report()
    report["contenders"] = {"worker": report["contenders"]["worker"]}
    report["precisions"] = {
        "float32": {"gate": {"serving": "float32", "image_tower": "onednn-fused"}, "worker": {"images_per_s": 36.0}},
        "int8": {"gate": {"serving": "int8", "image_tower": "openvino-int8"}},  # its worker not run
    }
    table = render_table(report)
    assert "contender" in table and "-x" not in table
    [int8] = [line.split() for line in table.splitlines() if line.startswith("int8")]
    assert int8[2:6] == ["-", "-", "-", "-"]  # nothing measured: no ratio printed as "-x"
    # A report of a contender that measures no precision (eos): neither table, only its own lines.
    report["contenders"] = {}
    report["precisions"] = {"float32": {"gate": {"serving": "float32", "image_tower": "onednn-fused"}}}
    table = render_table(report)
    assert "contender" not in table and "precision" not in table


def test_decode_schedule_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_schedule("auto", cpu) == "pipelined" and decode_schedule("auto", cuda) == "overlap"
    for named in ("before_forward", "overlap", "pipelined"):
        assert decode_schedule(named, cuda) == named == decode_schedule(named, cpu)
    with pytest.raises(ValueError):
        decode_schedule("sometimes", cpu)


def test_event_envelopes_parse_as_the_worker_parses_them():
    from moderator.events import parse_event

    images = make_images(parse_sizes("32x24"), 2)
    inline = EventSource(images, "inline", None)
    parsed = parse_event(b"e-3", inline.event("e-3", 3), False, 1 << 20)
    assert parsed.id == "e-3" and parsed.data == images[1] and parsed.url is None

    class Server:
        def url(self, i: int) -> str:
            return f"http://127.0.0.1:9/{i}.jpg"

    by_url = EventSource(images, "url", Server())  # type: ignore[arg-type]
    parsed = parse_event(b"e-4", by_url.event("e-4", 4), False, 1 << 20)
    assert parsed.url == "http://127.0.0.1:9/0.jpg" and parsed.data is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "ViT-H/14"}, "unknown architecture"),
        ({"contenders": ("engine", "speed")}, "contenders are"),
        ({"contenders": ()}, "contenders are"),
        ({"feed": "pigeon"}, "feed is kafka or queue"),
        ({"images": 0}, "images must be at least 1"),
        ({"reference_images": 0}, "reference-images must be at least 1"),
        ({"load_seconds": 0}, "load-seconds must be positive"),
    ],
)
def test_options_that_cannot_work_are_refused(change, message):
    from dataclasses import replace

    BenchOptions().check()
    with pytest.raises(BenchError, match=message):
        replace(BenchOptions(), **change).check()


def test_collect_reports_decisions_and_fails_fast_on_what_went_wrong():
    from moderator.config import Settings

    settings = Settings()
    feed = QueueFeed(settings.topic("images"))
    transport = _QueueTransport(settings, feed)
    feed.send(settings.topic("decisions"), key=b"a", value=b"{}")
    feed.send(settings.topic("review"), key=b"b", value=b"{}")  # not a decision: ignored
    feed.send(settings.topic("decisions"), key=b"b", value=b"{}")
    seen: dict[str, float] = {}
    transport.collect({"a", "b"}, 5, seen.__setitem__, lambda: True)
    assert set(seen) == {"a", "b"}

    feed.send(settings.topic("dead_letters"), key=b"c", value=b'{"reason": "corrupt_image"}')
    with pytest.raises(BenchError, match=r"dead-lettered.*corrupt_image"):
        transport.collect({"c"}, 5, seen.__setitem__, lambda: True)
    with pytest.raises(BenchError, match="the worker stopped"):
        transport.collect({"d"}, 60, seen.__setitem__, lambda: False)  # returns at once, not after 60 s
    with pytest.raises(BenchError, match=r"1 of 1 .* none within 0 s"):
        transport.collect({"d"}, 0.2, seen.__setitem__, lambda: True)


def test_steal_is_the_hypervisor_s_share_of_the_cpu_time_between_two_readings():
    from moderator.bench.run import cpu_jiffies, steal_share

    assert steal_share((1000, 10), (3000, 510)) == 0.25
    assert steal_share(None, (3000, 510)) is None and steal_share((1000, 10), (1000, 10)) is None
    now = cpu_jiffies()
    assert now is not None and now[0] > 0 and 0 <= now[1] <= now[0]  # Linux: /proc/stat is there
