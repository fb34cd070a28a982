"""The registry of Kafka topics: every topic this product reads or writes, in one table.

Each entry gives a setting (``MODERATOR_TOPIC_<KEY>``, default ``default``), the record it
carries (a schema of ``moderator schema``), whether it is log-compacted, and how many partitions
the local stack and compose's topic-init give it. Everything else reads this table: the settings
(one field per entry, see ``config.py``), topic creation (``moderator stack up``, ``moderator topics
create`` in compose, the test fixtures), the worker's outputs, ``moderator tail`` and the demo.

Adding an output topic is one entry here plus the code that produces its record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Role = Literal["input", "output", "state"]

TOPIC_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")


@dataclass(frozen=True)
class TopicSpec:
    key: str  # settings field ``topic_<key>``, env ``MODERATOR_TOPIC_<KEY>``, ``moderator tail <key>``
    default: str  # the topic's default name
    record: str  # what each record is: a schema name of ``moderator schema``
    role: Role  # input: the worker consumes it; output: the worker produces it; state: shared state
    doc: str
    compacted: bool = False  # cleanup.policy=compact: the latest record per key is kept for ever
    partitions: int = 4  # for the local stack and compose's topic-init (consumers scale up to this); 1: one order

    def partitions_for(self, wanted: int | None) -> int:
        """``wanted`` partitions (default: the registry's), but one for a topic that needs one order."""
        return 1 if self.partitions == 1 else (wanted or self.partitions)

    @property
    def setting(self) -> str:
        return f"topic_{self.key}"

    @property
    def env(self) -> str:
        return f"MODERATOR_TOPIC_{self.key.upper()}"


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("images", "images", "ImageEvent", "input", "image events in (JSON, or raw images)", partitions=8),
    TopicSpec("decisions", "decisions", "DecisionRecord", "output", "one decision per event", partitions=8),
    TopicSpec("review", "review", "ReviewItem", "output", "the review queue's feed"),
    TopicSpec("dead_letters", "dead-letters", "DeadLetter", "output", "events that could not be decided"),
    TopicSpec(
        "embeddings",
        "embeddings",
        "EmbeddingRecord",
        "output",
        "every decided image's embedding and live decision, for replay",
        compacted=True,
        partitions=8,
    ),
    TopicSpec(
        "shadow_decisions",
        "shadow-decisions",
        "ShadowDecisionRecord",
        "output",
        "shadow policies' decisions beside the live ones",
    ),
    TopicSpec(
        "requests",
        "sync-requests",
        "ImageEvent",
        "output",
        "the synchronous endpoint's requests (moderator serve): the events its decisions name as their source",
        partitions=8,
    ),
    TopicSpec("verdicts", "verdicts", "Verdict", "state", "reviewers' verdicts (moderator console)", compacted=True),
    TopicSpec("appeals", "appeals", "Appeal", "input", "users' appeals of decisions (moderator console)"),
    TopicSpec("appeal_decisions", "appeal-decisions", "AppealDecision", "output", "leads' answers to appeals"),
    TopicSpec(
        "policies",
        "policies",
        "PublishedPolicy",
        "state",
        "published policy versions (moderator policy publish)",
        compacted=True,
        partitions=1,
    ),
    TopicSpec(
        "banks",
        "banks",
        "BankEntry",
        "state",
        "known-image banks: PDQ hashes and embeddings (moderator bank)",
        compacted=True,
        partitions=1,
    ),
)

BY_KEY: dict[str, TopicSpec] = {t.key: t for t in TOPICS}


def spec(key: str) -> TopicSpec:
    """The registry entry of ``key`` (``dead-letters`` and ``dead_letters`` both name one)."""
    try:
        return BY_KEY[key.replace("-", "_")]
    except KeyError:
        raise KeyError(f"no topic {key!r} in the registry (known: {', '.join(BY_KEY)})") from None


@dataclass(frozen=True)
class NewTopic:
    """A topic to create: its name, partition count and cleanup policy."""

    name: str
    partitions: int = 1
    compacted: bool = False

    def configs(self) -> dict[str, str]:
        return {"cleanup.policy": "compact"} if self.compacted else {}


def check_topic_names(names: list[str]) -> list[str]:
    bad = [n for n in names if not TOPIC_NAME_RE.fullmatch(n) or n in (".", "..")]
    if bad:
        raise ValueError(f"invalid topic name(s): {bad} (letters, digits, '.', '_' and '-'; at most 249)")
    return names
