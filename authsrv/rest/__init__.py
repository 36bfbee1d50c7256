"""Management REST API (docs/contract.md, REST conventions): HTTPS with partner mTLS, problem+json, OpenAPI."""

from authsrv.rest.app import build_app as build_app
from authsrv.rest.server import serve_rest as serve_rest
