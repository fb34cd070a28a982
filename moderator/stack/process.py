"""Processes of the local stack: ports, spawning in process groups, stopping by group, waiting."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

LOOPBACK = "127.0.0.1"
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class StackError(RuntimeError):
    """The local stack cannot be fetched, started, used or stopped; the message says why."""


class ChecksumError(StackError):
    """A downloaded file does not match its expected checksum."""


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
class Proc:
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
    def from_record(cls, rec: Mapping[str, Any]) -> Proc:
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


def spawn(name: str, argv: Sequence[str], *, cwd: Path, log_path: Path, die_with_parent: bool) -> Proc:
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
    proc = Proc(name, popen.pid, proc_start_time(popen.pid), log_path, popen)
    log.info("stack process started", name=name, pid=proc.pid, log=str(log_path))
    return proc


def _signal_group(proc: Proc, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def _wait_gone(proc: Proc, timeout: float) -> bool:
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


def terminate(proc: Proc, timeout: float) -> bool:
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


def log_tail(path: Path, lines: int = 25) -> str:
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


def zk_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """ZooKeeper's ``ruok`` four-letter command answers ``imok`` once it serves."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"ruok")
            s.shutdown(socket.SHUT_WR)
            return s.recv(16) == b"imok"
    except OSError:
        return False


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, procs: Sequence[Proc], interval: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail early, with the log's tail, if a process exits."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if not proc.alive():
                raise StackError(
                    f"{proc.name} exited (code {proc.exit_code()}) while waiting for {what}; "
                    f"last lines of {proc.log_path}:\n{log_tail(proc.log_path)}"
                )
        if check():
            return
        if time.monotonic() >= deadline:
            tails = "\n".join(f"--- {p.log_path}:\n{log_tail(p.log_path)}" for p in procs)
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
