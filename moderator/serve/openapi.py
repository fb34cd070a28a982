"""The endpoint's OpenAPI 3.1 document (``GET /openapi.json``), built from the wire formats' own schemas."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moderator.events import DecisionRecord, ImageEvent
from moderator.serve.openai_api import ModerationRequest, ModerationResponse

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="the reason code (the dead letters' codes, and the endpoint's own)")
    reason: str = Field(description="the same reason code")
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: None = None


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


def _schema(model: type[BaseModel], components: dict[str, Any], mode: str = "validation") -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _errors(statuses: dict[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, why in statuses.items():
        response: dict[str, Any] = {
            "description": why,
            "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}},
        }
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        out[str(status)] = response
    return out


ERRORS = {
    400: "a malformed request (invalid_json, invalid_envelope, invalid_base64, url_invalid)",
    401: "no valid API key (unauthorized)",
    413: "the request or its image is too large (message_too_large, image_too_large, fetch_too_large)",
    422: "the image cannot be decided (unknown_policy, not_an_image, url_blocked, fetch_failed, ...)",
    429: "the key's rate is spent (rate_limited)",
    503: "overloaded, or no decision within the timeout (overloaded, timeout, publish_failed): retry after",
}


def document(title: str = "moderator serve", version: str = "1") -> dict[str, Any]:
    components: dict[str, Any] = {}
    _schema(ErrorBody, components)
    _schema(ImageEvent, components)
    moderate = copy.deepcopy(components["ImageEvent"])
    moderate["title"] = "ModerateRequest"
    moderate["description"] = "The image event envelope; `id` (the event id) is optional: a new one is made."
    moderate["required"] = [r for r in moderate.get("required", []) if r != "id"]
    components["ModerateRequest"] = moderate
    decision = _schema(DecisionRecord, components, mode="serialization")
    moderation_request = _schema(ModerationRequest, components)
    moderation_response = _schema(ModerationResponse, components, mode="serialization")
    timeout_header = {
        "name": "X-Moderator-Timeout-Ms",
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 1},
        "description": "the request's deadline in milliseconds (default MODERATOR_SERVE_TIMEOUT_S; capped)",
    }
    id_header = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,248}$"},
        "description": "the event id of the request's image (several: <id>:<index>)",
    }

    def post(summary: str, body: dict[str, Any], ok: dict[str, Any], params: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "parameters": params,
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {
                    "200": {"description": "decided", "content": {"application/json": {"schema": ok}}},
                    **_errors(ERRORS),
                },
                "security": [{"apiKey": []}],
            }
        }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Synchronous moderation: the stream's policies, model, batches and trail.",
        },
        "paths": {
            "/v1/moderate": post(
                "Decide one image event; the decision record exactly as the decisions topic carries it",
                {"$ref": REF.format(model="ModerateRequest")},
                decision,
                [timeout_header],
            ),
            "/v1/moderations": post(
                "OpenAI-compatible moderation of image_url inputs (the policy's categories)",
                moderation_request,
                moderation_response,
                [timeout_header, id_header],
            ),
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
