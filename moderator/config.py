"""Settings: one frozen object, read once at start-up from the environment (prefix ``MODERATOR_``).

Every field maps to one variable: ``kafka_bootstrap_servers`` is ``MODERATOR_KAFKA_BOOTSTRAP_SERVERS``.
A bad value stops start-up with :class:`ConfigError`, whose message names the variable and says why.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moderator.topics import TOPICS, NewTopic, check_topic_names
from moderator.topics import spec as topic_spec

ENV_PREFIX = "MODERATOR_"

ImageFormat = Literal["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MP4", "WEBM"]
VIDEO_FORMATS = ("MP4", "WEBM")  # videos (opt-in; moderator/video.py)


class ConfigError(Exception):
    """Start-up configuration is invalid; the message names each bad variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        case_sensitive=False,
    )

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="host:port[,host:port...]")
    # Broker protocol version as "3.7", "0.9", ...; empty means let the client probe the broker.
    # Brokers older than 0.10 cannot be probed: set "0.9" for them.
    kafka_api_version: str | None = None
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_password: SecretStr | None = None
    kafka_client_id: str = "moderator"
    kafka_group_id: str = "moderator"
    # One field per topic of the registry (moderator/topics.py): topic_<key>, env MODERATOR_TOPIC_<KEY>,
    # defaulting to the registry's name. Read them with settings.topic(key).
    for _t in TOPICS:
        __annotations__[_t.setting] = "str"
        locals()[_t.setting] = Field(_t.default, description=_t.doc)
    del _t

    kafka_session_timeout_ms: int = Field(10_000, ge=500, le=600_000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100, le=60_000)
    # How long the worker may go between polls before the group evicts it. The worker keeps
    # polling while batches run (backpressure pauses partitions), so this bounds only a stuck loop.
    kafka_max_poll_interval_ms: int = Field(300_000, ge=1_000, le=3_600_000)
    # Idempotent producer: needs brokers >= 0.11. "auto": on where the broker can (by kafka_api_version,
    # else by the versions the broker itself advertises).
    kafka_enable_idempotence: Literal["auto", "true", "false"] = "auto"
    # Record headers on every output (event id, policy, model, W3C traceparent): brokers >= 0.11.
    # "auto": on where the producer's broker version (configured or advertised) has them.
    kafka_headers: Literal["auto", "true", "false"] = "auto"

    # --- The worker -----------------------------------------------------------------------------
    input_format: Literal["json", "raw"] = "json"  # raw: the message value is the image, the key its id
    max_in_flight: int = Field(256, ge=1, le=100_000)  # events between receipt and broker ack
    commit_interval_ms: int = Field(1_000, ge=10, le=600_000)
    # at-least-once: an event's outputs are published as its batch is decided; after a crash the
    # uncommitted window is decided and published again (keyed by event id: duplicates are harmless).
    # exactly-once: every transaction_interval_ms, the outputs decided since and their consumed offsets
    # are committed in one Kafka transaction (brokers >= 0.11); read outputs with isolation.level=read_committed.
    processing_guarantee: Literal["at-least-once", "exactly-once"] = "at-least-once"
    # exactly-once: this worker's transactional id, unique among the workers and stable across its restarts
    # (a restart with it aborts what a crashed instance left open). Default: <group id>-<hostname>.
    transactional_id: str | None = None
    transaction_interval_ms: int = Field(100, ge=10, le=600_000)
    # The broker aborts a transaction left open this long (a worker that died without a successor).
    transaction_timeout_ms: int = Field(60_000, ge=1_000, le=900_000)
    shutdown_timeout_s: float = Field(30.0, ge=0.0, le=3_600.0)
    # On a rebalance, how long to wait for in-flight events of revoked partitions before
    # abandoning them uncommitted (capped by what the broker protocol allows: see worker/rebalance.py).
    rebalance_wait_s: float = Field(20.0, ge=0.0, le=600.0)
    review_include_flagged: bool = False  # also feed flag decisions to the review topic
    dead_letter_max_original_bytes: int = Field(1_048_576, ge=0)  # larger originals: a reference only
    publish_retries: int = Field(5, ge=0, le=100)  # re-sends of a record the broker refused
    # The embeddings log: every decided image's embedding on the embeddings topic, for `moderator replay`.
    embeddings_enabled: bool = True
    embeddings_dtype: Literal["float16", "float32"] = "float16"  # float16: half the bytes, ~1e-3 score error

    # --- URL fetching (SSRF-safe) ---------------------------------------------------------------
    fetch_timeout_s: float = Field(10.0, gt=0, le=600)  # total per image, redirects included
    fetch_connect_timeout_s: float = Field(3.0, gt=0, le=600)
    fetch_max_redirects: int = Field(3, ge=0, le=20)
    fetch_allowed_hosts: tuple[str, ...] = ()  # "host" exactly or ".domain" suffix; empty = any host
    # Networks exempt from the private-address block (e.g. ["10.20.0.0/16"] for an internal CDN).
    # Logged at start-up. Tests use ["127.0.0.0/8"] for their local HTTP server.
    fetch_allow_networks: tuple[str, ...] = ()
    fetch_threads: int = Field(16, ge=1, le=1024)

    # --- Redis (text-embedding cache; it accelerates, it never decides) -----------------------
    redis_enabled: bool = True
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_socket_timeout_ms: int = Field(200, ge=1, le=60_000)
    redis_connect_timeout_ms: int = Field(200, ge=1, le=60_000)
    redis_key_prefix: str = "moderator:emb:"
    # After a Redis error, skip Redis for this long before trying again.
    redis_retry_after_s: float = Field(5.0, ge=0.0, le=3600.0)

    # --- Model ----------------------------------------------------------------------------------
    model_id: str = Field("openai/clip-vit-base-patch32", description="hub id or local directory")
    model_revision: str | None = None  # a commit hash pins the weights; None = the hub's main
    model_local_files_only: bool = False  # offline: never reach the hub
    model_cache_dir: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # The image tower's precision (the text tower is always fp32). auto: fp16 on CUDA, fp32 on the CPU.
    # CPU: bfloat16 (only where the CPU has native bf16), int8 (OpenVINO + NNCF: the `int8` extra); either
    # serves only after the agreement gate below passed, else fp32 serves and the log says why.
    dtype: Literal["auto", "float32", "float16", "bfloat16", "int8"] = "auto"
    # The agreement gate: the probe set (generated photo-like images) embedded by fp32 and by the reduced
    # precision. Every probe embedding's cosine must reach precision_min_cosine, and under every loaded
    # policy (at start-up and at each reload) the share of probe images with the same decision must reach
    # precision_min_agreement (with 200 probes, 0.995 allows one changed decision).
    precision_min_cosine: float = Field(0.99, ge=0.0, le=1.0)
    precision_min_agreement: float = Field(0.995, ge=0.0, le=1.0)
    precision_probe_images: int = Field(200, ge=1, le=100_000)
    # int8: NNCF calibrates activation ranges on these: the first images of this directory (use your own
    # traffic: ranges calibrated on unlike images clip), else generated photo-like images.
    int8_calibration_dir: Path | None = None
    int8_calibration_images: int = Field(64, ge=1, le=100_000)
    # SmoothQuant's migration strength for the matrix products (NNCF; -1 turns it off). NNCF's transformer
    # default, 0.95, cost trained CLIP ~10 points of zero-shot accuracy in OpenVINO's own CLIP notebook,
    # where 0.6 was chosen instead (openvino_notebooks PR 1628).
    int8_smooth_quant_alpha: float = Field(0.6, ge=-1.0, le=1.0)
    text_cache_size: int = Field(65_536, ge=0)  # in-process LRU entries in front of Redis

    # --- Images ---------------------------------------------------------------------------------
    image_formats: tuple[ImageFormat, ...] = ("JPEG", "PNG", "WEBP", "GIF")
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    image_max_pixels: int = Field(40_000_000, ge=1)  # Pillow's own bomb threshold is ~89.5M
    # JPEG DCT-domain downscale while decoding, for JPEGs at least twice the resize target: much faster,
    # slightly different pixels. auto: on where the image tower serves a reduced precision (bf16, fp16, int8,
    # whose decisions already differ from fp32's by more than the draft's), off at fp32.
    image_jpeg_draft: bool | Literal["auto"] = "auto"
    # Animations (GIF, WebP, APNG) and videos (formats MP4/WEBM, the `video` extra): decided on up to this
    # many sampled frames (first, last, evenly spaced by display time), each category at its maximum
    # over them. 1: the first frame only. More frames than frames_max, or frames x pixels above
    # frames_max_pixels, are refused (too_many_frames, image_too_large), never truncated.
    frames_sampled: int = Field(8, ge=1, le=64)
    frames_max: int = Field(1_000, ge=1)
    frames_max_pixels: int = Field(400_000_000, ge=1)
    video_max_seconds: float = Field(120.0, gt=0.0)
    # A video matches a bank entry when at least this many of its sampled keyframes do (vPDQ's rule for
    # an entry that is one image); an animation matches when any sampled frame does.
    video_bank_min_frames: int = Field(1, ge=1, le=64)
    # concurrent decodes (fetches have their own threads); default: one per core
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    # When images are decoded: "overlap" ahead of the model, beside it; "before_forward" when their
    # batch runs, on every core, then the model on every core; "pipelined" from when their batch is
    # taken, beside the batch before it in the model, at idle CPU priority (they take only what the
    # model leaves); "auto": pipelined on the CPU, overlap on an accelerator (worker/stages.py).
    decode_schedule: Literal["auto", "overlap", "before_forward", "pipelined"] = "auto"

    # --- Batching -------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_delay_ms: float = Field(20.0, ge=0.0, le=60_000.0)

    # --- Policies -------------------------------------------------------------------------------
    policy_dir: Path = Path("policies")
    default_policy: str | None = None
    # directory: the files of policy_dir, watched (one worker, or a GitOps-managed directory);
    # kafka: the versions published to the policies topic (`moderator policy publish`): a fleet.
    policy_source: Literal["directory", "kafka"] = "directory"
    policy_strict: bool = False  # directory: refuse to start when a policy file is invalid
    policy_allow_empty: bool = False  # kafka: start even when no policy has been published yet

    # --- Known-image banks (moderator bank) -----------------------------------------------------
    # Each image's PDQ hash, for bank rules and the embeddings log (retroactive scans); about 0.6 ms
    # of one core per image. false: bank rules match by embedding only.
    pdq_enabled: bool = True
    # Follow the banks topic (read at start-up, then followed). false: no bank rule ever matches.
    banks_enabled: bool = True

    # --- The review console (moderator console) ------------------------------------------------
    console_host: str = "127.0.0.1"  # where the console listens (behind a TLS proxy in production)
    console_port: int = Field(8081, ge=0, le=65535)  # 0 = a free port
    # Reviewer accounts: a file of `name:$scrypt$...` lines (moderator console add-user NAME), and/or
    # a header set by an authenticating proxy, trusted only from console_trusted_proxies.
    console_accounts_file: Path | None = None
    console_trusted_user_header: str | None = None  # e.g. X-Forwarded-User
    console_trusted_groups_header: str | None = None  # e.g. X-Forwarded-Groups: the role, by group
    console_lead_groups: tuple[str, ...] = ("moderator-leads",)
    console_admin_groups: tuple[str, ...] = ("moderator-admins",)
    # The proxies' own addresses or CIDR ranges (the TCP peer; X-Forwarded-For is never believed).
    console_trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Signs session cookies (at least 32 characters; the same on every replica). Sessions themselves
    # live in Redis: signing out, or an account leaving the accounts file, ends them at once.
    console_secret_key: SecretStr | None = None
    console_idle_minutes: float = Field(30.0, gt=0, le=24 * 60)  # a session unused this long ends
    # Host names the console answers to (DNS rebinding); the allowed origins' hosts are added.
    console_allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    console_scrypt_ln: int = Field(15, ge=10, le=20)  # cost of new password hashes (add-user): N = 2^ln
    console_login_free_attempts: int = Field(5, ge=1, le=100)  # failures before the waits begin
    console_max_leases: int = Field(25, ge=1, le=1000)  # items one reviewer holds at most
    # Named queues ([{"name": ..., "roles": [...]}]) and the routes into them ([{"queue": ..., "category":
    # ..., "policy": ..., "decision": ..., "sampled": ..., "retroactive": ...}], first match wins): see
    # moderator/console/routing.py. Checked when the console starts.
    console_queues: tuple[dict[str, Any], ...] = ()
    console_routes: tuple[dict[str, Any], ...] = ()
    console_default_queue: str = "default"
    console_https: bool = False  # behind TLS: Secure cookies and Strict-Transport-Security
    console_allowed_origins: tuple[str, ...] = ()  # the public origin(s), e.g. https://review.example.com
    console_session_hours: float = Field(8.0, gt=0, le=168)
    console_lease_s: float = Field(300.0, ge=1, le=86_400)  # a claim returns to the queue after this
    console_grid_size: int = Field(12, ge=1, le=100)
    console_group_id: str = "moderator-console"  # where replicas commit their review-topic progress
    console_redis_prefix: str = "moderator:console:"
    console_banks: tuple[str, ...] = ()  # banks a reviewer may add a confirmed image to (a PDQ entry)

    # --- The synchronous endpoint (moderator serve) --------------------------------------------
    serve_host: str = "127.0.0.1"  # where the endpoint listens (behind a TLS proxy in production)
    serve_port: int = Field(8090, ge=0, le=65535)  # 0 = a free port
    serve_in_worker: bool = False  # `moderator run` serves the endpoint too, its requests in the stream's batches
    # API keys: a file of `name[:rate]:$sha256$<hex>` lines (moderator serve add-key NAME). Required.
    serve_keys_file: Path | None = None
    serve_rate_per_s: float = Field(20.0, gt=0, le=100_000)  # images per second per key (unless its line says)
    serve_burst: int = Field(40, ge=1, le=100_000)  # images a key may send at once above its rate
    # The admission queue: images admitted and not yet answered, at most (more: 503 with Retry-After).
    serve_max_pending: int = Field(64, ge=1, le=100_000)
    serve_timeout_s: float = Field(5.0, gt=0, le=600)  # a request's deadline unless X-Moderator-Timeout-Ms
    serve_max_timeout_s: float = Field(30.0, gt=0, le=600)  # the longest deadline a request may ask for
    serve_max_inputs: int = Field(16, ge=1, le=1024)  # images per /v1/moderations request
    # The idempotency store (Redis; it may be lost: the request is then decided again, same id).
    serve_idempotency_ttl_s: float = Field(86_400.0, ge=0, le=30 * 86_400)
    serve_redis_prefix: str = "moderator:serve:"

    # --- Observability --------------------------------------------------------------------------
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)  # /metrics, /healthz, /readyz; 0 = a free port
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON
    kafka_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"  # kafka-python's own lines

    @field_validator("console_trusted_proxies")
    @classmethod
    def _proxies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for value in v:
            try:
                ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address or CIDR range (e.g. 10.0.0.0/8)") from None
        return v

    @field_validator("console_secret_key")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError(
                "at least 32 characters (make one: python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return v

    @field_validator("kafka_api_version")
    @classmethod
    def _api_version(cls, v: str | None) -> str | None:
        version = parse_api_version(v)
        return None if version is None else ".".join(map(str, version))

    @field_validator("*")
    @classmethod
    def _topic_name(cls, v: object, info: ValidationInfo) -> object:
        if info.field_name and info.field_name.startswith("topic_") and isinstance(v, str):
            check_topic_names([v])
        return v

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        for part in v.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {part!r}")
        return v

    @field_validator("fetch_allow_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for spec in v:
            try:
                ipaddress.ip_network(spec, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a network: {spec!r} ({exc})") from None
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError('expected "auto", "cpu", "cuda", "cuda:N" or "mps"')
        return v

    @model_validator(mode="after")
    def _sasl(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and self.kafka_sasl_mechanism is None:
            raise ValueError("MODERATOR_KAFKA_SASL_MECHANISM is required with a SASL security protocol")
        return self

    @model_validator(mode="after")
    def _video(self) -> Settings:
        videos = [f for f in self.image_formats if f in VIDEO_FORMATS]
        if videos and importlib.util.find_spec("av") is None:
            raise ValueError(f"MODERATOR_IMAGE_FORMATS names {', '.join(videos)}: videos need PyAV, the `video` extra "
                             "(pip install 'moderator[video]'), or leave those formats out")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _exactly_once(self) -> Settings:
        if self.processing_guarantee != "exactly-once":
            return self
        version = self.kafka_api_version_tuple
        if version is not None and version < (0, 11):
            raise ValueError("MODERATOR_PROCESSING_GUARANTEE=exactly-once needs Kafka transactions (>= 0.11),"
                             f" not MODERATOR_KAFKA_API_VERSION={self.kafka_api_version}: at-least-once")  # fmt: skip
        if self.kafka_enable_idempotence == "false":
            raise ValueError("MODERATOR_PROCESSING_GUARANTEE=exactly-once needs the idempotent producer: "
                             "unset MODERATOR_KAFKA_ENABLE_IDEMPOTENCE")  # fmt: skip
        return self

    # --- derived --------------------------------------------------------------------------------
    @property
    def idempotence(self) -> bool | None:
        """Whether the producer is idempotent; None: as the broker's advertised versions allow."""
        if self.kafka_enable_idempotence != "auto":
            return self.kafka_enable_idempotence == "true"
        version = self.kafka_api_version_tuple
        return None if version is None else version >= (0, 11)

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly-once"

    def worker_transactional_id(self) -> str:
        """The exactly-once worker's transactional id (``MODERATOR_TRANSACTIONAL_ID``, else group-hostname)."""
        return self.transactional_id or f"{self.kafka_group_id}-{socket.gethostname()}"

    @property
    def kafka_api_version_tuple(self) -> tuple[int, ...] | None:
        return parse_api_version(self.kafka_api_version)

    def topic(self, key: str) -> str:
        """The configured name of a registry topic: ``settings.topic("decisions")``."""
        return str(getattr(self, topic_spec(key).setting))

    def new_topics(self, partitions: int | None = None, keys: Iterable[str] | None = None) -> list[NewTopic]:
        """The registry's topics (or those of ``keys``) as configured here, to create them."""
        specs = TOPICS if keys is None else [topic_spec(k) for k in keys]
        return [NewTopic(self.topic(t.key), t.partitions_for(partitions), t.compacted) for t in specs]


def parse_api_version(text: str | None) -> tuple[int, ...] | None:
    """A broker protocol version: ``"0.9"`` -> ``(0, 9)``; empty, None or ``auto`` -> None (probe)."""
    if text is None or text.strip() == "" or text.strip().lower() == "auto":
        return None
    if not re.fullmatch(r"\d+(\.\d+){1,2}", text.strip()):
        raise ValueError('expected a broker version such as "3.7" or "0.9", or empty to probe')
    return tuple(int(p) for p in text.strip().split("."))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment; raise :class:`ConfigError` naming each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            var = ENV_PREFIX + loc[0].upper() if loc else "(settings)"
            secret = any(w in var for w in ("PASSWORD", "URL", "SECRET"))
            got = "" if secret or not loc else f" (got {err.get('input')!r})"
            lines.append(f"  {var}: {err['msg']}{got}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
