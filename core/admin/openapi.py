"""``/openapi.json``: generated from the endpoint table and the same msgspec
types that validate requests, so the description cannot drift from what the
server enforces."""

from __future__ import annotations

from typing import Any

import msgspec

from triogate import __version__
from triogate.admin.endpoints import ENDPOINTS, Endpoint
from triogate.control.models import Problem

__all__ = ["build_openapi"]

_REF = "#/components/schemas/{name}"
_ERRORS = {
    "400": "VALIDATION_ERROR: bad JSON or fields (see errors)",
    "401": "MISSING_KEY / INVALID_KEY / KEY_REVOKED: no usable admin key",
    "403": "FORBIDDEN: the admin lacks required_permission",
    "404": "NOT_FOUND",
    "409": "CONFLICT",
}


def _query_parameters(ep: Endpoint, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    if ep.query is None:
        return []
    schema = schemas.pop(ep.query.__name__)
    return [
        {"name": name, "in": "query", "required": False, "schema": prop}
        for name, prop in schema["properties"].items()
    ]


def _content(ep: Endpoint) -> dict[str, Any]:
    if ep.content_type != "application/json":
        return {ep.content_type: {"schema": {"type": "string"}}}
    if ep.response is None:
        return {}
    return {"application/json": {"schema": {"$ref": _REF.format(name=ep.response.__name__)}}}


def build_openapi() -> dict[str, Any]:
    types: list[Any] = [Problem]
    for ep in ENDPOINTS:
        types.extend(t for t in (ep.request, ep.response, ep.query) if t is not None)
    _, schemas = msgspec.json.schema_components(types, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for ep in ENDPOINTS:
        op: dict[str, Any] = {
            "operationId": ep.name,
            "summary": ep.summary,
            "tags": list(ep.tags),
            "parameters": _query_parameters(ep, dict(schemas)),
            "responses": {str(ep.status): {"description": "OK", "content": _content(ep)}},
        }
        if "{id}" in ep.path:
            op["parameters"].append(
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            )
        if ep.permission is not None:
            op["security"] = [{"adminKey": []}]
            op["x-required-permission"] = ep.permission
        if ep.request is not None:
            op["requestBody"] = {
                "required": ep.method != "POST" or not ep.path.endswith("/rotate"),
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(name=ep.request.__name__)}}
                },
            }
        for status, description in _ERRORS.items():
            op["responses"][status] = {
                "description": description,
                "content": {
                    "application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}
                },
            }
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    for ep in ENDPOINTS:
        if ep.query is not None:
            schemas.pop(ep.query.__name__, None)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "triogate admin API",
            "version": __version__,
            "description": "Key lifecycle, admins and audit for the triogate API gateway.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"}},
        },
    }
