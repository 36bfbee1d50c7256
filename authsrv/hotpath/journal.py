"""The authorization journal: one record per answered request, for duplicate detection (CONTRACT.md
section 2), reversal lookup by field 90, and (later) clearing matches.

Records ride in the `app` bytes of the ledger batch that carries the request's money movement, so a
record is on disk exactly when its ledger effect is, and both come back together on replay. The
journal is rebuilt from the ledger snapshot's application blob plus the log records after it.
"""

from __future__ import annotations

import collections

import msgspec

from ledger.types import Batch

RETENTION_NS_DEFAULT = 24 * 3600 * 10**9  # duplicates are answered for at least 24 h (contract)
RECORDS_MAX = 20_000_000  # hard memory bound: ~24 h at ~230 requests/s sustained; oldest go first


class AuthRecord(msgspec.Struct, array_like=True, frozen=True):
    """What was decided for one request. Append fields at the end only (it is a log format)."""

    key: str  # duplicate key: MTI class | acquirer | STAN | field 7 | RRN
    original_key: str  # MTI class | acquirer | STAN | field 7: what a later field 90 names
    timestamp_ns: int
    mti: str
    processing_code: str
    outcome: int
    response_code: str
    auth_code: str = ""
    field54: str = ""
    field44: str = ""
    card_id: int = 0
    rrn: str = ""
    amount: int = 0  # charged to the balance, in `currency` (billing amount when 6/51 were sent)
    currency: str = ""
    user_hold_id: int = 0  # pending transfer on the user balance (0 when posted at once or none)
    collateral_hold_id: int = 0
    posted: bool = False  # 0200/0220: money moved at once, no hold
    reverses: str = ""  # for a reversal: the original's key
    reversed_amount: int = 0  # on an original: how much reversals have released so far
    cause: str = ""  # e.g. "collateral" for a 51 caused by the partner's collateral
    stand_in: bool = False
    request_amount: int = 0  # field 4, in the transaction currency (to scale partial reversals)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AuthRecord)
_snapshot_decoder = msgspec.msgpack.Decoder(list[AuthRecord])


def encode_record(record: AuthRecord) -> bytes:
    return _encoder.encode(record)


class AuthJournal:
    def __init__(self, *, retention_ns: int = RETENTION_NS_DEFAULT, records_max: int = RECORDS_MAX):
        assert retention_ns > 0 and records_max > 0
        self._retention_ns = retention_ns
        self._records_max = records_max
        self._by_key: dict[str, AuthRecord] = {}
        self._by_original: dict[str, str] = {}
        self._order: collections.deque[str] = collections.deque()
        self.evicted_early = 0  # records dropped by records_max before their retention ran out
        self.timestamp_ns_max = 0  # the newest record's time: a floor for new hot-path transfer ids

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> AuthRecord | None:
        return self._by_key.get(key)

    def find_original(self, original_key: str) -> AuthRecord | None:
        key = self._by_original.get(original_key)
        return None if key is None else self._by_key.get(key)

    def add(self, record: AuthRecord) -> None:
        if record.reverses:
            original = self._by_key.get(record.reverses)
            if original is not None:
                self._by_key[original.key] = msgspec.structs.replace(
                    original, reversed_amount=original.reversed_amount + record.amount
                )
        if record.key not in self._by_key:
            self._order.append(record.key)
        self._by_key[record.key] = record
        if not record.reverses:
            self._by_original[record.original_key] = record.key
        if record.timestamp_ns > self.timestamp_ns_max:
            self.timestamp_ns_max = record.timestamp_ns
        self._age_out(record.timestamp_ns)

    def _age_out(self, now_ns: int) -> None:
        horizon = now_ns - self._retention_ns
        order, by_key = self._order, self._by_key
        while order:
            oldest = by_key.get(order[0])
            if oldest is not None and oldest.timestamp_ns > horizon and len(by_key) <= self._records_max:
                break
            if oldest is not None and oldest.timestamp_ns > horizon:
                self.evicted_early += 1
            order.popleft()
            if oldest is not None:
                del by_key[oldest.key]
                if self._by_original.get(oldest.original_key) == oldest.key:
                    del self._by_original[oldest.original_key]

    # replay and snapshots
    def on_app(self, seq: int, data: bytes) -> None:
        del seq
        self.add(_decoder.decode(data))

    def to_snapshot(self) -> bytes:
        return _encoder.encode([self._by_key[key] for key in self._order if key in self._by_key])

    def load_snapshot(self, data: bytes) -> None:
        assert not self._by_key, "load a snapshot into an empty journal only"
        if data:
            for record in _snapshot_decoder.decode(data):
                self.timestamp_ns_max = max(self.timestamp_ns_max, record.timestamp_ns)
                self._order.append(record.key)
                self._by_key[record.key] = record
                if not record.reverses:
                    self._by_original[record.original_key] = record.key


def app_only_batch(timestamp_ns: int, record: AuthRecord) -> Batch:
    """A log record that carries only a journal record (a decline moves no money)."""
    return Batch(timestamp_ns=timestamp_ns, app=encode_record(record))
