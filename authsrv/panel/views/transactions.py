"""Transactions: search (`/panel/transactions`) and one transaction's page (`/panel/transactions/{id}`).

Where the rows come from is explained in authsrv/panel/txindex.py: card activity for searches that
name a card or a customer (the last 100 authorizations of each card, durable), and the panel's
index of the newest INDEX_MAX records across all cards for RRN, authorization code, response code
and dates. Statuses and amounts are the REST history's (`history_api.transaction`).

A card is searched by its masked PAN (first 6 and last 4: `123456******1234`, `123456...1234`). A
full PAN typed into the form is looked up by its HMAC index and answered with a redirect to the
search by card id, so the number leaves the address bar at once and no page ever shows it.
"""

from __future__ import annotations

import datetime
import re
import urllib.parse

import attrs
from starlette.datastructures import QueryParams
from starlette.requests import Request

from authsrv import cardsec
from authsrv.clearing.plan import ClearingCode
from authsrv.hotpath.activity import shown
from authsrv.hotpath.context import External
from authsrv.hotpath.fees import FeeCode
from authsrv.hotpath.journal import AuthRecord
from authsrv.hotpath.outcome import RESPONSE, Outcome, is_approval
from authsrv.hotpath.steps import TransferCode
from authsrv.iso import currency
from authsrv.iso.fields import country_from_field43
from authsrv.panel.app import PanelApp
from authsrv.panel.txindex import TransactionIndex
from authsrv.rest.cards_domain import masked_pan
from authsrv.rest.context import ALL_ROLES, parse_id
from authsrv.rest.history_api import Statuses, transaction
from authsrv.store import panel_transactions as queries
from authsrv.store.db import CardRow, ManagementTransferCode
from ledger.state import HistoryKind, HoldState, Side

PAGE_SIZE = 50
CANDIDATES_MAX = 20_000  # records examined for one card- or name-scoped search
SEARCH_TEXT_MAX = 40
DAY_NS = 86_400 * 10**9
# A transaction's ledger events: those of its balance account (and its partner's collateral account)
# from its receipt on, newest first, at most this many per account (history is kept per account).
LEDGER_EVENTS_SCANNED_MAX = 20_000
LEDGER_EVENTS_PAGE = 1_000
EVENTS_MARGIN_NS = 60 * 10**9  # ledger events are stamped after the request's receipt
MASKED_PAN = re.compile(r"([0-9]{6})(?:\*+|\.{2,}|\u2026|[xX]+|#+)([0-9]{4})")
FULL_PAN = re.compile(r"[0-9]{12,19}")
RRN = re.compile(r"[A-Za-z0-9]{1,12}")
AUTH_CODE = re.compile(r"[A-Za-z0-9]{1,6}")
RESPONSE_CODE = re.compile(r"[0-9A-Z]{2}")

# Field 39 as docs/contract.md (wire profile, response codes) lists them.
RESPONSE_MEANINGS = {
    "00": "Approved",
    "10": "Approved for a partial amount",
    "05": "Card locked: pending query or consolidation",
    "12": "Unsupported processing code or MTI",
    "13": "Invalid amount",
    "14": "Unknown PAN, removed or replaced card",
    "25": "Original transaction not found",
    "30": "Format error",
    "41": "Card locked: lost",
    "43": "Card locked: stolen",
    "51": "Insufficient funds (user balance, or the partner's deposit or credit balance)",
    "54": "Card expired, or not the card's expiry date",
    "55": "Wrong PIN",
    "57": "Transaction not permitted (MCC, country, channel, or currency without conversion)",
    "59": "Card locked: suspected fraud",
    "61": "Spend limit exceeded (amount)",
    "65": "Spend limit exceeded (count)",
    "75": "PIN tries exceeded",
    "78": "Card inactive or not yet activated",
    "91": "Stand-in decline: the latency budget ran out, or the write-ahead log could not be written",
    "96": "Internal error",
    "N7": "Wrong CVC2",
}
RESPONSE_CODES = sorted({code for code, _ in RESPONSE.values()})
EXTERNAL = {
    External.none: "",
    External.approved: "the partner approved",
    External.declined: "the partner declined",
    External.timed_out: "the partner did not answer within the budget",
    External.failed: "the partner failed (5xx or no connection)",
    External.in_flight: "the partner call was under way",
    External.deferred: "the partner is told by the outbox",
}
KINDS = {HistoryKind.hold: "hold", HistoryKind.post: "post", HistoryKind.void: "void",
         HistoryKind.expire: "expire", HistoryKind.transfer: "transfer"}
HOLD_STATES = {HoldState.pending: "pending", HoldState.posted: "posted", HoldState.voided: "voided",
               HoldState.expired: "expired"}


def _code_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for prefix, source in (("", TransferCode), ("fee ", FeeCode), ("clearing ", ClearingCode)):
        for name, value in vars(source).items():
            if isinstance(value, int) and not name.startswith("_"):
                names[value] = prefix + name.replace("_", " ")
    for member in ManagementTransferCode:
        names[int(member)] = member.name.replace("_", " ")
    return names


CODE_NAMES = _code_names()
CLEARING_CODES = frozenset(value for name, value in vars(ClearingCode).items()
                           if isinstance(value, int) and not name.startswith("_"))


@attrs.frozen
class Search:
    pan: str = ""  # masked, as shown back: never a full PAN
    first6: str = ""
    last4: str = ""
    card_id: int | None = None
    customer_id: int | None = None
    rrn: str = ""
    auth_code: str = ""
    response_code: str = ""
    date_from: datetime.date | None = None
    date_to: datetime.date | None = None
    before: str = ""

    @property
    def empty(self) -> bool:
        return not (self.first6 or self.card_id or self.customer_id or self.rrn or self.auth_code
                    or self.response_code or self.date_from or self.date_to)

    def params(self, **changes) -> str:
        """The query string of this search (with `changes`): never a full PAN."""
        values = {"pan": self.pan, "card": self.card_id or "", "customer": self.customer_id or "", "rrn": self.rrn,
                  "auth": self.auth_code, "code": self.response_code,
                  "from": self.date_from.isoformat() if self.date_from else "",
                  "to": self.date_to.isoformat() if self.date_to else "", "before": self.before}
        values.update(changes)
        return urllib.parse.urlencode({name: value for name, value in values.items() if value not in ("", None)})


def parse_search(query: QueryParams) -> tuple[Search, list[str], str]:
    """(search, errors, full PAN typed or ''). Errors name the field, never echo a value."""
    errors: list[str] = []
    fields: dict = {}
    full_pan = ""

    def text(name: str) -> str:
        value = query.get(name, "")
        return value.strip()[:SEARCH_TEXT_MAX + 1] if isinstance(value, str) else ""

    pan = re.sub(r"[\s-]", "", text("pan"))
    if pan:
        if FULL_PAN.fullmatch(pan):
            full_pan = pan
            fields.update(pan=_mask(pan))
        elif (found := MASKED_PAN.fullmatch(pan)) is not None:
            fields.update(pan=f"{found[1]}******{found[2]}", first6=found[1], last4=found[2])
        else:
            errors.append("Masked PAN: enter the first 6 and the last 4 digits, e.g. 123456******1234 or 123456...1234.")
    for name, key in (("card", "card_id"), ("customer", "customer_id")):
        if value := text(name):
            parsed = parse_id(value)
            if parsed is None:
                errors.append(f"{'Card id' if name == 'card' else 'Customer id'}: enter a number.")
            else:
                fields[key] = parsed
    if rrn := text("rrn"):
        if RRN.fullmatch(rrn):
            fields["rrn"] = rrn
        else:
            errors.append("RRN: up to 12 letters or digits.")
    if auth := text("auth"):
        if AUTH_CODE.fullmatch(auth):
            fields["auth_code"] = auth
        else:
            errors.append("Authorization code: up to 6 letters or digits.")
    if code := text("code").upper():
        if RESPONSE_CODE.fullmatch(code):
            fields["response_code"] = code
        else:
            errors.append("Response code: two characters, e.g. 00 or 51.")
    for name, key, label in (("from", "date_from", "From"), ("to", "date_to", "To")):
        if value := text(name):
            try:
                fields[key] = datetime.date.fromisoformat(value)
            except ValueError:
                errors.append(f"{label}: a date as YYYY-MM-DD.")
    if fields.get("date_from") and fields.get("date_to") and fields["date_from"] > fields["date_to"]:
        errors.append("Dates: From is after To.")
    if before := text("before"):
        if re.fullmatch(r"[ts][0-9]{1,19}", before):
            fields["before"] = before
        else:
            errors.append("Page: follow the Older link to page on.")
    return Search(**fields), errors, full_pan


def _mask(pan: str) -> str:
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def _day_ns(day: datetime.date) -> int:
    moment = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
    return int(moment.timestamp()) * 10**9


@attrs.frozen
class Row:
    record: AuthRecord
    view: object  # history_api.Transaction
    card_id: int
    link: str


def register(panel: PanelApp) -> None:
    index = TransactionIndex()

    def journal():
        found = getattr(panel.ctx.ledger, "journal", None)
        index.follow(found)  # seeds once; again after a takeover replaced the journal
        return found

    journal()  # seed at start (the server's startup, before the panel answers anything)

    @panel.page("/transactions", roles=ALL_ROLES)
    async def search_page(request: Request, op):
        search, errors, full_pan = parse_search(request.query_params)
        note = ""
        if full_pan and not errors:
            vault = cardsec.PanVault(panel.ctx.keys) if panel.ctx.keys is not None else None
            card = None if vault is None else await panel.ctx.in_thread(
                panel.store.card_by_pan_index, vault.index(full_pan))
            if card is not None:  # the number leaves the address bar: search by the card's id instead
                target = attrs.evolve(search, pan="", first6="", last4="", card_id=card.id, before="")
                return panel.redirect(request, "/panel/transactions?" + target.params())
            note = "No card has this number."
        rows, next_cursor, cards_named = [], None, []
        if not errors and not note:  # no criterion: the newest transactions across all cards
            rows, next_cursor, cards_named = await _search(panel, journal(), index, search)
        status = 400 if errors else 200
        return panel.render(
            request, op, "transactions.html", status=status, search=search, errors=errors, note=note, rows=rows,
            cards_named=cards_named, codes=RESPONSE_CODES, meanings=RESPONSE_MEANINGS,
            next_url=("/panel/transactions?" + search.params(before=next_cursor)) if next_cursor else "",
            first_url=("/panel/transactions?" + search.params(before="")) if search.before else "",
            index_size=len(index), index_max=index.capacity, page_size=PAGE_SIZE, exponent=exponent)

    @panel.page("/transactions/{key}", roles=ALL_ROLES)
    async def transaction_page(request: Request, op):
        key = request.path_params["key"]
        card_hint = parse_id(request.query_params.get("card", ""))
        current = journal()
        record = _find(index, current, key, card_hint)
        if record is None or not record.card_id:
            return panel.not_found(request, op, "transaction (it may be older than what is kept)")
        details = await panel.ctx.in_thread(_store_details, panel.store, record)
        if details is None:
            return panel.not_found(request, op, "card for this transaction")
        card, account_id = details
        ledger = panel.ctx.ledger.ledger
        view = transaction(record, card, Statuses(ledger, account_id))
        holds = [hold_id for hold_id in dict.fromkeys((record.user_hold_id, record.collateral_hold_id)) if hold_id]
        entries = _ledger_entries(ledger, record, account_id, holds)
        # Clearing rows are found near the times clearing moved this transaction's money; when the
        # ledger has forgotten a hold, among the newest rows (queries.CLEARING_ROWS_SCANNED_MAX).
        cleared_at = sorted({entry.timestamp_ns for entry in entries if entry.code_value in CLEARING_CODES})
        forgotten = any(ledger.hold(hold_id) is None for hold_id in holds)
        clearing = await panel.ctx.in_thread(queries.clearing_rows_of_holds, panel.store, holds,
                                             around_ns=cleared_at, newest=forgotten)
        return panel.render(
            request, op, "transaction.html", record=record, view=view, card=card, masked=masked_pan(card),
            meaning=RESPONSE_MEANINGS.get(record.response_code, "Not a code of the wire profile"),
            rule=Outcome(record.outcome).name.replace("_", " "), approved=is_approval(Outcome(record.outcome)),
            external=_external(record.external), holds=[_hold(ledger, hold_id, record) for hold_id in holds],
            entries=entries, clearing=clearing,
            merchant=_merchant(record.merchant), country=country_from_field43(record.merchant) if record.merchant
            else None, when=_iso(record.timestamp_ns), exponent=exponent)


async def _search(panel: PanelApp, journal, index: TransactionIndex, search: Search
                  ) -> tuple[list[Row], str | None, list[str]]:
    """A page of rows, the next page's cursor, and the masked PANs of the cards the search named."""
    if journal is None:
        return [], None, []
    lower = _day_ns(search.date_from) if search.date_from else None
    upper = _day_ns(search.date_to) + DAY_NS if search.date_to else None
    card_ids: set[int] | None = None
    cards_named: list[str] = []
    if search.first6 or search.card_id or search.customer_id:
        cards = await panel.ctx.in_thread(_cards_of, panel.store, search)
        card_ids = {card.id for card in cards}
        cards_named = [f"{masked_pan(card)} (card {card.id})" for card in cards]

    def keep(record: AuthRecord) -> bool:
        return ((card_ids is None or record.card_id in card_ids)
                and (not search.rrn or record.rrn == search.rrn)
                and (not search.auth_code or record.auth_code == search.auth_code)
                and (not search.response_code or record.response_code == search.response_code)
                and (lower is None or record.timestamp_ns >= lower)
                and (upper is None or record.timestamp_ns < upper))

    if card_ids is None and not search.rrn and not search.auth_code:
        # Across all cards by response code or dates: walk the index, newest first.
        before = int(search.before[1:]) if search.before.startswith("s") else None
        records, cursor = await index.scan(keep, before_seq=before, limit=PAGE_SIZE)
        next_cursor = f"s{cursor}" if cursor is not None else None
    else:
        if card_ids is not None:
            candidates = [record for card_id in sorted(card_ids) for record in journal.activity.of_card(card_id)]
        elif search.rrn:
            candidates = index.by_rrn(search.rrn) + journal.open_authorizations(search.rrn) + (
                journal.closed_authorizations(search.rrn))
        else:
            candidates = index.by_auth_code(search.auth_code)
        latest: dict[str, AuthRecord] = {}
        for record in candidates[:CANDIDATES_MAX]:
            newest = index.get(record.key) or journal.get(record.key) or record
            if keep(newest) and shown(newest):
                latest[newest.key] = newest
        before = int(search.before[1:]) if search.before.startswith("t") else None
        ordered = sorted((record for record in latest.values() if before is None or record.timestamp_ns < before),
                         key=lambda record: record.timestamp_ns, reverse=True)
        records = ordered[:PAGE_SIZE]
        next_cursor = f"t{records[-1].timestamp_ns}" if len(ordered) > PAGE_SIZE else None
    rows = await _rows(panel, records)
    return rows, next_cursor, cards_named


def _cards_of(store, search: Search) -> list[CardRow]:
    """The cards a search names (masked PAN, card id, customer); all of them when several are given."""
    found: dict[int, CardRow] | None = None
    if search.first6:
        found = {card.id: card for card in queries.cards_by_masked_pan(store, search.first6, search.last4)}
    if search.card_id:
        card = store.get_card(search.card_id)
        named = {card.id: card} if card is not None else {}
        found = named if found is None else {key: value for key, value in found.items() if key in named}
    if search.customer_id:
        owned = {card.id: card for card in store.cards_of_user(search.customer_id)}
        found = owned if found is None else {key: value for key, value in found.items() if key in owned}
    return list((found or {}).values())[:queries.CARDS_MATCHED_MAX]


async def _rows(panel: PanelApp, records: list[AuthRecord]) -> list[Row]:
    if not records:
        return []
    cards = await panel.ctx.in_thread(_cards_and_accounts, panel.store, {record.card_id for record in records})
    ledger = panel.ctx.ledger.ledger
    statuses: dict[int, Statuses] = {}
    rows = []
    for record in records:
        found = cards.get(record.card_id)
        if found is None:
            continue
        card, account_id = found
        status = statuses.setdefault(account_id, Statuses(ledger, account_id))
        rows.append(Row(record, transaction(record, card, status), card.id, _link(record)))
    return rows


def _cards_and_accounts(store, card_ids: set[int]) -> dict[int, tuple[CardRow, int]]:
    found = {}
    for card_id in card_ids:  # bounded: one page's cards
        card = store.get_card(card_id)
        balance = store.get_balance(card.balance_id) if card is not None else None
        if card is not None and balance is not None:
            found[card_id] = (card, balance.ledger_account_id)
    return found


def _store_details(store, record: AuthRecord) -> tuple[CardRow, int] | None:
    return _cards_and_accounts(store, {record.card_id}).get(record.card_id)


def _link(record: AuthRecord) -> str:
    return f"/panel/transactions/{urllib.parse.quote(record.key, safe='')}?card={record.card_id}"


def _find(index: TransactionIndex, journal, key: str, card_id: int | None) -> AuthRecord | None:
    if len(key) > 100:
        return None
    found = index.get(key)
    if found is None and journal is not None:
        found = journal.get(key)
        if found is None and card_id is not None:
            found = next((record for record in journal.activity.of_card(card_id) if record.key == key), None)
        if found is None:
            rrn = key.rsplit("|", 1)[-1]
            found = next((record for record in journal.open_authorizations(rrn) + journal.closed_authorizations(rrn)
                          if record.key == key), None)
    return found


@attrs.frozen
class HoldRow:
    id: int
    which: str
    state: str
    amount: int
    posted: int
    released: int
    remaining: int
    currency: str
    deadline: str


def _hold(ledger, hold_id: int, record: AuthRecord) -> HoldRow:
    which = "user hold" if hold_id == record.user_hold_id else "collateral hold"
    hold = ledger.hold(hold_id)
    if hold is None:
        return HoldRow(hold_id, which, "resolved (no longer kept by the ledger)", 0, 0, 0, 0, "", "")
    return HoldRow(hold_id, which, HOLD_STATES[hold.state], hold.amount, hold.posted, hold.released, hold.remaining,
                   hold.currency, _iso(hold.deadline_ns) if hold.deadline_ns else "never")


@attrs.frozen
class EntryRow:
    timestamp_ns: int
    when: str
    kind: str
    side: str
    amount: int
    released: int
    code: str
    transfer_id: int
    pending_id: int
    counterparty: int
    forced: bool
    code_value: int


def _ledger_entries(ledger, record: AuthRecord, account_id: int, holds: list[int]) -> list[EntryRow]:
    """The balance account's ledger events of this transaction (its hold, fee, posts, voids, expiry,
    clearing), oldest first; the collateral hold's events from the partner's account. Bounded by
    what the ledger keeps per account (`[ledger] history_per_account_max`) and by
    LEDGER_EVENTS_SCANNED_MAX events read per account from the newest back to the transaction."""
    wanted = set(holds)
    found: dict[tuple[int, int, int], EntryRow] = {}
    accounts = [account_id]
    collateral = ledger.hold(record.collateral_hold_id) if record.collateral_hold_id else None
    if collateral is not None:
        accounts.append(collateral.debit_account_id)
    for account in accounts:
        for entry in _events_since(ledger, account, record.timestamp_ns - EVENTS_MARGIN_NS):
            mine = entry.transfer_id in wanted or entry.pending_id in wanted or (
                account == account_id and entry.reference == record.rrn and record.rrn != "")
            if mine:
                found[(entry.timestamp_ns, entry.transfer_id, account)] = EntryRow(
                    entry.timestamp_ns, _iso(entry.timestamp_ns), KINDS.get(entry.kind, str(entry.kind)),
                    "debit" if entry.side is Side.debit else "credit", entry.amount, entry.released,
                    CODE_NAMES.get(entry.code, str(entry.code)), entry.transfer_id, entry.pending_id,
                    entry.counterparty_account_id, entry.forced, entry.code)
    return [found[key] for key in sorted(found)]


def exponent(code: str) -> int:
    """Minor-unit digits of a currency for the `money` filter (2 when unknown)."""
    known = currency.by_alpha(code) if code else None
    return known.exponent if known is not None and known.exponent is not None else 2


def _external(value: int) -> str:
    try:
        return EXTERNAL[External(value)]
    except ValueError:
        return f"partner answer {value}"


def _events_since(ledger, account_id: int, since_ns: int):
    """The account's kept ledger events from `since_ns` on, newest first, at most
    LEDGER_EVENTS_SCANNED_MAX (a partner's collateral account sees every card's holds)."""
    before = None
    scanned = 0
    while scanned < LEDGER_EVENTS_SCANNED_MAX:
        page = ledger.history(account_id, before_timestamp_ns=before, limit=LEDGER_EVENTS_PAGE)
        for entry in page:
            if entry.timestamp_ns < since_ns:
                return
            yield entry
        scanned += len(page)
        if len(page) < LEDGER_EVENTS_PAGE:
            return
        before = page[-1].timestamp_ns


def _merchant(field43: str) -> str:
    return field43[:25].strip() if len(field43) == 40 else field43.strip()


def _iso(timestamp_ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp_ns / 1e9, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"
