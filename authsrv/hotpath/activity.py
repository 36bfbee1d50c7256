"""Recent card activity for transaction history: the last journal records of each card.

The journal forgets records after 24 h and the ledger knows money, not merchants or declines, so
the history (authsrv/rest/history_api.py) reads its rows from here: per card, the last
`ACTIVITY_PER_CARD_MAX` authorizations and declines as their AuthRecords (merchant, MCC, RRN,
auth code, response code), each reversal folded into its original's `reversed_amount`. Statuses
(authorized, cleared, reversed, expired) are read from the ledger's hold states at query time.

Fed by AuthJournal.add (live and replayed records alike) and kept in the journal snapshot
(JournalImage.activity), so a restart rebuilds it exactly. Records still in the journal's 24 h
window are the same objects, so recent activity costs no extra memory. Bounded twice: per card
(a deque) and in total (`ACTIVITIES_MAX`): past the total, the card that was charged longest ago
loses its oldest entry (approximately oldest first: the order is per append, not per record).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import msgspec

from authsrv.hotpath.context import INQUIRIES
from authsrv.hotpath.outcome import Outcome, is_approval

if TYPE_CHECKING:
    from authsrv.hotpath.journal import AuthRecord

ACTIVITY_PER_CARD_MAX = 100
ACTIVITIES_MAX = 1_000_000  # ~0.4 GB at ~400 bytes a record; most recent ones are shared with the journal

_APPROVALS = frozenset(int(outcome) for outcome in Outcome if is_approval(outcome))


def shown(record: AuthRecord) -> bool:
    """What history lists: declines, and approvals that moved money (not inquiries, not an advice
    acknowledged without effect)."""
    if not record.card_id or record.reverses or record.processing_code[:2] in INQUIRIES:
        return False
    return record.outcome not in _APPROVALS or bool(record.user_hold_id or record.posted or record.external)


class ActivityLog:
    def __init__(self, *, per_card_max: int = ACTIVITY_PER_CARD_MAX, total_max: int = ACTIVITIES_MAX) -> None:
        assert 0 < per_card_max <= total_max
        self._per_card_max = per_card_max
        self._total_max = total_max
        self._by_card: dict[int, collections.deque[AuthRecord]] = {}
        self._order: collections.deque[int] = collections.deque()  # card id per append, oldest first
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def of_card(self, card_id: int) -> list[AuthRecord]:
        """Newest first."""
        return list(reversed(self._by_card.get(card_id, ())))

    def card_ids(self) -> list[int]:
        """The cards with activity (the panel's search index seeds itself from them)."""
        return list(self._by_card)

    def on_add(self, record: AuthRecord, previous: AuthRecord | None, original: AuthRecord | None) -> None:
        """Same contract as SpendWindows.on_add (called by AuthJournal.add before it stores)."""
        if record.reverses:
            if original is not None and record.amount > 0:
                updated = msgspec.structs.replace(original, reversed_amount=original.reversed_amount + record.amount)
                self._replace(original.card_id, original.key, updated)
            return
        if previous is not None and self._replace(previous.card_id, record.key, record):
            return  # a decision replaced (stand-in): same row, new outcome
        if shown(record):
            self._append(record)

    def _replace(self, card_id: int, key: str, record: AuthRecord) -> bool:
        entries = self._by_card.get(card_id)
        if entries is None:
            return False
        for position in range(len(entries) - 1, -1, -1):  # bounded by ACTIVITY_PER_CARD_MAX
            if entries[position].key == key:
                if shown(record):
                    entries[position] = record
                else:
                    del entries[position]
                    self._total -= 1
                return True
        return False

    def _append(self, record: AuthRecord) -> None:
        entries = self._by_card.get(record.card_id)
        if entries is None:
            entries = self._by_card[record.card_id] = collections.deque()
        if len(entries) >= self._per_card_max:
            entries.popleft()
            self._total -= 1
        entries.append(record)
        self._order.append(record.card_id)
        self._total += 1
        while self._total > self._total_max:  # one pass per entry over the bound
            self._evict_one()
        if len(self._order) > 2 * self._total_max:  # appends of cards trimmed by per-card bound
            self._order = collections.deque(card for card in self._order if card in self._by_card)

    def _evict_one(self) -> None:
        while self._order:
            card_id = self._order.popleft()
            entries = self._by_card.get(card_id)
            if entries:
                entries.popleft()
                self._total -= 1
                if not entries:
                    del self._by_card[card_id]
                return
        raise AssertionError("activity total above zero with no cards in order")

    # snapshots: records also held by the journal (same object) are written as their key
    def to_image(self, journal_records: dict[str, AuthRecord]) -> list[AuthRecord | str]:
        image: list[AuthRecord | str] = []
        for entries in self._by_card.values():
            for record in entries:
                image.append(record.key if journal_records.get(record.key) is record else record)
        return image

    def load_image(self, image: list[AuthRecord | str], journal_records: dict[str, AuthRecord]) -> None:
        assert not self._by_card, "load into an empty log only"
        for item in image:
            record = journal_records[item] if isinstance(item, str) else item
            assert record.card_id, record.key
            self._append(record)
