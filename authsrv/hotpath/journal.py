"""The authorization journal: one record per answered request, for duplicate detection
(docs/contract.md, durability), reversal lookup by field 90, and clearing matches.

Records ride in the `app` bytes of the ledger batch that carries the request's money movement, so a
record is on disk exactly when its ledger effect is, and both come back together on replay. The
journal is rebuilt from the ledger snapshot's application blob plus the log records after it.

Two lifetimes live here. Duplicate detection needs a record for 24 h (`retention_ns`). Clearing
needs an approved authorization for as long as its hold holds money (7 or 30 days,
docs/contract.md, clearing file), so approvals with a pending hold are also kept in the *open-authorization index*
(RRN -> records) until the hold is fully posted, voided or expired. The hold is the user hold; for
an external-balance partner's approval, whose user money lives at the partner, it is the deposit
collateral hold, the only money held here (`open_hold_id`). Membership is a pure function
of the records and the ledger's hold states (`hold_open`), so replaying the same log rebuilds the
same index; entries leave through `close_holds` (expiry, a final clearing post) or `prune`. Closed
entries are remembered a while longer (`CLOSED_MAX`) so a clearing that arrives after expiry is
reported as late rather than as unmatched.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

import msgspec

from authsrv.hotpath.activity import ACTIVITIES_MAX, ACTIVITY_PER_CARD_MAX, ActivityLog
from authsrv.hotpath.limits import SpendWindows
from authsrv.hotpath.outcome import Outcome, is_approval
from ledger.state import HOLDS_PENDING_MAX
from ledger.tracked import TrackedDict
from ledger.types import Batch

RETENTION_NS_DEFAULT = 24 * 3600 * 10**9  # duplicates are answered for at least 24 h (contract)
RECORDS_MAX = 20_000_000  # hard memory bound: ~24 h at ~230 requests/s sustained; oldest go first
# Each open authorization names one distinct pending hold, so the ledger's bound is this one's.
OPEN_AUTHORIZATIONS_MAX = HOLDS_PENDING_MAX
# Closed authorizations kept to recognise a late clearing (after expiry or a final post); oldest go
# first. Reporting only: a late record is force-posted whether or not it is still remembered here.
# The operator's `[duplicates] closed_max`; ~0.8 KB each with its record once that has left the
# journal's window (docs/operations.md).
CLOSED_MAX = 200_000
SNAPSHOT_VERSION = 2


class AuthRecord(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """What was decided for one request. Append fields at the end only (it is a log format).

    `gc=False`: only strs, ints and bools inside, so it can never be part of a cycle; untracked, it
    is 16 bytes smaller and millions of retained records add nothing to a collection's work."""

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
    # The partner's external balance (authsrv/hotpath/external.py): context.External as an int,
    # the X-Idempotency-Key the call used (the outbox's force-debit/reversal reuse it), its duration.
    external: int = 0
    external_key: str = ""
    external_ms: int = 0
    # FX and fees (authsrv/hotpath/fx.py, fees.py): the transaction currency (field 49), the rate
    # used when converted here ('' otherwise), and the transaction fee posted with the approval.
    request_currency: str = ""
    fx_rate: str = ""
    fee: int = 0
    # Transaction history (authsrv/hotpath/activity.py): field 18 and field 43 as sent ('' if absent).
    mcc: str = ""
    merchant: str = ""


class JournalImage(msgspec.Struct, frozen=True):
    """Snapshot format 2 (a msgpack map). Format 1 was a bare msgpack list of AuthRecord (the
    duplicate window only); `load_snapshot` still reads it. Open records that are also in
    `records` are written by key only."""

    version: int
    records: list[AuthRecord]
    open_keys: list[str] = []
    open_records: list[AuthRecord] = []
    closed: list[AuthRecord] = []
    # Spend-control usage per card (authsrv/hotpath/limits.py, WindowRow) and recent card activity
    # (authsrv/hotpath/activity.py: a record, or the key of one in `records`).
    spend_windows: list[tuple[int, int, int, int, int, int, int]] = []
    activity: list[AuthRecord | str] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AuthRecord)
_snapshot_decoder = msgspec.msgpack.Decoder(JournalImage | list[AuthRecord])


_APPROVALS = frozenset(int(outcome) for outcome in Outcome if is_approval(outcome))  # plain ints: no enum call


def open_hold_id(record: AuthRecord) -> int:
    """The hold clearing posts for this record (0: none): the user hold, or, for an external-balance
    partner (`external` set, no user hold: the user's money lives at the partner), the deposit
    collateral hold that is the only money held here (authsrv/hotpath/external.py)."""
    if record.user_hold_id:
        return record.user_hold_id
    if record.external and not record.posted:
        return record.collateral_hold_id
    return 0


def holds_money(record: AuthRecord) -> bool:
    """An approval that placed a hold (0100, 0120): what clearing posts later."""
    return bool(open_hold_id(record)) and not record.reverses and record.outcome in _APPROVALS


def encode_record(record: AuthRecord) -> bytes:
    return _encoder.encode(record)


class AuthJournal:
    def __init__(self, *, retention_ns: int = RETENTION_NS_DEFAULT, records_max: int = RECORDS_MAX,
                 hold_open: Callable[[int], bool] | None = None, closed_max: int = CLOSED_MAX,
                 activities_max: int = ACTIVITIES_MAX):
        assert retention_ns > 0 and records_max > 0 and closed_max > 0 and activities_max > 0
        self._retention_ns = retention_ns
        self._records_max = records_max
        self._by_key: dict[str, AuthRecord] = {}
        self._by_original: dict[str, str] = {}
        self._order: collections.deque[str] = collections.deque()
        self.evicted_early = 0  # records dropped by records_max before their retention ran out
        self.timestamp_ns_max = 0  # the newest record's time: a floor for new hot-path transfer ids
        # hold id -> is it still pending in the ledger? None (unit tests without a ledger): assume so.
        self.hold_open = hold_open
        self._closed_max = closed_max
        self._open: dict[int, AuthRecord] = {}  # user hold id -> approval
        # RRN -> hold ids, as tuples of ints: the collector stops tracking those, unlike lists
        # (measured: lists made journal.add 2x slower once the index held 100k entries). The dicts
        # themselves stay tracked (ledger/tracked.py), or each periodic collection walks them whole.
        self._open_by_rrn: dict[str, tuple[int, ...]] = TrackedDict()
        self._closed: collections.OrderedDict[int, AuthRecord] = collections.OrderedDict()
        self._closed_by_rrn: dict[str, tuple[int, ...]] = TrackedDict()
        # Called with each record `add` takes, live or replayed (authsrv/notify feeds its outbox
        # from here). Synchronous and O(1) each: they run on the authorization hot path.
        self.listeners: list[Callable[[AuthRecord], None]] = []
        # Fed by every record added (live or replayed) and kept in the snapshot.
        self.windows = SpendWindows()  # spend-control usage (authsrv/hotpath/limits.py)
        # Recent records per card, for history (authsrv/hotpath/activity.py); `activities_max` is the
        # operator's `[history] activities_max`. Each card keeps at most ACTIVITY_PER_CARD_MAX.
        self.activity = ActivityLog(per_card_max=min(ACTIVITY_PER_CARD_MAX, activities_max),
                                    total_max=activities_max)

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def closed_max(self) -> int:
        return self._closed_max

    @property
    def closed_count(self) -> int:
        return len(self._closed)

    # -- open authorizations (clearing) ---------------------------------------------------------

    @property
    def open_count(self) -> int:
        return len(self._open)

    def open_authorizations(self, rrn: str) -> list[AuthRecord]:
        """Approvals with this RRN whose hold (`open_hold_id`) still holds money, oldest first."""
        return [self._open[hold_id] for hold_id in self._open_by_rrn.get(rrn, ())]

    def closed_authorizations(self, rrn: str) -> list[AuthRecord]:
        """Recently closed approvals with this RRN (hold posted, voided or expired), oldest first."""
        return [self._closed[hold_id] for hold_id in self._closed_by_rrn.get(rrn, ())]

    def recently_closed(self) -> list[AuthRecord]:
        """Approvals whose holds closed recently (bounded by closed_max), oldest first."""
        return list(self._closed.values())

    def open_authorization(self, hold_id: int) -> AuthRecord | None:
        return self._open.get(hold_id)

    def close_holds(self, hold_ids: Iterable[int]) -> int:
        """These holds are resolved (expired, or posted final): their approvals leave the index."""
        closed = 0
        for hold_id in hold_ids:
            if hold_id in self._open:
                self._close(hold_id)
                closed += 1
        return closed

    def prune(self) -> int:
        """Close every entry whose hold is no longer pending (after replay; a safety net)."""
        if self.hold_open is None:
            return 0
        return self.close_holds([hold_id for hold_id in self._open if not self.hold_open(hold_id)])

    def _is_open(self, hold_id: int) -> bool:
        return self.hold_open is None or self.hold_open(hold_id)

    def _index_open(self, record: AuthRecord) -> None:
        hold_id = open_hold_id(record)
        assert hold_id
        if hold_id not in self._open:
            _bucket_add(self._open_by_rrn, record.rrn, hold_id)
        self._open[hold_id] = record
        assert len(self._open) <= OPEN_AUTHORIZATIONS_MAX, len(self._open)

    def _close(self, hold_id: int) -> None:
        record = self._open.pop(hold_id)
        _bucket_remove(self._open_by_rrn, record.rrn, hold_id)
        self._remember_closed(record)

    def _remember_closed(self, record: AuthRecord) -> None:
        hold_id = open_hold_id(record)
        assert hold_id
        if hold_id in self._closed:
            self._closed[hold_id] = record
            return
        while len(self._closed) >= self._closed_max:  # bounded: one pop per entry over the bound
            old_id, old = self._closed.popitem(last=False)
            _bucket_remove(self._closed_by_rrn, old.rrn, old_id)
        self._closed[hold_id] = record
        _bucket_add(self._closed_by_rrn, record.rrn, hold_id)

    def _track(self, record: AuthRecord) -> None:
        """Open-index bookkeeping for a record about to be stored under record.key."""
        previous = self._by_key.get(record.key)
        previous_hold = open_hold_id(previous) if previous is not None else 0
        hold_id = open_hold_id(record)
        holds = bool(hold_id) and not record.reverses and record.outcome in _APPROVALS  # holds_money()
        if previous_hold in self._open and (previous_hold != hold_id or not holds):
            self._close(previous_hold)  # e.g. a stand-in decline replaced the approval
        if holds:
            if self._is_open(hold_id):
                self._index_open(record)
            else:
                self._remember_closed(record)  # replay: resolved later in the log

    def get(self, key: str) -> AuthRecord | None:
        return self._by_key.get(key)

    def records(self):
        """Every record kept, oldest first (startup scans, e.g. the stand-in window in external.py)."""
        return (self._by_key[key] for key in self._order if key in self._by_key)

    def find_original(self, original_key: str) -> AuthRecord | None:
        key = self._by_original.get(original_key)
        return None if key is None else self._by_key.get(key)

    def add(self, record: AuthRecord) -> None:
        previous = self._by_key.get(record.key)
        named = self._by_key.get(record.reverses) if record.reverses else None
        self.windows.on_add(record, previous, named)
        self.activity.on_add(record, previous, named)
        if record.reverses:
            original = self._by_key.get(record.reverses)
            if original is not None:
                updated = msgspec.structs.replace(original, reversed_amount=original.reversed_amount + record.amount)
                self._by_key[original.key] = updated
                hold_id = open_hold_id(original)
                if hold_id in self._open:
                    if self._is_open(hold_id):
                        self._open[hold_id] = updated
                    else:
                        self._close(hold_id)  # a full reversal voided the hold
        self._track(record)
        if record.key not in self._by_key:
            self._order.append(record.key)
        self._by_key[record.key] = record
        if not record.reverses:
            self._by_original[record.original_key] = record.key
        if record.timestamp_ns > self.timestamp_ns_max:
            self.timestamp_ns_max = record.timestamp_ns
        self._age_out(record.timestamp_ns)
        for listener in self.listeners:
            listener(record)

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

    def records_since(self, timestamp_ns: int, limit: int) -> list[AuthRecord]:
        """Current records (the latest per key) stamped at or after `timestamp_ns`, in log order, at
        most `limit` (the newest ones). Walks back from the newest and stops at the first older
        record, so callers give a margin for records committed slightly out of time order."""
        assert limit > 0
        found: list[AuthRecord] = []
        for key in reversed(self._order):
            record = self._by_key.get(key)
            if record is None:
                continue
            if record.timestamp_ns < timestamp_ns or len(found) >= limit:
                break
            found.append(record)
        found.reverse()
        return found

    # replay and snapshots
    def on_app(self, seq: int, data: bytes) -> None:
        del seq
        self.add(_decoder.decode(data))

    def to_snapshot(self) -> bytes:
        records = [self._by_key[key] for key in self._order if key in self._by_key]
        open_keys, open_records = [], []
        for record in self._open.values():
            if self._by_key.get(record.key) == record:
                open_keys.append(record.key)
            else:
                open_records.append(record)
        image = JournalImage(version=SNAPSHOT_VERSION, records=records, open_keys=open_keys,
                             open_records=open_records, closed=list(self._closed.values()),
                             spend_windows=self.windows.to_image(self.timestamp_ns_max),
                             activity=self.activity.to_image(self._by_key))
        return _encoder.encode(image)

    def load_snapshot(self, data: bytes) -> None:
        """Format 2, or format 1 (a list of records: the open index is rebuilt from them alone).
        Call `prune()` after replaying the log records that follow the snapshot."""
        assert not self._by_key and not self._open, "load a snapshot into an empty journal only"
        if not data:
            return
        image = _snapshot_decoder.decode(data)
        if isinstance(image, list):
            image = JournalImage(version=1, records=image,
                                 open_keys=[record.key for record in image if holds_money(record)])
        assert image.version in (1, SNAPSHOT_VERSION), image.version
        for record in image.records:
            self.timestamp_ns_max = max(self.timestamp_ns_max, record.timestamp_ns)
            self._order.append(record.key)
            self._by_key[record.key] = record
            if not record.reverses:
                self._by_original[record.original_key] = record.key
        self.windows.load_image(image.spend_windows)
        self.activity.load_image(image.activity, self._by_key)
        for record in image.closed:
            self._remember_closed(record)
        for record in [self._by_key[key] for key in image.open_keys] + image.open_records:
            assert holds_money(record), record.key
            self._index_open(record)


def _bucket_add(buckets: dict[str, tuple[int, ...]], rrn: str, hold_id: int) -> None:
    buckets[rrn] = buckets.get(rrn, ()) + (hold_id,)


def _bucket_remove(buckets: dict[str, tuple[int, ...]], rrn: str, hold_id: int) -> None:
    rest = tuple(member for member in buckets[rrn] if member != hold_id)
    if rest:
        buckets[rrn] = rest
    else:
        del buckets[rrn]


def app_only_batch(timestamp_ns: int, record: AuthRecord) -> Batch:
    """A log record that carries only a journal record (a decline moves no money)."""
    return Batch(timestamp_ns=timestamp_ns, app=encode_record(record))
