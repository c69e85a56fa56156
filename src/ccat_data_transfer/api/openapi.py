"""The OpenAPI document (API layer): what the API does, said so tools can check it.

FastAPI's generated document is completed here: every error answer an operation can give
is listed with its meaning and the ``{"detail": ...}`` body; operations that need a token
declare it, and the dashboard's operations declare auth only when the dashboard is not
public (DASHBOARD_PUBLIC), as a bearer token or the login cookie.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ccat_data_transfer.api.limits import max_body_bytes
from ccat_data_transfer.api.login import COOKIE, dashboard_is_public

_MEANING = {
    "400": "Refused: the request is well-formed but not allowed (reason in detail).",
    "401": "No valid token (or dashboard login): missing, unknown, revoked or expired.",
    "403": "The token lacks the role (or the scope) this operation needs.",
    "404": "No such thing.",
    "409": "Conflicts with what is already recorded.",
    "413": "The request body is larger than API_MAX_BODY_BYTES.",
    "422": "The request does not match this schema (each problem in detail).",
    "503": "The database is unavailable (restarting or unreachable): nothing of the request "
    "was done; repeat it after Retry-After seconds.",
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_VIEWER_SECURITY = [{"HTTPBearer": []}, {"DashboardCookie": []}]


def _is_dashboard(path: str) -> bool:
    return path.startswith("/dashboard") or path == "/metrics"


def describe_api(app: FastAPI) -> dict[str, Any]:
    """The document ``/openapi.json`` serves (built once per app)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = {
        "title": "Error",
        "type": "object",
        "properties": {"detail": {"description": "the reason, or a list of problems"}},
        "required": ["detail"],
    }
    schemes = components.setdefault("securitySchemes", {})
    schemes.setdefault("HTTPBearer", {"type": "http", "scheme": "bearer"})
    schemes["DashboardCookie"] = {
        "type": "apiKey",
        "in": "cookie",
        "name": COOKIE,
        "description": "set by POST /dashboard/login in exchange for a viewer token",
    }
    public = dashboard_is_public()
    limit = max_body_bytes()
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            if _is_dashboard(path):
                if public:
                    operation.pop("security", None)
                else:
                    operation["security"] = _VIEWER_SECURITY
            _complete_responses(operation, limit)
    app.openapi_schema = schema
    return schema


def _complete_responses(operation: dict[str, Any], limit: int) -> None:
    responses = operation.setdefault("responses", {})
    if operation.get("security"):
        responses.setdefault("401", {})
        responses.setdefault("403", {})
    if "requestBody" in operation:
        responses.setdefault("413", {})
        responses.setdefault("422", {})
        operation["requestBody"].setdefault("description", f"at most {limit} bytes")
    if operation.get("parameters"):
        responses.setdefault("422", {})
    responses.setdefault("503", {})  # any operation may meet a lost database
    for code, meaning in _MEANING.items():
        response = responses.get(code)
        if response is None:
            continue
        if not response.get("description") or response["description"] == "Additional Response":
            response["description"] = meaning
        if code != "422" or "content" not in response:
            response["content"] = {"application/json": {"schema": _ERROR_REF}}
