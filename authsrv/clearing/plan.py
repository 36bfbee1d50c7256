"""What one clearing record does to the ledger: a pure decision over the current state.

Matching (docs/contract.md, clearing file, issue 6): RRN + authorization code + PAN (through the card's
`pan_index`, so card ids are compared, never PANs). Then:

    matched, billed == held      post the hold                                        exact
    matched, billed <  held      post the amount; the file's LAST record for this     partial
                                 authorization is `final` (releases the rest), an
                                 earlier one leaves the rest held (split shipment)    split
    matched, billed >  held      post the whole hold + a forced transfer for the      over
                                 excess (like a tip)
    matched, hold closed         forced transfer (posted after expiry / void / a      late
                                 final post)
    no authorization             forced transfer from the card's balance              forced
    refund                       settlement -> the card's balance                     refund

A deposit partner's collateral hold is posted alongside, by the same amounts (MoveFunds charges a
deposit per transaction). The transfers of one record form one linked chain: all or nothing.
Transfer ids are 0 here; the engine fills them in from the store's allocator.

Fees (docs/money.md, "Fees"). A final post below the hold releases the rest, and the transaction
fee follows the released amount back in the same chain (fee income -> the card's balance, code 42),
by the rule Reverse uses (fees.refund_share: the fee kept is fee x outstanding / authorized, floor,
over the whole fee, fixed part included). Exact and over clearings keep the fee as it is; the
excess of an over-clearing carries no fee. Forced and late posts carry none either (a late one's
fee went back when its hold expired: authsrv/clearing/expiry.py).

External-balance partners (`Card.external`): the user's money is at the partner. A matched record
posts the deposit collateral hold (`_post`); a forced or late record force-posts the deposit
(deposit -> collateral usage) and NOT the card's local balance, which holds no money, and a refund
moves nothing here; both carry a `transaction.forced` event (cleared.py) for the partner's
force-debit / force-credit.
"""

from __future__ import annotations

import enum

import attrs

from authsrv.clearing.cleared import ClearedTransaction, ForcedTransaction, forced_transaction_id
from authsrv.clearing.records import ClearingRecord, RecordType
from authsrv.hotpath.external import transaction_id
from authsrv.hotpath.fees import FeeCode, refund_share
from authsrv.hotpath.journal import AuthJournal, AuthRecord, open_hold_id
from ledger.state import HoldState, Ledger
from ledger.types import TransferFlags, TransferSpec


class ClearingCode:
    """Ledger transfer `code` values written by clearing (hot path 1..99, management 101..).
    Never renumber."""

    post = 201  # a user hold posted (partly or whole)
    excess = 202  # forced: cleared above the hold (over)
    forced = 203  # forced: unmatched or late record, from the card's balance
    refund = 204  # settlement -> the card's balance
    collateral_post = 205
    collateral_excess = 206
    collateral_forced = 207


class ClearingOutcome(enum.StrEnum):
    exact = "exact"
    partial = "partial"
    split = "split"
    over = "over"
    late = "late"
    forced = "forced"
    refund = "refund"


class Refusal(enum.StrEnum):
    """Why a record posted nothing, named after the rule. Reported as an exception."""

    invalid_record = "invalid_record"
    unknown_card = "unknown_card"
    amount_zero = "amount_zero"
    billing_currency_not_balance_currency = "billing_currency_not_balance_currency"
    no_settlement_account = "no_settlement_account"
    ledger_refused = "ledger_refused"


MATCHED = frozenset({ClearingOutcome.exact, ClearingOutcome.partial, ClearingOutcome.split, ClearingOutcome.over})
_LINKED = TransferFlags.linked
_POST = TransferFlags.post_pending
_FINAL = TransferFlags.final
_FORCED = TransferFlags.forced


@attrs.frozen
class Plan:
    outcome: ClearingOutcome | None  # None: refused
    refusal: Refusal | None
    transfers: tuple[TransferSpec, ...]  # ids 0: filled in by the engine
    currency: str = ""
    cleared: int = 0  # charged to the cardholder's balance (posted + forced)
    released: int = 0  # what a final post released from the hold
    refunded: int = 0
    hold_id: int = 0  # the matched hold (0: none): the user hold, or an external partner's collateral hold
    referenced: bool = False  # a refund that matched a purchase
    cleared_event: ClearedTransaction | None = None  # the record resolved its authorization (cleared.py)
    forced_event: ForcedTransaction | None = None  # an external card's forced post or refund (cleared.py)
    fee_refunded: int = 0  # the transaction fee's share given back with `released`

    def __attrs_post_init__(self) -> None:
        assert (self.outcome is None) != (self.refusal is None)
        assert self.outcome is not None or not self.transfers
        assert self.cleared_event is None or self.forced_event is None
        assert self.fee_refunded == 0 or self.released > 0


def refused(refusal: Refusal) -> Plan:
    return Plan(None, refusal, ())


class Overlay:
    """What the chunk being planned has already taken from each hold (not yet in the ledger)."""

    def __init__(self) -> None:
        self.taken: dict[int, int] = {}
        self.resolved: set[int] = set()

    def take(self, hold_id: int, amount: int, resolve: bool) -> None:
        assert amount > 0 and hold_id not in self.resolved
        self.taken[hold_id] = self.taken.get(hold_id, 0) + amount
        if resolve:
            self.resolved.add(hold_id)


@attrs.frozen
class Card:
    """What planning needs of the card a PAN names."""

    card_id: int
    balance_account_id: int
    currency: str
    collateral_account_id: int = 0  # deposit partners only
    usage_account_id: int = 0
    partner: str = ""
    balance_id: int = 0
    pan_last4: str = ""
    fee_income_account_id: int = 0  # the partner's fee income in the card's currency (0: none)
    external: bool = False  # the partner's balance_mode is "external": no money in the local balance


class Planner:
    """Reads `ledger.hold`, `journal.open_authorizations` and `journal.closed_authorizations` only:
    the live objects, or the engine's copy of them for a chunk planned in a worker (engine._View)."""

    def __init__(self, ledger: Ledger, journal: AuthJournal, settlement_account) -> None:
        self._ledger = ledger
        self._journal = journal
        self._settlement = settlement_account  # currency -> settlement account id (or None)

    def plan(self, record: ClearingRecord, card: Card | None, *, last: bool, overlay: Overlay, ts_ns: int,
             identity: str = "") -> Plan:
        """`last`: no later record of this file names the same authorization. `ts_ns`: the
        timestamp the batch will apply at (a hold whose deadline it reaches expires first).
        `identity`: the record's identity (records.py), which names an external card's forced
        transaction."""
        if card is None:
            return refused(Refusal.unknown_card)
        if record.billing_amount == 0:
            return refused(Refusal.amount_zero)
        if record.billing_currency != card.currency:
            return refused(Refusal.billing_currency_not_balance_currency)
        settlement = self._settlement(card.currency)
        if settlement is None:
            return refused(Refusal.no_settlement_account)
        authorization, is_open = self._match(record, card)
        forced = _Forced(identity, ts_ns, transaction_id(authorization.key) if authorization is not None else "",
                         self._expired_rest(authorization, ts_ns) if card.external else 0)
        if record.type is RecordType.refund:
            return _refund(record, card, settlement, forced, referenced=authorization is not None)
        if authorization is not None and is_open:
            remaining = self._remaining(open_hold_id(authorization), overlay, ts_ns)
            if remaining > 0:
                return self._post(record, card, authorization, remaining, last, overlay, ts_ns)
            late = True
        else:
            late = authorization is not None
        return _force(record, card, settlement, ClearingOutcome.late if late else ClearingOutcome.forced, forced)

    def _match(self, record: ClearingRecord, card: Card) -> tuple[AuthRecord | None, bool]:
        if not record.auth_code:
            return None, False
        for found in self._journal.open_authorizations(record.rrn):
            if found.auth_code == record.auth_code and found.card_id == card.card_id:
                return found, True
        for found in reversed(self._journal.closed_authorizations(record.rrn)):
            if found.auth_code == record.auth_code and found.card_id == card.card_id:
                return found, False
        return None, False

    def _expired_rest(self, authorization: AuthRecord | None, ts_ns: int) -> int:
        """An external authorization whose hold expired (or expires in this batch): what the
        partner's own debit still holds, since nobody told the partner of the expiry."""
        if authorization is None or authorization.user_hold_id or not authorization.external:
            return 0
        view = self._ledger.hold(open_hold_id(authorization))
        if view is None:
            return 0
        expiring = view.state is HoldState.pending and view.deadline_ns and view.deadline_ns <= ts_ns
        if view.state is not HoldState.expired and not expiring:
            return 0  # voided (the partner got the reversal) or posted (it got CLEARED)
        return max(0, authorization.amount - authorization.reversed_amount)

    def _remaining(self, hold_id: int, overlay: Overlay, ts_ns: int) -> int:
        view = self._ledger.hold(hold_id)
        if view is None or view.state is not HoldState.pending or hold_id in overlay.resolved:
            return 0
        if view.deadline_ns and view.deadline_ns <= ts_ns:
            return 0  # expires at the start of the very batch this plan goes into
        return view.remaining - overlay.taken.get(hold_id, 0)

    def _post(self, record: ClearingRecord, card: Card, authorization: AuthRecord, remaining: int, last: bool,
              overlay: Overlay, ts_ns: int) -> Plan:
        """Post the authorization's hold. Internal: the user hold (and the collateral hold beside it).
        External-balance partner: the deposit collateral hold alone, with the collateral codes; the
        user's money lives at the partner, which hears of the clearing from the outbox (cleared.py)."""
        amount = record.billing_amount
        hold = self._ledger.hold(open_hold_id(authorization))
        assert hold is not None and remaining > 0
        cleared_before = hold.posted + overlay.taken.get(hold.id, 0)  # earlier records (split)
        if amount >= remaining:
            posted, resolve = remaining, True
            outcome = ClearingOutcome.exact if amount == remaining else ClearingOutcome.over
        else:
            posted, resolve = amount, last
            outcome = ClearingOutcome.partial if last else ClearingOutcome.split
        excess = amount - posted
        transfers: list[TransferSpec] = []
        if authorization.user_hold_id:
            post_code, excess_code = ClearingCode.post, ClearingCode.excess
            if authorization.collateral_hold_id:
                transfers += self._collateral(card, authorization, record, posted, amount, resolve, overlay, ts_ns)
        else:
            assert hold.id == authorization.collateral_hold_id
            post_code, excess_code = ClearingCode.collateral_post, ClearingCode.collateral_excess
        flags = _POST | _FINAL if resolve else _POST
        transfers.append(TransferSpec(0, 0, 0, posted, flags=flags, pending_id=hold.id, code=post_code,
                                      reference=record.rrn))
        if excess:
            transfers.append(TransferSpec(0, hold.debit_account_id, hold.credit_account_id, excess, flags=_FORCED,
                                          code=excess_code, reference=record.rrn))
        overlay.take(hold.id, posted, resolve)
        released = remaining - posted if resolve else 0
        fee_refund = _fee_refund(card, authorization, hold, released)
        if fee_refund:
            transfers.append(TransferSpec(0, card.fee_income_account_id, hold.debit_account_id, fee_refund,
                                          code=FeeCode.transaction_refund, reference=record.rrn))
        event = _cleared(record, card, authorization, hold.amount, cleared_before + amount, outcome) if resolve \
            else None
        return Plan(outcome, None, _linked(transfers), hold.currency, cleared=amount, released=released,
                    hold_id=hold.id, cleared_event=event, fee_refunded=fee_refund)

    def _collateral(self, card: Card, authorization: AuthRecord, record: ClearingRecord, posted: int,
                    amount: int, resolve: bool, overlay: Overlay, ts_ns: int) -> list[TransferSpec]:
        hold_id = authorization.collateral_hold_id
        hold = self._ledger.hold(hold_id)
        remaining = self._remaining(hold_id, overlay, ts_ns)
        transfers = []
        collateral_posted = min(posted, remaining)
        if collateral_posted > 0:
            flags = _POST | _FINAL if resolve else _POST
            transfers.append(TransferSpec(0, 0, 0, collateral_posted, flags=flags, pending_id=hold_id,
                                          code=ClearingCode.collateral_post, reference=record.rrn))
            overlay.take(hold_id, collateral_posted, resolve or collateral_posted == remaining)
        rest = amount - collateral_posted
        # The hold's own accounts; the card's partner accounts when the ledger no longer remembers it.
        if hold is not None:
            debit, credit = hold.debit_account_id, hold.credit_account_id
        else:
            debit, credit = card.collateral_account_id, card.usage_account_id
        if rest > 0 and debit:
            transfers.append(TransferSpec(0, debit, credit, rest, flags=_FORCED, code=ClearingCode.collateral_excess,
                                          reference=record.rrn))
        return transfers


def _fee_refund(card: Card, authorization: AuthRecord, hold, released: int) -> int:
    """What a final post releasing `released` gives back of the authorization's transaction fee:
    the share Reverse would give for a release of that size (fees.refund_share). Only an internal
    user hold carries a fee (MoveFunds); `hold.released` already counts earlier reversals."""
    if released <= 0 or not authorization.fee or not authorization.user_hold_id or not card.fee_income_account_id:
        return 0
    assert hold.id == authorization.user_hold_id
    before = hold.amount - hold.released  # still charged or chargeable before this release
    assert 0 < released <= before <= hold.amount
    return refund_share(authorization.fee, hold.amount, before, before - released)


def _cleared(record: ClearingRecord, card: Card, authorization: AuthRecord, authorized: int, total: int,
             outcome: ClearingOutcome) -> ClearedTransaction | None:
    """The `transaction.cleared` event of a record that resolved its authorization (cleared.py)."""
    if not card.partner:
        return None
    assert total >= record.billing_amount > 0
    return ClearedTransaction(
        partner=card.partner, transaction_id=transaction_id(authorization.key), balance_id=card.balance_id,
        card_id=card.card_id, amount=total, currency=record.billing_currency, authorized_amount=authorized,
        original_amount=record.amount, original_currency=record.currency, record_id=record.record_id,
        outcome=str(outcome), processing_code=authorization.processing_code,
        authorized_at_ns=authorization.timestamp_ns, rrn=record.rrn, mcc=record.mcc,
        merchant_name=record.merchant_name, pan_last4=card.pan_last4,
    )


@attrs.frozen
class _Forced:
    """What names an external card's forced transaction (cleared.ForcedTransaction)."""

    identity: str  # the clearing record's identity
    ts_ns: int  # the batch's timestamp
    reference_id: str  # the matched authorization's transactionId ('' if none matched)
    expired_rest: int  # external, late after expiry: the authorization's debit still at the partner


def _force(record: ClearingRecord, card: Card, settlement: int, outcome: ClearingOutcome, forced: _Forced) -> Plan:
    amount = record.billing_amount
    transfers = []
    if card.collateral_account_id:
        transfers.append(TransferSpec(0, card.collateral_account_id, card.usage_account_id, amount, flags=_FORCED,
                                      code=ClearingCode.collateral_forced, reference=record.rrn))
    if card.external:  # the card's local balance holds no money: the partner force-debits its own
        event = _forced_event(record, card, outcome, "debit", forced)
        return Plan(outcome, None, _linked(transfers) if transfers else (), card.currency, cleared=amount,
                    forced_event=event)
    transfers.append(TransferSpec(0, card.balance_account_id, settlement, amount, flags=_FORCED,
                                  code=ClearingCode.forced, reference=record.rrn))
    return Plan(outcome, None, _linked(transfers), card.currency, cleared=amount)


def _refund(record: ClearingRecord, card: Card, settlement: int, forced: _Forced, *, referenced: bool) -> Plan:
    # Credits the cardholder at once, as an approved refund on the wire does (MoveFunds, code 20);
    # an external partner credits its own balance (force-credit), nothing moves here, as on the wire.
    amount = record.billing_amount
    if card.external:
        event = _forced_event(record, card, ClearingOutcome.refund, "credit", forced)
        return Plan(ClearingOutcome.refund, None, (), card.currency, refunded=amount, referenced=referenced,
                    forced_event=event)
    transfer = TransferSpec(0, settlement, card.balance_account_id, amount, code=ClearingCode.refund,
                            reference=record.rrn)
    return Plan(ClearingOutcome.refund, None, (transfer,), card.currency, refunded=amount, referenced=referenced)


def _forced_event(record: ClearingRecord, card: Card, outcome: ClearingOutcome, direction: str,
                  forced: _Forced) -> ForcedTransaction:
    assert card.external and card.partner and record.billing_amount > 0
    return ForcedTransaction(
        partner=card.partner, transaction_id=forced_transaction_id(forced.identity),
        reference_transaction_id=forced.reference_id, direction=direction, balance_id=card.balance_id,
        reverse_first=forced.expired_rest if direction == "debit" else 0,
        card_id=card.card_id, amount=record.billing_amount, currency=record.billing_currency,
        original_amount=record.amount, original_currency=record.currency, record_id=record.record_id,
        outcome=str(outcome), posted_at_ns=forced.ts_ns, rrn=record.rrn, mcc=record.mcc,
        merchant_name=record.merchant_name, pan_last4=card.pan_last4,
    )


def _linked(transfers: list[TransferSpec]) -> tuple[TransferSpec, ...]:
    """One chain: every transfer but the last carries `linked`."""
    assert transfers
    last = len(transfers) - 1
    return tuple(
        TransferSpec(t.id, t.debit_account_id, t.credit_account_id, t.amount, flags=t.flags | _LINKED,
                     pending_id=t.pending_id, code=t.code, reference=t.reference) if i < last else t
        for i, t in enumerate(transfers)
    )
