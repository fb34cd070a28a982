"""Policies from a directory (``MODERATOR_POLICY_SOURCE=directory``, the default): every ``*.yaml``
file, watched for added, changed, renamed and removed files (editors that write in place and those
that write a temporary file and rename it both work).

An invalid file never stops a running worker, nor, by default, a starting one: it is logged, counted,
and its policy served at its last good version, or dead-lettered as ``invalid_policy`` when it has
none. ``MODERATOR_POLICY_STRICT=true`` makes a starting worker refuse an invalid directory instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from moderator.policy.registry import PolicyRegistry
from moderator.policy.spec import POLICY_SUFFIXES, PolicyError, load_spec

Stamp = tuple[int, int, int]  # (mtime_ns, size, inode)


def _stamp(path: Path) -> Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _scan(directory: Path) -> dict[Path, Stamp]:
    out = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return {}
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(POLICY_SUFFIXES):
            continue
        path = Path(entry.path)
        stamp = _stamp(path)
        if stamp is not None and path.is_file():
            out[path] = stamp
    return out


def _hints(path: Path) -> tuple[str, bool]:
    """The name (and default mark) of a policy file that does not validate, as far as it can be read."""
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raw = None
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return raw["name"], raw.get("default") is True
    return path.stem, False


class DirectorySource:
    name = "directory"

    def __init__(self, directory: Path, strict: bool = False) -> None:
        self.directory = Path(directory)
        self.strict = strict
        self._stamps: dict[Path, Stamp] = {}

    def load(self, registry: PolicyRegistry) -> None:
        if not self.directory.is_dir():
            raise PolicyError([(str(self.directory), "", "policy directory does not exist (MODERATOR_POLICY_DIR)")])
        seen = _scan(self.directory)
        if not seen:
            raise PolicyError([(str(self.directory), "", "no policy files (*.yaml, *.yml)")])
        if self.strict:  # every file must be valid
            problems = []
            for path in sorted(seen):
                try:
                    load_spec(path)
                except PolicyError as exc:
                    problems.extend(exc.errors)
            if problems:
                raise PolicyError(problems)
        self._apply(registry, seen)

    def refresh(self, registry: PolicyRegistry) -> bool:
        return self._apply(registry, _scan(self.directory))

    def _apply(self, registry: PolicyRegistry, seen: dict[Path, Stamp]) -> bool:
        changed = False
        for path in [p for p in self._stamps if p not in seen]:
            registry.forget(str(path))
            del self._stamps[path]
            changed = True
        for path, stamp in sorted(seen.items()):
            if self._stamps.get(path) == stamp:
                continue
            self._stamps[path] = stamp
            changed = True
            try:
                spec = load_spec(path)
            except PolicyError as exc:
                registry.reject(str(path), "; ".join(map(str, exc.errors)), *_hints(path))
                continue
            registry.accept(str(path), spec, str(path))
        return changed

    def close(self) -> None:
        pass
