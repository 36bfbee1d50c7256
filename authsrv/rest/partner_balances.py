"""Partner balances (deposit and credit collateral), their low-balance events, and the summary.

Reference documents, "More information on Partner Balances": a partner's DEPOSIT or CREDIT
balance limits what its users can spend; the partner sees it, the operator ("Verestro") creates and
reloads it, and the partner can be told when it goes below a pre-defined level. "Balance Summary":
per currency, the sum of user balances ("Users") and of user and partner balances ("Wallet").

Who may do what (the documents name no admin roles for these; the choice, stated in docs/api.md):

    action                                   channel  roles
    GET  /admin/partner-balances[?partner=]  admin    Admin, Manager, Employee
    GET  /admin/partner-balances/{p}/{t}/{c} admin    Admin, Manager, Employee
    POST /admin/partner-balances             admin    Admin
    POST /admin/partner-balances/{p}/{t}/{c}/reload     Admin
    PUT  /admin/partner-balances/{p}/{t}/{c}/threshold  Admin
    GET  /admin/summary                      admin    Admin, Manager, Employee
    GET  /secure/partner-balances            partner  (its own only)

A partner balance is addressed by partner name, type (DEPOSIT or CREDIT) and currency: the key of
the `partner_balances` table, and what an operator knows without looking anything up.

Low balance: `check_low_balances(ctx)` compares each balance with a threshold to its available
amount; the first check that finds it below records one `partner_balance.low` event (the durable
outbox the notifier delivers) and sets `low_notified`; a check that finds it at or above the
threshold again clears the flag, so the next crossing notifies again. It runs after every reload
that charges or funds a partner balance and from the server's tick (the hot path spends deposits).
"""

from __future__ import annotations

import enum
import logging
from typing import Annotated, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.iso.currency import by_alpha
from authsrv.rest import money
from authsrv.rest.auth import Caller, Channel
from authsrv.rest.audit import set_before
from authsrv.rest.context import ALL_ROLES, Doc, RestContext, admin_route, invalid, json_response, route
from authsrv.rest.errors import Title, problem
from authsrv.store import partner_reloads
from authsrv.store.db import (
    PARTNER_BALANCE_KINDS,
    ManagementTransferCode,
    PartnerBalanceRow,
    PartnerBalanceType,
    Role,
    Store,
    StoreConflict,
)
from ledger.types import AMOUNT_MAX, AccountKind, AccountStatus, TransferSpec

log = logging.getLogger("authsrv.rest")

PARTNER_RELOAD_AMOUNT_MAX = 10_000_000_000_000  # minor units in one collateral reload (100 bn of a 2-decimal currency)
ADMIN_ONLY = frozenset({Role.admin})
USER_KINDS = (AccountKind.user_balance,)
PARTNER_KINDS = (AccountKind.partner_deposit, AccountKind.partner_credit)

Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 alpha code")]
PartnerName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_-]{1,32}$")]
Threshold = Annotated[int, msgspec.Meta(ge=0, le=AMOUNT_MAX, description="minor units; 0 = no notification")]
ReloadAmount = Annotated[int, msgspec.Meta(ge=1, le=PARTNER_RELOAD_AMOUNT_MAX, description="minor units")]


class PartnerBalanceCreate(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    partner: PartnerName
    type: Literal["DEPOSIT", "CREDIT"]
    currency: Currency
    low_threshold: Threshold = 0


class PartnerBalanceReload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    amount: ReloadAmount


class ThresholdUpdate(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    low_threshold: Threshold


class PartnerBalance(msgspec.Struct, rename="camel", frozen=True):
    partner: str
    type: str  # DEPOSIT, CREDIT
    currency: str
    amount: int  # booked, minor units
    available: int  # booked minus what pending authorizations hold
    low_threshold: int


class PartnerBalanceList(msgspec.Struct, rename="camel", frozen=True):
    partner_balances: list[PartnerBalance]


class CurrencySummary(msgspec.Struct, rename="camel", frozen=True):
    currency: str
    users: int  # sum of user balances, booked
    users_available: int  # the same minus holds
    partners: int  # sum of partner DEPOSIT and CREDIT balances, booked
    wallet: int  # users + partners


class Summary(msgspec.Struct, frozen=True):
    currencies: list[CurrencySummary]


_create_decoder = msgspec.json.Decoder(PartnerBalanceCreate)
_reload_decoder = msgspec.json.Decoder(PartnerBalanceReload)
_threshold_decoder = msgspec.json.Decoder(ThresholdUpdate)


# -- domain ----------------------------------------------------------------------------------------


def partner_balance_view(ctx: RestContext, row: PartnerBalanceRow) -> PartnerBalance:
    amounts = money.amounts(ctx.ledger, row.ledger_account_id)
    return PartnerBalance(partner=row.partner, type=str(row.type), currency=row.currency, amount=amounts.booked,
                          available=amounts.available, low_threshold=row.low_threshold)


def partner_balance_subject(row: PartnerBalanceRow) -> str:
    return f"partner_balance:{row.partner}:{row.type}:{row.currency}"


def partner_balance_event(row: PartnerBalanceRow, **extra) -> dict:
    return {"partner": row.partner, "type": str(row.type), "currency": row.currency,
            "lowThreshold": row.low_threshold, **extra}


def summary(ledger) -> Summary:
    """Per currency, from the ledger's running totals per (currency, kind): no account is visited."""
    users: dict[str, list[int]] = {}
    partners: dict[str, int] = {}
    for (currency, kind), totals in ledger.ledger.totals().items():
        booked = totals.credits_posted - totals.debits_posted
        if kind in USER_KINDS:
            entry = users.setdefault(currency, [0, 0])
            entry[0] += booked
            entry[1] += booked - totals.debits_pending
        elif kind in PARTNER_KINDS:
            partners[currency] = partners.get(currency, 0) + booked
    currencies = []
    for currency in sorted(set(users) | set(partners)):
        booked, available = users.get(currency, [0, 0])
        partner_sum = partners.get(currency, 0)
        currencies.append(CurrencySummary(currency=currency, users=booked, users_available=available,
                                          partners=partner_sum, wallet=booked + partner_sum))
    return Summary(currencies=currencies)


def _create(store: Store, body: PartnerBalanceCreate) -> tuple[PartnerBalanceRow | None, list]:
    balance_type = PartnerBalanceType(body.type)
    with store.transaction():
        if store.get_partner(body.partner) is None:
            return None, []
        accounts = store.create_partner_balance(body.partner, balance_type, body.currency, body.low_threshold)
        row = store.get_partner_balance(body.partner, balance_type, body.currency)
        assert row is not None
        store.append_event(row.partner, "partner_balance.created", partner_balance_subject(row),
                           partner_balance_event(row))
    return row, accounts


def _set_threshold(store: Store, row: PartnerBalanceRow, low_threshold: int) -> PartnerBalanceRow:
    with store.transaction():
        store.set_partner_balance_threshold(row.ledger_account_id, low_threshold)
        fresh = store.get_partner_balance(row.partner, row.type, row.currency)
        assert fresh is not None and fresh.low_threshold == low_threshold
        store.append_event(row.partner, "partner_balance.threshold_set", partner_balance_subject(fresh),
                           partner_balance_event(fresh))
    return fresh


def _record_reload(store: Store, row: PartnerBalanceRow, amount: int, transfer_id: int, by: str,
                   key: str = "") -> bool:
    with store.transaction():
        if key and not partner_reloads.finish(store, row.ledger_account_id, key):
            return False  # another call with this key recorded it
        store.append_event(row.partner, "partner_balance.reloaded", partner_balance_subject(row),
                           partner_balance_event(row, amount=amount, transferId=str(transfer_id), by=by))
    return True


def _record_low_changes(store: Store, changes: list[tuple[PartnerBalanceRow, bool, int]]) -> list[int]:
    events = []
    for row, low, available in changes:
        with store.transaction():
            # Conditional flip: of two checks racing over one crossing, one records the event.
            if store.set_partner_balance_low(row.ledger_account_id, low) and low:
                events.append(store.append_event(row.partner, "partner_balance.low", partner_balance_subject(row),
                                                 partner_balance_event(row, available=available)))
    return events


async def check_low_balances(ctx: RestContext) -> list[int]:
    """Record `partner_balance.low` for each partner balance that went below its threshold since it
    was last above it; clear the flag of those above again. Returns the ids of the events written.
    Reads the ledger on the trio thread (it is not thread-safe), writes the store in a worker."""
    if ctx.ledger is None:
        return []
    flagged = await ctx.in_thread(ctx.store.partner_balance_low_flags)
    changes = []
    for row, notified in flagged:
        available = money.amounts(ctx.ledger, row.ledger_account_id).available
        low = row.low_threshold > 0 and available < row.low_threshold
        if low != notified:
            changes.append((row, low, available))
    if not changes:
        return []
    events = await ctx.in_thread(_record_low_changes, ctx.store, changes)
    if events:
        log.info("partner balance low: %d event(s) recorded", len(events))
    return events


class PartnerReloadResult(enum.Enum):
    reloaded = "reloaded"  # the transfer was made now
    replayed = "replayed"  # the key's reload was made before: nothing moved this time
    key_reused = "key_reused"  # the key was used for another amount: nothing moved


async def reload_partner_balance(ctx: RestContext, row: PartnerBalanceRow, amount: int, by: str,
                                 key: str = "") -> PartnerReloadResult:
    """Funds received from the partner: a transfer from the system funding account into the
    collateral account, its `partner_balance.reloaded` event, then the low-balance check. Every
    channel's reload (REST, panel) is this. With `key` (the panel's form) the key names one
    transfer for good (authsrv/store/partner_reloads.py): a second call moves nothing."""
    assert 0 < amount <= PARTNER_RELOAD_AMOUNT_MAX
    money.check_writable(ctx.ledger)  # before the store: nothing is reserved that cannot be applied
    funding = await ctx.in_thread(ctx.store.ensure_system_accounts, row.currency)
    (source,) = [spec for spec in funding if spec.kind == AccountKind.funding]
    if key:
        reserved = await ctx.in_thread(partner_reloads.reserve, ctx.store, row.ledger_account_id, key, amount)
        if reserved.amount != amount:
            return PartnerReloadResult.key_reused
        if reserved.state == partner_reloads.DONE:
            return PartnerReloadResult.replayed
        transfer_id = reserved.transfer_id
    else:
        (transfer_id,) = await ctx.in_thread(ctx.store.allocate_transfer_ids, 1)
    transfer = TransferSpec(id=transfer_id, debit_account_id=source.id, credit_account_id=row.ledger_account_id,
                            amount=amount, code=ManagementTransferCode.collateral_funding,
                            reference=f"reload {row.type} {row.partner}")  # fmt: skip
    result = await money.submit(ctx.ledger, accounts=funding, transfers=[transfer])
    status = result.transfer_results[0]
    # Funding has no limit and the ids are fresh or the key's own: anything but created/exists is a bug.
    assert money.transfer_ok(status), status.name
    # Recorded after the ledger commit (a crash in between loses this event, not the money; a keyed
    # retry finds the transfer `exists` and records it then). Of two keyed calls, one records it.
    recorded = await ctx.in_thread(_record_reload, ctx.store, row, amount, transfer_id, by, key)
    await check_low_balances(ctx)
    if not recorded:
        return PartnerReloadResult.replayed
    log.info("admin %s reloaded partner balance %s with %d", by, partner_balance_subject(row), amount)
    return PartnerReloadResult.reloaded


async def update_threshold(ctx: RestContext, row: PartnerBalanceRow, low_threshold: int) -> PartnerBalanceRow:
    """Set the low-balance threshold (event `partner_balance.threshold_set`), then check: a new
    threshold can itself be a crossing. Every channel's threshold change is this."""
    assert 0 <= low_threshold <= AMOUNT_MAX
    fresh = await ctx.in_thread(_set_threshold, ctx.store, row, low_threshold)
    await check_low_balances(ctx)
    return fresh


# -- HTTP ------------------------------------------------------------------------------------------


def partner_balance_not_found() -> Response:
    return problem(404, Title.PARTNER_BALANCE_NOT_FOUND, "no such partner balance")


class PartnerBalancesApi:
    def __init__(self, ctx: RestContext) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def routes(self) -> list[Route]:
        one = "/admin/partner-balances/{partner}/{type}/{currency}"
        return [
            admin_route("/admin/partner-balances", self.create, method="POST", roles=ADMIN_ONLY,
                        name="partner_balance.create",
                        doc=Doc("Create a partner DEPOSIT or CREDIT balance", body=PartnerBalanceCreate,
                                response=PartnerBalance, status=201, problems=(404, 409))),
            admin_route("/admin/partner-balances", self.list_all, method="GET", roles=ALL_ROLES,
                        name="partner_balance.list",
                        doc=Doc("List partner balances (?partner= to filter)", response=PartnerBalanceList,
                                problems=())),
            admin_route(one, self.get, method="GET", roles=ALL_ROLES, name="partner_balance.get",
                        doc=Doc("Get a partner balance", response=PartnerBalance)),
            admin_route(one + "/reload", self.reload, method="POST", roles=ADMIN_ONLY, name="partner_balance.reload",
                        doc=Doc("Reload a partner balance (funds received)", body=PartnerBalanceReload,
                                response=PartnerBalance)),
            admin_route(one + "/threshold", self.set_threshold, method="PUT", roles=ADMIN_ONLY,
                        name="partner_balance.threshold",
                        doc=Doc("Set the low-balance notification threshold", body=ThresholdUpdate,
                                response=PartnerBalance)),
            admin_route("/admin/summary", self.summary, method="GET", roles=ALL_ROLES, name="summary",
                        doc=Doc("Balance summary per currency: users, and users plus partners (wallet)",
                                response=Summary, problems=())),
            route("/secure/partner-balances", self.own, methods=["GET"], name="partner.partner_balance.list",
                  channel=Channel.partner,
                  doc=Doc("The calling partner's own balances", response=PartnerBalanceList, problems=())),
        ]

    async def create(self, request: Request, caller: Caller) -> Response:
        try:
            body = _create_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        if by_alpha(body.currency) is None:
            return invalid(f"unknown ISO 4217 currency code {body.currency} - at `$.currency`")
        money.check_writable(self.ctx.ledger)  # before the store: its ledger accounts could not follow
        try:
            row, accounts = await self.ctx.in_thread(_create, self.store, body)
        except StoreConflict:
            return problem(409, Title.PARTNER_BALANCE_EXISTS,
                           f"partner {body.partner} already has a {body.type} balance in {body.currency}")
        if row is None:
            return problem(404, Title.PARTNER_NOT_FOUND, f"no partner {body.partner}")
        result = await money.submit(self.ctx.ledger, accounts=accounts)
        assert all(status in (AccountStatus.created, AccountStatus.exists) for status in result.account_results)
        log.info("admin %s created partner balance %s", caller.admin, partner_balance_subject(row))
        return json_response(partner_balance_view(self.ctx, row), status=201)

    async def list_all(self, request: Request, caller: Caller) -> Response:
        partner = request.query_params.get("partner") or None
        rows = await self.ctx.in_thread(self.store.partner_balances, partner)
        return json_response(PartnerBalanceList(partner_balances=[partner_balance_view(self.ctx, r) for r in rows]))

    async def own(self, request: Request) -> Response:
        rows = await self.ctx.in_thread(self.store.partner_balances, request.state.partner)
        assert all(row.partner == request.state.partner for row in rows)
        return json_response(PartnerBalanceList(partner_balances=[partner_balance_view(self.ctx, r) for r in rows]))

    async def get(self, request: Request, caller: Caller) -> Response:
        row = await self._find(request)
        return partner_balance_not_found() if row is None else json_response(partner_balance_view(self.ctx, row))

    async def reload(self, request: Request, caller: Caller) -> Response:
        try:
            body = _reload_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        row = await self._find(request)
        if row is None:
            return partner_balance_not_found()
        set_before(request, partner_balance_view(self.ctx, row))
        result = await reload_partner_balance(self.ctx, row, body.amount, caller.admin or "")
        assert result is PartnerReloadResult.reloaded, result  # no key: nothing else can happen
        return json_response(partner_balance_view(self.ctx, row))

    async def set_threshold(self, request: Request, caller: Caller) -> Response:
        try:
            body = _threshold_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        row = await self._find(request)
        if row is None:
            return partner_balance_not_found()
        set_before(request, partner_balance_view(self.ctx, row))
        fresh = await update_threshold(self.ctx, row, body.low_threshold)
        return json_response(partner_balance_view(self.ctx, fresh))

    async def summary(self, request: Request, caller: Caller) -> Response:
        return json_response(summary(self.ctx.ledger))

    async def _find(self, request: Request) -> PartnerBalanceRow | None:
        params = request.path_params
        kind = params["type"].upper()
        if kind not in {str(t) for t in PARTNER_BALANCE_KINDS} or not params["currency"].isalpha():
            return None
        return await self.ctx.in_thread(self.store.get_partner_balance, params["partner"],
                                        PartnerBalanceType(kind), params["currency"].upper())
