"""Background card work in the server's nursery: async virtual cards and the personalisation bureau.

- Async issuing: `POST .../cards/virtual/async` puts a request on a bounded memory channel (full:
  503 at request time) and answers 202; this worker issues the cards one by one. A request lives
  in memory only: a crash loses queued requests (the client sees no card.created event for it).
- The bureau (reference documents, "Physical card" sequence): every `bureau.poll_interval_s` the
  worker sends ORDERED cards not yet sent (`POST {url}/orders`, idempotent on our reference
  `card-<id>`), fetches produced ones (`GET {url}/orders?state=PRODUCED`), links them (visible to
  the user, tracking number kept) and acknowledges them (`POST {url}/orders/{id}/ack`). A bureau
  that is down or answers nonsense is logged and tried again next poll; it never stops the server.
  Only the masked PAN goes to the bureau.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import attrs
import httpx
import msgspec
import trio

from authsrv.rest import money
from authsrv.rest.cards_domain import CardResult, CardService, masked_pan, order_details

log = logging.getLogger("authsrv.rest")

ASYNC_REQUESTS_MAX = 1_000  # queued async virtual-card requests; more get 503
BUREAU_BATCH_MAX = 100  # orders sent, and produced orders fetched, per poll
BUREAU_TIMEOUT_S = 5.0  # per HTTP call to the bureau
BUREAU_REFERENCE_PREFIX = "card-"


@attrs.frozen
class AsyncCardRequest:
    request_id: int
    user_id: int
    balance_id: int
    config_id: str


class BureauOrder(msgspec.Struct, rename="camel", frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # goes into a URL path
    reference: str
    state: str
    tracking_number: str = ""


class BureauOrders(msgspec.Struct, frozen=True):
    orders: list[BureauOrder]


class BureauRefused(Exception):
    """The bureau answered something other than what the protocol says (status or body)."""


_order_decoder = msgspec.json.Decoder(BureauOrder)
_orders_decoder = msgspec.json.Decoder(BureauOrders)


def card_id_of(reference: str) -> int | None:
    """Our card id from a bureau reference `card-<id>`; None for anyone else's reference."""
    if not reference.startswith(BUREAU_REFERENCE_PREFIX):
        return None
    digits = reference[len(BUREAU_REFERENCE_PREFIX):]
    return int(digits) if digits.isascii() and digits.isdigit() and 0 < len(digits) <= 18 else None


class CardsWorker:
    def __init__(self, ctx, service: CardService, requests: trio.MemoryReceiveChannel[AsyncCardRequest]) -> None:
        self.ctx = ctx
        self.service = service
        self.requests = requests
        self.running = False
        self.polls = 0  # bureau polls completed (tests and the curious)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        assert not self.running, "one worker per CardsApi"
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._issue_queued)
                nursery.start_soon(self._bureau_loop)
                task_status.started()
        finally:
            self.running = False

    # -- async issuing ---------------------------------------------------------------------------

    async def _issue_queued(self) -> None:
        async for request in self.requests:
            try:
                await self.issue_one(request)
            except Exception:  # a bug in one request must not end async issuing for everyone
                log.exception("async virtual card request %d failed", request.request_id)

    async def issue_one(self, request: AsyncCardRequest) -> None:
        result, issued = await self.ctx.in_thread(self.service.issue, request.user_id, request.balance_id,
                                                  request.config_id, card_type="virtual",
                                                  request_id=request.request_id)
        if issued is None:
            # Checked at request time; something changed since (balance closed, KYC revoked).
            log.warning("async virtual card request %d refused: %s", request.request_id, result.name)
            return
        assert result is CardResult.ok
        await money.charge_card_fee(self.ctx, issued.card)
        log.info("async virtual card request %d: card %d (%s)", request.request_id, issued.card.id,
                 masked_pan(issued.card))

    # -- the bureau ------------------------------------------------------------------------------

    async def _bureau_loop(self) -> None:
        config = self.ctx.config.bureau if self.ctx.config is not None else None
        if config is None or not config.url:
            return  # orders wait (order_state ORDERED) until a bureau is configured and the server restarts
        async with httpx.AsyncClient(base_url=config.url, timeout=BUREAU_TIMEOUT_S) as client:
            while True:
                try:
                    await self.poll_bureau_once(client)
                except (httpx.HTTPError, BureauRefused, msgspec.DecodeError) as error:
                    # The type and a short reason only: no body is echoed (it is the bureau's text).
                    log.warning("bureau %s: %s (retrying in %.1f s)", config.url, type(error).__name__,
                                config.poll_interval_s)
                self.polls += 1
                await trio.sleep(config.poll_interval_s)

    async def poll_bureau_once(self, client: httpx.AsyncClient) -> tuple[int, int]:
        """Send new orders, then link and acknowledge produced ones: (sent, linked)."""
        sent = await self._send_orders(client)
        linked = await self._link_produced(client)
        return sent, linked

    async def _send_orders(self, client: httpx.AsyncClient) -> int:
        cards = await self.ctx.in_thread(self.ctx.store.cards_to_order, BUREAU_BATCH_MAX)
        for card in cards:
            details = order_details(card)
            body: dict[str, Any] = {"reference": f"{BUREAU_REFERENCE_PREFIX}{card.id}", "cardType": card.card_type,
                                    "maskedPan": masked_pan(card), "nameOnCard": details.get("nameOnCard", ""),
                                    "deliveryAddress": details.get("deliveryAddress", {})}  # fmt: skip
            reply = await client.post("/orders", json=body)
            if reply.status_code not in (200, 201):
                raise BureauRefused(f"POST /orders answered {reply.status_code}")
            order = _order_decoder.decode(reply.content)
            await self.ctx.in_thread(self.service.mark_sent, card.id, order.id)
            log.info("card %d sent to the bureau as order %s", card.id, order.id)
        return len(cards)

    async def _link_produced(self, client: httpx.AsyncClient) -> int:
        reply = await client.get("/orders", params={"state": "PRODUCED", "limit": BUREAU_BATCH_MAX})
        if reply.status_code != 200:
            raise BureauRefused(f"GET /orders answered {reply.status_code}")
        linked = 0
        for order in _orders_decoder.decode(reply.content).orders[:BUREAU_BATCH_MAX]:
            card_id = card_id_of(order.reference)
            if card_id is None or not order.tracking_number:
                continue  # not ours (a bureau serves many issuers), or not really produced
            card = await self.ctx.in_thread(self.service.link, card_id, order.tracking_number)
            if card is not None:
                linked += 1
                log.info("card %d linked, tracking number %s", card.id, order.tracking_number)
            else:
                log.warning("bureau order %s is for card %d, which is gone: acknowledging", order.id, card_id)
            ack = await client.post(f"/orders/{order.id}/ack")
            if ack.status_code != 200:
                raise BureauRefused(f"POST /orders/{{id}}/ack answered {ack.status_code}")
        return linked
