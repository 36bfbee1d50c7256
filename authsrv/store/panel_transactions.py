"""Store reads for the panel's transaction and clearing pages (authsrv/panel/views/transactions.py,
clearing.py). Reads only, each bounded; blocking (call from a worker thread).
"""

from __future__ import annotations

import datetime

import attrs
import msgspec

from authsrv.store.db import CardRow, Store

CARDS_MATCHED_MAX = 50  # cards one masked PAN may name in a search (first 6 + last 4 repeat rarely)
# Clearing rows examined in one range to find the ones that posted a transaction's hold (no index
# by hold): rows written near the ledger's clearing events, or the newest ones.
CLEARING_ROWS_SCANNED_MAX = 50_000
AROUND_MAX = 8  # clearing moments looked at for one transaction (a split clearing has several)
WRITTEN_BEFORE_NS = 30 * 10**9  # a chunk's rows are written before its ledger batch applies
WRITTEN_AFTER_NS = 2 * 10**9
CLEARING_FILES_PAGE_MAX = 100


def cards_by_masked_pan(store: Store, first6: str, last4: str, *, limit: int = CARDS_MATCHED_MAX) -> list[CardRow]:
    """Cards whose PAN starts with `first6` and ends with `last4` (at most `limit`, by id)."""
    assert len(first6) == 6 and len(last4) == 4 and first6.isdigit() and last4.isdigit()
    with store.locked():
        ids = [row[0] for row in store.db.execute(
            "SELECT id FROM cards WHERE pan_first6 = ? AND pan_last4 = ? ORDER BY id LIMIT ?",
            (first6, last4, limit)).fetchall()]
    return [card for card in (store.get_card(card_id) for card_id in ids) if card is not None]


@attrs.frozen
class ClearingRow:
    """A clearing record row as the panel shows it (never the PAN: the plan keeps it masked)."""

    identity: str
    file_sha256: str
    file_name: str
    record_id: str
    line: int
    outcome: str
    state: str
    created_at: str
    hold_id: int
    currency: str
    cleared: int
    released: int
    refunded: int
    masked_pan: str


class _Plan(msgspec.Struct, rename="camel"):
    hold_id: int = 0
    currency: str = ""
    cleared: int = 0
    released: int = 0
    refunded: int = 0
    masked_pan: str = ""


_plan_decoder = msgspec.json.Decoder(_Plan)


def clearing_rows_of_holds(store: Store, hold_ids: list[int], *, around_ns: list[int] = (),
                           newest: bool = False) -> list[ClearingRow]:
    """The clearing records that posted any of these holds, oldest first. There is no index by
    hold: rows are looked for among those written near `around_ns` (the times clearing moved the
    transaction's money, from the ledger: a chunk's rows are written just before its batch), and,
    with `newest`, among the newest CLEARING_ROWS_SCANNED_MAX rows."""
    wanted = {hold_id for hold_id in hold_ids if hold_id}
    if not wanted:
        return []
    patterns = [f'%"holdId":{hold_id},%' for hold_id in sorted(wanted)][:4]
    where = " OR ".join("r.plan_json LIKE ?" for _ in patterns)
    found: dict[str, ClearingRow] = {}
    with store.locked():
        ranges = [_rowids_written(store, moment_ns - WRITTEN_BEFORE_NS, moment_ns + WRITTEN_AFTER_NS)
                  for moment_ns in sorted(set(around_ns))[:AROUND_MAX]]
        if newest:
            (last,) = store.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM clearing_records").fetchone()
            ranges.append((max(1, last - CLEARING_ROWS_SCANNED_MAX + 1), last))
        for low, high in ranges:
            if high < low:
                continue
            rows = store.db.execute(
                "SELECT r.identity, r.file_sha256, COALESCE(f.name, ''), r.record_id, r.line, r.outcome, r.state,"
                " r.created_at, r.plan_json FROM clearing_records r LEFT JOIN clearing_files f"
                f" ON f.sha256 = r.file_sha256 WHERE r.rowid BETWEEN ? AND ? AND ({where}) ORDER BY r.rowid",
                (low, min(high, low + CLEARING_ROWS_SCANNED_MAX - 1), *patterns)).fetchall()
            for row in rows:
                plan = _plan_decoder.decode(row[8])
                if plan.hold_id in wanted:
                    found[row[0]] = ClearingRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                                                plan.hold_id, plan.currency, plan.cleared, plan.released,
                                                plan.refunded, plan.masked_pan)
    return sorted(found.values(), key=lambda row: (row.created_at, row.file_sha256, row.line))


def _rowids_written(store: Store, low_ns: int, high_ns: int) -> tuple[int, int]:
    """The rowids of clearing rows written between the two times (second precision): rows are
    appended, so `created_at` grows with the rowid; found by bisection, O(log rows)."""
    low_text, high_text = _iso_second(low_ns), _iso_second(high_ns)
    (first, last) = store.db.execute("SELECT COALESCE(MIN(rowid), 1), COALESCE(MAX(rowid), 0)"
                                     " FROM clearing_records").fetchone()
    return (_first_at_or_after(store, first, last + 1, low_text),
            _first_at_or_after(store, first, last + 1, high_text, after=True) - 1)


def _first_at_or_after(store: Store, low: int, high: int, text: str, *, after: bool = False) -> int:
    """The smallest rowid in [low, high) whose row was written at `text` or later (`after`: later
    than `text`); `high` when none."""
    while low < high:  # bounded: log2 of the rows
        middle = (low + high) // 2
        found = store.db.execute("SELECT created_at FROM clearing_records WHERE rowid >= ? ORDER BY rowid LIMIT 1",
                                 (middle,)).fetchone()
        if found is None or (found[0] > text if after else found[0] >= text):
            high = middle
        else:
            low = middle + 1
    return low


def _iso_second(timestamp_ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp_ns // 10**9, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class ClearingFileRow:
    sha256: str
    name: str
    received_at: str
    applied_at: str  # '' while not finished
    summary_json: str  # '' while not finished


def clearing_files(store: Store, *, before: str = "", limit: int = 50) -> list[ClearingFileRow]:
    """Newest first (by receipt time), `limit` files received before `before` ('' = from the newest)."""
    assert 0 < limit <= CLEARING_FILES_PAGE_MAX
    with store.locked():
        rows = store.db.execute(
            "SELECT sha256, name, received_at, applied_at, summary_json FROM clearing_files"
            " WHERE (? = '' OR received_at || sha256 < ?) ORDER BY received_at DESC, sha256 DESC LIMIT ?",
            (before, before, limit)).fetchall()
    return [ClearingFileRow(*row) for row in rows]


def clearing_file(store: Store, sha256: str) -> ClearingFileRow | None:
    with store.locked():
        row = store.db.execute(
            "SELECT sha256, name, received_at, applied_at, summary_json FROM clearing_files WHERE sha256 = ?",
            (sha256,)).fetchone()
    return ClearingFileRow(*row) if row else None


def clearing_file_states(store: Store, sha256: str) -> list[tuple[str, str, int]]:
    """(outcome, state, records) of one file's record rows."""
    with store.locked():
        rows = store.db.execute(
            "SELECT outcome, state, COUNT(*) FROM clearing_records WHERE file_sha256 = ? GROUP BY outcome, state"
            " ORDER BY outcome, state", (sha256,)).fetchall()
    return [(row[0], row[1], int(row[2])) for row in rows]
