"""The management REST application: routes, partner authentication, problem+json errors.

Layers, outermost first: ProblemMiddleware (body bound, 500 containment) -> PartnerAuthMiddleware
(`/lifecycle`, `/secure`) -> Starlette routing.
"""

from __future__ import annotations

import msgspec
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.rest.auth import PartnerAuthMiddleware
from authsrv.rest.errors import REQUEST_BODY_BYTES_MAX, ProblemMiddleware, http_exception_handler
from authsrv.rest.lifecycle import LifecycleApi
from authsrv.rest.openapi import build_openapi
from authsrv.store.db import Store

API_VERSION = "0.1.0"


def build_app(store: Store, index: object = None, *, body_bytes_max: int = REQUEST_BODY_BYTES_MAX) -> Starlette:
    """`index` (the in-memory card index) is unused by the wallet endpoints; cards will need it."""
    lifecycle = LifecycleApi(store)
    openapi_body = msgspec.json.encode(build_openapi(version=API_VERSION))

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type="application/json")

    async def is_partner(name: str) -> bool:
        # Partners are added by `authsrv partner add` from another process: ask the store each time.
        found = await trio.to_thread.run_sync(store.get_partner, name, limiter=lifecycle.limiter)
        return found is not None

    return Starlette(
        routes=[Route("/openapi.json", openapi, methods=["GET"]), *lifecycle.routes()],
        middleware=[
            Middleware(ProblemMiddleware, body_bytes_max=body_bytes_max),
            Middleware(PartnerAuthMiddleware, is_partner=is_partner),
        ],
        exception_handlers={HTTPException: http_exception_handler},
    )
