"""The benchmark harness: a quick run against the floor server, and its pure decision rules."""

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


def test_quick_bench_against_the_floor_writes_sane_json_and_png(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--targets", "floor", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 20
    results = json.loads((tmp_path / "latest.json").read_text())
    assert load_results(tmp_path / "latest.json").targets["floor"].name == "floor"  # schema round trip
    assert results["machine"]["cores"] >= 1 and results["machine"]["python"].startswith("3.")
    floor = results["targets"]["floor"]
    assert floor["error"] is None and floor["server_exit_code"] == 0  # SIGTERM -> clean exit
    assert [step["offered_rate_per_s"] for step in floor["steps"]] == [100.0, 300.0, 600.0]
    for step in floor["steps"]:
        assert step["achieved_rate_per_s"] >= 0.9 * step["offered_rate_per_s"]
        assert step["answered"] == step["sent"] and step["timeouts"] == 0
        assert sum(step["code_mix"].values()) == step["answered"] and step["code_mix"].get("00") == step["answered"]
        assert 0 < step["p50_ms"] <= step["p99_ms"] <= step["p999_ms"] <= step["max_ms"] < 5000
        assert 0 < step["cpu_s_per_1000"] < 5  # the floor spends well under 5 ms per message
        assert 0 < step["client_cpu_share"] < 1.5
    assert floor["sustained_rate_per_s"] in (None, 100.0, 300.0, 600.0)
    assert results["ratios"] is None and results["floor_ratios"] is None  # one target: nothing to compare
    assert results["baseline"] == "postgres" and results["external_ratios"] == {}
    assert "postgres_ratios" not in results
    assert floor["external"] is None
    png = (tmp_path / "latest.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert "floor" in done.stdout and "latest.json" in done.stdout


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
    floor = TargetResult(name="floor", steps=[make_step(1000, cpu=0.2, p99_ms=2)], sustained_rate_per_s=8000,
                         stop_reason="all rates offered")  # fmt: skip
    ratios = compute_ratios({"authsrv": ours, "floor": floor}, "authsrv", "floor")
    assert ratios.sustained_rate == 0.25
    assert len(ratios.per_rate) == 1 and ratios.per_rate[0].cpu_s_per_1000 == 3.0 and ratios.per_rate[0].p99 == 2.0
    assert compute_ratios({"authsrv": ours, "floor": floor}) is None  # the default divisor is the baseline
    assert compute_ratios({"authsrv": ours}, "authsrv", "floor") is None
    skipped = TargetResult(name="postgres", steps=[], sustained_rate_per_s=None, stop_reason="skipped: no initdb")
    assert compute_ratios({"authsrv": ours, "postgres": skipped}) is None


def test_summary_names_both_comparisons() -> None:
    ours = TargetResult(name="authsrv", steps=[make_step(1000, cpu=0.6)], sustained_rate_per_s=1000,
                        stop_reason="all rates offered")  # fmt: skip
    floor = TargetResult(name="floor", steps=[make_step(1000, cpu=0.2)], sustained_rate_per_s=1000,
                         stop_reason="all rates offered")  # fmt: skip
    postgres = TargetResult(name="postgres", steps=[make_step(1000, cpu=1.2)], sustained_rate_per_s=500,
                            stop_reason="p99")  # fmt: skip
    targets = {"authsrv": ours, "floor": floor, "postgres": postgres}
    results = BenchResults(created_utc="2026-01-01T00:00:00+00:00", machine=machine_info(), settings={},
                           targets=targets, ratios=compute_ratios(targets),
                           floor_ratios=compute_ratios(targets, "authsrv", "floor"))  # fmt: skip
    text = summary(results)
    assert "authsrv / postgres (baseline) sustained rate: 2.0" in text
    assert "authsrv / floor (codec + transport only) sustained rate: 1.0" in text
    assert "cpu/1000 x0.5" in text and "cpu/1000 x3.0" in text
    without_postgres = BenchResults(created_utc="2026-01-01T00:00:00+00:00", machine=machine_info(), settings={},
                                    targets={"authsrv": ours, "floor": floor}, ratios=None,
                                    floor_ratios=results.floor_ratios)  # fmt: skip
    assert "authsrv / postgres (baseline): not compared (postgres did not run)" in summary(without_postgres)


def test_results_with_both_targets_plot_and_summarise(tmp_path: Path) -> None:
    targets = {
        "authsrv": TargetResult(name="authsrv", steps=[make_step(1000), make_step(2000, p99_ms=60)],
                                sustained_rate_per_s=1000, stop_reason="p99"),
        "floor": TargetResult(name="floor", steps=[], sustained_rate_per_s=None, stop_reason="not started",
                              error="floor server exited with 1\ntraceback..."),
    }  # fmt: skip
    results = BenchResults(created_utc="2026-01-01T00:00:00+00:00", machine=machine_info(), settings={},
                           targets=targets, ratios=compute_ratios(targets))  # fmt: skip
    write_results(results, tmp_path / "out")
    assert (tmp_path / "out" / "latest.png").read_bytes().startswith(PNG_SIGNATURE)
    text = summary(results)
    assert "sustained with p99 < 10 ms: 1,000/s" in text and "error: floor server exited with 1" in text


def test_latency_plot_draws_the_p99_bound_of_the_knee_search() -> None:
    """A dashed line on the p99 panel at BenchConfig.sustain_p99_ms (the run's setting when it has one)."""
    from bench.plot import latency_figure, plt

    steps = [make_step(1000, p99_ms=4), make_step(2000, p99_ms=60)]
    for settings, bound in (({}, BenchConfig().sustain_p99_ms), ({"sustain_p99_ms": 25.0}, 25.0)):
        results = BenchResults(
            created_utc="2026-01-01T00:00:00+00:00", machine=machine_info(), settings=settings,
            targets={"authsrv": TargetResult(name="authsrv", steps=steps, sustained_rate_per_s=1000, stop_reason="p99")},
            ratios=None,
        )  # fmt: skip
        figure = latency_figure(results)
        try:
            p99_panel, p50_panel = figure.axes
            bounds = [line for line in p99_panel.get_lines() if line.get_label() == f"p99 bound {bound:g} ms"]
            assert len(bounds) == 1 and bounds[0].get_linestyle() == "--"
            assert list(bounds[0].get_ydata()) == [bound, bound]
            legend = [text.get_text() for text in p99_panel.get_legend().get_texts()]
            assert f"p99 bound {bound:g} ms" in legend
            assert not any("bound" in str(line.get_label()) for line in p50_panel.get_lines())
            assert f"p99 < {bound:g} ms" in summary(results)
        finally:
            plt.close(figure)


def test_bench_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        BenchConfig(rates=(2000.0, 1000.0))
    with pytest.raises(ValueError):
        BenchConfig(targets=("baseline",))  # the old name of the floor: postgres is the baseline now
    rates = BenchConfig().rates
    assert rates[0] == 250.0 and rates[-1] >= 8000.0 and 8000.0 in rates and list(rates) == sorted(rates)
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
def test_quick_bench_against_authsrv_and_the_floor(tmp_path: Path) -> None:
    """`make bench` in miniature, with the real server: both targets measured and compared."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = load_results(tmp_path / "latest.json")
    ours = results.targets["authsrv"]
    assert ours.error is None and ours.server_exit_code == 0 and ours.ledger_verify_exit_code == 0
    assert len(ours.steps) == 3 and all(step.answered == step.sent for step in ours.steps)
    assert all(step.cpu_s_per_1000 and step.cpu_s_per_1000 > 0 for step in ours.steps)
    assert results.floor_ratios is not None and len(results.floor_ratios.per_rate) == 3
    ran = [name for name in ("postgres", "postgres-fn") if results.targets[name].steps]
    assert results.baseline == (max(ran, key=lambda name: (results.targets[name].sustained_rate_per_s or 0,
                                                           len(results.targets[name].steps))) if ran else "postgres")
    assert (results.ratios is None) == (not ran) and set(results.baseline_ratios) == set(ran)
    for name in ("external-5ms", "external-timeout"):
        external = results.targets[name]
        assert external.error is None and external.server_exit_code == 0 and external.ledger_verify_exit_code == 0
        assert [step.offered_rate_per_s for step in external.steps] == [100.0]  # under EXTERNAL_RATE_MAX
        assert external.external is not None and sum(external.external.calls.values()) > 0
        assert [ratio.offered_rate_per_s for ratio in results.external_ratios[name].per_rate] == [100.0]
    assert results.targets["external-5ms"].external.calls.get("approved", 0) > 0
    timeout = results.targets["external-timeout"].external
    assert set(timeout.calls) == {"timed_out"} and timeout.stand_in.get("decline") == timeout.calls["timed_out"]
    assert results.targets["external-timeout"].steps[0].code_mix.get("91", 0) > 0


# -- external-balance targets (issue 5) ------------------------------------------------------------


def test_external_targets_get_capped_rates_and_their_own_stop_line() -> None:
    from bench.harness import EXTERNAL_RATE_MAX, ISO_BUDGET_MS, TARGETS, p99_stop_ms, target_rates

    assert set(TARGETS) == {"authsrv", "floor", "external-5ms", "external-timeout", "postgres", "postgres-fn", "cluster"}
    config = BenchConfig()
    assert target_rates("authsrv", config) == config.rates == target_rates("floor", config)
    assert target_rates("external-5ms", config) == (100.0, 250.0) == target_rates("external-timeout", config)
    assert all(rate <= EXTERNAL_RATE_MAX for rate in target_rates("external-5ms", config))
    assert target_rates("external-5ms", BenchConfig.quick_preset()) == (100.0,)
    assert target_rates("external-5ms", BenchConfig(rates=(4000.0,))) == (EXTERNAL_RATE_MAX,)  # never none
    assert p99_stop_ms("external-timeout", config) == config.p99_stop_ms + ISO_BUDGET_MS
    assert p99_stop_ms("external-5ms", config) == config.p99_stop_ms == p99_stop_ms("authsrv", config)
    slow = make_step(100, p99_ms=240)  # every debit waits out the budget: that is the scenario
    assert overload_reason(slow, config, p99_stop_ms("external-timeout", config)) is None
    assert "p99" in overload_reason(slow, config, p99_stop_ms("external-5ms", config))


def test_bench_config_accepts_external_targets_only_by_name() -> None:
    assert BenchConfig(targets=("external-5ms",)).targets == ("external-5ms",)
    with pytest.raises(ValueError):
        BenchConfig(targets=("external-1ms",))


def test_external_ratios_are_against_the_internal_run() -> None:
    from bench.harness import compute_external_ratios

    internal = TargetResult(name="authsrv", steps=[make_step(100, cpu=1.0, p99_ms=4), make_step(250, cpu=1.0)],
                            sustained_rate_per_s=250, stop_reason="all rates offered")  # fmt: skip
    fast = TargetResult(name="external-5ms", steps=[make_step(100, cpu=3.0, p99_ms=20)],
                        sustained_rate_per_s=None, stop_reason="p99")  # fmt: skip
    targets = {"authsrv": internal, "external-5ms": fast}
    ratios = compute_external_ratios(targets)
    assert list(ratios) == ["external-5ms"]
    assert (ratios["external-5ms"].per_rate[0].cpu_s_per_1000, ratios["external-5ms"].per_rate[0].p99) == (3.0, 5.0)
    assert ratios["external-5ms"].sustained_rate is None
    assert compute_external_ratios({"external-5ms": fast}) == {}  # no internal run: nothing to compare
    results = BenchResults(created_utc="2026-01-01T00:00:00+00:00", machine=machine_info(), settings={},
                           targets=targets, ratios=None, external_ratios=ratios)  # fmt: skip
    assert "external-5ms / authsrv sustained rate: None" in summary(results)


def test_old_results_without_external_fields_still_load(tmp_path: Path) -> None:
    old = REPO / "tests" / "data" / "bench-results-before-external.json"  # a results file from before
    raw = json.loads(old.read_text())
    raw.pop("external_ratios", None)
    for target in raw["targets"].values():
        target.pop("external", None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    loaded = load_results(path)
    assert loaded.external_ratios == {} and all(target.external is None for target in loaded.targets.values())


def test_partner_table_is_replaced_in_place() -> None:
    from authsrv.config import PartnerConfig, decode_config, render_default_config
    from bench.external import replace_partner_table

    text = render_default_config({"demo": PartnerConfig(), "ext": PartnerConfig(), "zed": PartnerConfig()})
    updated = replace_partner_table(text, "ext", PartnerConfig(balance_mode="external", api_url="http://127.0.0.1:1"))
    config = decode_config(updated.encode())
    assert config.partners["ext"].balance_mode == "external" and config.partners["ext"].api_url == "http://127.0.0.1:1"
    assert config.partners["demo"] == PartnerConfig() == config.partners["zed"]  # neighbours untouched
    assert updated.split("[partners.ext]")[0] == text.split("[partners.ext]")[0]
    with pytest.raises(Exception, match="0 \\[partners.nobody\\] tables"):
        replace_partner_table(text, "nobody", PartnerConfig())


def test_collateral_covers_the_balances_and_one_over_balance_attempt() -> None:
    from bench.external import collateral_per_user
    from simulators.network.mix import Amounts

    over = Amounts().over_balance_minor
    for users in (1, 7, 100, 1_000, 20_000):
        per_user = collateral_per_user(users, 1_000_000)
        assert per_user * users >= users * 1_000_000 + over
        assert per_user * users < users * 1_000_000 + over + users  # rounded up, no more


def test_external_figures_from_the_servers_metrics_text() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from authsrv.hotpath.external import ExternalMetrics
    from bench.external import external_figures

    registry = CollectorRegistry()
    metrics = ExternalMetrics(registry)
    for seconds in [0.004] * 98 + [0.02, 0.3]:
        metrics.seconds.labels(partner="ext").observe(seconds)
    metrics.seconds.labels(partner="other").observe(5.0)
    metrics.calls.labels(partner="ext", result="approved").inc(97)
    metrics.calls.labels(partner="ext", result="timed_out").inc(3)
    metrics.stand_in.labels(partner="ext", decision="decline").inc(3)
    figures = external_figures(generate_latest(registry).decode(), "ext")
    assert figures.calls == {"approved": 97, "timed_out": 3} and figures.stand_in == {"decline": 3}
    assert figures.seconds_count == 100 and abs(figures.mean_ms - (0.392 + 0.02 + 0.3) * 10) < 1e-6
    assert (figures.p50_ms_max, figures.p99_ms_max) == (5.0, 25.0)
    assert "external calls 100" in figures.render()
    empty = external_figures(generate_latest(registry).decode(), "nobody")
    assert empty.seconds_count == 0 and empty.mean_ms is None and empty.p99_ms_max is None


def test_link_balances_tells_the_partner_simulator_every_balance(tmp_path: Path) -> None:
    import urllib.request

    from bench.external import link_balances, start_partner_sim
    from simulators.network.target import free_port

    cards = tmp_path / "cards.jsonl"
    lines = [{"pan": "x", "expiry": "2901", "cvc2": "1", "pin": "1", "cardId": card, "customerId": 10 + card // 2,
              "balanceId": 100 + card // 2, "currency": "EUR"} for card in range(40)]  # two cards per balance
    cards.write_text("".join(json.dumps(line) + "\n" for line in lines))
    port = free_port()
    sim = start_partner_sim(port, tmp_path / "sim.log", ("--latency-ms", "50"))
    try:
        started = time.monotonic()
        assert link_balances(f"http://127.0.0.1:{port}", cards, 12_345) == 20
        assert time.monotonic() - started < 5  # the control API skips the simulated latency
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/balances?limit=100", timeout=5) as response:
            balances = json.loads(response.read())["balances"]
    finally:
        assert sim.stop() == 0
    assert sorted((b["userId"], b["balanceId"], b["amount"], b["currency"]) for b in balances) == [
        (str(10 + n), str(100 + n), 12_345, "EUR") for n in range(20)]


def test_summary_reports_the_cluster_against_one_node_and_its_takeovers() -> None:
    from bench.cluster import ClusterFigures
    from bench.harness import BenchResults, compute_ratios, machine_info, summary

    one = TargetResult(name="authsrv", steps=[make_step(1000, p99_ms=4.0)], sustained_rate_per_s=1000, stop_reason="p99")
    shard = TargetResult(name="cluster", steps=[make_step(1000, p99_ms=8.0)], sustained_rate_per_s=500,
                         stop_reason="p99")
    targets = {"authsrv": one, "cluster": shard}
    figures = ClusterFigures(lease_s=3, kills=2, takeover_s=[2.5, 2.9], median_s=2.7, max_s=2.9, within_bound=True,
                             approved_after_each=True, ledger_verify_exit_code=0)
    results = BenchResults(created_utc="2026-12-05T00:00:00+00:00", machine=machine_info(), settings={},
                           targets=targets, ratios=None, cluster_ratios=compute_ratios(targets, "cluster", "authsrv"),
                           cluster=figures)
    text = summary(results)
    assert "cluster / authsrv (one node) sustained rate: 0.5" in text
    assert "cluster takeovers after kill -9 (2, lease 3 s): 2.50, 2.90 s" in text
    assert "within lease_s + 2: True" in text
