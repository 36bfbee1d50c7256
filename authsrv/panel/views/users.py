"""Users: search (`/panel/users?q=`) and a user's page (`/panel/users/{customerId}`), every role.

The user's page shows what the REST API's admin channel offers about a customer, read through the
same code: balances with IBANs and booked/available amounts (`balances.balance_view`, from the
ledger), recent transactions per balance (`history_api.balance_transactions`), paired devices,
KYC state and the user's KYC forms (linking to the KYC review pages), and every card of the user,
masked (first 6, last 4), linking to its card page.

One action: `POST /panel/users/{customerId}/balances/{balanceId}/reload` (the REST reload's admin
roles: Admin, Manager) runs `balances.reload_user_balance`, what the REST reload runs (KYC and
balance-mode checks, the balance's lock shared with the REST API, the ledger transfer, the event),
with an idempotency key generated into the form, so a form posted twice moves the money once.
"""

from __future__ import annotations

import logging
import secrets
import urllib.parse
from typing import Any

import msgspec
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from authsrv.panel.app import PanelApp, money
from authsrv.panel.security import Operator
from authsrv.panel.views.cards import FormError, _exponent, card_facts, parse_amount, transaction_row
from authsrv.rest.balances import ACCESS as BALANCES_ACCESS
from authsrv.rest.balances import (
    BALANCE_ACTIVE,
    IDEMPOTENCY_KEY_LENGTH_MAX,
    KYC_SUCCESS,
    RELOAD_AMOUNT_MAX,
    BalanceReload,
    ReloadResult,
    balance_view,
    reload_user_balance,
)
from authsrv.rest.context import ALL_ROLES, parse_id
from authsrv.rest.history_api import balance_transactions
from authsrv.rest.money import LedgerNotWritable
from authsrv.rest.money import amounts as money_amounts
from authsrv.store import panel_users
from authsrv.store.db import BalanceRow, UserRow, card_visible

log = logging.getLogger("authsrv.panel")

TRANSACTIONS_PER_BALANCE = 5
RELOAD_ROLES = BALANCES_ACCESS["reload"].admin  # the REST reload's admin roles (Admin, Manager)
RELOAD_REFUSALS: dict[ReloadResult, tuple[int, str]] = {
    ReloadResult.idempotency_key_reused: (
        409, "Refused (IDEMPOTENCY_KEY_REUSED): this form was already used for another amount; reload the page."),
    ReloadResult.credit_balance_missing: (
        422, "Refused (INSUFFICIENT_FUNDS): the partner has no CREDIT balance in this currency."),
    ReloadResult.insufficient_funds: (
        422, "Refused (INSUFFICIENT_FUNDS): the partner's CREDIT balance is too low for this reload."),
    ReloadResult.kyc_required: (403, "Refused (KYC_REQUIRED): the customer's KYC must be SUCCESS for balances."),
    ReloadResult.external_balance: (
        409, "Refused (EXTERNAL_BALANCE): the partner holds this balance; it is reloaded there."),
    ReloadResult.balance_not_active: (409, "Refused (BALANCE_NOT_ACTIVE): the balance is deleted."),
}
assert set(RELOAD_REFUSALS) == set(ReloadResult) - {ReloadResult.reloaded}
KYC_STATE_BADGES = {"SUCCESS": "ok", "ACCEPTED": "ok", "REJECTED": "bad", "FAILED": "bad", "PENDING": "warn"}


def _page_number(text: str | None) -> int | None:
    if text is None or text == "":
        return 1
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        return None
    page = int(text)
    return page if 1 <= page <= panel_users.USERS_PAGES_MAX else None


def _users_url(q: str, page: int) -> str:
    query = {"q": q} if q else {}
    if page > 1:
        query["page"] = str(page)
    return "/panel/users" + ("?" + urllib.parse.urlencode(query) if query else "")


def register(panel: PanelApp) -> None:
    ctx = panel.ctx

    @panel.page("/users", roles=ALL_ROLES)
    async def users(request: Request, op: Operator) -> Response:
        q = (request.query_params.get("q") or "").strip()
        page = _page_number(request.query_params.get("page"))
        error, status = "", 200
        if len(q) > panel_users.SEARCH_TEXT_MAX:
            error, status = f"The search text is longer than {panel_users.SEARCH_TEXT_MAX} characters.", 400
        elif page is None:
            error, status = f"page must be a number from 1 to {panel_users.USERS_PAGES_MAX}.", 400
        rows: list = []
        more = False
        if not error:
            assert page is not None
            rows, more = await ctx.in_thread(panel_users.search_users, panel.store, q, page=page)
        page = page or 1
        return panel.render(
            request, op, "users.html", status=status, q=q, users=rows, page=page, error=error,
            prev_url=_users_url(q, page - 1) if page > 1 and not error else "",
            next_url=_users_url(q, page + 1) if more and page < panel_users.USERS_PAGES_MAX else "",
            badges=KYC_STATE_BADGES, scan_max=panel_users.SEARCH_SCAN_MAX,
        )

    async def render_user(request: Request, op: Operator, row: UserRow, *, status: int = 200, error: str = "",
                          error_balance: int = 0, amount: str = "") -> Response:
        forms = await ctx.in_thread(panel_users.kyc_forms_of_user, panel.store, row.id)
        balances = await ctx.in_thread(panel.store.balances_of_user, row.id)
        cards = await ctx.in_thread(panel_users.cards_of_user, panel.store, row.id)
        devices = await ctx.in_thread(panel.store.devices_of_user, row.id)
        by_balance: dict[int, list] = {}
        for card in cards:
            by_balance.setdefault(card.balance_id, []).append(card)
        reloadable = op.role in RELOAD_ROLES and row.kyc == KYC_SUCCESS
        shown: list[dict[str, Any]] = []
        for balance in balances:
            of_balance = by_balance.get(balance.id, [])
            exp = _exponent(balance.currency)
            amounts = None
            transactions: list[dict[str, Any]] = []
            if ctx.ledger is not None:
                # The balances API's view (booked and available from the ledger), its visible cards.
                amounts = balance_view(ctx, balance, [card for card in of_balance if card_visible(card)])
                transactions = [transaction_row(t) for t in balance_transactions(
                    ctx, balance, of_balance, limit=TRANSACTIONS_PER_BALANCE).transactions]
            external = ctx.partner_config(balance.partner).balance_mode == "external"
            shown.append({
                "row": balance, "booked": money(amounts.amount, exp) if amounts else "",
                "available": money(amounts.available, exp) if amounts else "",
                "held": money(amounts.amount - amounts.available, exp) if amounts else "",
                "transactions": transactions, "external": external,
                "reloadable": reloadable and not external and balance.status == BALANCE_ACTIVE and amounts is not None,
                "reload_key": f"panel-{secrets.token_urlsafe(18)}",  # a form posted twice moves the money once
                "error": error if error_balance == balance.id else "",
                "amount": amount if error_balance == balance.id else "",
            })
        return panel.render(
            request, op, "user.html", status=status, user=row, forms=forms, balances=shown,
            cards=[card_facts(card) for card in cards], devices=devices, badges=KYC_STATE_BADGES,
            error=error if not error_balance else "",
        )

    @panel.page("/users/{customerId}", roles=ALL_ROLES)
    async def user(request: Request, op: Operator) -> Response:
        user_id = parse_id(request.path_params["customerId"])
        row = await ctx.in_thread(panel.store.get_user, user_id) if user_id is not None else None
        if row is None:
            return panel.not_found(request, op, "user")
        return await render_user(request, op, row)

    @panel.action("/users/{customerId}/balances/{balanceId}/reload", roles=RELOAD_ROLES)
    async def reload(request: Request, op: Operator, form: FormData) -> Response:
        """The REST reload (`reload_user_balance`): money from the partner's credit balance or the
        funding account, once per idempotency key (the form's)."""
        user_id = parse_id(request.path_params["customerId"])
        balance_id = parse_id(request.path_params["balanceId"])
        row = await ctx.in_thread(panel.store.get_user, user_id) if user_id is not None else None
        balance = await ctx.in_thread(panel.store.get_balance, balance_id) if balance_id is not None else None
        if row is None or balance is None or balance.user_id != row.id or balance.partner != row.partner:
            return panel.not_found(request, op, "balance")
        amount_text = _text(form, "amount")
        key = _text(form, "idempotency_key")
        exp = _exponent(balance.currency)
        try:
            amount = parse_amount(amount_text, exp, "Amount")
            if amount is None:
                raise FormError("Amount: type the amount to add.")
            if amount == 0:
                raise FormError("Amount: more than zero.")
            amount = msgspec.convert({"amount": amount}, BalanceReload).amount  # the REST body's bounds
        except FormError as error:
            return await render_user(request, op, row, status=400, error=str(error), error_balance=balance.id,
                                     amount=amount_text)
        except msgspec.ValidationError:
            return await render_user(request, op, row, status=400, error_balance=balance.id, amount=amount_text,
                                     error=f"Amount: at most {money(RELOAD_AMOUNT_MAX, exp)} in one reload.")
        if not key or len(key) > IDEMPOTENCY_KEY_LENGTH_MAX or not key.isascii() or not key.isprintable():
            return await render_user(request, op, row, status=400, error_balance=balance.id, amount=amount_text,
                                     error="The form's idempotency key is missing: reload the page and try again.")
        before = amounts_of(balance)
        try:
            result, balance = await reload_user_balance(ctx, row, balance, amount, key)
        except LedgerNotWritable as error:
            return await render_user(request, op, row, status=503, error=str(error), error_balance=balance.id,
                                     amount=amount_text)
        shown = f"{money(amount, exp)} {balance.currency}"
        target = f"balance:{balance.id}"
        if result is not ReloadResult.reloaded:
            status, message = RELOAD_REFUSALS[result]
            await panel.audit(op, "balance.reload", target, f"refused: {result.name}", before=before,
                              after=amounts_of(balance), detail=f"{shown}, key {key}")
            return await render_user(request, op, row, status=status, error=message, error_balance=balance.id,
                                     amount=amount_text)
        await panel.audit(op, "balance.reload", target, "ok", before=before, after=amounts_of(balance),
                          detail=f"{shown}, key {key}")
        log.info("balance %d reloaded with %d by panel %s", balance.id, amount, op.username)
        return panel.redirect(request, f"/panel/users/{row.id}#balance-{balance.id}",
                              flash=f"Balance {balance.id} reloaded with {shown}.")

    def amounts_of(balance: BalanceRow) -> dict[str, Any]:
        amounts = money_amounts(ctx.ledger, balance.ledger_account_id)
        return {"booked": amounts.booked, "available": amounts.available, "currency": balance.currency}


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""
