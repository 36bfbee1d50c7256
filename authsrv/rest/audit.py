"""The audit log of the `/admin` channel: every state-changing admin request, with its outcome.

Written by a middleware as the handler's answer starts, so no handler can forget it: who (the session's
admin and role), what (the route's name and the path: `admin.kyc.accept`, `/admin/kyc-forms/7/accept`),
when, and how it ended (the HTTP status). Bodies are not logged: they may hold passwords, PINs or
card data. The panel writes its own, richer entries (with before and after values) for its actions.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authsrv.rest.auth import ADMIN_PATH_PREFIX, Caller, Channel
from authsrv.store.db import AuditEntry, Store

log = logging.getLogger("authsrv.rest")

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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

        async def recording_send(message: Message) -> None:
            # Written before the answer starts: once a caller sees the outcome, the entry is durable.
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                await self._record(scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            if not recorded:  # cancelled or failed before any answer
                await self._record(scope, 500)

    async def _record(self, scope: Scope, status: int) -> None:
        caller = scope.get("state", {}).get("caller")
        route = scope.get("route")
        action = getattr(route, "name", None) or f"{scope['method']} (no route)"
        if isinstance(caller, Caller) and caller.channel is Channel.admin:
            actor, role = caller.admin or "", str(caller.role)
        elif action == "admin.session.create":
            actor, role = "", ""  # a login: the name is in the body, which is not read here
        else:
            return  # refused before a caller was known (401): nothing was done
        entry = AuditEntry(0, "", actor, role, "api", action, scope["path"][:128], f"HTTP {status}")
        try:
            await self.in_thread(self.store.append_audit, entry)
        except Exception:  # the action's answer has gone out; losing its audit line must be seen
            log.exception("could not write the audit entry of %s %s", scope["method"], scope["path"][:128])
