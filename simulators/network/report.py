"""The result of one load run: counts, rates, latency percentiles, mismatches. No card data."""

from __future__ import annotations

import hdrh.histogram
import msgspec

LATENCY_US_MIN = 1  # histogram range and precision: 1 us .. 60 s, 3 significant digits
LATENCY_US_MAX = 60_000_000
LATENCY_DIGITS = 3


RECORDER_DISTINCT_MAX = 20_000  # distinct values buffered before a flush into the histogram


def new_histogram() -> hdrh.histogram.HdrHistogram:
    return hdrh.histogram.HdrHistogram(LATENCY_US_MIN, LATENCY_US_MAX, LATENCY_DIGITS)


class Recorder:
    """An HdrHistogram behind a dict of counts per value.

    hdrh's `record_value` is pure Python (about 3-5 us here). Values are floored to 3 significant
    decimal digits first (the precision the histogram keeps anyway), which leaves a few thousand
    distinct values at most; they are counted here and flushed into the histogram with counts."""

    def __init__(self) -> None:
        self._histogram = new_histogram()
        self._pending: dict[int, int] = {}
        self.count = 0
        self.total_us = 0  # of the floored values: hdrh's own mean walks every bucket, this is free

    def record_s(self, seconds: float) -> None:
        """Record a duration in seconds (clamped to the histogram's 1 us .. 60 s)."""
        value_us = int(seconds * 1_000_000)
        if value_us < 1_000:
            value_us = value_us if value_us > LATENCY_US_MIN else LATENCY_US_MIN
        elif value_us < 10_000:
            value_us -= value_us % 10
        elif value_us < 100_000:
            value_us -= value_us % 100
        elif value_us < 1_000_000:
            value_us -= value_us % 1_000
        else:
            value_us = min(value_us - value_us % 10_000, LATENCY_US_MAX)
        self.count += 1
        self.total_us += value_us
        pending = self._pending
        pending[value_us] = pending.get(value_us, 0) + 1
        if len(pending) > RECORDER_DISTINCT_MAX:
            self._flush()

    @property
    def histogram(self) -> hdrh.histogram.HdrHistogram:
        self._flush()
        return self._histogram

    def _flush(self) -> None:
        for value_us, count in self._pending.items():
            recorded = self._histogram.record_value(value_us, count)
            assert recorded, value_us
        self._pending.clear()


class LatencySummary(msgspec.Struct, frozen=True, kw_only=True):
    """Milliseconds. `count` values recorded; all zero when there were none."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def from_recorder(cls, recorder: Recorder) -> LatencySummary:
        histogram = recorder.histogram
        count = histogram.get_total_count()
        assert count == recorder.count, (count, recorder.count)
        if count == 0:
            return cls(count=0, p50_ms=0.0, p90_ms=0.0, p99_ms=0.0, p999_ms=0.0, max_ms=0.0, mean_ms=0.0)
        values = histogram.get_percentile_to_value_dict([50, 90, 99, 99.9])

        def ms(value_us: float) -> float:
            return round(value_us / 1000, 3)

        return cls(
            count=count,
            p50_ms=ms(values[50]),
            p90_ms=ms(values[90]),
            p99_ms=ms(values[99]),
            p999_ms=ms(values[99.9]),
            max_ms=ms(histogram.get_max_value()),
            mean_ms=ms(recorder.total_us / count),
        )


class KindCounts(msgspec.Struct, frozen=True, kw_only=True):
    sent: int
    answered: int
    timeouts: int
    lost: int  # in flight when the connection broke
    mismatches: int
    codes: dict[str, int]  # field 39 value -> responses
    expected: list[str]  # field 39 values this kind expects (empty: no expectation)


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `run_load` measured. Latency counts from the INTENDED send time of each request on the
    open-loop schedule (or from its actual send, if that was earlier), so a server stall is charged
    to every request it delayed (no coordinated omission); `service_time` counts from the actual
    send, for comparison only."""

    target: str
    offered_rate_per_s: float
    sent_rate_per_s: float
    achieved_rate_per_s: float  # answered / (schedule, or until the last answer if that is later)
    schedule_s: float  # length of the open-loop send schedule
    elapsed_s: float  # first intended send to the end of the run (drain included)
    connections: int
    planned: int  # authorization requests on the schedule
    sent: int
    answered: int
    timeouts: int
    lost: int
    unsent: int  # scheduled but never sent (connection broken, or the run's time bound hit)
    late_responses: int  # arrived after their timeout
    unmatched_responses: int  # fields 11 + 37 matched nothing in flight
    undecodable_responses: int
    mismatches: int
    aborted: bool  # the run hit its overall time bound
    send_lag: LatencySummary  # actual send behind intended send (client-side timer lag, backlog)
    connection_errors: list[str]
    latency: LatencySummary
    service_time: LatencySummary
    codes: dict[str, int]  # field 39 over all authorization traffic (management excluded)
    kinds: dict[str, KindCounts]
    mismatch_detail: dict[str, dict[str, int]]  # kind -> "expected->got" -> count

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    def render(self) -> str:
        return "\n".join(_render_lines(self))


def _render_lines(report: LoadReport) -> list[str]:
    lines = [
        f"target {report.target}  connections {report.connections}  schedule {report.schedule_s:.1f} s"
        f"  elapsed {report.elapsed_s:.1f} s{'  ABORTED (time bound)' if report.aborted else ''}",
        f"rate/s  offered {report.offered_rate_per_s:,.0f}  sent {report.sent_rate_per_s:,.0f}"
        f"  achieved {report.achieved_rate_per_s:,.0f}",
        f"requests  planned {report.planned}  sent {report.sent}  answered {report.answered}"
        f"  timeouts {report.timeouts}  lost {report.lost}  unsent {report.unsent}",
        f"responses  late {report.late_responses}  unmatched {report.unmatched_responses}"
        f"  undecodable {report.undecodable_responses}",
        _render_latency("latency (from intended send)", report.latency),
        _render_latency("service time (from actual send)", report.service_time),
        _render_latency("send lag (actual - intended)", report.send_lag),
        "",
        f"{'kind':<17}{'sent':>8}{'answered':>10}{'timeouts':>10}{'mismatch':>10}  expect  codes",
    ]
    for name, counts in report.kinds.items():
        codes = " ".join(f"{code}:{count}" for code, count in sorted(counts.codes.items()))
        expected = ",".join(counts.expected) or "-"
        lines.append(
            f"{name:<17}{counts.sent:>8}{counts.answered:>10}{counts.timeouts:>10}"
            f"{counts.mismatches:>10}  {expected:<6}  {codes}"
        )
    codes = " ".join(f"{code}:{count}" for code, count in sorted(report.codes.items()))
    lines += ["", f"response codes (authorizations): {codes or '-'}", f"mismatches: {report.mismatches}"]
    for kind, detail in report.mismatch_detail.items():
        lines.append(f"  {kind}: " + ", ".join(f"{pair} x{count}" for pair, count in sorted(detail.items())))
    for error in report.connection_errors:
        lines.append(f"connection error: {error}")
    return lines


def _render_latency(label: str, summary: LatencySummary) -> str:
    return (
        f"{label}: n={summary.count}  p50 {summary.p50_ms:.3f}  p90 {summary.p90_ms:.3f}"
        f"  p99 {summary.p99_ms:.3f}  p99.9 {summary.p999_ms:.3f}  max {summary.max_ms:.3f} ms"
    )
