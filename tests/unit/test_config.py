"""Settings: environment variables, validation, messages naming the variable."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moderator.clients import kafka_kwargs
from moderator.config import ConfigError, Settings, load_settings


def test_defaults_load(monkeypatch):
    s = load_settings()
    assert s.topic("images") == "images" and s.max_batch_size == 32


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("MODERATOR_KAFKA_BOOTSTRAP_SERVERS", "a:1,b:2")
    monkeypatch.setenv("MODERATOR_KAFKA_API_VERSION", "0.9")
    monkeypatch.setenv("MODERATOR_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("MODERATOR_IMAGE_FORMATS", '["JPEG","PNG"]')
    s = load_settings()
    assert kafka_kwargs(s)["bootstrap_servers"] == ["a:1", "b:2"]
    assert kafka_kwargs(s)["api_version"] == (0, 9)
    assert s.max_batch_size == 8 and s.image_formats == ("JPEG", "PNG")


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.max_batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "var,value",
    [
        ("MODERATOR_MAX_BATCH_SIZE", "0"),
        ("MODERATOR_KAFKA_API_VERSION", "latest"),
        ("MODERATOR_KAFKA_BOOTSTRAP_SERVERS", "no-port"),
        ("MODERATOR_DEVICE", "tpu"),
        ("MODERATOR_DTYPE", "int4"),
        ("MODERATOR_REDIS_SOCKET_TIMEOUT_MS", "soon"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert var in str(info.value)


def test_secrets_are_not_echoed(monkeypatch):
    monkeypatch.setenv("MODERATOR_REDIS_URL", "redis://:hunter2@host:6379/0")
    s = load_settings()
    assert "hunter2" not in repr(s)
    assert s.redis_url.get_secret_value().endswith("@host:6379/0")


def test_sasl_needs_a_mechanism(monkeypatch):
    monkeypatch.setenv("MODERATOR_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="MODERATOR_KAFKA_SASL_MECHANISM"):
        load_settings()
    monkeypatch.setenv("MODERATOR_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("MODERATOR_KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("MODERATOR_KAFKA_SASL_PASSWORD", "p")
    common = kafka_kwargs(load_settings())
    assert common["sasl_mechanism"] == "SCRAM-SHA-512" and common["sasl_plain_password"] == "p"


def test_empty_api_version_means_probe(monkeypatch):
    monkeypatch.setenv("MODERATOR_KAFKA_API_VERSION", "")
    assert "api_version" not in kafka_kwargs(load_settings())
