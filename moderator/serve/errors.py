"""The endpoint's errors: every one a typed JSON body with a reason code, never a bare 5xx.

A request that cannot be decided fails with the reason its event would have been dead-lettered for
(``invalid_envelope``, ``not_an_image``, ``url_blocked``, ... : :class:`~moderator.errors.ReasonError`,
the README's list), plus the endpoint's own: ``unauthorized``, ``rate_limited``, ``overloaded``,
``timeout``, ``publish_failed``, ``not_found``, ``method_not_allowed``. The body is OpenAI's error shape,
so its clients raise their usual exceptions::

    {"error": {"code": "url_blocked", "reason": "url_blocked", "message": "...", "type": "invalid_request_error"}}
"""

from __future__ import annotations

from typing import ClassVar

from moderator.errors import ReasonError

# Per reason: the HTTP status. Anything about the request or its image is the caller's (4xx), an image
# URL that cannot be fetched included (the caller's URL); only overload and the endpoint's own faults
# are 5xx.
STATUS: dict[str, int] = {
    "invalid_json": 400,
    "invalid_envelope": 400,
    "invalid_event": 400,
    "invalid_base64": 400,
    "url_invalid": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "message_too_large": 413,
    "image_too_large": 413,
    "fetch_too_large": 413,
    "too_many_frames": 413,
    "video_too_long": 413,
    "unknown_policy": 422,
    "invalid_policy": 422,
    "bad_image": 422,
    "not_an_image": 422,
    "truncated_image": 422,
    "corrupt_image": 422,
    "corrupt_video": 422,
    "unsupported_format": 422,
    "url_blocked": 422,
    "fetch_failed": 422,
    "fetch_timeout": 422,
    "fetch_http_status": 422,
    "too_many_redirects": 422,
    "rate_limited": 429,
    "internal_error": 500,
    "publish_failed": 503,
    "overloaded": 503,
    "timeout": 503,
}


def status_of(reason: str) -> int:
    return STATUS.get(reason, 422 if reason != "internal_error" else 500)


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class ServeError(ReasonError):
    """A refusal of the endpoint's own; ``retry_after_s`` becomes ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(ServeError):
    reason: ClassVar[str] = "unauthorized"


class RateLimited(ServeError):
    reason: ClassVar[str] = "rate_limited"


class Overloaded(ServeError):
    reason: ClassVar[str] = "overloaded"


class Timeout(ServeError):
    reason: ClassVar[str] = "timeout"


class PublishFailed(ServeError):
    reason: ClassVar[str] = "publish_failed"


class Failed(ReasonError):
    """An image that failed in the pipeline (decode, policy): carries the stage's reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = reason


def reason_of(exc: ReasonError) -> str:
    return exc.code if isinstance(exc, Failed) else exc.reason
