"""Spend controls over REST: PUT and GET a card's or a user's controls, with current usage.

    GET/PUT .../cards/{cardId}/limits      the card's controls
    GET/PUT .../limits                      the user's (apply to every card of the user)

on `/customers/me`, `/secure/customers/{customerId}` and `/admin/customers/{customerId}`. Who may:

    action   customer  partner  admin roles
    get      yes       yes      Admin, Manager, Employee
    put      yes       yes      Admin, Manager

The body is `authsrv.hotpath.limits.ControlsSpec` (camelCase; a missing field or null: no control);
PUT replaces the whole set. A change reaches the hot path when its store transaction commits (the
index is updated on commit), so the next authorization sees it, and records the event
`card.limits_set` / `user.limits_set` in the same transaction. GET adds the usage of the current
UTC day and month: a card's in its balance's currency; a user's per currency (`usage`), and as
`dailyUsed`/`monthlyUsed` when the user's balances are in one currency (else null).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.hotpath.limits import (
    NS_PER_DAY,
    ChannelSwitches,
    Controls,
    ControlsSpec,
    WindowLimits,
    decode_spec,
    encode_spec,
    month_of_day,
)
from authsrv.rest.context import (
    ALL_ROLES,
    Access,
    Call,
    Doc,
    RestContext,
    customer_routes,
    invalid,
    json_response,
    parse_id,
)
from authsrv.rest.errors import Title, problem
from authsrv.store.db import CardRow, Role, Store, UserRow, card_visible

log = logging.getLogger("authsrv.rest")

ACCESS: dict[str, Access] = {
    "get": Access(customer=True, partner=True, admin=ALL_ROLES),
    "put": Access(customer=True, partner=True, admin=frozenset({Role.admin, Role.manager})),
}


class Usage(msgspec.Struct, frozen=True):
    amount: int  # minor units
    count: int


class CurrencyUsage(msgspec.Struct, rename="camel", frozen=True):
    currency: str
    daily_used: Usage
    monthly_used: Usage


class LimitsView(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    """The controls as set (ControlsSpec's fields) plus the current usage."""

    per_transaction: int | None
    daily: WindowLimits
    monthly: WindowLimits
    blocked_mccs: list[str]
    blocked_mcc_groups: list[str]
    blocked_countries: list[str]
    channels: ChannelSwitches
    daily_used: Usage | None
    monthly_used: Usage | None
    usage: list[CurrencyUsage]


_ZERO = Usage(0, 0)


def view(spec: ControlsSpec, usage: list[CurrencyUsage]) -> LimitsView:
    single = usage[0] if len(usage) == 1 else None
    return LimitsView(
        per_transaction=spec.per_transaction, daily=spec.daily, monthly=spec.monthly,
        blocked_mccs=list(spec.blocked_mccs), blocked_mcc_groups=[str(group) for group in spec.blocked_mcc_groups],
        blocked_countries=list(spec.blocked_countries), channels=spec.channels,
        daily_used=single.daily_used if single else (_ZERO if not usage else None),
        monthly_used=single.monthly_used if single else (_ZERO if not usage else None),  # no balance: zero
        usage=usage,
    )  # fmt: skip


def usage_of(window, currency: str, now_ns: int) -> CurrencyUsage:
    day = now_ns // NS_PER_DAY
    day_amount, day_count, month_amount, month_count = (
        window.used(day, month_of_day(day)) if window is not None else (0, 0, 0, 0))
    return CurrencyUsage(currency, Usage(day_amount, day_count), Usage(month_amount, month_count))


class LimitsApi:
    def __init__(self, ctx: RestContext) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def routes(self) -> list[Route]:
        ctx = self.ctx
        problems = (400, 404)
        return [
            *customer_routes(ctx, "/cards/{cardId}/limits", self.get_card, method="GET", access=ACCESS["get"],
                             name="card.limits_get", doc=Doc("A card's spend controls and usage", response=LimitsView)),
            *customer_routes(ctx, "/cards/{cardId}/limits", self.put_card, method="PUT", access=ACCESS["put"],
                             name="card.limits_put", doc=Doc("Set a card's spend controls", body=ControlsSpec,
                                                             response=LimitsView, problems=problems)),
            *customer_routes(ctx, "/limits", self.get_user, method="GET", access=ACCESS["get"],
                             name="user.limits_get", doc=Doc("A user's spend controls and usage", response=LimitsView)),
            *customer_routes(ctx, "/limits", self.put_user, method="PUT", access=ACCESS["put"],
                             name="user.limits_put", doc=Doc("Set a user's spend controls (all the user's cards)",
                                                             body=ControlsSpec, response=LimitsView,
                                                             problems=problems)),
        ]  # fmt: skip

    # -- handlers --------------------------------------------------------------------------------

    async def get_card(self, request: Request, call: Call) -> Response:
        card = await self._own_card(request, call)
        if card is None:
            return card_not_found()
        spec = await self._stored("card", card.id)
        return json_response(view(spec, [self._card_usage(card)]))

    async def put_card(self, request: Request, call: Call) -> Response:
        spec = await _read_spec(request)
        if isinstance(spec, Response):
            return spec
        card = await self._own_card(request, call)
        if card is None:
            return card_not_found()
        await self.ctx.in_thread(save_card_controls, self.store, call.user, card, spec)
        self._log("card", card.id, call)
        return json_response(view(spec, [self._card_usage(card)]))

    async def get_user(self, request: Request, call: Call) -> Response:
        spec = await self._stored("user", call.user.id)
        return json_response(view(spec, await self._user_usage(call.user.id)))

    async def put_user(self, request: Request, call: Call) -> Response:
        spec = await _read_spec(request)
        if isinstance(spec, Response):
            return spec
        await self._save("user", call.user.id, spec, call, event_kind="user.limits_set",
                         subject=f"customer:{call.user.id}")
        return json_response(view(spec, await self._user_usage(call.user.id)))

    # -- helpers ---------------------------------------------------------------------------------

    async def _own_card(self, request: Request, call: Call) -> CardRow | None:
        card_id = parse_id(request.path_params["cardId"])
        if card_id is None:
            return None
        card = await self.ctx.in_thread(self.store.get_card, card_id)
        if card is None or card.user_id != call.user.id or card.partner != call.user.partner:
            return None
        return card if card_visible(card) else None

    async def _stored(self, scope: str, owner_id: int) -> ControlsSpec:
        return await self.ctx.in_thread(stored_controls, self.store, scope, owner_id)

    async def _save(self, scope: str, owner_id: int, spec: ControlsSpec, call: Call, *, event_kind: str,
                    subject: str, **ids: Any) -> None:
        await self.ctx.in_thread(save_controls, self.store, call.user, scope, owner_id, spec, event_kind=event_kind,
                                 subject=subject, **ids)
        self._log(scope, owner_id, call)

    @staticmethod
    def _log(scope: str, owner_id: int, call: Call) -> None:
        who = call.caller.admin if call.caller.admin else call.caller.partner
        log.info("%s spend controls of %s %d set by %s %s", scope, scope, owner_id, call.caller.channel, who)

    def _windows(self):
        return _windows(self.ctx)

    def _card_usage(self, card: CardRow) -> CurrencyUsage:
        return card_usage(self.ctx, card)

    async def _user_usage(self, user_id: int) -> list[CurrencyUsage]:
        """Per currency of the user's balances (user windows are kept per currency)."""
        windows = self._windows()
        balances = await self.ctx.in_thread(self.store.balances_of_user, user_id)
        now_ns = time.time_ns()
        currencies = sorted({row.currency for row in balances})
        return [usage_of(windows.user(user_id, currency) if windows is not None else None, currency, now_ns)
                for currency in currencies]


# -- domain: what every channel's change goes through (REST handlers above, the panel's card page) --


def stored_controls(store: Store, scope: str, owner_id: int) -> ControlsSpec:
    """The controls as set (none set: the empty spec, no control)."""
    text = store.get_spend_controls(scope, owner_id)
    return decode_spec(text) if text is not None else ControlsSpec()


def save_controls(store: Store, user: UserRow, scope: str, owner_id: int, spec: ControlsSpec, *, event_kind: str,
                  subject: str, **ids: Any) -> None:
    """Replace the controls of a card or user of `user` and record the partner's event, in one
    store transaction (the index is updated when it commits). Synchronous: run in a worker thread."""
    body = {"customerId": user.id, **ids, "limits": msgspec.to_builtins(spec)}
    store.set_spend_controls(scope, owner_id, encode_spec(spec), Controls.from_spec(spec), partner=user.partner,
                             event_kind=event_kind, subject=subject, event_body=body)


def save_card_controls(store: Store, user: UserRow, card: CardRow, spec: ControlsSpec) -> None:
    assert card.user_id == user.id
    save_controls(store, user, "card", card.id, spec, event_kind="card.limits_set", subject=f"card:{card.id}",
                  cardId=card.id)


def _windows(ctx: RestContext):
    ledger = ctx.ledger
    journal = getattr(ledger, "journal", None) if ledger is not None else None
    return journal.windows if journal is not None else None


def card_usage(ctx: RestContext, card: CardRow) -> CurrencyUsage:
    """The card's usage of the current UTC day and month, in its balance's currency."""
    windows = _windows(ctx)
    window = windows.card(card.id) if windows is not None else None
    currency = ""
    if ctx.index is not None:
        state = ctx.index.card_by_id(card.id)
        currency = state.currency if state is not None else ""
    return usage_of(window, currency, time.time_ns())


async def _read_spec(request: Request) -> ControlsSpec | Response:
    try:
        return decode_spec(await request.body())
    except msgspec.DecodeError as error:  # names the field and the rule, e.g. `>= 0 - at $.daily.amount`
        return invalid(error)


def card_not_found() -> Response:
    return problem(404, Title.CARD_NOT_FOUND, "no such card")
