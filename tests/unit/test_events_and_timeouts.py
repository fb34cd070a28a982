"""Envelope parsing and the consumer's group timeouts, directly."""

from __future__ import annotations

import base64
import json

import pytest

from moderator.clients import consumer_timeouts
from moderator.config import Settings
from moderator.errors import ReasonError
from moderator.events import InvalidBase64, InvalidEnvelope, InvalidJson, MessageTooLarge, parse_event
from moderator.fetch import FetchError
from moderator.images import ImageError
from moderator.policy import UnknownPolicy
from moderator.worker.rebalance import rebalance_wait_budget


def test_inline_and_url_envelopes():
    data = b"\x89PNG fake bytes"
    value = json.dumps({"id": "e1", "image": {"data": base64.b64encode(data).decode()}, "policy": "p",
                        "metadata": {"uploader": "u"}}).encode()  # fmt: skip
    parsed = parse_event(b"ignored-key", value, raw=False, max_bytes=1000)
    assert (parsed.id, parsed.policy, parsed.metadata, parsed.data, parsed.url) == ("e1", "p", {"uploader": "u"},
                                                                                    data, None)  # fmt: skip
    url = parse_event(None, b'{"id": "e2", "image": {"url": "https://cdn.example/a.jpg"}}', False, 1000)
    assert url.url == "https://cdn.example/a.jpg" and url.data is None and url.policy is None


def test_raw_mode_takes_the_key_as_id_and_the_value_as_image():
    parsed = parse_event(b"up-1", b"\xff\xd8bytes", raw=True, max_bytes=100)
    assert parsed.id == "up-1" and parsed.data == b"\xff\xd8bytes"
    with pytest.raises(InvalidEnvelope, match="key"):
        parse_event(None, b"\xff\xd8", raw=True, max_bytes=100)
    with pytest.raises(MessageTooLarge):
        parse_event(b"k", b"x" * 101, raw=True, max_bytes=100)


@pytest.mark.parametrize(
    ("value", "error", "reason"),
    [
        (None, InvalidEnvelope, "invalid_envelope"),  # a tombstone
        (b"{not json", InvalidJson, "invalid_json"),
        (b"\xff\xfe", InvalidJson, "invalid_json"),
        (b"[1, 2]", InvalidEnvelope, "invalid_envelope"),
        (b'{"image": {"url": "https://a/b"}}', InvalidEnvelope, "invalid_envelope"),  # no id
        (b'{"id": "has space", "image": {"url": "https://a/b"}}', InvalidEnvelope, "invalid_envelope"),
        (b'{"id": "x", "image": {"url": "https://a/b"}, "extra": 1}', InvalidEnvelope, "invalid_envelope"),
        (b'{"id": "x", "image": {}}', InvalidEnvelope, "invalid_envelope"),
        (b'{"id": "x", "image": {"data": "!!not base64!!"}}', InvalidBase64, "invalid_base64"),
        (b'{"id": "x", "image": {"url": "https://a/b"}, "metadata": {"a": "' + b"y" * 17_000 + b'"}}',
         InvalidEnvelope, "invalid_envelope"),
        (b"x" * 200_000, MessageTooLarge, "message_too_large"),
    ],
)  # fmt: skip
def test_bad_envelopes_raise_typed_errors_with_their_reason(value, error, reason):
    with pytest.raises(error) as info:
        parse_event(None, value, raw=False, max_bytes=100_000 // 2)
    assert info.value.reason == reason and isinstance(info.value, ReasonError)


def test_every_dead_letter_family_shares_one_base():
    for family in (FetchError, ImageError, UnknownPolicy, InvalidJson):
        assert issubclass(family, ReasonError)


def test_consumer_timeouts_on_new_and_old_brokers():
    new = consumer_timeouts(Settings(kafka_session_timeout_ms=10_000, kafka_heartbeat_interval_ms=3_000,
                                     kafka_max_poll_interval_ms=300_000))  # fmt: skip
    assert (new.session_ms, new.heartbeat_ms, new.max_poll_interval_ms) == (10_000, 3_000, 300_000)
    old = consumer_timeouts(Settings(kafka_api_version="0.9", kafka_session_timeout_ms=10_000,
                                     kafka_heartbeat_interval_ms=5_000, kafka_max_poll_interval_ms=6_000))  # fmt: skip
    assert (old.session_ms, old.max_poll_interval_ms) == (6_000, 6_000)  # one governs both before 0.10.1
    assert old.heartbeat_ms == 2_000  # at most a third of the session: three chances before eviction


def test_rebalance_wait_budget_fits_what_the_group_protocol_allows():
    assert rebalance_wait_budget(Settings(rebalance_wait_s=20, kafka_max_poll_interval_ms=300_000)) == 20
    assert rebalance_wait_budget(Settings(rebalance_wait_s=20, kafka_max_poll_interval_ms=5_000)) == 4.0
    # 0.9: the member must rejoin within the session timeout; heartbeat time and a second are kept.
    old = Settings(kafka_api_version="0.9", rebalance_wait_s=20, kafka_session_timeout_ms=10_000,
                   kafka_heartbeat_interval_ms=3_000)  # fmt: skip
    assert rebalance_wait_budget(old) == 6.0
    assert rebalance_wait_budget(Settings(kafka_api_version="0.9", kafka_session_timeout_ms=1_000)) == 0.0
