"""Hold expiry as the server sees it: which holds each ledger batch expired, and what follows.

The ledger expires holds at the start of any batch whose logged timestamp passes their deadline
(ledger/state.py), so every batch the server submits (the idle tick, the hot path, the REST money
gateway, clearing) may expire some; `BatchResult.expired` names them. `ObservedLedger` is the one
place that sees every result, so the expiry metric and the open-authorization index cannot miss an
expiry whichever caller triggered it.

An expired hold also gives its transaction fee back (`ExpiryFeeRefunds`, docs/money.md "Fees"):
fee income -> the user's balance, code 42, in a batch submitted right after the one that expired
the hold, from the expiry listener. Exactly once, across crashes too:
- the refund's transfer id is derived from the hold id (fees.expiry_fee_refund_id), so any second
  submission of it is answered `exists` by the ledger and moves nothing;
- a crash after the expiring batch is durable but before the refund's is loses the refund (replay
  does not call listeners); `recover()`, run at start before any new batch, finds every expired
  hold with a fee whose refund id the ledger does not know, and refunds it;
- the ledger remembers an expired hold and the refund's id for 24 h of logged time after they
  resolve, and the refund is always remembered at least as long as its hold (it is applied after
  the expiry, and ids leave in the order they entered): whenever `recover()` still sees an expired
  hold, it also sees its refund if there was one. A hold it no longer sees (down more than 24 h
  of logged time with the refund lost) is not refunded twice, but not at all either: logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from authsrv.hotpath.fees import HOLD_ID_DERIVABLE_MAX, FeeCode, expiry_fee_refund_id, refund_share
from ledger.durable import DurableLedger
from ledger.state import HoldState, HoldView
from ledger.types import Batch, BatchResult, TransferSpec, TransferStatus
from ledger.wal import WalFullError

log = logging.getLogger("authsrv.clearing.expiry")

ExpiryListener = Callable[[tuple[int, ...]], None]
REFUNDS_PER_BATCH_MAX = 4_096  # below the ledger's 8,192 transfers per batch
REFUNDS_OWED_MAX = 100_000  # refunds waiting for room in the log; past it, `recover()` at start finds them


class ObservedLedger(DurableLedger):
    """A DurableLedger that hands the ids of expired holds to its listeners after each submit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.expiry_listeners: list[ExpiryListener] = []
        # Called after every submit while not empty: work that waits for room in the log (a
        # refund refused by WalFullError). Empty on the hot path but for such moments.
        self.after_submit: list[Callable[[], None]] = []
        # The authorization journal whose records ride in this ledger's `app` bytes (set by whoever
        # rebuilt both, authsrv.app.open_ledger_and_journal); clearing matches against it.
        self.journal = None

    def submit(self, batch: Batch, *, finish=None) -> tuple[BatchResult, int]:
        result, seq = super().submit(batch, finish=finish)
        if result.expired:
            for listener in self.expiry_listeners:
                listener(result.expired)
        if self.after_submit:
            for retry in list(self.after_submit):  # a retry may submit, and remove itself
                retry()
        return result, seq


def watch_expiry(ledger: ObservedLedger, journal, counter=None) -> None:
    """Expired holds leave the journal's open-authorization index and are counted."""

    def on_expired(hold_ids: tuple[int, ...]) -> None:
        assert hold_ids
        if counter is not None:
            counter.inc(len(hold_ids))
        journal.close_holds(hold_ids)

    ledger.expiry_listeners.append(on_expired)


class ExpiryFeeRefunds:
    """The fee of an authorization whose user hold expired goes back to the user (module doc).

    The share follows the rule of reversals (fees.refund_share): the fee kept is fee x charged /
    authorized, where what stays charged after the expiry is what clearing had posted (a split
    shipment) and what was outstanding before it is the authorized amount less what reversals
    released; an untouched hold gets its whole fee back. Only the hot path's internal holds carry
    a fee (MoveFunds); external-balance partners' collateral holds have none.
    """

    def __init__(self, ledger: ObservedLedger, journal, index) -> None:
        self._ledger = ledger
        self._journal = journal  # authsrv.hotpath.journal.AuthJournal
        self._index = index  # authsrv.store.index.CardIndex: the partner's fee-income account
        self._owed: dict[int, TransferSpec] = {}  # refunds the log had no room for, by hold id
        self.refunded = 0  # refunds applied by this process (count)

    def on_expired(self, hold_ids: tuple[int, ...]) -> None:
        found = (self._refund_of_hold(hold_id) for hold_id in hold_ids)
        self._submit([spec for spec in found if spec is not None])

    def recover(self) -> int:
        """At start, before any new batch: refund every expired hold whose refund is missing."""
        refunds = [spec for spec in map(self._refund_of_record, self._journal.recently_closed())
                   if spec is not None]
        if refunds:
            log.warning("refunding the fee of %d expired holds whose refund was not logged", len(refunds))
        return self._submit(refunds)

    def _refund_of_hold(self, hold_id: int) -> TransferSpec | None:
        view = self._ledger.ledger.hold(hold_id)
        if view is None or not view.reference:
            return None
        record = self._journal.open_authorization(hold_id)
        if record is None:  # the journal's own listener closed it first
            record = next((r for r in self._journal.closed_authorizations(view.reference)
                           if r.user_hold_id == hold_id), None)
        return None if record is None else self._refund_of_record(record, view)

    def _refund_of_record(self, record, view: HoldView | None = None) -> TransferSpec | None:
        if not record.fee or not record.user_hold_id or record.user_hold_id > HOLD_ID_DERIVABLE_MAX:
            return None
        view = view or self._ledger.ledger.hold(record.user_hold_id)
        if view is None or view.state is not HoldState.expired:
            return None
        transfer_id = expiry_fee_refund_id(view.id)
        if self._ledger.ledger.transfer_status(transfer_id) is not None or view.id in self._owed:
            return None  # refunded already (or waiting for room in the log)
        fee_income = self._fee_income(record)
        if fee_income is None:
            log.error("expired hold %d: no fee-income account in %s; fee %d not refunded", view.id,
                      record.currency, record.fee)
            return None
        # Outstanding before the expiry: authorized less what reversals released (never below
        # what clearing posted); after it: what clearing posted.
        before = max(view.amount - record.reversed_amount, view.posted)
        share = refund_share(record.fee, view.amount, min(before, view.amount), view.posted)
        if share <= 0:
            return None
        return TransferSpec(transfer_id, fee_income, view.debit_account_id, share, code=FeeCode.transaction_refund,
                            reference=view.reference)

    def _fee_income(self, record) -> int | None:
        card = self._index.card_by_id(record.card_id)
        partner = self._index.partner(card.partner) if card is not None else None
        return partner.fee_income_account_ids.get(record.currency) if partner is not None else None

    def _submit(self, refunds: Iterable[TransferSpec]) -> int:
        """Submit in batches of REFUNDS_PER_BATCH_MAX; what the log has no room for waits."""
        pending = list(refunds)
        applied = 0
        while pending:  # bounded: each round consumes up to REFUNDS_PER_BATCH_MAX
            chunk, pending = pending[:REFUNDS_PER_BATCH_MAX], pending[REFUNDS_PER_BATCH_MAX:]
            try:
                result, _ = self._ledger.submit(Batch(timestamp_ns=0, transfers=tuple(chunk)))
            except WalFullError:
                self._owe(chunk + pending)
                return applied
            for spec, status in zip(chunk, result.transfer_results):
                self._owed.pop(_hold_of(spec), None)
                if status is TransferStatus.created:
                    applied += 1
                elif status is not TransferStatus.exists:
                    log.error("expiry fee refund %d refused by the ledger: %s", spec.id, status.name)
        self.refunded += applied
        return applied

    def _owe(self, refunds: list[TransferSpec]) -> None:
        for spec in refunds:
            if len(self._owed) < REFUNDS_OWED_MAX:
                self._owed[_hold_of(spec)] = spec
        if self._owed and self._retry not in self._ledger.after_submit:
            self._ledger.after_submit.append(self._retry)

    def _retry(self) -> None:
        """After a later submit: try the owed refunds again (room may have come back)."""
        self._ledger.after_submit.remove(self._retry)
        owed = list(self._owed.values())
        self._owed.clear()
        self._submit(spec for spec in owed if self._ledger.ledger.transfer_status(spec.id) is None)


def _hold_of(refund: TransferSpec) -> int:
    """The hold id an expiry fee refund's id was derived from (fees.expiry_fee_refund_id)."""
    hold_id = refund.id - expiry_fee_refund_id(1) + 1
    assert expiry_fee_refund_id(hold_id) == refund.id
    return hold_id


def watch_expiry_fees(ledger: ObservedLedger, journal, index) -> ExpiryFeeRefunds:
    """Install the fee refunds of expired holds (once per ledger), after catching up on any a crash
    lost. Call once the card index is loaded and before the first new batch."""
    for listener in ledger.expiry_listeners:
        owner = getattr(listener, "__self__", None)
        if isinstance(owner, ExpiryFeeRefunds):
            return owner
    refunds = ExpiryFeeRefunds(ledger, journal, index)
    refunds.recover()
    ledger.expiry_listeners.append(refunds.on_expired)
    return refunds
