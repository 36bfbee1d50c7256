"""Admin view of the partner outbox (authsrv/notify): dead letters and their replay.

    GET  /admin/outbox/dead?afterId=N&limit=M     calls given up after their tries, oldest first
    POST /admin/outbox/dead/{deliveryId}/replay   back to pending: same body, same X-Idempotency-Key

Roles Admin and Manager. The delivery worker picks a replayed call up within its poll interval.
Bodies are shown: they are what authsrv sent (never a PAN or CVV; an OTP body is a JWE only the
partner can read).
"""

from __future__ import annotations

import logging

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.notify.outbox import DEAD_PAGE_MAX, Delivery, OutboxStore
from authsrv.rest.auth import Caller
from authsrv.rest.context import Doc, RestContext, admin_route, json_response, parse_id
from authsrv.rest.errors import Title, problem
from authsrv.store.db import Role

log = logging.getLogger("authsrv.rest")

OUTBOX_ROLES = frozenset({Role.admin, Role.manager})
PAGE_DEFAULT = 100


class DeadLetter(msgspec.Struct, frozen=True, rename="camel"):
    id: int
    partner: str
    kind: str
    method: str
    path: str
    body: str
    idempotency_key: str
    order_key: str
    source: str
    state: str
    tries: int
    last_status: int
    last_error: str
    created_at: str
    updated_at: str


class DeadLetterPage(msgspec.Struct, frozen=True, rename="camel"):
    items: list[DeadLetter]
    next_after_id: int | None


def dead_letter(row: Delivery) -> DeadLetter:
    return msgspec.convert(row, DeadLetter, from_attributes=True)  # the store row's fields, by name


def _page_args(request: Request) -> tuple[int, int] | None:
    after_text = request.query_params.get("afterId", "0")
    limit_text = request.query_params.get("limit", str(PAGE_DEFAULT))
    after = 0 if after_text == "0" else parse_id(after_text)
    limit = parse_id(limit_text)
    if after is None or limit is None or limit > DEAD_PAGE_MAX:
        return None
    return after, limit


class OutboxApi:
    def __init__(self, ctx: RestContext) -> None:
        self.ctx = ctx
        self.outbox = OutboxStore(ctx.store)

    def routes(self) -> list[Route]:
        return [
            admin_route("/admin/outbox/dead", self.list_dead, method="GET", roles=OUTBOX_ROLES,
                        name="outbox.dead", doc=Doc("Partner calls given up after their tries (dead letters)",
                                                    response=DeadLetterPage, problems=(400,))),
            admin_route("/admin/outbox/dead/{deliveryId}/replay", self.replay, method="POST", roles=OUTBOX_ROLES,
                        name="outbox.replay", doc=Doc("Send a dead letter again (same body and idempotency key)",
                                                      response=DeadLetter, problems=(404,))),
        ]

    async def list_dead(self, request: Request, caller: Caller) -> Response:
        args = _page_args(request)
        if args is None:
            return problem(400, Title.INVALID_PAYLOAD, f"afterId must be an id, limit 1..{DEAD_PAGE_MAX}")
        after, limit = args
        rows = await self.ctx.in_thread(self.outbox.dead, after_id=after, limit=limit)
        next_after = rows[-1].id if len(rows) == limit else None
        return json_response(DeadLetterPage(items=[dead_letter(row) for row in rows], next_after_id=next_after))

    async def replay(self, request: Request, caller: Caller) -> Response:
        delivery_id = parse_id(request.path_params["deliveryId"])
        row = None if delivery_id is None else await self.ctx.in_thread(self.outbox.replay, delivery_id)
        if row is None:
            return problem(404, Title.DELIVERY_NOT_FOUND, "no such dead letter")
        log.info("admin %s replayed outbox delivery %d (%s to %s)", caller.admin, row.id, row.kind, row.partner)
        return json_response(dead_letter(row))
