"""Users: search (`/panel/users?q=`) and a user's page (`/panel/users/{customerId}`), every role.

The user's page shows what the REST API's admin channel offers about a customer, read through the
same code: balances with IBANs and booked/available amounts (`balances.balance_view`, from the
ledger), recent transactions per balance (`history_api.balance_transactions`), paired devices,
KYC state and the user's KYC forms (linking to the KYC review pages), and every card of the user,
masked (first 6, last 4), linking to its card page. Reads only: nothing here changes anything.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from authsrv.panel.app import PanelApp, money
from authsrv.panel.security import Operator
from authsrv.panel.views.cards import _exponent, card_facts, transaction_row
from authsrv.rest.balances import balance_view
from authsrv.rest.context import ALL_ROLES, parse_id
from authsrv.rest.history_api import balance_transactions
from authsrv.store import panel_users
from authsrv.store.db import card_visible

TRANSACTIONS_PER_BALANCE = 5
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

    @panel.page("/users/{customerId}", roles=ALL_ROLES)
    async def user(request: Request, op: Operator) -> Response:
        user_id = parse_id(request.path_params["customerId"])
        row = await ctx.in_thread(panel.store.get_user, user_id) if user_id is not None else None
        if row is None:
            return panel.not_found(request, op, "user")
        forms = await ctx.in_thread(panel_users.kyc_forms_of_user, panel.store, row.id)
        balances = await ctx.in_thread(panel.store.balances_of_user, row.id)
        cards = await ctx.in_thread(panel_users.cards_of_user, panel.store, row.id)
        devices = await ctx.in_thread(panel.store.devices_of_user, row.id)
        by_balance: dict[int, list] = {}
        for card in cards:
            by_balance.setdefault(card.balance_id, []).append(card)
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
            shown.append({
                "row": balance, "booked": money(amounts.amount, exp) if amounts else "",
                "available": money(amounts.available, exp) if amounts else "",
                "held": money(amounts.amount - amounts.available, exp) if amounts else "",
                "transactions": transactions,
            })
        return panel.render(
            request, op, "user.html", user=row, forms=forms, balances=shown,
            cards=[card_facts(card) for card in cards], devices=devices, badges=KYC_STATE_BADGES,
        )
