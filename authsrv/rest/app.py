"""The management REST application: routes, authentication, problem+json errors.

Layers, outermost first: ProblemMiddleware (body bound, 500 containment) -> AuthMiddleware (who is
calling, by channel) -> Starlette routing. Each resource module offers `routes()`; the OpenAPI
document is built from those same routes.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.rest.audit import AuditMiddleware
from authsrv.rest.auth import AuthMiddleware
from authsrv.rest.balances import BalancesApi
from authsrv.rest.cards import CardsApi
from authsrv.rest.clearing_api import clearing_routes
from authsrv.rest.context import RestContext
from authsrv.rest.errors import (
    REQUEST_BODY_BYTES_MAX,
    ProblemMiddleware,
    http_exception_handler,
    ledger_not_writable_handler,
    log_fenced_handler,
    replication_timeout_handler,
)
from authsrv.rest.fx_api import FxApi
from authsrv.rest.history_api import HistoryApi
from authsrv.rest.jwe import SERVER_KEY_FILE, JweCodec, ServerKey, public_key_routes
from authsrv.rest.kyc import KycApi, kyc_success_hooks
from authsrv.rest.lifecycle import LifecycleApi
from authsrv.rest.limits_api import LimitsApi
from authsrv.rest.money import LedgerNotWritable
from authsrv.rest.openapi import build_openapi
from authsrv.rest.otp_api import OtpApi
from authsrv.rest.outbox_api import OutboxApi
from authsrv.rest.partner_balances import PartnerBalancesApi
from authsrv.rest.sessions import SessionTable
from authsrv.rest.sessions_api import SessionsApi
from authsrv.store.db import ReplicationTimeout, Store
from ledger.jetstream import LogFencedError

API_VERSION = "0.2.0"


def make_context(store: Store, *, data_dir: Path | None = None, index=None, ledger=None, config=None,
                 keys=None) -> RestContext:
    """The handlers' shared context; the JWE key is made on first start for older data dirs."""
    ttl_s = config.sessions.customer_token_ttl_s if config is not None else 600
    admin_ttl_s = config.sessions.admin_token_ttl_s if config is not None else 600
    jwe = None
    if data_dir is not None:
        jwe = JweCodec(ServerKey.load_or_create(Path(data_dir) / "keys" / SERVER_KEY_FILE))
    return RestContext(store=store, data_dir=data_dir, index=index, ledger=ledger, config=config, keys=keys,
                       jwe=jwe, customer_sessions=SessionTable(ttl_s), admin_sessions=SessionTable(admin_ttl_s))


def build_app(ctx: RestContext, *, body_bytes_max: int = REQUEST_BODY_BYTES_MAX) -> Starlette:
    lifecycle = LifecycleApi(ctx)
    sessions = SessionsApi(ctx)
    lifecycle.kyc_success_hooks.extend(kyc_success_hooks(ctx))
    routes: list[Route] = [
        *lifecycle.routes(),
        *BalancesApi(ctx).routes(), *PartnerBalancesApi(ctx).routes(),
        *sessions.routes(),
        *KycApi(ctx, lifecycle.kyc_success_hooks).routes(),
        *(public_key_routes(ctx.jwe) if ctx.jwe is not None else []),
        *clearing_routes(ctx),
        *OtpApi(ctx).routes(), *OutboxApi(ctx).routes(),
        *FxApi(ctx).routes(),
        *(CardsApi.of(ctx).routes() if ctx.keys is not None and ctx.jwe is not None else []),
        *LimitsApi(ctx).routes(), *HistoryApi(ctx).routes(),  # spend controls, transaction history
    ]
    openapi_body = msgspec.json.encode(build_openapi(routes, version=API_VERSION))

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type="application/json")

    async def is_partner(name: str) -> bool:
        # Partners are added by `authsrv partner add` from another process: ask the store each time.
        found = await trio.to_thread.run_sync(ctx.store.get_partner, name, limiter=ctx.limiter)
        return found is not None

    # The Administration Panel: HTML pages on this same listener (authsrv/panel, docs/panel.md).
    # Imported here: the panel imports authsrv.rest (context, domain code), so a module-level import
    # made `import authsrv.panel.app` fail when it came first (a circular import).
    from authsrv.panel.app import build_panel

    panel = build_panel(ctx, attempts=sessions.admin_attempts)
    return Starlette(
        routes=[Route("/openapi.json", openapi, methods=["GET"]), *routes, panel],
        middleware=[
            Middleware(ProblemMiddleware, body_bytes_max=body_bytes_max),
            Middleware(AuthMiddleware, is_partner=is_partner, customer_sessions=ctx.customer_sessions,
                       admin_sessions=ctx.admin_sessions),
            Middleware(AuditMiddleware, store=ctx.store, in_thread=ctx.in_thread),
        ],
        exception_handlers={HTTPException: http_exception_handler, LedgerNotWritable: ledger_not_writable_handler,
                            ReplicationTimeout: replication_timeout_handler, LogFencedError: log_fenced_handler},
    )
