"""A card personalisation bureau on loopback: plain HTTP/1.1, anycorn + Starlette on trio.

The issuer sends orders, the bureau "produces" each one `delay_s` after it arrived (standing in for
the ~48 hours of the reference documents' "Link card") and gives it a tracking number; the issuer
fetches produced orders, links the cards, and acknowledges them.

    POST /orders              {"reference", "cardType", "nameOnCard"?, "deliveryAddress"?, "maskedPan"?}
                              201 new order, 200 the existing one for the same reference (idempotent)
    GET  /orders?state=S&limit=N   {"orders": [...]}  (S: RECEIVED, PRODUCED, ACKNOWLEDGED)
    GET  /orders/{id}         one order
    POST /orders/{id}/ack     the issuer linked it: ACKNOWLEDGED (idempotent)
    GET  /healthz

Orders are held in memory, at most `orders_max`; when full, acknowledged orders are forgotten
oldest first, and if none is, a new order gets 503. The bureau never receives a full PAN: the
order carries the masked PAN only (a real bureau gets the card data by a separate secure channel).
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections import OrderedDict
from functools import partial
from typing import Annotated

import anycorn
import attrs
import msgspec
import trio
from anycorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger("simulators.bureau")

ORDERS_MAX = 100_000
DELAY_S_MAX = 7 * 86_400.0
ORDERS_PAGE_MAX = 1_000
BODY_BYTES_MAX = 16 * 1024
HOST = "127.0.0.1"

Reference = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
Text = Annotated[str, msgspec.Meta(max_length=128)]


class OrderState(enum.StrEnum):
    received = "RECEIVED"
    produced = "PRODUCED"
    acknowledged = "ACKNOWLEDGED"


class OrderIn(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    reference: Reference
    card_type: Annotated[str, msgspec.Meta(pattern=r"^(physical|digital_first)$")]
    name_on_card: Text = ""
    delivery_address: Annotated[dict[str, Text], msgspec.Meta(max_length=16)] = {}
    masked_pan: Annotated[str, msgspec.Meta(pattern=r"^([0-9]{6}\*{2,9}[0-9]{4})?$")] = ""


class OrderOut(msgspec.Struct, rename="camel", frozen=True):
    id: str
    reference: str
    card_type: str
    state: str
    tracking_number: str
    received_at: float  # seconds since 1970
    produced_at: float  # 0 until produced


class OrderList(msgspec.Struct, frozen=True):
    orders: list[OrderOut]


class BureauProblem(msgspec.Struct, frozen=True):
    title: str
    detail: str
    status: int


@attrs.define
class Order:
    id: str
    reference: str
    card_type: str
    name_on_card: str
    delivery_address: dict[str, str]
    received_at: float  # wall clock, seconds since 1970 (what clients see)
    received_monotonic: float
    ready_monotonic: float
    tracking_number: str
    acknowledged: bool = False

    def state(self, now: float) -> OrderState:
        if self.acknowledged:
            return OrderState.acknowledged
        return OrderState.produced if now >= self.ready_monotonic else OrderState.received

    def out(self, now: float) -> OrderOut:
        state = self.state(now)
        produced = state is not OrderState.received
        produced_at = self.received_at + (self.ready_monotonic - self.received_monotonic) if produced else 0.0
        return OrderOut(self.id, self.reference, self.card_type, state.value,
                        self.tracking_number if produced else "", self.received_at, produced_at)


class BureauState:
    """The orders, by id, in arrival order; and the reference -> id map for idempotency."""

    def __init__(self, *, delay_s: float, orders_max: int = ORDERS_MAX, clock=time.monotonic) -> None:
        assert 0 <= delay_s <= DELAY_S_MAX and 1 <= orders_max <= ORDERS_MAX
        self.delay_s = delay_s
        self.orders_max = orders_max
        self.clock = clock
        self.orders: OrderedDict[str, Order] = OrderedDict()
        self.by_reference: dict[str, str] = {}

    def place(self, order_in: OrderIn) -> tuple[Order | None, bool]:
        """(order, created); (None, False) when full of orders not yet acknowledged."""
        existing = self.by_reference.get(order_in.reference)
        if existing is not None:
            return self.orders[existing], False
        if len(self.orders) >= self.orders_max and not self._forget_one_acknowledged():
            return None, False
        now = self.clock()
        order = Order(id=f"BO{secrets.token_hex(8).upper()}", reference=order_in.reference,
                      card_type=order_in.card_type, name_on_card=order_in.name_on_card,
                      delivery_address=dict(order_in.delivery_address), received_at=time.time(),
                      received_monotonic=now, ready_monotonic=now + self.delay_s,
                      tracking_number=f"TRK{secrets.randbelow(10**12):012d}")  # fmt: skip
        self.orders[order.id] = order
        self.by_reference[order.reference] = order.id
        assert len(self.orders) <= self.orders_max
        return order, True

    def listed(self, state: OrderState | None, limit: int) -> list[OrderOut]:
        assert 1 <= limit <= ORDERS_PAGE_MAX
        now = self.clock()
        found = []
        for order in self.orders.values():  # bounded by orders_max
            if state is None or order.state(now) is state:
                found.append(order.out(now))
                if len(found) >= limit:
                    break
        return found

    def acknowledge(self, order_id: str) -> Order | None | OrderState:
        """The order, None when unknown, OrderState.received when it is not produced yet."""
        order = self.orders.get(order_id)
        if order is None:
            return None
        if order.state(self.clock()) is OrderState.received:
            return OrderState.received
        order.acknowledged = True
        return order

    def _forget_one_acknowledged(self) -> bool:
        for order_id, order in self.orders.items():
            if order.acknowledged:
                del self.orders[order_id]
                del self.by_reference[order.reference]
                return True
        return False


_encoder = msgspec.json.Encoder()
_order_decoder = msgspec.json.Decoder(OrderIn)


def _json(value, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type="application/json")


def _problem(status: int, title: str, detail: str) -> Response:
    return Response(_encoder.encode(BureauProblem(title, detail, status)), status_code=status,
                    media_type="application/problem+json")


def build_bureau_app(state: BureauState) -> Starlette:
    async def create(request: Request) -> Response:
        body = await request.body()
        if len(body) > BODY_BYTES_MAX:
            return _problem(413, "PAYLOAD_TOO_LARGE", f"body larger than {BODY_BYTES_MAX} bytes")
        try:
            order_in = _order_decoder.decode(body)
        except msgspec.DecodeError as error:
            return _problem(400, "INVALID_PAYLOAD", str(error))
        order, created = state.place(order_in)
        if order is None:
            return _problem(503, "BUREAU_FULL", f"{state.orders_max} orders not yet acknowledged")
        if created:
            log.info("order %s received for reference %s", order.id, order.reference)
        return _json(order.out(state.clock()), 201 if created else 200)

    async def listing(request: Request) -> Response:
        raw_state = request.query_params.get("state")
        raw_limit = request.query_params.get("limit", "100")
        try:
            wanted = OrderState(raw_state) if raw_state is not None else None
        except ValueError:
            return _problem(400, "INVALID_PAYLOAD", "state must be RECEIVED, PRODUCED or ACKNOWLEDGED")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= ORDERS_PAGE_MAX:
            return _problem(400, "INVALID_PAYLOAD", f"limit must be 1 to {ORDERS_PAGE_MAX}")
        return _json(OrderList(state.listed(wanted, int(raw_limit))))

    async def one(request: Request) -> Response:
        order = state.orders.get(request.path_params["orderId"])
        if order is None:
            return _problem(404, "ORDER_NOT_FOUND", "no such order")
        return _json(order.out(state.clock()))

    async def ack(request: Request) -> Response:
        found = state.acknowledge(request.path_params["orderId"])
        if found is None:
            return _problem(404, "ORDER_NOT_FOUND", "no such order")
        if found is OrderState.received:
            return _problem(409, "ORDER_NOT_PRODUCED", "the card is not produced yet")
        assert isinstance(found, Order)
        return _json(found.out(state.clock()))

    async def healthz(request: Request) -> Response:
        return Response("ok\n", media_type="text/plain")

    return Starlette(routes=[
        Route("/orders", create, methods=["POST"]),
        Route("/orders", listing, methods=["GET"]),
        Route("/orders/{orderId}", one, methods=["GET"]),
        Route("/orders/{orderId}/ack", ack, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


async def serve_bureau(*, port: int, delay_s: float, orders_max: int = ORDERS_MAX,
                       shutdown: trio.Event | None = None, state: BureauState | None = None,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve on 127.0.0.1:`port` (0: any free port) until `shutdown` is set or the caller's scope is
    cancelled; task_status.started(port) gives the bound port."""
    state = state if state is not None else BureauState(delay_s=delay_s, orders_max=orders_max)
    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    shutdown = shutdown if shutdown is not None else trio.Event()
    serve = partial(anycorn.serve, build_bureau_app(state), config, shutdown_trigger=shutdown.wait)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve)
        assert len(binds) == 1, binds
        bound_port = int(binds[0].rsplit(":", 1)[1])
        log.info("bureau on %s (delay %.3f s)", binds[0], delay_s)
        task_status.started(bound_port)
