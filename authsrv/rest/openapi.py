"""The OpenAPI 3.1 document, built from the routes themselves.

Every route is made by `authsrv.rest.context.route` and carries a `Doc` naming the msgspec types
its handler decodes and answers; the schemas come from `msgspec.json.schema_components`, so the
document cannot drift from what the server accepts. Channels map to security schemes.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from authsrv.rest.auth import Channel
from authsrv.rest.errors import PROBLEM_MEDIA_TYPE, Problem

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{name}"
_SECURITY = {
    Channel.partner: [{"partnerCertificate": []}],
    Channel.customer: [{"customerSession": []}],
    Channel.admin: [{"adminSession": []}],
}
_PARAMETER = re.compile(r"{([A-Za-z]+)}")
_PROBLEMS_ALWAYS = (400, 413)


def _ref(model: type) -> dict[str, Any]:
    return {"$ref": REF_TEMPLATE.format(name=model.__name__)}


def _problem_response() -> dict[str, Any]:
    return {"description": "problem", "content": {PROBLEM_MEDIA_TYPE: {"schema": _ref(Problem)}}}


def _operation(route, method: str) -> dict[str, Any]:
    doc = route.doc
    responses: dict[str, Any] = {}
    if doc.response is None:
        responses[str(doc.status)] = {"description": "done"}
    else:
        responses[str(doc.status)] = {"description": "OK",
                                      "content": {"application/json": {"schema": _ref(doc.response)}}}
    problems = set(_PROBLEMS_ALWAYS) | set(doc.problems)
    if route.channel is not None:
        problems |= {401, 403}
    for code in sorted(problems):
        responses[str(code)] = _problem_response()
    operation: dict[str, Any] = {"summary": doc.summary, "operationId": route.name, "responses": responses}
    if route.channel is not None:
        operation["security"] = _SECURITY[route.channel]
    if route.roles:
        operation["x-admin-roles"] = sorted(role.value for role in route.roles)
    if doc.encrypted:
        operation["x-jwe"] = True
    if doc.body is not None and method in ("POST", "PUT", "PATCH"):
        media = "multipart/form-data" if doc.multipart else "application/json"
        operation["requestBody"] = {"required": True, "content": {media: {"schema": _ref(doc.body)}}}
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "integer", "minimum": 1} if name.endswith("Id") and name != "deviceId"
                   else {"type": "string"}}
                  for name in _PARAMETER.findall(route.path)]  # fmt: skip
    if parameters:
        operation["parameters"] = parameters
    return operation


def build_openapi(routes, *, version: str) -> dict[str, Any]:
    documented = [route for route in routes if getattr(route, "doc", None) is not None]
    models = {Problem}
    for route in documented:
        models.update(model for model in (route.doc.body, route.doc.response) if model is not None)
    ordered = sorted(models, key=lambda model: model.__name__)
    (_, components) = msgspec.json.schema_components(ordered, ref_template=REF_TEMPLATE)
    paths: dict[str, dict[str, Any]] = {}
    for route in documented:
        (method,) = sorted(route.methods - {"HEAD"})
        entry = paths.setdefault(route.path, {})
        assert method.lower() not in entry, f"two routes for {method} {route.path}"
        entry[method.lower()] = _operation(route, method)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "authsrv management API", "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "partnerCertificate": {"type": "mutualTLS"},
                "customerSession": {"type": "http", "scheme": "bearer"},
                "adminSession": {"type": "http", "scheme": "bearer"},
            },
        },
    }
