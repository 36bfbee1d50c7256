"""The ISO 8583 TCP listener on trio.

One reader and one writer for every connection. The sockets sit in one level-triggered epoll set,
and the reader waits on that set's descriptor through trio (`wait_readable`). Each pass reads once
from every connection that has bytes, decides the requests of each receive synchronously, one after
the other (the hot path never awaits anything but the commit), and hands their answers to the
writer. The writer takes every connection's answers at once, waits for the write-ahead log's group
commit once for all of them, and writes each connection's answers with one system call. Per-message
trio operations cost more here than most hot-path steps (~9 us a checkpoint, ~15 us a cancel scope
with a deadline, ~16 us a channel hand-off on a 2-core VM), so they happen per pass, not per
message or per connection: a reader and a writer per connection paid a wake-up, an epoll re-arm, a
channel hand-off and a cancel scope for every receive and every group.

At most `in_flight_per_connection_max` answers wait to be sent per connection: past that its socket
leaves the epoll set until its answers go out, so a sender that floods us is slowed by TCP instead
of growing our memory. A send the kernel does not take whole (a peer that reads slowly) leaves the
rest, and that connection's later answers, to a task of the connection's own, in order. Each
connection's own task otherwise only waits: for its end (end of stream, framing lost, an error,
stop()) or its idle deadline, then for its answers to go out.

A request whose decision needs the partner's external balance comes back from the switch deferred
(`Outgoing.pending`): the reader starts its completion in the connection's nursery and goes on
reading, so one slow partner call does not hold up the requests behind it. The completion hands
its answer to the writer like any other (it counts as in flight until sent).
"""

from __future__ import annotations

import logging
import select
import time

import trio

from authsrv.iso.framing import RECEIVE_SIZE, FrameSplitter
from authsrv.iso.transport import StreamSocket
from ledger.durable import LedgerFailedError
from ledger.jetstream import LogFencedError
from ledger.wal import WalFatalError

log = logging.getLogger("authsrv.iso")

CLOSE_TIMEOUT_S = 2.0  # closing the partners' HTTP pools at shutdown
# A reader's pass yields between connections once it has held the loop this long. Passes that long
# follow a stall (frames waiting on every connection): 4-20 ms at 1,200/s on machine C.
PASS_SLICE_S = 0.002


class Connection:
    """One connection as the reader and the writer see it: its socket, its partial frame, its
    answers decided and not yet sent, and how it ended (`done`, with `error` if it failed)."""

    __slots__ = ("sock", "splitter", "nursery", "count", "paused", "last_read", "done", "error",
                 "answers", "queued", "backlog", "closed", "all_sent")

    def __init__(self, sock: StreamSocket, splitter: FrameSplitter, nursery: trio.Nursery, now: float) -> None:
        self.sock = sock
        self.splitter = splitter
        self.nursery = nursery
        self.count = 0  # answers decided and not yet sent (bounded by in_flight_per_connection_max)
        self.paused = False  # out of the epoll set: too many answers in flight
        self.last_read = now  # trio time of the last receive (the idle deadline counts from it)
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.answers: list = []  # handed to the writer, not taken yet
        self.queued = False  # in the writer's ready list
        self.backlog: list | None = None  # (bytes, answers) behind a send the kernel did not take whole
        self.closed = False  # the socket is closing: nothing more is written to this fd
        self.all_sent: trio.Event | None = None  # set when `count` falls to 0 (the end's drain waits)


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
        self._epoll: select.epoll | None = None  # the reader's set, while run() runs
        self._reading: dict[int, Connection] = {}  # by fd: every connection the reader serves
        self._ready: list[Connection] = []  # connections with answers for the writer (each once)
        self._writer_lot = trio.lowlevel.ParkingLot()  # the writer, while nothing is ready
        self._stopping = False
        self._accepting = trio.CancelScope()
        self._reader_scope = trio.CancelScope()
        self._connections = 0
        self._idle = trio.Event()
        self._idle.set()

    async def run(self, listeners, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); then let open connections drain (bounded by the caller)."""
        self._epoll = select.epoll()
        try:
            async with trio.open_nursery() as services:
                services.start_soon(self._write_all)
                try:
                    async with trio.open_nursery() as handlers:
                        handlers.start_soon(self._read_all)
                        with self._accepting:
                            task_status.started()
                            await trio.serve_listeners(self._connection, listeners, handler_nursery=handlers)
                finally:  # every connection has drained (or the server is going down): no more answers
                    services.cancel_scope.cancel()
        finally:
            self._epoll.close()
            aclose = getattr(self._switch, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                    await aclose()

    def stop(self) -> None:
        """Stop accepting and stop reading new requests; answers already decided are still sent."""
        self._accepting.cancel()
        self._stopping = True
        self._reader_scope.cancel()
        for conn in list(self._reading.values()):
            log.info("closing ISO 8583 connection: shutting down")
            self._end(conn)

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
        conn = None
        try:
            async with trio.open_nursery() as nursery:  # the connection's deferred answers and slow sends
                conn = Connection(StreamSocket(stream), FrameSplitter(self._frame_size_max), nursery,
                                  trio.current_time())
                await self._serve(conn)
                await self._all_sent(conn)
                if conn.error is not None:
                    raise conn.error
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
            if conn is not None:
                self._end(conn)  # out of the reader's set before the socket closes
                conn.closed = True  # and out of the writer's reach: the fd number may be reused
                self._metrics.in_flight.dec(conn.count)  # decided but never sent: the peer left
            self._metrics.connections.dec()
            await trio.aclose_forcefully(stream)
            self._connections -= 1
            if self._connections == 0:
                self._idle.set()

    async def _serve(self, conn: Connection) -> None:
        """Hand the connection to the reader and wait until it ends, or for its idle deadline. A
        connection whose answers are not being taken (out of the set, `paused`) is not idle."""
        if self._stopping:
            return
        self._reading[conn.sock.fd] = conn
        self._epoll.register(conn.sock.fd, select.EPOLLIN)
        while not conn.done.is_set():  # bounded: one pass per idle period
            now = trio.current_time()
            if conn.paused:
                conn.last_read = now
            deadline = conn.last_read + self._idle_timeout_s
            if now >= deadline:
                log.info("closing ISO 8583 connection: idle")
                self._end(conn)
                return
            with trio.move_on_at(deadline):
                await conn.done.wait()

    async def _all_sent(self, conn: Connection) -> None:
        """Every answer decided for this connection sent (or the connection failed)."""
        while conn.count and conn.error is None:  # bounded: woken when the count falls to 0, or on error
            conn.all_sent = trio.Event()
            await conn.all_sent.wait()

    def _end(self, conn: Connection, error: BaseException | None = None) -> None:
        """No more reading from this connection (idempotent); its task sees `done`. With an error,
        nothing more is sent either: its task raises it."""
        if self._reading.get(conn.sock.fd) is conn:
            del self._reading[conn.sock.fd]
            if not conn.paused:
                self._epoll.unregister(conn.sock.fd)
        if error is not None and conn.error is None:
            conn.error = error
            if conn.all_sent is not None:
                conn.all_sent.set()
        conn.done.set()

    # ------------------------------------------------------------------------------ the reader

    async def _read_all(self) -> None:
        """The one reader: each pass reads once from every connection with bytes waiting. Each
        connection's receive and its decisions run synchronously, so nothing is dropped between
        them; the wait on the set's descriptor is the pass's checkpoint, so the writer and other
        tasks run between passes. A pass that has held the loop PASS_SLICE_S (a backlog after a
        stall) also yields between two connections: the log's committer hands off what is decided
        so far, and the answers already durable go out, instead of all of them waiting for the pass."""
        epoll, reading = self._epoll, self._reading
        with self._reader_scope:
            while True:  # until stop() or the server's cancellation
                await trio.lowlevel.wait_readable(epoll.fileno())
                now = trio.current_time()
                started = time.perf_counter()
                for fd, _ in epoll.poll(0):
                    conn = reading.get(fd)
                    if conn is None or conn.paused:  # gone, or paused, while the pass yielded
                        continue
                    self._read(conn, now)
                    if time.perf_counter() - started >= PASS_SLICE_S:
                        await trio.lowlevel.checkpoint()
                        started = time.perf_counter()

    def _read(self, conn: Connection, now: float) -> None:
        """One receive from a ready connection, and the decisions of every frame in it. Once
        bytes are read they are decided, and once a frame is decided (money may have moved) its
        answer always reaches the writer. An error ends this connection only."""
        try:
            data = conn.sock.receive_nowait(RECEIVE_SIZE)
        except trio.BrokenResourceError as error:
            self._end(conn, error)
            return
        if data is None:  # the kernel changed its mind (a spurious wake-up)
            return
        conn.last_read = now
        splitter = conn.splitter
        if not data:
            if splitter.pending:
                self._framing_lost(f"end of stream inside a frame ({splitter.pending} bytes pending)")
            self._end(conn)
            return
        payloads = splitter.feed(data)
        if payloads:
            try:
                self._decide(conn, payloads)
            except Exception as error:  # raised again in the connection's task, which sorts it out
                self._end(conn, error)
                return
        if splitter.error is not None:
            self._framing_lost(str(splitter.error))
            self._end(conn)
        elif conn.count >= self._in_flight_max:
            conn.paused = True
            self._epoll.unregister(conn.sock.fd)

    def _decide(self, conn: Connection, payloads: list) -> None:
        handle = self._switch.handle
        received_ns = time.perf_counter_ns()
        answers = []
        for payload in payloads:
            outgoing = handle(payload, received_ns)
            if outgoing is None:
                continue
            if outgoing.pending is None:
                answers.append(outgoing)
            else:
                conn.count += 1
                self._metrics.in_flight.inc()
                conn.nursery.start_soon(self._complete, conn, outgoing)
        if answers:
            conn.count += len(answers)
            self._metrics.in_flight.inc(len(answers))
            self._hand(conn, answers)

    def _framing_lost(self, reason: str) -> None:
        self._metrics.framing_errors.inc()
        log.warning("closing ISO 8583 connection: framing lost: %s", reason)

    async def _complete(self, conn: Connection, outgoing) -> None:
        """Finish a deferred decision (the partner call inside is shielded and bounded by the
        budget, so a decided request always settles) and hand its answer to the writer."""
        final = await self._switch.complete(outgoing)
        if conn.closed or conn.error is not None:
            log.info("ISO 8583 connection gone before a deferred answer was sent")
            return
        self._hand(conn, [final])

    # ------------------------------------------------------------------------------ the writer

    def _hand(self, conn: Connection, answers: list) -> None:
        """Answers for the writer (counted in `conn.count` already); wakes it if it is parked."""
        conn.answers += answers
        if not conn.queued:
            conn.queued = True
            self._ready.append(conn)
            if self._writer_lot:
                self._writer_lot.unpark()

    async def _write_all(self) -> None:
        """The one writer: takes every ready connection's answers, waits once for the log to hold
        them (up to the earliest budget), and writes each connection's answers with one call."""
        ledger = self._ledger
        while True:  # until run() cancels it, once every connection is gone
            if not self._ready:
                await self._writer_lot.park()
                continue
            ready, self._ready = self._ready, []
            groups = []
            for conn in ready:
                conn.queued = False
                if not conn.closed and conn.error is None:
                    groups.append((conn, conn.answers))
                conn.answers = []
            while groups:  # bounded: each pass sends the groups the log holds, or waits for one more
                durable = ledger.durable_seq  # read once: a writer thread may move it on at any moment
                waiting = []
                for conn, group in groups:
                    if max(outgoing.seq for outgoing in group) <= durable:
                        self._send(conn, group)
                    else:
                        waiting.append((conn, group))
                if not waiting:
                    break
                groups = await self._commit(waiting, durable)

    async def _commit(self, waiting: list, durable: int) -> list:
        """Wait, up to the earliest budget among them, until the first of the waiting groups is on
        disk (commit groups complete in order). If the budget passes first, approvals not on disk
        are compensated and answered with the stand-in decision instead; what cannot be compensated
        is sent once durable by the connection's own task. Returns the groups left to send."""
        ledger = self._ledger
        seq = min(max(outgoing.seq for outgoing in group) for _, group in waiting)
        deadline_ns = min(o.deadline_ns for _, group in waiting for o in group if o.seq > durable)
        with trio.move_on_after(max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9)):
            try:
                await ledger.wait_durable(seq)
                return waiting
            except LogFencedError:  # a deposed cluster primary: nothing more commits, nothing to release
                return [(conn, [self._switch.refuse(o) if o.seq > ledger.durable_seq else o for o in group])
                        for conn, group in waiting]
        durable, left = ledger.durable_seq, []
        for conn, group in waiting:
            group = [self._switch.stand_in(o) if o.ctx is not None and o.seq > durable else o for o in group]
            late = [outgoing for outgoing in group if outgoing.seq > durable]
            if late:  # past the budget and not compensable: sent once durable, the rest now
                conn.nursery.start_soon(self._send_when_durable, conn, late)
                group = [outgoing for outgoing in group if outgoing.seq <= durable]
            if group:
                left.append((conn, group))
        return left

    def _send(self, conn: Connection, group: list) -> None:
        """Write a connection's answers now, if the kernel takes them whole; otherwise the rest and
        every later answer go through the connection's own task, in order (`backlog`)."""
        if conn.closed or conn.error is not None:
            return  # counted as never sent when its task ends
        data = b"".join(outgoing.data for outgoing in group)
        if conn.backlog is not None:
            conn.backlog.append((data, group))
            return
        try:
            sent = conn.sock.send_nowait(data)
        except Exception as error:  # the peer reset, or a bug: this connection only
            self._end(conn, error)
            return
        if sent == len(data):
            self._sent(group, conn)
            return
        conn.backlog = [(memoryview(data)[sent:], group)]
        conn.nursery.start_soon(self._send_backlog, conn)

    async def _send_backlog(self, conn: Connection) -> None:
        """The connection's answers behind a send the kernel did not take whole: through trio, which
        waits for room in the socket's buffer. Errors end the connection (its nursery)."""
        while conn.backlog:  # bounded: it holds only the connection's answers in flight
            data, group = conn.backlog[0]
            await conn.sock.send_all(data)
            del conn.backlog[0]
            self._sent(group, conn)
        conn.backlog = None

    def _sent(self, group: list, conn: Connection) -> None:
        metrics = self._metrics
        now = time.perf_counter_ns()
        for outgoing in group:
            metrics.answered(outgoing.mti, outgoing.code, (now - outgoing.received_ns) / 1e9)
        metrics.in_flight.dec(len(group))
        conn.count -= len(group)
        assert conn.count >= 0
        if conn.paused and conn.count < self._in_flight_max:  # room again: back in the reader's set
            conn.paused = False
            if self._reading.get(conn.sock.fd) is conn:
                self._epoll.register(conn.sock.fd, select.EPOLLIN)
        if not conn.count and conn.all_sent is not None:
            conn.all_sent.set()

    async def _send_when_durable(self, conn: Connection, late: list) -> None:
        """Answers still waiting for the log past their budget that a void cannot compensate (a
        posting, an advice, a reversal, a duplicate of one still committing; or a hold when the
        log's buffer has no room for its void), sent once durable while the connection's other
        answers go on: a client matches answers on fields 11 and 37, not on their order. The log may
        be slow, or refusing for now (docs/operations.md, "Full disk and I/O errors")."""
        try:
            await self._ledger.wait_durable(max(outgoing.seq for outgoing in late))
        except LogFencedError:  # a deposed cluster primary: nothing more commits
            late = [self._switch.refuse(o) if o.seq > self._ledger.durable_seq else o for o in late]
        self._send(conn, late)
