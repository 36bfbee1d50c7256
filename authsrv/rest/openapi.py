"""The OpenAPI 3.1 document, its schemas generated from the msgspec types the handlers decode with.

Only the path table is written here (which type goes where); every schema comes from
`msgspec.json.schema_components`, so the document cannot drift from what the server accepts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from authsrv.rest.errors import PROBLEM_MEDIA_TYPE, Problem
from authsrv.rest.lifecycle import CustomerCreated, WalletCreate, WalletUpdate, WalletUser

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{name}"


def _ref(model: type) -> dict[str, Any]:
    return {"$ref": REF_TEMPLATE.format(name=model.__name__)}


def _json_body(model: type) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _responses(status: int, model: type, *problems: int) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(status): {"description": "OK", "content": {"application/json": {"schema": _ref(model)}}}
    }
    for code in (400, 401, 403, 413, *problems):
        responses[str(code)] = {"description": "problem",
                                "content": {PROBLEM_MEDIA_TYPE: {"schema": _ref(Problem)}}}  # fmt: skip
    return responses


_CUSTOMER_ID = {"name": "customerId", "in": "path", "required": True, "schema": {"type": "integer"}}


def build_openapi(*, version: str) -> dict[str, Any]:
    models = (WalletCreate, WalletUpdate, WalletUser, CustomerCreated, Problem)
    (_, components) = msgspec.json.schema_components(models, ref_template=REF_TEMPLATE)
    assert set(components) >= {model.__name__ for model in models}
    mtls = [{"partnerCertificate": []}]
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "authsrv management API", "version": version},
        "paths": {
            "/lifecycle/v1/wallet": {
                "post": {"summary": "Create a user (wallet)", "security": mtls,
                         "requestBody": _json_body(WalletCreate),
                         "responses": _responses(201, CustomerCreated)},
            },
            "/lifecycle/v1/wallet/{customerId}": {
                "parameters": [_CUSTOMER_ID],
                "get": {"summary": "Get a user", "security": mtls,
                        "responses": _responses(200, WalletUser, 404)},
                "put": {"summary": "Update some fields of a user", "security": mtls,
                        "requestBody": _json_body(WalletUpdate),
                        "responses": _responses(200, WalletUser, 404)},
            },
        },  # fmt: skip
        "components": {
            "schemas": components,
            "securitySchemes": {"partnerCertificate": {"type": "mutualTLS"}},
        },
    }
