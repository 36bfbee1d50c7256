"""The benchmark harness: a quick run against the baseline server, and its pure decision rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness import (
    BenchConfig,
    BenchResults,
    Step,
    TargetResult,
    compute_ratios,
    load_results,
    machine_info,
    overload_reason,
    summary,
    sustained_rate,
    write_results,
)
from simulators.network.target import process_cpu_s

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_step(rate: float, *, p99_ms: float = 2.0, achieved: float | None = None, cpu: float | None = 0.2,
              timeouts: int = 0) -> Step:  # fmt: skip
    achieved = rate if achieved is None else achieved
    return Step(
        offered_rate_per_s=rate, achieved_rate_per_s=achieved, sent=int(rate), answered=int(achieved),
        timeouts=timeouts, lost=0, mismatches=0, p50_ms=p99_ms / 4, p90_ms=p99_ms / 2, p99_ms=p99_ms,
        p999_ms=p99_ms * 2, max_ms=p99_ms * 3, service_p99_ms=p99_ms, send_lag_p99_ms=0.1,
        code_mix={"00": int(achieved)}, server_cpu_s=1.0, cpu_s_per_1000=cpu, client_cpu_share=0.3,
        client_saturated=False,
    )  # fmt: skip


def test_quick_bench_against_the_baseline_writes_sane_json_and_png(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--targets", "baseline", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 20
    results = json.loads((tmp_path / "latest.json").read_text())
    assert load_results(tmp_path / "latest.json").targets["baseline"].name == "baseline"  # schema round trip
    assert results["machine"]["cores"] >= 1 and results["machine"]["python"].startswith("3.")
    baseline = results["targets"]["baseline"]
    assert baseline["error"] is None and baseline["server_exit_code"] == 0  # SIGTERM -> clean exit
    assert [step["offered_rate_per_s"] for step in baseline["steps"]] == [300.0, 600.0]
    for step in baseline["steps"]:
        assert step["achieved_rate_per_s"] >= 0.9 * step["offered_rate_per_s"]
        assert step["answered"] == step["sent"] and step["timeouts"] == 0
        assert sum(step["code_mix"].values()) == step["answered"] and step["code_mix"].get("00") == step["answered"]
        assert 0 < step["p50_ms"] <= step["p99_ms"] <= step["p999_ms"] <= step["max_ms"] < 5000
        assert 0 < step["cpu_s_per_1000"] < 5  # the baseline spends well under 5 ms per message
        assert 0 < step["client_cpu_share"] < 1.5
    assert baseline["sustained_rate_per_s"] in (None, 300.0, 600.0)
    assert results["ratios"] is None  # one target: nothing to compare
    png = (tmp_path / "latest.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert "baseline" in done.stdout and "latest.json" in done.stdout


def test_stepping_stops_on_latency_or_throughput_and_picks_the_sustained_rate() -> None:
    config = BenchConfig()
    assert overload_reason(make_step(1000), config) is None
    assert "p99" in overload_reason(make_step(2000, p99_ms=51), config)
    assert "achieved" in overload_reason(make_step(4000, achieved=3500), config)
    steps = [make_step(1000, p99_ms=3), make_step(2000, p99_ms=9.9), make_step(4000, p99_ms=12),
             make_step(6000, p99_ms=5, timeouts=1)]  # fmt: skip
    assert sustained_rate(steps, config) == 2000
    assert sustained_rate([make_step(1000, p99_ms=11)], config) is None


def test_ratios_compare_the_rates_both_targets_ran() -> None:
    ours = TargetResult(name="authsrv", steps=[make_step(1000, cpu=0.6, p99_ms=4), make_step(2000, cpu=0.5)],
                        sustained_rate_per_s=2000, stop_reason="p99")  # fmt: skip
    floor = TargetResult(name="baseline", steps=[make_step(1000, cpu=0.2, p99_ms=2)], sustained_rate_per_s=8000,
                         stop_reason="all rates offered")  # fmt: skip
    ratios = compute_ratios({"authsrv": ours, "baseline": floor})
    assert ratios.sustained_rate == 0.25
    assert len(ratios.per_rate) == 1 and ratios.per_rate[0].cpu_s_per_1000 == 3.0 and ratios.per_rate[0].p99 == 2.0
    assert compute_ratios({"authsrv": ours}) is None


def test_results_with_both_targets_plot_and_summarise(tmp_path: Path) -> None:
    targets = {
        "authsrv": TargetResult(name="authsrv", steps=[make_step(1000), make_step(2000, p99_ms=60)],
                                sustained_rate_per_s=1000, stop_reason="p99"),
        "baseline": TargetResult(name="baseline", steps=[], sustained_rate_per_s=None, stop_reason="not started",
                                 error="baseline server exited with 1\ntraceback..."),
    }  # fmt: skip
    results = BenchResults(created_utc="2026-01-01T00:00:00+00:00", machine=machine_info(), settings={},
                           targets=targets, ratios=compute_ratios(targets))  # fmt: skip
    write_results(results, tmp_path / "out")
    assert (tmp_path / "out" / "latest.png").read_bytes().startswith(PNG_SIGNATURE)
    text = summary(results)
    assert "sustained with p99 < 10 ms: 1,000/s" in text and "error: baseline server exited with 1" in text


def test_bench_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        BenchConfig(rates=(2000.0, 1000.0))
    with pytest.raises(ValueError):
        BenchConfig(targets=("nginx",))
    with pytest.raises(ValueError):
        BenchConfig(step_seconds=0)
    assert BenchConfig.quick_preset().quick


def test_process_cpu_reads_proc_stat() -> None:
    before = process_cpu_s(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # bounded: 50 ms of CPU
        pass
    assert process_cpu_s(os.getpid()) - before >= 0.03


@pytest.mark.slow
def test_quick_bench_against_authsrv_and_the_baseline(tmp_path: Path) -> None:
    """`make bench` in miniature, with the real server: both targets measured and compared."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = load_results(tmp_path / "latest.json")
    ours = results.targets["authsrv"]
    assert ours.error is None and ours.server_exit_code == 0 and ours.ledger_verify_exit_code == 0
    assert len(ours.steps) == 2 and all(step.answered == step.sent for step in ours.steps)
    assert all(step.cpu_s_per_1000 and step.cpu_s_per_1000 > 0 for step in ours.steps)
    assert results.ratios is not None and len(results.ratios.per_rate) == 2
