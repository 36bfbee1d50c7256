"""Partner authentication on `/lifecycle` and `/secure`: the verified TLS client certificate.

The TLS layer requests a client certificate and verifies any it gets against the development CA
(`CERT_OPTIONAL`: a certificate that does not verify fails the handshake). anycorn hands the verified
chain to the app in `scope["extensions"]["tls"]`; the leaf's subject CN is the partner name, which
must be a partner row in the store. The partner name lands in `scope["state"]["partner"]`.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from cryptography import x509
from starlette.types import ASGIApp, Receive, Scope, Send

from authsrv.pki import certificate_common_name
from authsrv.rest.errors import Title, problem

log = logging.getLogger("authsrv.rest")

PARTNER_PATH_PREFIXES = ("/lifecycle/", "/secure/")
CERTIFICATE_PEM_BYTES_MAX = 16 * 1024

PartnerLookup = Callable[[str], Awaitable[bool]]  # partner name -> known?


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


def requires_partner(path: str) -> bool:
    return path.startswith(PARTNER_PATH_PREFIXES) or path in ("/lifecycle", "/secure")


class PartnerAuthMiddleware:
    def __init__(self, app: ASGIApp, *, is_partner: PartnerLookup) -> None:
        self.app = app
        self.is_partner = is_partner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not requires_partner(scope["path"]):
            await self.app(scope, receive, send)
            return
        name = client_certificate_name(scope)
        if name is None:
            response = problem(401, Title.UNAUTHORIZED, "a client certificate signed by the CA is required")
            await response(scope, receive, send)
            return
        if not await self.is_partner(name):
            log.info("refused client certificate of unknown partner %r", name[:64])
            response = problem(403, Title.FORBIDDEN, "the client certificate is not a known partner")
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["partner"] = name
        await self.app(scope, receive, send)
