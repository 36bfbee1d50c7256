"""The durable ledger: the in-memory `Ledger` plus its write-ahead log and snapshots.

One rule makes it crash-safe: every batch is applied to memory and appended to the log in the same
order, and its caller is answered only after `wait_durable(seq)`. The log on disk is always a
prefix of the applied batches and `Ledger.apply` is deterministic, so a restart (newest snapshot,
then every logged batch after it) rebuilds exactly the state of that prefix. A crash can lose only
batches whose callers were never answered.

Directory layout: the log segments (`wal-*.log`) and the snapshots (`snapshot-*.snap`) side by side.
A snapshot holds msgpack `[ledger.to_snapshot(), app_snapshot]`; `app_snapshot` is the embedding
application's own state image, taken at the same instant, and each batch's `app` bytes are handed
back on replay, so the application's state rides on the same commits.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec
import trio

from ledger.snapshot import (
    list_snapshots,
    load_latest_snapshot,
    publish_snapshot,
    sync_snapshot_temporary,
    write_snapshot,
    write_snapshot_temporary,
)
from ledger.state import Ledger
from ledger.types import AccountSpec, Batch, BatchResult, TransferSpec
from ledger.wal import RECORD_SIZE_MAX, SEQ_FIRST, Wal, WalError

log = logging.getLogger("ledger.durable")

_OnApp = Callable[[int, bytes], None]
_Finish = Callable[[BatchResult], bytes]
# A compactor replays one snapshot interval (500k records: 20-60 s on machine B); past this it is
# killed and the snapshot tried again later. Its error output is kept to this many lines.
COMPACTOR_TIMEOUT_S = 600.0
COMPACTOR_LINES_KEPT = 5
COMPACTOR_SUMMARY_CHARS = 300
COMPACTOR_LINE_BYTES_MAX = 4096  # a following compactor's answer: a seq and its summary
COMPACTOR_STOP_S = 5.0  # a following compactor told to stop (its pipe closed) exits within this, or is killed


class LedgerRecoveryError(WalError):
    """Snapshot and log do not fit together, or a logged batch cannot be decoded."""


class SnapshotChildError(OSError):
    """The snapshot writer (a fork, or a compactor) failed (full disk, I/O error, killed): no
    snapshot; try later."""


class LedgerFailedError(RuntimeError):
    """An earlier apply raised: memory may differ from the log, so no more batches are taken."""


class _SnapshotImage(msgspec.Struct, array_like=True, frozen=True):
    ledger: bytes
    app: bytes


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(_SnapshotImage)

# msgpack ints stop at 2**64 - 1 but ids go up to 2**127 - 1: such a batch is logged with the wide
# ints as ext type _EXT_WIDE_INT (the same convention as Ledger.to_snapshot) and decoded untyped,
# then converted. Rare, so the common path stays one typed encode and one typed decode.
_EXT_WIDE_INT = 1
_MSGPACK_INT_MIN = -(2**63)
_MSGPACK_INT_MAX = 2**64 - 1
_BATCH_TAG = "b"


def encode_batch(encoder: msgspec.msgpack.Encoder, batch: Batch) -> bytes:
    try:
        return encoder.encode(batch)
    except OverflowError:
        return encoder.encode([_BATCH_TAG, *_widen(batch)])


def decode_batch(decoder: msgspec.msgpack.Decoder, payload: bytes) -> Batch:
    """Inverse of encode_batch; raises msgspec.DecodeError (incl. ValidationError)."""
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError:
        rows = msgspec.msgpack.decode(payload, ext_hook=_ext_hook)
        return msgspec.convert(rows, Batch)


def _widen(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        if _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
            return value
        size = (value.bit_length() + 8) // 8  # room for the sign bit
        return msgspec.msgpack.Ext(_EXT_WIDE_INT, value.to_bytes(size, "big", signed=True))
    if isinstance(value, msgspec.Struct):  # array_like: encoded as its fields in order
        return [_widen(item) for item in msgspec.structs.astuple(value)]
    if isinstance(value, (list, tuple)):
        return [_widen(item) for item in value]
    return value


def _ext_hook(code: int, data: memoryview) -> int:
    if code != _EXT_WIDE_INT:
        raise msgspec.DecodeError(f"unknown msgpack ext type {code} in a logged batch")
    return int.from_bytes(data, "big", signed=True)


def _fd_limit() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 65536


async def _child_succeeded(pid: int, seq: int) -> None:
    """Wait for the snapshot child in a worker thread; raise if it did not write the file."""
    _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise SnapshotChildError(f"the snapshot writer for seq {seq} failed (wait status {status})")


def check_coverage(log_first_seq: int, log_last_seq: int, snapshot_seq: int) -> None:
    """The log must hold every record after the snapshot, and must not end before it."""
    if log_first_seq > snapshot_seq + 1:
        raise LedgerRecoveryError(
            f"log starts at seq {log_first_seq} but snapshot covers only up to seq {snapshot_seq}"
        )
    if log_last_seq < snapshot_seq:
        raise LedgerRecoveryError(
            f"log ends at seq {log_last_seq} but snapshot covers up to seq {snapshot_seq}"
        )


def replay_into(ledger: Ledger, wal: Wal, from_seq: int, on_app: _OnApp | None) -> int:
    """Apply every durable logged batch with seq >= from_seq; return how many were applied."""
    # Replay only adds live objects, yet the cyclic GC would rescan the growing ledger again and
    # again: pausing it halves recovery time (measured: 100k hold+post batches, 3.5 s -> 1.5 s).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        applied = apply_records(ledger, wal.replay(from_seq), from_seq, on_app)
    finally:
        if gc_was_enabled:
            gc.enable()
    assert from_seq + applied == wal.durable_seq + 1 or applied == 0
    return applied


def apply_records(ledger: Ledger, records: Iterable[tuple[int, bytes]], from_seq: int,
                  on_app: _OnApp | None) -> int:
    """Apply logged (seq, payload) records, which must start at from_seq and follow each other."""
    decoder = msgspec.msgpack.Decoder(Batch)
    applied = 0
    seq_expected = from_seq
    for seq, payload in records:
        assert seq == seq_expected, (seq, seq_expected)
        try:
            batch = decode_batch(decoder, payload)
        except msgspec.DecodeError as error:
            raise LedgerRecoveryError(f"logged batch at seq {seq} does not decode: {error}") from None
        ledger.apply(batch)
        if on_app is not None and batch.app:
            on_app(seq, batch.app)
        applied += 1
        seq_expected += 1
    return applied


def encode_snapshot(ledger: Ledger, app: bytes) -> bytes:
    """A snapshot's payload: the ledger's state image and the application's, taken at one seq."""
    return _snapshot_encoder.encode(_SnapshotImage(ledger.to_snapshot(), app))


def decode_snapshot(payload: bytes) -> tuple[Ledger, bytes]:
    try:
        image = _snapshot_decoder.decode(payload)
    except msgspec.DecodeError as error:
        raise LedgerRecoveryError(f"snapshot payload does not decode: {error}") from None
    return Ledger.from_snapshot(image.ledger), image.app


async def stop_child(process: trio.Process, wait_s: float) -> None:
    """A child that serves requests on its stdin (a following compactor, clearing's planner): close
    its stdin, the sign to exit, and wait for it; kill it past `wait_s`. Callers shield it, so that a
    cancelled one still reaps the child."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await process.stdin.aclose()
    with trio.move_on_after(wait_s):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


class DurableLedger:
    """What the server and the CLI use. Build with `DurableLedger.open`."""

    FORK_SNAPSHOTS = True  # snapshot_async serializes in a forked child (see there)
    # snapshot_async runs `[*compactor, directory, seq, bounds]` instead of forking (ledger.compact): the
    # command prefix, e.g. (sys.executable, "-m", "ledger.compact"); None: fork.
    compactor: tuple[str, ...] | None = None

    def __init__(
        self,
        directory: Path,
        wal: Wal,
        ledger: Ledger,
        *,
        snapshot_seq: int,
        app_snapshot: bytes,
        clock_ns: Callable[[], int],
    ) -> None:
        assert snapshot_seq <= wal.last_seq
        self.directory = directory
        self.ledger = ledger
        self.snapshot_seq = snapshot_seq  # the seq the loaded (or last written) snapshot covers
        self.app_snapshot = app_snapshot  # the application's blob from the snapshot loaded
        self._wal = wal
        self._clock_ns = clock_ns
        self._encoder = msgspec.msgpack.Encoder()
        self._failed: BaseException | None = None
        self._snapshot_running = False
        self._follower: trio.Process | None = None  # the compactor that follows the log (start_compactor)
        self._follower_said = b""  # what it wrote on stdout past the last whole line

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        on_app: _OnApp | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        check_invariants: bool = True,
        **wal_options,
    ) -> DurableLedger:
        """Recover: newest snapshot, then every logged batch after it, then check invariants.

        `on_app(seq, app)` is called for each replayed batch whose `app` is non-empty, in log
        order. `wal_options` go to `Wal.open` (segment_size_max, on_commit, buffer_bytes_max).
        """
        directory = Path(directory)
        started = time.perf_counter()
        wal = Wal.open(directory, **wal_options)
        try:
            loaded = load_latest_snapshot(directory, log_first_seq=wal.first_seq)
            if loaded is None:
                snapshot_seq, ledger, app_snapshot = 0, Ledger(), b""
            else:
                snapshot_seq = loaded[0]
                ledger, app_snapshot = decode_snapshot(loaded[1])
            check_coverage(wal.first_seq, wal.last_seq, snapshot_seq)
            applied = replay_into(ledger, wal, snapshot_seq + 1, on_app)
            if check_invariants:
                ledger.check_invariants()
        except BaseException:
            wal.close()
            raise
        log.info(
            "ledger recovered from %s: snapshot seq %d, %d logged batches replayed, last seq %d, "
            "%.3f s",
            directory,
            snapshot_seq,
            applied,
            wal.last_seq,
            time.perf_counter() - started,
        )
        return cls(
            directory,
            wal,
            ledger,
            snapshot_seq=snapshot_seq,
            app_snapshot=app_snapshot,
            clock_ns=clock_ns,
        )

    # ----------------------------------------------------------------------------- state

    @property
    def wal(self) -> Wal:
        return self._wal

    @property
    def last_seq(self) -> int:
        """Seq of the last batch applied (and appended; maybe not yet durable)."""
        return self._wal.last_seq

    @property
    def durable_seq(self) -> int:
        return self._wal.durable_seq

    # ----------------------------------------------------------------------------- the hot path

    def submit(self, batch: Batch, *, finish: _Finish | None = None) -> tuple[BatchResult, int]:
        """Apply to memory and append to the log, in that order; return (result, seq).

        Answer the caller only after `await wait_durable(seq)`. The batch is logged as given
        (apply is deterministic, so replay clamps the timestamp the same way); timestamp_ns=0
        means "now" and is replaced by clock_ns() before applying and logging.

        `finish(result) -> bytes`, if given, runs right after apply and returns the `app` bytes
        to log with this batch (e.g. an authorization record that states the decision the result
        implies), so the application's record and the ledger change share one durable commit.

        Raises WalFullError with nothing applied when the log buffer is full (back off).
        """
        if self._failed is not None:
            raise LedgerFailedError("an earlier apply failed; restart to recover") from self._failed
        if batch.timestamp_ns == 0:
            batch = msgspec.structs.replace(batch, timestamp_ns=self._clock_ns())
        if finish is None:
            payload = encode_batch(self._encoder, batch)
            room = len(payload)
        else:
            assert not batch.app, "finish() supplies the app bytes"
            payload, room = b"", RECORD_SIZE_MAX  # size unknown until finish(): reserve a record
        # Check for room first: once applied, the batch must reach the log, or a later
        # replay would diverge from what callers were told.
        self._wal.ensure_room(room)
        try:
            result = self.ledger.apply(batch)
        except BaseException as error:
            self._failed = error
            log.critical("ledger apply raised; refusing further batches", exc_info=True)
            raise
        if finish is not None:
            payload = self._encode_finished(batch, result, finish)
        seq = self._wal.append(payload)
        return result, seq

    def _encode_finished(self, batch: Batch, result: BatchResult, finish: _Finish) -> bytes:
        """The batch with finish()'s app bytes; without them if finish raises (the ledger change
        is applied and must be logged either way), after which the error propagates."""
        try:
            app = finish(result)
            assert isinstance(app, bytes), type(app)
        except BaseException:
            self._wal.append(encode_batch(self._encoder, batch))
            raise
        return encode_batch(self._encoder, msgspec.structs.replace(batch, app=app))

    def submit_now(
        self,
        *,
        accounts: Iterable[AccountSpec] = (),
        transfers: Iterable[TransferSpec] = (),
        app: bytes = b"",
    ) -> tuple[BatchResult, int]:
        """submit() a batch stamped with clock_ns()."""
        batch = Batch(
            timestamp_ns=self._clock_ns(),
            accounts=tuple(accounts),
            transfers=tuple(transfers),
            app=app,
        )
        return self.submit(batch)

    async def wait_durable(self, seq: int) -> None:
        await self._wal.wait_durable(seq)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the log's group committer (for the life of the service)."""
        await self._wal.run_committer(task_status=task_status)

    def flush_sync(self) -> None:
        self._wal.flush_sync()

    # ----------------------------------------------------------------------------- snapshots

    def snapshot_due(self, records_since: int, interval_records: int) -> bool:
        """Is a snapshot due, `records_since` records after the last one?"""
        return records_since >= interval_records

    def snapshot(self, app_snapshot: bytes = b"") -> int:
        """Write a snapshot of the state at last_seq; drop log segments no snapshot needs.

        Synchronous. What must not change while it runs: the ledger (no submit) and the
        application state `app_snapshot` was taken from -- the snapshot claims to be exactly the
        state after last_seq. Called from the trio thread this holds by construction (it does
        not yield); from a worker thread, the caller must pause submissions until it returns.
        It blocks for the serialization, the file write and two fsyncs.
        """
        if self._snapshot_running:
            raise RuntimeError("a snapshot is already being written")
        self._wal.flush_sync()
        seq = self._wal.last_seq
        assert self._wal.durable_seq >= seq, "a snapshot may only cover durable records"
        payload = encode_snapshot(self.ledger, app_snapshot)
        assert self._wal.last_seq == seq, "the ledger changed during the snapshot"
        self._store_snapshot(seq, payload)
        return seq

    async def snapshot_async(self, app_snapshot: bytes | Callable[[], bytes] = b"") -> int:
        """Like snapshot(), but off the event loop: the state at last_seq (at the call) is written
        by another process, then published. Submissions continue meanwhile.

        With a `compactor` command (ledger.compact), that process rebuilds the state from the disk:
        the newest snapshot and the log up to that seq, once it is durable. It shares no memory with
        this one, which is why it is preferred; `app_snapshot` is not used (the compactor rebuilds
        the application's state from the log as well). A compactor that fails or outlives
        COMPACTOR_TIMEOUT_S raises SnapshotChildError: no snapshot, the log is kept; try later.

        Otherwise the state is captured at the call by a fork: a forked child (copy-on-write: the parent
        goes on changing its own pages) serializes the ledger and `app_snapshot` (bytes, or a
        function returning them, run in the child) and writes the file under its temporary name;
        the parent waits for the log to be durable up to that seq and for the child, then puts the
        file in place. Submissions continue. Serializing on the loop held it ~0.5 s per 100k
        operations and left the serialized buffer in the parent's heap (docs/operations.md).
        Where fork is not available (or FORK_SNAPSHOTS is off) the serialization runs on the loop
        and only the file write in a worker thread.
        """
        if self._snapshot_running:
            raise RuntimeError("a snapshot is already being written")
        seq = self._wal.last_seq
        if self.compactor is not None:
            self._snapshot_running = True
            try:
                return await self._compact(seq)
            finally:
                self._snapshot_running = False
        if self.FORK_SNAPSHOTS and hasattr(os, "fork"):
            pid = self._fork_snapshot_writer(seq, app_snapshot)
            self._snapshot_running = True
            try:
                await _child_succeeded(pid, seq)
                if seq > 0:  # WalUnwritableError while the log cannot be written: try again later
                    await self._wal.wait_durable(seq, unwritable_raises=True)
                await trio.to_thread.run_sync(self._publish_snapshot, seq)
            finally:
                self._snapshot_running = False
            return seq
        app = app_snapshot() if callable(app_snapshot) else app_snapshot
        image = _SnapshotImage(self.ledger.to_snapshot(), app)
        self._snapshot_running = True
        try:
            payload = _snapshot_encoder.encode(image)
            if seq > 0:  # WalUnwritableError while the log cannot be written: try again later
                await self._wal.wait_durable(seq, unwritable_raises=True)
            await trio.to_thread.run_sync(self._store_snapshot, seq, payload)
        finally:
            self._snapshot_running = False
        return seq

    async def _compact(self, seq: int) -> int:
        if seq > 0:  # WalUnwritableError while the log cannot be written: try again later
            await self._wal.wait_durable(seq, unwritable_raises=True)
        started = time.perf_counter()
        if self._follower is not None:
            seq, said = await self._compact_following(seq)
        else:
            said = await self._compact_once(seq)
        await trio.to_thread.run_sync(self._publish_snapshot, seq)
        log.info("snapshot by replay, %.2f s: %s", time.perf_counter() - started, said[:COMPACTOR_SUMMARY_CHARS])
        return seq

    async def _compact_once(self, seq: int) -> str:
        """A compactor for this one snapshot: the newest snapshot and the log after it, read from the disk."""
        from ledger.compact import PARENT_ENV, LedgerBounds  # ledger.compact imports this module

        bounds = msgspec.json.encode(LedgerBounds.of(self.ledger)).decode()
        command = [*self.compactor, str(self.directory), str(seq), bounds]
        environment = {**os.environ, PARENT_ENV: str(os.getpid())}
        with trio.move_on_after(COMPACTOR_TIMEOUT_S) as deadline:
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False,
                                          env=environment)
        if deadline.cancelled_caught:
            raise SnapshotChildError(f"the compactor for seq {seq} ran past {COMPACTOR_TIMEOUT_S:.0f} s: killed")
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip().splitlines()[-COMPACTOR_LINES_KEPT:]
            raise SnapshotChildError(f"the compactor for seq {seq} failed (exit {done.returncode}): "
                                     + (" | ".join(said) or "no output"))
        return done.stdout.decode(errors="replace").strip()

    @property
    def compactor_follows(self) -> bool:
        """A compactor is following the log (start_compactor), and will write the next snapshot."""
        return self._follower is not None

    async def start_compactor(self) -> None:
        """Start the compactor that stays (ledger.compact, FOLLOW): it loads the newest snapshot
        once, then reads the log as it is written, so a snapshot costs it only the image's write.
        It holds a copy of the ledger for as long as it runs. Stop it with `stop_compactor` (the
        task that starts it, in a `finally`); it also dies with this process."""
        from ledger.compact import FOLLOW, PARENT_ENV, LedgerBounds  # ledger.compact imports this module

        assert self.compactor is not None and self._follower is None
        bounds = msgspec.json.encode(LedgerBounds.of(self.ledger)).decode()
        self._follower_said = b""
        self._follower = await trio.lowlevel.open_process(
            [*self.compactor, str(self.directory), FOLLOW, bounds], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**os.environ, PARENT_ENV: str(os.getpid())})

    async def stop_compactor(self) -> str:
        """Close the following compactor's pipe and wait for it to exit (kill it past COMPACTOR_STOP_S);
        return the last lines of its error output. Safe to call when none runs, and from a cancelled scope."""
        process, self._follower = self._follower, None
        if process is None:
            return ""
        with trio.CancelScope(shield=True):
            await stop_child(process, COMPACTOR_STOP_S)
            said = b""
            with trio.move_on_after(COMPACTOR_STOP_S), contextlib.suppress(trio.BrokenResourceError,
                                                                        trio.ClosedResourceError):
                while len(said) < COMPACTOR_LINE_BYTES_MAX * 4:  # bounded: it exited, so the pipe ends
                    chunk = await process.stderr.receive_some(COMPACTOR_LINE_BYTES_MAX)
                    if not chunk:
                        break
                    said += chunk
            for stream in (process.stdout, process.stderr):
                await stream.aclose()
        return " | ".join(said.decode(errors="replace").strip().splitlines()[-COMPACTOR_LINES_KEPT:])

    async def _compact_following(self, seq: int) -> tuple[int, str]:
        """Ask the following compactor for the image at `seq` (durable) or just past it; once that
        seq is durable too, the image may be published. On any failure it is stopped (the caller
        may start another) and SnapshotChildError raised."""
        process = self._follower
        assert process is not None
        line: bytes | None = None
        with trio.move_on_after(COMPACTOR_TIMEOUT_S):
            try:
                await process.stdin.send_all(b"%d\n" % seq)
                line = await self._follower_line(process)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                line = None
        if line is None:
            said = await self.stop_compactor()
            raise SnapshotChildError(f"the compactor following the log gave no image for seq {seq}: "
                                     + (said or "no output (ran past its time, or exited)"))
        head, _, summary_text = line.decode(errors="replace").partition(" ")
        if not head.isdigit() or not seq <= int(head) <= self._wal.last_seq:
            await self.stop_compactor()
            raise SnapshotChildError(f"the compactor following the log answered {line[:80]!r} for seq {seq}")
        done = int(head)
        if done > seq:  # it had read records past `seq`: durable before the image holding them is published
            await self._wal.wait_durable(done, unwritable_raises=True)
        return done, summary_text

    async def _follower_line(self, process: trio.Process) -> bytes | None:
        """The next line the following compactor writes; None when its output ends first."""
        # Bounded: each pass reads bytes, or ends; the line is bounded by COMPACTOR_LINE_BYTES_MAX.
        while b"\n" not in self._follower_said:
            if len(self._follower_said) > COMPACTOR_LINE_BYTES_MAX:
                return None
            chunk = await process.stdout.receive_some(COMPACTOR_LINE_BYTES_MAX)
            if not chunk:
                return None
            self._follower_said += chunk
        line, self._follower_said = self._follower_said.split(b"\n", 1)
        return line

    def _fork_snapshot_writer(self, seq: int, app_snapshot: bytes | Callable[[], bytes]) -> int:
        pid = os.fork()
        if pid:
            return pid
        # The child: nothing but serialize, write, exit. No logging, no locks other threads may
        # have held at the fork, no atexit handlers; the parent's sockets are closed at once so a
        # connection the parent closes is not kept open by this copy.
        code = 1
        try:
            os.closerange(3, _fd_limit())
            app = app_snapshot() if callable(app_snapshot) else app_snapshot
            payload = encode_snapshot(self.ledger, app)
            # Not fsync'd here: the parent does it (_publish_snapshot). Until this child exits, every
            # page the parent writes is copied first (copy-on-write); the fsync, seconds with the
            # disk busy, would only keep it alive longer.
            write_snapshot_temporary(self.directory, seq, payload, sync=False)
            code = 0
        except BaseException:  # noqa: BLE001 - the exit code tells the parent
            code = 1
        finally:
            os._exit(code)

    def _publish_snapshot(self, seq: int) -> None:
        assert seq <= self._wal.durable_seq
        sync_snapshot_temporary(self.directory, seq)  # the child wrote it without an fsync
        publish_snapshot(self.directory, seq)
        self._after_snapshot(seq)

    def _store_snapshot(self, seq: int, payload: bytes) -> None:
        assert seq <= self._wal.durable_seq
        write_snapshot(self.directory, seq, payload)
        self._after_snapshot(seq)

    def _after_snapshot(self, seq: int) -> None:
        self.snapshot_seq = seq
        # Keep the log from the OLDEST kept snapshot on, not just this one: should this newest
        # snapshot be damaged, recovery falls back to the previous one and needs the records
        # after it (ledger.snapshot keeps SNAPSHOTS_KEPT of them).
        oldest_kept = list_snapshots(self.directory)[0][0]
        assert oldest_kept <= seq
        self._wal.truncate_before(oldest_kept + SEQ_FIRST)

    def close(self) -> None:
        """Flush what is buffered (unless failed) and close the log."""
        self._wal.close()
