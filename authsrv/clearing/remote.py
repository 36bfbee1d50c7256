"""Clearing's planning in a process of its own, beside the server (`[clearing] planner = "process"`).

In a worker thread, planning a chunk and writing its rows holds the GIL for ~0.1 ms per record
while the event loop waits for it. This process does that work with its own interpreter: it parses
the file, reads and writes clearing's rows in the store (SQLite, its own connection), looks the
cards up (its own card index and PAN vault) and plans each chunk against the reads the loop took,
exactly as the thread did (engine.ClearingRun.durable_then_plan). The server keeps everything that
touches the ledger and the journal: gathering the reads, checking them again, submitting, and
counting what the ledger did.

One exchange per chunk, over a pipe, each message a msgpack frame behind its length:

    server -> planner   Open(file, name)           planner -> server   Opened()
    server -> planner   Step(pending, gathered)    planner -> server   Stepped(rows, delta, ...)

`pending` is the previous chunk, now durable, for the planner to mark applied (with its partner
events); `gathered` the next chunk's reads. `delta` is what the planner counted meanwhile, added to
the server's summary. The crash semantics are the thread's: the planner commits the same
transactions, so a run cut anywhere resumes the same way.

A cluster primary keeps the thread: its store's transactions are records of the shard's stream
(store.replica), which only the server's own connection writes.

The planner runs at nice +10, started at the first file applied online and kept until the server
stops; it exits when the server does (ledger.compact.watch_parent) or closes the pipe. It is not the
default: on a 2-core VM it moved 0.06-0.15 of a core out of the server in clearing rounds and did not
shorten the authorization tail, which there comes from the log's writer thread waiting for a CPU
and the GIL (docs/benchmarks.md, section 6).
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import msgspec
import trio

from authsrv.clearing.cleared import ClearedTransaction, ForcedTransaction
from authsrv.clearing.engine import ClearingRun, Planned, PlannerError, RrnReads
from authsrv.clearing.engine import Gathered as RunGathered
from authsrv.clearing.store import RecordRow
from authsrv.clearing.summary import ClearingSummary
from ledger.compact import NICE_INCREMENT
from ledger.compact import PARENT_ENV as PARENT_PID_ENV
from ledger.durable import stop_child

log = logging.getLogger("authsrv.clearing")

FRAME = struct.Struct("<I")
FRAME_BYTES_MAX = 256 * 1024 * 1024  # a clearing file (the REST body bound is far below) and its summary
CALL_TIMEOUT_S = 120.0  # one exchange; past it the planner is stopped and the file fails (re-run resumes)
STOP_S = 5.0  # a planner told to stop (its pipe closed) exits within this, or is killed


# -- the messages ---------------------------------------------------------------------------------


class Open(msgspec.Struct, tag=True, array_like=True):
    data: bytes
    name: str
    chunk_records_max: int


class Pending(msgspec.Struct, array_like=True):
    seq: int
    applied: list[str]
    cleared: dict[str, ClearedTransaction]
    forced: dict[str, ForcedTransaction]


class Gathered(msgspec.Struct, array_like=True):
    start: int
    count: int  # lines from `start`
    reads: dict[str, RrnReads]
    ts_ns: int


class Step(msgspec.Struct, tag=True, array_like=True):
    pending: Pending | None
    gathered: Gathered | None


class Opened(msgspec.Struct, tag=True, array_like=True):
    pass


class Stepped(msgspec.Struct, tag=True, array_like=True):
    delta: ClearingSummary  # what the planner counted in this step
    rows: list[RecordRow] | None  # the chunk's new rows, in file order; None: resumed rows (ClearingRun.step)


class Failed(msgspec.Struct, tag=True, array_like=True):
    error: str


# -- the server's side ----------------------------------------------------------------------------


class ClearingPlanner:
    """The server's handle on the planner process: started at the first call, one call at a time
    (clearing files are applied one at a time), stopped by `aclose` when the server stops. Its
    error output is the server's."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = Path(data_dir)
        self._process: trio.Process | None = None
        self._buffer = bytearray()
        self._lock = trio.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Opened | Stepped | Failed)

    async def open(self, data: bytes, name: str, chunk_records_max: int) -> None:
        """The planner parses the file too (the server did, for the lines it gathers and applies)."""
        message = Open(data, name, chunk_records_max)
        try:
            reply = await self._call(message)
        except PlannerError as error:  # e.g. it died since the last file: once more, in a new one
            log.warning("%s; starting another", error)
            reply = await self._call(message)
        assert isinstance(reply, Opened)

    async def durable_then_plan(self, run: ClearingRun, gathered: RunGathered | None) -> Planned | None:
        """ClearingRun.durable_then_plan, done by the planner: it marks the last chunk applied (the
        server's pending chunk is handed over), then plans `gathered` and writes its rows, in one
        store transaction. What it counted is added to `run`'s summary."""
        pending = run.hand_over_pending()
        wire = None
        if pending is not None:
            events = pending.events.items()
            wire = Pending(pending.seq, pending.applied,
                           {key: event for key, event in events if isinstance(event, ClearedTransaction)},
                           {key: event for key, event in events if isinstance(event, ForcedTransaction)})
        chunk = None if gathered is None else Gathered(gathered.start, len(gathered.lines), gathered.reads,
                                                       gathered.ts_ns)
        reply = await self._call(Step(wire, chunk))
        assert isinstance(reply, Stepped)
        run.add_counts(reply.delta)
        if gathered is None or reply.rows is None:
            return None
        return run.planned_from_rows(gathered, reply.rows)

    async def _call(self, message: Open | Step) -> Opened | Stepped:
        async with self._lock:
            if self._process is None:
                await self._start()
            process = self._process
            assert process is not None
            payload = self._encoder.encode(message)
            reply = None
            try:
                with trio.move_on_after(CALL_TIMEOUT_S):
                    await process.stdin.send_all(FRAME.pack(len(payload)) + payload)
                    reply = await self._receive(process)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                reply = None
            finally:
                if reply is None:  # cancelled, timed out or gone: a reply may still come, out of step
                    await self._stop()
            if reply is None:
                raise PlannerError("the clearing planner gave no answer (it exited, or ran past "
                                   f"{CALL_TIMEOUT_S:.0f} s): stopped; the next file starts another")
            if isinstance(reply, Failed):
                raise PlannerError(f"the clearing planner failed: {reply.error}")
            return reply

    async def _receive(self, process: trio.Process) -> Opened | Stepped | Failed | None:
        # Bounded: each pass reads bytes or ends; a frame is bounded by FRAME_BYTES_MAX.
        while True:
            if len(self._buffer) >= FRAME.size:
                (length,) = FRAME.unpack_from(self._buffer)
                if length > FRAME_BYTES_MAX:
                    return None
                if len(self._buffer) >= FRAME.size + length:
                    payload = bytes(self._buffer[FRAME.size:FRAME.size + length])
                    del self._buffer[:FRAME.size + length]
                    return self._decoder.decode(payload)
            chunk = await process.stdout.receive_some(1024 * 1024)
            if not chunk:
                return None
            self._buffer += chunk

    async def _start(self) -> None:
        self._buffer.clear()
        self._process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "authsrv.clearing.remote", str(self._data_dir)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env={**os.environ, PARENT_PID_ENV: str(os.getpid())})
        log.info("clearing planner started (pid %d)", self._process.pid)

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with trio.CancelScope(shield=True):
            await stop_child(process, STOP_S)
            await process.stdout.aclose()

    async def aclose(self) -> None:
        """Stop the planner (the server stops): it exits once its pipe closes."""
        async with self._lock:
            await self._stop()


# -- the planner's side ---------------------------------------------------------------------------


class _RefreshingIndex:
    """The planner's card index: loaded once, and a card it has not seen is looked up in the store
    (one the server issued since). What clearing reads of a card (its accounts, currency, partner)
    never changes once it is issued; partners and system accounts are read again for each file."""

    def __init__(self, store) -> None:
        from authsrv.store.index import load_index

        self._store = store
        self._index = load_index(store)

    def refresh(self) -> None:
        for partner in self._store.partner_states():
            self._index.put_partner(partner)
        for currency, account_id in self._store.system_accounts("settlement").items():
            self._index.put_settlement_account(currency, account_id)

    def card_by_pan_index(self, pan_index: bytes):
        state = self._index.card_by_pan_index(pan_index)
        if state is None:
            row = self._store.card_by_pan_index(pan_index)
            if row is not None:
                with self._store.locked():
                    self._store._refresh_card(row.id)
                state = self._index.card_by_pan_index(pan_index)
        return state

    def partner(self, name: str):
        return self._index.partner(name)

    def settlement_account(self, currency: str) -> int | None:
        return self._index.settlement_account(currency)


def serve(data_dir: Path, stdin_fd: int, stdout_fd: int) -> int:
    """The planner's loop: one reply per message, until the server closes the pipe."""
    from authsrv import cardsec
    from authsrv.clearing.engine import ClearingDeps
    from authsrv.clearing.records import parse_clearing_file
    from authsrv.store.db import Store

    store = Store.open(data_dir)
    index = _RefreshingIndex(store)
    vault = cardsec.PanVault(cardsec.CardKeys.load(data_dir / "keys"))
    deps = ClearingDeps(ledger=None, journal=None, index=index, vault=vault, store=store)
    decoder = msgspec.msgpack.Decoder(Open | Step)
    encoder = msgspec.msgpack.Encoder()
    run: ClearingRun | None = None
    with os.fdopen(stdin_fd, "rb", buffering=0) as source, os.fdopen(stdout_fd, "wb") as sink:
        while True:  # bounded by the server: it ends when the pipe closes
            head = _read_exactly(source, FRAME.size)
            if head is None:
                return 0
            (length,) = FRAME.unpack(head)
            payload = _read_exactly(source, length) if length <= FRAME_BYTES_MAX else None
            if payload is None:
                return 1
            message = decoder.decode(payload)
            try:
                if isinstance(message, Open):
                    index.refresh()
                    run = ClearingRun(deps, parse_clearing_file(message.data), message.name,
                                      chunk_records_max=message.chunk_records_max)
                    reply: Opened | Stepped | Failed = Opened()
                else:
                    assert run is not None, "Step before Open"
                    run.summary = delta = ClearingSummary(file_sha256=run.summary.file_sha256, name=run.summary.name)
                    pending = message.pending
                    if pending is not None:
                        run.take_over_pending(pending.seq, pending.applied, {**pending.cleared, **pending.forced})
                    gathered = None
                    if message.gathered is not None:
                        wire = message.gathered
                        gathered = RunGathered(wire.start, run.lines_at(wire.start, wire.count), wire.reads,
                                               wire.ts_ns, ())
                        run.move_to(wire.start)
                    planned = run.durable_then_plan(gathered)
                    reply = Stepped(delta, None if planned is None else planned.rows)
            except Exception as error:  # told to the server, which stops this file's run
                log.exception("clearing planner")
                reply = Failed(f"{type(error).__name__}: {error}")
            out = encoder.encode(reply)
            sink.write(FRAME.pack(len(out)) + out)
            sink.flush()


def _read_exactly(source, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:  # bounded: each pass reads bytes or ends
        chunk = source.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m authsrv.clearing.remote DATA_DIR (started by `authsrv serve`)", file=sys.stderr)
        return 2
    from ledger.compact import watch_parent

    # The frames own the real stdout; anything printed goes to stderr.
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    # Below the server on the CPU, and dies with it. Not in the idle I/O class, as a compactor is:
    # its store commits would wait behind every log write (up to the scheduler's aging, seconds).
    os.nice(NICE_INCREMENT)
    watch_parent()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return serve(Path(argv[0]), 0, stdout_fd)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
