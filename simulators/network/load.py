"""Open-loop ISO 8583 load: the simulated card network driving the server under test.

Every authorization request has an INTENDED send time on a fixed schedule (`rate_per_s`), spread
round-robin over the connections, independent of responses. Latency is the receive time minus the
intended send time, so when the server stalls, every request the stall delayed is charged for it,
including those the client could not even send yet (no coordinated omission, as in wrk2 or
HdrHistogram's own guidance). Requests are pipelined: many are in flight per connection, bounded by
`outstanding_per_connection_max`, and matched on fields 11 + 37 in any order (CONTRACT.md
section 3). A request unanswered `timeout_s` after it was sent counts as a timeout and is recorded
at the latency it had reached then.

Timer resolution: trio sleeps on epoll, which rounds timeouts up to whole milliseconds, so a send
that waits for its intended time would start up to about 1 ms late and charge the client's timer to
the server. The sender therefore wakes one tick (`TIMER_SLACK_S`) early and sends everything due by
then; latency counts from the EARLIER of the intended and the actual send, so an early send is
measured from when it really left (never flattering), a late one from when it should have left.
`send_lag` reports how far sends fell behind their intended time (client saturation shows there).
"""

from __future__ import annotations

import collections
import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from simulators.network.cards import SimCard, load_cards
from simulators.network.clearing import ClearingLog
from simulators.network.codec import Codec, DecodeError, FrameReader, FramingError, decode, encode, frame
from simulators.network.mix import MANAGEMENT_KINDS, STAN_MAX, Amounts, Kind, MixWeights, Request, RequestFactory
from simulators.network.report import KindCounts, LatencySummary, LoadReport, Recorder

CONNECTIONS_MAX = 256
OUTSTANDING_PER_CONNECTION_MAX = 10_000
RATE_PER_S_MAX = 200_000.0
DURATION_S_MAX = 3_600.0
COUNT_MAX = 100_000_000
TIMEOUT_S_MAX = 60.0
RECEIVE_SIZE_MAX = 65_536  # bytes per receive_some
SEND_BATCH_MAX = 64  # frames joined into one send_all when the sender is behind schedule
# trio sleeps on epoll, which rounds timeouts UP to whole milliseconds: waking one tick early and
# sending then keeps the timer's granularity out of the measured latency (see the module docstring).
TIMER_SLACK_S = 0.001
START_LEAD_S = 0.05  # between the last sign-on and the first intended send
REAP_INTERVAL_S = 0.05
DRAIN_POLL_S = 0.005
TIMED_OUT_KEYS_MAX = 10_000  # remembered per connection to tell late responses from stray ones
SIGN_ON_FRAMES_MAX = 100
RUN_SLACK_S = 10.0  # beyond schedule + 2 timeouts before the whole run is cut short
CONNECTION_ERRORS_MAX = 20  # kept in the report


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
    """Counters and histograms of one run, shared by its connections (one trio thread: no locks)."""

    def __init__(self, config: LoadConfig, factory: RequestFactory) -> None:
        self.config = config
        self.factory = factory
        self.planned = config.planned
        self.t0 = 0.0
        self.go = trio.Event()
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

    def record_answer(self, entry: InFlight, message: dict[str, str], received_s: float) -> None:
        request = entry.request
        tally = self.tallies[request.kind]
        tally.answered += 1
        code = message.get("39", "--")
        tally.codes[code] += 1
        if request.kind not in MANAGEMENT_KINDS:
            self.answered += 1
            self.codes[code] += 1
            self.latency.record_s(received_s - min(entry.intended_s, entry.sent_s))
            self.service.record_s(received_s - entry.sent_s)
            self.last_response_s = max(self.last_response_s, received_s)
        got = code if message["t"] == request.response_mti else f"MTI {message['t']}"
        if request.expected is not None and got not in request.expected:
            tally.mismatches += 1
            self.mismatches += 1
            self.mismatch_detail[request.kind.name][f"{'/'.join(sorted(request.expected))}->{got}"] += 1
        self.factory.on_answer(request, code, message.get("38", ""))

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
    """One TCP connection: an open-loop sender, a receiver, a timeout reaper and an echo timer."""

    def __init__(self, index: int, stream: trio.SocketStream, reader: FrameReader, run: _Run) -> None:
        config = run.config
        self.index = index
        self.stream = stream
        self.reader = reader
        self.run = run
        self.codec = config.codec
        self.stan = 0
        self.outstanding: dict[tuple[str, str], InFlight] = {}
        self.slots = trio.Semaphore(config.outstanding_per_connection_max)
        self.send_lock = trio.Lock()
        self.timed_out = _BoundedSet(TIMED_OUT_KEYS_MAX)
        self.scope = trio.CancelScope()

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
        """0800 / 001 and its answer, before the receive loop runs (CONTRACT.md section 3)."""
        request = self.run.factory.management(Kind.signon, self.next_stan())
        sent_s = trio.current_time()
        self._register(request, sent_s, sent_s)
        try:
            with trio.fail_after(self.run.config.connect_timeout_s):
                await self.stream.send_all(frame(encode(request.message, self.codec)))
                for _ in range(SIGN_ON_FRAMES_MAX):
                    data = await self.stream.receive_some(RECEIVE_SIZE_MAX)
                    if not data:
                        raise PeerClosedError("server closed the connection during sign-on")
                    for payload in self.reader.feed(data):
                        self._on_frame(payload, trio.current_time())
                    if not self.outstanding:
                        return
        except (*CONNECTION_ERRORS, trio.TooSlowError) as error:
            raise LoadError(f"sign-on on connection {self.index} failed: {error!r}") from None
        raise LoadError(f"no sign-on response on connection {self.index}")

    async def serve(self) -> None:
        """Run this connection's share of the schedule, then drain; contain its I/O failures."""
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._receive_loop)
                    nursery.start_soon(self._guard, self._reap_loop)
                    nursery.start_soon(self._guard, self._echo_loop)
                    await self._guard(self._send_schedule)
                    await self._drain()
                    nursery.cancel_scope.cancel()
        finally:
            for entry in self.outstanding.values():
                self.run.record_lost(entry)
            self.outstanding.clear()

    async def _guard(self, body: Callable[[], object]) -> None:
        # One broken connection must not end the run: record it and stop only this connection.
        try:
            await body()
        except CONNECTION_ERRORS as error:
            self.run.record_error(self.index, error)
            self.scope.cancel()

    def _register(self, request: Request, intended_s: float, sent_s: float) -> None:
        message = request.message
        key = (message["11"], message.get("37", ""))
        assert key not in self.outstanding, "STAN reused while still in flight"
        self.outstanding[key] = InFlight(request, intended_s, sent_s, sent_s + self.run.config.timeout_s)
        self.run.record_sent(request, intended_s, sent_s)

    async def _flush(self, batch: list[bytes]) -> None:
        async with self.send_lock:
            await self.stream.send_all(b"".join(batch))
        batch.clear()

    async def _send_schedule(self) -> None:
        run = self.run
        interval_s = 1.0 / run.config.rate_per_s
        step = run.config.connections
        batch: list[bytes] = []
        index = self.index
        while index < run.planned:  # bounded: `planned` requests spread over the connections
            intended_s = run.t0 + index * interval_s
            now_s = trio.current_time()
            if intended_s - TIMER_SLACK_S > now_s:
                if batch:
                    await self._flush(batch)
                await trio.sleep_until(intended_s - TIMER_SLACK_S)
                now_s = trio.current_time()
            try:
                self.slots.acquire_nowait()
            except trio.WouldBlock:
                if batch:
                    await self._flush(batch)
                await self.slots.acquire()  # the intended time stays: the wait is charged
                now_s = trio.current_time()
            request = run.factory.next_request(self.next_stan())
            batch.append(frame(encode(request.message, self.codec)))
            self._register(request, intended_s, now_s)
            if len(batch) >= SEND_BATCH_MAX:
                await self._flush(batch)
            index += step
        if batch:
            await self._flush(batch)

    async def _receive_loop(self) -> None:
        while True:  # bounded by the connection's cancel scope (end of drain, run time bound)
            data = await self.stream.receive_some(RECEIVE_SIZE_MAX)
            if not data:
                raise PeerClosedError("server closed the connection")
            received_s = trio.current_time()
            for payload in self.reader.feed(data):
                self._on_frame(payload, received_s)

    def _on_frame(self, payload: bytes, received_s: float) -> None:
        run = self.run
        try:
            message = decode(payload, self.codec)
        except DecodeError:
            run.undecodable += 1
            return
        key = (message.get("11", ""), message.get("37", ""))
        entry = self.outstanding.pop(key, None)
        if entry is None:
            if key in self.timed_out:
                run.late += 1
            else:
                run.unmatched += 1
            return
        if entry.request.kind not in MANAGEMENT_KINDS:
            self.slots.release()
        run.record_answer(entry, message, received_s)

    async def _reap_loop(self) -> None:
        while True:  # bounded by the connection's cancel scope
            await trio.sleep(REAP_INTERVAL_S)
            now_s = trio.current_time()
            expired = []
            for key, entry in self.outstanding.items():  # insertion order is deadline order
                if entry.deadline_s > now_s:
                    break
                expired.append(key)
            for key in expired:
                entry = self.outstanding.pop(key)
                if entry.request.kind not in MANAGEMENT_KINDS:
                    self.slots.release()
                self.timed_out.add(key)
                self.run.record_timeout(entry, now_s)

    async def _echo_loop(self) -> None:
        while True:  # bounded by the connection's cancel scope
            await trio.sleep(self.run.config.echo_interval_s)
            request = self.run.factory.management(Kind.echo, self.next_stan())
            now_s = trio.current_time()
            self._register(request, now_s, now_s)
            async with self.send_lock:
                await self.stream.send_all(frame(encode(request.message, self.codec)))

    async def _drain(self) -> None:
        deadline_s = trio.current_time() + self.run.config.timeout_s + 2 * REAP_INTERVAL_S
        while self.outstanding and trio.current_time() < deadline_s:
            await trio.sleep(DRAIN_POLL_S)


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
    )
    run = _Run(config, factory)
    connections: list[_Connection] = []
    try:
        for index in range(config.connections):
            connections.append(await _open_connection(index, run))
        run.t0 = trio.current_time() + START_LEAD_S
        time_bound_s = START_LEAD_S + run.planned / config.rate_per_s + 2 * config.timeout_s + RUN_SLACK_S
        with trio.move_on_after(time_bound_s) as bound:
            async with trio.open_nursery() as nursery:
                if progress is not None:
                    nursery.start_soon(_report_progress, run, progress, progress_interval_s)
                async with trio.open_nursery() as connection_nursery:
                    for connection in connections:
                        connection_nursery.start_soon(connection.serve)
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for connection in connections:
                await connection.stream.aclose()
    return run.report(aborted=bound.cancelled_caught, end_s=trio.current_time())


async def _report_progress(run: _Run, progress: Callable[[Progress], None], interval_s: float) -> None:
    answered_before, time_before = 0, run.t0
    while True:  # bounded by the run's nursery, cancelled when the connections are done
        await trio.sleep(interval_s)
        now_s = trio.current_time()
        progress(
            Progress(
                elapsed_s=round(now_s - run.t0, 1),
                sent=run.sent,
                answered=run.answered,
                timeouts=run.timeouts,
                mismatches=run.mismatches,
                rate_per_s=round((run.answered - answered_before) / max(now_s - time_before, 1e-9), 1),
                latency_p99_ms=round(run.latency.histogram.get_value_at_percentile(99) / 1000, 3),
            )
        )
        answered_before, time_before = run.answered, now_s
