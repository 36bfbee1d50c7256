"""User balances: create, list, get (with their cards, masked), reload, delete; on three channels.

Who may do what (reference documents, "Actions": "Create user balance" is offered to
`/secure/customers/{id}/balances` and `/customers/me/balances`; they are silent on admin roles and
on reload/delete, so the choice is stated here and in docs/api.md):

    action   customer  partner  admin roles
    create   yes       yes      Admin, Manager
    list     yes       yes      Admin, Manager, Employee
    get      yes       yes      Admin, Manager, Employee
    reload   no        yes      Admin, Manager
    delete   no        yes      Admin

Money: a reload moves funds in the ledger from the partner's CREDIT balance when the partner's
collateral is `credit` (documents, "Partner Credit Balance": 6. charge credit balance, 7. top up
user balance, else 9. fail (insufficient funds)), otherwise from the system funding account (the
outside world: a bank transfer the partner made). The ledger refuses a transfer that would take
the credit balance below zero (debits_must_not_exceed_credits), so a short credit balance moves
nothing and answers 422 INSUFFICIENT_FUNDS.

Order of writes: the store first (balance row, account id, IBAN, event in one transaction), then
the ledger account (`money.submit`; the server re-creates accounts the store knows and the
ledger lacks at startup). A reload is the other way round: the ledger transfer commits first and
the store records the event after it; with an X-Idempotency-Key the transfer id is reserved in the
store before the ledger sees it, so a retry (even after a crash in between) replays the same
transfer (`exists`) and records the event then, never a second movement.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.iso.currency import by_alpha
from authsrv.rest import money
from authsrv.rest.audit import set_before
from authsrv.rest.auth import Channel
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
from authsrv.store.db import (
    RELOAD_DONE,
    BalanceRow,
    CardRow,
    ManagementTransferCode,
    Role,
    Store,
    UserRow,
    card_visible,
)
from ledger.types import AccountKind, AccountSpec, AccountStatus, TransferSpec, TransferStatus

log = logging.getLogger("authsrv.rest")

KYC_SUCCESS = "SUCCESS"
BALANCE_ACTIVE = "ACTIVE"
BALANCE_DELETED = "DELETED"
RELOAD_AMOUNT_MAX = 100_000_000_000  # minor units in one reload: 1,000,000,000.00 of a 2-decimal currency
BALANCES_PER_USER_MAX = 32  # a user "can have many balances", not unboundedly many
IDEMPOTENCY_KEY_HEADER = "x-idempotency-key"
IDEMPOTENCY_KEY_LENGTH_MAX = 128
MASK = "******"

MANAGERS = frozenset({Role.admin, Role.manager})
ACCESS: dict[str, Access] = {
    "create": Access(customer=True, partner=True, admin=MANAGERS),
    "list": Access(customer=True, partner=True, admin=ALL_ROLES),
    "get": Access(customer=True, partner=True, admin=ALL_ROLES),
    "reload": Access(partner=True, admin=MANAGERS),
    "delete": Access(partner=True, admin=frozenset({Role.admin})),
}

Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 alpha code")]
ReloadAmount = Annotated[int, msgspec.Meta(ge=1, le=RELOAD_AMOUNT_MAX, description="minor units")]


class BalanceCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    currency: Currency


class BalanceReload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    amount: ReloadAmount


class BalanceCreated(msgspec.Struct, frozen=True):
    id: int
    currency: str
    iban: str | None  # null when the partner's program issues no IBANs


class MaskedCard(msgspec.Struct, rename="camel", frozen=True):
    id: int
    type: str  # virtual, physical, digital_first
    status: str  # INACTIVE, ACTIVE, LOCKED
    masked_pan: str  # first 6 + ****** + last 4


class Balance(msgspec.Struct, frozen=True):
    id: int
    currency: str
    amount: int  # booked (posted), minor units
    available: int  # booked minus holds
    status: str  # ACTIVE, DELETED
    iban: str | None
    cards: list[MaskedCard]


class BalanceList(msgspec.Struct, frozen=True):
    balances: list[Balance]


class CreateResult(enum.IntEnum):
    """Never renumber."""

    created = 0
    kyc_required = 1
    too_many_balances = 2


class ReloadResult(enum.IntEnum):
    """Outcome of a reload. Never renumber. `reload_user_balance` checks 4, 5, 6 first (nothing
    moves), then `reload_balance` answers 0 to 3."""

    reloaded = 0
    idempotency_key_reused = 1  # the key was used for another amount
    credit_balance_missing = 2  # collateral `credit` but no CREDIT partner balance in the currency
    insufficient_funds = 3  # the credit balance is short
    kyc_required = 4  # the customer's KYC is not SUCCESS
    external_balance = 5  # the partner holds the balance (balance_mode external): reloaded there
    balance_not_active = 6  # deleted


class DeleteResult(enum.IntEnum):
    """Never renumber."""

    deleted = 0
    not_active = 1
    has_cards = 2


_create_decoder = msgspec.json.Decoder(BalanceCreate)
_reload_decoder = msgspec.json.Decoder(BalanceReload)


# -- domain: store side (run in a worker thread) ---------------------------------------------------


def open_balance(store: Store, user: UserRow, currency: str) -> tuple[BalanceRow, list[AccountSpec]]:
    """A new ACTIVE balance with its event, and the ledger accounts to create after the commit
    (the balance's own and, on first use of the currency, the system accounts)."""
    assert by_alpha(currency) is not None, currency
    with store.transaction():
        system = store.ensure_system_accounts(currency)
        program = store.iban_program(user.partner)
        iban_bank = (program.iban_country, program.iban_bank_code) if program is not None else None
        row, spec = store.create_balance(user.id, currency, iban_bank=iban_bank)
        store.append_event(user.partner, "balance.created", f"balance:{row.id}", balance_event(row))
    assert row.user_id == user.id and row.status == BALANCE_ACTIVE
    return row, [*system, spec]


class PartnerLinkFailed(Exception):
    """An external-balance partner did not link the new balance: the transaction rolls back."""


def create_checked(store: Store, user: UserRow, currency: str,
                   link: Callable[[BalanceRow], str] | None = None) -> tuple[CreateResult, BalanceRow | None, list]:
    """`link` (external-balance partners): called inside the transaction with the new row; a
    non-empty answer (why it failed) raises PartnerLinkFailed, so nothing is created."""
    with store.transaction():
        fresh = store.get_user(user.id)
        assert fresh is not None
        if fresh.kyc != KYC_SUCCESS:
            return CreateResult.kyc_required, None, []
        if len(store.balances_of_user(user.id)) >= BALANCES_PER_USER_MAX:
            return CreateResult.too_many_balances, None, []
        row, accounts = open_balance(store, fresh, currency)
        failure = link(row) if link is not None else ""
        if failure:
            raise PartnerLinkFailed(failure)
    return CreateResult.created, row, accounts


def external_link(ctx: RestContext, partner: str) -> Callable[[BalanceRow], str] | None:
    """For a partner with external balances: POST {api_url}/users/{id}/balances (documents, "Link
    balance") with the new balance's id, from the store thread (authsrv/hotpath/external.py)."""
    config = ctx.partner_config(partner)
    if config.balance_mode != "external" or not config.api_url:
        return None  # without an api_url there is no one to link with (and the hot path answers 91)
    from authsrv.hotpath.external import link_balance

    pki_dir = ctx.data_dir / "pki" if ctx.data_dir is not None else None
    return lambda row: link_balance(config, pki_dir, row.user_id, row.id, row.currency).reason or ""


def auto_balance_hook(ctx: RestContext) -> Callable[[UserRow], list[AccountSpec]]:
    """For `LifecycleApi.kyc_success_hooks`: runs in the store thread inside the transaction that
    turns the user's kyc to SUCCESS; opens a balance in each currency of the partner's programs
    with `auto_balance` the user has no ACTIVE balance in yet (so KYC passing twice opens one)."""
    store = ctx.store

    def hook(user: UserRow) -> list[AccountSpec]:
        accounts: list[AccountSpec] = []
        held = {row.currency for row in store.balances_of_user(user.id) if row.status == BALANCE_ACTIVE}
        link = external_link(ctx, user.partner)
        for currency in store.auto_balance_currencies(user.partner):
            if currency in held or by_alpha(currency) is None:
                continue
            try:
                with store.savepoint():  # a partner that does not link it: no balance, KYC still passes
                    row, specs = open_balance(store, user, currency)
                    failure = link(row) if link is not None else ""
                    if failure:
                        raise PartnerLinkFailed(failure)
            except PartnerLinkFailed as failure:
                log.warning("partner %s did not link the automatic %s balance of customer %d: %s",
                            user.partner, currency, user.id, failure)
                continue
            log.info("opened balance %d (%s) for customer %d on KYC success", row.id, currency, user.id)
            accounts.extend(specs)
        return accounts

    return hook


def balance_event(row: BalanceRow, **extra) -> dict:
    return {"balanceId": row.id, "customerId": row.user_id, "currency": row.currency, "status": row.status,
            "iban": row.iban or None, **extra}


def masked_card(card: CardRow) -> MaskedCard:
    return MaskedCard(id=card.id, type=card.card_type, status=card.status.name.upper(),
                      masked_pan=card.pan_first6 + MASK + card.pan_last4)


def _reload_source(store: Store, balance: BalanceRow, collateral: str) -> tuple[int | None, list[AccountSpec]]:
    """The account a reload debits, and accounts to create first (a funding account on first use)."""
    if collateral == "credit":
        credit = store.ledger_account(AccountKind.partner_credit, balance.currency, balance.partner)
        return (credit.id if credit is not None else None), []
    funding = store.ledger_account(AccountKind.funding, balance.currency, "")
    if funding is not None:
        return funding.id, []
    system = store.ensure_system_accounts(balance.currency)
    (funding,) = [spec for spec in system if spec.kind == AccountKind.funding]
    return funding.id, system


def _record_reload(store: Store, balance: BalanceRow, amount: int, transfer_id: int, key: str,
                   source: str) -> None:
    with store.transaction():
        if key:
            store.finish_reload(balance.id, key)
        store.append_event(balance.partner, "balance.reloaded", f"balance:{balance.id}",
                           balance_event(balance, amount=amount, source=source, transferId=str(transfer_id)))


def _delete(store: Store, balance_id: int) -> DeleteResult:
    """ACTIVE -> DELETED with its event, unless a card that is not removed still uses it. The
    card check is in the same transaction as the change, so a card issued concurrently either
    is counted or finds the balance DELETED."""
    with store.transaction():
        row = store.get_balance(balance_id)
        assert row is not None
        if row.status != BALANCE_ACTIVE:
            return DeleteResult.not_active
        if store.open_cards_count(balance_id):
            return DeleteResult.has_cards
        store.set_balance_status(balance_id, BALANCE_DELETED)
        store.append_event(row.partner, "balance.deleted", f"balance:{row.id}",
                           balance_event(row, status=BALANCE_DELETED))
    return DeleteResult.deleted


def _cards_by_balance(store: Store, user_id: int) -> dict[int, list[CardRow]]:
    grouped: dict[int, list[CardRow]] = {}
    for card in store.cards_of_user(user_id):
        if card_visible(card):
            grouped.setdefault(card.balance_id, []).append(card)
    return grouped


# -- domain: ledger side (trio thread) -------------------------------------------------------------


class BalanceLocks:
    """One lock per balance with a reload or delete in flight, so a delete never checks "empty"
    while a reload of the same balance is between its checks and its transfer. Entries exist only
    while held or awaited (bounded by the requests in flight)."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[trio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, balance_id: int) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(balance_id, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[balance_id]


_LOCKS: dict[int, tuple[weakref.ref, BalanceLocks]] = {}


def balance_locks(ctx: RestContext) -> BalanceLocks:
    """The one BalanceLocks of `ctx`, shared by every channel that reloads or deletes (REST, panel)."""
    found = _LOCKS.get(id(ctx))
    if found is None or found[0]() is not ctx:
        found = _LOCKS[id(ctx)] = (weakref.ref(ctx), BalanceLocks())
        weakref.finalize(ctx, _LOCKS.pop, id(ctx), None)
    return found[1]


async def create_ledger_accounts(ctx: RestContext, accounts: list[AccountSpec]) -> None:
    if not accounts:
        return
    result = await money.submit(ctx.ledger, accounts=accounts)
    bad = [status for status in result.account_results
           if status not in (AccountStatus.created, AccountStatus.exists)]  # fmt: skip
    assert not bad, f"ledger refused accounts the store allocated: {[s.name for s in bad]}"


async def reload_balance(ctx: RestContext, balance: BalanceRow, amount: int, key: str) -> ReloadResult:
    """Move `amount` into the balance (the caller holds the balance's lock and checked it ACTIVE)."""
    assert 0 < amount <= RELOAD_AMOUNT_MAX and balance.status == BALANCE_ACTIVE
    store = ctx.store
    collateral = ctx.partner_config(balance.partner).collateral
    source, accounts = await ctx.in_thread(_reload_source, store, balance, collateral)
    if source is None:
        return ReloadResult.credit_balance_missing
    if key:
        reserved = await ctx.in_thread(store.reload_by_key, balance.id, key)
        if reserved is None:
            reserved = await ctx.in_thread(store.add_reload, balance.id, key, amount)
        if reserved.amount != amount:
            return ReloadResult.idempotency_key_reused
        if reserved.state == RELOAD_DONE:
            return ReloadResult.reloaded  # answered before: the same answer, nothing moves
        transfer_id = reserved.transfer_id
    else:
        (transfer_id,) = await ctx.in_thread(store.allocate_transfer_ids, 1)
    transfer = TransferSpec(id=transfer_id, debit_account_id=source, credit_account_id=balance.ledger_account_id,
                            amount=amount, code=ManagementTransferCode.user_funding,
                            reference=f"reload balance {balance.id}")  # fmt: skip
    result = await money.submit(ctx.ledger, accounts=accounts, transfers=[transfer])
    status = result.transfer_results[0]
    if not money.transfer_ok(status):
        if key:
            await ctx.in_thread(store.drop_reload, balance.id, key)
        if status in (TransferStatus.exceeds_credits, TransferStatus.exceeds_debits):
            return ReloadResult.insufficient_funds
        raise AssertionError(f"ledger refused a reload: {status.name}")  # a bug: ids and accounts are ours
    # The ledger has committed; the event follows (a crash here loses the event of a keyless reload,
    # never the money; a keyed retry replays `exists` and records it).
    await ctx.in_thread(_record_reload, store, balance, amount, transfer_id, key,
                        "credit" if collateral == "credit" else "funding")
    if collateral == "credit":
        from authsrv.rest.partner_balances import check_low_balances  # reload charged the credit balance

        await check_low_balances(ctx)
    return ReloadResult.reloaded


async def reload_user_balance(ctx: RestContext, user: UserRow, row: BalanceRow, amount: int,
                              key: str) -> tuple[ReloadResult, BalanceRow]:
    """A reload of the user's balance `row` as every channel does it: KYC and the partner's balance
    mode checked, then under the balance's lock its state read again and the money moved."""
    assert row.user_id == user.id and 0 < amount <= RELOAD_AMOUNT_MAX
    if user.kyc != KYC_SUCCESS:
        return ReloadResult.kyc_required, row
    if ctx.partner_config(row.partner).balance_mode == "external":
        return ReloadResult.external_balance, row
    async with balance_locks(ctx).hold(row.id):
        fresh = await ctx.in_thread(ctx.store.get_balance, row.id)
        assert fresh is not None
        if fresh.status != BALANCE_ACTIVE:
            return ReloadResult.balance_not_active, fresh
        return await reload_balance(ctx, fresh, amount, key), fresh


def balance_view(ctx: RestContext, row: BalanceRow, cards: list[CardRow]) -> Balance:
    amounts = money.amounts(ctx.ledger, row.ledger_account_id)
    return Balance(id=row.id, currency=row.currency, amount=amounts.booked, available=amounts.available,
                   status=row.status, iban=row.iban or None, cards=[masked_card(card) for card in cards])


# -- HTTP ------------------------------------------------------------------------------------------


def balance_not_found() -> Response:
    return problem(404, Title.BALANCE_NOT_FOUND, "no such balance")


def kyc_required() -> Response:
    return problem(403, Title.KYC_REQUIRED, "the customer's KYC must be SUCCESS for balances")


class BalancesApi:
    def __init__(self, ctx: RestContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.locks = balance_locks(ctx)

    def routes(self) -> list[Route]:
        ctx = self.ctx
        return [
            *customer_routes(ctx, "/balances", self.create, method="POST", access=ACCESS["create"],
                             name="balance.create", doc=Doc("Create a user balance", body=BalanceCreate,
                                                            response=BalanceCreated, status=201,
                                                            problems=(403, 404, 502))),
            *customer_routes(ctx, "/balances", self.list_all, method="GET", access=ACCESS["list"],
                             name="balance.list", doc=Doc("List the user's balances", response=BalanceList)),
            *customer_routes(ctx, "/balances/{balanceId}", self.get, method="GET", access=ACCESS["get"],
                             name="balance.get", doc=Doc("Get a balance and its cards (masked)", response=Balance)),
            *customer_routes(ctx, "/balances/{balanceId}/reload", self.reload, method="POST",
                             access=ACCESS["reload"], name="balance.reload",
                             doc=Doc("Reload a balance", body=BalanceReload, response=Balance,
                                     problems=(403, 404, 409, 422))),
            *customer_routes(ctx, "/balances/{balanceId}", self.delete, method="DELETE", access=ACCESS["delete"],
                             name="balance.delete", doc=Doc("Delete an empty balance without cards", status=204,
                                                            problems=(404, 409))),
        ]

    async def create(self, request: Request, call: Call) -> Response:
        try:
            body = _create_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        if by_alpha(body.currency) is None:
            return invalid(f"unknown ISO 4217 currency code {body.currency} - at `$.currency`")
        if call.user.kyc != KYC_SUCCESS:
            return kyc_required()
        money.check_writable(self.ctx.ledger)  # before the store: its ledger accounts could not follow
        try:
            result, row, accounts = await self.ctx.in_thread(create_checked, self.store, call.user, body.currency,
                                                             external_link(self.ctx, call.user.partner))
        except PartnerLinkFailed as failure:
            log.warning("partner %s did not link a balance of customer %d: %s", call.user.partner, call.user.id,
                        failure)
            return problem(502, Title.PARTNER_UNAVAILABLE, f"the partner did not link the balance: {failure}")
        if result is CreateResult.kyc_required:
            return kyc_required()
        if result is CreateResult.too_many_balances:
            return problem(409, Title.TOO_MANY_BALANCES, f"a user has at most {BALANCES_PER_USER_MAX} balances")
        assert row is not None
        await create_ledger_accounts(self.ctx, accounts)
        program = await self.ctx.in_thread(self.store.program_for, row.partner, row.currency)
        await money.charge_creation_fee(self.ctx, "account", program=program, balance=row)
        log.info("%s created balance %d (%s) for customer %d", call.caller.channel, row.id, row.currency, row.user_id)
        return json_response(BalanceCreated(id=row.id, currency=row.currency, iban=row.iban or None), status=201)

    async def list_all(self, request: Request, call: Call) -> Response:
        rows = await self.ctx.in_thread(self.store.balances_of_user, call.user.id)
        cards = await self.ctx.in_thread(_cards_by_balance, self.store, call.user.id)
        views = [balance_view(self.ctx, row, cards.get(row.id, [])) for row in rows]
        return json_response(BalanceList(balances=views))

    async def get(self, request: Request, call: Call) -> Response:
        row = await self._own_balance(request, call)
        if row is None:
            return balance_not_found()
        cards = await self.ctx.in_thread(_cards_by_balance, self.store, call.user.id)
        return json_response(balance_view(self.ctx, row, cards.get(row.id, [])))

    async def reload(self, request: Request, call: Call) -> Response:
        try:
            body = _reload_decoder.decode(await request.body())
        except msgspec.DecodeError as error:
            return invalid(error)
        key = request.headers.get(IDEMPOTENCY_KEY_HEADER, "")
        if len(key) > IDEMPOTENCY_KEY_LENGTH_MAX or not key.isprintable() or not key.isascii():
            return invalid(f"{IDEMPOTENCY_KEY_HEADER}: at most {IDEMPOTENCY_KEY_LENGTH_MAX} printable ASCII characters")
        row = await self._own_balance(request, call)
        if row is None:
            return balance_not_found()
        if call.caller.channel is Channel.admin:
            set_before(request, balance_view(self.ctx, row, []))
        result, row = await reload_user_balance(self.ctx, call.user, row, body.amount, key)
        if result is ReloadResult.kyc_required:
            return kyc_required()
        if result is ReloadResult.external_balance:
            return problem(409, Title.EXTERNAL_BALANCE, "the partner holds this balance: it is reloaded there")
        if result is ReloadResult.balance_not_active:
            return problem(409, Title.BALANCE_NOT_ACTIVE, f"the balance is {row.status}")
        if result is ReloadResult.idempotency_key_reused:
            return problem(409, Title.IDEMPOTENCY_KEY_REUSED, "this idempotency key was used for another amount")
        if result is ReloadResult.credit_balance_missing:
            return problem(422, Title.INSUFFICIENT_FUNDS, f"the partner has no CREDIT balance in {row.currency}")
        if result is ReloadResult.insufficient_funds:
            return problem(422, Title.INSUFFICIENT_FUNDS, "the partner's CREDIT balance is too low for this reload")
        assert result is ReloadResult.reloaded
        log.info("%s reloaded balance %d with %d", call.caller.channel, row.id, body.amount)
        cards = await self.ctx.in_thread(_cards_by_balance, self.store, call.user.id)
        return json_response(balance_view(self.ctx, row, cards.get(row.id, [])))

    async def delete(self, request: Request, call: Call) -> Response:
        row = await self._own_balance(request, call)
        if row is None:
            return balance_not_found()
        async with self.locks.hold(row.id):
            view = self.ctx.ledger.ledger.balance(row.ledger_account_id) if self.ctx.ledger is not None else None
            if view is not None and (view.posted or view.debits_pending or view.credits_pending):
                return problem(409, Title.BALANCE_NOT_EMPTY, "only a balance at zero with no holds can be deleted")
            result = await self.ctx.in_thread(_delete, self.store, row.id)
        if result is DeleteResult.not_active:
            return problem(409, Title.BALANCE_NOT_ACTIVE, "the balance is already deleted")
        if result is DeleteResult.has_cards:
            return problem(409, Title.BALANCE_HAS_CARDS, "remove the balance's cards first")
        assert result is DeleteResult.deleted
        log.info("%s deleted balance %d", call.caller.channel, row.id)
        return Response(status_code=204)

    async def _own_balance(self, request: Request, call: Call) -> BalanceRow | None:
        """The balance in the path if it is the path's user's (anything else: a 404 like a missing one)."""
        balance_id = parse_id(request.path_params["balanceId"])
        if balance_id is None:
            return None
        row = await self.ctx.in_thread(self.store.get_balance, balance_id)
        if row is None or row.user_id != call.user.id or row.partner != call.user.partner:
            return None
        return row
