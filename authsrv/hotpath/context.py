"""Per-request state for the hot path: one typed context instead of jPOS's untyped map.

Participants keep only collaborators; everything about one authorization lives here.
"""

from __future__ import annotations

import enum

import attrs

from authsrv.hotpath.outcome import Outcome

# Processing code, first two digits (docs/contract.md, wire profile)
DEBITS = frozenset({"00", "01", "09"})
CREDITS = frozenset({"20", "28"})
INQUIRIES = frozenset({"30"})
PROCESSING_CODES = DEBITS | CREDITS | INQUIRIES


class Vote(enum.Enum):
    prepared = "prepared"  # go on to the next participant
    aborted = "aborted"  # the outcome is decided (a decline); stop and compensate
    done = "done"  # the outcome is decided without a decline (a duplicate, an inquiry); stop
    deferred = "deferred"  # the decision needs an await (a partner's external balance): the switch completes it

    # Members are singletons compared by identity: hash them by identity too, in C. Enum's own
    # __hash__ is Python code (hash of the name), and `kind in ADVICES` runs several times a request.
    __hash__ = object.__hash__


class External(enum.IntEnum):
    """What the partner's external balance said (AuthRecord.external). Never renumber."""

    none = 0  # not an external-balance card, or nothing to ask (a decline before the call)
    approved = 1  # 204
    declined = 2  # 422 / 404 from the partner: nothing applied there
    timed_out = 3  # no answer within the budget: the partner may have applied it (reversal/force-debit)
    failed = 4  # 5xx or no connection: stand-in decided
    in_flight = 5  # the collateral is held and the call is under way (final only after a crash)
    deferred = 6  # not called in the hot path (advices, reversals): the outbox tells the partner


class Kind(enum.Enum):
    """What a message asks for, from its MTI (docs/contract.md, message classes)."""

    authorization = "authorization"  # 0100: approve or decline; an approval holds funds
    financial = "financial"  # 0200: approve and post at once
    advice_hold = "advice_hold"  # 0120: forced hold
    advice_post = "advice_post"  # 0220: forced post
    reversal = "reversal"  # 0400
    reversal_advice = "reversal_advice"  # 0420: always acknowledged

    # Members are singletons compared by identity: hash them by identity too, in C. Enum's own
    # __hash__ is Python code (hash of the name), and `kind in ADVICES` runs several times a request.
    __hash__ = object.__hash__


KIND_BY_MTI = {
    "0100": Kind.authorization,
    "0101": Kind.authorization,
    "0200": Kind.financial,
    "0201": Kind.financial,
    "0120": Kind.advice_hold,
    "0121": Kind.advice_hold,
    "0220": Kind.advice_post,
    "0221": Kind.advice_post,
    "0400": Kind.reversal,
    "0401": Kind.reversal,
    "0420": Kind.reversal_advice,
    "0421": Kind.reversal_advice,
}
ADVICES = frozenset({Kind.advice_hold, Kind.advice_post, Kind.reversal_advice})


@attrs.define(slots=True)
class AuthContext:
    request: object  # authsrv.iso.request.AuthRequest
    kind: Kind
    received_ns: int  # time.perf_counter_ns() at receipt, for the budget
    deadline_ns: int
    now_ns: int  # wall clock (time.time_ns()) at receipt: the ledger and journal timestamp
    key: str  # duplicate key
    original_key: str  # what a later reversal's field 90 names
    processing: str = ""  # first two digits of field 3
    card: object | None = None  # authsrv.store.index.CardState
    partner: object | None = None  # authsrv.store.index.PartnerState
    outcome: Outcome | None = None
    cause: str = ""  # why, beyond the outcome (kept in the journal, never sent)
    field44: str = ""  # lock action code
    amount: int = 0  # charged to the balance, in `currency`
    currency: str = ""
    user_hold_id: int = 0
    collateral_hold_id: int = 0
    posted: bool = False
    auth_code: str = ""
    field54: str = ""
    original: object | None = None  # AuthRecord of the original, for reversals
    reversal_amount: int = 0  # released by this reversal
    duplicate_of: object | None = None  # AuthRecord answered again
    seq: int = 0  # write-ahead log sequence the response must wait for (0: none)
    stand_in: bool = False
    partial: bool = False  # approved for less than asked (field 39 10); `amount` is what was approved
    external: External = External.none  # the partner's external balance (authsrv/hotpath/external.py)
    external_key: str = ""  # X-Idempotency-Key of the partner call
    external_ms: int = 0
    # FX and fees (authsrv/hotpath/fx.py, fees.py)
    fx_rate: str = ""  # balance-currency units per transaction-currency unit, when converted here
    fee: int = 0  # transaction fee posted with this authorization (balance currency)
    fee_transfer_id: int = 0  # the fee's ledger transfer (refunded by abort)

    def decline(self, outcome: Outcome, cause: str = "") -> Vote:
        self.outcome = outcome
        self.cause = cause
        return Vote.aborted
