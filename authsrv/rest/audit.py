"""The audit log of the `/admin` channel: every state-changing admin request, with its outcome.

Written by a middleware before the handler's answer goes out, so no handler can forget it: who (the
session's admin and role), what (the route's name and the path: `admin.kyc.accept`,
`/admin/kyc-forms/7/accept`), when, how it ended (the HTTP status), "after" (a 2xx JSON answer: the
resource as the change left it; card data only ever leaves inside JWE) and "before" where the
handler recorded it (`set_before`). Request bodies are not logged: they may hold passwords or PINs.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsrv.rest.auth import ADMIN_PATH_PREFIX, Caller, Channel
from authsrv.store.db import AuditEntry, Store

log = logging.getLogger("authsrv.rest")

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
AFTER_BYTES_MAX = 4096  # a larger answer is still sent, its entry has no "after"
AUDIT_BEFORE = "audit_before"  # request.state key a handler may set (set_before)


class AuditMiddleware:
    def __init__(self, app: ASGIApp, *, store: Store, in_thread) -> None:
        self.app = app
        self.store = store
        self.in_thread = in_thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] in READ_METHODS
                or not scope["path"].startswith(ADMIN_PATH_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        recorded = False
        held: list[Message] = []  # the answer, held until its entry is written (bounded below)
        held_bytes = 0

        async def record_and_release(after: bytes) -> None:
            nonlocal recorded
            recorded = True
            start = held[0]
            media = dict(start.get("headers", ())).get(b"content-type", b"")
            await self._record(scope, start["status"], after if media.startswith(b"application/json") else b"")
            for message in held:
                await send(message)
            held.clear()

        async def recording_send(message: Message) -> None:
            # The entry is written before the answer goes out: once a caller sees the outcome, the
            # entry is durable. A JSON answer of at most AFTER_BYTES_MAX is its "after" value.
            nonlocal held_bytes
            if recorded:
                await send(message)
                return
            held.append(message)
            if message["type"] != "http.response.body":
                return
            held_bytes += len(message.get("body", b""))
            if held_bytes > AFTER_BYTES_MAX:
                await record_and_release(b"")
            elif not message.get("more_body", False):
                await record_and_release(b"".join(m.get("body", b"") for m in held[1:]))

        try:
            await self.app(scope, receive, recording_send)
        finally:
            if not recorded:  # cancelled or failed before the whole answer
                await self._record(scope, held[0]["status"] if held else 500, b"")

    async def _record(self, scope: Scope, status: int, after: bytes) -> None:
        state = scope.get("state", {})
        caller = state.get("caller")
        route = scope.get("route")
        action = getattr(route, "name", None) or f"{scope['method']} (no route)"
        if isinstance(caller, Caller) and caller.channel is Channel.admin:
            actor, role = caller.admin or "", str(caller.role)
        elif action == "admin.session.create":
            actor, role, after = "", "", b""  # a login: the name is in the body, which is not read here
        else:
            return  # refused before a caller was known (401): nothing was done
        before = state.get(AUDIT_BEFORE)
        entry = AuditEntry(0, "", actor, role, "api", action, scope["path"][:128], f"HTTP {status}",
                           before_json=_json(before), after_json=after.decode("utf-8", "replace") if 200 <= status < 300
                           else "")
        try:
            await self.in_thread(self.store.append_audit, entry)
        except Exception:  # the action's answer goes out anyway; losing its audit line must be seen
            log.exception("could not write the audit entry of %s %s", scope["method"], scope["path"][:128])


def set_before(request, value: Any) -> None:
    """What a handler's target looked like before its change, for the audit entry's "before"."""
    request.state.audit_before = value


def _json(value: Any) -> str:
    if value is None:
        return ""
    return msgspec.json.encode(value).decode()
