"""What must reach a partner, derived from the two durable sources: pure functions, no I/O.

A source item (a store event, a journal record, an OTP challenge) becomes zero or more `PartnerCall`
values: method, path, the exact body bytes and a fixed idempotency key. Keys are stable: an event
carries the key the store gave it; a journal record's key is derived from the record (its duplicate
key, outcome and the call kind) by `derived_key`, so scheduling the same record again (after a
crash, from the snapshot or the log) yields the same key and the delivery table ignores it.

Calls per journal record (reference documents, "External Balance" and "Transactions notifier"):

| record                                                    | call(s)                                       |
| --------------------------------------------------------- | --------------------------------------------- |
| any processed transaction of a card (notify "transaction")| POST /notifications/transaction               |
| external partner, advice 0120/0220 approved               | POST /transactions/force-debit (force-credit) |
| external partner, stand-in approval (no partner answer)   | POST /transactions/reversal of the debit, then force-debit (force-credit) |
| external partner, stand-in decline after a timeout/failure| POST /transactions/reversal of the debit      |
| external partner, reversal 0400/0420 that released money  | POST /transactions/reversal                   |
| external partner, approved by it, then 91 (commit too late)| POST /transactions/reversal of the debit      |

The stand-in approval sends a reversal first because the partner may have applied the timed-out
debit late: the reversal gives that back (a no-op if it never arrived) and the force-debit then
applies exactly once. Both are calls the partner may not refuse.

Calls per store event (`calls_of_event`):

| event                     | call(s)                                                             |
| ------------------------- | ------------------------------------------------------------------- |
| kyc.submitted/accepted/rejected | POST /notifications/verification* (notify "verification")     |
| partner_balance.low       | POST /notifications/partnerBalanceLow (notify "partner_balance")    |
| transaction.cleared       | external partner: PUT /transactions/{transactionId} (status CLEARED, the event's key); |
|                           | notify "transaction": POST /notifications/transaction, status CLEARED |
| transaction.forced        | external partner: POST /transactions/force-debit (force-credit for a refund record), |
|                           | the event's key: a clearing record with no open authorization (clearing/cleared.py); |
|                           | late after the hold expired: POST /transactions/reversal of the authorization first |

A clearing's PUT goes in the balance's order (`balance:{id}`), behind the authorization's own calls
(its force-debit after a stand-in): those were scheduled from the journal before the clearing ran.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import attrs

from authsrv.clearing.cleared import CLEARED_EVENT_KIND, FORCED_EVENT_KIND, cleared_decoder, forced_decoder
from authsrv.hotpath.journal import AuthRecord
from authsrv.hotpath.outcome import RESPONSE, Outcome, is_approval

TRIES_MAX = 5  # reference documents, "Transactions notifier": "Antaca will try ... up to 5 times"
UNBOUNDED = 0  # tries_max of calls the partner may not refuse (reversals): retried until 2xx

# External values (authsrv.hotpath.context.External), read as ints so this module does not depend
# on the hot path's enum being present.
EXTERNAL_NONE = 0
EXTERNAL_APPROVED = 1
EXTERNAL_DECLINED = 2
EXTERNAL_TIMED_OUT = 3
EXTERNAL_FAILED = 4
EXTERNAL_IN_FLIGHT = 5
EXTERNAL_DEFERRED = 6
EXTERNAL_UNANSWERED = frozenset({EXTERNAL_TIMED_OUT, EXTERNAL_FAILED, EXTERNAL_IN_FLIGHT})

CREDIT_CODES = frozenset({"20", "28"})
ADVICE_MTI_CLASSES = frozenset({"0120", "0121", "0220", "0221"})
REVERSAL_MTI_CLASSES = frozenset({"0400", "0401", "0420", "0421"})


class CallKind(enum.StrEnum):
    """One partner endpoint. The value is what the delivery table and the metrics show."""

    transaction = "notify.transaction"
    verification_in_progress = "notify.verificationInProgress"
    verification_accepted = "notify.verificationAccepted"
    verification_rejected = "notify.verificationRejected"
    otp = "notify.otp"
    partner_balance_low = "notify.partnerBalanceLow"
    force_debit = "force-debit"
    force_credit = "force-credit"
    reversal = "reversal"
    status_update = "status-update"


CALL_PATHS = {
    CallKind.transaction: ("POST", "/notifications/transaction"),
    CallKind.verification_in_progress: ("POST", "/notifications/verificationInProgress"),
    CallKind.verification_accepted: ("POST", "/notifications/verificationAccepted"),
    CallKind.verification_rejected: ("POST", "/notifications/verificationRejected"),
    CallKind.otp: ("POST", "/notifications/otp"),
    CallKind.partner_balance_low: ("POST", "/notifications/partnerBalanceLow"),
    CallKind.force_debit: ("POST", "/transactions/force-debit"),
    CallKind.force_credit: ("POST", "/transactions/force-credit"),
    CallKind.reversal: ("POST", "/transactions/reversal"),
    CallKind.status_update: ("PUT", "/transactions/{id}"),
}
UNREFUSABLE = frozenset({CallKind.reversal})  # "we do not accept any error": retried until 2xx

VERIFICATION_KINDS = {
    "kyc.submitted": CallKind.verification_in_progress,
    "kyc.accepted": CallKind.verification_accepted,
    "kyc.rejected": CallKind.verification_rejected,
}

# Outcome -> the notification's `status` ("Transactions notifier"): SUCCESS for approvals, INVALID
# when the request itself could not be processed, DECLINED for a rule that refused it. The
# `description` is the second column of authsrv.hotpath.outcome.RESPONSE.
NOTIFICATION_STATUS: dict[Outcome, str] = {
    Outcome.approved: "SUCCESS",
    Outcome.approved_partial: "SUCCESS",
    Outcome.card_lost: "DECLINED",
    Outcome.card_stolen: "DECLINED",
    Outcome.card_pending_query: "DECLINED",
    Outcome.card_consolidation: "DECLINED",
    Outcome.card_inactive: "DECLINED",
    Outcome.card_pin_tries_exceeded: "DECLINED",
    Outcome.card_suspected_fraud: "DECLINED",
    Outcome.card_replaced: "DECLINED",
    Outcome.card_not_found: "DECLINED",
    Outcome.card_removed: "DECLINED",
    Outcome.card_expired: "DECLINED",
    Outcome.card_not_activated: "DECLINED",
    Outcome.wrong_pin: "DECLINED",
    Outcome.wrong_cvc2: "DECLINED",
    Outcome.insufficient_funds: "DECLINED",
    Outcome.insufficient_collateral: "DECLINED",
    Outcome.amount_limit_exceeded: "DECLINED",
    Outcome.count_limit_exceeded: "DECLINED",
    Outcome.not_permitted: "DECLINED",
    Outcome.invalid_amount: "INVALID",
    Outcome.unsupported_transaction: "INVALID",
    Outcome.format_error: "INVALID",
    Outcome.partner_unavailable: "DECLINED",
    Outcome.internal_error: "INVALID",
    Outcome.original_not_found: "INVALID",
    Outcome.collateral_not_found: "DECLINED",
    Outcome.currency_mismatch: "DECLINED",
}

# Processing code (first two digits) -> `type` of the notifier's transaction object and of the
# External Balance transaction object (their allowed values differ in the documents).
NOTIFIED_TYPE = {"00": "POS", "01": "ATM", "09": "Cashback", "20": "POS", "28": "Payment", "30": "Balance Inquiry"}
EXTERNAL_TYPE = {"00": "POS", "01": "ATM", "09": "Cashback at POS", "20": "POS", "28": "payment", "30": "POS"}
MTI_DESCRIPTION = {"01": "authorization", "02": "financial", "04": "reversal"}
DESCRIPTION_CHARS_MAX = 64


def notification_status(outcome: int) -> tuple[str, str]:
    """(status, description) of a transaction notification for a journal outcome."""
    known = Outcome(outcome) if outcome in Outcome._value2member_map_ else Outcome.internal_error
    return NOTIFICATION_STATUS.get(known, "DECLINED"), RESPONSE[known][1]


@attrs.frozen
class PartnerCall:
    partner: str
    kind: CallKind
    method: str
    path: str
    body: bytes
    idempotency_key: str
    order_key: str  # calls with one order key are delivered one at a time, oldest first
    source: str  # what caused it: "event:12", "log:<record key>", "otp:7"

    @property
    def tries_max(self) -> int:
        return UNBOUNDED if self.kind in UNREFUSABLE else TRIES_MAX


@attrs.frozen
class CardInfo:
    """What a record's card says about where its calls go (from the in-memory card index)."""

    card_id: int
    user_id: int
    balance_id: int
    partner: str
    pan_last4: str


@attrs.frozen
class PartnerView:
    """The partner settings that decide which calls exist."""

    balance_mode: str
    notify: frozenset[str]
    has_api: bool


def derived_key(*parts: str) -> str:
    """A stable uuid-shaped key (the documents show uuid v4 keys) from the parts."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def transaction_id(record_key: str) -> str:
    """`transactionId` of an authorization in the External Balance API: the one the hot-path debit
    used (authsrv/hotpath/external.py), so a reversal or force-debit names the same transaction."""
    from authsrv.hotpath.external import transaction_id as hot_path_transaction_id

    return hot_path_transaction_id(record_key)


def external_balance_id(balance_id: int) -> str:
    """`balanceId` as linked at the partner (`POST /users/{id}/balances`)."""
    return str(balance_id)


def iso_utc(timestamp_ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp_ns / 1e9, tz=datetime.timezone.utc)
    return moment.replace(microsecond=0).isoformat()  # 2023-11-17T11:32:16+00:00, as the documents


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _mti_class(mti: str) -> str:
    return mti[:2] + mti[2] + "0" if len(mti) == 4 else mti


def is_credit(record: AuthRecord) -> bool:
    return record.processing_code[:2] in CREDIT_CODES


# -- journal records -------------------------------------------------------------------------------


@attrs.frozen
class RecordLookups:
    """How a record's card, partner and original are found (the index, config and journal)."""

    card: Callable[[int], CardInfo | None]
    partner: Callable[[str], PartnerView | None]
    original: Callable[[str], AuthRecord | None]


def calls_of_record(record: AuthRecord, lookups: RecordLookups) -> list[PartnerCall]:
    """Every call a decided journal record causes (the table in the module docstring)."""
    if getattr(record, "external", 0) == EXTERNAL_IN_FLIGHT:
        return []  # the final record follows; only a crash leaves this one (see recovered_record)
    original = lookups.original(record.reverses) if record.reverses else None
    card_id = record.card_id or (original.card_id if original is not None else 0)
    card = lookups.card(card_id) if card_id else None
    if card is None:
        return []  # no card, no partner to tell (e.g. an unknown PAN)
    partner = lookups.partner(card.partner)
    if partner is None or not partner.has_api:
        return []
    calls: list[PartnerCall] = []
    if partner.balance_mode == "external":
        calls.extend(_external_calls(record, original, card))
    if "transaction" in partner.notify:
        calls.append(_transaction_notification(record, original, card))
    return calls


def recovered_record(record: AuthRecord) -> AuthRecord:
    """A record still `in_flight` after a restart never got its answer: treat it as timed out
    and declined, so the partner is told to reverse whatever it may have applied."""
    if getattr(record, "external", 0) != EXTERNAL_IN_FLIGHT:
        return record
    import msgspec

    return msgspec.structs.replace(record, external=EXTERNAL_TIMED_OUT, outcome=int(Outcome.partner_unavailable),
                                   response_code=RESPONSE[Outcome.partner_unavailable][0])


def _external_calls(record: AuthRecord, original: AuthRecord | None, card: CardInfo) -> list[PartnerCall]:
    approved = is_approval(Outcome(record.outcome)) if record.outcome in Outcome._value2member_map_ else False
    mti_class = _mti_class(record.mti)
    force = "force-credit" if is_credit(record) else "force-debit"
    external = getattr(record, "external", 0)
    if mti_class in REVERSAL_MTI_CLASSES:
        if approved and original is not None and record.amount > 0:
            return [_transaction_call(CallKind.reversal, record, card, reference=original)]
        return []
    if mti_class in ADVICE_MTI_CLASSES:
        return [_transaction_call(CallKind(force), record, card)] if approved else []
    if external == EXTERNAL_APPROVED and not approved and record.stand_in:
        # The partner approved, but our commit missed the budget and the answer became 91.
        return [_transaction_call(CallKind.reversal, record, card, reference=record)]
    if external in EXTERNAL_UNANSWERED:
        reversal = _transaction_call(CallKind.reversal, record, card, reference=record)
        if approved and record.stand_in:
            return [reversal, _transaction_call(CallKind(force), record, card)]
        return [reversal]
    return []


def _transaction_call(kind: CallKind, record: AuthRecord, card: CardInfo, *,
                      reference: AuthRecord | None = None) -> PartnerCall:
    """A call of the External Balance API with the documents' "Transaction object"."""
    processing = record.processing_code[:2]
    body: dict[str, Any] = {
        "balanceId": external_balance_id(card.balance_id),
        "resourceId": str(card.card_id),
        "resource": "card",
        "transactionId": transaction_id(record.key),
        "type": EXTERNAL_TYPE.get(processing, "POS"),
        "amount": record.amount,
        "currency": record.currency or "EUR",
        "status": "REVERSED" if kind is CallKind.reversal else "AUTHORIZED",
        "description": _description(record),
        "date": iso_utc(record.timestamp_ns),
        "transactionData": _transaction_data(record, card),
    }
    if reference is not None:
        body["referenceTransactionId"] = transaction_id(reference.key)
    request_currency = getattr(record, "request_currency", "") or record.currency
    if record.request_amount and (record.request_amount != record.amount or request_currency != record.currency):
        body["originalAmount"] = record.request_amount
        body["originalCurrency"] = request_currency
    method, path = CALL_PATHS[kind]
    return PartnerCall(
        partner=card.partner, kind=kind, method=method, path=path, body=_json(body),
        idempotency_key=derived_key(kind.value, record.key, str(record.outcome)),
        order_key=f"balance:{card.balance_id}", source=f"log:{record.key}",
    )


def merchant_name(record: AuthRecord) -> str:
    """Field 43 without its country (the last 2 characters), as the hot path sent it."""
    return getattr(record, "merchant", "")[:-2].strip()[:DESCRIPTION_CHARS_MAX]


def _transaction_data(record: AuthRecord, card: CardInfo) -> dict[str, str]:
    data: dict[str, str] = {}
    if getattr(record, "mcc", ""):
        data["mcc"] = record.mcc
    if merchant_name(record):
        data["merchantName"] = merchant_name(record)
    country = getattr(record, "merchant", "")[-2:]
    if len(country) == 2 and country.isalpha():
        data["acquirerCountry"] = country
    if len(card.pan_last4) == 4:
        data["lastFourDigits"] = card.pan_last4
    return data


def _description(record: AuthRecord) -> str:
    return merchant_name(record) or MTI_DESCRIPTION.get(record.mti[1:3], "card transaction")


def _transaction_notification(record: AuthRecord, original: AuthRecord | None, card: CardInfo) -> PartnerCall:
    status, description = notification_status(record.outcome)
    processing = record.processing_code[:2]
    reversal = _mti_class(record.mti) in REVERSAL_MTI_CLASSES
    transaction: dict[str, Any] = {
        "id": transaction_id(record.key),
        "balanceId": external_balance_id(card.balance_id),
        "resourceId": str(card.card_id),
        "resource": "card",
        "cardId": str(card.card_id),
        "externalTransactionId": record.rrn,
        "referenceExternalTransactionId": original.rrn if original is not None else None,
        "type": NOTIFIED_TYPE.get(processing, "POS"),
        # A reversal gives money back: the opposite direction of what it reverses.
        "category": ("DEBIT" if reversal else "CREDIT") if processing in CREDIT_CODES else
                    ("CREDIT" if reversal else "DEBIT"),
        "amount": record.amount if record.amount else record.request_amount,
        "currency": record.currency or None,
        "originalAmount": record.request_amount or None,
        "originalCurrency": getattr(record, "request_currency", "") or None,
        "status": "REVERSED" if reversal else "AUTHORIZED",
        "description": _description(record),
        "date": iso_utc(record.timestamp_ns),
        "referenceExternalTransactionDate": iso_utc(original.timestamp_ns) if original is not None else None,
        "transactionData": _transaction_data(record, card),
    }
    body = {"status": status, "date": iso_utc(record.timestamp_ns), "description": description,
            "transaction": transaction}
    method, path = CALL_PATHS[CallKind.transaction]
    return PartnerCall(
        partner=card.partner, kind=CallKind.transaction, method=method, path=path, body=_json(body),
        idempotency_key=derived_key(CallKind.transaction.value, record.key, str(record.outcome)),
        order_key=f"balance:{card.balance_id}", source=f"log:{record.key}",
    )


# -- store events ----------------------------------------------------------------------------------


def calls_of_event(event_id: int, partner: str, kind: str, body_json: str, idempotency_key: str,
                   view: PartnerView | None, user: Callable[[int], UserInfo | None]) -> list[PartnerCall]:
    """Every call a store event causes (the second table in the module docstring)."""
    if kind == CLEARED_EVENT_KIND:
        return calls_of_cleared(event_id, body_json, idempotency_key, view)
    if kind == FORCED_EVENT_KIND:
        return calls_of_forced(event_id, body_json, idempotency_key, view)
    call = call_of_event(event_id, partner, kind, body_json, idempotency_key, view, user)
    return [] if call is None else [call]


def calls_of_cleared(event_id: int, body_json: str, idempotency_key: str,
                     view: PartnerView | None) -> list[PartnerCall]:
    """A cleared authorization (authsrv/clearing/cleared.py): the documents' status update to an
    external-balance partner, and a transaction notification with status CLEARED to a subscriber."""
    if view is None or not view.has_api:
        return []
    cleared = cleared_decoder.decode(body_json)
    order_key, source = f"balance:{cleared.balance_id}", f"event:{event_id}"
    calls = []
    if view.balance_mode == "external":
        method, path = CALL_PATHS[CallKind.status_update]
        calls.append(PartnerCall(
            partner=cleared.partner, kind=CallKind.status_update, method=method,
            path=path.format(id=cleared.transaction_id), body=_json(_status_update_body(cleared)),
            idempotency_key=idempotency_key, order_key=order_key, source=source))
    if "transaction" in view.notify:
        method, path = CALL_PATHS[CallKind.transaction]
        calls.append(PartnerCall(
            partner=cleared.partner, kind=CallKind.transaction, method=method, path=path,
            body=_json(_cleared_notification_body(cleared)),
            idempotency_key=derived_key(CallKind.transaction.value, idempotency_key),
            order_key=order_key, source=source))
    return calls


def calls_of_forced(event_id: int, body_json: str, idempotency_key: str,
                    view: PartnerView | None) -> list[PartnerCall]:
    """A clearing posting on an external card with no authorization to clear (cleared.py): the
    partner's force-debit (a refund record: force-credit), which it may not refuse."""
    if view is None or not view.has_api or view.balance_mode != "external":
        return []
    forced = forced_decoder.decode(body_json)
    order_key, source = f"balance:{forced.balance_id}", f"event:{event_id}"
    calls = []
    if forced.reverse_first and forced.reference_transaction_id:
        method, path = CALL_PATHS[CallKind.reversal]
        calls.append(PartnerCall(partner=forced.partner, kind=CallKind.reversal, method=method, path=path,
                                 body=_json(_expired_reversal_body(forced)),
                                 idempotency_key=derived_key(CallKind.reversal.value, idempotency_key),
                                 order_key=order_key, source=source))
    kind = CallKind.force_credit if forced.direction == "credit" else CallKind.force_debit
    method, path = CALL_PATHS[kind]
    calls.append(PartnerCall(partner=forced.partner, kind=kind, method=method, path=path,
                             body=_json(_forced_body(forced)), idempotency_key=idempotency_key,
                             order_key=order_key, source=source))
    return calls


def _expired_reversal_body(forced) -> dict[str, Any]:
    """Reverse what the expired authorization's debit still holds at the partner."""
    body = _forced_body(forced)
    body.pop("originalAmount", None)
    body.pop("originalCurrency", None)
    body.update(transactionId=derived_key("expired", forced.reference_transaction_id),
                referenceTransactionId=forced.reference_transaction_id, amount=forced.reverse_first,
                status="REVERSED", description="authorization expired")
    return body


def _forced_body(forced) -> dict[str, Any]:
    """The External Balance "Transaction object" of a forced clearing posting (final: CLEARED)."""
    body: dict[str, Any] = {
        "balanceId": external_balance_id(forced.balance_id),
        "resourceId": str(forced.card_id),
        "resource": "card",
        "transactionId": forced.transaction_id,
        "type": "POS",  # a clearing file says purchase or refund, not the channel
        "amount": forced.amount,
        "currency": forced.currency,
        "status": forced.status,
        "description": _cleared_description(forced),
        "date": iso_utc(forced.posted_at_ns),
        "transactionData": _cleared_transaction_data(forced),
    }
    if forced.reference_transaction_id:
        body["referenceTransactionId"] = forced.reference_transaction_id
    if forced.original_currency != forced.currency:
        body["originalAmount"] = forced.original_amount
        body["originalCurrency"] = forced.original_currency
    return body


def _cleared_transaction_data(cleared) -> dict[str, str]:
    data = {"mcc": cleared.mcc}
    if cleared.merchant_name:
        data["merchantName"] = cleared.merchant_name[:DESCRIPTION_CHARS_MAX]
    if len(cleared.pan_last4) == 4:
        data["lastFourDigits"] = cleared.pan_last4
    return data


def _cleared_description(cleared) -> str:
    return cleared.merchant_name[:DESCRIPTION_CHARS_MAX] or "clearing"


def _status_update_body(cleared) -> dict[str, Any]:
    """The External Balance "Transaction object" with status CLEARED and the final amount."""
    body: dict[str, Any] = {
        "balanceId": external_balance_id(cleared.balance_id),
        "resourceId": str(cleared.card_id),
        "resource": "card",
        "transactionId": cleared.transaction_id,
        "type": EXTERNAL_TYPE.get(cleared.processing_code[:2], "POS"),
        "amount": cleared.amount,
        "currency": cleared.currency,
        "status": cleared.status,
        "description": _cleared_description(cleared),
        "date": iso_utc(cleared.authorized_at_ns),
        "transactionData": _cleared_transaction_data(cleared),
    }
    if cleared.original_currency != cleared.currency:
        body["originalAmount"] = cleared.original_amount
        body["originalCurrency"] = cleared.original_currency
    return body


def _cleared_notification_body(cleared) -> dict[str, Any]:
    """The "Transactions notifier" body for a clearing: processed (SUCCESS, APPROVED), status CLEARED."""
    processing = cleared.processing_code[:2]
    date = iso_utc(cleared.authorized_at_ns)
    transaction: dict[str, Any] = {
        "id": cleared.transaction_id,
        "balanceId": external_balance_id(cleared.balance_id),
        "resourceId": str(cleared.card_id),
        "resource": "card",
        "cardId": str(cleared.card_id),
        "externalTransactionId": cleared.rrn,
        "referenceExternalTransactionId": None,
        "type": NOTIFIED_TYPE.get(processing, "POS"),
        "category": "CREDIT" if processing in CREDIT_CODES else "DEBIT",
        "amount": cleared.amount,
        "currency": cleared.currency,
        "originalAmount": cleared.original_amount or None,
        "originalCurrency": cleared.original_currency or None,
        "status": cleared.status,
        "description": _cleared_description(cleared),
        "date": date,
        "referenceExternalTransactionDate": None,
        "transactionData": _cleared_transaction_data(cleared),
    }
    status, description = notification_status(int(Outcome.approved))
    return {"status": status, "date": date, "description": description, "transaction": transaction}


@attrs.frozen
class UserInfo:
    user_id: int
    email: str
    first_name: str
    last_name: str


def call_of_event(event_id: int, partner: str, kind: str, body_json: str, idempotency_key: str,
                  view: PartnerView | None, user: Callable[[int], UserInfo | None]) -> PartnerCall | None:
    """The notification a store event causes, if the partner asked for it."""
    if view is None or not view.has_api:
        return None
    body = json.loads(body_json)
    if kind in VERIFICATION_KINDS and "verification" in view.notify:
        found = user(int(body["customerId"]))
        if found is None:
            return None
        call_kind = VERIFICATION_KINDS[kind]
        payload = {
            "verificationId": str(body["formId"]),
            "userId": found.user_id,
            "email": found.email,
            "firstName": found.first_name,
            "lastName": found.last_name,
            "status": body["status"],
            "reason": body.get("reason") if body["status"] == "REJECTED" else None,
        }
        order_key = f"customer:{found.user_id}"
    elif kind == "partner_balance.low" and "partner_balance" in view.notify:
        call_kind, payload, order_key = CallKind.partner_balance_low, body, f"partner:{partner}"
    else:
        return None
    method, path = CALL_PATHS[call_kind]
    return PartnerCall(partner=partner, kind=call_kind, method=method, path=path, body=_json(payload),
                       idempotency_key=idempotency_key, order_key=order_key, source=f"event:{event_id}")
