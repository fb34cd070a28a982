"""What a running stack is: where its services listen (:class:`StackInfo`), and the state file that
``stack status`` and ``stack down`` read."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from moderator.clients import list_topics, redis_ping
from moderator.config import parse_api_version
from moderator.stack.process import Proc, StackError, terminate

STATE_FILE = "stack.json"
STATE_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# The stack


@dataclass(frozen=True)
class StackInfo:
    """Where the services of a stack listen (None: not started / not known)."""

    data_dir: str | None = None
    kafka_bootstrap: str | None = None  # "127.0.0.1:PORT"
    kafka_api_version: str | None = None  # "0.9" for the legacy broker; None: clients probe
    kafka_version: str | None = None  # the broker's release, e.g. "0.9.0.1"
    kafka_mode: str | None = None  # "zookeeper" | "kraft" | "tansu"
    zookeeper: str | None = None  # "127.0.0.1:PORT" (zookeeper mode only)
    redis_url: str | None = None  # "redis://127.0.0.1:PORT/0"
    pids: Mapping[str, int] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    topics: Mapping[str, int] = field(default_factory=dict)  # name -> partitions (those it created)

    def __post_init__(self) -> None:
        for name in ("pids", "ports", "topics"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def kafka_api_version_tuple(self) -> tuple[int, ...] | None:
        return parse_api_version(self.kafka_api_version)

    def env(self) -> dict[str, str]:
        """``MODERATOR_*`` variables pointing the settings at this stack."""
        env: dict[str, str] = {}
        if self.kafka_bootstrap:
            env["MODERATOR_KAFKA_BOOTSTRAP_SERVERS"] = self.kafka_bootstrap
            env["MODERATOR_KAFKA_API_VERSION"] = self.kafka_api_version or ""  # empty: probe
        if self.redis_url:
            env["MODERATOR_REDIS_URL"] = self.redis_url
        return env

    def settings_overrides(self) -> dict[str, object]:
        """Keyword arguments for :class:`moderator.config.Settings` pointing at this stack."""
        out: dict[str, object] = {}
        if self.kafka_bootstrap:
            out["kafka_bootstrap_servers"] = self.kafka_bootstrap
            out["kafka_api_version"] = self.kafka_api_version
        if self.redis_url:
            out["redis_url"] = self.redis_url
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "kafka_bootstrap": self.kafka_bootstrap,
            "kafka_api_version": self.kafka_api_version,
            "kafka_version": self.kafka_version,
            "kafka_mode": self.kafka_mode,
            "zookeeper": self.zookeeper,
            "redis_url": self.redis_url,
            "pids": dict(self.pids),
            "ports": dict(self.ports),
            "topics": dict(self.topics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StackInfo:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def remove_if_content(path: Path, content: str | None) -> None:
    """Remove ``path`` if it still holds exactly ``content`` (what we wrote); leave it otherwise."""
    with contextlib.suppress(OSError):
        if content is not None and path.read_text() == content:
            path.unlink()


# --------------------------------------------------------------------------------------------------
# Detached stacks: state file, status, down


def read_state(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state file a stack wrote in ``data_dir``, or None."""
    path = Path(data_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"unreadable stack state {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise StackError(f"{path} is not a stack state file this version understands")
    return state


def state_procs(state: Mapping[str, Any]) -> list[Proc]:
    return [Proc.from_record(r) for r in state.get("processes", [])]


def stack_status(data_dir: str | os.PathLike[str], timeout: float = 3.0) -> dict[str, Any]:
    """What runs in the stack of ``data_dir``: processes, ports, reachability, topics; ``up`` overall."""
    data_dir = Path(data_dir).expanduser().resolve()
    state = read_state(data_dir)
    if state is None:
        return {"dir": str(data_dir), "up": False, "error": f"no stack state in {data_dir}"}
    info = StackInfo.from_dict(state.get("info", {}))
    procs = state_procs(state)
    processes = {p.name: {"pid": p.pid, "alive": p.alive(), "log": str(p.log_path)} for p in procs}
    out: dict[str, Any] = {
        "dir": str(data_dir),
        "up": False,
        "processes": processes,
        "ports": dict(info.ports),
        "env_file": state.get("env_file"),
    }
    ok = bool(procs) and all(p["alive"] for p in processes.values())
    if info.kafka_bootstrap:
        kafka: dict[str, Any] = {
            "bootstrap": info.kafka_bootstrap,
            "api_version": info.kafka_api_version,
            "version": info.kafka_version,
            "mode": info.kafka_mode,
            "zookeeper": info.zookeeper,
            "reachable": False,
            "topics": None,
        }
        if processes.get("kafka", {}).get("alive"):
            try:
                kafka["topics"] = list_topics(info.kafka_bootstrap, info.kafka_api_version, timeout)
                kafka["reachable"] = True
            except Exception as exc:
                kafka["error"] = str(exc)
        ok = ok and kafka["reachable"]
        out["kafka"] = kafka
    if info.redis_url:
        reachable = bool(processes.get("redis", {}).get("alive")) and redis_ping(info.redis_url, timeout)
        out["redis"] = {"url": info.redis_url, "reachable": reachable}
        ok = ok and reachable
    out["up"] = ok
    return out


def stop_stack(data_dir: str | os.PathLike[str], timeout: float = 10.0) -> bool:
    """Stop the stack whose state file is in ``data_dir`` (e.g. one ``stack up`` left running).

    Only processes whose pid *and* kernel start time match the state file are signalled, so a pid
    reused since is never touched. True if nothing of the stack runs any more.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    state = read_state(data_dir)
    if state is None:
        return True
    ok = True
    for proc in reversed(state_procs(state)):
        ok = terminate(proc, timeout) and ok
    if ok:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / STATE_FILE).unlink()
        if state.get("env_file"):
            remove_if_content(Path(state["env_file"]), state.get("env_text"))
    return ok
