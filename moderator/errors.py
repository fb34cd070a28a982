"""Errors that carry a reason code: the one base of everything that dead-letters an event.

Every way an event can fail to be decided is a subclass of :class:`ReasonError` with a stable,
machine-readable ``reason`` (the dead-letter record's ``reason`` field; the README lists them). The
families live next to the code that raises them (``events.py``: the envelope; ``fetch.py``: URLs;
``images.py``: image bytes; ``policy.py``: policy lookup), and the worker catches this one base.
"""

from __future__ import annotations

from typing import ClassVar


class ReasonError(Exception):
    """An event that cannot be decided, for a reason the sender can act on."""

    reason: ClassVar[str] = "internal_error"
