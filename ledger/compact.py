"""Snapshots built by replay, in a process of their own.

A snapshot taken by forking the live process costs that process dearly for as long as the child
lives: every page it then writes is copied first. Measured in a 30-minute soak at 1,400/s with a
~670 MiB heap: ~130,000 page faults in the 6 s after each fork, event-loop steps of 30-95 ms back
to back for over a second (docs/benchmarks.md, section 6).

A compactor shares no memory with the live process. It reads what the live process already made
durable: the newest snapshot, then the log's records up to `upto_seq` (wal.read_log: no lock taken,
no file changed), applies them to a fresh `Ledger` exactly as recovery does, and writes the state
image under the snapshot's temporary name, fsync'd. Because `Ledger.apply` is deterministic, that
image is the state the live process had at `upto_seq`. The live process then publishes it and
truncates the log behind it (DurableLedger.snapshot_async); it truncates nothing while a compactor
runs, so the segments read here stay in place.

With FOLLOW in place of SEQ the compactor stays (`Follower`, `serve`): it loads the newest
snapshot once, then reads the log as the owner writes it (wal.LogFollower) and applies each record,
so a snapshot costs it only the records since its last poll and the image's write. The owner sends
it a durable seq per snapshot on stdin; it answers one line on stdout (DurableLedger.start_compactor).

`python -m ledger.compact DIRECTORY SEQ BOUNDS_JSON` does this for a ledger without application state; an
application whose batches carry `app` bytes runs its own command built on `rebuild` and
`write_image` (authsrv.compactor), because only it can rebuild that state.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import select
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import msgspec

from ledger.durable import (
    LedgerRecoveryError,
    apply_records,
    check_coverage,
    decode_snapshot,
    encode_snapshot,
)
from ledger.snapshot import load_latest_snapshot, write_snapshot_temporary
from ledger.state import Ledger
from ledger.wal import SEQ_FIRST, LogFollower, list_segments, read_log

# Below the live process's priority: on a busy machine the compactor takes what CPU is left (a
# snapshot late by seconds costs only a longer log), not the switch's.
NICE_INCREMENT = 10
# And below it on the disk: the idle I/O class (ioprio_set(2); honoured by the mq-deadline and BFQ
# schedulers), so that its reads of the previous snapshot and the log, which a host that evicts cold
# page cache sends to the disk, queue behind the owner's log writes (docs/benchmarks.md, section 6).
IOPRIO_CLASS_IDLE = 3
IOPRIO_CLASS_SHIFT = 13
IOPRIO_WHO_PROCESS = 1
IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}  # (ioprio_set, ioprio_get)
PARENT_CHECK_S = 0.5  # a compactor whose parent died exits within this
PARENT_ENV = "LEDGER_COMPACTOR_PARENT"  # the owner's pid, set when it starts a compactor
FOLLOW = "follow"  # in place of SEQ: the compactor stays and follows the log (Follower, serve)
FOLLOW_POLL_S = 0.2  # how often a following compactor reads what the owner appended
CATCH_UP_TIMEOUT_S = 10.0  # for durable records not yet seen whole (LogFollower.read_upto)


class LedgerBounds(msgspec.Struct, frozen=True):
    """The owner's count bounds at the call, given to the compactor as JSON (its last argument).

    A snapshot does not hold the bounds the owner runs with (the operator's are set after opening,
    not logged), and replay evicts ids and trims history by them. Replayed with other bounds, the
    image would differ from the owner's state, or even break its invariants (ids past the bound)."""

    ids_max: int
    holds_pending_max: int
    history_per_account_max: int

    @classmethod
    def of(cls, ledger: Ledger) -> LedgerBounds:
        return cls(ids_max=ledger.ids_max, holds_pending_max=ledger.holds_pending_max,
                   history_per_account_max=ledger.history_per_account_max)

    def put_on(self, ledger: Ledger) -> None:
        ledger.set_bounds(ids_max=self.ids_max, holds_pending_max=self.holds_pending_max,
                          history_per_account_max=self.history_per_account_max)


@attrs.define
class Phases:
    """Where a compaction's time went, for its summary line: loading the newest snapshot, replaying
    the log after it, and writing the image (an operator matching slow seconds to a phase)."""

    started: float = attrs.Factory(time.perf_counter)
    load_s: float = 0.0
    replay_s: float = 0.0
    write_s: float = 0.0

    def lap(self) -> float:
        """Seconds since the start, less the phases already counted."""
        return time.perf_counter() - self.started - self.load_s - self.replay_s - self.write_s


def load_newest(directory: Path, bounds: LedgerBounds, upto_seq: int | None = None) -> tuple[Ledger, bytes, int]:
    """The newest snapshot, the owner's `bounds` put on it: (ledger, its app image, its seq).
    With `upto_seq`, the log must hold every record from the snapshot to there."""
    directory = Path(directory)
    segments = list_segments(directory)
    log_first_seq = segments[0][0] if segments else SEQ_FIRST
    loaded = load_latest_snapshot(directory, log_first_seq=log_first_seq)
    if loaded is None:
        snapshot_seq, ledger, app = 0, Ledger(), b""
    else:
        snapshot_seq = loaded[0]
        ledger, app = decode_snapshot(loaded[1])
    if upto_seq is not None and snapshot_seq > upto_seq:
        raise LedgerRecoveryError(f"the newest snapshot covers seq {snapshot_seq}, past seq {upto_seq}")
    check_coverage(log_first_seq, snapshot_seq if upto_seq is None else upto_seq, snapshot_seq)
    bounds.put_on(ledger)
    return ledger, app, snapshot_seq


def rebuild(directory: Path, upto_seq: int, bounds: LedgerBounds, *,
            on_app: Callable[[int, bytes], None] | None = None,
            phases: Phases | None = None) -> tuple[Ledger, bytes, int]:
    """The state at `upto_seq`, read-only: (ledger, the snapshot's app image, the snapshot's seq).

    `bounds` (the owner's) are put on the loaded snapshot before replay, so that replay evicts and
    trims as the owner did. `on_app(seq, app)` gets the `app` bytes of every record replayed after
    the snapshot, in order. The garbage collector is paused meanwhile, as in recovery (replay only
    adds live objects). The result's invariants are checked: an image that would not load is never
    written."""
    ledger, app, snapshot_seq = load_newest(directory, bounds, upto_seq)
    if phases is not None:
        phases.load_s = phases.lap()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        apply_records(ledger, read_log(Path(directory), snapshot_seq + 1, upto_seq), snapshot_seq + 1, on_app)
    finally:
        if gc_was_enabled:
            gc.enable()
    ledger.check_invariants()
    if phases is not None:
        phases.replay_s = phases.lap()
    return ledger, app, snapshot_seq


class Follower:
    """A compactor that stays: it loads the newest snapshot once, then applies the owner's records
    as they land (wal.LogFollower), so a snapshot costs only the records since the last poll and
    the image's write. The one-shot compactor reads the previous snapshot and a whole interval of
    log each time, which a host that evicts cold page cache sends to the disk: on machine C, 30-45 s
    of reads and a ~900 MiB heap built anew every interval (docs/benchmarks.md, section 6). This one
    keeps that heap, as large, for as long as the owner runs.

    `on_app(seq, app)` gets the app bytes of every record applied, in order, as in `rebuild`."""

    def __init__(self, directory: Path, bounds: LedgerBounds,
                 on_app: Callable[[int, bytes], None] | None = None) -> None:
        self.directory = Path(directory)
        # `app`: the application's image at the last snapshot loaded or written (follow_image)
        self.ledger, self.app, self.seq = load_newest(self.directory, bounds)
        self._on_app = on_app
        self._log = LogFollower(self.directory, self.seq + 1)

    def follow(self) -> int:
        """Apply what the owner has written whole since the last call; return how many records."""
        applied = apply_records(self.ledger, self._log.poll(), self.seq + 1, self._on_app)
        self.seq += applied
        return applied

    def catch_up(self, upto_seq: int, timeout_s: float) -> int:
        """Apply every record to `upto_seq`, which the owner says is durable (WalError past the
        timeout); return the seq this copy is at, `upto_seq` or past it (what it had read already:
        written whole, so the owner makes it durable before it publishes the image)."""
        apply_records(self.ledger, self._log.read_upto(upto_seq, timeout_s), self.seq + 1, self._on_app)
        self.seq = max(self.seq, self._log.next_seq - 1)
        assert self.seq >= upto_seq
        self.ledger.check_invariants()
        return self.seq


def serve(follower: Follower, image: Callable[[int], tuple[int, Phases]], *, stdin_fd: int = 0, out=None) -> int:
    """The follow mode's loop: apply new records every FOLLOW_POLL_S. On a line `SEQ` from the
    owner (SEQ is durable), catch up to SEQ at least, write that image (`image(seq)` returns the seq
    it covers and its phases), and answer one line: that seq, then a summary. Ends, 0, when the
    owner closes the pipe.

    The collector stays off (replay only adds live objects); what was added is frozen after each
    image, so each collection walks only what came since."""
    out = sys.stdout if out is None else out
    gc.disable()
    gc.freeze()
    pending = b""
    while True:  # bounded by the owner: it ends when the pipe closes
        readable, _, _ = select.select([stdin_fd], [], [], FOLLOW_POLL_S)
        if not readable:
            follower.follow()
            continue
        data = os.read(stdin_fd, 4096)
        if not data:
            return 0
        pending += data
        while b"\n" in pending:  # bounded by the bytes read
            line, pending = pending.split(b"\n", 1)
            if not line.strip().isdigit():
                print(f"expected a seq, got {line[:40]!r}", file=sys.stderr)
                return 2
            before = follower.seq
            seq, phases = image(int(line))
            print(f"{seq} {follow_summary(seq, seq - before, phases)}", file=out, flush=True)
            gc.collect()
            gc.freeze()


def follow_summary(seq: int, records: int, phases: Phases) -> str:
    """One line for the owner's log, as `summary` for a compactor that follows the log."""
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"seq {seq}: followed the log ({records} records applied at the request) in "
            f"{time.perf_counter() - phases.started:.2f} s (catch-up {phases.replay_s:.2f} s, image written "
            f"{phases.write_s:.2f} s), peak RSS {peak_mib:.0f} MiB")


def write_image(directory: Path, seq: int, ledger: Ledger, app: bytes) -> Path:
    """The snapshot at `seq` under its temporary name, fsync'd; the owner of the log publishes it.
    Paced: the owner's log commits on the same disk meanwhile (ledger.snapshot)."""
    return write_snapshot_temporary(Path(directory), seq, encode_snapshot(ledger, app), sync=True, paced=True)


def _ioprio_syscalls() -> tuple[int, int] | None:
    """(ioprio_set, ioprio_get) on this system, None where it has no such calls."""
    return IOPRIO_SYSCALLS.get(platform.machine()) if sys.platform.startswith("linux") else None


def io_priority_class() -> int | None:
    """This process's I/O priority class (ioprio_get(2)); None where it cannot be read."""
    numbers = _ioprio_syscalls()
    value = -1 if numbers is None else ctypes.CDLL(None).syscall(numbers[1], IOPRIO_WHO_PROCESS, 0)
    return None if value < 0 else value >> IOPRIO_CLASS_SHIFT


def lower_io_priority() -> bool:
    """Put this process in the idle I/O class; False where the system has no such call."""
    numbers = _ioprio_syscalls()
    return numbers is not None and ctypes.CDLL(None).syscall(
        numbers[0], IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT) == 0


def become_compactor() -> None:
    """For a compactor's first line: lower CPU and I/O priority, and die with the process that
    started it (a server killed mid-snapshot must not leave this one competing with its restart)."""
    os.nice(NICE_INCREMENT)
    lower_io_priority()  # best effort: without it the compactor only competes harder for the disk
    watch_parent()


def watch_parent() -> None:
    """Exit within PARENT_CHECK_S of the process that started this one.

    The owner names itself in PARENT_ENV (DurableLedger does), so a parent that died before this
    line is seen too; without it, the parent at this line is watched. A thread watches the pid
    rather than prctl(PR_SET_PDEATHSIG): that signal follows the *thread* that started the child,
    and trio starts processes from worker threads, which end when idle: the soak's second
    compactor was killed (exit -9) half way through that way."""
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())

    def watch() -> None:
        while os.getppid() == parent:  # until the process ends (a daemon thread)
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def summary(seq: int, snapshot_seq: int, phases: Phases) -> str:
    """One line for the owner's log: what was replayed, how long each phase took, the peak memory."""
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"seq {seq}: {seq - snapshot_seq} records replayed after the snapshot at seq {snapshot_seq} "
            f"in {time.perf_counter() - phases.started:.2f} s (snapshot loaded {phases.load_s:.2f} s, replay "
            f"{phases.replay_s:.2f} s, image written {phases.write_s:.2f} s), peak RSS {peak_mib:.0f} MiB")


def parse_arguments(argv: list[str], usage: str) -> tuple[Path, int | None, LedgerBounds] | None:
    """DIRECTORY SEQ BOUNDS_JSON, as DurableLedger.snapshot_async appends them (SEQ None for
    FOLLOW); None: print usage."""
    if len(argv) != 3 or not (argv[1].isdigit() or argv[1] == FOLLOW):
        print(f"usage: {usage}", file=sys.stderr)
        return None
    try:
        bounds = msgspec.json.decode(argv[2], type=LedgerBounds)
    except msgspec.DecodeError as error:
        print(f"bounds {argv[2]!r}: {error}\nusage: {usage}", file=sys.stderr)
        return None
    return Path(argv[0]), None if argv[1] == FOLLOW else int(argv[1]), bounds


class ApplicationStateError(Exception):
    """The log carries `app` bytes: only the application's compactor can rebuild that state."""


def main(argv: list[str]) -> int:
    parsed = parse_arguments(argv, f"python -m ledger.compact DIRECTORY SEQ|{FOLLOW} BOUNDS_JSON")
    if parsed is None:
        return 2
    directory, seq, bounds = parsed
    become_compactor()

    def refuse(record_seq: int, _: bytes = b"") -> None:
        raise ApplicationStateError(f"the log in {directory} carries application state (e.g. seq {record_seq}): "
                                    "use the application's compactor")

    try:
        if seq is None:
            follower = Follower(directory, bounds, on_app=refuse)
            if follower.app:
                refuse(follower.seq)
            return serve(follower, lambda upto: follow_image(follower, upto))
        phases = Phases()
        ledger, app, snapshot_seq = rebuild(directory, seq, bounds, on_app=refuse, phases=phases)
        if app:
            refuse(snapshot_seq)
    except ApplicationStateError as error:
        print(error, file=sys.stderr)
        return 1
    write_image(directory, seq, ledger, b"")
    phases.write_s = phases.lap()
    print(summary(seq, snapshot_seq, phases))
    return 0


def follow_image(follower: Follower, upto_seq: int, app: Callable[[], bytes] | None = None) -> tuple[int, Phases]:
    """Catch up to `upto_seq` at least, write that image (with `app()`, the application's image at
    the same seq), and say which seq it covers and how long it took."""
    phases = Phases()
    seq = follower.catch_up(upto_seq, CATCH_UP_TIMEOUT_S)
    app_image = app() if app is not None else b""
    phases.replay_s = phases.lap()
    write_image(follower.directory, seq, follower.ledger, app_image)
    follower.app = app_image
    phases.write_s = phases.lap()
    return seq, phases


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
