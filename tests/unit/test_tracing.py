"""W3C traceparent parsing and continuation (moderator/tracing.py), and when outputs carry headers."""

from __future__ import annotations

import pytest

from moderator import tracing
from moderator.clients import headers_enabled
from moderator.config import ConfigError, Settings, load_settings

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_continued_with_a_new_span():
    parent = tracing.parse(VALID.encode())
    assert parent == tracing.TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
    child = tracing.child(parent)
    assert child.trace_id == parent.trace_id and child.flags == "01" and child.parent_id != parent.parent_id
    assert tracing.parse(child.header()) == child


@pytest.mark.parametrize("value", [
    None, b"", b"garbage", VALID.upper().encode(), b"ff" + VALID[2:].encode(), VALID.encode() + b"-extra",
    b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01",
    b"\xff\xfe",
])  # fmt: skip
def test_an_invalid_traceparent_starts_a_new_trace(value):
    assert tracing.parse(value) is None
    fresh = tracing.child(None)
    assert len(fresh.trace_id) == 32 and fresh.flags == "00" and tracing.parse(fresh.header()) == fresh


def test_a_future_version_may_carry_more_fields_and_headers_are_found_by_name():
    assert tracing.parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more") is not None
    assert tracing.from_headers([("x", b"1"), ("TraceParent", VALID.encode())]) == tracing.parse(VALID)
    assert tracing.from_headers(None) is None


class _Producer:
    def __init__(self, version: tuple[int, ...]) -> None:
        self.config = {"api_version": version}


def test_headers_follow_the_broker_version_unless_set():
    assert headers_enabled(Settings(), _Producer((3, 9)))
    assert not headers_enabled(Settings(), _Producer((0, 9)))
    assert not headers_enabled(Settings(kafka_headers="false"), _Producer((3, 9)))
    assert headers_enabled(Settings(), object())  # the in-process feed takes them


def test_exactly_once_needs_a_broker_with_transactions(monkeypatch):
    monkeypatch.setenv("MODERATOR_PROCESSING_GUARANTEE", "exactly-once")
    monkeypatch.setenv("MODERATOR_KAFKA_API_VERSION", "0.9")
    with pytest.raises(ConfigError, match="needs Kafka transactions"):
        load_settings()
    monkeypatch.setenv("MODERATOR_KAFKA_API_VERSION", "3.7")
    monkeypatch.setenv("MODERATOR_KAFKA_ENABLE_IDEMPOTENCE", "false")
    with pytest.raises(ConfigError, match="idempotent producer"):
        load_settings()
    monkeypatch.delenv("MODERATOR_KAFKA_ENABLE_IDEMPOTENCE")
    assert load_settings().worker_transactional_id().startswith("moderator-")
    monkeypatch.delenv("MODERATOR_PROCESSING_GUARANTEE")
    monkeypatch.delenv("MODERATOR_KAFKA_API_VERSION")
    assert Settings(kafka_api_version="0.9").idempotence is False and Settings().idempotence is None
