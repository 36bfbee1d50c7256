"""Partner-balance reloads with an idempotency key: the key always names the same ledger transfer.

The panel's reload form carries a key generated into the page, so a double submit (or a retry
after a lost answer) replays one transfer instead of moving the money twice; the same rule as
user-balance reloads with `X-Idempotency-Key` (the store's `reloads` table, which is keyed by a
user balance). A row is PENDING from the reservation (transfer id allocated) until the reload's
event is recorded (DONE). Only the call that flips PENDING to DONE records the event, so two
submits racing over one key record it once. (The ledger never refuses a collateral reload: the
funding account has no limit.)

The table is created by the first reservation, inside its own transaction (so a cluster standby
gets it with the row). Functions take the Store; call them from a worker thread.
"""

from __future__ import annotations

import attrs

from authsrv.store.db import Store, utc_now_iso

PENDING = "PENDING"
DONE = "DONE"
KEY_LENGTH_MAX = 128

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS partner_reloads (ledger_account_id INTEGER NOT NULL, key TEXT NOT NULL,"
    " transfer_id TEXT NOT NULL, amount INTEGER NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL,"
    " PRIMARY KEY (ledger_account_id, key))"
)


@attrs.frozen
class PartnerReload:
    ledger_account_id: int
    key: str
    transfer_id: int
    amount: int
    state: str  # PENDING -> DONE


def reserve(store: Store, ledger_account_id: int, key: str, amount: int) -> PartnerReload:
    """The key's reload, created with a fresh management transfer id when the key is new."""
    assert key and len(key) <= KEY_LENGTH_MAX and amount > 0
    with store.transaction():
        if not _exists(store):
            store._conn.execute(_SCHEMA)
        found = _get(store, ledger_account_id, key)
        if found is not None:
            return found
        (transfer_id,) = store.allocate_transfer_ids(1)
        store._conn.execute(
            "INSERT INTO partner_reloads (ledger_account_id, key, transfer_id, amount, state, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", (ledger_account_id, key, str(transfer_id), amount, PENDING, utc_now_iso()))
    return PartnerReload(ledger_account_id, key, transfer_id, amount, PENDING)


def finish(store: Store, ledger_account_id: int, key: str) -> bool:
    """PENDING -> DONE inside the caller's transaction; False when another call already did it."""
    with store.transaction():
        cursor = store._conn.execute(
            "UPDATE partner_reloads SET state = ? WHERE ledger_account_id = ? AND key = ? AND state = ?",
            (DONE, ledger_account_id, key, PENDING))
        return cursor.rowcount == 1


def _exists(store: Store) -> bool:
    row = store._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'partner_reloads'")
    return row.fetchone() is not None


def _get(store: Store, ledger_account_id: int, key: str) -> PartnerReload | None:
    row = store._conn.execute(
        "SELECT ledger_account_id, key, transfer_id, amount, state FROM partner_reloads"
        " WHERE ledger_account_id = ? AND key = ?", (ledger_account_id, key)).fetchone()
    if row is None:
        return None
    return PartnerReload(int(row[0]), row[1], int(row[2]), int(row[3]), row[4])
