"""Open-loop ISO 8583 load: the simulated card network driving the server under test.

Every authorization request has an INTENDED send time on a fixed schedule (`rate_per_s`), spread
round-robin over the connections, independent of responses. Latency is the receive time minus the
intended send time, so when the server stalls, every request the stall delayed is charged for it,
including those the client could not even send yet (no coordinated omission, as in wrk2 or
HdrHistogram's own guidance). Requests are pipelined: many are in flight per connection, bounded by
`outstanding_per_connection_max`, and matched on fields 11 + 37 in any order (docs/contract.md,
wire profile). A request unanswered `timeout_s` after it was sent counts as a timeout and is recorded
at the latency it had reached then.

Timer resolution: the sender wakes in ticks of about a millisecond (`TICK_S`) and each time sends
everything due within the next `TIMER_SLACK_S`, so a request leaves up to 1 ms early rather than a
timer's granularity late. Latency counts from the EARLIER of the intended and the actual send, so
an early send is measured from when it really left (never flattering), a late one from when it
should have left. `send_lag` reports how far sends fell behind their intended time (client
saturation shows there).

Cost: the client must stay far cheaper than the server it measures (issue 7: 8,000/s on 2 cores,
the generator on one). On a small VM a wake-up of a trio task costs ~90 us of CPU and a bare one
~20 us, so one loop (`_pump`) in a worker thread drives every connection through non-blocking
sockets and its own epoll, once per tick: requests due in a tick share one write per connection,
answers are read on the tick and timed by the kernel's receive timestamp (SO_TIMESTAMPNS) of the
newest segment of each read, so reading on a tick never adds the tick to the latency.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import math
import os
import random
import secrets
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import trio

from simulators.network.cards import SimCard, load_cards
from simulators.network.clearing import ClearingLog
from simulators.network.codec import (
    Codec,
    DecodeError,
    FrameReader,
    FramingError,
    Reply,
    decode,
    decode_reply,
    encode,
    frame,
    reply_of,
)
from simulators.network.mix import (
    MANAGEMENT_KINDS,
    STAN_MAX,
    Amounts,
    HotCards,
    Kind,
    MixWeights,
    Request,
    RequestFactory,
)
from simulators.network.report import KindCounts, LatencySummary, LoadReport, Recorder

CONNECTIONS_MAX = 256
OUTSTANDING_PER_CONNECTION_MAX = 10_000
RATE_PER_S_MAX = 200_000.0
DURATION_S_MAX = 3_600.0
COUNT_MAX = 100_000_000
TIMEOUT_S_MAX = 60.0
RECEIVE_SIZE_MAX = 65_536  # bytes per read
SEND_BATCH_MAX = 64  # frames built and joined into one write before the pump reads again
TIMER_SLACK_S = 0.001  # a request is sent up to this early (see the module docstring)
START_LEAD_S = 0.05  # between the last sign-on and the first intended send
TICK_S = 0.001  # the pump's period while answers are awaited
assert TICK_S <= TIMER_SLACK_S, "a tick must not make a send late"
# The generator's own collector: every GC_FREEZE_INTERVAL_S the pump moves what survived so far out
# of the collector's view (gc.freeze), so a full collection only scans the last second's objects.
# Left alone, in a 30-minute soak at 1,400/s (cards, in-flight requests, clearing's approvals), 37
# full collections paused the pump up to 166 ms each, and its sends were that late: the soak's
# p99.9 counted the generator. Frozen objects are still freed by reference counting; the pump
# unfreezes them when it ends, so cyclic garbage is collected after the run.
GC_FREEZE_INTERVAL_S = 1.0
REAP_INTERVAL_S = 0.05  # timeouts are counted this often (and late answers heard meanwhile)
RECEIVES_PER_TICK_MAX = 16  # reads per connection per tick
TIMED_OUT_KEYS_MAX = 10_000  # remembered per connection to tell late responses from stray ones
SIGN_ON_FRAMES_MAX = 100
RUN_SLACK_S = 10.0  # beyond schedule + 2 timeouts before the whole run is cut short
CONNECTION_ERRORS_MAX = 20  # kept in the report
# Linux stamps each received segment (SO_TIMESTAMPNS, wall clock) when asked: answers read on the
# pump's tick are still timed at their arrival. Elsewhere the read time stands in (up to a tick late).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ARRIVAL_TIMES = sys.platform == "linux"
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if _ARRIVAL_TIMES else 0


def _positive(instance: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen(kw_only=True)
class LoadConfig:
    cards_path: Path = attrs.field(converter=Path)
    port: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(65535)))
    host: str = "127.0.0.1"
    rate_per_s: float = attrs.field(default=1000.0, validator=[_positive, attrs.validators.le(RATE_PER_S_MAX)])
    duration_s: float | None = attrs.field(default=10.0, validator=_positive)
    count: int | None = attrs.field(default=None, validator=_positive)
    connections: int = attrs.field(default=4, validator=[_positive, attrs.validators.le(CONNECTIONS_MAX)])
    outstanding_per_connection_max: int = attrs.field(
        default=1_000, validator=[_positive, attrs.validators.le(OUTSTANDING_PER_CONNECTION_MAX)]
    )
    timeout_s: float = attrs.field(default=5.0, validator=[_positive, attrs.validators.le(TIMEOUT_S_MAX)])
    connect_timeout_s: float = attrs.field(default=5.0, validator=[_positive, attrs.validators.le(TIMEOUT_S_MAX)])
    echo_interval_s: float = attrs.field(default=3.0, validator=_positive)
    seed: int = 1
    weights: MixWeights = attrs.Factory(MixWeights)
    amounts: Amounts = attrs.Factory(Amounts)
    # Off by default: hot cards need their balances funded for it (mix.py, target.init_and_seed).
    hot: HotCards = attrs.Factory(HotCards)
    # An earlier run sent wrong PINs to this server: the PIN victims' counters are unknown, so their
    # answers are not judged (a later run of a bench ramp, against the same server).
    pin_victims_reused: bool = False
    zpk: bytes | None = attrs.field(default=None, repr=False)  # None: a random key (target checks no PINs)
    acquirer_id: str = "535001"
    rrn_tag: str | None = None  # 3 digits leading every RRN; None: random, so reruns do not collide
    codec: Codec = Codec.fast

    def __attrs_post_init__(self) -> None:
        if self.duration_s is None and self.count is None:
            raise ValueError("give duration_s, count, or both")
        if self.duration_s is not None and self.duration_s > DURATION_S_MAX:
            raise ValueError(f"duration_s must be <= {DURATION_S_MAX}")
        if not 0 < self.planned <= COUNT_MAX:
            raise ValueError(f"the run must plan 1..{COUNT_MAX} requests, not {self.planned}")
        if self.zpk is not None and len(self.zpk) not in (16, 24):
            raise ValueError("zpk must be 16 or 24 bytes")

    @property
    def planned(self) -> int:
        """Authorization requests on the schedule: the smaller of count and rate x duration."""
        by_time = int(self.rate_per_s * self.duration_s) if self.duration_s is not None else COUNT_MAX
        return min(by_time, self.count if self.count is not None else COUNT_MAX)


@attrs.frozen(kw_only=True)
class Progress:
    elapsed_s: float
    sent: int
    answered: int
    timeouts: int
    mismatches: int
    rate_per_s: float  # answered per second since the previous progress report
    latency_p99_ms: float  # over the run so far


class LoadError(Exception):
    """The load could not start (no connection, no sign-on): nothing was measured."""


class PeerClosedError(Exception):
    """The server closed the connection."""


_now = time.perf_counter  # the run's clock: the pump runs in a thread, outside trio's


CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, FramingError, PeerClosedError)


@attrs.define
class InFlight:
    request: Request
    intended_s: float
    sent_s: float
    deadline_s: float


@attrs.define
class _Tally:
    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    lost: int = 0
    mismatches: int = 0
    codes: collections.Counter = attrs.Factory(collections.Counter)


class _Run:
    """Counters and histograms of one run, shared by its connections. One thread at a time uses it
    (trio's during sign-on, then the pump's, then trio's for the report): no locks."""

    def __init__(self, config: LoadConfig, factory: RequestFactory) -> None:
        self.config = config
        self.factory = factory
        self.planned = config.planned
        self.interval_s = 1.0 / config.rate_per_s
        self.t0 = 0.0
        self.due = 0  # schedule indices below this are due (sent, or held back by an in-flight bound)
        self.stopping = False  # set from the trio side when the run is cancelled
        self.tallies = {kind: _Tally() for kind in Kind}
        self.latency = Recorder()
        self.service = Recorder()
        self.send_lag = Recorder()
        self.codes: collections.Counter[str] = collections.Counter()
        self.mismatch_detail: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.answered = self.sent = self.timeouts = self.mismatches = 0
        self.late = self.unmatched = self.undecodable = 0
        self.last_response_s = 0.0
        self.errors: list[str] = []

    def record_sent(self, request: Request, intended_s: float, sent_s: float) -> None:
        self.tallies[request.kind].sent += 1
        if request.kind not in MANAGEMENT_KINDS:
            self.sent += 1
            self.send_lag.record_s(sent_s - intended_s)

    def record_answer(self, entry: InFlight, reply: Reply, received_s: float) -> None:
        # Kernel arrival times follow the wall clock: a clock step must not put an answer before its request.
        received_s = max(received_s, entry.sent_s)
        request = entry.request
        tally = self.tallies[request.kind]
        tally.answered += 1
        code = reply.code or "--"
        tally.codes[code] += 1
        if request.kind not in MANAGEMENT_KINDS:
            self.answered += 1
            self.codes[code] += 1
            self.latency.record_s(received_s - min(entry.intended_s, entry.sent_s))
            self.service.record_s(received_s - entry.sent_s)
            self.last_response_s = max(self.last_response_s, received_s)
        got = code if reply.mti == request.response_mti else f"MTI {reply.mti}"
        if request.expected is not None and got not in request.expected:
            tally.mismatches += 1
            self.mismatches += 1
            self.mismatch_detail[request.kind.name][f"{'/'.join(sorted(request.expected))}->{got}"] += 1
        self.factory.on_answer(request, code, reply.auth_code)

    def record_timeout(self, entry: InFlight, now_s: float) -> None:
        self.tallies[entry.request.kind].timeouts += 1
        if entry.request.kind not in MANAGEMENT_KINDS:
            self.timeouts += 1
            # Charged at the latency it reached: leaving it out would flatter the percentiles.
            self.latency.record_s(now_s - min(entry.intended_s, entry.sent_s))
        self.factory.on_lost(entry.request)

    def record_lost(self, entry: InFlight) -> None:
        self.tallies[entry.request.kind].lost += 1
        self.factory.on_lost(entry.request)

    def record_error(self, connection_index: int, error: BaseException) -> None:
        if len(self.errors) < CONNECTION_ERRORS_MAX:
            self.errors.append(f"connection {connection_index}: {type(error).__name__}: {error}")

    def report(self, *, aborted: bool, end_s: float) -> LoadReport:
        config = self.config
        schedule_s = self.planned / config.rate_per_s
        # Achieved rate: over the schedule, or longer when answers trailed past its end.
        window_s = max(schedule_s, self.last_response_s - self.t0)
        authorization = [t for kind, t in self.tallies.items() if kind not in MANAGEMENT_KINDS]
        kinds = {
            kind.name: _kind_counts(tally, self.factory.expected_codes(kind))
            for kind, tally in self.tallies.items()
            if tally.sent
        }
        return LoadReport(
            target=f"{config.host}:{config.port}",
            offered_rate_per_s=config.rate_per_s,
            sent_rate_per_s=round(self.sent / schedule_s, 1),
            achieved_rate_per_s=round(self.answered / window_s, 1),
            schedule_s=round(schedule_s, 3),
            elapsed_s=round(end_s - self.t0, 3),
            connections=config.connections,
            planned=self.planned,
            sent=self.sent,
            answered=self.answered,
            timeouts=self.timeouts,
            lost=sum(t.lost for t in authorization),
            unsent=self.planned - self.sent,
            late_responses=self.late,
            unmatched_responses=self.unmatched,
            undecodable_responses=self.undecodable,
            mismatches=self.mismatches,
            aborted=aborted,
            send_lag=LatencySummary.from_recorder(self.send_lag),
            connection_errors=list(self.errors),
            latency=LatencySummary.from_recorder(self.latency),
            service_time=LatencySummary.from_recorder(self.service),
            codes=dict(sorted(self.codes.items())),
            kinds=kinds,
            mismatch_detail={kind: dict(detail) for kind, detail in sorted(self.mismatch_detail.items())},
        )


def _kind_counts(tally: _Tally, expected: frozenset[str] | None) -> KindCounts:
    return KindCounts(
        sent=tally.sent,
        answered=tally.answered,
        timeouts=tally.timeouts,
        lost=tally.lost,
        mismatches=tally.mismatches,
        codes=dict(sorted(tally.codes.items())),
        expected=sorted(expected or ()),
    )


class _BoundedSet:
    """The most recent `size_max` keys, for membership tests; the oldest is forgotten first."""

    def __init__(self, size_max: int) -> None:
        assert size_max > 0
        self._order: collections.deque[tuple[str, str]] = collections.deque()
        self._members: set[tuple[str, str]] = set()
        self._size_max = size_max

    def add(self, key: tuple[str, str]) -> None:
        if len(self._order) == self._size_max:
            self._members.discard(self._order.popleft())
        self._order.append(key)
        self._members.add(key)

    def __contains__(self, key: object) -> bool:
        return key in self._members


class _Connection:
    """One TCP connection, driven by the run's pump (`_pump`) through a non-blocking duplicate of
    the trio stream's socket: no task of its own, so no wake-up of its own."""

    def __init__(self, index: int, stream: trio.SocketStream, reader: FrameReader, run: _Run) -> None:
        config = run.config
        self.index = index
        self.stream = stream
        self.reader = reader
        self.run = run
        self.codec = config.codec
        self.stan = 0
        self.outstanding: dict[tuple[str, str], InFlight] = {}
        self.slots_free = config.outstanding_per_connection_max  # authorizations, not management
        self.next_index = index  # this connection's next request on the run's schedule
        self.timed_out = _BoundedSet(TIMED_OUT_KEYS_MAX)
        self.closed = False
        self.socket = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self.socket.setblocking(False)
        if _ARRIVAL_TIMES:
            self.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._pending = bytearray()  # bytes the kernel did not take yet; at most the in-flight frames

    def next_stan(self) -> str:
        # Unique across the run's connections (connection i sends i+1, i+1+n, i+1+2n, ...): a
        # reversal names its original by MTI, STAN, field 7 and acquirer (field 90), all shared by
        # the connections, so per-connection counters made two purchases in the same second look
        # alike and a reversal released the wrong hold. Restart after 999999 (field 11, n6).
        step = self.run.config.connections
        self.stan = self.stan + step if self.stan else self.index + 1
        if self.stan > STAN_MAX:
            self.stan = self.index + 1
        return f"{self.stan:06d}"

    async def sign_on(self) -> None:
        """0800 / 001 and its answer, before the pump runs (docs/contract.md, wire profile)."""
        request = self.run.factory.management(Kind.signon, self.next_stan())
        payload = frame(encode(request.message, self.codec))
        sent_s = _now()
        self._register(request, sent_s, sent_s)
        try:
            with trio.fail_after(self.run.config.connect_timeout_s):
                await self.stream.send_all(payload)
                for _ in range(SIGN_ON_FRAMES_MAX):
                    data = await self.stream.receive_some(RECEIVE_SIZE_MAX)
                    if not data:
                        raise PeerClosedError("server closed the connection during sign-on")
                    for payload in self.reader.feed(data):
                        self._on_frame(payload, _now())
                    if not self.outstanding:
                        return
        except (*CONNECTION_ERRORS, trio.TooSlowError) as error:
            raise LoadError(f"sign-on on connection {self.index} failed: {error!r}") from None
        raise LoadError(f"no sign-on response on connection {self.index}")

    def fail(self, error: BaseException) -> None:
        """One broken connection must not end the run: record it, count its in-flight requests
        lost, and leave its remaining schedule unsent."""
        if self.closed:
            return
        self.closed = True
        self.run.record_error(self.index, error)
        self.release_outstanding()

    def release_outstanding(self) -> None:
        for entry in self.outstanding.values():
            self.run.record_lost(entry)
        self.outstanding.clear()

    def _register(self, request: Request, intended_s: float, sent_s: float) -> None:
        message = request.message
        key = (message["11"], message.get("37", ""))
        assert key not in self.outstanding, "STAN reused while still in flight"
        self.outstanding[key] = InFlight(request, intended_s, sent_s, sent_s + self.run.config.timeout_s)
        self.run.record_sent(request, intended_s, sent_s)

    def send_due(self, due: int) -> bool:
        """Send this connection's requests with schedule index below `due`, as far as free slots
        allow (those held back go when answers or timeouts free a slot: their wait is charged), at
        most SEND_BATCH_MAX of them, joined into one write. True: more are due and could go now."""
        if self.closed or self.next_index >= due or not self.slots_free:
            return False
        run = self.run
        factory, codec, interval_s, step = run.factory, self.codec, run.interval_s, run.config.connections
        index, batch = self.next_index, []
        size_max = min(self.slots_free, SEND_BATCH_MAX)
        while index < due and len(batch) < size_max:  # bounded by size_max
            request = factory.next_request(self.next_stan())
            batch.append((request, run.t0 + index * interval_s, frame(encode(request.message, codec))))
            index += step
        self.next_index = index
        self.slots_free -= len(batch)
        sent_s = _now()
        if not self.write(b"".join(payload for _, _, payload in batch)):
            for request, _, _ in batch:  # never sent: unsent in the report; release their cards
                factory.on_lost(request)
            return False
        for request, intended_s, _ in batch:  # after the write: no other task ran in between
            self._register(request, intended_s, sent_s)
        return index < due and self.slots_free > 0

    def write(self, data: bytes) -> bool:
        """Hand `data` to the kernel, keeping what it does not take for `flush`; False: broken."""
        if self.closed:
            return False
        self._pending += data
        self.flush()
        return not self.closed

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def flush(self) -> None:
        if not self._pending or self.closed:
            return
        try:
            del self._pending[: self.socket.send(self._pending)]
        except BlockingIOError:
            pass  # the kernel buffer is full (the server is not reading): the next tick retries
        except OSError as error:
            self.fail(error)

    def receive(self) -> None:
        """Read what arrived, match it, and free the slots of the answered requests."""
        sock, reader = self.socket, self.reader
        for _ in range(RECEIVES_PER_TICK_MAX):
            try:
                data, ancillary, _, _ = sock.recvmsg(RECEIVE_SIZE_MAX, _ANCILLARY_SIZE)
            except BlockingIOError:
                return
            except OSError as error:
                self.fail(error)
                return
            if not data:
                self.fail(PeerClosedError("server closed the connection"))
                return
            received_s = _arrival_s(ancillary)
            try:
                payloads = reader.feed(data)
            except FramingError as error:
                self.fail(error)
                return
            for payload in payloads:
                self._on_frame(payload, received_s)
            if len(data) < RECEIVE_SIZE_MAX:
                return  # drained, most likely: the next tick's epoll says if more came (saves a read)

    def _on_frame(self, payload: bytes, received_s: float) -> None:
        run = self.run
        try:
            reply = decode_reply(payload) if self.codec is Codec.fast else reply_of(decode(payload, self.codec))
        except DecodeError:
            run.undecodable += 1
            return
        entry = self.outstanding.pop((reply.stan, reply.rrn), None)
        if entry is None:
            if (reply.stan, reply.rrn) in self.timed_out:
                run.late += 1
            else:
                run.unmatched += 1
            return
        if entry.request.kind not in MANAGEMENT_KINDS:
            self.slots_free += 1
        run.record_answer(entry, reply, received_s)

    def reap(self, now_s: float) -> None:
        """Count the requests past their deadline as timeouts, at the latency they reached."""
        expired = []
        for key, entry in self.outstanding.items():  # insertion order is deadline order
            if entry.deadline_s > now_s:
                break
            expired.append(key)
        for key in expired:
            entry = self.outstanding.pop(key)
            if entry.request.kind not in MANAGEMENT_KINDS:
                self.slots_free += 1
            self.timed_out.add(key)
            self.run.record_timeout(entry, now_s)

    def send_echo(self) -> None:
        request = self.run.factory.management(Kind.echo, self.next_stan())
        payload = frame(encode(request.message, self.codec))
        now_s = _now()
        if self.write(payload):
            self._register(request, now_s, now_s)


def _arrival_s(ancillary: list[tuple[int, int, bytes]]) -> float:
    """When the kernel received the newest segment of this read, on the run's clock (never in the
    future); the read's own time when the kernel gave none. Every frame of the read is charged
    the newest arrival: never flattering, and the pump's tick stays out of the latency."""
    read_s = _now()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            arrived_s = read_s - (time.time() - (seconds + nanoseconds / 1e9))
            return arrived_s if arrived_s < read_s else read_s
    return read_s


@attrs.define
class _Timers:
    """When the pump next reaps timeouts, sends echoes and reports progress."""

    reap_s: float
    echo_s: float
    progress_s: float
    answered_before: int = 0
    progress_before_s: float = 0.0
    freeze_s: float = 0.0


def _pump(
    run: _Run, connections: list[_Connection], end_s: float, progress: Callable[[Progress], None] | None,
    progress_interval_s: float,
) -> bool:  # fmt: skip
    """The load generator's loop, in a worker thread: each tick it reads what arrived, reaps timeouts,
    sends what is due, then sleeps until the next request is due (up to one tick early, see the
    module docstring) or one tick while answers are awaited. It polls its own selector and sleeps in
    the kernel: a trio wake-up costs several times a bare one, and one tick serves all connections.
    Returns True when the run's time bound (`end_s`) or a cancellation cut it short."""
    rate_per_s, planned, tick_s = run.config.rate_per_s, run.planned, TICK_S
    drain_deadline_s = None
    timers = _Timers(reap_s=run.t0 + REAP_INTERVAL_S, echo_s=run.t0 + run.config.echo_interval_s,
                     progress_s=run.t0 + progress_interval_s, progress_before_s=run.t0,
                     freeze_s=run.t0 + GC_FREEZE_INTERVAL_S)  # fmt: skip
    with selectors.DefaultSelector() as poller:  # epoll on Linux
        for connection in connections:
            poller.register(connection.socket, selectors.EVENT_READ, connection)
        while True:  # bounded: `due` rises with the clock to `planned`, then the drain deadline, `end_s`
            now_s = _now()
            if run.stopping or now_s >= end_s:
                return True
            for key, _ in poller.select(0):
                if not key.data.closed:
                    key.data.receive()
            live = [connection for connection in connections if not connection.closed]
            _run_timers(run, live, timers, now_s, progress, progress_interval_s)
            run.due = min(planned, int((now_s + TIMER_SLACK_S - run.t0) * rate_per_s) + 1)
            behind = False
            for connection in live:
                behind = connection.send_due(run.due) or behind
                connection.flush()
            if behind:  # a backlog after a stall: the next batch at once, after reading again
                continue
            awaiting = any(connection.outstanding or connection.pending for connection in live)
            if not any(connection.next_index < planned for connection in live):
                if drain_deadline_s is None:
                    drain_deadline_s = now_s + run.config.timeout_s + 2 * REAP_INTERVAL_S
                if not awaiting or now_s > drain_deadline_s:
                    return False
            wake_s = run.t0 + run.due * run.interval_s - TIMER_SLACK_S if run.due < planned else math.inf
            if awaiting or run.due >= planned:
                wake_s = min(wake_s, now_s + tick_s)
            wake_s = min(max(wake_s, now_s + tick_s), timers.reap_s, end_s)  # a tick apart: never late
            time.sleep(max(0.0, wake_s - _now()))


def _run_timers(
    run: _Run, live: list[_Connection], timers: _Timers, now_s: float, progress: Callable[[Progress], None] | None,
    progress_interval_s: float,
) -> None:  # fmt: skip
    if now_s >= timers.freeze_s:
        timers.freeze_s = now_s + GC_FREEZE_INTERVAL_S
        gc.freeze()  # O(1): a list splice
    if now_s >= timers.reap_s:
        timers.reap_s = now_s + REAP_INTERVAL_S
        for connection in live:
            connection.reap(now_s)
    if now_s >= timers.echo_s:
        timers.echo_s = now_s + run.config.echo_interval_s
        for connection in live:
            connection.send_echo()
    if progress is not None and now_s >= timers.progress_s:
        timers.progress_s = now_s + progress_interval_s
        elapsed_s = max(now_s - timers.progress_before_s, 1e-9)
        progress(
            Progress(
                elapsed_s=round(now_s - run.t0, 1),
                sent=run.sent,
                answered=run.answered,
                timeouts=run.timeouts,
                mismatches=run.mismatches,
                rate_per_s=round((run.answered - timers.answered_before) / elapsed_s, 1),
                latency_p99_ms=round(run.latency.histogram.get_value_at_percentile(99) / 1000, 3),
            )
        )
        timers.answered_before, timers.progress_before_s = run.answered, now_s


@contextlib.contextmanager
def _frozen_garbage() -> Iterator[None]:
    """The pump's run with what exists before it starts out of the collector's view (see
    GC_FREEZE_INTERVAL_S), and everything handed back to it at the end."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _stop_on_cancel(run: _Run) -> None:
    # The pump's thread cannot be cancelled: a cancellation of the run reaches it through this flag.
    try:
        await trio.sleep_forever()
    finally:
        run.stopping = True


async def _open_connection(index: int, run: _Run) -> _Connection:
    """Connect and sign on before the clock starts."""
    config = run.config
    try:
        with trio.fail_after(config.connect_timeout_s):
            stream = await trio.open_tcp_stream(config.host, config.port)
    except (OSError, trio.TooSlowError) as error:
        raise LoadError(f"connection {index} to {config.host}:{config.port} failed: {error!r}") from None
    connection = _Connection(index, stream, FrameReader(), run)
    try:
        await connection.sign_on()
    except BaseException:
        connection.socket.close()
        await stream.aclose()
        raise
    return connection


async def run_load(
    config: LoadConfig,
    *,
    progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 5.0,
    cards: tuple[SimCard, ...] | None = None,
    clearing: ClearingLog | None = None,
) -> LoadReport:
    """Drive the open-loop mix against `config.host:config.port` and measure it.

    `cards` (already loaded from `config.cards_path`) saves re-reading the file on repeated runs.
    `clearing`, when given, learns every approved purchase (and reversal) for a clearing file.
    Raises LoadError only when the run cannot start; a connection that breaks later is reported
    in `connection_errors`, its in-flight requests as `lost` and its remaining schedule as `unsent`.
    """
    assert progress_interval_s > 0
    if cards is None:
        cards = await trio.to_thread.run_sync(load_cards, config.cards_path)
    factory = RequestFactory(
        cards,
        weights=config.weights,
        rng=random.Random(config.seed),
        zpk=config.zpk if config.zpk is not None else os.urandom(16),
        amounts=config.amounts,
        acquirer_id=config.acquirer_id,
        rrn_tag=config.rrn_tag if config.rrn_tag is not None else f"{secrets.randbelow(1000):03d}",
        clearing=clearing,
        hot=config.hot,
        victims_reused=config.pin_victims_reused,
    )
    run = _Run(config, factory)
    connections: list[_Connection] = []
    try:
        for index in range(config.connections):
            connections.append(await _open_connection(index, run))
        with _frozen_garbage():  # its collection before the schedule starts: it takes what it takes
            run.t0 = _now() + START_LEAD_S
            end_s = run.t0 + run.planned / config.rate_per_s + 2 * config.timeout_s + RUN_SLACK_S
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_cancel, run)
                pump = functools.partial(_pump, run, connections, end_s, progress, progress_interval_s)
                aborted = await trio.to_thread.run_sync(pump)
                nursery.cancel_scope.cancel()
    finally:
        run.stopping = True
        with trio.CancelScope(shield=True):
            for connection in connections:
                connection.release_outstanding()
                connection.socket.close()
                await connection.stream.aclose()
    return run.report(aborted=aborted, end_s=_now())
