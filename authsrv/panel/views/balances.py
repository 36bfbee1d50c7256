"""Partner balances (deposit and credit collateral) and the Balance Summary.

    page / action                                                      roles
    GET  /panel/partner-balances                                       all
    GET  /panel/partner-balances/{partner}/{type}/{currency}           all (with its recent ledger history)
    POST /panel/partner-balances/{partner}/{type}/{currency}/reload    ADMIN_ONLY, as the REST reload
    POST /panel/partner-balances/{partner}/{type}/{currency}/threshold ADMIN_ONLY, as the REST threshold
    GET  /panel/summary                                                all

Levels are `partner_balance_view` (authsrv/rest/partner_balances.py), what `GET /admin/partner-
balances` answers: booked from the ledger, available = booked minus what pending authorizations
hold. A reload is `reload_partner_balance` and a threshold `update_threshold`, what the REST
handlers run; the reload form carries an idempotency key generated into the page, so a form
posted twice moves the money once. The summary is `summary()`, the REST `GET /admin/summary`.
Amounts are typed in major units ("1500.50") and become integer minor units of the currency.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import re
import secrets

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from authsrv.clearing.plan import ClearingCode
from authsrv.hotpath.fees import FeeCode
from authsrv.hotpath.steps import TransferCode
from authsrv.iso.currency import by_alpha
from authsrv.panel.app import PanelApp
from authsrv.panel.security import Operator
from authsrv.rest.context import ALL_ROLES
from authsrv.rest.money import LedgerNotWritable
from authsrv.rest.partner_balances import (
    ADMIN_ONLY,
    PARTNER_RELOAD_AMOUNT_MAX,
    PartnerReloadResult,
    partner_balance_view,
    reload_partner_balance,
    summary,
    update_threshold,
)
from authsrv.store import partner_reloads
from authsrv.store.db import PARTNER_BALANCE_KINDS, ManagementTransferCode, PartnerBalanceRow, PartnerBalanceType
from ledger.types import AMOUNT_MAX

log = logging.getLogger("authsrv.panel")

HISTORY_SHOWN = 25
_AMOUNT = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,8})?$")
_KEY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# Ledger transfer codes, as a reader of a collateral account's history needs them.
CODE_LABELS = {
    TransferCode.purchase: "purchase", TransferCode.cash: "cash", TransferCode.refund: "refund",
    TransferCode.payment: "payment", TransferCode.collateral: "authorization hold",
    TransferCode.reversal: "reversal", TransferCode.collateral_release: "hold released",
    TransferCode.completion: "completion", FeeCode.transaction: "fee", FeeCode.transaction_refund: "fee refund",
    ManagementTransferCode.user_funding: "user reload", ManagementTransferCode.collateral_funding: "reload",
    ManagementTransferCode.user_withdrawal: "withdrawal", ClearingCode.post: "clearing",
    ClearingCode.collateral_post: "clearing", ClearingCode.collateral_excess: "clearing (over the hold)",
    ClearingCode.collateral_forced: "clearing (forced)",
}  # fmt: skip
SUMMARY_EXPLANATION = (
    "Per currency, Users is the sum of all user balances and Wallet the sum of user and partner "
    "(deposit and credit) balances, as the reference documents' Balance Summary defines them."
)


def exponent_of(currency: str) -> int:
    found = by_alpha(currency)
    return found.exponent if found is not None and found.exponent is not None else 2


def parse_major(text: str, currency: str) -> int | None:
    """'1500.5' EUR -> 150050 minor units; None for anything that is not such an amount."""
    text = text.strip()
    if not _AMOUNT.match(text):
        return None
    value = decimal.Decimal(text) * (10 ** exponent_of(currency))
    if value != value.to_integral_value():
        return None  # more decimals than the currency has
    return int(value)


def partner_balance_path(row: PartnerBalanceRow) -> str:
    return f"/panel/partner-balances/{row.partner}/{row.type}/{row.currency}"


def register(panel: PanelApp) -> None:
    ctx = panel.ctx
    store = panel.store

    def level(row: PartnerBalanceRow) -> dict:
        view = partner_balance_view(ctx, row)
        return {"row": row, "path": partner_balance_path(row), "amount": view.amount, "available": view.available,
                "held": view.amount - view.available, "low_threshold": view.low_threshold,
                "low": view.low_threshold > 0 and view.available < view.low_threshold,
                "exponent": exponent_of(row.currency), "key": secrets.token_urlsafe(18)}

    def history(row: PartnerBalanceRow) -> list[dict]:
        entries = ctx.ledger.ledger.history(row.ledger_account_id, limit=HISTORY_SHOWN) if ctx.ledger else []
        shown = []
        for entry in entries:
            at = datetime.datetime.fromtimestamp(entry.timestamp_ns / 1e9, datetime.timezone.utc)
            shown.append({"at": at.strftime("%Y-%m-%d %H:%M:%S"), "kind": entry.kind.name, "side": entry.side.name,
                          "amount": entry.amount, "code": entry.code,
                          "label": CODE_LABELS.get(entry.code, f"code {entry.code}"),
                          "reference": entry.reference, "forced": entry.forced})
        return shown

    async def find(request: Request) -> PartnerBalanceRow | None:
        params = request.path_params
        kind, currency = params["type"].upper(), params["currency"].upper()
        if kind not in {str(t) for t in PARTNER_BALANCE_KINDS} or not re.fullmatch(r"[A-Z]{3}", currency):
            return None
        return await ctx.in_thread(store.get_partner_balance, params["partner"], PartnerBalanceType(kind), currency)

    @panel.page("/partner-balances", roles=ALL_ROLES)
    async def partner_balances(request: Request, op: Operator) -> Response:
        rows = await ctx.in_thread(store.partner_balances, None)
        return panel.render(request, op, "partner_balances.html", balances=[level(row) for row in rows],
                            can_manage=op.role in ADMIN_ONLY)

    async def render_one(request: Request, op: Operator, row: PartnerBalanceRow, *, status: int = 200,
                         error: str = "", typed: dict | None = None) -> Response:
        return panel.render(request, op, "partner_balance.html", status=status, b=level(row), history=history(row),
                            history_shown=HISTORY_SHOWN, can_manage=op.role in ADMIN_ONLY, error=error,
                            typed=typed or {})

    @panel.page("/partner-balances/{partner}/{type}/{currency}", roles=ALL_ROLES)
    async def partner_balance(request: Request, op: Operator) -> Response:
        row = await find(request)
        if row is None:
            return panel.not_found(request, op, "partner balance")
        return await render_one(request, op, row)

    @panel.action("/partner-balances/{partner}/{type}/{currency}/reload", roles=ADMIN_ONLY)
    async def reload(request: Request, op: Operator, form: FormData) -> Response:
        row = await find(request)
        if row is None:
            return panel.not_found(request, op, "partner balance")
        typed_amount = _text(form, "amount")
        key = _text(form, "idempotency_key")
        amount = parse_major(typed_amount, row.currency)
        if amount is None or not 0 < amount <= PARTNER_RELOAD_AMOUNT_MAX:
            places = exponent_of(row.currency)
            return await render_one(request, op, row, status=400, typed={"amount": typed_amount},
                                    error=f"The reload amount is a positive number of {row.currency} with at most "
                                    f"{places} decimals (e.g. 1500.{'0' * places}), at most "
                                    f"{PARTNER_RELOAD_AMOUNT_MAX // 10 ** places:,} {row.currency}.")
        if not _KEY.match(key) or len(key) > partner_reloads.KEY_LENGTH_MAX:
            return await render_one(request, op, row, status=400,
                                    error="The form has no valid idempotency key: reload the page and try again.")
        before = partner_balance_view(ctx, row)
        target = f"partner_balance:{row.partner}:{row.type}:{row.currency}"
        try:
            result = await reload_partner_balance(ctx, row, amount, op.username, key)
        except LedgerNotWritable as error:
            await panel.audit(op, "partner_balance.reload", target, "refused: ledger not writable",
                              before=_amounts(before), detail=f"amount {amount}")
            return await render_one(request, op, row, status=503, error=str(error))
        after = partner_balance_view(ctx, row)
        if result is PartnerReloadResult.key_reused:
            await panel.audit(op, "partner_balance.reload", target, "refused: key reused", before=_amounts(before),
                              detail=f"amount {amount}")
            return await render_one(request, op, row, status=409,
                                    error="This form was already used for another amount: reload the page.")
        outcome = "ok" if result is PartnerReloadResult.reloaded else "replayed: nothing moved"
        await panel.audit(op, "partner_balance.reload", target, outcome, before=_amounts(before),
                          after=_amounts(after), detail=f"amount {amount}")
        shown = f"{decimal.Decimal(amount).scaleb(-exponent_of(row.currency))} {row.currency}"
        if result is PartnerReloadResult.replayed:
            flash = f"This reload of {shown} was already applied (the form was sent twice): nothing moved again."
        else:
            flash = f"Reloaded the {row.type} balance of {row.partner} with {shown}."
        return panel.redirect(request, partner_balance_path(row), flash=flash)

    @panel.action("/partner-balances/{partner}/{type}/{currency}/threshold", roles=ADMIN_ONLY)
    async def threshold(request: Request, op: Operator, form: FormData) -> Response:
        row = await find(request)
        if row is None:
            return panel.not_found(request, op, "partner balance")
        typed_threshold = _text(form, "low_threshold")
        value = parse_major(typed_threshold, row.currency)
        if value is None or value > AMOUNT_MAX:
            return await render_one(request, op, row, status=400, typed={"low_threshold": typed_threshold},
                                    error=f"The threshold is a number of {row.currency} at or above 0 with at most "
                                    f"{exponent_of(row.currency)} decimals (0: no notification).")
        fresh = await update_threshold(ctx, row, value)
        await panel.audit(op, "partner_balance.threshold", f"partner_balance:{row.partner}:{row.type}:{row.currency}",
                          "ok", before={"lowThreshold": row.low_threshold}, after={"lowThreshold": fresh.low_threshold})
        return panel.redirect(request, partner_balance_path(row),
                              flash=f"Low-balance threshold of the {row.type} balance of {row.partner} set.")

    @panel.page("/summary", roles=ALL_ROLES)
    async def balance_summary(request: Request, op: Operator) -> Response:
        currencies = summary(ctx.ledger).currencies if ctx.ledger is not None else []
        return panel.render(request, op, "summary.html", currencies=currencies, explanation=SUMMARY_EXPLANATION,
                            exponent_of=exponent_of)


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _amounts(view) -> dict:
    return {"amount": view.amount, "available": view.available, "lowThreshold": view.low_threshold}
