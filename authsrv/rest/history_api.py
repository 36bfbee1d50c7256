"""Transaction history of a balance: `GET .../balances/{balanceId}/transactions?limit=&before=`.

On `/customers/me`, `/secure/customers/{customerId}` and `/admin/customers/{customerId}` (every admin
role). Newest first, `limit` rows (default 20, at most `HISTORY_PAGE_MAX`); the answer's `next` is
the `before` of the following page (a receipt time in ns since 1970), null on the last one.

Where the rows come from (the choice and its bounds):
- Rows are the recent authorizations and declines of the balance's cards, from the in-memory
  activity log (authsrv/hotpath/activity.py): the last `ACTIVITY_PER_CARD_MAX` per card, kept in
  the journal snapshot, so older ones are not listed. It carries what the ledger does not know:
  merchant, MCC, RRN, auth code, response code, declines.
- Status comes from the ledger (the money's truth) at query time: a hold pending -> AUTHORIZED,
  posted -> CLEARED, voided -> REVERSED, expired -> EXPIRED (ledger.hold; once the ledger has
  forgotten a resolved hold, 24 h after it, the balance account's ledger history says how it
  ended); a transaction posted at once (0200, advices, credits) is CLEARED, or REVERSED once fully
  reversed; a decline is DECLINED. When neither source remembers a resolved hold (more than the
  account's last `[ledger] history_per_account_max` ledger events ago, 1,000 by default), a fully
  reversed one is REVERSED and any other CLEARED.
- Amounts: `amount`/`currency` as the transaction was sent (field 4 / 49); `billingAmount`/
  `billingCurrency` what the balance was charged, when that differs; `reversedAmount` released by
  reversals; `clearedAmount` posted by clearing (while the ledger remembers the hold); `fees`.
Management movements (reloads) and unmatched clearing force-posts are not card authorizations and
are not listed here; the balance's `available`/`amount` show their effect.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.hotpath.journal import open_hold_id
from authsrv.hotpath.outcome import Outcome, is_approval
from authsrv.iso.fields import country_from_field43
from authsrv.rest.cards_domain import masked_pan
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
from authsrv.store.db import BalanceRow
from ledger.state import HistoryKind, HoldState

HISTORY_PAGE_MAX = 100
HISTORY_PAGE_DEFAULT = 20
CURSOR_MAX = 2**63 - 1
HISTORY_KEPT_ALL = 2**31  # above any history_per_account_max (config: at most 1,000,000): all that is kept
ACCESS = Access(customer=True, partner=True, admin=ALL_ROLES)

TYPES = {"00": "PURCHASE", "01": "CASH", "09": "PURCHASE_WITH_CASHBACK", "20": "REFUND", "28": "PAYMENT"}
_HOLD_STATUS = {HoldState.pending: "AUTHORIZED", HoldState.posted: "CLEARED", HoldState.voided: "REVERSED",
                HoldState.expired: "EXPIRED"}
_EVENT_STATUS = {HistoryKind.post: "CLEARED", HistoryKind.void: "REVERSED", HistoryKind.expire: "EXPIRED"}


class Transaction(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    id: str  # the authorization's key: MTI class | acquirer | STAN | field 7 | RRN
    time: str  # UTC, ISO 8601
    type: str  # PURCHASE, CASH, PURCHASE_WITH_CASHBACK, REFUND, PAYMENT
    status: str  # AUTHORIZED, CLEARED, REVERSED, EXPIRED, DECLINED
    amount: int  # minor units of `currency`, as sent (field 4)
    currency: str
    billing_amount: int | None = None  # charged to the balance, when it differs from amount/currency
    billing_currency: str | None = None
    reversed_amount: int = 0
    cleared_amount: int | None = None
    fees: int = 0
    merchant_name: str = ""
    mcc: str = ""
    country: str | None = None
    masked_card: str
    card_id: int
    rrn: str
    auth_code: str | None = None
    response_code: str
    decline_reason: str | None = None  # the rule that declined it (e.g. amount_limit_exceeded)


class TransactionPage(msgspec.Struct, frozen=True):
    transactions: list[Transaction]
    next: str | None  # `before` for the next page


class HistoryApi:
    def __init__(self, ctx: RestContext) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def routes(self) -> list[Route]:
        return customer_routes(self.ctx, "/balances/{balanceId}/transactions", self.list, method="GET",
                               access=ACCESS, name="balance.transactions",
                               doc=Doc("A balance's transactions, newest first (paged with limit/before)",
                                       response=TransactionPage, problems=(400, 404)))

    async def list(self, request: Request, call: Call) -> Response:
        paging = _paging(request.query_params)
        if isinstance(paging, str):
            return invalid(paging)
        limit, before = paging
        balance = await self._own_balance(request, call)
        if balance is None:
            return problem(404, Title.BALANCE_NOT_FOUND, "no such balance")
        cards = await self.ctx.in_thread(self.store.cards_of_balance, balance.id)
        return json_response(balance_transactions(self.ctx, balance, cards, limit=limit, before=before))

    async def _own_balance(self, request: Request, call: Call) -> BalanceRow | None:
        balance_id = parse_id(request.path_params["balanceId"])
        if balance_id is None:
            return None
        row = await self.ctx.in_thread(self.store.get_balance, balance_id)
        if row is None or row.user_id != call.user.id or row.partner != call.user.partner:
            return None
        return row


def balance_transactions(ctx: RestContext, balance: BalanceRow, cards: list, *, limit: int = HISTORY_PAGE_DEFAULT,
                         before: int | None = None) -> TransactionPage:
    """A page of the balance's transactions, newest first (`cards`: the balance's cards). Reads the
    in-memory activity log and the ledger: call it on the trio thread, not in a worker thread."""
    assert 1 <= limit <= HISTORY_PAGE_MAX
    by_id = {card.id: card for card in cards}
    journal = getattr(ctx.ledger, "journal", None)
    records = []
    if journal is not None:
        for card_id in by_id:
            records.extend(record for record in journal.activity.of_card(card_id)
                           if before is None or record.timestamp_ns < before)
    records.sort(key=lambda record: record.timestamp_ns, reverse=True)
    page = records[:limit]
    statuses = Statuses(ctx.ledger.ledger, balance.ledger_account_id) if page else None
    rows = [transaction(record, by_id[record.card_id], statuses) for record in page]
    more = len(records) > limit
    return TransactionPage(rows, str(page[-1].timestamp_ns) if more else None)


def _paging(query) -> tuple[int, int | None] | str:
    limit_text, before_text = query.get("limit"), query.get("before")
    limit = HISTORY_PAGE_DEFAULT
    if limit_text is not None:
        if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) <= HISTORY_PAGE_MAX:
            return f"limit must be an integer from 1 to {HISTORY_PAGE_MAX} - at `limit`"
        limit = int(limit_text)
    before = None
    if before_text is not None:
        if not before_text.isascii() or not before_text.isdigit() or len(before_text) > 19 or (
                int(before_text) > CURSOR_MAX):
            return "before must be the `next` value of a previous page - at `before`"
        before = int(before_text)
    return limit, before


class Statuses:
    """Hold states from the ledger; the account's ledger history (read once) for forgotten holds."""

    def __init__(self, ledger, account_id: int) -> None:
        self._ledger = ledger  # ledger.state.Ledger
        self._account_id = account_id
        self._ended: dict[int, str] | None = None

    def of_hold(self, hold_id: int) -> tuple[str | None, int | None]:
        """(status or None if unknown, cleared amount or None)."""
        hold = self._ledger.hold(hold_id)
        if hold is not None:
            return _HOLD_STATUS[hold.state], hold.posted
        if self._ended is None:
            self._ended = {}
            # All the history kept: Ledger.history clamps the limit to the operator's
            # `[ledger] history_per_account_max`, whatever it is.
            for entry in reversed(self._ledger.history(self._account_id, limit=HISTORY_KEPT_ALL)):
                status = _EVENT_STATUS.get(entry.kind)
                if status is not None and entry.pending_id:
                    self._ended[entry.pending_id] = status  # oldest first: the last event wins
        return self._ended.get(hold_id), None


def transaction(record, card, statuses: Statuses) -> Transaction:
    approved = is_approval(Outcome(record.outcome))
    cleared = None
    if not approved:
        status = "DECLINED"
    elif open_hold_id(record):  # the user hold; an external-balance partner's: the collateral hold
        status, cleared = statuses.of_hold(open_hold_id(record))
        status = status or _posted_status(record)
    else:
        status = _posted_status(record)
    amount, currency = record.request_amount, record.request_currency or record.currency
    billing: dict[str, Any] = {}
    if record.currency and (record.currency != currency or record.amount != amount) and record.amount:
        billing = {"billing_amount": record.amount, "billing_currency": record.currency}
    return Transaction(
        id=record.key, time=_iso(record.timestamp_ns), type=TYPES.get(record.processing_code[:2], "OTHER"),
        status=status, amount=amount, currency=currency, reversed_amount=record.reversed_amount,
        cleared_amount=cleared, fees=record.fee, merchant_name=_merchant_name(record.merchant), mcc=record.mcc,
        country=country_from_field43(record.merchant) if record.merchant else None, masked_card=masked_pan(card),
        card_id=card.id, rrn=record.rrn, auth_code=record.auth_code or None, response_code=record.response_code,
        decline_reason=None if approved else Outcome(record.outcome).name, **billing,
    )  # fmt: skip


def _posted_status(record) -> str:
    return "REVERSED" if record.amount and record.reversed_amount >= record.amount else "CLEARED"


def _merchant_name(field43: str) -> str:
    """Field 43 is name (25), city (13), country (2); a shorter one is taken as the name."""
    return field43[:25].strip() if len(field43) == 40 else field43.strip()


def _iso(timestamp_ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp_ns / 1e9, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
