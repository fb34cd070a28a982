"""The benchmark's table for a person (the JSON report carries the same figures)."""

from __future__ import annotations

from typing import Any

# decode, preprocess and pdq: CPU time of the decoding threads; transfer, forward, score, publish: the
# engine thread's wall time; produce: from send to the broker's acknowledgement, per record; commit: wall
STAGES_UNIT = "ms per image; decode, preprocess, pdq: CPU of the decode threads; produce: send to ack per record"


def render_table(report: dict[str, Any]) -> str:
    cfg, model, inputs, c = report["config"], report["model"], report["inputs"], report["contenders"]
    lines = [
        f"moderator bench: {model['architecture']} ({'random weights' if model['random_init'] else model['id']}), "
        f"{report['machine']['device']} {model['dtype']}, batch {cfg['batch']}, {inputs['prompts']} prompts "
        f"(~{inputs['mean_prompt_tokens']} tokens each), {', '.join(inputs['sizes'])} JPEG "
        f"(~{inputs['mean_jpeg_bytes'] // 1024} KiB) {inputs['source']}",
    ]
    if any(name in c for name in ("reference", "engine", "worker", "ceiling")):
        lines += ["", f"{'contender':<10} {'images/s':>10} {'vs reference':>13} {'vs ceiling':>11}  notes"]
    ref = c.get("reference", {}).get("images_per_s")
    ceil = c.get("ceiling", {}).get("images_per_s")
    notes = {
        "reference": "transformers pipeline, one call per image",
        "engine": "decode pool + batched image tower + compiled policy",
        "worker": "",
        "ceiling": "bare image tower on pre-made tensors",
    }
    if "worker" in c:
        w = c["worker"]
        mid = next((x for x in w["latency"] if x["load_pct"] == 50), w["latency"][0] if w["latency"] else None)
        feed = "Kafka + Redis" if w["feed"] == "kafka" else "in-process queue, no Kafka"
        notes["worker"] = feed + (
            f"; at {mid['load_pct']}% load p50 {mid['p50_ms']} ms, p95 {mid['p95_ms']} ms, p99 {mid['p99_ms']} ms"
            if mid
            else ""
        )
    for name in ("reference", "engine", "worker", "ceiling"):
        if name not in c:
            continue
        r = c[name]["images_per_s"]
        vs_ref = f"{r / ref:.2f}x" if ref else "-"
        vs_ceil = f"{r / ceil:.2f}x" if ceil else "-"
        lines.append(f"{name:<10} {r:>10.2f} {vs_ref:>13} {vs_ceil:>11}  {notes[name]}")
    for name in ("engine", "worker"):
        stages = c.get(name, {}).get("stages")
        if stages:
            parts = [f"{s} {v['ms_per_image']:.2f}" for s, v in stages.items()]
            lines.append(f"\n{name} stages ({STAGES_UNIT}): " + ", ".join(parts))
    if "worker" in c:
        lines.append(f"worker engine thread in transfer, forward, score and publish: "
                     f"{c['worker']['model_share_of_wall']:.0%} of the wall time")  # fmt: skip
        lines.append("\nlatency vs offered load (produce to decision):")
        for x in c["worker"]["latency"]:
            lines.append(f"  {x['load_pct']:>3}% = {x['offered_per_s']:>8.2f}/s offered, {x['achieved_per_s']:>8.2f}/s"
                         f" decided: p50 {x['p50_ms']} ms, p95 {x['p95_ms']} ms, p99 {x['p99_ms']} ms")  # fmt: skip
    if "replay" in c:
        lines.append("\nreplay (moderator replay: re-deciding the embeddings log under a policy, no images):")
        r = c["replay"]

        def replay_line(what: str, x: dict[str, Any]) -> str:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in x["seconds"].items())
            vs = f" = {x['over_worker']:.0f}x the worker's images/s" if "over_worker" in x else ""
            return f"  {what}: {x['replayed']} in {x['total_s']:.2f} s ({parts}): {x['per_s']:,.0f}/s{vs}"

        if "same_events" in r:
            lines.append(replay_line("the worker's own events", r["same_events"]))
        lines.append(replay_line(f"a {r['log']['records']:,}-record log", r["log"])
                     + f"; produced in {r['log']['produce_s']:.1f} s")  # fmt: skip
    if "banks" in c:
        lines += ["", *bank_lines(c["banks"])]
    if "animated" in c:
        lines += ["", *animated_lines(c["animated"])]
    measured = [p for p in report.get("precisions", {}).values() if "ceiling" in p or "worker" in p]
    if measured:  # (not with only contenders that measure no precision, such as eos)
        lines += ["", *precision_lines(report["precisions"])]
    if "http" in c:
        lines += ["", *http_lines(c["http"])]
    if "eos" in c:
        lines += ["", *eos_lines(c["eos"])]
    sweeps = report.get("sweeps", {})
    if "batch" in sweeps:
        lines.append("\nthroughput vs batch size:")
        for x in sweeps["batch"]:
            lines.append(f"  batch {x['batch']:>4}: engine {x['engine_images_per_s']:>9.2f}/s, ceiling "
                         f"{x['ceiling_images_per_s']:>9.2f}/s ({x['engine_over_ceiling']:.2f}x)")  # fmt: skip
    if "prompts" in sweeps:
        lines.append("\nthroughput vs prompts (engine: compiled once, cached; reference: prompts per call):")
        for x in sweeps["prompts"]:
            lines.append(f"  {x['prompts']:>5} prompts: engine {x['engine_images_per_s']:>9.2f}/s, reference "
                         f"{x['reference_images_per_s']:>8.3f}/s ({x['engine_over_reference']:.1f}x); "
                         f"compile {x['compile_s_first']:.2f} s ({x['texts_encoded_first']} texts encoded), "
                         f"again {x['compile_s_again']:.3f} s ({x['texts_encoded_again']})")  # fmt: skip
    if report.get("ratios"):
        lines.append("\nratios: " + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def bank_lines(b: dict[str, Any]) -> list[str]:
    """Known-image banks: the worker with banks of each size against none, PDQ per image, search costs."""
    lines = [f"known-image banks (worker images/s; no bank: {b['no_bank_images_per_s']:.2f}, the mean of a run"
             " before and one after):"]  # fmt: skip
    for name, w in b["workers"].items():
        what = "no bank" + (" (before)" if name == "none_before" else " (after)") if name.startswith("none") else (
            f"{int(name):,} entries")  # fmt: skip
        stages = ", ".join(f"{s} {v['ms_per_image']:.2f}" for s, v in w["stages"].items())
        build = f"; index built in {w['index_build_s']:.1f} s" if "index_build_s" in w else ""
        lines.append(f"  {what:<22} {w['images_per_s']:>8.2f}/s  cost {w['cost_vs_no_bank']:>6.1%}  "
                     f"(ms per image: {stages}){build}")  # fmt: skip
    p = b["pdq"]
    share = p["share_of_worker_time_per_image"]
    lines.append(f"  PDQ hash (8 rotations and mirrors) of a decoded {p['size']} image: {p['ms_per_image']:.2f} ms"
                 f" on one core = {share:.1%} of the worker's time per image")  # fmt: skip
    lines.append("  search per batch (ms): entries, PDQ by FAISS, PDQ by numpy popcount, embeddings:")
    for s in b["search_per_batch"]:
        lines.append(
            f"    {s['entries']:>9,}: {s['pdq_faiss_ms']:>8.2f} {s['pdq_numpy_ms']:>10.2f} {s['embedding_ms']:>10.2f}"
        )
    return lines


def animated_lines(a: dict[str, Any]) -> list[str]:
    """Animated inputs: the worker on a mix with animated GIFs against stills only."""
    return [
        f"animated inputs ({a['mix']}; {a['rows_per_input']:.2f} model rows per input):",
        f"  stills only  {a['stills_images_per_s']:>8.2f} inputs/s (the mean of a run before and one after: "
        + ", ".join(f"{r:.2f}" for r in a["stills_runs_images_per_s"])
        + ")",
        f"  mix          {a['mix_images_per_s']:>8.2f} inputs/s = {a['mix_vs_stills']:.2f}x stills;"
        f" {a['mix_rows_per_s']:.2f} frames/s through the tower",
    ]


def eos_lines(e: dict[str, Any]) -> list[str]:
    """Exactly-once: the worker with transactions against at-least-once, on the same Tansu broker."""

    def latency(key: str) -> str:
        lat = e["latency_at_50pct"].get(key) or {}
        return (
            f"latency at 50% p50 {lat.get('p50_ms', float('nan')):.0f} ms, p99 {lat.get('p99_ms', float('nan')):.0f} ms"
        )

    txn = e.get("transaction_ms") or {}
    per_txn = (
        f"{1000 * txn['seconds'] / txn['count']:.1f} ms per transaction" if txn.get("count") else "no transactions"
    )
    return [
        f"exactly-once ({e['broker']}; a transaction every {e['transaction_interval_ms']} ms):",
        f"  at-least-once {e['at_least_once_images_per_s']:>8.2f} images/s (the mean of a run before and one after: "
        + ", ".join(f"{r:.2f}" for r in e["at_least_once_runs_images_per_s"])
        + f"); {latency('at-least-once')}",
        f"  exactly-once  {e['exactly_once_images_per_s']:>8.2f} images/s = {e['exactly_once_vs_at_least_once']:.2f}x"
        f" at-least-once; {latency('exactly-once')}; {per_txn}",
    ]


def precision_lines(precisions: dict[str, Any]) -> list[str]:
    """The image tower per precision: speed against the float32 ceiling, and the gate's figures."""
    probes = next((p["gate"]["probe_images"] for p in precisions.values() if "probe_images" in p["gate"]), None)
    lines = [
        "image tower per precision (ratios against the float32 ceiling of this run, and the worker against its own"
        " precision's ceiling; cosine and decision agreement"
        + (f" on {probes} generated probe images vs float32" if probes else "")
        + "):",
        f"{'precision':<10} {'tower':<14} {'ceiling/s':>10} {'vs fp32':>8} {'worker/s':>10} {'vs fp32':>8} "
        f"{'vs own':>7} {'min cos':>9} {'mean cos':>9} {'agreement':>10}  serving",
    ]

    def num(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    def times(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}x"

    for name, p in precisions.items():
        g = p["gate"]
        agreement = min(g["agreement"].values()) if g.get("agreement") else None
        lines.append(
            f"{name:<10} {g['image_tower']:<14} {num(p.get('ceiling', {}).get('images_per_s'), '.2f'):>10} "
            f"{times(p.get('ceiling_over_float32_ceiling')):>8} "
            f"{num(p.get('worker', {}).get('images_per_s'), '.2f'):>10} "
            f"{times(p.get('worker_over_float32_ceiling')):>8} "
            f"{times(p.get('worker_over_own_ceiling')):>7} {num(g.get('min_cosine'), '.5f'):>9} "
            f"{num(g.get('mean_cosine'), '.5f'):>9} {num(agreement, '.2%'):>10}  {g['serving']}"
        )
    for name, p in precisions.items():
        stages = p.get("worker", {}).get("stages")
        if stages:
            parts = [f"{s} {v['ms_per_image']:.2f}" for s, v in stages.items()]
            lines.append(f"  {name} worker stages ({STAGES_UNIT}): " + ", ".join(parts))
        if p["gate"].get("fallback"):
            lines.append(f"  {name} fell back to {p['gate']['serving']}: {p['gate']['fallback']}")
        d = p.get("jpeg_draft")
        if d and d.get("on") and "agreement" in d:
            lines.append(f"  {name} worker decodes JPEGs at a reduced DCT scale (MODERATOR_IMAGE_JPEG_DRAFT): against"
                         f" exact decoding on {d['images']} images, min cosine {d['min_cosine']:.5f}, decisions agree"
                         f" {d['agreement']:.2%}")  # fmt: skip
    return lines


def http_lines(h: dict[str, Any]) -> list[str]:
    """The synchronous endpoint inside the worker: HTTP latency alone and under a mixed load."""

    def http(x: dict[str, Any]) -> str:
        refused = sum(n for status, n in x["statuses"].items() if status != "200")
        return (f"{x['decided_per_s']:.2f} req/s, p50 {x['p50_ms']} ms, p95 {x['p95_ms']} ms, p99 {x['p99_ms']} ms,"
                f" max {x['max_ms']} ms ({x['requests']} requests, {refused} not 200)")  # fmt: skip

    m = h["mixed"]
    s = m["stream"]
    return [
        f"http (POST /v1/moderate, {h['http_alone']['clients']} closed-loop clients; the endpoint inside the worker):",
        f"  stream alone: {h['stream_alone_images_per_s']:.2f} images/s",
        f"  http alone:   {http(h['http_alone'])}",
        f"  mixed, stream offered {m['stream_pct']}% ({s['offered_per_s']:.2f}/s): http {http(m['http'])}",
        f"  mixed, stream: {s['achieved_per_s']:.2f} images/s decided,"
        f" p50 {s.get('p50_ms')} ms, p99 {s.get('p99_ms')} ms (produce to decision)",
    ]
