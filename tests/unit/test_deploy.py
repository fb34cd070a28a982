"""The deploy files (no Docker engine here): they parse, and their settings are the code's."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from moderator.config import ENV_PREFIX, Settings
from moderator.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]
SETTING_VARS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_images():
    services = compose()["services"]
    assert {"kafka", "redis", "topic-init", "moderator"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    redis_cmd = services["redis"]["command"]
    assert "--requirepass" in redis_cmd
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    worker = services["moderator"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / worker["build"]["dockerfile"]).is_file()
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert "/readyz" in " ".join(worker["healthcheck"]["test"])


def test_every_moderator_variable_is_a_real_setting():
    env = compose()["services"]["moderator"]["environment"]
    used = {k for k in env if k.startswith(ENV_PREFIX)}
    assert used, "the worker service sets no MODERATOR_* variable"
    assert used <= SETTING_VARS, used - SETTING_VARS
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    in_dockerfile = set(re.findall(r"\b(MODERATOR_[A-Z0-9_]+)=", dockerfile))
    assert in_dockerfile <= SETTING_VARS, in_dockerfile - SETTING_VARS


def test_compose_values_are_valid_settings(monkeypatch):
    env = compose()["services"]["moderator"]["environment"]
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            value = re.sub(r"\$\{[^}:]*:-([^}]*)\}", r"\1", str(value))  # ${VAR:-default}: the default
            monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", "secret", value))
    s = Settings()
    assert s.kafka_bootstrap_servers == "kafka:9092"
    assert s.device == "cuda"


def test_topic_init_creates_the_registry_with_the_workers_settings():
    services = compose()["services"]
    init, worker = services["topic-init"], services["moderator"]
    assert init["command"] == ["topics", "create"]  # moderator topics create: every registry topic
    assert init["build"] == worker["build"] and init["image"] == worker["image"]
    assert init["environment"] == worker["environment"]  # the same names, the same broker
    for t in TOPICS:  # names set in compose are the registry's defaults
        assert worker["environment"].get(t.env, t.default) == t.default
    assert 'ENTRYPOINT ["moderator"]' in (ROOT / "deploy/Dockerfile").read_text()


def test_readiness_port_matches():
    env = compose()["services"]["moderator"]["environment"]
    assert int(env["MODERATOR_HTTP_PORT"]) == 8080
    assert "8080/readyz" in (ROOT / "deploy/Dockerfile").read_text()
