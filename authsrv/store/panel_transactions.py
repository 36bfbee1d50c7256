"""Store reads for the panel's transaction and clearing pages (authsrv/panel/views/transactions.py,
clearing.py). Reads only, each bounded; blocking (call from a worker thread).
"""

from __future__ import annotations

import attrs
import msgspec

from authsrv.store.db import CardRow, Store

CARDS_MATCHED_MAX = 50  # cards one masked PAN may name in a search (first 6 + last 4 repeat rarely)
# Clearing rows examined, newest first, to find the ones that posted a transaction's hold: there is
# no index by hold, and a clearing follows its authorization within days (holds expire in 7 or 30).
CLEARING_ROWS_SCANNED_MAX = 200_000
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


def clearing_rows_of_holds(store: Store, hold_ids: list[int]) -> list[ClearingRow]:
    """The clearing records that posted any of these holds, among the newest
    CLEARING_ROWS_SCANNED_MAX rows, oldest first."""
    wanted = {hold_id for hold_id in hold_ids if hold_id}
    if not wanted:
        return []
    patterns = [f'%"holdId":{hold_id},%' for hold_id in sorted(wanted)][:4]
    where = " OR ".join("r.plan_json LIKE ?" for _ in patterns)
    with store.locked():
        rows = store.db.execute(
            "SELECT r.identity, r.file_sha256, COALESCE(f.name, ''), r.record_id, r.line, r.outcome, r.state,"
            " r.created_at, r.plan_json FROM (SELECT rowid, * FROM clearing_records ORDER BY rowid DESC LIMIT ?) r"
            f" LEFT JOIN clearing_files f ON f.sha256 = r.file_sha256 WHERE {where} ORDER BY r.rowid",
            (CLEARING_ROWS_SCANNED_MAX, *patterns)).fetchall()
    found = []
    for row in rows:
        plan = _plan_decoder.decode(row[8])
        if plan.hold_id in wanted:
            found.append(ClearingRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], plan.hold_id,
                                     plan.currency, plan.cleared, plan.released, plan.refunded, plan.masked_pan))
    return found


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
