"""Outbox: the partner calls given up after their tries (dead letters), with a Replay button each.

Same store calls and roles as `GET /admin/outbox/dead` and `POST /admin/outbox/dead/{id}/replay`
(OUTBOX_ROLES): a replay puts the letter back to pending with its tries reset, the same body and
the same X-Idempotency-Key; the delivery worker sends it within its poll interval.
"""

from __future__ import annotations

import logging

from starlette.requests import Request

from authsrv.notify.outbox import OutboxStore
from authsrv.panel.app import PanelApp
from authsrv.rest.context import parse_id
from authsrv.rest.outbox_api import OUTBOX_ROLES

log = logging.getLogger("authsrv.panel")

PAGE = 100


def register(panel: PanelApp) -> None:
    outbox = OutboxStore(panel.store)

    @panel.page("/outbox", roles=OUTBOX_ROLES)
    async def dead_letters(request: Request, op):
        after_text = request.query_params.get("after", "0")
        after = 0 if after_text == "0" else parse_id(after_text)
        if after is None:
            return panel.error(request, op, 400, "Bad request", "Follow the Next link to page on.")
        rows = await panel.ctx.in_thread(outbox.dead, after_id=after, limit=PAGE + 1)
        counts = await panel.ctx.in_thread(outbox.counts)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        return panel.render(request, op, "outbox.html", rows=rows, counts=counts,
                            next_url=f"/panel/outbox?after={rows[-1].id}" if more else "",
                            first_url="/panel/outbox" if after else "")

    @panel.action("/outbox/{deliveryId}/replay", roles=OUTBOX_ROLES)
    async def replay(request: Request, op, form):
        delivery_id = parse_id(request.path_params["deliveryId"])
        before = None if delivery_id is None else await panel.ctx.in_thread(outbox.get, delivery_id)
        row = None if delivery_id is None else await panel.ctx.in_thread(outbox.replay, delivery_id)
        target = f"delivery:{request.path_params['deliveryId'][:20]}"
        if row is None:
            await panel.audit(op, "outbox.replay", target, "not a dead letter")
            return panel.redirect(request, "/panel/outbox", flash="That letter is no longer dead (replayed or "
                                  "delivered meanwhile): nothing changed.")
        await panel.audit(op, "outbox.replay", target, "ok",
                          before={"state": before.state, "tries": before.tries} if before else None,
                          after={"state": row.state, "tries": row.tries, "idempotencyKey": row.idempotency_key})
        log.info("panel: %s replayed outbox delivery %d (%s to %s)", op.username, row.id, row.kind, row.partner)
        return panel.redirect(request, "/panel/outbox", flash=f"Letter {row.id} ({row.kind} to {row.partner}) "
                              "is pending again; it goes out with its original idempotency key.")
