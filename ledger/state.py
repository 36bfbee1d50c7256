"""The in-memory ledger: accounts, holds, remembered transfer ids and per-account history.

Pure and deterministic: no I/O, no clock reads, no iteration over sets or hash order. The same
sequence of batches gives the same results and the same `digest()` on any machine, which is what
lets the write-ahead log rebuild the state by replaying batches. `Ledger.apply` is the only
mutator; everything it does to a hold follows HOLD_TRANSITIONS below (one table, one file, as
h11's `_state.py` does for HTTP).

Semantics follow TigerBeetle's account/transfer model (see ledger/types.py) with these choices:

- Time. `apply` runs at ts = max(batch.timestamp_ns, clock + 1). Every event gets its own
  timestamp so history order is total and history paging by timestamp never splits an instant:
  expiries first (ts, ts+1, ...), then transfer i of the batch at ts + expired + i. The clock is
  the last timestamp handed out.
- Check order. (1) the id is valid; (2) the id is remembered: a replay is answered from memory
  before anything else, so its answer never depends on state that changed since; (3) checks of the
  spec alone; (4) checks against state. Within (3) and (4) the enum order is followed.
- Remembered failures. Failures found against state (account not found, exceeds_credits, a post of
  an already posted hold, ...) by an unlinked transfer are remembered with the id, so a retry gets
  the original answer even if the state changed in between. Not remembered: failures of the spec
  alone (a retry recomputes the same answer, and remembering them would let a malformed request
  claim an id), `pending_transfers_full` (capacity, not a business answer: a retry may succeed),
  and nothing at all from a linked chain that failed: the chain is atomic, so state, ids included,
  is exactly as before it (a corrected chain can be retried with the same ids), and
  `linked_event_failed` describes the chain, not the member.
- Chains. `exists` does not fail a chain: a replay of a chain that was created answers `exists`
  for every member.
- Forcing. Holds and plain transfers may be `forced` (ignore limit flags). `forced` with
  post_pending or void_pending is `flags_are_mutually_exclusive`: a post moves funds the hold
  already reserved, so it can never cross a limit, and a void only releases. A clearing above the
  held amount posts the hold in full and books the excess as a separate (forced) transfer; a post
  above what remains is `exceeds_pending_transfer_amount`.
- Expiry is checked at the start of each batch: a hold is live for the whole batch that starts
  before its deadline.
"""

from __future__ import annotations

import bisect
import collections
import enum
import hashlib
import operator

import attrs
import msgspec
from sortedcontainers import SortedList

from ledger.types import (
    AMOUNT_MAX,
    ID_MAX,
    REFERENCE_LENGTH_MAX,
    AccountFlags,
    AccountKind,
    AccountSpec,
    AccountStatus,
    Batch,
    BatchResult,
    TransferFlags,
    TransferSpec,
    TransferStatus,
)

# Bounds. Memory figures measured by `python -m bench.ledger_memory` (CPython 3.11): about 0.9 KB
# per funded account, 0.5 KB per pending hold plus its spec (~0.2 KB, allocated by the caller),
# 0.25 KB per remembered id plus its spec.
# One open authorization per active card at peak, with headroom: ~0.7 GB at the bound. Past it a
# new hold fails with `pending_transfers_full` instead of the process running out of memory.
HOLDS_PENDING_MAX = 1_000_000
# Every cardholder balance, partner collateral and system account of one process: ~9 GB at the
# bound, the ceiling of an in-memory ledger on one machine. Accounts grow with onboarding only.
ACCOUNTS_MAX = 10_000_000
# Ids grow with traffic, so this bound is what protects memory: ~4.5 GB at the bound, which holds
# the 24 h duplicate window (docs/contract.md, durability) up to ~115 transfers/s sustained (a hold and a
# post per authorization: ~58 authorizations/s around the clock). Beyond it the oldest ids are
# evicted before their 24 h and counted (`ids_evicted_count`), never silently.
IDS_MAX = 10_000_000
IDS_RETENTION_NS = 24 * 3600 * 10**9
# What a statement screen pages through; older activity lives in the management store and the log.
# The operator's `[ledger] history_per_account_max` (set_history_per_account_max). A list grows to
# twice the bound before it is trimmed back (amortized O(1)), so an account holds 1-2x the bound;
# ~0.3 KB an entry once the transfer's own id is forgotten (docs/operations.md, sizing).
HISTORY_PER_ACCOUNT_MAX = 1_000
# One write-ahead log record; TigerBeetle's batch is 8190 events for the same reason: bounded work
# per apply.
TRANSFERS_PER_BATCH_MAX = 8_192
ACCOUNTS_PER_BATCH_MAX = 8_192
TIMESTAMP_NS_MAX = 2**63 - 1
NS_PER_S = 10**9

SNAPSHOT_VERSION = 1

# Plain ints: IntFlag's operators go through enum.py and cost microseconds on the hot path.
_TRANSFER_FLAGS_ALL = sum(int(flag) for flag in TransferFlags)
_ACCOUNT_FLAGS_ALL = sum(int(flag) for flag in AccountFlags)
_ACCOUNT_KINDS = frozenset(int(kind) for kind in AccountKind)

_LINKED = int(TransferFlags.linked)
_PENDING = int(TransferFlags.pending)
_POST = int(TransferFlags.post_pending)
_VOID = int(TransferFlags.void_pending)
_FORCED = int(TransferFlags.forced)
_FINAL = int(TransferFlags.final)
_LIMIT_DEBITS = int(AccountFlags.debits_must_not_exceed_credits)
_LIMIT_CREDITS = int(AccountFlags.credits_must_not_exceed_debits)

_S = TransferStatus
_CREATED = _S.created
_EXISTS = _S.exists


class LedgerInvariantError(AssertionError):
    """A ledger invariant does not hold: a bug or a corrupt snapshot/log, never a business outcome."""


class HoldState(enum.IntEnum):
    pending = 1
    posted = 2
    voided = 3
    expired = 4


class HistoryKind(enum.IntEnum):
    hold = 1
    post = 2
    void = 3
    expire = 4
    transfer = 5


class Side(enum.IntEnum):
    debit = 1
    credit = 2


# The hold lifecycle, whole: pending -> posted / voided / expired, each at most once. A partial
# post or partial void keeps the hold pending and is not a transition.
HOLD_TRANSITIONS: dict[HoldState, dict[HistoryKind, HoldState]] = {
    HoldState.pending: {
        HistoryKind.post: HoldState.posted,
        HistoryKind.void: HoldState.voided,
        HistoryKind.expire: HoldState.expired,
    },
}
# What a post or void of an already resolved hold answers.
HOLD_RESOLVED_STATUS: dict[HoldState, TransferStatus] = {
    HoldState.posted: _S.pending_transfer_already_posted,
    HoldState.voided: _S.pending_transfer_already_voided,
    HoldState.expired: _S.pending_transfer_expired,
}

# State-dependent failures of an unlinked transfer that are remembered with its id (module doc).
REMEMBERED_FAILURES = frozenset(
    {
        _S.debit_account_not_found,
        _S.credit_account_not_found,
        _S.currency_mismatch,
        _S.pending_transfer_not_found,
        _S.pending_transfer_not_pending,
        _S.pending_transfer_has_different_accounts,
        _S.pending_transfer_already_posted,
        _S.pending_transfer_already_voided,
        _S.pending_transfer_expired,
        _S.exceeds_pending_transfer_amount,
        _S.exceeds_credits,
        _S.exceeds_debits,
        _S.overflows,
    }
)


# -- views handed to callers (frozen copies; the live state never leaves this module) ----------


@attrs.frozen
class AccountView:
    id: int
    currency: str
    kind: AccountKind
    flags: AccountFlags
    user_data: int
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int


# The views are frozen msgspec Structs rather than attrs classes: the hot path reads one per
# approval (field 54's balance, the open-authorization check of the hold), and a frozen attrs
# class costs ~1.2 us to build where a Struct takes ~0.2 us. Same fields, order, repr and equality.
class BalanceView(msgspec.Struct, frozen=True, gc=False):
    posted: int  # credits_posted - debits_posted
    debits_pending: int
    credits_pending: int
    available: int  # posted - debits_pending: incoming holds are not spendable yet


class HoldView(msgspec.Struct, frozen=True, gc=False):
    id: int
    debit_account_id: int
    credit_account_id: int
    currency: str
    amount: int  # as held originally
    posted: int  # sum of posts
    released: int  # sum of voids, expiry and the remainder released by a final post
    remaining: int  # still held: amount - posted - released
    state: HoldState
    timestamp_ns: int  # when the hold was placed
    deadline_ns: int  # 0 = never expires
    forced: bool
    code: int
    reference: str


@attrs.frozen
class HistoryEntry:
    timestamp_ns: int  # unique ledger-wide: the paging key
    transfer_id: int  # the transfer's own id; for an expiry, the hold's
    pending_id: int  # the hold a post/void/expire acted on; 0 for holds and plain transfers
    amount: int  # held, posted, voided, expired or transferred by this event
    released: int  # remainder released because this post or void resolved the hold
    side: Side
    kind: HistoryKind
    forced: bool
    code: int
    reference: str
    counterparty_account_id: int


@attrs.frozen
class Totals:
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int
    count: int  # accounts
    forced_count: int  # forced holds and transfers touching these accounts
    forced_amount: int


# -- live state (mutable, __slots__ for the hot path) ----------------------------------------


class _TotalsBucket:
    __slots__ = (
        "debits_pending",
        "debits_posted",
        "credits_pending",
        "credits_posted",
        "count",
        "forced_count",
        "forced_amount",
    )

    def __init__(self) -> None:
        self.debits_pending = self.debits_posted = 0
        self.credits_pending = self.credits_posted = 0
        self.count = self.forced_count = self.forced_amount = 0


class _Account:
    __slots__ = (
        "spec",
        "id",
        "currency",
        "flags",
        "debits_pending",
        "debits_posted",
        "credits_pending",
        "credits_posted",
        # How far past its limit flag the last forced transfer left this account (0 if within).
        # Non-forced transfers only move an account toward its limit while staying within it, so
        # `excess <= forced_excess` always holds (check_invariants): sound, and as tight as it
        # can be without remembering every forced transfer.
        "forced_excess",
        "forced_count",
        "forced_amount",
        "history",  # list of history tuples (_H_*), oldest first; trimmed amortized
        "totals",  # the _TotalsBucket of (currency, kind)
    )

    def __init__(self, spec: AccountSpec, totals: _TotalsBucket) -> None:
        self.spec = spec
        self.id = spec.id
        self.currency = spec.currency
        self.flags = int(spec.flags)
        self.debits_pending = self.debits_posted = 0
        self.credits_pending = self.credits_posted = 0
        self.forced_excess = self.forced_count = self.forced_amount = 0
        self.history: list[tuple] = []
        self.totals = totals


# Records and holds are the ledger's most numerous live objects (every transfer id of the last 24 h):
# Structs the collector does not track (gc=False; they hold no cycles: a spec, ints, and the two
# accounts, which never point back), so the server's periodic collection skips the thousands
# created since the last one. eq=False: compared by identity, like the accounts they point to.
class _Record(msgspec.Struct, gc=False, eq=False):
    """A remembered transfer id: the spec (the fingerprint is the whole spec: exact, no hash) and
    its status. `queued_ns` is when it entered the age-out queue."""

    spec: TransferSpec
    status: TransferStatus
    queued_ns: int


class _Hold(_Record, gc=False, eq=False):
    """A created hold. Pending holds are not in the age-out queue (their ids are never aged out);
    a hold enters it when it resolves, so its id is remembered for the retention after that.
    Built by `_new_hold`."""

    timestamp_ns: int
    debit: _Account
    credit: _Account
    posted: int
    released: int
    state: HoldState
    deadline_ns: int


def _new_hold(spec: TransferSpec, timestamp_ns: int, debit: _Account, credit: _Account, deadline_ns: int) -> _Hold:
    return _Hold(spec, _CREATED, 0, timestamp_ns, debit, credit, 0, 0, _HOLD_PENDING, deadline_ns)


# History tuple layout. One tuple per event, shared by both accounts' lists (the side is derived
# from the account asking), so an event costs one allocation. Only ints, bools and strs inside
# (the kind as a plain int), so CPython's collector untracks the tuple: millions of tracked
# objects make every full collection a pause of hundreds of milliseconds.
_H_TIMESTAMP, _H_TRANSFER, _H_PENDING, _H_AMOUNT, _H_RELEASED, _H_KIND = 0, 1, 2, 3, 4, 5
_H_FORCED, _H_CODE, _H_REFERENCE, _H_DEBIT, _H_CREDIT = 6, 7, 8, 9, 10
_history_timestamp = operator.itemgetter(_H_TIMESTAMP)
_KIND_HOLD, _KIND_TRANSFER = int(HistoryKind.hold), int(HistoryKind.transfer)
# Read per hold placed or settled: an Enum class attribute costs ~200 ns on Python 3.11.
_HOLD_PENDING = HoldState.pending
_KIND_VALUE = {kind: int(kind) for kind in HistoryKind}

# Undo log tags (linked chains only).
_UNDO_MOVE, _UNDO_FORCED, _UNDO_HISTORY, _UNDO_RECORD = 1, 2, 3, 4
_UNDO_HOLD_NEW, _UNDO_HOLD, _UNDO_RESOLVE = 5, 6, 7


def _spec_status_plain(t: TransferSpec, flags: int) -> TransferStatus | None:
    """Checks of a plain transfer or hold spec alone, in enum order (flags done by the caller)."""
    if t.debit_account_id == t.credit_account_id:
        return _S.accounts_must_be_different
    amount = t.amount
    if amount == 0:
        return _S.amount_must_not_be_zero
    if amount < 0:
        return _S.amount_must_not_be_negative
    if amount > AMOUNT_MAX:
        return _S.amount_too_large
    if t.pending_id != 0:
        return _S.pending_id_must_be_zero
    if t.timeout_s != 0:
        if not flags & _PENDING:
            return _S.timeout_reserved_for_pending_transfer
        if t.timeout_s < 0:
            return _S.timeout_must_not_be_negative
    if len(t.reference) > REFERENCE_LENGTH_MAX:
        return _S.reference_too_long
    return None


def _spec_status_post_or_void(t: TransferSpec) -> TransferStatus | None:
    """Checks of a post or void spec alone, in enum order (flags done by the caller)."""
    if t.debit_account_id != 0 and t.debit_account_id == t.credit_account_id:
        return _S.accounts_must_be_different
    if t.amount < 0:
        return _S.amount_must_not_be_negative
    if t.amount > AMOUNT_MAX:
        return _S.amount_too_large
    if t.pending_id == 0:
        return _S.pending_id_must_not_be_zero
    if t.timeout_s != 0:
        return _S.timeout_reserved_for_pending_transfer
    if len(t.reference) > REFERENCE_LENGTH_MAX:
        return _S.reference_too_long
    return None


def _flags_status(flags: int) -> TransferStatus | None:
    if flags & ~_TRANSFER_FLAGS_ALL:
        return _S.flags_unknown
    kinds = flags & (_PENDING | _POST | _VOID)
    if kinds & (kinds - 1):  # more than one of pending / post / void
        return _S.flags_are_mutually_exclusive
    if flags & _FORCED and flags & (_POST | _VOID):
        return _S.flags_are_mutually_exclusive
    if flags & _FINAL and not flags & (_POST | _VOID):
        return _S.flags_are_mutually_exclusive
    return None


def _id_status(transfer_id: int) -> TransferStatus:
    assert not 0 < transfer_id <= ID_MAX
    if transfer_id == 0:
        return _S.id_must_not_be_zero
    if transfer_id < 0:
        return _S.id_must_not_be_negative
    return _S.id_must_not_be_too_large


def _currency_valid(currency: object) -> bool:
    return (
        isinstance(currency, str)
        and len(currency) == 3
        and currency.isascii()
        and currency.isalpha()
        and currency.isupper()
    )


def _excess(account: _Account) -> int:
    """How far the account is past its limit flag (<= 0 when within it)."""
    if account.flags & _LIMIT_DEBITS:
        return account.debits_pending + account.debits_posted - account.credits_posted
    if account.flags & _LIMIT_CREDITS:
        return account.credits_pending + account.credits_posted - account.debits_posted
    return 0


def _next_state(state: HoldState, kind: HistoryKind) -> HoldState:
    transitions = HOLD_TRANSITIONS.get(state)
    if transitions is None or kind not in transitions:
        raise LedgerInvariantError(f"hold lifecycle: no transition from {state.name} on {kind.name}")
    return transitions[kind]


class Ledger:
    """Double-entry ledger state machine. See the module docstring for the semantics."""

    def __init__(
        self,
        *,
        holds_pending_max: int = HOLDS_PENDING_MAX,
        accounts_max: int = ACCOUNTS_MAX,
        ids_retention_ns: int = IDS_RETENTION_NS,
        ids_max: int = IDS_MAX,
        history_per_account_max: int = HISTORY_PER_ACCOUNT_MAX,
    ) -> None:
        assert holds_pending_max > 0 and accounts_max > 0 and history_per_account_max > 0
        assert ids_retention_ns >= 0
        # Pending hold ids are never evicted, so the cap must leave room for them.
        assert ids_max > holds_pending_max
        self._holds_pending_max = holds_pending_max
        self._accounts_max = accounts_max
        self._ids_retention_ns = ids_retention_ns
        self._ids_max = ids_max
        self._history_max = history_per_account_max
        self._history_trim_len = 2 * history_per_account_max

        self._timestamp_ns = 0
        self._ids_evicted_count = 0
        self._history_trimmed_count = 0  # entries dropped by the history bound, since this process began
        self._history_entries = 0  # over all accounts, an event counted once per account listing it
        self._accounts: dict[int, _Account] = {}
        self._totals: dict[tuple[str, AccountKind], _TotalsBucket] = {}
        self._ids: dict[int, _Record] = {}  # every remembered id, pending holds included
        self._queue: collections.deque[_Record] = collections.deque()  # age-out order
        self._pending: dict[int, _Hold] = {}
        # (deadline_ns, hold id) of every pending hold with a deadline, and nothing else: an entry
        # leaves when its hold is resolved (or its creation rolled back), so nothing ever needs a
        # compaction. A heap with stale entries did, O(heap) in one step: ~150 ms at 300k pending
        # holds, every ~100 s under clearing, and the soak's p99.9 was those stalls.
        self._deadlines: SortedList = SortedList()
        self._undo: list[tuple] | None = None  # set only while a linked chain is applied

    def empty_like(self) -> Ledger:
        """A new, empty ledger with this one's bounds: a rebuild from the log that must reach the
        same state (the operator's ids bound is applied at open, not logged)."""
        return Ledger(holds_pending_max=self._holds_pending_max, accounts_max=self._accounts_max,
                      ids_retention_ns=self._ids_retention_ns, ids_max=self._ids_max,
                      history_per_account_max=self._history_max)  # fmt: skip

    @property
    def ids_max(self) -> int:
        return self._ids_max

    def set_ids_max(self, ids_max: int) -> None:
        """Change the remembered-ids bound (the operator's `[ledger] ids_max`) after opening.

        The next `apply` evicts the oldest ids down to it, counted in `ids_evicted_count`, as the
        cap always does. Pending hold ids are never evicted, so the cap must leave room for them."""
        assert ids_max > self._holds_pending_max, (ids_max, self._holds_pending_max)
        self._ids_max = ids_max

    @property
    def holds_pending_max(self) -> int:
        return self._holds_pending_max

    def set_holds_pending_max(self, holds_pending_max: int) -> None:
        """Change the pending-holds bound (the operator's `[ledger] holds_pending_max`) after opening.
        Holds already pending stay; past the bound a new hold fails with `pending_transfers_full`."""
        assert 0 < holds_pending_max < self._ids_max, (holds_pending_max, self._ids_max)
        self._holds_pending_max = holds_pending_max

    @property
    def history_per_account_max(self) -> int:
        return self._history_max

    def set_history_per_account_max(self, history_per_account_max: int) -> None:
        """Change the per-account history bound (the operator's `[ledger] history_per_account_max`)
        after opening. Lists above the new bound are trimmed now, not on their next event: an account
        that sees no more traffic would otherwise keep the old bound's memory. O(accounts), once."""
        assert history_per_account_max > 0, history_per_account_max
        self._history_max = history_per_account_max
        self._history_trim_len = 2 * history_per_account_max
        for a in self._accounts.values():
            if len(a.history) > history_per_account_max:
                self._trim_history(a.history)

    def set_bounds(self, *, ids_max: int, holds_pending_max: int, history_per_account_max: int) -> None:
        """All three count bounds at once. ids_max > holds_pending_max must hold after each setter,
        so the one that makes room goes first."""
        if holds_pending_max < self._holds_pending_max:
            self.set_holds_pending_max(holds_pending_max)
            self.set_ids_max(ids_max)
        else:
            self.set_ids_max(ids_max)
            self.set_holds_pending_max(holds_pending_max)
        self.set_history_per_account_max(history_per_account_max)
        assert self._ids_max > self._holds_pending_max

    def _trim_history(self, history: list[tuple]) -> None:
        dropped = len(history) - self._history_max
        assert dropped > 0, dropped
        self._history_trimmed_count += dropped
        self._history_entries -= dropped
        del history[:-self._history_max]

    # -- the mutator ------------------------------------------------------------------------

    def apply(self, batch: Batch) -> BatchResult:
        accounts, transfers = batch.accounts, batch.transfers
        assert len(accounts) <= ACCOUNTS_PER_BATCH_MAX, len(accounts)
        assert len(transfers) <= TRANSFERS_PER_BATCH_MAX, len(transfers)
        assert 0 <= batch.timestamp_ns <= TIMESTAMP_NS_MAX
        assert self._undo is None
        ts = batch.timestamp_ns
        if ts <= self._timestamp_ns:  # the clock is monotonic whatever the caller's clock does
            ts = self._timestamp_ns + 1
        expired: tuple[int, ...] = ()
        if self._deadlines and self._deadlines[0][0] <= ts:
            expired = self._expire(ts)
        queue = self._queue
        if queue and queue[0].queued_ns <= ts - self._ids_retention_ns:
            self._age_out(ts)
        account_results = tuple(map(self._create_account, accounts)) if accounts else ()
        now = ts + len(expired)  # the first transfer's timestamp
        transfer_results = self._create_transfers(transfers, now) if transfers else ()
        self._timestamp_ns = now + len(transfers) - 1 if transfers else max(ts, now - 1)
        assert self._timestamp_ns <= TIMESTAMP_NS_MAX
        if len(self._ids) > self._ids_max:
            self._evict_over_cap()
        return BatchResult(ts, account_results, transfer_results, expired)

    # -- accounts ---------------------------------------------------------------------------

    def _create_account(self, spec: AccountSpec) -> AccountStatus:
        account_id = spec.id
        if not 0 < account_id <= ID_MAX:
            if account_id == 0:
                return AccountStatus.id_must_not_be_zero
            if account_id < 0:
                return AccountStatus.id_must_not_be_negative
            return AccountStatus.id_must_not_be_too_large
        existing = self._accounts.get(account_id)
        if existing is not None:
            if existing.spec == spec:
                return AccountStatus.exists
            return AccountStatus.exists_with_different_fields
        if not _currency_valid(spec.currency):
            return AccountStatus.currency_invalid
        if spec.kind not in _ACCOUNT_KINDS:
            return AccountStatus.kind_invalid
        if spec.flags & ~_ACCOUNT_FLAGS_ALL:
            return AccountStatus.flags_unknown
        if spec.flags & _LIMIT_DEBITS and spec.flags & _LIMIT_CREDITS:
            return AccountStatus.flags_are_mutually_exclusive
        if len(self._accounts) >= self._accounts_max:
            return AccountStatus.accounts_full
        self._add_account(spec)
        return AccountStatus.created

    def _add_account(self, spec: AccountSpec) -> _Account:
        key = (spec.currency, AccountKind(spec.kind))
        bucket = self._totals.get(key)
        if bucket is None:
            bucket = self._totals[key] = _TotalsBucket()
        bucket.count += 1
        account = self._accounts[spec.id] = _Account(spec, bucket)
        return account

    # -- transfers --------------------------------------------------------------------------

    def _create_transfers(
        self, transfers: tuple[TransferSpec, ...], now: int
    ) -> tuple[TransferStatus, ...]:
        count = len(transfers)
        results: list[TransferStatus] = []
        index = 0
        while index < count:
            transfer = transfers[index]
            if not int(transfer.flags) & _LINKED:  # int(): IntFlag's & costs microseconds
                results.append(self._create_transfer(transfer, now + index))
                index += 1
                continue
            end = index
            while end < count and int(transfers[end].flags) & _LINKED:
                end += 1
            if end == count:  # a chain left open fails whole, untouched
                results.extend([_S.linked_event_chain_open] * (count - index))
                break
            results.extend(self._create_chain(transfers, index, end + 1, now))
            index = end + 1
        assert len(results) == count
        return tuple(results)

    def _create_chain(
        self, transfers: tuple[TransferSpec, ...], start: int, end: int, now: int
    ) -> list[TransferStatus]:
        undo: list[tuple] = []
        self._undo = undo
        results: list[TransferStatus] = []
        for index in range(start, end):
            status = self._create_transfer(transfers[index], now + index)
            if status is not _CREATED and status is not _EXISTS:
                self._rollback(undo)
                results = [_S.linked_event_failed] * (end - start)
                results[index - start] = status
                return results
            results.append(status)
        self._undo = None
        # The chain held back trimming (so a rollback could pop); trim what it grew, now.
        for entry in undo:
            if entry[0] == _UNDO_HISTORY:
                for history in entry[1:3]:
                    if len(history) > self._history_trim_len:
                        self._trim_history(history)
        return results

    def _create_transfer(self, t: TransferSpec, now: int) -> TransferStatus:
        transfer_id = t.id
        if not 0 < transfer_id <= ID_MAX:
            return _id_status(transfer_id)
        record = self._ids.get(transfer_id)
        if record is not None:
            if record.spec == t:
                return _EXISTS if record.status is _CREATED else record.status
            return _S.exists_with_different_fields
        flags = int(t.flags)  # IntFlag's & goes through enum.py and costs microseconds
        status = _flags_status(flags)
        if status is not None:
            return status
        if flags & (_POST | _VOID):
            status = self._post_or_void(t, flags, now)
        else:
            status = self._transfer_or_hold(t, flags, now)
        if status is not _CREATED and self._undo is None and status in REMEMBERED_FAILURES:
            self._remember(t, status, now)
        return status

    def _transfer_or_hold(self, t: TransferSpec, flags: int, now: int) -> TransferStatus:
        status = _spec_status_plain(t, flags)
        if status is not None:
            return status
        debit = self._accounts.get(t.debit_account_id)
        if debit is None:
            return _S.debit_account_not_found
        credit = self._accounts.get(t.credit_account_id)
        if credit is None:
            return _S.credit_account_not_found
        if debit.currency != credit.currency:
            return _S.currency_mismatch
        amount = t.amount
        if not flags & _FORCED:
            if debit.flags & _LIMIT_DEBITS and (
                debit.debits_pending + debit.debits_posted + amount > debit.credits_posted
            ):
                return _S.exceeds_credits
            if credit.flags & _LIMIT_CREDITS and (
                credit.credits_pending + credit.credits_posted + amount > credit.debits_posted
            ):
                return _S.exceeds_debits
        # pending + posted bounds each of them, and a post leaves the sum unchanged: posts and
        # voids never need this check.
        if (
            debit.debits_pending + debit.debits_posted + amount > AMOUNT_MAX
            or credit.credits_pending + credit.credits_posted + amount > AMOUNT_MAX
        ):
            return _S.overflows
        if not flags & _PENDING:
            self._register(t, now)
            self._move(debit, credit, 0, amount)
            kind = _KIND_TRANSFER
        else:
            deadline_ns = now + t.timeout_s * NS_PER_S if t.timeout_s else 0
            if deadline_ns > TIMESTAMP_NS_MAX:
                return _S.overflows
            if len(self._pending) >= self._holds_pending_max:
                return _S.pending_transfers_full
            self._place_hold(t, now, debit, credit, deadline_ns)
            kind = _KIND_HOLD
        forced = bool(flags & _FORCED)
        if forced:
            self._mark_forced(debit, credit, amount)
        entry = (now, t.id, 0, amount, 0, kind, forced, t.code, t.reference, debit.id, credit.id)
        self._append_history(debit, credit, entry)
        return _CREATED

    def _post_or_void(self, t: TransferSpec, flags: int, now: int) -> TransferStatus:
        status = _spec_status_post_or_void(t)
        if status is not None:
            return status
        hold = self._ids.get(t.pending_id)
        if hold is None or hold.status is not _CREATED:
            return _S.pending_transfer_not_found
        if type(hold) is not _Hold:
            return _S.pending_transfer_not_pending
        if (t.debit_account_id != 0 and t.debit_account_id != hold.debit.id) or (
            t.credit_account_id != 0 and t.credit_account_id != hold.credit.id
        ):
            return _S.pending_transfer_has_different_accounts
        if hold.state is not _HOLD_PENDING:
            return HOLD_RESOLVED_STATUS[hold.state]
        remaining = hold.spec.amount - hold.posted - hold.released
        assert remaining > 0
        if t.amount > remaining:
            return _S.exceeds_pending_transfer_amount
        amount = t.amount or remaining
        resolve = amount == remaining or bool(flags & _FINAL)
        kind = HistoryKind.post if flags & _POST else HistoryKind.void
        self._register(t, now)
        self._settle(hold, kind, amount, resolve, now, t)
        return _CREATED

    # -- holds ------------------------------------------------------------------------------

    def _place_hold(
        self, t: TransferSpec, now: int, debit: _Account, credit: _Account, deadline_ns: int
    ) -> None:
        hold = _new_hold(t, now, debit, credit, deadline_ns)
        self._ids[t.id] = hold
        self._pending[t.id] = hold
        if deadline_ns:
            self._deadlines.add((deadline_ns, t.id))
        if self._undo is not None:
            self._undo.append((_UNDO_HOLD_NEW, t.id))
        self._move(debit, credit, t.amount, 0)

    def _settle(
        self, hold: _Hold, kind: HistoryKind, amount: int, resolve: bool, now: int, t: TransferSpec
    ) -> None:
        """Post or release `amount` of the hold; when `resolve`, release the rest and resolve it."""
        remaining = hold.spec.amount - hold.posted - hold.released
        assert 0 < amount <= remaining and hold.state is _HOLD_PENDING
        rest = remaining - amount if resolve else 0
        if self._undo is not None:
            self._undo.append((_UNDO_HOLD, hold, hold.posted, hold.released))
        posted = amount if kind is HistoryKind.post else 0
        hold.posted += posted
        hold.released += amount - posted + rest
        self._move(hold.debit, hold.credit, -(amount + rest), posted)
        if resolve:
            hold.state = _next_state(hold.state, kind)
            del self._pending[hold.spec.id]
            if hold.deadline_ns:
                self._deadlines.remove((hold.deadline_ns, hold.spec.id))
            hold.queued_ns = now
            self._queue.append(hold)
            if self._undo is not None:
                self._undo.append((_UNDO_RESOLVE, hold))
        assert hold.posted + hold.released <= hold.spec.amount
        debit, credit = hold.debit, hold.credit
        entry = (now, t.id, hold.spec.id, amount, rest, _KIND_VALUE[kind], False, t.code, t.reference, debit.id, credit.id)
        self._append_history(debit, credit, entry)

    def _expire(self, ts: int) -> tuple[int, ...]:
        """Expire, in deadline order (ties by id), every pending hold whose deadline is <= ts."""
        deadlines, pending = self._deadlines, self._pending
        expired: list[int] = []
        while deadlines and deadlines[0][0] <= ts:  # bounded: _settle removes the entry each pass
            deadline_ns, hold_id = deadlines[0]
            hold = pending[hold_id]
            assert hold.deadline_ns == deadline_ns, hold_id
            remaining = hold.spec.amount - hold.posted - hold.released
            self._settle(hold, HistoryKind.expire, remaining, True, ts + len(expired), hold.spec)
            expired.append(hold_id)
        return tuple(expired)

    def _index_deadlines(self) -> None:
        self._deadlines = SortedList((h.deadline_ns, i) for i, h in self._pending.items() if h.deadline_ns)

    # -- remembered ids ---------------------------------------------------------------------

    def _register(self, t: TransferSpec, now: int) -> None:
        record = _Record(t, _CREATED, now)
        self._ids[t.id] = record
        self._queue.append(record)
        if self._undo is not None:
            self._undo.append((_UNDO_RECORD, t.id))

    def _remember(self, t: TransferSpec, status: TransferStatus, now: int) -> None:
        assert self._undo is None and status in REMEMBERED_FAILURES
        record = _Record(t, status, now)
        self._ids[t.id] = record
        self._queue.append(record)

    def _age_out(self, ts: int) -> None:
        horizon_ns = ts - self._ids_retention_ns
        queue, ids = self._queue, self._ids
        while queue and queue[0].queued_ns <= horizon_ns:  # bounded by len(queue)
            record = queue.popleft()
            removed = ids.pop(record.spec.id)
            assert removed is record

    def _evict_over_cap(self) -> None:
        queue, ids = self._queue, self._ids
        while len(ids) > self._ids_max and queue:  # bounded by len(queue)
            record = queue.popleft()
            removed = ids.pop(record.spec.id)
            assert removed is record
            self._ids_evicted_count += 1

    # -- balances, forced marks, history (every account mutation goes through these) ----------

    def _move(self, debit: _Account, credit: _Account, pending: int, posted: int) -> None:
        """Add `pending` to both pending sides and `posted` to both posted sides (negative to take)."""
        debit.debits_pending += pending
        debit.debits_posted += posted
        credit.credits_pending += pending
        credit.credits_posted += posted
        totals = debit.totals
        totals.debits_pending += pending
        totals.debits_posted += posted
        totals = credit.totals
        totals.credits_pending += pending
        totals.credits_posted += posted
        if self._undo is not None:
            self._undo.append((_UNDO_MOVE, debit, credit, pending, posted))

    def _mark_forced(self, debit: _Account, credit: _Account, amount: int) -> None:
        if self._undo is not None:
            self._undo.append((_UNDO_FORCED, debit, credit, amount, debit.forced_excess, credit.forced_excess))
        for account in (debit, credit):
            account.forced_count += 1
            account.forced_amount += amount
            account.totals.forced_count += 1
            account.totals.forced_amount += amount
            account.forced_excess = max(0, _excess(account))

    def _append_history(self, debit: _Account, credit: _Account, entry: tuple) -> None:
        debit_history, credit_history = debit.history, credit.history
        debit_history.append(entry)
        credit_history.append(entry)
        self._history_entries += 2
        if self._undo is not None:
            self._undo.append((_UNDO_HISTORY, debit_history, credit_history))
            return  # no trimming inside a chain, so the undo can pop; _create_chain trims at the end
        if len(debit_history) > self._history_trim_len:
            self._trim_history(debit_history)
        if len(credit_history) > self._history_trim_len:
            self._trim_history(credit_history)

    def _rollback(self, undo: list[tuple]) -> None:
        """Undo a failed chain, newest change first, so state is exactly as before the chain."""
        self._undo = None
        for entry in reversed(undo):
            tag = entry[0]
            if tag == _UNDO_MOVE:
                self._move(entry[1], entry[2], -entry[3], -entry[4])
            elif tag == _UNDO_FORCED:
                _, debit, credit, amount, debit_excess, credit_excess = entry
                for account in (debit, credit):
                    account.forced_count -= 1
                    account.forced_amount -= amount
                    account.totals.forced_count -= 1
                    account.totals.forced_amount -= amount
                debit.forced_excess, credit.forced_excess = debit_excess, credit_excess
            elif tag == _UNDO_HISTORY:
                entry[1].pop()
                entry[2].pop()
                self._history_entries -= 2
            elif tag == _UNDO_RECORD:
                del self._ids[entry[1]]
                self._queue.pop()
            elif tag == _UNDO_HOLD_NEW:
                del self._ids[entry[1]]
                hold = self._pending.pop(entry[1])
                if hold.deadline_ns:
                    self._deadlines.remove((hold.deadline_ns, entry[1]))
            elif tag == _UNDO_HOLD:
                hold = entry[1]
                hold.posted, hold.released = entry[2], entry[3]
            else:
                assert tag == _UNDO_RESOLVE
                hold = entry[1]
                hold.state = HoldState.pending
                hold.queued_ns = 0
                self._pending[hold.spec.id] = hold
                if hold.deadline_ns:
                    self._deadlines.add((hold.deadline_ns, hold.spec.id))
                removed = self._queue.pop()
                assert removed is hold

    # -- queries ----------------------------------------------------------------------------

    @property
    def timestamp_ns(self) -> int:
        return self._timestamp_ns

    @property
    def ids_evicted_count(self) -> int:
        """Ids dropped before their retention because IDS_MAX was reached."""
        return self._ids_evicted_count

    @property
    def history_trimmed_count(self) -> int:
        """History entries dropped by the per-account bound since this process began (not in the
        snapshot: by design, not a loss to alarm on; the soak reads it to see the bound reached)."""
        return self._history_trimmed_count

    @property
    def history_entries_count(self) -> int:
        """History entries kept, over all accounts (an event in two accounts' lists counts twice)."""
        return self._history_entries

    def account(self, account_id: int) -> AccountView | None:
        a = self._accounts.get(account_id)
        if a is None:
            return None
        spec = a.spec
        return AccountView(
            a.id,
            a.currency,
            AccountKind(spec.kind),
            AccountFlags(a.flags),
            spec.user_data,
            a.debits_pending,
            a.debits_posted,
            a.credits_pending,
            a.credits_posted,
        )

    def balance(self, account_id: int) -> BalanceView | None:
        a = self._accounts.get(account_id)
        if a is None:
            return None
        posted = a.credits_posted - a.debits_posted
        return BalanceView(posted, a.debits_pending, a.credits_pending, posted - a.debits_pending)

    def hold(self, transfer_id: int) -> HoldView | None:
        hold = self._ids.get(transfer_id)
        if type(hold) is not _Hold:
            return None
        spec = hold.spec
        return HoldView(
            spec.id,
            hold.debit.id,
            hold.credit.id,
            hold.debit.currency,
            spec.amount,
            hold.posted,
            hold.released,
            spec.amount - hold.posted - hold.released,
            hold.state,
            hold.timestamp_ns,
            hold.deadline_ns,
            bool(int(spec.flags) & _FORCED),
            spec.code,
            spec.reference,
        )

    def transfer_status(self, transfer_id: int) -> TransferStatus | None:
        record = self._ids.get(transfer_id)
        return None if record is None else record.status

    def history(
        self, account_id: int, *, before_timestamp_ns: int | None = None, limit: int = 50
    ) -> list[HistoryEntry]:
        """Newest first. Page on by passing the last entry's timestamp_ns as before_timestamp_ns."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        limit = min(limit, self._history_max)  # no more is kept
        a = self._accounts.get(account_id)
        if a is None:
            return []
        history = a.history
        start = max(0, len(history) - self._history_max)
        stop = len(history)
        if before_timestamp_ns is not None:
            stop = bisect.bisect_left(history, before_timestamp_ns, start, stop, key=_history_timestamp)
        return [_history_entry(history[i], account_id) for i in range(stop - 1, max(start, stop - limit) - 1, -1)]

    def totals(self) -> dict[tuple[str, AccountKind], Totals]:
        return {
            key: Totals(
                b.debits_pending,
                b.debits_posted,
                b.credits_pending,
                b.credits_posted,
                b.count,
                b.forced_count,
                b.forced_amount,
            )
            for key, b in sorted(self._totals.items())
        }

    def pending_count(self) -> int:
        return len(self._pending)

    def account_count(self) -> int:
        return len(self._accounts)

    def ids_count(self) -> int:
        return len(self._ids)

    # -- whole-state operations -------------------------------------------------------------

    def digest(self) -> str:
        """sha256 over the canonical snapshot: equal states give equal digests."""
        return hashlib.sha256(self.to_snapshot()).hexdigest()

    def check_invariants(self) -> None:
        """Raise LedgerInvariantError naming the first broken rule. O(state): not for the hot path."""
        _check_accounts(self)
        _check_holds(self)
        _check_ids(self)

    def to_snapshot(self) -> bytes:
        """The whole state, canonical (accounts and pending holds by id, remembered ids in age-out
        order, the visible history), as msgpack. Ints outside msgpack's range (ids up to 2**127)
        are written as ext type _EXT_WIDE_INT."""
        rows = _snapshot_rows(self)
        try:
            return msgspec.msgpack.encode(rows)
        except OverflowError:
            return msgspec.msgpack.encode(_widen(rows))  # same bytes except for the wide ints

    @classmethod
    def from_snapshot(cls, data: bytes) -> Ledger:
        rows = msgspec.msgpack.decode(data, ext_hook=_ext_hook)
        if not isinstance(rows, list) or len(rows) != 6 or rows[0] != SNAPSHOT_VERSION:
            raise LedgerInvariantError("snapshot: not a version-%d ledger snapshot" % SNAPSHOT_VERSION)
        _, bounds, clock, accounts, queue, pending = rows
        ledger = cls(
            holds_pending_max=bounds[0],
            accounts_max=bounds[1],
            ids_retention_ns=bounds[2],
            ids_max=bounds[3],
            history_per_account_max=bounds[4],
        )
        ledger._timestamp_ns, ledger._ids_evicted_count = clock
        _restore_accounts(ledger, accounts)
        _restore_records(ledger, queue, pending)
        ledger._index_deadlines()
        ledger.check_invariants()  # pairs with the checks made before the snapshot was written
        return ledger


def _history_entry(row: tuple, account_id: int) -> HistoryEntry:
    if row[_H_DEBIT] == account_id:
        side, counterparty = Side.debit, row[_H_CREDIT]
    else:
        side, counterparty = Side.credit, row[_H_DEBIT]
    return HistoryEntry(
        row[_H_TIMESTAMP],
        row[_H_TRANSFER],
        row[_H_PENDING],
        row[_H_AMOUNT],
        row[_H_RELEASED],
        side,
        HistoryKind(row[_H_KIND]),
        row[_H_FORCED],
        row[_H_CODE],
        row[_H_REFERENCE],
        counterparty,
    )


# -- snapshot -------------------------------------------------------------------------------

_EXT_WIDE_INT = 1
_MSGPACK_INT_MIN = -(2**63)
_MSGPACK_INT_MAX = 2**64 - 1


def _snapshot_rows(ledger: Ledger) -> list:
    history_max = ledger._history_max
    accounts = [
        [
            a.id,
            a.currency,
            a.spec.kind,
            a.flags,
            a.spec.user_data,
            a.debits_pending,
            a.debits_posted,
            a.credits_pending,
            a.credits_posted,
            a.forced_excess,
            a.forced_count,
            a.forced_amount,
            a.history[-history_max:],
        ]
        for _, a in sorted(ledger._accounts.items())
    ]
    queue = [_record_row(record) for record in ledger._queue]
    pending = [_record_row(hold) for _, hold in sorted(ledger._pending.items())]
    bounds = [
        ledger._holds_pending_max,
        ledger._accounts_max,
        ledger._ids_retention_ns,
        ledger._ids_max,
        ledger._history_max,
    ]
    clock = [ledger._timestamp_ns, ledger._ids_evicted_count]
    return [SNAPSHOT_VERSION, bounds, clock, accounts, queue, pending]


def _record_row(record: _Record) -> list:
    if type(record) is not _Hold:
        return [record.spec, record.status, record.queued_ns]
    return [
        record.spec,
        record.status,
        record.queued_ns,
        record.timestamp_ns,
        record.posted,
        record.released,
        record.state,
        record.deadline_ns,
    ]


def _widen(value: object) -> object:
    if isinstance(value, int):  # bool and IntEnum included: they are in range
        if _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
            return value
        size = (value.bit_length() + 8) // 8  # room for the sign bit
        return msgspec.msgpack.Ext(_EXT_WIDE_INT, value.to_bytes(size, "big", signed=True))
    if isinstance(value, (list, tuple)):
        return [_widen(item) for item in value]
    if isinstance(value, msgspec.Struct):  # array_like specs encode as arrays
        return [_widen(item) for item in msgspec.structs.astuple(value)]
    return value


def _ext_hook(code: int, data: memoryview) -> int:
    if code != _EXT_WIDE_INT:
        raise LedgerInvariantError(f"snapshot: unknown msgpack ext type {code}")
    return int.from_bytes(data, "big", signed=True)


def _restore_accounts(ledger: Ledger, rows: list) -> None:
    shared: dict[int, tuple] = {}  # one tuple per event, shared by both accounts as when live
    for row in rows:
        account_id, currency, kind, flags, user_data = row[:5]
        spec = AccountSpec(account_id, currency, AccountKind(kind), AccountFlags(flags), user_data)
        a = ledger._add_account(spec)
        (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted) = row[5:9]
        a.forced_excess, a.forced_count, a.forced_amount = row[9:12]
        b = a.totals
        b.debits_pending += a.debits_pending
        b.debits_posted += a.debits_posted
        b.credits_pending += a.credits_pending
        b.credits_posted += a.credits_posted
        b.forced_count += a.forced_count
        b.forced_amount += a.forced_amount
        for h in row[12]:
            entry = shared.get(h[_H_TIMESTAMP])
            if entry is None:
                entry = tuple(h)
                shared[h[_H_TIMESTAMP]] = entry
            a.history.append(entry)
        ledger._history_entries += len(row[12])


def _restore_records(ledger: Ledger, queue_rows: list, pending_rows: list) -> None:
    for row in queue_rows:
        record = _restore_record(ledger, row)
        ledger._ids[record.spec.id] = record
        ledger._queue.append(record)
    for row in pending_rows:
        hold = _restore_record(ledger, row)
        if type(hold) is not _Hold or hold.state is not HoldState.pending:
            raise LedgerInvariantError(f"snapshot: pending row {hold.spec.id} is not a pending hold")
        ledger._ids[hold.spec.id] = hold
        ledger._pending[hold.spec.id] = hold


def _restore_record(ledger: Ledger, row: list) -> _Record:
    spec = TransferSpec(*row[0])
    status = TransferStatus(row[1])
    if len(row) == 3:
        return _Record(spec, status, row[2])
    debit = ledger._accounts.get(spec.debit_account_id)
    credit = ledger._accounts.get(spec.credit_account_id)
    if debit is None or credit is None:
        raise LedgerInvariantError(f"snapshot: hold {spec.id} names a missing account")
    hold = _new_hold(spec, row[3], debit, credit, row[7])
    hold.queued_ns, hold.posted, hold.released, hold.state = row[2], row[4], row[5], HoldState(row[6])
    return hold


# -- invariants -----------------------------------------------------------------------------


def _fail(rule: str, detail: object) -> None:
    raise LedgerInvariantError(f"{rule}: {detail}")


def _check_accounts(ledger: Ledger) -> None:
    sums: dict[str, list[int]] = {}  # currency -> [debits_pending, debits_posted, credits_pending, credits_posted]
    buckets: dict[tuple[str, AccountKind], list[int]] = {}
    history_len_max = ledger._history_trim_len + TRANSFERS_PER_BATCH_MAX
    entries = 0
    for account_id, a in ledger._accounts.items():
        values = [a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted]
        if account_id != a.id or a.spec.id != a.id:
            _fail("account keyed by its id", account_id)
        if min(values) < 0:
            _fail("balances are non-negative", account_id)
        if values[0] + values[1] > AMOUNT_MAX or values[2] + values[3] > AMOUNT_MAX:
            _fail("debits and credits fit AMOUNT_MAX", account_id)
        if _excess(a) > a.forced_excess or a.forced_excess < 0:
            _fail("limit flag crossed only by forced transfers", account_id)
        total = sums.setdefault(a.currency, [0, 0, 0, 0])
        for i, value in enumerate(values):
            total[i] += value
        bucket = buckets.setdefault((a.currency, AccountKind(a.spec.kind)), [0] * 7)
        for i, value in enumerate(values + [1, a.forced_count, a.forced_amount]):
            bucket[i] += value
        _check_history(a, history_len_max)
        entries += len(a.history)
    for currency, (dp, dpost, cp, cpost) in sorted(sums.items()):
        if dpost != cpost:
            _fail("per currency, debits_posted == credits_posted", currency)
        if dp != cp:
            _fail("per currency, debits_pending == credits_pending", currency)
    for key, bucket in ledger._totals.items():
        live = [
            bucket.debits_pending,
            bucket.debits_posted,
            bucket.credits_pending,
            bucket.credits_posted,
            bucket.count,
            bucket.forced_count,
            bucket.forced_amount,
        ]
        if buckets.get(key) != live:
            _fail("totals equal the sum of their accounts", key)
    if entries != ledger._history_entries:
        _fail("the history entry count is the sum of the lists", (entries, ledger._history_entries))
    if len(buckets) != len(ledger._totals):
        _fail("every account kind has totals", sorted(set(buckets) - set(ledger._totals)))


def _check_history(a: _Account, history_len_max: int) -> None:
    history = a.history
    if len(history) > history_len_max:
        _fail("history is bounded", a.id)
    previous_ns = -1
    for entry in history:
        if entry[_H_TIMESTAMP] <= previous_ns:
            _fail("history timestamps strictly increase", a.id)
        if a.id not in (entry[_H_DEBIT], entry[_H_CREDIT]):
            _fail("history entries name their account", a.id)
        previous_ns = entry[_H_TIMESTAMP]


def _check_holds(ledger: Ledger) -> None:
    held_debits: dict[int, int] = {}
    held_credits: dict[int, int] = {}
    if len(ledger._deadlines) != sum(1 for hold in ledger._pending.values() if hold.deadline_ns):
        _fail("the deadline index holds exactly the pending holds with a deadline", len(ledger._deadlines))
    if len(ledger._pending) > ledger._holds_pending_max:
        _fail("pending holds are bounded", len(ledger._pending))
    for hold_id, hold in ledger._pending.items():
        remaining = hold.spec.amount - hold.posted - hold.released
        if hold.state is not HoldState.pending or remaining <= 0 or hold.posted < 0 or hold.released < 0:
            _fail("a pending hold has something remaining", hold_id)
        if ledger._ids.get(hold_id) is not hold:
            _fail("a pending hold's id is remembered", hold_id)
        if ledger._accounts.get(hold.debit.id) is not hold.debit or ledger._accounts.get(hold.credit.id) is not hold.credit:
            _fail("a hold names live accounts", hold_id)
        if hold.deadline_ns and (hold.deadline_ns, hold_id) not in ledger._deadlines:
            _fail("a hold with a deadline is in the deadline index", hold_id)
        held_debits[hold.debit.id] = held_debits.get(hold.debit.id, 0) + remaining
        held_credits[hold.credit.id] = held_credits.get(hold.credit.id, 0) + remaining
    for account_id, a in ledger._accounts.items():
        if held_debits.get(account_id, 0) != a.debits_pending:
            _fail("debits_pending equals the remainders of the holds debiting it", account_id)
        if held_credits.get(account_id, 0) != a.credits_pending:
            _fail("credits_pending equals the remainders of the holds crediting it", account_id)


def _check_ids(ledger: Ledger) -> None:
    ids, queue = ledger._ids, ledger._queue
    if len(ids) != len(queue) + len(ledger._pending):
        _fail("every remembered id is pending or queued for age-out", (len(ids), len(queue)))
    if len(ids) > ledger._ids_max and queue:
        _fail("remembered ids are bounded", len(ids))
    previous_ns = -1
    for record in queue:
        if ids.get(record.spec.id) is not record:
            _fail("a queued record is its id's record", record.spec.id)
        if not previous_ns <= record.queued_ns <= ledger._timestamp_ns:
            _fail("the age-out queue is in time order", record.spec.id)
        previous_ns = record.queued_ns
        if record.status is not _CREATED and record.status not in REMEMBERED_FAILURES:
            _fail("only business failures are remembered", record.spec.id)
        if type(record) is _Hold and (
            record.state is HoldState.pending or record.posted + record.released != record.spec.amount
        ):
            _fail("a resolved hold has nothing remaining", record.spec.id)
