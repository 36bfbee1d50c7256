"""The memory soak (bench/soak.py): its flatness rule, and a short real soak (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.soak import (
    MIB,
    RSS_GROWTH_BYTES_FLOOR,
    RssSample,
    SoakConfig,
    load_results,
    read_rss_bytes,
    rss_verdict,
)

REPO = Path(__file__).resolve().parent.parent
SOAK_SECONDS = 20


def sample(phase: str, elapsed_s: float, rss_mib: float, holds: float | None = None) -> RssSample:
    gauges = {} if holds is None else {"holds_pending": holds}
    return RssSample(phase=phase, elapsed_s=elapsed_s, rss_bytes=int(rss_mib * MIB), gauges=gauges)


def test_growth_is_measured_from_the_first_sample_after_the_warm_up() -> None:
    samples = [sample("start", 0, 50), sample("warmup", 10, 150), sample("soak", 30, 200, holds=1000),
               sample("soak", 90, 210), sample("end", 150, 215, holds=3000)]  # fmt: skip
    verdict = rss_verdict(samples)
    assert verdict.first_bytes == 200 * MIB and verdict.last_bytes == 215 * MIB
    assert verdict.growth_bytes == 15 * MIB and verdict.peak_bytes == 215 * MIB
    assert verdict.growth_mib_per_min == pytest.approx(7.5)
    assert verdict.bound_bytes == RSS_GROWTH_BYTES_FLOOR  # 5% of 200 MiB is under the 20 MiB floor
    assert verdict.flat is True
    assert verdict.growth_bytes_per_hold_added == pytest.approx(15 * MIB / 2000, abs=0.1)


def test_growth_past_the_bound_is_not_flat_and_large_heaps_get_a_proportional_bound() -> None:
    assert rss_verdict([sample("soak", 0, 100), sample("end", 60, 121)]).flat is False  # 21 MiB > 20 MiB
    big = rss_verdict([sample("soak", 0, 1000), sample("end", 60, 1049)])
    assert big.bound_bytes == 50 * MIB and big.flat is True  # 5% of 1000 MiB
    assert rss_verdict([sample("soak", 0, 1000), sample("end", 60, 1051)]).flat is False


def test_too_few_samples_after_the_warm_up_give_no_verdict() -> None:
    verdict = rss_verdict([sample("start", 0, 50), sample("warmup", 5, 60), sample("soak", 10, 61)])
    assert verdict.flat is None and verdict.growth_bytes is None


def test_rss_is_read_from_proc_status() -> None:
    rss = read_rss_bytes(os.getpid())
    assert 10 * MIB < rss < 8 * 1024 * MIB  # this interpreter with pytest loaded
    ballast = bytearray(64 * MIB)  # touched pages count in RSS, reserved ones do not
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    assert read_rss_bytes(os.getpid()) >= rss + 48 * MIB
    del ballast


@pytest.mark.parametrize(
    "settings",
    [{"duration_s": 3601}, {"duration_s": 0}, {"rate_per_s": 0}, {"sample_s": 0.1}, {"users": 0}, {"warmup_s": -1}],
)
def test_config_bounds(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SoakConfig(**{"rate_per_s": 100.0, "duration_s": 60.0, **settings})


@pytest.mark.slow
def test_short_soak_reports_every_field_answers_every_request_and_stops_cleanly(tmp_path: Path) -> None:
    # A short run cannot judge flatness: the state the traffic builds (pending holds, journal
    # records) is still growing towards its steady size, so only the report's shape is asserted.
    out = tmp_path / "soak.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--rate", "100", "--duration", str(SOAK_SECONDS), "--users", "2000",
         "--warmup-seconds", "2", "--sample-seconds", "2", "--connections", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert time.monotonic() - started < 90
    assert "memory flat: " in done.stdout and "p99.9" in done.stdout
    results = load_results(out)  # schema round trip
    raw = json.loads(out.read_text())
    assert {"created_utc", "machine", "settings", "soak", "rss_samples", "rss", "server_exit_code",
            "ledger_verify_exit_code"} <= raw.keys()  # fmt: skip
    assert results.error is None and results.server_exit_code == 0 and results.ledger_verify_exit_code == 0
    soak = results.soak
    assert soak is not None and soak.mismatches == 0 and soak.timeouts == 0 and soak.lost == 0
    assert soak.sent == 100 * SOAK_SECONDS and soak.answered == soak.sent
    assert soak.achieved_rate_per_s >= 90
    assert 0 < soak.p50_ms <= soak.p99_ms <= soak.p999_ms <= soak.max_ms
    assert sum(soak.code_mix.values()) == soak.answered and soak.code_mix.get("00", 0) > soak.answered // 2
    phases = [sample.phase for sample in results.rss_samples]
    assert phases[0] == "start" and phases[-1] == "end" and "warmup" in phases
    assert phases.count("soak") >= SOAK_SECONDS // 2 - 1
    elapsed = [sample.elapsed_s for sample in results.rss_samples]
    assert elapsed == sorted(elapsed)
    assert all(20 * MIB < sample.rss_bytes < 4096 * MIB for sample in results.rss_samples)
    assert results.rss.flat is not None and results.rss.growth_bytes is not None
    assert results.rss.last_bytes == results.rss_samples[-1].rss_bytes
    # The gauges came from /metrics: pending holds rise with the approvals (no clearing in the mix).
    last_gauges = results.rss_samples[-1].gauges
    assert last_gauges.get("holds_pending", 0) > 0 and last_gauges.get("journal_records", 0) > 0
