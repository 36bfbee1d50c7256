"""Hold expiry as the server sees it: which holds each ledger batch expired, and what follows.

The ledger expires holds at the start of any batch whose logged timestamp passes their deadline
(ledger/state.py), so every batch the server submits (the idle tick, the hot path, the REST money
gateway, clearing) may expire some; `BatchResult.expired` names them. `ObservedLedger` is the one
place that sees every result, so the expiry metric and the open-authorization index cannot miss an
expiry whichever caller triggered it.
"""

from __future__ import annotations

from collections.abc import Callable

from ledger.durable import DurableLedger
from ledger.state import HoldState, Ledger
from ledger.types import Batch, BatchResult

ExpiryListener = Callable[[tuple[int, ...]], None]


class ObservedLedger(DurableLedger):
    """A DurableLedger that hands the ids of expired holds to its listeners after each submit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.expiry_listeners: list[ExpiryListener] = []
        # The authorization journal whose records ride in this ledger's `app` bytes (set by whoever
        # rebuilt both, authsrv.app.open_ledger_and_journal); clearing matches against it.
        self.journal = None

    def submit(self, batch: Batch, *, finish=None) -> tuple[BatchResult, int]:
        result, seq = super().submit(batch, finish=finish)
        if result.expired:
            for listener in self.expiry_listeners:
                listener(result.expired)
        return result, seq


def hold_pending(ledger: Ledger) -> Callable[[int], bool]:
    """hold id -> does it still hold money? (the open-authorization index's membership rule)"""

    def pending(hold_id: int) -> bool:
        view = ledger.hold(hold_id)
        return view is not None and view.state is HoldState.pending

    return pending


def watch_expiry(ledger: ObservedLedger, journal, counter=None) -> None:
    """Expired holds leave the journal's open-authorization index and are counted."""

    def on_expired(hold_ids: tuple[int, ...]) -> None:
        assert hold_ids
        if counter is not None:
            counter.inc(len(hold_ids))
        journal.close_holds(hold_ids)

    ledger.expiry_listeners.append(on_expired)
