"""The dashboard's figures: a bounded sampler of the running server's Prometheus registry.

Counters and histograms only say "how many since the process started"; a rate or a latency
quantile needs two readings and their difference. `DashboardSampler.run` (a task in the server's
nursery, authsrv/app.py) reads the few series the dashboard shows every SAMPLE_INTERVAL_S into a
deque of at most SAMPLES_MAX samples (five minutes), and the page compares a reading taken when it
is rendered with the stored sample RATE_WINDOW_S before it:

- authorizations per second, the approval rate and the response-code mix: authsrv_iso_requests
  (MTIs 0100/0200 and their repeats), approvals being 00 and 10 (docs/contract.md, response codes);
- p50 and p99 latency: authsrv_iso_request_seconds (receipt to response written), by the
  histogram_quantile rule (linear inside the bucket the rank falls in);
- stand-ins: authsrv_stand_in_decisions; partner latency: authsrv_external_call_seconds (every
  partner); WAL fsync p99: authsrv_wal_fsync_seconds; outbox backlog and dead letters: the
  outbox gauges.

Reading goes through `restricted_registry`: only these series are collected, ~0.6 ms on the loop
with every MTI x code pair in use (a whole scrape costs 10-50 times that); the series are the
ones authsrv/metrics.py and authsrv/hotpath/external.py define. Each page view and each refresh
of the live fragment takes one reading too; nothing but the task stores one. Everything here is a pure function of samples but
`read_sample` and `run`, so the figures are tested without a server.
"""

from __future__ import annotations

import collections
import math
import time
import weakref
from collections.abc import Callable, Iterable, Mapping

import attrs
import trio

SAMPLE_INTERVAL_S = 3.0
SAMPLES_MAX = 100  # 5 minutes at SAMPLE_INTERVAL_S: the chart's width
RATE_WINDOW_S = 30.0  # rates and quantiles on the page are over the last half minute
RATE_WINDOW_S_MIN = 0.5  # a shorter gap gives no rate (noise, not a figure)
CODES_SHOWN_MAX = 12  # the code mix lists the most frequent codes; the rest are summed as "other"

AUTHORIZATION_MTIS = frozenset({"0100", "0101", "0200", "0201"})
APPROVAL_CODES = frozenset({"00", "10"})

REQUESTS = "authsrv_iso_requests_total"
LATENCY = "authsrv_iso_request_seconds"
STAND_INS = "authsrv_stand_in_decisions_total"
EXTERNAL = "authsrv_external_call_seconds"
WAL_FSYNC = "authsrv_wal_fsync_seconds"
OUTBOX_PENDING = "authsrv_outbox_pending"
DEAD_LETTERS = "authsrv_outbox_dead_letters"
IN_FLIGHT = "authsrv_iso_in_flight"
CONNECTIONS = "authsrv_iso_connections"
HISTOGRAMS = (LATENCY, EXTERNAL, WAL_FSYNC)
SAMPLE_NAMES = frozenset({REQUESTS, STAND_INS, OUTBOX_PENDING, DEAD_LETTERS, IN_FLIGHT, CONNECTIONS,
                          *(f"{name}_bucket" for name in HISTOGRAMS), *(f"{name}_count" for name in HISTOGRAMS)})


# -- values ----------------------------------------------------------------------------------------


@attrs.frozen
class Histo:
    """A histogram's cumulative bucket counts by upper bound (the last bound is +Inf)."""

    bounds: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def minus(self, older: Histo) -> Histo:
        """What was observed between `older` and this reading (same buckets, or this one whole)."""
        if older.bounds != self.bounds:
            return self
        return Histo(self.bounds, tuple(max(0.0, a - b) for a, b in zip(self.counts, older.counts, strict=True)))

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: None without observations; the largest finite bound when
        the rank falls in +Inf (the histogram cannot say more)."""
        assert 0 < q < 1, q
        assert len(self.bounds) == len(self.counts)
        if not self.counts or self.count <= 0:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            if count >= rank:
                if math.isinf(bound):
                    return lower_bound
                if count == lower_count:
                    return bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
            lower_bound, lower_count = bound, count
        return lower_bound


@attrs.frozen
class Sample:
    """One reading of the registry: counters and histograms since the process started, gauges now."""

    at_s: float  # monotonic
    wall_s: float  # time.time(), for the chart's labels
    codes: Mapping[str, float]  # authorization answers (AUTHORIZATION_MTIS) by field 39
    other_requests: float  # every other message answered (advices, reversals, network)
    latency: Histo
    stand_ins: float
    external: Histo  # every partner's calls together
    wal_fsync: Histo
    outbox_pending: float | None
    dead_letters: float | None
    in_flight: float
    connections: float

    @property
    def authorizations(self) -> float:
        return sum(self.codes.values())

    @property
    def approvals(self) -> float:
        return sum(count for code, count in self.codes.items() if code in APPROVAL_CODES)


@attrs.frozen
class CodeShare:
    code: str
    count: int
    percent: float


@attrs.frozen
class Window:
    """The figures between two samples (older, newer)."""

    seconds: float
    authorizations: int
    authorizations_per_s: float
    approval_percent: float | None
    codes: tuple[CodeShare, ...]
    other_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    stand_ins: int
    external_calls: int
    external_p50_ms: float | None
    external_p99_ms: float | None
    wal_fsyncs: int
    wal_fsync_p99_ms: float | None


@attrs.frozen
class ChartPoint:
    wall_s: float
    authorizations_per_s: float
    latency_p99_ms: float | None


@attrs.frozen
class Dashboard:
    now: Sample
    window: Window | None  # None until two readings far enough apart exist
    chart: tuple[ChartPoint, ...]


# -- pure figures ----------------------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def window_between(older: Sample, newer: Sample) -> Window | None:
    seconds = newer.at_s - older.at_s
    if seconds < RATE_WINDOW_S_MIN:
        return None
    codes = {code: max(0.0, count - older.codes.get(code, 0.0)) for code, count in newer.codes.items()}
    authorizations = sum(codes.values())
    approvals = sum(count for code, count in codes.items() if code in APPROVAL_CODES)
    ranked = sorted(((count, code) for code, count in codes.items() if count > 0), key=lambda item: (-item[0], item[1]))
    shares = [CodeShare(code, int(count), 100.0 * count / authorizations) for count, code in ranked[:CODES_SHOWN_MAX]]
    rest = sum(count for count, _ in ranked[CODES_SHOWN_MAX:])
    if rest:
        shares.append(CodeShare("other", int(rest), 100.0 * rest / authorizations))
    latency = newer.latency.minus(older.latency)
    external = newer.external.minus(older.external)
    wal = newer.wal_fsync.minus(older.wal_fsync)
    return Window(
        seconds=seconds,
        authorizations=int(authorizations),
        authorizations_per_s=authorizations / seconds,
        approval_percent=100.0 * approvals / authorizations if authorizations else None,
        codes=tuple(shares),
        other_per_s=max(0.0, newer.other_requests - older.other_requests) / seconds,
        latency_p50_ms=_ms(latency.quantile(0.5)),
        latency_p99_ms=_ms(latency.quantile(0.99)),
        stand_ins=int(max(0.0, newer.stand_ins - older.stand_ins)),
        external_calls=int(external.count),
        external_p50_ms=_ms(external.quantile(0.5)),
        external_p99_ms=_ms(external.quantile(0.99)),
        wal_fsyncs=int(wal.count),
        wal_fsync_p99_ms=_ms(wal.quantile(0.99)),
    )


def baseline(samples: Iterable[Sample], now: Sample, window_s: float = RATE_WINDOW_S) -> Sample | None:
    """The newest stored sample at least `window_s` before `now`, else the oldest one stored."""
    oldest = None
    chosen = None
    for sample in samples:
        if oldest is None:
            oldest = sample
        if now.at_s - sample.at_s >= window_s:
            chosen = sample
    return chosen or oldest


def chart_points(samples: Iterable[Sample], now: Sample | None = None) -> tuple[ChartPoint, ...]:
    """One point per interval between consecutive samples (and from the last one to `now`)."""
    readings = list(samples)
    if now is not None and (not readings or now.at_s - readings[-1].at_s >= RATE_WINDOW_S_MIN):
        readings.append(now)
    points = []
    for older, newer in zip(readings, readings[1:], strict=False):
        seconds = newer.at_s - older.at_s
        if seconds <= 0:
            continue
        rate = max(0.0, newer.authorizations - older.authorizations) / seconds
        p99 = newer.latency.minus(older.latency).quantile(0.99)
        points.append(ChartPoint(newer.wall_s, rate, _ms(p99)))
    return tuple(points)


def dashboard_of(samples: Iterable[Sample], now: Sample) -> Dashboard:
    stored = list(samples)
    older = baseline(stored, now)
    window = window_between(older, now) if older is not None else None
    return Dashboard(now=now, window=window, chart=chart_points(stored, now))


# -- reading the registry --------------------------------------------------------------------------


def _histogram(buckets: dict[float, float]) -> Histo:
    bounds = tuple(sorted(buckets))
    return Histo(bounds, tuple(buckets[bound] for bound in bounds))


def read_sample(registry, *, clock: Callable[[], float] = time.monotonic,
                wall_clock: Callable[[], float] = time.time) -> Sample:
    """Read the dashboard's series from a prometheus_client registry (absent series: zero/None)."""
    codes: dict[str, float] = {}
    other = 0.0
    buckets: dict[str, dict[float, float]] = {name: {} for name in HISTOGRAMS}
    scalars: dict[str, float] = {}
    for family in registry.restricted_registry(SAMPLE_NAMES).collect():
        for sample in family.samples:
            name = sample.name
            if name == REQUESTS:
                if sample.labels.get("mti") in AUTHORIZATION_MTIS:
                    code = sample.labels.get("code", "other")
                    codes[code] = codes.get(code, 0.0) + sample.value
                else:
                    other += sample.value
            elif name.endswith("_bucket") and name[:-len("_bucket")] in buckets:
                series = buckets[name[:-len("_bucket")]]
                bound = float(sample.labels["le"])
                series[bound] = series.get(bound, 0.0) + sample.value  # summed over partners
            else:
                scalars[name] = scalars.get(name, 0.0) + sample.value
    return Sample(
        at_s=clock(), wall_s=wall_clock(), codes=codes, other_requests=other,
        latency=_histogram(buckets[LATENCY]), stand_ins=scalars.get(STAND_INS, 0.0),
        external=_histogram(buckets[EXTERNAL]), wal_fsync=_histogram(buckets[WAL_FSYNC]),
        outbox_pending=scalars.get(OUTBOX_PENDING), dead_letters=scalars.get(DEAD_LETTERS),
        in_flight=scalars.get(IN_FLIGHT, 0.0), connections=scalars.get(CONNECTIONS, 0.0),
    )


class DashboardSampler:
    """At most `samples_max` readings, one every `interval_s` while `run` runs."""

    def __init__(self, metrics, *, interval_s: float = SAMPLE_INTERVAL_S, samples_max: int = SAMPLES_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert interval_s > 0 and samples_max >= 2
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self.samples: collections.deque[Sample] = collections.deque(maxlen=samples_max)

    def read(self) -> Sample:
        return read_sample(self.metrics.registry, clock=self.clock)

    def record(self) -> Sample:
        sample = self.read()
        assert not self.samples or sample.at_s >= self.samples[-1].at_s
        self.samples.append(sample)
        return sample

    def dashboard(self) -> Dashboard:
        """The figures now: a fresh reading against the stored ones (nothing is stored by a page)."""
        return dashboard_of(self.samples, self.read())

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.record()
        task_status.started()
        while True:
            await trio.sleep(self.interval_s)
            self.record()


# One sampler per Metrics (the server's run_services starts its task; the panel reads it). Weak:
# a Metrics of a finished server (tests start many) takes its samples with it.
_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sampler_for(metrics) -> DashboardSampler:
    found = _SAMPLERS.get(metrics)
    if found is None:
        found = _SAMPLERS[metrics] = DashboardSampler(metrics)
    return found
