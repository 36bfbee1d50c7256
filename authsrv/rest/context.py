"""What every REST handler may use, in one value, and the routing of actions onto channels.

An action on a customer's resources ("lock a card") is written once, as `handler(request, call)`,
and `customer_routes` mounts it under each channel the reference documents offer it on:

    customer  /customers/me{subpath}                      session token, the session's own user
    partner   /secure/customers/{customerId}{subpath}     client certificate, the partner's users only
    admin     /admin/customers/{customerId}{subpath}      admin token, the listed roles only

so access rules live in one table per module (the `Access` values), not in each handler.
A customer id the caller may not see is a 404, exactly like one that does not exist.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.rest.auth import AdminSubject, Caller, Channel, CustomerSubject
from authsrv.rest.errors import Title, problem
from authsrv.rest.sessions import SessionTable
from authsrv.store.db import Role, Store, UserRow

log = logging.getLogger("authsrv.rest")

STORE_THREADS_MAX = 4  # scrypt is ~16 MiB per call; more threads would only queue on the store lock
ID_MAX = 2**63 - 1  # SQLite INTEGER
ALL_ROLES = frozenset(Role)

T = TypeVar("T")
_encoder = msgspec.json.Encoder()


@attrs.frozen
class Access:
    """Which channels offer an action (reference documents, "Availability" tables)."""

    customer: bool = False
    partner: bool = False
    admin: frozenset[Role] = frozenset()  # the admin roles allowed; empty = not on the admin channel


@attrs.frozen
class Doc:
    """What /openapi.json says about a route; the schemas come from these very types."""

    summary: str
    body: type | None = None  # msgspec Struct decoded from the request (None: no body)
    response: type | None = None  # msgspec Struct answered (None: 204 / no body)
    status: int = 200
    problems: tuple[int, ...] = (404,)
    multipart: bool = False  # body is multipart/form-data (KYC forms)
    encrypted: bool = False  # card data: request and/or response travel as JWE `{"payload": ...}`


@attrs.frozen
class Call:
    caller: Caller
    user: UserRow  # the customer the path is about, already checked visible to the caller


CustomerHandler = Callable[[Request, Call], Awaitable[Response]]
AdminHandler = Callable[[Request, Caller], Awaitable[Response]]


@attrs.define
class RestContext:
    store: Store
    data_dir: Path | None = None
    index: Any = None  # authsrv.store.index.CardIndex: the hot path's view, kept current by the store
    ledger: Any = None  # ledger.durable.DurableLedger of the running server (None: no money endpoints)
    config: Any = None  # authsrv.config.Config
    keys: Any = None  # authsrv.cardsec.CardKeys
    clearing_planner: Any = None  # authsrv.clearing.remote.ClearingPlanner (a single node's server)
    jwe: Any = None  # authsrv.rest.jwe.JweCodec
    metrics: Any = None  # authsrv.metrics.Metrics of the running server (the panel's dashboard reads it)
    fees: Any = None  # authsrv.hotpath.fees.FeeBook of the running switch (a fee edit forgets its cache)
    customer_sessions: SessionTable[CustomerSubject] = attrs.field(factory=lambda: SessionTable(600))
    admin_sessions: SessionTable[AdminSubject] = attrs.field(factory=lambda: SessionTable(600))
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(STORE_THREADS_MAX))

    async def in_thread(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Store work off the event loop: commits fsync, scrypt burns CPU, the lock may be held."""
        return await trio.to_thread.run_sync(lambda: function(*args, **kwargs), limiter=self.limiter)

    def partner_config(self, partner: str):
        """The `[partners.NAME]` settings (defaults when the table is missing)."""
        from authsrv.config import PartnerConfig

        if self.config is None:
            return PartnerConfig()
        return self.config.partners.get(partner) or PartnerConfig()


# -- responses -------------------------------------------------------------------------------------


def json_response(value: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type="application/json")


def invalid(error: msgspec.DecodeError | str) -> Response:
    # msgspec names the path and the rule (`Expected `str`, got `int` - at `$.phone``), never the
    # value, so the detail cannot echo a wPIN or a card number back.
    return problem(400, Title.INVALID_PAYLOAD, str(error))


def customer_not_found() -> Response:
    return problem(404, Title.CUSTOMER_NOT_FOUND, "no such customer")


def parse_id(text: str) -> int | None:
    """A positive integer id from a path segment, None for anything else."""
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if 1 <= value <= ID_MAX else None


# -- routing ---------------------------------------------------------------------------------------

CUSTOMER_ROOT = "/customers/me"
PARTNER_ROOT = "/secure/customers/{customerId}"
ADMIN_ROOT = "/admin/customers/{customerId}"


def route(path: str, endpoint, *, methods: list[str], name: str, doc: Doc, channel: Channel | None,
          roles: frozenset[Role] = frozenset()) -> Route:
    """A Starlette route carrying its OpenAPI description (`route.doc`, `route.channel`)."""
    assert len(methods) == 1, "one method per route, so each has its own doc"
    made = Route(path, endpoint, methods=methods, name=name)
    made.doc = doc  # type: ignore[attr-defined]
    made.channel = channel  # type: ignore[attr-defined]
    made.roles = roles  # type: ignore[attr-defined]
    return made


def customer_routes(ctx: RestContext, subpath: str, handler: CustomerHandler, *, method: str,
                    access: Access, name: str, doc: Doc) -> list[Route]:
    """Mount `handler` (an action on one customer's resources) on each channel `access` allows."""
    assert subpath == "" or subpath.startswith("/"), subpath
    routes = []
    if access.customer:
        routes.append(route(CUSTOMER_ROOT + subpath, _bind(ctx, handler, Channel.customer, frozenset()),
                            methods=[method], name=f"customer.{name}", doc=doc, channel=Channel.customer))
    if access.partner:
        routes.append(route(PARTNER_ROOT + subpath, _bind(ctx, handler, Channel.partner, frozenset()),
                            methods=[method], name=f"partner.{name}", doc=doc, channel=Channel.partner))
    if access.admin:
        routes.append(route(ADMIN_ROOT + subpath, _bind(ctx, handler, Channel.admin, access.admin),
                            methods=[method], name=f"admin.{name}", doc=doc, channel=Channel.admin,
                            roles=access.admin))
    assert routes, f"{name}: offered on no channel"
    return routes


def admin_route(path: str, handler: AdminHandler, *, method: str, roles: frozenset[Role],
                name: str, doc: Doc) -> Route:
    """An admin-only action that is not about one customer (partner balances, summary, admins)."""
    assert path.startswith("/admin/") and roles

    async def endpoint(request: Request) -> Response:
        caller = request.state.caller
        assert caller.channel is Channel.admin
        if caller.role not in roles:
            return role_refused(caller, roles)
        return await handler(request, caller)

    return route(path, endpoint, methods=[method], name=f"admin.{name}", doc=doc, channel=Channel.admin,
                 roles=roles)


def role_refused(caller: Caller, roles: frozenset[Role]) -> Response:
    allowed = ", ".join(sorted(role.value for role in roles))
    return problem(403, Title.FORBIDDEN, f"role {caller.role} may not do this (allowed: {allowed})")


def _bind(ctx: RestContext, handler: CustomerHandler, channel: Channel, roles: frozenset[Role]):
    async def endpoint(request: Request) -> Response:
        caller: Caller = request.state.caller
        assert caller.channel is channel, (caller.channel, channel)
        if channel is Channel.admin and caller.role not in roles:
            return role_refused(caller, roles)
        user = await _visible_user(ctx, request, caller)
        if user is None:
            return customer_not_found()
        return await handler(request, Call(caller, user))

    return endpoint


async def _visible_user(ctx: RestContext, request: Request, caller: Caller) -> UserRow | None:
    if caller.channel is Channel.customer:
        assert caller.customer_id is not None
        user = await ctx.in_thread(ctx.store.get_user, caller.customer_id)
        return user if user is not None and user.partner == caller.partner else None
    customer_id = parse_id(request.path_params["customerId"])
    if customer_id is None:
        return None
    user = await ctx.in_thread(ctx.store.get_user, customer_id)
    if user is None:
        return None
    if caller.channel is Channel.partner and user.partner != caller.partner:
        return None
    return user
