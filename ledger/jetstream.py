"""The replicated log: the write-ahead log's interface over a NATS JetStream stream.

`StreamLog` is the second implementation of the log behind `DurableLedger` (the first is the local
`Wal`): append a record (any thread), wait until it is durable, read the records back from a
sequence number. A record is durable once the stream acknowledged the publish that carries it, that
is once `replicas` servers stored it (with `sync_interval: always`: fsync'd).

- **Group commit.** One publisher task (in the NATS thread, `NatsBridge`) takes everything appended
  since its last publish and sends it as one message (several when it exceeds `MESSAGE_BYTES_MAX`;
  a record larger than that is split into parts). One publish is in flight at a time; records
  appended meanwhile form the next group, so the group grows with the load without a timer.
- **Fencing.** Every publish carries `Nats-Expected-Last-Sequence`: the stream refuses it when any
  other writer published since (err_code 10071). A refused publish fences the log for good: its
  waiters get `LogFencedError`, nothing more is published, and the owner steps down.
- **Retries.** A publish whose answer is lost (timeout, every server down) is sent again with the
  same `Nats-Msg-Id`, so the stream's duplicate window makes it land once; past the window, a
  10071 is checked against the stored message's id before it is taken as fencing.

Records are framed inside a message as [kind u8 | flags u8 | seq u64 | length u32 | payload]; seq is
the log's own record sequence, contiguous across messages; `FLAG_MORE` marks a part of a record
continued in the next frame. Messages carry `Authsrv-Term` (the writer's term) and
`Authsrv-First-Seq`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator

import attrs
import trio

from ledger.wal import WalError, WalFullError

log = logging.getLogger("ledger.jetstream")

KIND_LEDGER = 1  # a ledger Batch (DurableLedger's payload)
KIND_STORE = 2  # a management store change (authsrv.store.replica)
KIND_TERM = 3  # a new primary's first record: fences every earlier writer
FLAG_MORE = 1  # more parts of this record follow
FLAG_CONT = 2  # this frame continues a record
FRAME = struct.Struct(">BBQI")
MESSAGE_BYTES_MAX = 512 * 1024  # under NATS's default max_payload (1 MiB) with room for headers
BUFFER_BYTES_MAX = 256 * 1024 * 1024  # appended and not yet acknowledged; past it appends are refused
API_TIMEOUT_S = 2.0  # stream info, key-value, object store calls
# An acknowledgement takes ~1-3 ms (R3, fsync'd); past this the publish is sent again (same message
# id: stored once), so a server lost mid-publish costs a fraction of the ISO budget, not seconds.
PUBLISH_TIMEOUT_S = 0.5
RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)
WRONG_LAST_SEQUENCE = 10071
STREAM_SEQS_KEPT = 100_000  # (first record seq, stream seq) of recent messages, for snapshots
HEADER_TERM = "Authsrv-Term"
HEADER_FIRST_SEQ = "Authsrv-First-Seq"


class LogFencedError(WalFullError):
    """Another writer published to the stream: this log takes nothing more (step down)."""


class LogClosedError(WalError):
    """The log was closed before the record was durable."""


@attrs.frozen
class Record:
    seq: int
    kind: int
    payload: bytes
    stream_seq: int  # the message that completed it


def encode_frames(records: list[tuple[int, int, bytes]]) -> Iterator[tuple[bytes, int, int, int]]:
    """(kind, seq, payload) records -> message bodies, each with (the first record that starts in
    it or 0, the last record it completes or 0, how many it completes). A record too large for one
    message is split into parts: FLAG_MORE on every part but the last, FLAG_CONT on every part but
    the first."""
    body = bytearray()
    starts = completes = count = 0
    for kind, seq, payload in records:
        view = memoryview(payload)
        flags = 0
        while True:
            space = MESSAGE_BYTES_MAX - len(body) - FRAME.size
            if len(view) <= space:
                starts = starts or (seq if not flags & FLAG_CONT else 0)
                body += FRAME.pack(kind, flags, seq, len(view))
                body += view
                completes = seq
                count += 1
                break
            if body and (len(view) <= MESSAGE_BYTES_MAX - FRAME.size or space < MESSAGE_BYTES_MAX // 8):
                yield bytes(body), starts, completes, count
                body.clear()
                starts = completes = count = 0
                continue
            starts = starts or (seq if not flags & FLAG_CONT else 0)
            part, view = view[:space], view[space:]
            body += FRAME.pack(kind, flags | FLAG_MORE, seq, len(part))
            body += part
            flags = FLAG_CONT
            yield bytes(body), starts, completes, count
            body.clear()
            starts = completes = count = 0
    if body:
        yield bytes(body), starts, completes, count


class FrameReader:
    """Message bodies in stream order -> complete records (parts joined). Reading may start at a
    message that continues an earlier record: such parts are skipped."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._part_seq = 0

    def feed(self, body: bytes, stream_seq: int) -> list[Record]:
        records = []
        offset = 0
        while offset < len(body):
            if len(body) - offset < FRAME.size:
                raise WalError(f"stream message {stream_seq}: a frame header is cut short")
            kind, flags, seq, length = FRAME.unpack_from(body, offset)
            offset += FRAME.size
            payload = body[offset:offset + length]
            offset += length
            if len(payload) != length:
                raise WalError(f"stream message {stream_seq}: frame of seq {seq} is cut short")
            if flags & FLAG_CONT:
                if not self._parts:
                    continue  # the record began before where reading began
                if seq != self._part_seq:
                    raise WalError(f"stream message {stream_seq}: part of {seq} after parts of {self._part_seq}")
            elif self._parts:  # a writer deposed in the middle of a large record: never acknowledged
                log.warning("stream message %d: record %d was left incomplete by its writer; dropped",
                            stream_seq, self._part_seq)
                self._parts.clear()
            if flags & FLAG_MORE:
                self._parts.append(payload)
                self._part_seq = seq
                continue
            if self._parts:
                payload = b"".join((*self._parts, payload))
                self._parts.clear()
            records.append(Record(seq, kind, payload, stream_seq))
        return records


class NatsBridge:
    """One asyncio loop in a daemon thread, holding one NATS connection (nats-py is asyncio; authsrv
    is trio). Calls cross with `run` (blocking, any thread) or `call` (awaitable, trio)."""

    def __init__(self, urls: list[str], *, name: str) -> None:
        self.urls = list(urls)
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"nats-{name}", daemon=True)
        self._thread.start()
        self.nc = None
        self.js = None

    def connect(self, timeout_s: float = 10.0) -> None:
        self.run(self._connect(), timeout_s)

    async def _connect(self) -> None:
        import nats

        async def quiet(error: Exception) -> None:
            log.debug("nats %s: %s", self.name, error)

        self.nc = await nats.connect(servers=self.urls, name=self.name, connect_timeout=1.0,
                                     reconnect_time_wait=0.2, max_reconnect_attempts=-1,
                                     allow_reconnect=True, error_cb=quiet, ping_interval=2,
                                     max_outstanding_pings=2)
        self.js = self.nc.jetstream(timeout=API_TIMEOUT_S)

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout_s: float | None = None):
        """Run `coro` in the NATS thread and block until it returns (not from that thread)."""
        assert threading.current_thread() is not self._thread
        future = self.submit(coro)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"NATS call did not finish within {timeout_s} s") from None

    async def call(self, coro):
        """Await `coro` (run in the NATS thread) from trio; cancelling the trio task cancels it."""
        future = self.submit(coro)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    def close(self) -> None:
        if self.nc is not None:
            try:
                self.run(self.nc.close(), 5.0)
            except Exception:  # closing a connection that is gone: nothing left to do
                log.debug("nats %s: close failed", self.name, exc_info=True)
        try:
            self.run(_cancel_other_tasks(), 5.0)  # e.g. a connect still trying: end it, not leak it
        except Exception:
            log.debug("nats %s: tasks did not end", self.name, exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class StreamLog:
    """The log interface of `ledger.wal.Wal` on a JetStream stream (see the module docstring).

    `append` may be called from any thread. `wait_durable` is for trio tasks, `wait_durable_sync`
    for other threads. `stream_last` is the stream sequence this writer expects to be last: the
    caller read the stream up to it (and applied it) before writing."""

    def __init__(self, bridge: NatsBridge, *, stream: str, subject: str, term: int, last_seq: int,
                 stream_last: int, buffer_bytes_max: int = BUFFER_BYTES_MAX,
                 on_commit: Callable[[int, int, float], None] | None = None,
                 on_fenced: Callable[[BaseException], None] | None = None) -> None:
        self._bridge = bridge
        self.stream = stream
        self.subject = subject
        self.term = term
        self._lock = threading.Lock()
        self._durable_changed = threading.Condition(self._lock)
        self._pending: list[tuple[int, int, bytes]] = []
        self._pending_bytes = 0
        self._buffer_bytes_max = buffer_bytes_max
        self.last_seq = last_seq
        self.first_seq = last_seq + 1
        self._durable_seq = last_seq
        self.stream_last = stream_last
        # (first record that starts in a message, its stream seq); the first entry: where the
        # records after last_seq will start.
        self._stream_seqs: collections.deque[tuple[int, int]] = collections.deque(maxlen=STREAM_SEQS_KEPT)
        self._stream_seqs.append((last_seq + 1, stream_last + 1))
        self._on_commit = on_commit
        self._on_fenced = on_fenced
        self._failed: BaseException | None = None
        self._publisher: concurrent.futures.Future | None = None
        self._wakeup: asyncio.Event | None = None
        self._idle = True
        self._trio_token = None
        self._trio_event = trio.Event()
        self._trio_want_wake = False
        self.publish_errors = 0

    # ----------------------------------------------------------------------------- appending

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def buffered_bytes(self) -> int:
        return self._pending_bytes

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    def ensure_room(self, length: int) -> None:
        if self._failed is not None:
            raise LogFencedError(str(self._failed))
        if self._pending_bytes + length > self._buffer_bytes_max:
            raise WalFullError(f"replicated log buffer full ({self._pending_bytes} bytes unacknowledged)")

    def append(self, payload: bytes, kind: int = KIND_LEDGER) -> int:
        with self._lock:
            if self._failed is not None:
                raise LogFencedError(str(self._failed))
            self.last_seq += 1
            seq = self.last_seq
            self._pending.append((kind, seq, payload))
            self._pending_bytes += len(payload)
            if self._idle and self._wakeup is not None:
                self._idle = False
                self._bridge.loop.call_soon_threadsafe(self._wakeup.set)
        return seq

    # ----------------------------------------------------------------------------- durability

    async def wait_durable(self, seq: int, *, unwritable_raises: bool = False) -> None:
        """`unwritable_raises` is the local log's option; a stream is never "unwritable": an
        unreachable NATS is retried until it answers, or the log is fenced."""
        del unwritable_raises
        while True:
            event = self._trio_event
            self._trio_want_wake = True  # before the check: the publisher reads it after moving durable
            if self._durable_seq >= seq:
                return
            if self._failed is not None:
                raise LogFencedError(str(self._failed)) from self._failed
            if self._publisher is None:
                raise WalError("the replicated log's publisher is not running")
            await event.wait()

    def wait_durable_sync(self, seq: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._durable_changed:
            while self._durable_seq < seq:
                if self._failed is not None:
                    raise LogFencedError(str(self._failed)) from self._failed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"record {seq} not acknowledged by the stream within {timeout_s} s")
                self._durable_changed.wait(remaining)

    def flush_sync(self, timeout_s: float = 30.0) -> None:
        self.wait_durable_sync(self.last_seq, timeout_s)

    def stream_seq_for(self, seq: int) -> int:
        """A stream sequence from which reading yields every record after `seq` (the message may
        also carry earlier records: readers skip them)."""
        with self._lock:
            for starts, stream_seq in reversed(self._stream_seqs):
                if starts <= seq + 1:
                    return stream_seq
            return self._stream_seqs[0][1]

    def _wake_trio(self) -> None:  # trio thread
        event, self._trio_event = self._trio_event, trio.Event()
        event.set()

    def _advance(self, durable: int, stream_seq: int, starts: int) -> None:
        with self._durable_changed:
            self.stream_last = stream_seq
            if starts:
                self._stream_seqs.append((starts, stream_seq))
            if durable > self._durable_seq:
                self._durable_seq = durable
            self._durable_changed.notify_all()
        self._notify_trio()

    def _notify_trio(self) -> None:
        if self._trio_want_wake and self._trio_token is not None:
            self._trio_want_wake = False
            try:
                self._trio_token.run_sync_soon(self._wake_trio)
            except trio.RunFinishedError:
                pass

    def _fail(self, error: BaseException) -> None:
        with self._durable_changed:
            if self._failed is None:
                self._failed = error
            self._durable_changed.notify_all()
        self._trio_want_wake = True
        self._notify_trio()
        if self._on_fenced is not None:
            self._on_fenced(error)

    # ----------------------------------------------------------------------------- the publisher

    async def run_committer(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the publisher in the NATS thread (unless its owner did) and keep it for the life of
        this task; a publisher its owner started is also stopped by its owner."""
        if self._publisher is not None:
            task_status.started()
            await trio.sleep_forever()
        self.start_publisher()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.stop_publisher()

    def start_publisher(self) -> None:
        assert self._publisher is None
        try:
            self._trio_token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            self._trio_token = None
        ready = threading.Event()

        async def make_event() -> None:
            self._wakeup = asyncio.Event()
            ready.set()

        self._bridge.run(make_event(), 5.0)
        ready.wait()
        self._publisher = self._bridge.submit(self._publish_loop())
        with self._lock:
            if self._pending:
                self._idle = False
                self._bridge.loop.call_soon_threadsafe(self._wakeup.set)

    def stop_publisher(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        if self._failed is None:
            self._fail(LogClosedError("the replicated log was closed"))

    async def _publish_loop(self) -> None:
        """One publish in flight: everything appended while it is stored goes out next, as one
        message (or a few). Two or four in flight measured worse on a 2-core machine shared with the
        NATS servers: smaller groups, more messages for every server to replicate and fsync
        (docs/benchmarks.md)."""
        try:
            while self._failed is None:
                with self._lock:
                    taken, self._pending = self._pending, []
                    size, self._pending_bytes = self._pending_bytes, 0
                    if not taken:
                        self._idle = True
                        self._wakeup.clear()
                if not taken:
                    await self._wakeup.wait()
                    continue
                started = time.perf_counter()
                for body, starts, completes, _ in encode_frames(taken):
                    stream_seq = await self._publish(body, starts)
                    if stream_seq is None:
                        return
                    self._advance(completes, stream_seq, starts)
                if self._on_commit is not None:
                    self._on_commit(len(taken), size, time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a bug here must fence the log, never leave waiters hanging
            log.exception("replicated log publisher failed")
            self._fail(error)

    def _headers(self, expected: int, starts: int) -> dict[str, str]:
        # One message per expected position in a term: a retry reuses the id, the stream stores it once.
        return {"Nats-Expected-Last-Sequence": str(expected), "Nats-Msg-Id": f"{self.term}.{expected}",
                HEADER_TERM: str(self.term), HEADER_FIRST_SEQ: str(starts)}

    async def _publish(self, body: bytes, first: int) -> int | None:
        """Publish one message until the stream takes it as the one after `stream_last`; None when
        fenced (another writer's message is there)."""
        from nats.js.errors import APIError

        expected = self.stream_last
        headers = self._headers(expected, first)
        msg_id = headers["Nats-Msg-Id"]
        tries = 0
        while True:
            try:
                ack = await self._bridge.js.publish(self.subject, body, timeout=PUBLISH_TIMEOUT_S,
                                                    stream=self.stream, headers=headers)
                if ack.seq != expected + 1:  # only a duplicate of an older message could say so
                    self._fail(LogFencedError(f"stream {self.stream} stored message {msg_id} as {ack.seq}, "
                                              f"expected {expected + 1}"))
                    return None
                return ack.seq
            except APIError as error:
                if error.err_code != WRONG_LAST_SEQUENCE:
                    self._retrying(error, tries)
                elif await self._landed(expected + 1, msg_id):
                    return expected + 1
                else:
                    log.error("replicated log fenced: the stream moved past seq %d under another writer", expected)
                    self._fail(LogFencedError(f"stream {self.stream} has a newer writer (expected last seq {expected})"))
                    return None
            except (asyncio.TimeoutError, TimeoutError, OSError) as error:
                self._retrying(error, tries)
            except Exception as error:  # nats-py raises its own classes for a lost connection
                self._retrying(error, tries)
            await asyncio.sleep(RETRY_BACKOFF_S[min(tries, len(RETRY_BACKOFF_S) - 1)])
            tries += 1

    def _retrying(self, error: BaseException, tries: int) -> None:
        self.publish_errors += 1
        if tries == 0:
            log.warning("replicated log: publish failed (%s: %s); retrying", type(error).__name__, error)

    async def _landed(self, stream_seq: int, msg_id: str) -> bool:
        """Did an earlier try of this message land as `stream_seq` (its answer lost)?"""
        try:
            stored = await self._bridge.js.get_msg(self.stream, stream_seq)
        except Exception:  # not found (or unreadable): not ours
            return False
        return (stored.headers or {}).get("Nats-Msg-Id") == msg_id


# --------------------------------------------------------------------------------- reading the stream


class StreamFollower:
    """Reads a stream's messages in order from a start sequence (an ordered consumer), in the NATS
    thread; `next_batch` hands over what arrived, at most `batch_max` at a time (the hand-off bound)."""

    def __init__(self, bridge: NatsBridge, *, stream: str, subject: str, start: int, batch_max: int = 512) -> None:
        self._bridge = bridge
        self.stream = stream
        self.subject = subject
        self.start = start
        self.batch_max = batch_max
        self._sub = None
        self.behind = 0
        self.behind_since = 0.0

    async def open(self) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, self.start))
        self._sub = await self._bridge.js.subscribe(
            self.subject, stream=self.stream, ordered_consumer=True, config=config,
            pending_msgs_limit=self.batch_max * 8, idle_heartbeat=1.0)

    async def next_batch(self, wait_s: float) -> list[tuple[int, bytes]]:
        """(stream seq, body) of the messages that arrived, waiting up to wait_s for the first.
        Afterwards `behind` is how many messages the stream holds past the last one handed over,
        and `behind_since` the publish time (s since the epoch) of the first of them, or 0."""
        try:
            msg = await self._sub.next_msg(timeout=wait_s)
        except Exception:  # nats.errors.TimeoutError: nothing new
            self.behind = 0
            return []
        batch = [(msg.metadata.sequence.stream, msg.data)]
        while len(batch) < self.batch_max and self._sub.pending_msgs > 0:
            msg = await self._sub.next_msg(timeout=API_TIMEOUT_S)
            batch.append((msg.metadata.sequence.stream, msg.data))
        self.behind = msg.metadata.num_pending or 0
        self.behind_since = msg.metadata.timestamp.timestamp() if self.behind else 0.0
        return batch

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection may be gone already
                pass
            self._sub = None
