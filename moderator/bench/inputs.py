"""The benchmark's inputs: photo-like JPEGs, plain-language prompts, a policy, and the events that carry them."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moderator.bench.options import BenchError
from moderator.clip import PIPELINE_TEMPLATE
from moderator.policy import PolicySpec
from moderator.samples import jpeg_bytes, photo_like
from moderator.stack import die_with_parent_hook, free_port, port_open


def size_plan(sizes: Sequence[tuple[int, int, int]], count: int) -> list[tuple[int, int]]:
    """``count`` sizes in the proportions of the weights (a repeating cycle)."""
    cycle = [(w, h) for w, h, weight in sizes for _ in range(weight)]
    return [cycle[i % len(cycle)] for i in range(count)]


def make_images(sizes: Sequence[tuple[int, int, int]], count: int, seed: int = 0, threads: int = 1) -> list[bytes]:
    """``count`` distinct photo-like JPEGs (quality 85) of the size mix."""
    plan = size_plan(sizes, count)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(lambda i: jpeg_bytes(photo_like(*plan[i], seed=seed + i)), range(count)))


_SUBJECTS = (
    "a handgun", "a rifle", "a shotgun", "a kitchen knife", "a sword", "bullets and ammunition", "a syringe",
    "pills", "a needle", "a cigarette", "a cigar", "a bottle of beer", "a glass of liquor", "marijuana",
    "white powder", "blood", "a bruise", "a dead body", "a fist fight", "a soldier in uniform",
    "a police officer", "a crime scene", "a protest sign", "a swastika flag", "a naked person",
    "a woman in a bikini", "a man in underwear", "a couple kissing", "a baby in a stroller",
    "a child on a playground", "a dog", "a cat", "food on a plate", "a birthday party", "a crowd at a concert",
    "a painting", "a comic drawing", "a meme with text", "a screenshot of a website", "a car on a highway",
)  # fmt: skip
_CONTEXTS = (
    "", "on a table", "in a kitchen", "on the floor", "on a bed", "at night", "indoors", "outdoors",
    "in a park", "on a street", "in a school", "in a hospital", "in a restaurant", "at a bar", "at the beach",
    "next to a window", "in a forest", "on a bridge", "in a car", "on a stage", "close up", "in a dark room",
    "held by a man", "held by a woman", "in a video game", "in a cartoon", "in a movie",
)  # fmt: skip


def prompt_bank(n: int) -> list[str]:
    """``n`` distinct plain-language prompts (up to 1080), the first ones all different subjects."""
    bank = [f"{s} {c}".strip() for c in _CONTEXTS for s in _SUBJECTS]
    if n > len(bank):
        raise BenchError(f"at most {len(bank)} prompts, asked for {n}")
    return bank[:n]


def bench_policy(texts: Sequence[str], name: str = "bench") -> PolicySpec:
    """A policy over exactly ``texts``, each put in the reference pipeline's default template.

    Categories of two descriptions and one contrast, as many as a quarter of the texts allows; the
    rest are neutral prompts. The texts are the reference's candidate labels: with its default
    hypothesis template it scores the very prompts this policy's matrix holds.
    """
    texts = list(texts)
    if not texts:
        raise BenchError("the policy needs at least one prompt")
    n_cat = max(1, len(texts) // 4)
    categories, rest = [], texts
    for i in range(n_cat):
        desc, rest = rest[:2], rest[2:]
        contrast, rest = rest[:1], rest[1:]
        if not desc:
            break
        categories.append({"name": f"category-{i}", "descriptions": desc, "contrasts": contrast,
                           "flag": 0.9, "review": 0.5})  # fmt: skip
    return PolicySpec.model_validate(
        {"name": name, "templates": [PIPELINE_TEMPLATE], "neutral": rest, "categories": categories}
    )


class ImageServer:
    """The benchmark's images over HTTP on loopback (``source="url"``), ``/<index>.jpg``: Python's
    ``http.server`` in a process of its own, as an image CDN would be, so that serving does not
    compete with the worker for this interpreter's lock."""

    def __init__(self, images: Sequence[bytes], directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(images):
            (directory / f"{i}.jpg").write_bytes(data)
        self.port = free_port()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(directory)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent_hook(),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BenchError(f"the image server (python -m http.server) did not start on port {self.port}")
            time.sleep(0.05)

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.port}/{index}.jpg"

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class EventSource:
    """Event envelopes for the benchmark's images: inline (base64) or by URL. Each image's part of
    the envelope is encoded once; an event is that part and its id (plain ASCII, no escaping)."""

    def __init__(self, images: Sequence[bytes], source: str, server: ImageServer | None) -> None:
        if source == "inline":
            refs = [{"data": base64.b64encode(d).decode()} for d in images]
        elif server is not None:
            refs = [{"url": server.url(i)} for i in range(len(images))]
        else:
            raise BenchError("URL events need the image server")
        self._images = [json.dumps(ref).encode() for ref in refs]

    def event(self, event_id: str, index: int) -> bytes:
        return b'{"id": "' + event_id.encode() + b'", "image": ' + self._images[index % len(self._images)] + b"}"
