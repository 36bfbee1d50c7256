"""What crosses the simulator's edge: the reference documents' bodies as strict msgspec Structs.

Every Struct is `forbid_unknown_fields`: the simulator is a test peer, and a field authsrv invents
(or misspells, like the documents' own "descripion") should fail loudly as 400 INVALID_PAYLOAD
rather than pass unnoticed. Allowed values are Literals where the documents give a closed list, and
plain strings where they say "this list could change" (notification `type`, `resource`).
"""

from __future__ import annotations

import datetime
import enum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

AMOUNT_MINOR_MAX = 10**12  # 10 billion in major units: far above any card transaction
ID_CHARS_MAX = 64
TEXT_CHARS_MAX = 256
IDEMPOTENCY_KEY_CHARS_MAX = 128

Id = Annotated[str, Meta(min_length=1, max_length=ID_CHARS_MAX)]
OptionalId = Annotated[str, Meta(max_length=ID_CHARS_MAX)]  # notifications of unknown cards carry ""
Text = Annotated[str, Meta(max_length=TEXT_CHARS_MAX)]
Currency = Annotated[str, Meta(pattern=r"^[A-Z]{3}$")]
AmountMinor = Annotated[int, Meta(ge=0, le=AMOUNT_MINOR_MAX)]
SignedAmountMinor = Annotated[int, Meta(ge=-AMOUNT_MINOR_MAX, le=AMOUNT_MINOR_MAX)]
UtcDate = Annotated[datetime.datetime, Meta(tz=True)]
IntOrText = int | Text  # the documents say "integer value" and show "1337": accept both

# "Transaction object", allowed values of `type` (reference documents, External Balance).
TransactionType = Literal[
    "cashback", "loan", "payment", "topup", "commision", "fee", "funding", "interest", "withdrawal",
    "POS", "ATM", "Cashback at POS",
]
TransactionStatus = Literal["AUTHORIZED", "CLEARED", "REVERSED"]

# "Transactions notifier", description details.
NotificationDescription = Literal[
    "APPROVED", "EXCEEDS_AMOUNT_LIMIT", "INSUFFICIENT_FUNDS", "CARD_NOT_FOUND", "BALANCE_NOT_FOUND",
    "INVALID_AMOUNT", "INSUFFICIENT_FUNDS_ON_DEPOSIT_BALANCE", "DEPOSIT_BALANCE_NOT_FOUND",
    "AML_EXCEPTION", "AMBIGUOUS_REFERENCED_TRANSACTION", "REFERENCED_TRANSACTION_NOT_FOUND",
    "CURRENCY_MISMATCH", "CUSTOMER_NOT_FOUND", "BUDGET_EXCEEDED", "LIMIT_EXCEED",
    "COLLATERAL_BALANCE_NOT_FOUND", "INSUFFICIENT_FUNDS_ON_COLLATERAL_BALANCE",
    "UNKNOWN_TRANSACTION_TYPE", "UNKNOWN_ERROR",
]


class Kind(enum.StrEnum):
    """One partner-facing endpoint: the unit of stats, of `received` records and of fault rolls."""

    public_key = "public-key"
    link_balance = "link-balance"
    get_balance = "get-balance"
    list_balances = "list-balances"
    delete_balance = "delete-balance"
    debit = "debit"
    credit = "credit"
    force_debit = "force-debit"
    force_credit = "force-credit"
    reversal = "reversal"
    status_update = "status-update"
    otp = "otp"
    verification_in_progress = "verification-in-progress"
    verification_accepted = "verification-accepted"
    verification_rejected = "verification-rejected"
    transaction = "transaction"


KINDS_READ_ONLY = frozenset({Kind.public_key, Kind.get_balance, Kind.list_balances})


class Title(enum.StrEnum):
    """`title` of an error body. The first group is the documents'; the rest are the simulator's."""

    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    LIMITS_EXCEEDED = "LIMITS_EXCEEDED"
    FRAUDS_DETECTED = "FRAUDS_DETECTED"
    BALANCE_NOT_FOUND = "BALANCE_NOT_FOUND"
    USER_NOT_FOUND = "USER_NOT_FOUND"
    FORBIDDEN = "FORBIDDEN"
    TRANSACTION_NOT_FOUND = "TRANSACTION_NOT_FOUND"
    ENCRYPTION_REQUIRED = "ENCRYPTION_REQUIRED"
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    CANT_DECRYPT_PAYLOAD = "CANT_DECRYPT_PAYLOAD"
    # Simulator's own.
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    BALANCE_NOT_EMPTY = "BALANCE_NOT_EMPTY"
    IDEMPOTENCY_KEY_REQUIRED = "IDEMPOTENCY_KEY_REQUIRED"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    SIMULATOR_FULL = "SIMULATOR_FULL"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"


# The three 422 codes a debit may answer, and the one a credit may (reference documents).
DEBIT_DECLINES = (Title.INSUFFICIENT_FUNDS, Title.LIMITS_EXCEEDED, Title.FRAUDS_DETECTED)
CREDIT_DECLINES = (Title.FRAUDS_DETECTED,)


class _In(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True, kw_only=True):
    pass


class LinkBalanceIn(_In, kw_only=True):
    balance_id: Id
    currency: Currency


class TransactionData(_In, kw_only=True, omit_defaults=True):
    mcc: Text | None = None
    merchant_identifier: Text | None = None
    merchant_name: Text | None = None
    capture_mode: Text | None = None
    last_four_digits: Annotated[str, Meta(pattern=r"^[0-9]{4}$")] | None = None
    acquirer_country: Text | None = None
    mdes_digitized_wallet_id: Text | None = None
    cashback_pos_currency_code: Currency | None = None
    cashback_pos_amount: AmountMinor | None = None


class TransactionIn(_In, kw_only=True):
    """The "Transaction object" of the External Balance API (debit, credit, force-*, reversal, PUT)."""

    balance_id: Id
    resource_id: Id
    resource: Literal["balance", "card"]
    transaction_id: Id
    reference_transaction_id: Id | None = None
    type: TransactionType
    amount: AmountMinor
    currency: Currency
    original_amount: AmountMinor | None = None
    original_currency: Currency | None = None
    status: TransactionStatus
    description: Text
    date: UtcDate
    transaction_data: TransactionData | None = None


class OtpIn(_In, kw_only=True):
    """The plaintext of `POST /notifications/otp` ("3DS External OTP Notifier")."""

    storage_customer_id: IntOrText
    storage_card_id: IntOrText
    balance_id: Id
    amount: IntOrText
    currency: Currency
    merchant_name: Text
    otp: Annotated[str, Meta(pattern=r"^[0-9]{4,8}$")]


class VerificationIn(_In, kw_only=True):
    """`POST /notifications/verification{InProgress,Accepted,Rejected}`; `reason` is required, may be null."""

    verification_id: Id
    user_id: IntOrText
    email: Text
    first_name: Text
    last_name: Text
    status: Literal["IN_PROGRESS", "ACCEPTED", "REJECTED"]
    reason: Text | None


class NotifiedTransaction(_In, kw_only=True):
    """The transaction object of the "Transactions notifier" (not the External Balance one)."""

    id: OptionalId
    balance_id: OptionalId
    resource_id: OptionalId
    resource: Text
    card_id: OptionalId
    external_transaction_id: Text
    reference_external_transaction_id: Text | None = None
    type: Text
    category: Literal["CREDIT", "DEBIT"]
    amount: SignedAmountMinor  # INVALID_AMOUNT notifications carry the amount that was <= 0
    currency: Currency | None = None
    original_amount: SignedAmountMinor | None = None
    original_currency: Currency | None = None
    status: TransactionStatus
    description: Text
    date: UtcDate
    reference_external_transaction_date: UtcDate | None = None
    transaction_data: TransactionData  # "always passed but it can be empty"


class TransactionNotificationIn(_In, kw_only=True):
    status: Literal["SUCCESS", "DECLINED", "INVALID"]
    date: UtcDate
    description: NotificationDescription
    transaction: NotifiedTransaction


class EncryptedIn(_In, kw_only=True):
    """`{"payload": "<compact JWE>"}` (reference documents, "Additional data encryption")."""

    payload: Annotated[str, Meta(min_length=1, max_length=16 * 1024)]


# Answers ------------------------------------------------------------------------------------


class _Out(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    pass


class Problem(_Out):
    title: str
    detail: str


class PublicKeyOut(_Out):
    public_key: str  # base64 of the PEM SubjectPublicKeyInfo


class BalanceOut(_Out):
    currency: str
    amount: int


class BalanceItemOut(_Out):
    id: str
    currency: str
    amount: int


# Control API (/_sim) ------------------------------------------------------------------------

Rate = Annotated[float, Meta(ge=0.0, le=1.0)]
LatencyMs = Annotated[float, Meta(ge=0.0, le=60_000.0)]


class ModeIn(_In, kw_only=True):
    """`POST /_sim/mode`: every field optional; what is given replaces the current value."""

    down: bool | None = None
    latency_ms: LatencyMs | None = None  # fixed latency
    latency_median_ms: LatencyMs | None = None  # lognormal, with latency_p99_ms
    latency_p99_ms: LatencyMs | None = None
    fail_5xx: Rate | None = msgspec.field(default=None, name="fail5xx")
    timeout_rate: Rate | None = None
    timeout_ms: LatencyMs | None = None
    drop_rate: Rate | None = None
    amount_codes: bool | None = None
    forced_users: dict[Id, Title | None] | None = None  # null removes a user


class ModeOut(_Out):
    down: bool
    latency_ms: float
    latency_median_ms: float
    latency_p99_ms: float
    fail_5xx: float = msgspec.field(name="fail5xx")
    timeout_rate: float
    timeout_ms: float
    drop_rate: float
    amount_codes: bool
    forced_users: dict[str, str]


class EndpointStatsOut(_Out):
    requests: int
    processed: int
    replays: int
    injected_5xx: int = msgspec.field(name="injected5xx")
    injected_timeouts: int
    injected_drops: int
    unavailable: int
    invalid: int
    by_status: dict[str, int]


class StatsOut(_Out):
    endpoints: dict[str, EndpointStatsOut]
    requests: int
    processed: int
    replays: int
    received_total: int
    idempotency_keys: int
    balances: int
    unmatched_reversals: int
    currency_mismatches_forced: int


class SetBalanceIn(_In, kw_only=True):
    amount: SignedAmountMinor
    currency: Currency | None = None


class SimBalanceOut(_Out):
    user_id: str
    balance_id: str
    currency: str
    amount: int


class ReceivedOut(_Out):
    seq: int
    kind: str
    method: str
    path: str
    idempotency_key: str | None
    signature: str | None
    signature_timestamp: str | None
    encrypted: bool
    status: int
    replays: int
    received_at: float
    client_cert_name: str | None
    body: msgspec.Raw  # the plaintext JSON, as received or as decrypted
    raw_body: str  # the bytes on the wire (what a signature covers), as UTF-8 text
