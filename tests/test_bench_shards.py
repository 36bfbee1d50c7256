"""bench.shards: how a pair of processes' step is combined (never flattering), its argument checks,
and (slow) a real run of one and two `authsrv serve` processes."""

from __future__ import annotations

import json

import pytest

from bench import shards
from simulators.network.report import LatencySummary, LoadReport


def _latency(p50: float, p99: float) -> LatencySummary:
    return LatencySummary(count=100, p50_ms=p50, p90_ms=p50, p99_ms=p99, p999_ms=p99 * 2, max_ms=p99 * 3,
                          mean_ms=p50)  # fmt: skip


def _report(rate: float, answered: int, p50: float, p99: float, codes: dict[str, int]) -> LoadReport:
    return LoadReport(
        target="127.0.0.1:1", offered_rate_per_s=rate, sent_rate_per_s=rate, achieved_rate_per_s=rate,
        schedule_s=1.0, elapsed_s=1.0, connections=4, planned=answered, sent=answered, answered=answered,
        timeouts=0, lost=0, unsent=0, late_responses=0, unmatched_responses=0, undecodable_responses=0,
        mismatches=0, aborted=False, send_lag=_latency(0.1, 0.2), connection_errors=[],
        latency=_latency(p50, p99), service_time=_latency(p50, p99), codes=codes, kinds={}, mismatch_detail={},
    )  # fmt: skip


def test_a_pair_step_sums_counts_and_takes_the_worse_percentiles() -> None:
    step = shards._combined(
        [_report(500, 5000, 1.0, 4.0, {"00": 4000, "51": 1000}), _report(500, 5000, 2.0, 12.0, {"00": 5000})],
        server_cpu_s=6.0, client_cpu_s=1.0, wall_s=10.0,
    )  # fmt: skip
    assert step.offered_rate_per_s == 1000 and step.achieved_rate_per_s == 1000 and step.answered == 10_000
    assert step.p50_ms == 2.0 and step.p99_ms == 12.0 and step.p999_ms == 24.0 and step.max_ms == 36.0
    assert step.code_mix == {"00": 9000, "51": 1000}
    assert step.cpu_s_per_1000 == 0.6


@pytest.mark.parametrize("argv", [["--rates", "abc"], ["--rates", "0"], ["--step-seconds", "0"],
                                  ["--users", "3"], ["--connections", "1"]])  # fmt: skip
def test_bad_arguments_exit_2_with_a_message(argv, capsys) -> None:
    assert shards.main(argv) == 2
    assert "bench.shards:" in capsys.readouterr().err


@pytest.mark.slow
def test_one_and_two_processes_run_and_verify(tmp_path) -> None:
    out = tmp_path / "shards.json"
    assert shards.main(["--rates", "100,200", "--step-seconds", "2", "--users", "400", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["one_process"]) == 2 and len(result["two_processes"]) == 2
    assert result["ledger_verify_exit_codes"] == [0, 0, 0]
    assert all(step["answered"] > 0 for step in result["one_process"] + result["two_processes"])
