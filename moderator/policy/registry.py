"""A set of policies served together, the default policy, and the directory reloader."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moderator.observability import POLICY_RELOADS, get_logger
from moderator.policy.scoring import CompiledPolicy
from moderator.policy.spec import POLICY_SUFFIXES, PolicyError, PolicySpec, UnknownPolicy, load_spec

log = get_logger(__name__)


# ==================================================================================================
# A set of policies, and its reloader


def default_policy(policies: dict[str, CompiledPolicy], configured: str | None) -> str | None:
    """The policy that decides events naming none: ``MODERATOR_DEFAULT_POLICY``, else the one file
    marked ``default: true``, else the only policy; None when none of these settles it."""
    if configured is not None:
        return configured if configured in policies else None
    marked = sorted(name for name, p in policies.items() if p.spec.default)
    if len(marked) == 1:
        return marked[0]
    return next(iter(policies)) if len(policies) == 1 else None


def default_problem(policies: dict[str, CompiledPolicy], configured: str | None) -> str | None:
    """Why events without a ``policy`` field could not be decided under these policies (None: they can)."""
    if configured is not None and configured not in policies:
        return (
            f"MODERATOR_DEFAULT_POLICY={configured} names no loaded policy"
            f" (loaded: {', '.join(sorted(policies)) or 'none'})"
        )
    marked = sorted(name for name, p in policies.items() if p.spec.default)
    if configured is None and len(marked) > 1:
        return (
            f"policies {', '.join(marked)} are all marked `default: true`: mark one,"
            " or set MODERATOR_DEFAULT_POLICY to choose"
        )
    if default_policy(policies, configured) is None and policies:
        return (
            f"{len(policies)} policies ({', '.join(sorted(policies))}) and none is the default, so events"
            " without a `policy` field could not be decided: set MODERATOR_DEFAULT_POLICY to one of them,"
            " or mark one policy file `default: true`"
        )
    return None


@dataclass(frozen=True)
class PolicySet:
    """An immutable snapshot: a batch takes one and scores with it from start to end.

    ``policies`` are the live ones, which events name; ``shadows`` maps a live policy's name to the
    shadow policies that decide its events beside it (``shadow_of``): never live, never named.
    """

    policies: dict[str, CompiledPolicy]
    default: str | None
    shadows: dict[str, tuple[CompiledPolicy, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, named: dict[str, CompiledPolicy], default: str | None) -> PolicySet:
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
                log.error("shadow_policy_without_live", policy=p.spec.name, shadow_of=target, file=p.source)
        return cls(live, default_policy(live, default), {k: tuple(v) for k, v in shadows.items()})

    def get(self, name: str | None) -> CompiledPolicy:
        key = name or self.default
        if key is None:
            raise UnknownPolicy(
                "the event names no policy and there is no default policy"
                " (set MODERATOR_DEFAULT_POLICY, or mark one policy file `default: true`)"
            )
        try:
            return self.policies[key]
        except KeyError:
            raise UnknownPolicy(f"no policy named {key!r} (known: {', '.join(sorted(self.policies))})") from None


@dataclass
class _FileState:
    stamp: tuple[int, int, int]  # (mtime_ns, size, inode)
    policy: CompiledPolicy | None  # last good
    error: str | None = None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _scan(directory: Path) -> dict[Path, tuple[int, int, int]]:
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


class PolicyRegistry:
    """Loads a policy directory, keeps the current :class:`PolicySet`, and reloads it on change.

    ``current`` is swapped atomically (one reference assignment). Per file: a valid edit goes live;
    an invalid one is logged with file and reason, counted, and the file's last good version keeps
    serving. :meth:`start` runs :meth:`refresh` on a background thread every ``interval_s``.
    """

    def __init__(
        self,
        directory: Path,
        compile_fn: Callable[[PolicySpec, str], CompiledPolicy],
        default: str | None = None,
        interval_s: float = 0.5,
        before_swap: Callable[[PolicySet], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.before_swap = before_swap
        self.compile_fn = compile_fn
        self.default_name = default
        self.interval_s = interval_s
        self._files: dict[Path, _FileState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current = PolicySet({}, None)
        self.generation = 0

    def load_initial(self) -> PolicySet:
        """First load: every file must be valid, else :class:`PolicyError` listing every problem."""
        if not self.directory.is_dir():
            raise PolicyError([(str(self.directory), "", "policy directory does not exist")])
        errors: list[tuple[str, str, str]] = []
        for path, stamp in sorted(_scan(self.directory).items()):
            try:
                compiled = self.compile_fn(load_spec(path), str(path))
            except PolicyError as exc:
                errors.extend(exc.errors)
                continue
            self._files[path] = _FileState(stamp, compiled)
        if not self._files and not errors:
            errors.append((str(self.directory), "", "no policy files (*.yaml, *.yml)"))
        policies = self._policies(errors)
        if errors:
            raise PolicyError(errors)
        self._swap(policies)
        return self.current

    def _policies(self, errors: list[tuple[str, str, str]]) -> dict[str, CompiledPolicy]:
        policies: dict[str, CompiledPolicy] = {}
        for path, state in sorted(self._files.items()):
            if state.policy is None:
                continue
            name = state.policy.spec.name
            if name in policies:
                errors.append((str(path), "name", f"policy {name!r} is already defined in {policies[name].source}"))
                continue
            policies[name] = state.policy
        live = {n: p for n, p in policies.items() if p.spec.shadow_of is None}
        problem = default_problem(live, self.default_name)
        if problem is not None:
            errors.append((str(self.directory), "", problem))
        return policies

    def _swap(self, policies: dict[str, CompiledPolicy]) -> None:
        new = PolicySet.of(policies, self.default_name)
        if self.before_swap is not None:
            self.before_swap(new)
        self.current = new
        self.generation += 1

    def refresh(self) -> bool:
        """Look for added, changed and removed files; apply what is valid. True if anything changed."""
        with self._lock:
            seen = _scan(self.directory)
            changed = False
            for path in [p for p in self._files if p not in seen]:
                log.info("policy_removed", file=str(path))
                del self._files[path]
                changed = True
            for path, stamp in sorted(seen.items()):
                state = self._files.get(path)
                if state is not None and state.stamp == stamp:
                    continue
                try:
                    spec = load_spec(path)
                    if state is not None and state.policy is not None and state.policy.version == spec.version():
                        self._files[path] = _FileState(stamp, state.policy)
                        continue
                    compiled = self.compile_fn(spec, str(path))
                except PolicyError as exc:
                    POLICY_RELOADS.labels(result="error").inc()
                    log.error(
                        "policy_invalid",
                        file=str(path),
                        errors=[f"{p}: {r}" if p else r for _, p, r in exc.errors],
                        action="keeping the last good version" if state and state.policy else "not loaded",
                    )
                    self._files[path] = _FileState(stamp, state.policy if state else None, str(exc))
                    continue
                except Exception as exc:  # compile failed for another reason (e.g. the model): same rule
                    POLICY_RELOADS.labels(result="error").inc()
                    log.exception("policy_compile_failed", file=str(path), error=str(exc))
                    self._files[path] = _FileState(stamp, state.policy if state else None, str(exc))
                    continue
                self._files[path] = _FileState(stamp, compiled)
                POLICY_RELOADS.labels(result="ok").inc()
                log.info("policy_loaded", file=str(path), policy=compiled.spec.name, version=compiled.version)
                changed = True
            if changed:
                errors: list[tuple[str, str, str]] = []
                policies = self._policies(errors)
                for f, p, r in errors:
                    log.error("policy_conflict", file=f, field=p, reason=r)
                self._swap(policies)
            return changed

    def start(self) -> PolicyRegistry:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.refresh()
                except Exception:
                    log.exception("policy_reload_loop_error")

        self._thread = threading.Thread(target=loop, name="policy-reloader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
