"""Cards over REST: virtual (sync with JWE, and async), physical orders, print virtual (digital
first), activate, lock, unlock, remove, full data, reset CVV, set PIN, list.

Channels and admin roles are the reference documents' "Availability" tables, one `Access` per
action below. Card numbers, CVVs and PINs travel only as JWE (`authsrv.rest.jwe`): the client's
`Public-Key` is checked before anything changes, so a refused key never leaves a card behind.
Admins never see card data: their answers are the masked summary.

The domain rules live in `cards_domain.CardService` (synchronous, run in a store thread); the
background work (async issuing, the bureau) in `cards_worker`. `CardsApi.of(ctx)` is the one
instance per context, shared by the routes and the server's background task `CardsApi.run`.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Annotated, Any

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.rest import jwe
from authsrv.rest import money
from authsrv.rest.auth import Caller, Channel
from authsrv.rest.cards_domain import CardResult, CardService, expiry_date, masked_pan
from authsrv.rest.cards_worker import ASYNC_REQUESTS_MAX, AsyncCardRequest, CardsWorker
from authsrv.rest.context import (
    ALL_ROLES,
    ID_MAX,
    Access,
    Call,
    Doc,
    RestContext,
    admin_route,
    customer_routes,
    invalid,
    parse_id,
)
from authsrv.rest.errors import Title, problem
from authsrv.store.db import CardRow, Role

log = logging.getLogger("authsrv.rest")

Id = Annotated[int, msgspec.Meta(ge=1, le=ID_MAX)]
ConfigId = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z_-]{1,32}$")]
Line = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
PostalCode = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z -]{2,12}$")]
Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]  # ISO 3166-1 alpha-2
NameOnCard = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z .'-]{0,25}$")]  # ISO 7813: 26 chars
LockReasonCode = Annotated[int, msgspec.Meta(ge=1, le=8)]
Pin = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4,12}$")]  # ISO 9564: 4 to 12 digits

MANAGERS = frozenset({Role.admin, Role.manager})


class VirtualCardCreate(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    balance_id: Id
    config_id: ConfigId


class DeliveryAddress(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    street: Line
    city: Line
    post_code: PostalCode  # `postCode`, as in the documents' KYC form
    country: Country
    additional: Annotated[str, msgspec.Meta(max_length=128)] = ""


class PhysicalCardOrder(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    balance_id: Id
    config_id: ConfigId
    delivery_address: DeliveryAddress
    name_on_card: NameOnCard | msgspec.UnsetType = msgspec.UNSET


class LockRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    reason: LockReasonCode


class PinRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pin: Pin


class CardData(msgspec.Struct, rename="camel", frozen=True):
    """Full card data: only ever sent as a JWE."""

    id: int
    card_no: str
    exp: str  # last day of the expiry month, YYYY-MM-DD (the documents' example)
    expiry: str  # YYMM, as on the wire (field 14)
    cvv: str
    type: str
    balance_id: int


class CardSummary(msgspec.Struct, rename="camel", frozen=True):
    id: int
    type: str
    status: str
    lock_reason: int
    masked_pan: str
    balance_id: int
    order_state: str


class CardList(msgspec.Struct, frozen=True):
    cards: list[CardSummary]


class CvvReset(msgspec.Struct, frozen=True):
    id: int
    cvv: str


class CardPending(msgspec.Struct, frozen=True):
    id: int  # the request's id; the card.created event carries it as requestId
    status: str


_STATUS_NAMES = {0: "INACTIVE", 1: "ACTIVE", 2: "LOCKED", 3: "REMOVED"}
_PROBLEMS: dict[CardResult, tuple[int, Title, str]] = {
    CardResult.card_not_found: (404, Title.CARD_NOT_FOUND, "no such card"),
    CardResult.kyc_required: (403, Title.KYC_REQUIRED, "the customer's KYC must be SUCCESS to hold cards"),
    CardResult.balance_not_found: (404, Title.BALANCE_NOT_FOUND, "no such active balance of this customer"),
    CardResult.config_not_found: (404, Title.CONFIG_NOT_FOUND, "no such card program (configId) for this partner"),
    CardResult.currency_mismatch: (400, Title.CURRENCY_MISMATCH, "the balance's currency is not the program's"),
    CardResult.card_locked_irreversibly: (409, Title.CARD_LOCKED_IRREVERSIBLY,
                                          "a card locked as lost, stolen, inactive or replaced stays locked"),
    CardResult.card_not_locked: (409, Title.CARD_NOT_LOCKED, "the card is not locked"),
    CardResult.card_locked: (409, Title.CARD_LOCKED, "the card is locked"),
    CardResult.card_type_not_supported: (409, Title.CARD_TYPE_NOT_SUPPORTED,
                                         "not offered for this card type (PIN: physical and digital first;"
                                         " CVV reset: virtual and digital first; print: virtual)"),
    CardResult.card_not_activatable: (409, Title.CARD_NOT_ACTIVATABLE,
                                      "only a physical card waiting for activation can be activated"),
    CardResult.cvv_resets_exhausted: (409, Title.CVV_RESETS_EXHAUSTED, "this card's CVV cannot be reset again"),
    CardResult.card_numbers_exhausted: (503, Title.CARD_NUMBERS_EXHAUSTED, "no free card number: try again"),
    CardResult.card_already_ordered: (409, Title.CARD_ALREADY_ORDERED, "this card was already printed"),
}
assert set(_PROBLEMS) == set(CardResult) - {CardResult.ok}

_encoder = msgspec.json.Encoder()
_decoders = {model: msgspec.json.Decoder(model)
             for model in (VirtualCardCreate, PhysicalCardOrder, LockRequest, PinRequest)}  # fmt: skip


def summary(card: CardRow) -> CardSummary:
    return CardSummary(id=card.id, type=card.card_type, status=_STATUS_NAMES[int(card.status)],
                       lock_reason=card.lock_reason, masked_pan=masked_pan(card), balance_id=card.balance_id,
                       order_state=card.order_state)  # fmt: skip


def card_problem(result: CardResult) -> Response:
    status, title, detail = _PROBLEMS[result]
    return problem(status, title, detail)


_APIS: dict[int, CardsApi] = {}


class CardsApi:
    def __init__(self, ctx: RestContext) -> None:
        assert ctx.keys is not None and ctx.jwe is not None, "cards need the card keys and the JWE key"
        self.ctx = ctx
        self.codec: jwe.JweCodec = ctx.jwe
        self.service = CardService(ctx.store, ctx.keys)
        self.requests_in, self.requests_out = trio.open_memory_channel[AsyncCardRequest](ASYNC_REQUESTS_MAX)
        self.worker = CardsWorker(ctx, self.service, self.requests_out)
        self._last_request_id = 0

    @classmethod
    def of(cls, ctx: RestContext) -> CardsApi:
        """The one CardsApi of `ctx`: `build_app` mounts its routes, the server runs its `run`."""
        found = _APIS.get(id(ctx))
        if found is None or found.ctx is not ctx:
            found = _APIS[id(ctx)] = cls(ctx)
            weakref.finalize(ctx, _APIS.pop, id(ctx), None)
        return found

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work for the server's nursery: async issuing and the bureau (runs until cancelled)."""
        await self.worker.run(task_status=task_status)

    def routes(self) -> list[Route]:
        holder = Access(customer=True, partner=True)  # not on the admin channel
        everyone = Access(customer=True, partner=True, admin=ALL_ROLES)
        data, summary_doc = dict(response=CardData, encrypted=True), dict(response=CardSummary)
        return [
            *customer_routes(self.ctx, "/cards/virtual", self.create_virtual, method="POST", access=holder,
                             name="card.virtual", doc=Doc("Create a virtual card (card data as JWE)",
                             body=VirtualCardCreate, status=201, problems=(403, 404), **data)),
            *customer_routes(self.ctx, "/cards/virtual", self.create_virtual, method="POST",
                             access=Access(admin=MANAGERS), name="card.virtual",
                             doc=Doc("Create a virtual card (admins get the masked card, as JWE)",
                                     body=VirtualCardCreate, response=CardSummary, status=201,
                                     problems=(403, 404), encrypted=True)),
            *customer_routes(self.ctx, "/cards/virtual/async", self.create_virtual_async, method="POST",
                             access=holder, name="card.virtual_async",
                             doc=Doc("Create a virtual card in the background", body=VirtualCardCreate,
                                     response=CardPending, status=202, problems=(403, 404, 503))),
            *customer_routes(self.ctx, "/cards/physical", self.order_physical, method="POST", access=everyone,
                             name="card.physical", doc=Doc("Order a physical card (visible once linked)",
                             body=PhysicalCardOrder, status=201, problems=(403, 404), encrypted=True,
                             **summary_doc)),
            *customer_routes(self.ctx, "/cards", self.list_cards, method="GET", access=everyone, name="card.list",
                             doc=Doc("List cards (masked)", response=CardList)),
            *customer_routes(self.ctx, "/cards/{cardId}", self.get_card, method="GET", access=holder,
                             name="card.get", doc=Doc("Full card data (JWE only)", **data)),
            *customer_routes(self.ctx, "/cards/{cardId}", self.remove, method="DELETE",
                             access=Access(customer=True), name="card.remove",
                             doc=Doc("Remove a card (irreversible)", status=204)),
            *customer_routes(self.ctx, "/cards/{cardId}/print", self.print_virtual, method="POST", access=everyone,
                             name="card.print", doc=Doc("Print a virtual card (digital first)", encrypted=True,
                                                        problems=(404, 409), **summary_doc)),
            *customer_routes(self.ctx, "/cards/{cardId}/activate", self.activate, method="POST", access=everyone,
                             name="card.activate", doc=Doc("Activate a physical card", problems=(404, 409),
                                                           **summary_doc)),
            *customer_routes(self.ctx, "/cards/{cardId}/lock", self.lock, method="POST", access=holder,
                             name="card.lock", doc=Doc("Lock a card (reason 1..8)", body=LockRequest,
                                                       **summary_doc)),
            *customer_routes(self.ctx, "/cards/{cardId}/unlock", self.unlock, method="POST", access=holder,
                             name="card.unlock", doc=Doc("Unlock a card (never for reasons 1, 2, 5, 8)",
                                                         problems=(404, 409), **summary_doc)),
            *customer_routes(self.ctx, "/cards/{cardId}/cvv", self.reset_cvv, method="POST",
                             access=Access(customer=True), name="card.cvv",
                             doc=Doc("Reset the CVV (new CVV as JWE)", response=CvvReset, encrypted=True,
                                     problems=(404, 409))),
            admin_route("/admin/cards/{cardId}/cvv", self.admin_reset_cvv, method="POST", roles=ALL_ROLES,
                        name="card.cvv", doc=Doc("Reset a card's CVV (the answer never holds the CVV)",
                                                 response=CardSummary, encrypted=True, problems=(404, 409))),
            *customer_routes(self.ctx, "/cards/{cardId}/pin", self.set_pin, method="POST",
                             access=Access(customer=True), name="card.pin",
                             doc=Doc("Set the PIN (request as JWE)", body=PinRequest, status=204, encrypted=True,
                                     problems=(404, 409))),
        ]  # fmt: skip

    # -- issuing ---------------------------------------------------------------------------------


    async def create_virtual(self, request: Request, call: Call) -> Response:
        decoded = await self._read(request, VirtualCardCreate, response_encrypted=True)
        if isinstance(decoded, Response):
            return decoded
        result, issued = await self.ctx.in_thread(self.service.issue, call.user.id, decoded.balance_id,
                                                  decoded.config_id, card_type="virtual")
        if issued is None:
            return card_problem(result)
        await money.charge_card_fee(self.ctx, issued.card)
        self._log("created virtual", issued.card, call.caller)
        if call.caller.channel is Channel.admin:
            return self._respond(request, summary(issued.card), status=201, encrypted=True)
        return self._respond(request, self._card_data(issued.card, issued.pan), status=201, encrypted=True)

    async def create_virtual_async(self, request: Request, call: Call) -> Response:
        decoded = await self._read(request, VirtualCardCreate, response_encrypted=False)
        if isinstance(decoded, Response):
            return decoded
        # Refuse what would fail now (KYC, balance, program) rather than after the 202.
        result, _, _ = await self.ctx.in_thread(self.service.check_issue, call.user.id, decoded.balance_id,
                                                decoded.config_id)
        if result is not CardResult.ok:
            return card_problem(result)
        request_id = self._next_request_id()
        try:
            self.requests_in.send_nowait(AsyncCardRequest(request_id, call.user.id, decoded.balance_id,
                                                          decoded.config_id))
        except trio.WouldBlock:
            return problem(503, Title.CARD_QUEUE_FULL,
                           f"{ASYNC_REQUESTS_MAX} card requests are waiting: try again shortly")
        log.info("virtual card request %d queued for customer %d by %s", request_id, call.user.id,
                 call.caller.channel)
        return self._respond(request, CardPending(request_id, "PENDING"), status=202, encrypted=False)

    async def order_physical(self, request: Request, call: Call) -> Response:
        decoded = await self._read(request, PhysicalCardOrder, response_encrypted=True)
        if isinstance(decoded, Response):
            return decoded
        order: dict[str, Any] = {"deliveryAddress": msgspec.to_builtins(decoded.delivery_address)}
        name = decoded.name_on_card
        order["nameOnCard"] = (name if name is not msgspec.UNSET
                               else f"{call.user.first_name} {call.user.last_name}"[:26])  # fmt: skip
        result, issued = await self.ctx.in_thread(self.service.issue, call.user.id, decoded.balance_id,
                                                  decoded.config_id, card_type="physical", order=order)
        if issued is None:
            return card_problem(result)
        await money.charge_card_fee(self.ctx, issued.card)
        self._log("ordered physical", issued.card, call.caller)
        return self._respond(request, summary(issued.card), status=201, encrypted=True)

    # -- one card --------------------------------------------------------------------------------

    async def get_card(self, request: Request, call: Call) -> Response:
        refusal = self._check_key(request, encrypted=True)
        if refusal is not None:
            return refusal
        card = await self._own_card(request, call)
        if card is None:
            return card_problem(CardResult.card_not_found)
        pan = self.service.pan_of(card)
        return self._respond(request, self._card_data(card, pan), encrypted=True)

    async def print_virtual(self, request: Request, call: Call) -> Response:
        return await self._change(request, call, self.service.print_virtual, "printed", encrypted=True)

    async def activate(self, request: Request, call: Call) -> Response:
        return await self._change(request, call, self.service.activate, "activated", encrypted=False)

    async def unlock(self, request: Request, call: Call) -> Response:
        return await self._change(request, call, self.service.unlock, "unlocked", encrypted=False)

    async def lock(self, request: Request, call: Call) -> Response:
        decoded = await self._read(request, LockRequest, response_encrypted=False)
        if isinstance(decoded, Response):
            return decoded
        card_id = parse_id(request.path_params["cardId"])
        if card_id is None:
            return card_problem(CardResult.card_not_found)
        result, card = await self.ctx.in_thread(self.service.lock, call.user, card_id, decoded.reason)
        if card is None:
            return card_problem(result)
        self._log(f"locked (reason {decoded.reason})", card, call.caller)
        return self._respond(request, summary(card), encrypted=False)

    async def remove(self, request: Request, call: Call) -> Response:
        card_id = parse_id(request.path_params["cardId"])
        if card_id is None:
            return card_problem(CardResult.card_not_found)
        result, card = await self.ctx.in_thread(self.service.remove, call.user, card_id)
        if card is None:
            return card_problem(result)
        self._log("removed", card, call.caller)
        return Response(status_code=204)

    async def reset_cvv(self, request: Request, call: Call) -> Response:
        refusal = self._check_key(request, encrypted=True)
        if refusal is not None:
            return refusal
        card = await self._own_card(request, call)
        if card is None:
            return card_problem(CardResult.card_not_found)
        result, card = await self.ctx.in_thread(self.service.reset_cvv, card, by="customer")
        if card is None:
            return card_problem(result)
        self._log("CVV reset", card, call.caller)
        cvv = self.service.cvc2_of(card, self.service.pan_of(card))
        return self._respond(request, CvvReset(card.id, cvv), encrypted=True)

    async def admin_reset_cvv(self, request: Request, caller: Caller) -> Response:
        refusal = self._check_key(request, encrypted=True)
        if refusal is not None:
            return refusal
        card_id = parse_id(request.path_params["cardId"])
        card = await self.ctx.in_thread(self.ctx.store.get_card, card_id) if card_id is not None else None
        if card is None:
            return card_problem(CardResult.card_not_found)
        result, card = await self.ctx.in_thread(self.service.reset_cvv, card, by=f"admin:{caller.admin}")
        if card is None:
            return card_problem(result)
        self._log("CVV reset", card, caller)
        return self._respond(request, summary(card), encrypted=True)

    async def set_pin(self, request: Request, call: Call) -> Response:
        try:
            plaintext = await jwe.read_json(request, self.codec, encrypted=True)
        except jwe.JweProblem as error:
            return jwe.problem_of(error)
        try:
            decoded = _decoders[PinRequest].decode(plaintext)
        except msgspec.DecodeError:
            # Never echo msgspec's message here: the body is a PIN.
            return invalid('the decrypted body must be {"pin": "<4 to 12 digits>"}')
        card_id = parse_id(request.path_params["cardId"])
        if card_id is None:
            return card_problem(CardResult.card_not_found)
        result, card = await self.ctx.in_thread(self.service.set_pin, call.user, card_id, decoded.pin)
        if card is None:
            return card_problem(result)
        self._log("PIN set", card, call.caller)
        return Response(status_code=204)

    async def list_cards(self, request: Request, call: Call) -> Response:
        cards = await self.ctx.in_thread(self.service.cards, call.user)
        return self._respond(request, CardList([summary(card) for card in cards]), encrypted=False)

    # -- helpers ---------------------------------------------------------------------------------

    async def _change(self, request: Request, call: Call, action, what: str, *, encrypted: bool) -> Response:
        refusal = self._check_key(request, encrypted=encrypted)
        if refusal is not None:
            return refusal
        card_id = parse_id(request.path_params["cardId"])
        if card_id is None:
            return card_problem(CardResult.card_not_found)
        result, card = await self.ctx.in_thread(action, call.user, card_id)
        if card is None:
            return card_problem(result)
        self._log(what, card, call.caller)
        return self._respond(request, summary(card), encrypted=encrypted)

    async def _own_card(self, request: Request, call: Call) -> CardRow | None:
        card_id = parse_id(request.path_params["cardId"])
        if card_id is None:
            return None
        return await self.ctx.in_thread(self.service.own_card, call.user, card_id)

    async def _read(self, request: Request, model: type, *, response_encrypted: bool):
        """The decoded body, or the problem to answer; the response key is checked first."""
        refusal = self._check_key(request, encrypted=response_encrypted)
        if refusal is not None:
            return refusal
        try:
            plaintext = await jwe.read_json(request, self.codec, encrypted=False)
        except jwe.JweProblem as error:
            return jwe.problem_of(error)
        try:
            return _decoders[model].decode(plaintext)
        except msgspec.DecodeError as error:
            return invalid(error)

    def _check_key(self, request: Request, *, encrypted: bool) -> Response | None:
        try:
            jwe.check_client_key(request, self.codec, encrypted=encrypted)
        except jwe.JweProblem as error:
            return jwe.problem_of(error)
        return None

    def _respond(self, request: Request, value: Any, *, status: int = 200, encrypted: bool) -> Response:
        return jwe.respond(request, self.codec, _encoder.encode(value), status=status, encrypted=encrypted)

    def _card_data(self, card: CardRow, pan: str) -> CardData:
        return CardData(id=card.id, card_no=pan, exp=expiry_date(card.expiry_yymm), expiry=card.expiry_yymm,
                        cvv=self.service.cvc2_of(card, pan), type=card.card_type, balance_id=card.balance_id)

    def _next_request_id(self) -> int:
        # Unique within the process and across restarts (the clock moves on), an integer like every id.
        self._last_request_id = max(time.time_ns() // 1000, self._last_request_id + 1)
        return self._last_request_id

    @staticmethod
    def _log(what: str, card: CardRow, caller: Caller) -> None:
        who = caller.admin if caller.channel is Channel.admin else caller.partner
        log.info("card %d (%s) %s by %s %s", card.id, masked_pan(card), what, caller.channel, who)
