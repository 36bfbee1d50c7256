"""Cards: `/panel/cards/{cardId}` with the card's facts, spend controls and history, and its actions.

    page / action                         roles
    GET  /panel/cards/{cardId}            Admin, Manager, Employee
    POST /panel/cards/{cardId}/lock       Admin, Manager, Employee (contract: every role may lock)
    POST /panel/cards/{cardId}/unlock     Admin, Manager
    POST /panel/cards/{cardId}/remove     Admin, Manager (with a required confirmation checkbox)
    POST /panel/cards/{cardId}/controls   the limits API's admin roles for PUT (Admin, Manager)

Each action calls what the REST handler calls: `CardService.lock/unlock/remove` of the server's one
`CardsApi` (in a worker thread, with the card's owner), or `limits_api.save_card_controls` with a
spec decoded by the REST decoder (`decode_spec`). The store updates the switch's index when the
change commits, so the next authorization sees it before the page answers, and the same partner
event is recorded in the same transaction. Each action writes an audit entry with the values
before and after. Only the masked PAN (first 6, last 4) is ever shown.
"""

from __future__ import annotations

import decimal
import json
import logging
import re
import urllib.parse
from typing import Any

import msgspec
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from authsrv.hotpath.limits import MCC_GROUPS, ControlsSpec, decode_spec
from authsrv.iso.currency import exponent as currency_exponent
from authsrv.panel.app import PanelApp, money
from authsrv.panel.security import Operator
from authsrv.rest.cards import _PROBLEMS, MANAGERS, CardsApi, LockRequest
from authsrv.rest.cards_domain import STATUS_NAMES, CardResult, CardService, masked_pan
from authsrv.rest.context import ALL_ROLES, parse_id
from authsrv.rest.history_api import Transaction, balance_transactions
from authsrv.rest.limits_api import ACCESS as LIMITS_ACCESS
from authsrv.rest.limits_api import card_usage, save_card_controls, stored_controls, view
from authsrv.store import panel_users
from authsrv.store.db import CardRow, EventRow, UserRow, card_visible
from authsrv.store.index import IRREVERSIBLE_LOCK_REASONS, CardStatus, LockReason

log = logging.getLogger("authsrv.panel")

LOCK_ROLES = ALL_ROLES
UNLOCK_ROLES = MANAGERS
REMOVE_ROLES = MANAGERS
CONTROLS_ROLES = LIMITS_ACCESS["put"].admin
DEFAULT_LOCK_REASON = LockReason.pending_query  # the mildest: reversible, declines with 05
CARD_TRANSACTIONS_SHOWN = 20

# The reference documents' lock reasons (authsrv.store.index.LockReason, docs/api.md).
LOCK_REASON_LABELS: dict[int, str] = {
    LockReason.lost: "Lost",
    LockReason.stolen: "Stolen",
    LockReason.pending_query: "Pending query",
    LockReason.consolidation: "Consolidation",
    LockReason.inactive: "Inactive",
    LockReason.pin_tries_exceeded: "PIN tries exceeded",
    LockReason.suspected_fraud: "Suspected fraud",
    LockReason.replaced: "Replaced",
}
assert set(LOCK_REASON_LABELS) == set(LockReason) - {LockReason.none}
CARD_TYPE_LABELS = {"virtual": "Virtual", "physical": "Physical", "digital_first": "Digital first"}
CHANNELS = ("ecommerce", "atm", "contactless", "magstripe")
CHANNEL_LABELS = {"ecommerce": "E-commerce", "atm": "ATM", "contactless": "Contactless", "magstripe": "Magnetic stripe"}
MCC_GROUP_LABELS = {"gambling": "Gambling", "adult": "Adult", "crypto": "Crypto and quasi-cash",
                    "money_transfer": "Money transfer", "alcohol_tobacco": "Alcohol and tobacco"}
assert set(MCC_GROUP_LABELS) == set(MCC_GROUPS)
AMOUNT_FIELDS = {"per_transaction": "Per transaction", "daily_amount": "Daily amount",
                 "monthly_amount": "Monthly amount"}
COUNT_FIELDS = {"daily_count": "Daily count", "monthly_count": "Monthly count"}
# msgspec's error paths -> the form's labels
SPEC_PATH_LABELS = {"$.perTransaction": "Per transaction", "$.daily.amount": "Daily amount",
                    "$.daily.count": "Daily count", "$.monthly.amount": "Monthly amount",
                    "$.monthly.count": "Monthly count", "$.blockedMccs": "Blocked MCCs",
                    "$.blockedCountries": "Blocked countries", "$.blockedMccGroups": "Blocked MCC groups"}
_AMOUNT = re.compile(r"^[0-9]{1,13}(\.[0-9]*)?$")
_LIST_SPLIT = re.compile(r"[\s,;]+")
FORM_TEXT_MAX = 4_000


def lock_reason_label(reason: int) -> str:
    return LOCK_REASON_LABELS.get(reason, "") if reason else ""


def status_name(card: CardRow) -> str:
    return STATUS_NAMES[CardStatus(card.status)]


def card_facts(card: CardRow) -> dict[str, Any]:
    """What a page shows of a card: never more of the PAN than first 6 and last 4."""
    return {
        "id": card.id, "masked_pan": masked_pan(card), "type": CARD_TYPE_LABELS.get(card.card_type, card.card_type),
        "status": status_name(card), "lock_reason": card.lock_reason, "lock_label": lock_reason_label(card.lock_reason),
        "irreversible": card.status == CardStatus.locked and card.lock_reason in IRREVERSIBLE_LOCK_REASONS,
        "expiry": f"{card.expiry_yymm[2:]}/{card.expiry_yymm[:2]}", "balance_id": card.balance_id,
        "user_id": card.user_id, "partner": card.partner, "config_id": card.config_id,
        "order_state": card.order_state, "visible": card_visible(card), "created_at": card.created_at,
        "wrong_pin_count": card.wrong_pin_count,
    }  # fmt: skip


def card_state(card: CardRow) -> dict[str, Any]:
    """The audit log's before/after of a lifecycle action."""
    return {"status": status_name(card), "lockReason": card.lock_reason}


def plain_amount(minor: int | None, exp: int) -> str:
    if minor is None:
        return ""
    if exp == 0:
        return str(minor)
    whole, fraction = divmod(minor, 10**exp)
    return f"{whole}.{fraction:0{exp}d}"


class FormError(Exception):
    """A field of the spend-controls form is not valid: the message names it."""


def parse_amount(text: str, exp: int, label: str, *, empty: str = "") -> int | None:
    """'150', '150.5', '1,500.50' in major units -> minor units; None for ''; FormError else."""
    value = text.strip().replace(",", "").replace(" ", "")
    if not value:
        return None
    if not _AMOUNT.match(value):
        example = "150" if exp == 0 else f"150 or 150.{'0' * exp}"
        raise FormError(f"{label}: a positive amount such as {example}{', ' + empty if empty else ''}.")
    minor = decimal.Decimal(value).scaleb(exp)
    if minor != minor.to_integral_value():
        raise FormError(f"{label}: at most {exp} decimals in this currency.")
    return int(minor)


def controls_from_form(form: FormData, exp: int) -> ControlsSpec:
    """The form's fields as the REST body, decoded (validated) by the REST API's decoder."""
    body: dict[str, Any] = {}

    def text(name: str) -> str:
        value = form.get(name)
        return value.strip() if isinstance(value, str) else ""

    def amount(name: str) -> int | None:
        return parse_amount(text(name), exp, AMOUNT_FIELDS[name], empty="or empty for no limit")

    def count(name: str) -> int | None:
        value = text(name)
        if not value:
            return None
        if not value.isascii() or not value.isdigit() or len(value) > 12:
            raise FormError(f"{COUNT_FIELDS[name]}: a whole number of payments, or empty for no limit.")
        return int(value)

    def listed(name: str, label: str) -> list[str]:
        value = text(name)
        if len(value) > FORM_TEXT_MAX:
            raise FormError(f"{label}: too long.")
        return [item for item in _LIST_SPLIT.split(value) if item]

    body["perTransaction"] = amount("per_transaction")
    body["daily"] = {"amount": amount("daily_amount"), "count": count("daily_count")}
    body["monthly"] = {"amount": amount("monthly_amount"), "count": count("monthly_count")}
    body["blockedMccs"] = listed("blocked_mccs", "Blocked MCCs")
    body["blockedCountries"] = [item.upper() for item in listed("blocked_countries", "Blocked countries")]
    groups = [value for value in form.getlist("blocked_mcc_groups") if isinstance(value, str)]
    body["blockedMccGroups"] = groups
    body["channels"] = {channel: form.get(f"channel_{channel}") == "on" for channel in CHANNELS}
    try:
        return decode_spec(msgspec.json.encode(body))
    except msgspec.DecodeError as error:  # names the path and the rule, never echoes a value
        message = str(error)
        for path, label in sorted(SPEC_PATH_LABELS.items(), key=lambda item: -len(item[0])):
            if path in message:
                rule = message.split(" - at ")[0]
                raise FormError(f"{label}: {rule}.") from None
        raise FormError(f"Spend controls: {message}.") from None


def controls_values(spec: ControlsSpec, exp: int) -> dict[str, Any]:
    """The form's field values showing `spec`."""
    return {
        "per_transaction": plain_amount(spec.per_transaction, exp),
        "daily_amount": plain_amount(spec.daily.amount, exp), "daily_count": _str(spec.daily.count),
        "monthly_amount": plain_amount(spec.monthly.amount, exp), "monthly_count": _str(spec.monthly.count),
        "blocked_mccs": ", ".join(spec.blocked_mccs), "blocked_countries": ", ".join(spec.blocked_countries),
        "blocked_mcc_groups": [str(group) for group in spec.blocked_mcc_groups],
        "channels": {channel: bool(getattr(spec.channels, channel)) for channel in CHANNELS},
    }  # fmt: skip


def controls_values_from_form(form: FormData) -> dict[str, Any]:
    """What the operator typed, to show again with the error."""
    def text(name: str) -> str:
        value = form.get(name)
        return value[:FORM_TEXT_MAX] if isinstance(value, str) else ""

    return {
        **{name: text(name) for name in (*AMOUNT_FIELDS, *COUNT_FIELDS, "blocked_mccs", "blocked_countries")},
        "blocked_mcc_groups": [value for value in form.getlist("blocked_mcc_groups") if isinstance(value, str)],
        "channels": {channel: form.get(f"channel_{channel}") == "on" for channel in CHANNELS},
    }


def _str(value: int | None) -> str:
    return "" if value is None else str(value)


def _exponent(currency: str) -> int:
    try:
        return currency_exponent(currency)
    except (KeyError, ValueError):
        return 2


def transaction_href(row: Transaction) -> str:
    """The transaction's page: the history API's id (the authorization's key), and its card as a
    hint for finding it once the journal has forgotten it."""
    return f"/panel/transactions/{urllib.parse.quote(row.id, safe='')}?card={row.card_id}"


def transaction_row(row: Transaction) -> dict[str, Any]:
    """A history row for a template: the REST history's fields, amounts formatted, the link."""
    amount = money(row.amount, _exponent(row.currency))
    billing = ""
    if row.billing_amount is not None and row.billing_currency:
        billing = f"{money(row.billing_amount, _exponent(row.billing_currency))} {row.billing_currency}"
    return {"t": row, "amount": f"{amount} {row.currency}", "billing": billing, "href": transaction_href(row),
            "time": row.time.replace("T", " ").rstrip("Z")}


def event_row(event: EventRow) -> dict[str, Any]:
    """A card event for the history table: what changed, from its body (masked PAN at most)."""
    try:
        body = json.loads(event.body)
    except ValueError:
        body = {}
    details = []
    if isinstance(body, dict):
        if body.get("status"):
            details.append(f"status {body['status']}")
        if body.get("reason"):
            details.append(f"reason {body['reason']} ({lock_reason_label(int(body['reason']))})"
                           if str(body["reason"]).isdigit() else f"reason {body['reason']}")
        if body.get("by"):
            details.append(f"by {body['by']}")
        if isinstance(body.get("limits"), dict):
            details.append("spend controls replaced")
    return {"at": event.created_at, "kind": event.kind, "details": ", ".join(details)}


def refusal_message(result: CardResult) -> str:
    _, title, detail = _PROBLEMS[result]
    return f"Refused ({title}): {detail}."


def register(panel: PanelApp) -> None:
    ctx = panel.ctx

    def service() -> CardService:
        return CardsApi.of(ctx).service  # the server's one instance, shared with the REST handlers

    async def load(request: Request) -> tuple[CardRow, UserRow] | None:
        card_id = parse_id(request.path_params["cardId"])
        card = await ctx.in_thread(panel.store.get_card, card_id) if card_id is not None else None
        if card is None:
            return None
        owner = await ctx.in_thread(panel.store.get_user, card.user_id)
        return (card, owner) if owner is not None else None

    async def render_card(request: Request, op: Operator, card: CardRow, owner: UserRow, *, status: int = 200,
                          error: str = "", controls_form: dict[str, Any] | None = None) -> Response:
        balance = await ctx.in_thread(panel.store.get_balance, card.balance_id)
        currency = balance.currency if balance is not None else ""
        exp = _exponent(currency) if currency else 2
        spec = await ctx.in_thread(stored_controls, panel.store, "card", card.id)
        usage = card_usage(ctx, card)
        limits = view(spec, [usage])
        audit = await ctx.in_thread(panel_users.card_audit, panel.store, card.id)
        events = [event_row(event) for event in await ctx.in_thread(panel_users.card_events, panel.store, card.id)]
        transactions = []
        if balance is not None and ctx.ledger is not None:
            page = balance_transactions(ctx, balance, [card], limit=CARD_TRANSACTIONS_SHOWN)
            transactions = [transaction_row(row) for row in page.transactions]
        facts = card_facts(card)
        return panel.render(
            request, op, "card.html", status=status, card=facts, owner=owner, balance=balance, currency=currency,
            exp=exp, limits=limits, controls=controls_form or controls_values(spec, exp), error=error,
            audit=audit, events=events, transactions=transactions, reasons=sorted(LOCK_REASON_LABELS.items()),
            default_reason=int(DEFAULT_LOCK_REASON), irreversible_reasons=sorted(int(r) for r in IRREVERSIBLE_LOCK_REASONS),
            can_lock=facts["visible"] and op.role in LOCK_ROLES,  # locked already: the reason can change
            can_unlock=(facts["visible"] and op.role in UNLOCK_ROLES and card.status == CardStatus.locked
                        and not facts["irreversible"]),
            can_remove=facts["visible"] and op.role in REMOVE_ROLES,
            can_edit_controls=facts["visible"] and op.role in CONTROLS_ROLES,
            channels=[(channel, CHANNEL_LABELS[channel]) for channel in CHANNELS],
            mcc_groups=sorted(MCC_GROUP_LABELS.items()),
        )  # fmt: skip

    def card_path(card: CardRow) -> str:
        return f"/panel/cards/{card.id}"

    @panel.page("/cards/{cardId}", roles=ALL_ROLES)
    async def card_page(request: Request, op: Operator) -> Response:
        loaded = await load(request)
        if loaded is None:
            return panel.not_found(request, op, "card")
        return await render_card(request, op, *loaded)

    async def lifecycle(request: Request, op: Operator, action: str, change, *args) -> Response | CardRow:
        """Run one CardService change for the card's owner and audit it: the changed card, or the
        page to answer (a refusal, re-rendered with its reason)."""
        loaded = await load(request)
        if loaded is None:
            return panel.not_found(request, op, "card")
        card, owner = loaded
        target = panel_users.card_target(card.id)
        result, changed = await ctx.in_thread(change, owner, card.id, *args)
        if changed is None:
            message = refusal_message(result)
            await panel.audit(op, f"card.{action}", target, f"refused: {_PROBLEMS[result][1]}",
                              before=card_state(card), after=card_state(card), detail=message)
            fresh = await ctx.in_thread(panel.store.get_card, card.id) or card
            return await render_card(request, op, fresh, owner, status=_PROBLEMS[result][0], error=message)
        await panel.audit(op, f"card.{action}", target, "ok", before=card_state(card), after=card_state(changed))
        log.info("card %d (%s) %s by panel %s", changed.id, masked_pan(changed), action, op.username)
        return changed

    @panel.action("/cards/{cardId}/lock", roles=LOCK_ROLES)
    async def lock(request: Request, op: Operator, form: FormData) -> Response:
        reason_text = form.get("reason")
        try:
            reason = msgspec.convert({"reason": int(reason_text)}, LockRequest).reason  # the REST body's rule
        except (TypeError, ValueError, msgspec.ValidationError):
            loaded = await load(request)
            if loaded is None:
                return panel.not_found(request, op, "card")
            return await render_card(request, op, *loaded, status=400,
                                     error="Choose a lock reason from the list (1 to 8).")
        answer = await lifecycle(request, op, "lock", service().lock, reason)
        if isinstance(answer, Response):
            return answer
        card = answer
        flash = f"Card {masked_pan(card)} locked: {lock_reason_label(card.lock_reason)}."
        if card.lock_reason != reason:
            flash += (f" It keeps its irreversible reason ({lock_reason_label(card.lock_reason)}); "
                      f"{lock_reason_label(reason)} was not applied.")
        return panel.redirect(request, card_path(card), flash=flash)

    @panel.action("/cards/{cardId}/unlock", roles=UNLOCK_ROLES)
    async def unlock(request: Request, op: Operator, form: FormData) -> Response:
        answer = await lifecycle(request, op, "unlock", service().unlock)
        if isinstance(answer, Response):
            return answer
        card = answer
        return panel.redirect(request, card_path(card), flash=f"Card {masked_pan(card)} unlocked: {status_name(card)}.")

    @panel.action("/cards/{cardId}/remove", roles=REMOVE_ROLES)
    async def remove(request: Request, op: Operator, form: FormData) -> Response:
        if form.get("confirm") != "yes":
            loaded = await load(request)
            if loaded is None:
                return panel.not_found(request, op, "card")
            return await render_card(request, op, *loaded, status=400,
                                     error="Removing a card is permanent: tick the confirmation box to remove it.")
        answer = await lifecycle(request, op, "remove", service().remove)
        if isinstance(answer, Response):
            return answer
        card = answer
        return panel.redirect(request, card_path(card),
                              flash=f"Card {masked_pan(card)} removed: it declines every payment from now on.")

    @panel.action("/cards/{cardId}/controls", roles=CONTROLS_ROLES)
    async def controls(request: Request, op: Operator, form: FormData) -> Response:
        loaded = await load(request)
        if loaded is None:
            return panel.not_found(request, op, "card")
        card, owner = loaded
        if not card_visible(card):
            return await render_card(request, op, card, owner, status=409,
                                     error=refusal_message(CardResult.card_not_found))
        balance = await ctx.in_thread(panel.store.get_balance, card.balance_id)
        exp = _exponent(balance.currency) if balance is not None else 2
        try:
            spec = controls_from_form(form, exp)
        except FormError as error:
            return await render_card(request, op, card, owner, status=400, error=str(error),
                                     controls_form=controls_values_from_form(form))
        before = await ctx.in_thread(stored_controls, panel.store, "card", card.id)
        await ctx.in_thread(save_card_controls, panel.store, owner, card, spec)
        await panel.audit(op, "card.controls", panel_users.card_target(card.id), "ok",
                          before={"controls": msgspec.to_builtins(before)},
                          after={"controls": msgspec.to_builtins(spec)})
        log.info("card spend controls of card %d set by panel %s", card.id, op.username)
        return panel.redirect(request, card_path(card), flash=f"Spend controls of card {masked_pan(card)} saved.")
