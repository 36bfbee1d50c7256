"""The ISO 8583 TCP listener on trio.

Per connection: a reader that decides the requests of each receive synchronously, one after the
other (the hot path never awaits anything but the commit), and hands their answers to the writer
as one list; and a writer that waits for the write-ahead log's group commit once for a whole group
of answers, then sends them with one `send_all`. Per-message trio operations cost more here than
most hot-path steps (~9 us a checkpoint, ~15 us a cancel scope with a deadline, ~16 us a channel
hand-off on a 2-core VM), so they happen per receive and per group, not per message. At most
`in_flight_per_connection_max` answers wait to be sent: past that the reader stops reading until
the writer catches up, so a sender that floods us is slowed by TCP instead of growing our memory.

A request whose decision needs the partner's external balance comes back from the switch deferred
(`Outgoing.pending`): the reader starts its completion in the connection's nursery and goes on
reading, so one slow partner call does not hold up the requests behind it. The completion hands
its answer to the writer like any other (it counts as in flight until sent).
"""

from __future__ import annotations

import logging
import time

import trio

from authsrv.iso.framing import LENGTH_PREFIX_SIZE, RECEIVE_SIZE, FrameSplitter
from authsrv.iso.transport import StreamSocket
from ledger.durable import LedgerFailedError
from ledger.jetstream import LogFencedError
from ledger.wal import WalFatalError

log = logging.getLogger("authsrv.iso")

RESPONSE_GROUP_MAX = 256  # lists of answers written with one send_all
FRAMES_PER_RECEIVE_MAX = RECEIVE_SIZE // (LENGTH_PREFIX_SIZE + 1)
CLOSE_TIMEOUT_S = 2.0  # closing the partners' HTTP pools at shutdown


class InFlight:
    """One connection's answers decided and not yet sent, and the reader's wait for room."""

    __slots__ = ("count", "_room")

    def __init__(self) -> None:
        self.count = 0
        self._room: trio.Event | None = None

    async def wait_for_room(self, count_max: int) -> None:
        while self.count >= count_max:  # bounded: each pass waits for the writer to send a group
            self._room = trio.Event()
            await self._room.wait()

    def sent(self, count: int) -> None:
        self.count -= count
        assert self.count >= 0
        if self._room is not None:
            self._room.set()
            self._room = None


class IsoServer:
    def __init__(self, switch, ledger, metrics, *, in_flight_per_connection_max: int, idle_timeout_s: float,
                 frame_size_max: int, connections_max: int) -> None:
        assert in_flight_per_connection_max > 0 and connections_max > 0
        self._switch = switch
        self._ledger = ledger
        self._metrics = metrics
        self._in_flight_max = in_flight_per_connection_max
        self._idle_timeout_s = idle_timeout_s
        self._frame_size_max = frame_size_max
        self._connections_max = connections_max
        self._readers: set[trio.CancelScope] = set()  # each connection's wait for its next frame
        self._stopping = False
        self._accepting = trio.CancelScope()
        self._connections = 0
        self._idle = trio.Event()
        self._idle.set()

    async def run(self, listeners, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); then let open connections drain (bounded by the caller)."""
        try:
            async with trio.open_nursery() as handlers:
                with self._accepting:
                    task_status.started()
                    await trio.serve_listeners(self._connection, listeners, handler_nursery=handlers)
        finally:
            aclose = getattr(self._switch, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                    await aclose()

    def stop(self) -> None:
        """Stop accepting and stop reading new requests; answers already decided are still sent."""
        self._accepting.cancel()
        self._stopping = True
        for scope in list(self._readers):
            scope.cancel()

    async def drained(self) -> None:
        await self._idle.wait()

    async def _connection(self, stream: trio.SocketStream) -> None:
        # serve_listeners lets a handler error crash the server: contain one bad peer (or one
        # connection's bug) here.
        if self._connections >= self._connections_max:
            log.warning("refusing a connection: %d open", self._connections)
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        self._idle = trio.Event() if self._connections == 1 else self._idle
        self._metrics.connections.inc()
        in_flight = InFlight()
        try:
            # Items are lists of answers; the in-flight bound keeps the channel under this.
            send, receive = trio.open_memory_channel(self._in_flight_max + FRAMES_PER_RECEIVE_MAX)
            async with trio.open_nursery() as nursery:
                sock = StreamSocket(stream)
                nursery.start_soon(self._writer, sock, receive, in_flight, nursery)
                async with send:
                    await self._reader(sock, send, in_flight, nursery)
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            # The peer went away (reset, closed mid-answer): its own problem, not the server's.
            log.info("ISO 8583 connection lost: %s", group.exceptions[0])
        except* (LedgerFailedError, WalFatalError, AssertionError):
            raise  # the ledger cannot go on, or an invariant broke: stop the process
        except* Exception as group:
            # A bug in this connection's bookkeeping: close it (its peer times out and reverses,
            # as after a drop) instead of taking every other connection down with it.
            self._metrics.internal_errors.inc()
            log.error("closing ISO 8583 connection after an internal error", exc_info=group)
        finally:
            self._metrics.in_flight.dec(in_flight.count)  # decided but never sent: the peer left
            self._metrics.connections.dec()
            await trio.aclose_forcefully(stream)
            self._connections -= 1
            if self._connections == 0:
                self._idle.set()

    async def _reader(self, sock: StreamSocket, send: trio.MemorySendChannel, in_flight: InFlight,
                      nursery: trio.Nursery) -> None:
        """Read and decide frames until EOF, idle timeout or stop().

        Only the wait for bytes (or for room) can be cancelled: once bytes are read they are decided,
        and once a frame is decided (money may have moved) its answer always reaches the writer's
        channel. A receive the kernel can satisfy at once costs one system call and no pass through
        the scheduler (StreamSocket); the reader yields when it waits, or after two receives in a row.
        """
        handle, gauge, in_flight_max = self._switch.handle, self._metrics.in_flight, self._in_flight_max
        splitter = FrameSplitter(self._frame_size_max)
        waited = True  # since the last pass through the scheduler
        while not self._stopping:
            if in_flight.count >= in_flight_max:
                await in_flight.wait_for_room(in_flight_max)
                waited = True
            data = sock.receive_nowait(RECEIVE_SIZE)
            if data is None:
                with trio.CancelScope(deadline=trio.current_time() + self._idle_timeout_s) as waiting:
                    self._readers.add(waiting)
                    try:
                        await sock.wait_readable()
                    finally:
                        self._readers.discard(waiting)
                if waiting.cancelled_caught:
                    log.info("closing ISO 8583 connection: idle or shutting down")
                    return
                waited = True
                continue
            if not waited:  # bytes were ready twice in a row: let the writer and the other connections run
                await trio.lowlevel.cancel_shielded_checkpoint()  # a yield that cannot drop what was read
            waited = False
            if not data:
                if splitter.pending:
                    self._framing_lost(f"end of stream inside a frame ({splitter.pending} bytes pending)")
                return
            payloads = splitter.feed(data)
            if payloads:
                received_ns = time.perf_counter_ns()
                answers = []
                for payload in payloads:
                    outgoing = handle(payload, received_ns)
                    if outgoing is None:
                        continue
                    if outgoing.pending is None:
                        answers.append(outgoing)
                    else:
                        in_flight.count += 1
                        gauge.inc()
                        nursery.start_soon(self._complete, outgoing, send.clone())
                if answers:
                    in_flight.count += len(answers)
                    gauge.inc(len(answers))
                    send.send_nowait(answers)  # never full: in_flight_max + one receive's frames
            if splitter.error is not None:
                self._framing_lost(str(splitter.error))
                return

    def _framing_lost(self, reason: str) -> None:
        self._metrics.framing_errors.inc()
        log.warning("closing ISO 8583 connection: framing lost: %s", reason)

    async def _complete(self, outgoing, send: trio.MemorySendChannel) -> None:
        """Finish a deferred decision (the partner call inside is shielded and bounded by the
        budget, so a decided request always settles) and queue its answer for the writer."""
        async with send:
            final = await self._switch.complete(outgoing)
            try:
                await send.send([final])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.info("ISO 8583 connection gone before a deferred answer was sent")

    async def _writer(self, sock: StreamSocket, receive: trio.MemoryReceiveChannel, in_flight: InFlight,
                      nursery: trio.Nursery) -> None:
        ledger = self._ledger
        sending = trio.Lock()  # shared with _send_when_durable's tasks; otherwise never contended
        async with receive:
            async for first in receive:
                group = first
                for _ in range(RESPONSE_GROUP_MAX - 1):
                    try:
                        group.extend(receive.receive_nowait())  # the lists are the writer's once sent
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                seq = max(outgoing.seq for outgoing in group)
                durable = ledger.durable_seq  # read once: a writer thread may move it on at any moment
                if seq > durable:
                    group = await self._commit(group, seq, durable)
                    durable = ledger.durable_seq
                    late = [outgoing for outgoing in group if outgoing.seq > durable]
                    if late:  # past the budget and not compensable: sent once durable, the rest now
                        nursery.start_soon(self._send_when_durable, sock, late, in_flight, sending)
                        group = [outgoing for outgoing in group if outgoing.seq <= durable]
                        if not group:
                            continue
                if sending.locked():
                    async with sending:
                        await sock.send_all(b"".join(outgoing.data for outgoing in group))
                else:
                    await sock.send_all(b"".join(outgoing.data for outgoing in group))
                self._sent(group, in_flight)

    def _sent(self, group: list, in_flight: InFlight) -> None:
        metrics = self._metrics
        now = time.perf_counter_ns()
        for outgoing in group:
            metrics.answered(outgoing.mti, outgoing.code, (now - outgoing.received_ns) / 1e9)
        metrics.in_flight.dec(len(group))
        in_flight.sent(len(group))

    async def _send_when_durable(self, sock: StreamSocket, late: list, in_flight: InFlight,
                                 sending: trio.Lock) -> None:
        """Answers still waiting for the log past their budget that a void cannot compensate (a
        posting, an advice, a reversal, a duplicate of one still committing; or a hold when the
        log's buffer has no room for its void), sent once durable while the connection's other
        answers go on: a client matches answers on fields 11 and 37, not on their order. The log may
        be slow, or refusing for now (docs/operations.md, "Full disk and I/O errors")."""
        try:
            await self._ledger.wait_durable(max(outgoing.seq for outgoing in late))
        except LogFencedError:  # a deposed cluster primary: nothing more commits
            late = [self._switch.refuse(o) if o.seq > self._ledger.durable_seq else o for o in late]
        async with sending:
            await sock.send_all(b"".join(outgoing.data for outgoing in late))
        self._sent(late, in_flight)

    async def _commit(self, group: list, seq: int, durable: int) -> list:
        """Wait, up to the earliest budget, until every approval in the group is on disk; approvals
        that missed it are compensated and answered with the stand-in decision instead. What cannot
        be compensated is returned as it is, its seq above durable_seq (the writer sends it later)."""
        ledger = self._ledger
        deadline_ns = min(outgoing.deadline_ns for outgoing in group if outgoing.seq > durable)
        with trio.move_on_after(max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9)):
            try:
                await ledger.wait_durable(seq)
                return group
            except LogFencedError:  # a deposed cluster primary: nothing more commits, nothing to release
                return [self._switch.refuse(o) if o.seq > ledger.durable_seq else o for o in group]
        return [self._switch.stand_in(o) if o.ctx is not None and o.seq > ledger.durable_seq else o for o in group]
