"""The authorization journal rebuilt on a replayed ledger, and the operator's bounds put on both.

One procedure for every place that rebuilds the switch's state from a snapshot and the log: the
server's start (authsrv.app.open_ledger_and_journal), a cluster node's restore, and the compactor
that writes the server's snapshots from another process (authsrv.compactor). Kept apart from
authsrv.app so that the compactor starts without importing the server.
"""

from __future__ import annotations

from collections.abc import Callable

from authsrv.hotpath.journal import AuthJournal
from ledger.state import HoldState, Ledger


def rebuild_journal(journal: AuthJournal, ledger: Ledger, app_snapshot: bytes, replayed: list[bytes], bounds) -> None:
    """The journal from the snapshot's image and the `app` bytes of the records replayed after it,
    once the ledger has replayed them too: the server's recovery, and a compactor's (authsrv.compactor)."""
    # After replay, which ran with the bounds the snapshot recorded: the next batch evicts down to
    # the ids bound; history lists are trimmed now.
    set_ledger_bounds(ledger, bounds)
    # Replay has finished, so hold states are final: the open-authorization index keeps only the
    # approvals whose holds still hold money at the end of the log.
    journal.hold_open = hold_pending(ledger)
    journal.load_snapshot(app_snapshot)
    for data in replayed:  # the snapshot's journal first, then every record after it, in log order
        journal.on_app(0, data)
    replayed.clear()
    journal.prune()  # holds resolved after the snapshot (expired, posted by clearing, voided)


def new_journal(config) -> AuthJournal:
    return AuthJournal(retention_ns=config.duplicates.retention_hours * 3600 * 10**9,
                       records_max=config.duplicates.records_max, closed_max=config.duplicates.closed_max,
                       activities_max=config.history.activities_max)


def set_ledger_bounds(ledger: Ledger, bounds) -> None:
    """The operator's `[ledger]` count bounds onto an opened ledger."""
    ledger.set_bounds(ids_max=bounds.ids_max, holds_pending_max=bounds.holds_pending_max,
                      history_per_account_max=bounds.history_per_account_max)


def hold_pending(ledger: Ledger) -> Callable[[int], bool]:
    """hold id -> does it still hold money? (the open-authorization index's membership rule)"""

    def pending(hold_id: int) -> bool:
        view = ledger.hold(hold_id)
        return view is not None and view.state is HoldState.pending

    return pending
