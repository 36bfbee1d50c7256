"""The panel's transaction search index: the most recent authorizations across all cards.

Where the panel reads transactions from, and why:
- Card activity (authsrv/hotpath/activity.py) is the durable, per-card view the REST history API
  uses: the last `ACTIVITY_PER_CARD_MAX` authorizations and declines of each card, kept in the
  journal snapshot and rebuilt by the log replay, so it survives a restart. A search that names a
  card (masked PAN, full PAN, card id) or a customer reads it directly, card by card.
- A search across all cards (RRN, authorization code, response code, date range) needs an index
  no one kept: this one. It holds the newest `INDEX_MAX` shown records (declines, and approvals
  that moved money: `activity.shown`) in a ring, with dictionaries by RRN and by authorization
  code. It is fed by the journal's listeners (O(1) per record, on the thread that owns the
  ledger) and seeded at start from the card activity, newest first, so after a restart it holds
  what the activity kept. Older records are still found through their card or customer.
- The journal's open and recently closed authorizations (clearing's index) are also asked by RRN.

Memory: ~214 bytes an entry past the records themselves, which the journal and the activity log
share (~43 MB at the bound, docs/operations.md). Seeding reads the whole activity log once at start
(about 1 s at its default bound of 1,000,000 records, less for a smaller log). Scans (response code or dates alone) walk the ring newest first in chunks of
`SCAN_CHUNK`, yielding to the event loop between chunks so the switch is never held for long; an
entry overwritten meanwhile is recognised by its sequence number and skipped.
"""

from __future__ import annotations

import collections
import heapq
import logging
from collections.abc import Callable, Iterable

import trio

from authsrv.hotpath.activity import shown
from authsrv.hotpath.journal import AuthJournal, AuthRecord

log = logging.getLogger("authsrv.panel")

INDEX_MAX = 200_000  # records across all cards searchable by RRN, auth code, response code, date
CANDIDATES_MAX = 10_000  # records one RRN or authorization code yields, newest first
SCAN_CHUNK = 5_000  # records examined between two yields to the event loop


class TransactionIndex:
    def __init__(self, capacity: int = INDEX_MAX) -> None:
        assert capacity > 0
        self.capacity = capacity
        self._journal: AuthJournal | None = None
        self._broken = False  # indexing failed: `follow` rebuilds
        self._slots: list[AuthRecord | None] = [None] * capacity
        self._next = 0  # sequence number of the next record; slot = seq % capacity
        self._by_rrn: dict[str, int | collections.deque[int]] = {}
        self._by_auth: dict[str, int | collections.deque[int]] = {}

    def __len__(self) -> int:
        return min(self._next, self.capacity)

    # -- feeding ---------------------------------------------------------------------------------

    def follow(self, journal: AuthJournal | None) -> None:
        """Index `journal` (seed from its card activity, then listen); again after a takeover
        replaced the journal, or after a failure. Runs on the thread that owns the ledger."""
        if journal is None or (journal is self._journal and not self._broken):
            return
        if self._journal is not None and self._journal is not journal and self._on_record in self._journal.listeners:
            self._journal.listeners.remove(self._on_record)
        self._reset()
        seeds = heapq.nlargest(self.capacity, _all_activity(journal.activity), key=lambda record: record.timestamp_ns)
        for record in reversed(seeds):
            self._append(record)
        if self._on_record not in journal.listeners:
            journal.listeners.append(self._on_record)
        self._journal = journal
        self._broken = False

    def _reset(self) -> None:
        self._slots = [None] * self.capacity
        self._next = 0
        self._by_rrn.clear()
        self._by_auth.clear()

    def _on_record(self, record: AuthRecord) -> None:
        """A journal listener: called with every record added, after the journal stored it. It runs
        inside the hot path's journal.add, so nothing it does may raise into the switch: a failure
        is logged once and indexing stops until the next search rebuilds the index (`follow`)."""
        if self._broken:
            return
        try:
            self._index(record)
        except Exception:  # a bug here must cost the panel's search, never an authorization
            self._broken = True
            log.exception("panel transaction index: a record could not be indexed; rebuilt at the next search")

    def _index(self, record: AuthRecord) -> None:
        if record.reverses:
            original = self._journal.get(record.reverses) if self._journal is not None else None
            if original is not None:
                self._replace(original)  # its reversed_amount moved
            return
        if self._replace(record):
            return  # a decision replaced (stand-in): same entry, new outcome
        if shown(record):
            self._append(record)

    def _replace(self, record: AuthRecord) -> bool:
        for seq in _members(self._by_rrn.get(record.rrn)):
            slot = seq % self.capacity
            current = self._slots[slot]
            if current is not None and current.key == record.key:
                self._slots[slot] = record
                if current.auth_code != record.auth_code:
                    _remove(self._by_auth, current.auth_code, seq)
                    if record.auth_code:
                        _add(self._by_auth, record.auth_code, seq)
                return True
        return False

    def _append(self, record: AuthRecord) -> None:
        seq = self._next
        slot = seq % self.capacity
        old = self._slots[slot]
        if old is not None:  # the oldest entry leaves
            old_seq = seq - self.capacity
            _remove(self._by_rrn, old.rrn, old_seq)
            if old.auth_code:
                _remove(self._by_auth, old.auth_code, old_seq)
        self._slots[slot] = record
        _add(self._by_rrn, record.rrn, seq)
        if record.auth_code:
            _add(self._by_auth, record.auth_code, seq)
        self._next = seq + 1

    # -- reading ---------------------------------------------------------------------------------

    def _live(self, seq: int) -> AuthRecord | None:
        if seq < self._next - self.capacity or seq >= self._next:
            return None
        return self._slots[seq % self.capacity]

    def by_rrn(self, rrn: str, limit: int = CANDIDATES_MAX) -> list[AuthRecord]:
        """Newest first, at most `limit`."""
        return self._bucket(self._by_rrn.get(rrn), limit)

    def by_auth_code(self, auth_code: str, limit: int = CANDIDATES_MAX) -> list[AuthRecord]:
        """Newest first, at most `limit`."""
        return self._bucket(self._by_auth.get(auth_code), limit)

    def _bucket(self, value, limit: int) -> list[AuthRecord]:
        found: list[AuthRecord] = []
        for seq in reversed(tuple(_members(value))):
            record = self._live(seq)
            if record is not None:
                found.append(record)
                if len(found) >= limit:
                    break
        return found

    def get(self, key: str) -> AuthRecord | None:
        rrn = key.rsplit("|", 1)[-1]
        for record in self.by_rrn(rrn):
            if record.key == key:
                return record
        return None

    async def scan(self, keep: Callable[[AuthRecord], bool], *, before_seq: int | None, limit: int
                   ) -> tuple[list[AuthRecord], int | None]:
        """Newest first: up to `limit` records that `keep` accepts, starting below `before_seq`.
        Returns them and the cursor of the next page (None: the ring is exhausted)."""
        assert limit > 0
        seq = self._next - 1 if before_seq is None else min(before_seq, self._next) - 1
        found: list[AuthRecord] = []
        examined = 0
        while seq >= max(0, self._next - self.capacity):
            record = self._live(seq)
            if record is not None and keep(record):
                if len(found) == limit:
                    return found, seq + 1
                found.append(record)
            seq -= 1
            examined += 1
            if examined % SCAN_CHUNK == 0:
                await trio.lowlevel.checkpoint()  # let the switch run; entries overwritten meanwhile are skipped
        return found, None


def _all_activity(activity) -> Iterable[AuthRecord]:
    for card_id in activity.card_ids():
        yield from activity.of_card(card_id)


def _members(value: int | collections.deque[int] | None) -> Iterable[int]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else value


def _add(buckets: dict[str, int | collections.deque[int]], name: str, seq: int) -> None:
    """Sequence numbers of a name, ascending: one int, or a deque once a name repeats."""
    current = buckets.get(name)
    if current is None:
        buckets[name] = seq
    elif isinstance(current, int):
        buckets[name] = collections.deque((current, seq))
    else:
        current.append(seq)


def _remove(buckets: dict[str, int | collections.deque[int]], name: str, seq: int) -> None:
    current = buckets.get(name)
    if current is None:
        return
    if isinstance(current, int):
        if current == seq:
            del buckets[name]
        return
    if current[0] == seq:
        current.popleft()  # the ring drops its oldest entry: O(1)
    elif seq in current:
        current.remove(seq)  # an authorization code replaced (rare)
    if len(current) == 1:
        buckets[name] = current[0]
    elif not current:
        del buckets[name]
