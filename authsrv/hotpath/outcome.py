"""Authorization outcomes: one value per rule, mapped to field 39 (docs/contract.md, wire profile), the
partner notification description (reference documents, "Transactions notifier") and, for card
locks, the failure action code carried in field 44 (reference documents, "Lock outside").

Never renumber; append new outcomes at the end.
"""

from __future__ import annotations

import enum


class Outcome(enum.IntEnum):
    approved = 0
    approved_partial = 1
    card_lost = 2
    card_stolen = 3
    card_pending_query = 4
    card_consolidation = 5
    card_inactive = 6
    card_pin_tries_exceeded = 7
    card_suspected_fraud = 8
    card_replaced = 9
    card_not_found = 10
    card_removed = 11
    card_expired = 12
    card_not_activated = 13
    wrong_pin = 14
    wrong_cvc2 = 15
    insufficient_funds = 16
    insufficient_collateral = 17
    amount_limit_exceeded = 18
    count_limit_exceeded = 19
    not_permitted = 20
    invalid_amount = 21
    unsupported_transaction = 22
    format_error = 23
    partner_unavailable = 24
    internal_error = 25
    original_not_found = 26
    collateral_not_found = 27
    currency_mismatch = 28


# outcome -> (field 39, notification description)
RESPONSE = {
    Outcome.approved: ("00", "APPROVED"),
    Outcome.approved_partial: ("10", "APPROVED"),
    Outcome.card_lost: ("41", "CARD_NOT_FOUND"),
    Outcome.card_stolen: ("43", "CARD_NOT_FOUND"),
    Outcome.card_pending_query: ("05", "UNKNOWN_ERROR"),
    Outcome.card_consolidation: ("05", "UNKNOWN_ERROR"),
    Outcome.card_inactive: ("78", "UNKNOWN_ERROR"),
    Outcome.card_pin_tries_exceeded: ("75", "UNKNOWN_ERROR"),
    Outcome.card_suspected_fraud: ("59", "AML_EXCEPTION"),
    Outcome.card_replaced: ("14", "CARD_NOT_FOUND"),
    Outcome.card_not_found: ("14", "CARD_NOT_FOUND"),
    Outcome.card_removed: ("14", "CARD_NOT_FOUND"),
    Outcome.card_expired: ("54", "UNKNOWN_ERROR"),
    Outcome.card_not_activated: ("78", "UNKNOWN_ERROR"),
    Outcome.wrong_pin: ("55", "UNKNOWN_ERROR"),
    Outcome.wrong_cvc2: ("N7", "UNKNOWN_ERROR"),
    Outcome.insufficient_funds: ("51", "INSUFFICIENT_FUNDS"),
    Outcome.insufficient_collateral: ("51", "INSUFFICIENT_FUNDS_ON_COLLATERAL_BALANCE"),
    Outcome.amount_limit_exceeded: ("61", "EXCEEDS_AMOUNT_LIMIT"),
    Outcome.count_limit_exceeded: ("65", "LIMIT_EXCEED"),
    Outcome.not_permitted: ("57", "UNKNOWN_TRANSACTION_TYPE"),
    Outcome.invalid_amount: ("13", "INVALID_AMOUNT"),
    Outcome.unsupported_transaction: ("12", "UNKNOWN_TRANSACTION_TYPE"),
    Outcome.format_error: ("30", "UNKNOWN_ERROR"),
    Outcome.partner_unavailable: ("91", "UNKNOWN_ERROR"),
    Outcome.internal_error: ("96", "UNKNOWN_ERROR"),
    # ISO 8583 "unable to locate original": the contract's table has no row for a 0400 whose
    # original is unknown; 25 is the code every network uses for it.
    Outcome.original_not_found: ("25", "REFERENCED_TRANSACTION_NOT_FOUND"),
    Outcome.collateral_not_found: ("51", "COLLATERAL_BALANCE_NOT_FOUND"),
    Outcome.currency_mismatch: ("57", "CURRENCY_MISMATCH"),
}
assert set(RESPONSE) == set(Outcome)

# Card lock reasons 1..8 (reference documents, "Lock" / "Lock outside"):
# reason -> (outcome, failure action code for field 44, irreversible)
LOCK_REASONS = {
    1: (Outcome.card_lost, "2008", True),
    2: (Outcome.card_stolen, "2009", True),
    3: (Outcome.card_pending_query, "1000", False),
    4: (Outcome.card_consolidation, "1016", False),
    5: (Outcome.card_inactive, "1018", True),
    6: (Outcome.card_pin_tries_exceeded, "1006", False),
    7: (Outcome.card_suspected_fraud, "1002", False),
    8: (Outcome.card_replaced, "1011", True),
}
LOCK_REASON_PIN_TRIES_EXCEEDED = 6
PIN_TRIES_MAX = 3  # the third wrong PIN in a row locks the card (docs/contract.md, wire profile)


def response_code(outcome: Outcome) -> str:
    return RESPONSE[outcome][0]


_APPROVALS = (Outcome.approved, Outcome.approved_partial)  # built once: an Enum attribute costs ~200 ns


def is_approval(outcome: Outcome) -> bool:
    return outcome in _APPROVALS
