"""The real Redis: binary-safe values, MSET/MGET."""

from __future__ import annotations

import pytest
import redis

pytestmark = pytest.mark.integration


def test_bytes_roundtrip_is_binary_safe(redis_client: redis.Redis, redis_key_prefix: str) -> None:
    key = f"{redis_key_prefix}blob"
    value = bytes(range(256)) + b"\x00\x00tail\x00" + "é".encode()
    assert redis_client.set(key, value)
    assert redis_client.get(key) == value
    assert redis_client.strlen(key) == len(value)
    nul_key = f"{redis_key_prefix}nul\x00key".encode()  # keys are binary-safe too
    redis_client.set(nul_key, b"\x00")
    assert redis_client.get(nul_key) == b"\x00"
    assert redis_client.get(f"{redis_key_prefix}missing") is None


def test_mset_mget(redis_client: redis.Redis, redis_key_prefix: str) -> None:
    items = {f"{redis_key_prefix}k{i}": f"v{i}".encode() + b"\x00" * i for i in range(20)}
    assert redis_client.mset(items)
    keys = [*items, f"{redis_key_prefix}absent"]
    assert redis_client.mget(keys) == [*items.values(), None]
