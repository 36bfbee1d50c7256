"""Ledger value types: accounts, transfers, flags and result codes.

Modelled on TigerBeetle's account/transfer model (integer amounts, caller-chosen ids that double as
idempotency keys, pending transfers, linked chains, result codes in precedence order), extended for
card issuing: partial and repeated posts of a hold, forced transfers for network advices, and
account kinds for user balances, partner collateral, settlement and fee income.

These types are also the write-ahead log's record format (msgspec, array_like for compactness), so
a field is never renumbered or reordered: append new fields at the end with a default.
"""

from __future__ import annotations

import enum

import msgspec

AMOUNT_MAX = 2**63 - 1  # amounts are non-negative int64 minor units
ID_MAX = 2**127 - 1  # ids are positive ints below 2**127 (fit in u128)
CURRENCY_LENGTH = 3  # ISO 4217 alpha code, e.g. "EUR"


class AccountKind(enum.IntEnum):
    """What an account stands for. Never renumber."""

    user_balance = 1  # a cardholder's funds held here (credit-normal)
    partner_deposit = 2  # partner's prefunded deposit collateral (credit-normal)
    partner_credit = 3  # partner's credit-line collateral (credit-normal)
    settlement = 4  # the card network's settlement account (debit-normal counterparty)
    fee_income = 5  # issuer/partner fee income (credit-normal)
    funding = 6  # the outside world: bank transfers in and out (debit-normal)
    collateral_usage = 7  # counterparty of collateral debits; shows collateral in use
    fx = 8  # foreign-exchange position


class _CachedFlag(enum.IntFlag):
    """An IntFlag whose combinations, once made, are looked up rather than made again.

    msgspec decodes a flag value that is not a single member by calling `_missing_`, which builds
    the combination anew each time: ~10% of a log replay's time (profiled on 400k records of the
    soak). The enum module keeps every combination it built in `_value2member_map_`; use it."""

    @classmethod
    def _missing_(cls, value):
        member = cls._value2member_map_.get(value)
        return member if member is not None else super()._missing_(value)


class AccountFlags(_CachedFlag):
    none = 0
    # The account must never have more debits than credits (posted + pending): a balance that
    # cannot go below zero. Checked against debits_pending + debits_posted.
    debits_must_not_exceed_credits = 1
    # The mirror rule for debit-normal accounts.
    credits_must_not_exceed_debits = 2


class TransferFlags(_CachedFlag):
    none = 0
    # This transfer and the next one in the batch succeed or fail together. A chain ends at the
    # first transfer without the flag. A chain left open at the end of a batch fails with
    # `linked_event_chain_open`.
    linked = 1
    # A hold: moves the amount into debits_pending / credits_pending until posted, voided or expired.
    pending = 2
    # Post (part of) the hold named by pending_id. amount == 0 means "what remains".
    post_pending = 4
    # Release (part of) the hold named by pending_id. amount == 0 releases all that remains and
    # resolves the hold; amount > 0 releases that much and keeps the rest held (partial reversal),
    # unless `final` is also set, which then resolves the hold.
    void_pending = 8
    # Ignore balance-limit flags (an advice the network already approved, a clearing over the
    # authorized amount). Marked in history and totals.
    forced = 16
    # With post_pending: the hold is resolved after this post; the remainder is released.
    # Without it the hold stays open with what remains (split shipments).
    final = 32


class TransferStatus(enum.IntEnum):
    """Outcome of one transfer, in precedence order. Never renumber; append new codes."""

    created = 0
    linked_event_failed = 1  # another transfer of its linked chain failed
    linked_event_chain_open = 2
    exists = 3  # same id and same fields: the original transfer stands (idempotent replay)
    id_must_not_be_zero = 4
    id_must_not_be_too_large = 5
    flags_are_mutually_exclusive = 6
    debit_account_not_found = 7
    credit_account_not_found = 8
    accounts_must_be_different = 9
    currency_mismatch = 10  # the two accounts, or the pending transfer, differ in currency
    amount_must_not_be_zero = 11
    amount_must_not_be_negative = 12
    amount_too_large = 13
    pending_id_must_not_be_zero = 14
    pending_id_must_be_zero = 15
    pending_transfer_not_found = 16
    pending_transfer_not_pending = 17  # pending_id names a transfer that is not a hold
    pending_transfer_has_different_accounts = 18
    pending_transfer_already_posted = 19
    pending_transfer_already_voided = 20
    pending_transfer_expired = 21
    exceeds_pending_transfer_amount = 22  # a post above what remains of the hold
    timeout_reserved_for_pending_transfer = 23
    exists_with_different_fields = 24  # same id, different fields: a conflict
    exceeds_credits = 25  # debits would exceed credits on a debits_must_not_exceed_credits account
    exceeds_debits = 26  # the mirror rule
    overflows = 27  # a running total would exceed AMOUNT_MAX
    exists_with_different_result = 28  # reserved
    account_exists_with_different_fields = 29
    pending_transfers_full = 30  # HOLDS_PENDING_MAX reached
    # Appended codes: checked where their rule belongs (flags_unknown with the other flag checks,
    # id_must_not_be_negative with the other id checks), not at their number.
    flags_unknown = 31  # a flag bit outside TransferFlags
    timeout_must_not_be_negative = 32
    reference_too_long = 33  # more than REFERENCE_LENGTH_MAX characters
    id_must_not_be_negative = 34


class AccountStatus(enum.IntEnum):
    created = 0
    exists = 1
    exists_with_different_fields = 2
    id_must_not_be_zero = 3
    currency_invalid = 4
    flags_are_mutually_exclusive = 5
    accounts_full = 6
    # Appended codes: checked where their rule belongs, not at their number.
    id_must_not_be_negative = 7
    id_must_not_be_too_large = 8
    kind_invalid = 9  # not an AccountKind
    flags_unknown = 10  # a flag bit outside AccountFlags


class AccountSpec(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What a caller asks for when creating an account (and what the log records)."""

    id: int
    currency: str
    kind: AccountKind
    flags: AccountFlags = AccountFlags.none
    user_data: int = 0  # caller's reference, e.g. a balance id


class TransferSpec(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What a caller asks for when creating a transfer (and what the log records).

    For post_pending / void_pending, debit/credit_account_id may be 0 (taken from the hold) and
    amount 0 means "all that remains".
    """

    id: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    flags: TransferFlags = TransferFlags.none
    pending_id: int = 0
    timeout_s: int = 0  # holds only: expires timeout_s after the hold's timestamp; 0 = never
    code: int = 0  # caller's transfer type, e.g. purchase / reversal / fee
    reference: str = ""  # caller's reference, e.g. an RRN; at most REFERENCE_LENGTH_MAX chars


REFERENCE_LENGTH_MAX = 64


class Batch(msgspec.Struct, frozen=True, array_like=True, tag="b"):
    """One write-ahead log record: everything applied at one logged instant.

    Applying a batch first expires every hold whose deadline is <= timestamp_ns, then creates the
    accounts, then the transfers (linked chains inside). `app` is opaque bytes for the embedding
    application (e.g. an authorization record); the ledger stores nothing of it but hands it back
    in order on replay, so the application's own state rides on the same durable commit.
    """

    timestamp_ns: int
    accounts: tuple[AccountSpec, ...] = ()
    transfers: tuple[TransferSpec, ...] = ()
    app: bytes = b""


class BatchResult(msgspec.Struct, frozen=True):
    timestamp_ns: int  # the ledger's (monotonic) time the batch was applied at
    account_results: tuple[AccountStatus, ...]
    transfer_results: tuple[TransferStatus, ...]
    expired: tuple[int, ...]  # ids of holds that expired while applying this batch
