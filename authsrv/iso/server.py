"""The ISO 8583 TCP listener on trio.

Per connection: a reader that decides each request synchronously (the hot path never awaits
anything but the commit) and a writer that waits for the write-ahead log's group commit once for
a whole group of responses, then sends them with one `send_all`. The channel between them is
bounded, so a sender that floods us is slowed by TCP instead of growing our memory.

A request whose decision needs the partner's external balance comes back from the switch deferred
(`Outgoing.pending`): the reader starts its completion in the connection's nursery (at most
`in_flight_per_connection_max` at once; the reader waits for a free slot) and goes on reading, so
one slow partner call does not hold up the requests behind it. The completion hands its answer to
the writer like any other.
"""

from __future__ import annotations

import logging
import time

import trio

from authsrv.iso.framing import FramingError, read_frames

log = logging.getLogger("authsrv.iso")

RESPONSE_GROUP_MAX = 256  # responses written with one send_all
CLOSE_TIMEOUT_S = 2.0  # closing the partners' HTTP pools at shutdown


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
        # serve_listeners lets a handler error crash the server: contain one bad peer here.
        if self._connections >= self._connections_max:
            log.warning("refusing a connection: %d open", self._connections)
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        self._idle = trio.Event() if self._connections == 1 else self._idle
        self._metrics.connections.inc()
        in_flight = [0]  # this connection's share of the in-flight gauge
        try:
            send, receive = trio.open_memory_channel(self._in_flight_max)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, receive, in_flight)
                async with send:
                    await self._reader(stream, send, in_flight, nursery)
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            # The peer went away (reset, closed mid-answer): its own problem, not the server's.
            log.info("ISO 8583 connection lost: %s", group.exceptions[0])
        finally:
            self._metrics.in_flight.dec(in_flight[0])  # decided but never sent: the peer left
            self._metrics.connections.dec()
            await trio.aclose_forcefully(stream)
            self._connections -= 1
            if self._connections == 0:
                self._idle.set()

    async def _reader(self, stream, send: trio.MemorySendChannel, in_flight: list[int],
                      nursery: trio.Nursery) -> None:
        """Read and decide frames until EOF, idle timeout or stop().

        Only the wait for the next frame can be cancelled: once a frame is decided (money may
        have moved), its answer always reaches the writer's channel.
        """
        handle, gauge = self._switch.handle, self._metrics.in_flight
        deferred_slots = trio.Semaphore(self._in_flight_max)
        frames = read_frames(stream, frame_size_max=self._frame_size_max)
        try:
            while not self._stopping:
                with trio.CancelScope(deadline=trio.current_time() + self._idle_timeout_s) as waiting:
                    self._readers.add(waiting)
                    try:
                        payload = await frames.__anext__()
                    finally:
                        self._readers.discard(waiting)
                if waiting.cancelled_caught:
                    log.info("closing ISO 8583 connection: idle or shutting down")
                    return
                outgoing = handle(payload, time.perf_counter_ns())
                if outgoing is not None:
                    gauge.inc()
                    in_flight[0] += 1
                    if outgoing.pending is None:
                        await send.send(outgoing)
                    else:
                        await deferred_slots.acquire()
                        nursery.start_soon(self._complete, outgoing, send.clone(), deferred_slots)
        except StopAsyncIteration:
            return
        except FramingError as error:
            self._metrics.framing_errors.inc()
            log.warning("closing ISO 8583 connection: framing lost: %s", error)
        finally:
            await frames.aclose()

    async def _complete(self, outgoing, send: trio.MemorySendChannel, slots: trio.Semaphore) -> None:
        """Finish a deferred decision (the partner call inside is shielded and bounded by the
        budget, so a decided request always settles) and queue its answer for the writer."""
        try:
            async with send:
                final = await self._switch.complete(outgoing)
                try:
                    await send.send(final)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.info("ISO 8583 connection gone before a deferred answer was sent")
        finally:
            slots.release()

    async def _writer(self, stream, receive: trio.MemoryReceiveChannel, in_flight: list[int]) -> None:
        ledger, metrics = self._ledger, self._metrics
        async with receive:
            async for first in receive:
                group = [first]
                while len(group) < RESPONSE_GROUP_MAX:
                    try:
                        group.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                seq = max(outgoing.seq for outgoing in group)
                if seq > ledger.durable_seq:
                    group = await self._commit(group, seq)
                await stream.send_all(b"".join(outgoing.data for outgoing in group))
                now = time.perf_counter_ns()
                for outgoing in group:
                    metrics.answered(outgoing.mti, outgoing.code, (now - outgoing.received_ns) / 1e9)
                metrics.in_flight.dec(len(group))
                in_flight[0] -= len(group)

    async def _commit(self, group: list, seq: int) -> list:
        """Wait until every approval in the group is on disk; approvals that miss the budget are
        compensated and answered with the stand-in decision instead."""
        ledger = self._ledger
        deadline_ns = min(outgoing.deadline_ns for outgoing in group if outgoing.seq > ledger.durable_seq)
        with trio.move_on_after(max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9)):
            await ledger.wait_durable(seq)
            return group
        group = [self._switch.stand_in(o) if o.ctx is not None and o.seq > ledger.durable_seq else o for o in group]
        rest = max(outgoing.seq for outgoing in group)
        if rest > ledger.durable_seq:  # duplicates of approvals still committing: they must wait
            await ledger.wait_durable(rest)
        return group
