"""Policies distributed through Kafka (``MODERATOR_POLICY_SOURCE=kafka``): validated once, published
once, served by every worker at the same version.

- ``moderator policy publish``: every file validated exactly as a worker would (and refused when
  pinned to another model than the configured one); all or nothing; each policy whose version
  changed is published as a :class:`~moderator.events.PublishedPolicy`.
- The topic (compacted, one partition): key ``<name>@<version>``. Every version stays readable; the
  live version of a policy is its last record. ``rollback`` publishes an earlier version again.
- :class:`KafkaSource`: a worker reads the topic from its beginning at start-up (the live version of
  each policy), then follows it: a new version is compiled off the hot path and swapped in atomically.
  A worker refuses to start when no policy was ever published (unless
  ``MODERATOR_POLICY_ALLOW_EMPTY=true``).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaConsumer

from moderator import clients
from moderator.config import Settings
from moderator.events import PublishedPolicy, utc_now
from moderator.observability import get_logger
from moderator.policy.registry import PolicyRegistry, default_problem
from moderator.policy.spec import PolicyError, PolicySpec, Problem, load_spec, parse_spec, policy_files

log = get_logger(__name__)


def read_published(settings: Settings) -> list[PublishedPolicy]:
    """Every record of the policies topic, in topic order."""
    reader = clients.make_reader(settings, [settings.topic("policies")])
    try:
        return _read(reader)
    finally:
        reader.close(autocommit=False)


def _read(reader: KafkaConsumer) -> list[PublishedPolicy]:
    records: list[PublishedPolicy] = []

    def apply(record: Any) -> None:
        if record.value is not None:
            records.append(PublishedPolicy.model_validate_json(record.value))

    clients.read_to_end(reader, apply)
    return records


def live(records: Iterable[PublishedPolicy]) -> dict[str, PublishedPolicy]:
    """The live version of each policy: its latest publication (by ``published_at``, then topic order,
    which is the same order on the one-partition topic this product creates)."""
    out: dict[str, PublishedPolicy] = {}
    for r in records:
        if r.name not in out or r.published_at >= out[r.name].published_at:
            out[r.name] = r
    return out


@dataclass(frozen=True)
class Candidate:
    spec: PolicySpec
    text: str
    path: Path


def validate(paths: Sequence[Path], settings: Settings, published: dict[str, PublishedPolicy]) -> list[Candidate]:
    """Validate files for publishing, exactly as a worker would; raise :class:`PolicyError` with
    every problem. Also refused: two files of one name, a file pinned to another model than the
    configured one, and a set under which events naming no policy could not be decided."""
    problems: list[Problem] = []
    missing = [p for p in paths if not p.exists()]
    problems += [Problem(str(p), "", "no such file or directory") for p in missing]
    files = policy_files([p for p in paths if p.exists()])
    if not files and not missing:
        problems.append(Problem(", ".join(map(str, paths)), "", "no policy files (*.yaml, *.yml)"))
    out: list[Candidate] = []
    seen: dict[str, Path] = {}
    for path in files:
        try:
            spec = load_spec(path)
        except PolicyError as exc:
            problems += exc.errors
            continue
        if spec.name in seen:
            problems.append(Problem(str(path), "name", f"policy {spec.name!r} is also defined in {seen[spec.name]}"))
            continue
        if spec.model is not None and spec.model != settings.model_id:
            problems.append(Problem(str(path), "model", f"pinned to {spec.model!r}; the workers serve "
                                                         f"{settings.model_id!r} (MODERATOR_MODEL_ID)"))  # fmt: skip
            continue
        seen[spec.name] = path
        out.append(Candidate(spec, path.read_text(encoding="utf-8"), path))
    if not problems:
        after = {n: PolicySpec.model_validate(r.spec) for n, r in published.items()} | {
            c.spec.name: c.spec for c in out
        }
        marked = {n: s.default for n, s in after.items() if s.shadow_of is None}
        problem = default_problem(marked, settings.default_policy)
        if problem:
            problems.append(Problem("(the published policies with these)", "", problem))
    if problems:
        raise PolicyError(problems)
    return out


def author_name(given: str | None) -> str:
    return given or getpass.getuser()


def publish(
    settings: Settings,
    records: Sequence[PublishedPolicy],
) -> None:
    """Send the records (key ``name@version``) and wait until the broker has every one."""
    producer = clients.make_producer(settings)
    try:
        futures = [producer.send(settings.topic("policies"), key=f"{r.name}@{r.version}".encode(),
                                 value=json.dumps(r.model_dump(mode="json")).encode()) for r in records]  # fmt: skip
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close(timeout=5)


def record(
    spec: PolicySpec, text: str, author: str, message: str, action: Literal["publish", "rollback"], replaces: str | None
) -> PublishedPolicy:
    return PublishedPolicy(name=spec.name, version=spec.version(), yaml=text, spec=spec.model_dump(mode="json"),
                           author=author, published_at=utc_now(), message=message, action=action,
                           replaces=replaces)  # fmt: skip


# ==================================================================================================
# The workers' source


class KafkaSource:
    """The policies topic as a worker's policy source (key in the registry: the policy's name)."""

    name = "kafka"

    def __init__(self, settings: Settings, allow_empty: bool = False) -> None:
        self.settings = settings
        self.allow_empty = allow_empty
        self._reader: KafkaConsumer | None = None

    def load(self, registry: PolicyRegistry) -> None:
        try:
            self._reader = clients.make_reader(self.settings, [self.settings.topic("policies")])
        except clients.TopicError as exc:
            raise PolicyError([("policies topic", "", str(exc))]) from None
        current = live(_read(self._reader))
        if not current and not self.allow_empty:
            raise PolicyError([(self.settings.topic("policies"), "", "no policy has been published yet: publish them"
                                " with `moderator policy publish policies/`, or set MODERATOR_POLICY_ALLOW_EMPTY=true"
                                " to start without one")])  # fmt: skip
        for r in current.values():
            self._apply(registry, r)

    def refresh(self, registry: PolicyRegistry) -> bool:
        if self._reader is None:
            return False
        changed = False
        for records in self._reader.poll(timeout_ms=100).values():
            for r in records:
                if r.value is not None:
                    self._apply(registry, PublishedPolicy.model_validate_json(r.value))
                    changed = True
        return changed

    def _apply(self, registry: PolicyRegistry, r: PublishedPolicy) -> None:
        where = f"{self.settings.topic('policies')}:{r.name}@{r.version}"
        try:
            spec = parse_spec(r.yaml, where)
        except PolicyError as exc:
            registry.reject(r.name, "; ".join(map(str, exc.errors)), r.name)
            return
        if spec.version() != r.version:
            registry.reject(r.name, f"{where}: its text hashes to {spec.version()}, not {r.version}", r.name)
            return
        registry.accept(r.name, spec, where)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close(autocommit=False)


def history(records: Sequence[PublishedPolicy], name: str) -> list[dict[str, Any]]:
    """Every publication of ``name`` still in the topic, oldest first; the live one marked."""
    mine = sorted((r for r in records if r.name == name), key=lambda r: r.published_at)
    current = mine[-1].version if mine else None
    return [{"version": r.version, "action": r.action, "author": r.author, "published_at": r.published_at,
             "message": r.message, "replaces": r.replaces, "live": r is mine[-1] and r.version == current}
            for r in mine]  # fmt: skip
