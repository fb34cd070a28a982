"""The policies a worker serves: a snapshot swapped atomically, fed by a source (a directory, or the
policies topic), with the default policy and the rules for invalid versions.

A source hands the registry policy versions under a key (a file, or a policy name): a valid version
is compiled (off the hot path) and goes live at the next :meth:`PolicyRegistry.swap`; an invalid one
is logged with its reason and counted, and the key's last good version keeps serving. A policy with
no good version at all is *broken*: events naming it are dead-lettered as ``invalid_policy``, never
``unknown_policy``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from moderator.errors import ReasonError
from moderator.observability import POLICY_INFO, POLICY_RELOADS, get_logger
from moderator.periodic import Periodic
from moderator.policy.scoring import CompiledPolicy
from moderator.policy.spec import PolicyError, PolicySpec, UnknownPolicy

log = get_logger(__name__)


class InvalidPolicy(ReasonError):
    """The event names a policy whose every version so far is invalid (see the worker's log)."""

    reason = "invalid_policy"


# ==================================================================================================
# The default policy


def default_policy(marked: dict[str, bool], configured: str | None) -> str | None:
    """The policy that decides events naming none: ``MODERATOR_DEFAULT_POLICY``, else the one policy
    marked ``default: true``, else the only policy; None when none of these settles it. ``marked``:
    every known policy name and whether it is marked default."""
    if configured is not None:
        return configured if configured in marked else None
    defaults = sorted(name for name, is_default in marked.items() if is_default)
    if len(defaults) == 1:
        return defaults[0]
    return next(iter(marked)) if len(marked) == 1 else None


def default_problem(marked: dict[str, bool], configured: str | None) -> str | None:
    """Why events without a ``policy`` field could not be decided under these policies (None: they can)."""
    if configured is not None and configured not in marked:
        return (
            f"MODERATOR_DEFAULT_POLICY={configured} names no loaded policy"
            f" (loaded: {', '.join(sorted(marked)) or 'none'})"
        )
    defaults = sorted(name for name, is_default in marked.items() if is_default)
    if configured is None and len(defaults) > 1:
        return (
            f"policies {', '.join(defaults)} are all marked `default: true`: mark one,"
            " or set MODERATOR_DEFAULT_POLICY to choose"
        )
    if default_policy(marked, configured) is None and marked:
        return (
            f"{len(marked)} policies ({', '.join(sorted(marked))}) and none is the default, so events"
            " without a `policy` field could not be decided: set MODERATOR_DEFAULT_POLICY to one of them,"
            " or mark one policy `default: true`"
        )
    return None


# ==================================================================================================
# The snapshot


@dataclass(frozen=True)
class PolicySet:
    """An immutable snapshot: a batch takes one and scores with it from start to end.

    ``policies`` are the live ones, which events name; ``shadows`` maps a live policy's name to the
    shadow policies that decide its events beside it (``shadow_of``): never live, never named;
    ``broken`` maps the name of a policy with no valid version to why.
    """

    policies: dict[str, CompiledPolicy]
    default: str | None
    shadows: dict[str, tuple[CompiledPolicy, ...]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls, named: dict[str, CompiledPolicy], default: str | None, broken: dict[str, tuple[str, bool]]
    ) -> PolicySet:
        """Live and shadow policies sorted out; a shadow of no loaded live policy is logged and left out."""
        live = {n: p for n, p in named.items() if p.spec.shadow_of is None}
        shadows: dict[str, list[CompiledPolicy]] = {}
        for p in named.values():
            target = p.spec.shadow_of
            if target is None:
                continue
            if target in live:
                shadows.setdefault(target, []).append(p)
            else:
                log.error("shadow_policy_without_live", policy=p.spec.name, shadow_of=target, origin=p.source)
        marked = {
            **{n: is_default for n, (_, is_default) in broken.items()},
            **{n: p.spec.default for n, p in live.items()},
        }
        return cls(live, default_policy(marked, default), {k: tuple(v) for k, v in shadows.items()},
                   {n: reason for n, (reason, _) in broken.items()})  # fmt: skip

    def get(self, name: str | None) -> CompiledPolicy:
        key = name or self.default
        if key is None:
            raise UnknownPolicy(
                "the event names no policy and there is no default policy"
                " (set MODERATOR_DEFAULT_POLICY, or mark one policy `default: true`)"
            )
        if key in self.policies:
            return self.policies[key]
        if key in self.broken:
            raise InvalidPolicy(f"policy {key!r} has no valid version: {self.broken[key][:500]}")
        raise UnknownPolicy(f"no policy named {key!r} (known: {', '.join(sorted(self.policies))})")


# ==================================================================================================
# The registry


class PolicySource(Protocol):
    """Where policy versions come from (``directory.py``: files; ``topic.py``: the policies topic)."""

    name: str  # "directory" or "kafka", for logs and metrics

    def load(self, registry: PolicyRegistry) -> None:
        """Hand the registry every current version (start-up); raise :class:`PolicyError` to refuse."""

    def refresh(self, registry: PolicyRegistry) -> bool:
        """Hand the registry what changed since; True when anything did."""

    def close(self) -> None: ...


@dataclass
class _Entry:
    policy: CompiledPolicy | None = None  # the last good version
    error: str | None = None  # why the latest version is not served (None: it is)
    name: str | None = None  # the policy's name, as far as it could be read
    marked_default: bool = False


class PolicyRegistry:
    """Keeps the current :class:`PolicySet` (``current``, swapped by one reference assignment)."""

    def __init__(
        self,
        source: PolicySource,
        compile_fn: Callable[[PolicySpec, str], CompiledPolicy],
        default: str | None = None,
        interval_s: float = 0.5,
        before_swap: Callable[[PolicySet], None] | None = None,
    ) -> None:
        self.source = source
        self.before_swap = before_swap
        self.compile_fn = compile_fn
        self.default_name = default
        self.interval_s = interval_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._follower = Periodic(self.refresh, interval_s, "policy-reloader", "policy_reload_loop_error")
        self.current = PolicySet({}, None)
        self.generation = 0

    # --- what sources call ------------------------------------------------------------------------------
    def accept(self, key: str, spec: PolicySpec, origin: str) -> bool:
        """A valid version under ``key``: compiled now, live at the next swap. False if it was already live
        (or if it cannot be compiled: then it is rejected, the last good version kept)."""
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            if entry.policy is not None and entry.policy.spec == spec:
                entry.error = None  # (a broken edit reverted)
                return False
            try:
                compiled = self.compile_fn(spec, origin)
            except PolicyError as exc:
                self.reject(key, "; ".join(map(str, exc.errors)), spec.name, spec.default)
                return False
            except Exception as exc:  # compiling failed for another reason (the model): the same rule
                log.exception("policy_compile_failed", origin=origin)
                self.reject(key, f"{type(exc).__name__}: {exc}", spec.name, spec.default)
                return False
            entry.policy, entry.error, entry.name, entry.marked_default = compiled, None, spec.name, spec.default
        POLICY_RELOADS.labels(result="ok").inc()
        log.info("policy_loaded", policy=spec.name, version=compiled.version, origin=origin, source=self.source.name)
        return True

    def reject(self, key: str, reason: str, name: str | None, marked_default: bool = False) -> None:
        """An invalid version under ``key``: logged, counted; the key's last good version keeps serving."""
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            entry.error, entry.name = reason, entry.name or name
            entry.marked_default = entry.marked_default or marked_default
            keeping = entry.policy is not None
        POLICY_RELOADS.labels(result="error").inc()
        action = "keeping the last good version" if keeping else "not served: events naming it are dead-lettered"
        log.error("policy_invalid", key=key, policy=name, errors=reason[:2000], source=self.source.name, action=action)

    def forget(self, key: str) -> None:
        with self._lock:
            if self._entries.pop(key, None) is not None:
                log.info("policy_removed", key=key, source=self.source.name)

    # --- the snapshot ------------------------------------------------------------------------------------
    def _named(self) -> tuple[dict[str, CompiledPolicy], dict[str, tuple[str, bool]]]:
        named: dict[str, CompiledPolicy] = {}
        broken: dict[str, tuple[str, bool]] = {}
        for key, entry in sorted(self._entries.items()):
            if entry.policy is None:
                if entry.name is not None and entry.error is not None:
                    broken[entry.name] = (entry.error, entry.marked_default)
                continue
            name = entry.policy.spec.name
            if name in named:
                log.error("policy_conflict", key=key, policy=name, reason=f"already defined by {named[name].source}")
                continue
            named[name] = entry.policy
        for name in named:
            broken.pop(name, None)
        return named, broken

    def problems(self) -> list[str]:
        """What stops events from being decided as configured (for start-up): the default policy."""
        with self._lock:
            named, broken = self._named()
        marked = {**{n: d for n, (_, d) in broken.items()},
                  **{n: p.spec.default for n, p in named.items() if p.spec.shadow_of is None}}  # fmt: skip
        problem = default_problem(marked, self.default_name)
        return [problem] if problem else []

    def errors(self) -> list[str]:
        with self._lock:
            return [f"{key}: {e.error}" for key, e in sorted(self._entries.items()) if e.error]

    def swap(self) -> PolicySet:
        with self._lock:
            named, broken = self._named()
            new = PolicySet.of(named, self.default_name, broken)
            if self.before_swap is not None:  # e.g. the precision gate: checked before the set serves
                self.before_swap(new)
            self.current = new
            self.generation += 1
        POLICY_INFO.clear()
        for name, p in self.current.policies.items():
            POLICY_INFO.labels(policy=name, version=p.version, role="live", source=self.source.name).set(1)
        for shadows in self.current.shadows.values():
            for p in shadows:
                POLICY_INFO.labels(policy=p.spec.name, version=p.version, role="shadow", source=self.source.name).set(1)
        return self.current

    # --- lifecycle ----------------------------------------------------------------------------------------
    def load_initial(self) -> PolicySet:
        """Every current version from the source, then the first snapshot. A configuration under which
        events naming no policy could not be decided is refused (:class:`PolicyError`)."""
        self.source.load(self)
        problems = self.problems()
        if problems:
            raise PolicyError([(self.source.name, "", p) for p in problems])
        return self.swap()

    def refresh(self) -> bool:
        with self._lock:
            changed = self.source.refresh(self)
            if changed:
                self.swap()
            return changed

    def start(self) -> PolicyRegistry:
        self._follower.start()
        return self

    def stop(self) -> None:
        self._follower.stop()
        self.source.close()
