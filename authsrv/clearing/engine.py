"""Applying a clearing file: one engine behind `authsrv clearing ingest` and `POST /admin/clearing`.

The file goes through in chunks of CHUNK_RECORDS_MAX records; each chunk is ONE ledger batch, and
the caller waits for it to be durable before the next (`await ledger.wait_durable(seq)` in the
server, so authorizations keep flowing between chunks; `flush_sync()` offline).

Crash safety: the order inside a chunk is what makes "each record applies once" hold across a crash.

    1. plan every record against the ledger in memory (pure; nothing written);
    2. ONE store transaction: reserve transfer ids, write each record row with the exact transfers;
    3. check that what each plan read is still so (else plan that record again and replace its row),
       and that the log has room for the batch (WalFullError here: back off, then check again);
    4. submit the batch, in the same synchronous step as 3 (no await between 3 and 4);
    5. once durable, ONE store transaction marks the rows applied (planned -> applied only) and writes
       the `transaction.cleared` event of each record that resolved an authorization (cleared.py).

Planning off the event loop. On the running server, steps 1 and 2 (parsing the file, the store's
reads and its commit, matching, amounts, events: the bulk of the cost) run in a worker thread, or
with `[clearing] planner = "process"` on a single node in the clearing planner, a process of its own
(remote.py, running these very ClearingRun steps on its own copy of the run); the event loop keeps
only cheap steps.
Before 1, the loop copies what planning may read of the chunk: for each RRN its approvals (open,
then recently closed) and the holds they name (`RrnReads`), with the timestamp the batch is planned
for; each RRN in one synchronous step, the RRNs in pieces with checkpoints between. The planner
plans against that copy, a view that nothing changes under it and that is consistent for each RRN,
which is all a record's plan reads. At 3, back on the loop, each RRN is read again: when anything
differs (a hold reversed, voided, expired, posted or reduced meanwhile, an approval closed or
evicted), or a hold's deadline falls on the other side of the batch's actual timestamp, the records of that RRN
are planned again on the loop against the live state and their rows replaced (`ClearingStore.replan`,
one store commit on the loop, only when such a race happened) before the batch is submitted. The
server submits a chunk in slices (APPLY_SLICE_RECORDS_MAX records, one batch each, a checkpoint
between them): right after a slice is submitted its RRNs are read again, in the same synchronous
step, and that state (which the later slices' plans counted through their overlay) is what they
are checked against; an RRN whose chain the ledger refused is planned again outright. A
record is therefore posted by exactly one plan, the one that matches the state the batch applies
to: no double post, and a record whose hold closed meanwhile is force-posted as `late` and reported
as an exception, not lost. RRNs partition the holds (a record reaches a hold only through an
approval with its RRN), so re-planning an RRN's records with a fresh overlay is exact.

A crash before 2 leaves nothing. Between 2 and 5 the rows say `planned`: a re-run resubmits those
very transfers, and the ledger answers `exists` for what it already had (ids are remembered for
24 h after they are applied) or applies what it lacked. Planning again instead would post twice,
since the state already contains the first post. Ids come from the store's allocator and are
never handed out twice, so a replanned record could not collide with a lost one either. A crash
between 2 and 3 whose plan had gone stale meanwhile resubmits a chain the ledger refuses (e.g. its
hold was voided): the record is then reported `ledger_refused`, never posted twice. A chunk holding
such resumed rows is planned the synchronous way (`step`), against the live state.

The partner's status update rides on step 5, not 2: written at 2 it could be delivered before the
posting is durable (or for a chain the ledger then refuses). At 5 the event commits with the row's
move from `planned` to `applied`, which happens once: a crash before it leaves the row planned (the
re-run resubmits, the ledger answers `exists`, and step 5 writes the event then); a re-run after it
finds the row applied and writes nothing. The event body is kept in the row's plan, so the re-run
writes what the first run planned. The `transaction.forced` event of an external card's forced post
or refund (cleared.py) rides on step 5 the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import attrs
import msgspec
import trio

from authsrv.clearing.cleared import ClearedTransaction, ForcedTransaction
from authsrv.clearing.plan import MATCHED, Card, ClearingOutcome, Overlay, Plan, Planner, Refusal
from authsrv.clearing.records import ClearingFile, Line, mask_pan, parse_clearing_file
from authsrv.clearing.store import ClearingStore, PlanRow, RecordRow, RecordState
from authsrv.clearing.summary import (
    EXCEPTIONS_LISTED_MAX,
    ClearingException,
    ClearingSummary,
    CurrencyTotals,
    summary_decoder,
)
from authsrv.hotpath.journal import AuthRecord
from ledger.durable import encode_batch
from ledger.state import HoldState, HoldView
from ledger.types import Batch, TransferFlags, TransferStatus
from ledger.wal import WalFullError

log = logging.getLogger("authsrv.clearing")

CHUNK_RECORDS_MAX = 500  # records per ledger batch: up to ~4 transfers each, far below 8,192
# On the running server the event loop holds only a chunk's gather and its slices' apply: ~0.4 + ~1.6
# ms per 100 records in-process, 40-70 us per record in the soak at 1,400/s, against 5-11 ms per 100
# for planning and recording them on the loop as before. The worker's share (~4 ms per 100 records, a
# store commit included) holds the GIL meanwhile, which the loop then waits for: the soak's tail was
# longer than with chunks of 25 planned on the loop (docs/benchmarks.md, section 6). A chunk costs a
# thread hop and a store commit, so it is larger than a slice: with the CPU shared, each hop waits to
# be scheduled (chunks of 100 planned one hop each fell behind the soak).
ONLINE_CHUNK_RECORDS_MAX = 400  # planned in one worker hop (one store commit for its rows)
# Submitted per batch on the loop, then a checkpoint; also the RRNs read per step of a gather. 100 held
# the loop 7-25 ms at the longest in the soak at 1,400/s (a slice's check, submit and settle).
APPLY_SLICE_RECORDS_MAX = 50
ID_ENCODED_BYTES_MAX = 10  # a msgpack uint64: what a real id adds over the placeholder 0
GIL_YIELD_EVERY_S = 0.001  # a clearing worker holds the GIL at most about this long at a time
GATE_WAIT_S_MAX = 0.05  # a worker waits this long at most for an idle loop, then works a record
# Between two of clearing's steps on the loop (a slice's apply, a piece of a gather): a real pause,
# not a bare checkpoint. An authorization crosses the scheduler several times (read, commit hand-off,
# the log's doorbell, its waiter, send); with clearing runnable at every pass, each crossing waited
# for a slice (~2.5 ms). Measured in the soak at 1,400/s: slow requests (over 25 ms) received during
# slicing fell from 727 to 66 per 100 s run with 5 ms (docs/benchmarks.md, section 6). But 5 ms, with
# the worker gated, slowed clearing to ~1,300 records/s in the 30-minute soak, behind its 1,400
# approvals/s: 2 ms applies ~1,840/s in a 100 s run (30-minute runs fell behind with both, as
# clearing slowed with the state: docs/benchmarks.md).
LOOP_PAUSE_S = 0.002
PAUSE_EVERY_ROWS = 16  # rows built between two pauses of a worker (a row: a few microseconds)
WAL_FULL_RETRIES_MAX = 500
WAL_FULL_BACKOFF_S = 0.01
_OK = (TransferStatus.created, TransferStatus.exists)
_COUNTERS = {outcome: ("refunds" if outcome is ClearingOutcome.refund else outcome.value)
             for outcome in ClearingOutcome}  # the summary field each outcome counts in
# The summary's counters, which the planner process's counts add to (ClearingRun.add_counts).
_COUNTED = ("applied", "matched", "exact", "partial", "split", "over", "forced", "late", "refunds",
            "refunds_referenced", "duplicates", "cleared_events", "forced_events")
_REASONS = {
    ClearingOutcome.forced: "no matching authorization: force-posted",
    ClearingOutcome.late: "the authorization's hold had closed (expired, voided or posted): force-posted",
}


class PlannerError(Exception):
    """The planner process (remote.py) failed or went away: the file's run stops (rows planned stay
    `planned`, so a re-run resubmits them, as after a crash)."""


class LoopIdleGate(trio.abc.Instrument):
    """Open while the event loop waits for I/O with nothing to run; shut while it works.

    A trio instrument, installed only while a file is applied online. The clearing worker waits at
    the gate between records (GilYield), so it takes the GIL only when the loop has nothing to do.
    Without it the worker took the GIL at every system call the loop made (each recv, send, epoll
    and log hand-off lets it go) and kept it until its next pause, and every step of an
    authorization paid for that: in the soak at 1,400/s, 0.5-1.1% of requests over 25 ms on the
    server's own histogram, against 0.17% with the gate (docs/benchmarks.md, section 6)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self._open = False  # the event's state, as the loop last set it (set/clear only on change)

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0 and not self._open:  # 0: tasks are runnable, the loop only polls
            self._open = True
            self.open.set()

    def after_io_wait(self, timeout: float) -> None:
        if self._open:
            self._open = False
            self.open.clear()


class GilYield:
    """A worker thread's pause between records: hands the GIL to a thread waiting for it (sleep(0)
    releases it) once every `every_s` of work. With the GIL shared, a worker that keeps it runs the
    event loop at half speed or less, and the loop waits up to the switch interval (5 ms) for every
    wake-up: measured in the soak at 1,400/s without pauses, p99 108 ms and p99.9 274 ms. Handing it
    back after every record (~0.1 ms) slowed clearing to ~1 ms per record, behind the soak's
    approvals; every millisecond bounds the loop's wait for the GIL to about that.

    With a `gate` (LoopIdleGate.open), a pause also waits while the loop is busy, up to
    GATE_WAIT_S_MAX at a time, so a loop that never idles cannot stop clearing outright."""

    def __init__(self, every_s: float = GIL_YIELD_EVERY_S, gate: threading.Event | None = None) -> None:
        assert every_s > 0
        self._every_s = every_s
        self._gate = gate
        self._last = time.perf_counter()
        self.gate_waited_s = 0.0  # time spent at a shut gate (logged per file: _Timing.report)

    def __call__(self) -> None:
        gate = self._gate
        if gate is not None and not gate.is_set():
            started = time.perf_counter()
            gate.wait(GATE_WAIT_S_MAX)  # blocks without the GIL
            self._last = time.perf_counter()
            self.gate_waited_s += self._last - started
            return
        now = time.perf_counter()
        if now - self._last >= self._every_s:
            time.sleep(0)
            self._last = time.perf_counter()


@attrs.frozen
class ClearingDeps:
    """What the engine works on: the live objects of the server, or those the CLI opened."""

    ledger: object  # ledger.durable.DurableLedger
    journal: object  # authsrv.hotpath.journal.AuthJournal
    index: object  # authsrv.store.index.CardIndex
    vault: object  # authsrv.cardsec.PanVault
    store: object  # authsrv.store.db.Store
    # authsrv.clearing.remote.ClearingPlanner: planning in a process of its own (a single node with
    # `[clearing] planner = "process"`); None: in a worker thread (the default, a cluster primary).
    planner: object = None


@attrs.define
class _Pending:
    """A chunk planned and submitted, waiting to be durable."""

    seq: int
    applied: list[str]  # identities whose chains the ledger took
    events: dict[str, ClearedTransaction | ForcedTransaction]  # of those, the ones that tell a partner


class RrnReads(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What planning may read of one RRN (plan.Planner): the approvals with it, open then recently
    closed, and every hold they name. Taken on the event loop; equal again at submit, or the RRN's
    records are planned anew. A msgspec Struct: it crosses the pipe to the planner process."""

    open: tuple[AuthRecord, ...]
    closed: tuple[AuthRecord, ...]
    holds: tuple[tuple[int, HoldView | None], ...]


def read_rrn(ledger, journal, rrn: str) -> RrnReads:
    """O(approvals with this RRN): a few dictionary reads, on the thread that owns the ledger."""
    opened = tuple(journal.open_authorizations(rrn))
    closed = tuple(journal.closed_authorizations(rrn))
    hold_ids = dict.fromkeys(hold_id for found in opened + closed
                             for hold_id in (found.user_hold_id, found.collateral_hold_id) if hold_id)
    return RrnReads(opened, closed, tuple((hold_id, ledger.hold(hold_id)) for hold_id in hold_ids))


class _View:
    """The ledger and journal as plan.Planner sees them in the worker: the chunk's RrnReads, frozen."""

    def __init__(self, reads: dict[str, RrnReads]) -> None:
        self._reads = reads
        self._holds = {hold_id: view for found in reads.values() for hold_id, view in found.holds}

    def open_authorizations(self, rrn: str) -> list[AuthRecord]:
        return list(self._reads[rrn].open)

    def closed_authorizations(self, rrn: str) -> list[AuthRecord]:
        return list(self._reads[rrn].closed)

    def hold(self, hold_id: int) -> HoldView | None:
        return self._holds[hold_id]  # KeyError: planning read a hold the loop did not copy (a bug)


@attrs.define
class Gathered:
    """A chunk, and what its planning may read, taken on the event loop (ClearingRun.gather)."""

    start: int  # the chunk's first line (index into the file's lines)
    lines: tuple[Line, ...]
    reads: dict[str, RrnReads]
    ts_ns: int  # the timestamp planned for: what Ledger.apply would use at the time of the reads
    rrns: tuple[str, ...]  # the chunk's RRNs in file order, each once: gather_more reads them in this order


@attrs.define
class Planned:
    """A chunk planned in the worker, its rows written `planned`; applied on the loop (ClearingRun.apply)."""

    start: int
    lines: tuple[Line, ...]
    by_identity: dict[str, Line]  # the chunk's lines (built in the worker, read by every slice)
    rows: list[RecordRow]  # in file order: the records with a chain to submit
    # RRN of a row -> what its plan expects to read there now (None: unknown, plan again), and the
    # timestamp it was planned for. After a slice is submitted its RRNs are read again at once.
    reads: dict[str, tuple[RrnReads | None, int]]
    positions: dict[str, int]  # identity -> index of its line in the file
    last_row: dict[str, int] = attrs.Factory(dict)  # RRN -> index of its last row (rows keep their places)
    submitted: int = 0  # rows submitted so far, slice by slice
    dropped: set[str] = attrs.Factory(set)  # identities refused when planned again (nothing to submit)

    @property
    def done(self) -> bool:
        return self.submitted >= len(self.rows)


class ClearingRun:
    def __init__(self, deps: ClearingDeps, parsed: ClearingFile, name: str, *,
                 clock_ns: Callable[[], int] = time.time_ns, chunk_records_max: int | None = None,
                 pause: Callable[[], None] | None = None) -> None:
        self._pause = pause  # run between records planned in a worker (GilYield); None offline
        # Read at call time, and never above CHUNK_RECORDS_MAX (the batch-size bound).
        self._chunk_records_max = min(chunk_records_max or CHUNK_RECORDS_MAX, CHUNK_RECORDS_MAX)
        assert self._chunk_records_max > 0
        self._deps = deps
        self._file = parsed
        self._clock_ns = clock_ns
        self._rows = ClearingStore(deps.store)
        # The live planner (step, replan): none in the planner process, which has no ledger (remote.py).
        self._planner = None if deps.ledger is None else Planner(deps.ledger.ledger, deps.journal,
                                                                  deps.index.settlement_account)
        self._encoder = msgspec.msgpack.Encoder()
        self.summary = ClearingSummary(file_sha256=parsed.sha256, name=name,
                                       lines=len(parsed.lines) + len(parsed.errors))
        self._next = 0
        self._pending: _Pending | None = None
        self.replanned = 0  # records planned again on the loop: their reads had changed before submit
        # The LAST record for an authorization is `final`: the index of each key's last line.
        self._last_line: dict[str, int] = {}
        for position, line in enumerate(parsed.lines):
            self._last_line[_match_key(line)] = position
        for error in parsed.errors:
            self.summary.add_exception(ClearingException(error.record_id, error.number,
                                                         f"{Refusal.invalid_record}: {error.reason}",
                                                         error.masked_pan, False))

    def start(self) -> ClearingSummary | None:
        """The stored summary (marked duplicate) when this very file was applied before, else None."""
        done = self._rows.file_summary(self._file.sha256)
        if done is not None:
            earlier = summary_decoder.decode(done)
            earlier.duplicate_file = True
            return earlier
        self._rows.begin_file(self._file.sha256, self.summary.name)
        return None

    @property
    def lines_taken(self) -> int:
        """The file's lines gathered, planned or submitted so far (the next chunk starts here)."""
        return self._next

    @property
    def lines_left(self) -> bool:
        return self._next < len(self._file.lines)

    @property
    def finished(self) -> bool:
        return self._next >= len(self._file.lines) and self._pending is None

    def step(self) -> int:
        """Plan, record and submit the next chunk; return the seq to wait for (0: nothing submitted).

        Raises WalFullError with nothing written when the log is full: back off and call again."""
        assert self._pending is None, "call durable() after the previous chunk"
        chunk = self._file.lines[self._next:self._next + self._chunk_records_max]
        known = self._rows.records([line.identity for line in chunk])
        ts_ns = self._clock_ns()
        ts_effective = max(ts_ns, self._deps.ledger.ledger.timestamp_ns + 1)  # what Ledger.apply will use
        overlay = Overlay()
        resumed: list[RecordRow] = []
        fresh: list[tuple[Line, Plan]] = []
        for offset, line in enumerate(chunk):
            row = known.get(line.identity)
            if row is not None:
                self._known(line, row, resumed, overlay)
                continue
            last = self._is_last(line, self._next + offset)
            plan = self._planner.plan(line.record, self._card(line.record.pan), last=last, overlay=overlay,
                                      ts_ns=ts_effective, identity=line.identity)
            if plan.outcome is None:
                self._refused(line, plan.refusal)
            else:
                fresh.append((line, plan))
        transfers_count = sum(len(plan.transfers) for _, plan in fresh)
        self._ensure_room(ts_ns, resumed, fresh, transfers_count)
        rows = []
        if fresh:
            rows = self._rows.allocate_and_insert(transfers_count, lambda ids: self._new_rows(fresh, ids))
        self._next += len(chunk)
        chains = resumed + rows
        if not chains:
            return 0
        transfers = tuple(spec for row in chains for spec in row.transfers)
        result, seq = self._deps.ledger.submit(Batch(timestamp_ns=ts_ns, transfers=transfers))
        lines = {line.identity: line for line in chunk}
        applied = self._settle(lines, chains, result.transfer_results)
        by_identity = {row.identity: row.plan.event for row in chains}
        events = {identity: by_identity[identity] for identity in applied if by_identity[identity] is not None}
        self._pending = _Pending(seq, applied, events)
        return seq

    # -- planning off the event loop: gather (loop), plan (worker thread), apply (loop) ------------

    def gather(self, rrns_max: int | None = None) -> Gathered:
        """On the thread that owns the ledger: the next chunk and what its planning may read. Cheap.
        Taken once the previous chunk is submitted (it may not be durable yet: its rows then say
        `planned`, and a re-run resubmits them, in file order, before this chunk's).

        With `rrns_max`, only that many RRNs are read: `gather_more` reads the rest, and the caller
        may await in between. Each RRN is read in one synchronous step, and RRNs partition the holds,
        so reads taken at different moments still give each record a consistent view (any change
        after its read is found at submit)."""
        ledger = self._deps.ledger.ledger
        chunk = self._file.lines[self._next:self._next + self._chunk_records_max]
        ts_effective = max(self._clock_ns(), ledger.timestamp_ns + 1)  # what Ledger.apply would use now
        rrns = tuple(dict.fromkeys(line.record.rrn for line in chunk))
        gathered = Gathered(self._next, chunk, {}, ts_effective, rrns)
        self.gather_more(gathered, rrns_max)
        return gathered

    def gather_more(self, gathered: Gathered, rrns_max: int | None = None) -> bool:
        """Read up to `rrns_max` more of the chunk's RRNs (all when None); True once all are read."""
        ledger, journal = self._deps.ledger.ledger, self._deps.journal
        start = len(gathered.reads)  # read in order: the first `start` RRNs are read already
        end = len(gathered.rrns) if rrns_max is None else start + rrns_max
        for rrn in gathered.rrns[start:end]:
            gathered.reads[rrn] = read_rrn(ledger, journal, rrn)
        return end >= len(gathered.rrns)

    def plan(self, gathered: Gathered) -> Planned | None:
        """In a worker thread: plan the chunk against its reads and write its rows (`planned`).

        Touches the store, the card index and the PAN vault, never the ledger or the journal. None
        when the chunk holds rows this file planned before (a run resumed after a crash): `step()`
        then resubmits them against the live state."""
        assert self._pending is None and gathered.start == self._next
        chunk = gathered.lines
        assert len(gathered.reads) == len({line.record.rrn for line in chunk}), "gather_more until done"
        known = self._rows.records([line.identity for line in chunk])
        if any(row.file_sha256 == self._file.sha256 and row.state == RecordState.planned for row in known.values()):
            return None
        view = _View(gathered.reads)
        planner = Planner(view, view, self._deps.index.settlement_account)
        overlay = Overlay()
        fresh: list[tuple[Line, Plan]] = []
        positions: dict[str, int] = {}
        for offset, line in enumerate(chunk):
            row = known.get(line.identity)
            if row is not None:
                self._known(line, row, [], overlay)  # counted: applied earlier, or refused
                continue
            position = gathered.start + offset
            if self._pause is not None:
                self._pause()
            plan = planner.plan(line.record, self._card(line.record.pan), last=self._is_last(line, position),
                                overlay=overlay, ts_ns=gathered.ts_ns, identity=line.identity)
            if plan.outcome is None:
                self._refused(line, plan.refusal)
            else:
                fresh.append((line, plan))
                positions[line.identity] = position
        rows = []
        if fresh:
            count = sum(len(plan.transfers) for _, plan in fresh)
            rows = self._rows.allocate_and_insert(count, lambda ids: self._new_rows(fresh, ids, self._pause))
        return self.planned_from_rows(gathered, rows)

    def planned_from_rows(self, gathered: Gathered, rows: list[RecordRow]) -> Planned:
        """The chunk's rows (written `planned`, in file order) as `apply` takes them."""
        by_identity = {line.identity: line for line in gathered.lines}
        positions = {line.identity: gathered.start + offset for offset, line in enumerate(gathered.lines)}
        rrns = [by_identity[row.identity].record.rrn for row in rows]
        reads = {rrn: (gathered.reads[rrn], gathered.ts_ns) for rrn in rrns}
        last_row = {rrn: index for index, rrn in enumerate(rrns)}
        return Planned(gathered.start, gathered.lines, by_identity, rows, reads,
                       {row.identity: positions[row.identity] for row in rows}, last_row)

    # -- the planner process's copy of a run (remote.py) and the server's exchanges with it --------

    def lines_at(self, start: int, count: int) -> tuple[Line, ...]:
        return self._file.lines[start:start + count]

    def move_to(self, start: int) -> None:
        """The planner's copy: the server applies the chunks, so this one only learns where they start."""
        self._next = start

    def hand_over_pending(self) -> _Pending | None:
        """The server: the durable chunk goes to the planner, which marks its rows applied."""
        pending, self._pending = self._pending, None
        return pending

    def take_over_pending(self, seq: int, applied: list[str],
                          events: dict[str, ClearedTransaction | ForcedTransaction]) -> None:
        """The planner: the chunk the server submitted, now durable (`durable` marks it applied)."""
        assert self._pending is None
        self._pending = _Pending(seq, applied, events)

    def add_counts(self, delta: ClearingSummary) -> None:
        """The server: what the planner counted (planning's refusals and duplicates, events written)."""
        summary = self.summary
        for name in _COUNTED:
            setattr(summary, name, getattr(summary, name) + getattr(delta, name))
        room = max(0, EXCEPTIONS_LISTED_MAX - len(summary.exceptions))
        summary.exceptions.extend(delta.exceptions[:room])
        summary.exceptions_count += delta.exceptions_count
        for currency, totals in delta.totals.items():
            mine = summary.totals.setdefault(currency, CurrencyTotals())
            for name in CurrencyTotals.__struct_fields__:
                setattr(mine, name, getattr(mine, name) + getattr(totals, name))
        summary.ledger_seq = delta.ledger_seq or summary.ledger_seq

    def apply(self, planned: Planned, slice_records_max: int | None = None) -> int:
        """On the thread that owns the ledger, synchronously: the next slice of the chunk's rows (all
        of them when `slice_records_max` is None). Check their plans still hold (plan again those that
        do not), then submit the slice as one batch. Returns the seq to wait for (0: nothing submitted).

        Raises WalFullError with nothing submitted when the log is full: back off and call again
        (the check runs again then). Between slices the caller may await: each slice is checked anew."""
        assert planned.start == self._next and (not planned.done or not planned.rows)
        ledger = self._deps.ledger.ledger
        ts_ns = max(self._clock_ns(), ledger.timestamp_ns + 1)  # the batch applies at exactly this time
        end = len(planned.rows) if slice_records_max is None else planned.submitted + slice_records_max
        lines = planned.by_identity
        rrns = {lines[row.identity].record.rrn for row in planned.rows[planned.submitted:end]}
        stale = {rrn for rrn in rrns if not self._unchanged(rrn, *planned.reads[rrn], ts_ns)}
        if stale:
            self._replan(planned, stale, ts_ns)
        rows = [row for row in planned.rows[planned.submitted:end] if row.identity not in planned.dropped]
        self._ensure_room(ts_ns, rows, [], 0)  # the rows carry their real ids
        planned.submitted = min(end, len(planned.rows))
        if planned.done:
            self._next = planned.start + len(planned.lines)
        if not rows:
            return 0
        transfers = tuple(spec for row in rows for spec in row.transfers)
        result, seq = self._deps.ledger.submit(Batch(timestamp_ns=ts_ns, transfers=transfers))
        applied = self._settle(lines, rows, result.transfer_results)
        # What the rest of the chunk's plans expect of these RRNs is the state right after this batch
        # (their overlay counted this slice's posts), unless a chain was refused: then plan again.
        ok = set(applied)
        refused_rrns = {lines[row.identity].record.rrn for row in rows if row.identity not in ok}
        for rrn in rrns:
            if planned.last_row[rrn] < planned.submitted:
                del planned.reads[rrn]  # no row of it left in the chunk: nothing to expect
                continue
            reads = None if rrn in refused_rrns else read_rrn(ledger, self._deps.journal, rrn)
            planned.reads[rrn] = (reads, planned.reads[rrn][1])
        by_identity = {row.identity: row.plan.event for row in rows}
        events = {identity: by_identity[identity] for identity in applied if by_identity[identity] is not None}
        if self._pending is None:
            self._pending = _Pending(seq, applied, events)
        else:  # an earlier slice of this chunk, maybe not durable yet: one store commit for all
            self._pending.seq = seq
            self._pending.applied.extend(applied)
            self._pending.events.update(events)
        return seq

    def _unchanged(self, rrn: str, reads: RrnReads | None, planned_ns: int, ts_ns: int) -> bool:
        """Would planning now, for a batch at `ts_ns`, read what it read for `planned_ns`?"""
        if reads is None or read_rrn(self._deps.ledger.ledger, self._deps.journal, rrn) != reads:
            return False
        # A pending hold whose deadline the batch reaches expires first (plan.Planner._remaining).
        return all(view is None or view.state is not HoldState.pending or not view.deadline_ns
                   or (view.deadline_ns <= planned_ns) == (view.deadline_ns <= ts_ns) for _, view in reads.holds)

    def _replan(self, planned: Planned, stale: set[str], ts_ns: int) -> None:
        """The rows not yet submitted of `stale` RRNs, planned again against the live state (which
        holds the chunk's earlier slices), their rows replaced (one store commit, on the loop: only
        after such a race)."""
        lines = planned.by_identity
        overlay = Overlay()
        redo: list[tuple[Line, Plan]] = []
        refused: list[str] = []
        for row in planned.rows[planned.submitted:]:
            line = lines[row.identity]
            if line.record.rrn not in stale or row.identity in planned.dropped:
                continue
            plan = self._planner.plan(line.record, self._card(line.record.pan),
                                      last=self._is_last(line, planned.positions[row.identity]), overlay=overlay,
                                      ts_ns=ts_ns, identity=line.identity)
            if plan.outcome is None:  # the card changed meanwhile: refused, as planning now would
                self._refused(line, plan.refusal)
                refused.append(row.identity)
            else:
                redo.append((line, plan))
        count = sum(len(plan.transfers) for _, plan in redo)
        replaced = {row.identity: row for row in self._rows.replan(count, lambda ids: self._new_rows(redo, ids))}
        self._rows.set_state(refused, RecordState.failed)
        planned.rows = [replaced.get(row.identity, row) for row in planned.rows]
        planned.dropped.update(refused)
        for rrn in stale:
            planned.reads[rrn] = (read_rrn(self._deps.ledger.ledger, self._deps.journal, rrn), ts_ns)
        self.replanned += len(redo) + len(refused)
        log.warning("clearing %s: %d records planned again, their authorizations changed before the batch",
                    self.summary.name, len(redo) + len(refused))

    def _is_last(self, line: Line, position: int) -> bool:
        return self._last_line[_match_key(line)] == position

    def durable_then_plan(self, gathered: Gathered | None) -> Planned | None:
        """In a worker thread: mark the last chunk applied (it is durable), then plan the next one,
        in ONE store transaction (one commit, one fsync, where there were two). A crash before it
        commits leaves the last chunk's rows `planned` (resubmitted, the ledger answers `exists`)
        and none of the next chunk's rows: nothing of it was submitted."""
        with self._deps.store.transaction():
            self.durable(self._pause)
            return None if gathered is None else self.plan(gathered)

    def durable(self, pause: Callable[[], None] | None = None) -> None:
        """The last chunk's batch is on disk: its rows become `applied`. `pause`: in a worker only."""
        pending, self._pending = self._pending, None
        if pending is not None:
            cleared, forced = self._rows.mark_applied(pending.applied, pending.events, pause)
            self.summary.cleared_events += cleared
            self.summary.forced_events += forced
            self.summary.ledger_seq = pending.seq

    def finish(self) -> ClearingSummary:
        assert self.finished
        self._rows.finish_file(self._file.sha256, msgspec.json.encode(self.summary))
        return self.summary

    # -- one record -------------------------------------------------------------------------

    def _card(self, pan: str) -> Card | None:
        index = self._deps.index
        state = index.card_by_pan_index(self._deps.vault.index(pan))
        if state is None:
            return None
        collateral = usage = fee_income = 0
        partner = index.partner(state.partner)
        if partner is not None and partner.collateral == "deposit":
            collateral = partner.collateral_account_ids.get(state.currency, 0)
            usage = partner.collateral_usage_account_ids.get(state.currency, 0)
        if partner is not None:
            fee_income = partner.fee_income_account_ids.get(state.currency, 0)
        return Card(state.card_id, state.balance_account_id, state.currency, collateral if usage else 0, usage,
                    partner=state.partner, balance_id=state.balance_id, pan_last4=state.pan_last4,
                    fee_income_account_id=fee_income,
                    external=partner is not None and partner.balance_mode == "external")

    def _known(self, line: Line, row: RecordRow, resumed: list[RecordRow], overlay: Overlay) -> None:
        if row.file_sha256 != self._file.sha256:
            self.summary.duplicates += 1  # applied by an earlier file
        elif row.state == RecordState.planned:
            resumed.append(row)  # this file, interrupted: resubmit the very same transfers
            ledger = self._deps.ledger.ledger
            for spec in row.transfers:  # what they will take from holds, unless the ledger has them
                if spec.flags & TransferFlags.post_pending and ledger.transfer_status(spec.id) is None:
                    overlay.take(spec.pending_id, spec.amount, bool(spec.flags & TransferFlags.final))
        elif row.state == RecordState.applied:
            self._count(line, row.plan, posted=True)
        else:
            self._refused(line, Refusal.ledger_refused)

    def _new_rows(self, fresh: list[tuple[Line, Plan]], ids: Iterator[int],
                  pause: Callable[[], None] | None = None) -> list[RecordRow]:
        """`pause`: in a worker thread only (never on the loop: it would hand the GIL away)."""
        rows = []
        for count, (line, plan) in enumerate(fresh, start=1):
            if pause is not None and count % PAUSE_EVERY_ROWS == 0:
                pause()
            transfers = tuple(msgspec.structs.replace(spec, id=next(ids)) for spec in plan.transfers)
            record = line.record
            summary_row = PlanRow(str(plan.outcome), plan.currency, plan.cleared, plan.released, plan.refunded,
                                  plan.referenced, plan.hold_id, mask_pan(record.pan), plan.cleared_event,
                                  plan.forced_event, plan.fee_refunded)
            rows.append(RecordRow(line.identity, self._file.sha256, record.record_id, line.number,
                                  RecordState.planned, transfers, summary_row))
        assert next(ids, None) is None, "every reserved id is used"
        return rows

    def _ensure_room(self, ts_ns: int, resumed: list[RecordRow], fresh: list[tuple[Line, Plan]], count: int) -> None:
        transfers = tuple(spec for row in resumed for spec in row.transfers)
        transfers += tuple(spec for _, plan in fresh for spec in plan.transfers)
        if transfers:
            size = len(encode_batch(self._encoder, Batch(timestamp_ns=ts_ns, transfers=transfers)))
            self._deps.ledger.wal.ensure_room(size + ID_ENCODED_BYTES_MAX * count)

    def _settle(self, lines: dict[str, Line], chains: list[RecordRow],
                results: tuple[TransferStatus, ...]) -> list[str]:
        """Count each record by what the ledger did with its chain; return the identities applied."""
        applied, failed = [], []
        start = 0
        for row in chains:
            statuses = results[start:start + len(row.transfers)]
            start += len(row.transfers)
            line = lines.get(row.identity)
            assert line is not None
            if all(status in _OK for status in statuses):
                applied.append(row.identity)
                self._count(line, row.plan, posted=True)
                if row.plan.hold_id:
                    self._close_if_resolved(row.plan.hold_id)
            else:
                failed.append(row.identity)
                refused = [status.name for status in statuses if status not in _OK and
                           status is not TransferStatus.linked_event_failed]
                log.error("ledger refused clearing record at line %d: %s", line.number, refused)
                self._refused(line, Refusal.ledger_refused, detail=",".join(refused))
        assert start == len(results)
        self._rows.set_state(failed, RecordState.failed)
        return applied

    def _close_if_resolved(self, hold_id: int) -> None:
        view = self._deps.ledger.ledger.hold(hold_id)
        if view is None or view.state is not HoldState.pending:
            self._deps.journal.close_holds((hold_id,))

    def _count(self, line: Line, plan: PlanRow, *, posted: bool) -> None:
        summary = self.summary
        outcome = ClearingOutcome(plan.outcome)
        summary.applied += 1
        counter = _COUNTERS[outcome]
        setattr(summary, counter, getattr(summary, counter) + 1)
        if outcome in MATCHED:
            summary.matched += 1
        if outcome is ClearingOutcome.refund and plan.referenced:
            summary.refunds_referenced += 1
        totals = summary.totals.setdefault(plan.currency, CurrencyTotals())
        totals.records += 1
        totals.cleared += plan.cleared
        totals.released += plan.released
        totals.refunded += plan.refunded
        totals.fee_refunded += plan.fee_refunded
        if outcome in _REASONS:
            summary.add_exception(ClearingException(line.record.record_id, line.number, _REASONS[outcome],
                                                    plan.masked_pan, posted))

    def _refused(self, line: Line, refusal: Refusal | None, detail: str = "") -> None:
        assert refusal is not None
        reason = f"{refusal}: {detail}" if detail else str(refusal)
        self.summary.add_exception(ClearingException(line.record.record_id, line.number, reason,
                                                     mask_pan(line.record.pan), False))


def _match_key(line: Line) -> str:
    """A str, not a tuple: a file's ~2,000 keys then add nothing for the collector to walk. Unambiguous:
    the RRN goes by its length, and the PAN (digits only) follows the auth code's last colon."""
    record = line.record
    return f"{len(record.rrn)}:{record.rrn}{record.auth_code}:{record.pan}"


# -- the two drivers ----------------------------------------------------------------------------


@attrs.define
class _Timing:
    """Where an online run's time went (logged once per file): the event loop's share is the point."""

    started: float = attrs.Factory(time.perf_counter)
    worker_s: float = 0.0  # waiting for worker threads (parse, plan, store commits)
    hops: int = 0
    durable_s: float = 0.0  # waiting for the log's group commit
    loop_s: float = 0.0  # holding the event loop: gather, apply (slices), step
    loop_max_s: float = 0.0
    away: str = "worker threads"  # where the planning ran: worker threads, or the planner process

    async def worker(self, fn, *args):
        return await self.remote(trio.to_thread.run_sync(fn, *args))

    async def remote(self, call):
        """A hop away from the loop (a worker thread, or an exchange with the planner process)."""
        started = time.perf_counter()
        try:
            return await call
        finally:
            self.worker_s += time.perf_counter() - started
            self.hops += 1

    def on_loop(self, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            held = time.perf_counter() - started
            self.loop_s += held
            self.loop_max_s = max(self.loop_max_s, held)

    def report(self, summary: ClearingSummary, gate_waited_s: float) -> None:
        log.info("clearing %s: %d lines in %.2f s: %s %.2f s (%d hops, %.2f s of it waiting for an"
                 " idle loop), waiting for the log %.2f s, event loop %.3f s (longest %.1f ms)", summary.name,
                 summary.lines, time.perf_counter() - self.started, self.away, self.worker_s, self.hops, gate_waited_s,
                 self.durable_s, self.loop_s, self.loop_max_s * 1000)


def pace_s(lines_taken: int, records_per_second_max: int, elapsed_s: float) -> float:
    """How long to wait before the next chunk, so that a file's lines are taken at no more than
    `records_per_second_max` (ClearingConfig) counted from the file's start."""
    return max(0.0, lines_taken / records_per_second_max - elapsed_s)


async def apply_clearing(deps: ClearingDeps, data: bytes, name: str, *,
                         records_per_second_max: int = 0) -> ClearingSummary:
    """On the server's trio thread: chunk by chunk, waiting for each to be durable in between.

    The loop keeps only the cheap steps (gather, apply: copying a chunk's reads, checking them
    again, submitting slices of APPLY_SLICE_RECORDS_MAX records, with a LOOP_PAUSE_S pause between
    slices); parsing, the store's reads and commits, and planning run in worker threads, one hop
    per chunk (marking the previous chunk applied, then planning this one), which work only while
    the loop waits for I/O (LoopIdleGate). With `records_per_second_max`, each chunk starts no
    sooner than that rate allows (pace_s): the same work, spread over more time."""
    assert records_per_second_max >= 0
    gate = LoopIdleGate()
    trio.lowlevel.add_instrument(gate)
    try:
        return await _apply_online(deps, data, name, gate.open, records_per_second_max)
    finally:
        trio.lowlevel.remove_instrument(gate)
        gate.open.set()  # a worker still at the gate (a cancelled run) goes on at once


async def _apply_online(deps: ClearingDeps, data: bytes, name: str, gate: threading.Event,
                        records_per_second_max: int) -> ClearingSummary:
    timing = _Timing()
    pause = GilYield(gate=gate)
    run = await timing.worker(_open_run, deps, data, name, ONLINE_CHUNK_RECORDS_MAX, pause)
    done = await timing.worker(run.start)
    if done is not None:
        return done
    planner = deps.planner
    if planner is not None:
        try:
            await timing.remote(planner.open(data, name, ONLINE_CHUNK_RECORDS_MAX))
            timing.away = "the planner process"
        except (OSError, PlannerError) as error:  # nothing planned yet: this file in a worker thread
            log.error("clearing %s: the planner process is not available, planning in a worker thread: %s",
                      name, error)
            planner = None
    retries = 0
    seq = 0
    paced_from = trio.current_time()
    while not run.finished:  # bounded: each round consumes up to ONLINE_CHUNK_RECORDS_MAX lines
        if records_per_second_max:
            await trio.sleep(pace_s(run.lines_taken, records_per_second_max, trio.current_time() - paced_from))
        gathered = None
        if run.lines_left:  # its reads in pieces of APPLY_SLICE_RECORDS_MAX RRNs, checkpoints between
            gathered = timing.on_loop(run.gather, APPLY_SLICE_RECORDS_MAX)
            while not timing.on_loop(run.gather_more, gathered, APPLY_SLICE_RECORDS_MAX):
                await trio.sleep(LOOP_PAUSE_S)
        if seq:
            started = time.perf_counter()
            await deps.ledger.wait_durable(seq)
            timing.durable_s += time.perf_counter() - started
        # Marking rows applied and planning touch the store (commits with an fsync): off the loop,
        # in the planner process (its own GIL) or else a worker thread.
        if planner is not None:
            planned = await timing.remote(planner.durable_then_plan(run, gathered))
        else:
            planned = await timing.worker(run.durable_then_plan, gathered)
        if gathered is None:
            break
        seq = 0
        while True:  # bounded: a slice per round (the chunk's rows / APPLY_SLICE_RECORDS_MAX), retries bounded
            try:
                if planned is None:
                    seq = timing.on_loop(run.step)
                else:
                    seq = timing.on_loop(run.apply, planned, APPLY_SLICE_RECORDS_MAX) or seq
            except WalFullError:
                retries += 1
                if retries > WAL_FULL_RETRIES_MAX:
                    raise
                await trio.sleep(WAL_FULL_BACKOFF_S)
                continue
            if planned is None or planned.done:
                break
            await trio.sleep(LOOP_PAUSE_S)  # authorizations in between slices
    summary = await timing.worker(run.finish)
    timing.report(summary, pause.gate_waited_s)
    return summary


def _open_run(deps: ClearingDeps, data: bytes, name: str, chunk_records_max: int | None,
              pause: Callable[[], None] | None = None) -> ClearingRun:
    return ClearingRun(deps, parse_clearing_file(data, pause=pause), name, chunk_records_max=chunk_records_max,
                       pause=pause)


def apply_clearing_offline(deps: ClearingDeps, data: bytes, name: str) -> ClearingSummary:
    """The same with no event loop (the CLI with the server stopped): the same steps in sequence,
    flush_sync per chunk."""
    run = _open_run(deps, data, name, None)
    done = run.start()
    if done is not None:
        return done
    while not run.finished:  # bounded as above
        planned = run.plan(run.gather())
        while True:  # bounded: offline nothing else appends, so a flush makes room
            try:
                seq = run.step() if planned is None else run.apply(planned)
                break
            except WalFullError:
                deps.ledger.flush_sync()
        if seq:
            deps.ledger.flush_sync()
        run.durable()
    return run.finish()
