"""The delivery table in the management store: what must reach partners, and how far it got.

    pending --2xx--> delivered
    pending --try failed, tries left--> pending (next_at_ms later)
    pending --last try failed--> dead --admin replay--> pending (tries 0, same key, same body)

Every method is one short store transaction (call them from a worker thread: they fsync).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import attrs

from authsrv.notify.calls import PartnerCall
from authsrv.store.db import Store, utc_now_iso

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
STATES = (PENDING, DELIVERED, DEAD)
DUE_PAGE_MAX = 1_000
DEAD_PAGE_MAX = 500
ERROR_TEXT_MAX = 200
PRUNE_PAGE_MAX = 10_000

_COLUMNS = ("id, partner, kind, method, path, body, idempotency_key, order_key, source, state, tries,"
            " tries_max, next_at_ms, last_status, last_error, created_at, updated_at")


@attrs.frozen
class Delivery:
    id: int
    partner: str
    kind: str
    method: str
    path: str
    body: str
    idempotency_key: str
    order_key: str
    source: str
    state: str
    tries: int
    tries_max: int  # 0: unbounded
    next_at_ms: int
    last_status: int
    last_error: str
    created_at: str
    updated_at: str


@attrs.frozen
class Outcome:
    """What one try came to, to be written back."""

    delivery_id: int
    delivered: bool
    status: int  # HTTP status, 0 when no answer
    error: str  # '' when delivered
    next_at_ms: int  # when to try again (ignored when delivered or dead)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class OutboxStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    # -- scheduling ------------------------------------------------------------------------------

    def schedule(self, calls: Iterable[PartnerCall], *, tries_max: int, cursor: tuple[str, int] | None = None) -> int:
        """Insert the calls (a key already known is ignored) and move `cursor`, in one transaction."""
        now, created = now_ms(), utc_now_iso()
        rows = [(call.partner, call.kind.value, call.method, call.path, call.body.decode(), call.idempotency_key,
                 call.order_key, call.source, PENDING, call.tries_max if call.tries_max == 0 else tries_max,
                 now, created, created) for call in calls]
        with self._store.transaction():
            conn = self._store.db.conn
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO deliveries (partner, kind, method, path, body, idempotency_key, order_key,"
                " source, state, tries_max, next_at_ms, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            inserted = conn.total_changes - before
            if cursor is not None:
                self._set_cursor(*cursor)
        return inserted

    def cursor(self, source: str) -> int:
        with self._store.locked():
            found = self._store.db.execute(
                "SELECT position FROM delivery_cursors WHERE source = ?", (source,)).fetchone()
        return int(found[0]) if found else 0

    def _set_cursor(self, source: str, position: int) -> None:
        # Cursors only move forward: a late, smaller position from a catch-up scan never rewinds.
        self._store.db.execute(
            "INSERT INTO delivery_cursors (source, position, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (source) DO UPDATE SET position = MAX(position, excluded.position),"
            " updated_at = excluded.updated_at", (source, position, utc_now_iso()))

    def set_cursor(self, source: str, position: int) -> None:
        with self._store.transaction():
            self._set_cursor(source, position)

    # -- dispatch --------------------------------------------------------------------------------

    def due(self, *, limit: int, exclude: Iterable[int] = ()) -> list[Delivery]:
        """Pending calls whose time has come and that are first in their order key, oldest first."""
        assert 0 < limit <= DUE_PAGE_MAX
        excluded = set(exclude)
        with self._store.locked():
            rows = self._store.db.execute(
                f"SELECT {_COLUMNS} FROM deliveries d WHERE state = 'pending' AND next_at_ms <= ?"
                " AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.state = 'pending'"
                " AND e.order_key = d.order_key AND e.id < d.id) ORDER BY id LIMIT ?",
                (now_ms(), limit + len(excluded))).fetchall()
        return [Delivery(*row) for row in rows if row[0] not in excluded][:limit]

    def next_due_ms(self) -> int | None:
        with self._store.locked():
            found = self._store.db.execute(
                "SELECT MIN(next_at_ms) FROM deliveries WHERE state = 'pending'").fetchone()
        return None if found is None or found[0] is None else int(found[0])

    def record(self, outcomes: Iterable[Outcome]) -> list[Delivery]:
        """Write back tries; returns the deliveries that became dead letters."""
        died: list[Delivery] = []
        stamp = utc_now_iso()
        with self._store.transaction():
            for outcome in outcomes:
                row = self.get(outcome.delivery_id)
                if row is None or row.state != PENDING:
                    continue  # replayed or pruned meanwhile
                tries = row.tries + 1
                if outcome.delivered:
                    state = DELIVERED
                elif row.tries_max and tries >= row.tries_max:
                    state = DEAD
                else:
                    state = PENDING
                self._store.db.execute(
                    "UPDATE deliveries SET state = ?, tries = ?, next_at_ms = ?, last_status = ?, last_error = ?,"
                    " updated_at = ? WHERE id = ?",
                    (state, tries, outcome.next_at_ms, outcome.status, outcome.error[:ERROR_TEXT_MAX], stamp,
                     row.id))
                if state == DEAD:
                    died.append(attrs.evolve(row, state=DEAD, tries=tries))
        return died

    # -- admin -----------------------------------------------------------------------------------

    def get(self, delivery_id: int) -> Delivery | None:
        with self._store.locked():
            found = self._store.db.execute(f"SELECT {_COLUMNS} FROM deliveries WHERE id = ?",
                                           (delivery_id,)).fetchone()
        return Delivery(*found) if found else None

    def dead(self, *, after_id: int = 0, limit: int = 100) -> list[Delivery]:
        assert 0 < limit <= DEAD_PAGE_MAX
        with self._store.locked():
            rows = self._store.db.execute(
                f"SELECT {_COLUMNS} FROM deliveries WHERE state = 'dead' AND id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall()
        return [Delivery(*row) for row in rows]

    def replay(self, delivery_id: int) -> Delivery | None:
        """A dead letter goes back to pending with its tries reset: same body, same key."""
        with self._store.transaction():
            updated = self._store.db.execute(
                "UPDATE deliveries SET state = 'pending', tries = 0, next_at_ms = ?, updated_at = ?"
                " WHERE id = ? AND state = 'dead'", (now_ms(), utc_now_iso(), delivery_id)).rowcount
        return self.get(delivery_id) if updated else None

    def counts(self) -> dict[str, int]:
        """Pending and dead rows (index ranges: delivered rows, the many, are not counted)."""
        counts = dict.fromkeys(STATES, 0)
        with self._store.locked():
            for state in (PENDING, DEAD):
                (counts[state],) = self._store.db.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE state = ?", (state,)).fetchone()
        return counts

    def prune_delivered(self, *, older_than_ms: int) -> int:
        """Delivered rows past the time any source could schedule them again (a bounded page)."""
        with self._store.transaction():
            return self._store.db.execute(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries WHERE state = 'delivered'"
                " AND next_at_ms < ? LIMIT ?)", (older_than_ms, PRUNE_PAGE_MAX)).rowcount
