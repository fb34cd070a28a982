"""The endpoint's web application (Starlette): the routes, API keys and rate limits, size limits, errors.

- ``POST /v1/moderate``: an image event envelope (``id`` optional) -> its decision record, byte for byte
  as the decisions topic carries it (``X-Moderator-Replayed: true`` when it came from the idempotency
  store).
- ``POST /v1/moderations``: OpenAI's moderation request with ``image_url`` inputs -> OpenAI's response
  shape (``openai_api.py``).
- ``GET /openapi.json``: the OpenAPI document (no key needed).

Every other request gets a JSON error too. Order of the checks: the API key (``Authorization: Bearer``,
401), the body's size (413, read no further), its parsing (400), the key's rate in images (429), then the
decider (``decide.py``: 422 for an image that cannot be decided, 503 under overload or past the
deadline). A bug answers 500 ``internal_error`` with no detail, logged with its traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from moderator import observability as obs
from moderator.console.security import SecurityHeadersMiddleware
from moderator.errors import ReasonError
from moderator.events import InvalidEnvelope, InvalidJson, MessageTooLarge, ParsedEvent, parse_envelope
from moderator.serve import openai_api
from moderator.serve.decide import Decider
from moderator.serve.errors import Failed, RateLimited, ServeError, Unauthorized, error_type, reason_of, status_of
from moderator.serve.keys import ApiKey, KeysFile, bearer
from moderator.serve.limits import RateLimiter
from moderator.serve.openapi import document

log = obs.get_logger(__name__)

API_HEADERS = {  # an API: nothing to render, frame or cache
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TIMEOUT_HEADER = "x-moderator-timeout-ms"
PARSE_ON_THREAD_BYTES = 256 * 1024  # larger bodies are parsed off the event loop


@dataclass(frozen=True)
class ServeConfig:
    keys: KeysFile
    rate_per_s: float  # a key's rate unless its line says
    burst: int
    timeout_s: float
    max_timeout_s: float
    max_request_bytes: int
    max_inputs: int
    image_max_bytes: int


def error_response(exc: ReasonError) -> JSONResponse:
    reason = reason_of(exc)
    status = status_of(reason)
    message = "internal error" if reason == "internal_error" else str(exc)[:2000]
    body = {"error": {"code": reason, "reason": reason, "message": message, "type": error_type(status), "param": None}}
    headers: dict[str, str] = {}
    retry = exc.retry_after_s if isinstance(exc, ServeError) else None
    if retry is not None:
        headers["Retry-After"] = str(retry)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


class _Internal(ReasonError):
    reason = "internal_error"


def create_app(config: ServeConfig, decider: Decider) -> ASGIApp:
    limiter = RateLimiter(config.burst)
    openapi = json.dumps(document()).encode()

    def authenticate(request: Request) -> ApiKey:
        token = bearer(request.headers.get("authorization"))
        key = config.keys.current().check(token) if token else None
        if key is None:
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")
        return key

    async def body_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_request_bytes:
            raise MessageTooLarge(f"{length} bytes exceeds the request limit of {config.max_request_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_request_bytes:
                raise MessageTooLarge(f"the body exceeds the request limit of {config.max_request_bytes} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)

        def parse() -> Any:
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidJson(f"not JSON: {exc}") from None

        return await run_in_threadpool(parse) if len(raw) > PARSE_ON_THREAD_BYTES else parse()

    def deadline_of(request: Request) -> float:
        timeout = config.timeout_s
        header = request.headers.get(TIMEOUT_HEADER)
        if header is not None:
            if not header.strip().isdigit() or int(header) < 1:
                raise InvalidEnvelope(f"{TIMEOUT_HEADER}: a positive number of milliseconds")
            timeout = int(header) / 1000
        return time.monotonic() + min(timeout, config.max_timeout_s)

    def rate(key: ApiKey, n: int) -> None:
        wait = limiter.take(key.name, key.rate_per_s or config.rate_per_s, n, time.monotonic())
        if wait > 0:
            obs.SERVE_REFUSED.labels(why="rate").inc()
            raise RateLimited(f"key {key.name!r} is over its rate; retry after {wait:.2f} s", int(wait) + 1)

    def answered(route: str, started: float, response: Response, key: ApiKey | None, ids: list[str]) -> Response:
        obs.SERVE_REQUESTS.labels(route=route, status=str(response.status_code)).inc()
        seconds = time.monotonic() - started
        if response.status_code == 200:
            obs.SERVE_SECONDS.labels(route=route).observe(seconds)
        log.info("serve_request", route=route, status=response.status_code, key=key.name if key else None,
                 event_ids=ids[:5], images=len(ids), ms=round(seconds * 1000, 3))  # fmt: skip
        return response

    def guarded(
        route: str, handle: Callable[[Request, ApiKey, float, list[str]], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            key: ApiKey | None = None
            ids: list[str] = []
            try:
                key = authenticate(request)
                response = await handle(request, key, deadline_of(request), ids)
            except ReasonError as exc:
                response = error_response(exc)
            except Exception:
                log.exception("serve_internal_error", route=route)
                response = error_response(_Internal("internal error"))
            return answered(route, started, response, key, ids)

        return endpoint

    async def moderate(request: Request, key: ApiKey, deadline: float, ids: list[str]) -> Response:
        body = await body_json(request)
        if isinstance(body, dict) and "id" not in body:
            body = {**body, "id": openai_api.request_id({})}
        item = parse_envelope(body)
        ids.append(item.id)
        rate(key, 1)
        [answer] = await decider.decide([item], deadline)
        headers = {"X-Moderator-Event-Id": item.id}
        if answer.replayed:
            headers["X-Moderator-Replayed"] = "true"
        return Response(answer.record, media_type="application/json", headers=headers)

    async def moderations(request: Request, key: ApiKey, deadline: float, ids: list[str]) -> Response:
        base = openai_api.request_id({k: request.headers.get(k, "") for k in ("idempotency-key", "x-request-id")})
        parsed = openai_api.parse_request(await body_json(request))
        items: list[ParsedEvent] = openai_api.events(parsed, base, config.image_max_bytes)
        if len(items) > config.max_inputs:
            raise InvalidEnvelope(f"input: at most {config.max_inputs} images per request")
        ids.extend(i.id for i in items)
        rate(key, len(items))
        answers = await decider.decide(items, deadline)
        records = [openai_api.DecisionRecord.model_validate_json(a.record) for a in answers]
        return JSONResponse(openai_api.response(base, records).model_dump(mode="json"))

    async def openapi_json(request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_envelope")
        return error_response(Failed(reason, str(exc.detail)))

    web = Starlette(
        routes=[
            Route("/v1/moderate", guarded("moderate", moderate), methods=["POST"]),
            Route("/v1/moderations", guarded("moderations", moderations), methods=["POST"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    return SecurityHeadersMiddleware(web, headers=API_HEADERS)
