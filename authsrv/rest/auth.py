"""Who is calling: one `Caller` per request, decided by the path's channel before any handler runs.

- `/lifecycle/...`, `/secure/...` (server to server): the verified TLS client certificate. The TLS
  layer requests one and verifies any it gets against the development CA (`CERT_OPTIONAL`: a
  certificate that does not verify fails the handshake). anycorn hands the verified chain to the app
  in `scope["extensions"]["tls"]`; the leaf's subject CN is the partner name, which must be a
  partner row in the store.
- `/customers/me/...` (mobile): `Authorization: Bearer` of a customer session.
- `/admin/...` (admin panel): `Authorization: Bearer` of an admin session.
- Open: `/openapi.json`, `POST /customers/sessions`, `GET /customers/public_key`, `POST /admin/sessions`.

The caller lands in `scope["state"]["caller"]` (`request.state.caller`); `partner` too, for the
server-to-server handlers that only need the name.
"""

from __future__ import annotations

import enum
import logging
from typing import Awaitable, Callable

import attrs
from cryptography import x509
from starlette.types import ASGIApp, Receive, Scope, Send

from authsrv.pki import certificate_common_name
from authsrv.rest.errors import Title, problem
from authsrv.rest.sessions import SessionTable
from authsrv.store.db import Role

log = logging.getLogger("authsrv.rest")

PARTNER_PATH_PREFIXES = ("/lifecycle/", "/secure/")
CUSTOMER_PATH_PREFIX = "/customers/me"
ADMIN_PATH_PREFIX = "/admin"
OPEN_PATHS = frozenset({"/openapi.json", "/customers/sessions", "/customers/public_key", "/admin/sessions"})
CERTIFICATE_PEM_BYTES_MAX = 16 * 1024

PartnerLookup = Callable[[str], Awaitable[bool]]  # partner name -> known?


class Channel(enum.StrEnum):
    customer = "customer"  # mobile app, customer session token
    partner = "partner"  # server to server, client certificate
    admin = "admin"  # admin panel, admin session token


@attrs.frozen
class CustomerSubject:
    """What a customer session stands for."""

    customer_id: int
    partner: str
    device_id: str


@attrs.frozen
class AdminSubject:
    username: str
    role: Role


@attrs.frozen
class Caller:
    channel: Channel
    partner: str | None = None  # partner channel: the certificate's; customer channel: the user's
    customer_id: int | None = None  # customer channel only
    device_id: str | None = None  # customer channel only
    admin: str | None = None  # admin channel only
    role: Role | None = None  # admin channel only


def channel_of(path: str) -> Channel | None:
    """The channel a path belongs to, None for open paths and unknown prefixes."""
    if path in OPEN_PATHS:
        return None
    if path.startswith(PARTNER_PATH_PREFIXES) or path in ("/lifecycle", "/secure"):
        return Channel.partner
    if path == CUSTOMER_PATH_PREFIX or path.startswith(CUSTOMER_PATH_PREFIX + "/"):
        return Channel.customer
    if path == ADMIN_PATH_PREFIX or path.startswith(ADMIN_PATH_PREFIX + "/"):
        return Channel.admin
    return None


def client_certificate_name(scope: Scope) -> str | None:
    """The CN of the verified client certificate of this connection, None when there is none."""
    tls = scope.get("extensions", {}).get("tls")
    if not tls:
        return None
    chain = tls.get("client_cert_chain") or ()
    if not chain or tls.get("client_cert_error"):
        return None
    leaf = chain[0]
    assert isinstance(leaf, str)
    if len(leaf) > CERTIFICATE_PEM_BYTES_MAX:
        return None
    return certificate_common_name(x509.load_pem_x509_certificate(leaf.encode()))


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, is_partner: PartnerLookup,
                 customer_sessions: SessionTable[CustomerSubject],
                 admin_sessions: SessionTable[AdminSubject]) -> None:
        self.app = app
        self.is_partner = is_partner
        self.customer_sessions = customer_sessions
        self.admin_sessions = admin_sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        channel = channel_of(scope["path"])
        if channel is None:
            await self.app(scope, receive, send)
            return
        caller_or_refusal = await self._authenticate(channel, scope)
        if not isinstance(caller_or_refusal, Caller):
            await caller_or_refusal(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["caller"] = caller_or_refusal
        if caller_or_refusal.partner is not None:
            state["partner"] = caller_or_refusal.partner
        await self.app(scope, receive, send)

    async def _authenticate(self, channel: Channel, scope: Scope):
        if channel is Channel.partner:
            name = client_certificate_name(scope)
            if name is None:
                return problem(401, Title.UNAUTHORIZED, "a client certificate signed by the CA is required")
            if not await self.is_partner(name):
                log.info("refused client certificate of unknown partner %r", name[:64])
                return problem(403, Title.FORBIDDEN, "the client certificate is not a known partner")
            return Caller(Channel.partner, partner=name)
        token = bearer_token(scope)
        if token is None:
            return problem(401, Title.UNAUTHORIZED, "an `Authorization: Bearer` session token is required")
        if channel is Channel.customer:
            customer = self.customer_sessions.lookup(token)
            if customer is None:
                return problem(401, Title.UNAUTHORIZED, "the session token is unknown or expired")
            return Caller(Channel.customer, partner=customer.partner, customer_id=customer.customer_id,
                          device_id=customer.device_id)
        assert channel is Channel.admin
        admin = self.admin_sessions.lookup(token)
        if admin is None:
            return problem(401, Title.UNAUTHORIZED, "the admin session token is unknown or expired")
        return Caller(Channel.admin, admin=admin.username, role=admin.role)
