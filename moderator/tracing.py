"""W3C Trace Context (``traceparent``) for the headers of the records the worker publishes, pure.

An input event may carry a ``traceparent`` header (``00-<trace-id>-<parent-id>-<flags>``); every
output record of that event then carries the same trace id, the worker's own span id as the parent
id, and the same flags, so a tracing backend joins the upload's trace to its moderation. An event
without a valid one starts a new trace (flags ``00``: not sampled). See
https://www.w3.org/TR/trace-context/#traceparent-header.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

HEADER = "traceparent"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True)
class TraceParent:
    trace_id: str  # 32 lowercase hex digits, not all zero
    parent_id: str  # 16 lowercase hex digits, not all zero
    flags: str  # 2 hex digits; bit 0: sampled

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def parse(value: bytes | str | None) -> TraceParent | None:
    """The header's fields, or None when it is absent or invalid (a version ``ff``, all-zero ids,
    upper-case hex, a version-00 header with trailing fields: each invalid per the spec)."""
    if value is None:
        return None
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        return None
    m = _TRACEPARENT.fullmatch(text.strip())
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, parent_id, flags)


def child(parent: TraceParent | None, span_id: str | None = None) -> TraceParent:
    """The traceparent of the worker's span under ``parent`` (a new trace when there is none)."""
    span = span_id or _random_hex(8, _ZERO_SPAN)
    if parent is None:
        return TraceParent(_random_hex(16, _ZERO_TRACE), span, "00")
    return TraceParent(parent.trace_id, span, parent.flags)


def from_headers(headers: list[tuple[str, bytes]] | None) -> TraceParent | None:
    """The input record's ``traceparent`` (the first one, header names compared case-insensitively)."""
    for name, value in headers or ():
        if name.lower() == HEADER:
            return parse(value)
    return None


def _random_hex(n_bytes: int, zero: str) -> str:
    while True:
        value = os.urandom(n_bytes).hex()
        if value != zero:
            return value
