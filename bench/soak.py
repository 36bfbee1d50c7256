"""The memory soak (issue 7): `authsrv serve` under a steady open-loop load, its RSS sampled throughout.

    python -m bench.soak --rate R --duration S [--users N] [--sample-seconds 10] [--out bench/results/soak.json]

Seeds and starts `authsrv serve` as the benchmark harness does (bench/harness.py), offers the
realistic mix for `--warmup-seconds` unrecorded, then for `--duration` seconds at `--rate`, one
uninterrupted open-loop run. Every `--sample-seconds` it reads the server's VmRSS from
/proc/PID/status and, for explaining growth, the ledger and journal gauges from /metrics. At the end
it stops the server with SIGTERM, runs `authsrv ledger verify`, prints the figures and writes them.

The flatness rule (`memory flat: yes/no`): the RSS growth from the first sample of the recorded run
(i.e. after the warm-up) to the last must stay within RSS_GROWTH_FRACTION_MAX of that first sample
or RSS_GROWTH_BYTES_FLOOR, whichever is larger. The floor absorbs what is not a leak: pymalloc
arenas and the allocator's free lists settling, the snapshot writer's buffers, the every-10-s
`gc.freeze()`. The rule is meant for runs of minutes; over a short run it says little (the state
the traffic builds, holds and journal records, has not reached its steady size yet).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio
from prometheus_client.parser import text_string_to_metric_families

from bench.external import scrape_metrics
from bench.harness import SEED_AMOUNT_MINOR, Machine, Step, machine_info, step_from_report
from simulators.network.cards import load_cards
from simulators.network.load import LoadConfig, LoadError, run_load
from simulators.network.mix import MixWeights
from simulators.network.pinblock import load_zpk
from simulators.network.report import LoadReport
from simulators.network.target import (
    ChildProcess,
    Ports,
    TargetError,
    init_and_seed,
    ledger_verify,
    start_authsrv,
)

DURATION_S_MAX = 3_600.0
WARMUP_S_MAX = 600.0
SAMPLE_S_MIN = 0.5
SAMPLE_S_MAX = 600.0
USERS_MAX = 1_000_000
RSS_GROWTH_FRACTION_MAX = 0.05  # of the first RSS sample after the warm-up
RSS_GROWTH_BYTES_FLOOR = 20 * 1024 * 1024
SAMPLES_MAX = 10_000  # per phase; duration / sample-seconds is far below this within the bounds above
MIB = 1024 * 1024
WARMUP_WEIGHTS = MixWeights(wrong_pin=0)  # the realistic mix without PIN-counter traffic (see drive)
# /metrics gauges recorded with each sample: the state that traffic builds up in the server.
GAUGES = {
    "authsrv_ledger_holds_pending": "holds_pending",
    "authsrv_open_authorizations": "open_authorizations",
    "authsrv_journal_records": "journal_records",
}


class SoakConfig(msgspec.Struct, frozen=True, kw_only=True):
    rate_per_s: float
    duration_s: float
    users: int = 20_000
    connections: int = 8
    sample_s: float = 10.0
    warmup_s: float = 30.0
    timeout_s: float = 5.0
    seed: int = 1

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise ValueError("rate must be > 0")
        if not 0 < self.duration_s <= DURATION_S_MAX:
            raise ValueError(f"duration must be in (0, {DURATION_S_MAX:.0f}] s")
        if not 0 <= self.warmup_s <= WARMUP_S_MAX:
            raise ValueError(f"warm-up must be in [0, {WARMUP_S_MAX:.0f}] s")
        if not SAMPLE_S_MIN <= self.sample_s <= SAMPLE_S_MAX:
            raise ValueError(f"sample interval must be in [{SAMPLE_S_MIN}, {SAMPLE_S_MAX:.0f}] s")
        if not 0 < self.users <= USERS_MAX:
            raise ValueError(f"users must be in 1..{USERS_MAX}")


class RssSample(msgspec.Struct, frozen=True, kw_only=True):
    phase: str  # "start" (idle, after /readyz), "warmup", "soak", "end" (load drained, before SIGTERM)
    elapsed_s: float  # since the server was ready
    rss_bytes: int
    gauges: dict[str, float]  # GAUGES values at that moment; empty when /metrics did not answer


class RssVerdict(msgspec.Struct, frozen=True, kw_only=True):
    first_bytes: int | None  # first sample of the recorded run (after the warm-up)
    last_bytes: int | None  # last sample with the server still under load or just drained
    peak_bytes: int | None
    growth_bytes: int | None
    growth_mib_per_min: float | None
    bound_bytes: int | None  # max(RSS_GROWTH_FRACTION_MAX x first, RSS_GROWTH_BYTES_FLOOR)
    flat: bool | None  # None: fewer than two samples after the warm-up
    rule: str
    # Growth over the rise in pending holds between the same two samples: a figure near the cost
    # of the state each hold carries (ledger hold, journal record, open authorization) means the
    # growth is retained state that hold expiry bounds, not a leak. None when holds did not rise.
    growth_bytes_per_hold_added: float | None = None


class SoakResults(msgspec.Struct, frozen=True, kw_only=True):
    created_utc: str
    machine: Machine
    settings: SoakConfig
    soak: Step | None  # the recorded run: rates, percentiles, code mix, mismatches, server CPU
    unsent: int | None
    connection_errors: list[str]
    mismatch_detail: dict[str, dict[str, int]]  # kind -> "expected->got" -> count (the load report's)
    rss_samples: list[RssSample]
    rss: RssVerdict
    error: str | None
    server_exit_code: int | None
    ledger_verify_exit_code: int | None


def read_rss_bytes(pid: int) -> int:
    """VmRSS of a live process, from /proc/PID/status (reported in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace").splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise ProcessLookupError(f"no VmRSS for pid {pid} (a zombie?)")


def parse_gauges(metrics_text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in GAUGES and not sample.labels:
                found[GAUGES[sample.name]] = sample.value
    return found


def _scrape_gauges(metrics_port: int) -> dict[str, float]:
    try:
        return parse_gauges(scrape_metrics(metrics_port))
    except (OSError, ValueError):  # a busy or stopping server: the RSS figure still stands
        return {}


def rss_verdict(samples: list[RssSample]) -> RssVerdict:
    """The flatness rule over the samples taken after the warm-up (phases soak and end)."""
    rule = (f"flat when RSS growth from the first sample after the warm-up to the last is at most "
            f"max({RSS_GROWTH_FRACTION_MAX:.0%} of the first, {RSS_GROWTH_BYTES_FLOOR // MIB} MiB)")  # fmt: skip
    recorded = [sample for sample in samples if sample.phase in ("soak", "end")]
    if len(recorded) < 2:
        return RssVerdict(first_bytes=None, last_bytes=None, peak_bytes=None, growth_bytes=None,
                          growth_mib_per_min=None, bound_bytes=None, flat=None, rule=rule)  # fmt: skip
    first, last = recorded[0], recorded[-1]
    assert last.elapsed_s >= first.elapsed_s
    growth = last.rss_bytes - first.rss_bytes
    minutes = (last.elapsed_s - first.elapsed_s) / 60
    bound = max(int(RSS_GROWTH_FRACTION_MAX * first.rss_bytes), RSS_GROWTH_BYTES_FLOOR)
    return RssVerdict(
        first_bytes=first.rss_bytes, last_bytes=last.rss_bytes,
        peak_bytes=max(sample.rss_bytes for sample in recorded), growth_bytes=growth,
        growth_mib_per_min=round(growth / MIB / minutes, 3) if minutes > 0 else None,
        bound_bytes=bound, flat=growth <= bound, rule=rule,
        growth_bytes_per_hold_added=_per_hold(first, last, growth),
    )  # fmt: skip


def _per_hold(first: RssSample, last: RssSample, growth_bytes: int) -> float | None:
    holds_added = last.gauges.get("holds_pending", 0.0) - first.gauges.get("holds_pending", 0.0)
    if "holds_pending" not in first.gauges or "holds_pending" not in last.gauges or holds_added <= 0:
        return None
    return round(growth_bytes / holds_added, 1)


class _Sampler:
    """RSS (and gauges) of the server every `interval_s`, from a task beside the load."""

    def __init__(self, server: ChildProcess, metrics_port: int, interval_s: float) -> None:
        self.server, self.metrics_port, self.interval_s = server, metrics_port, interval_s
        self.samples: list[RssSample] = []
        self.ready_s = time.monotonic()

    async def take(self, phase: str) -> None:
        try:
            rss = read_rss_bytes(self.server.pid)
        except (OSError, ProcessLookupError):  # the server died: the load run reports that
            return
        gauges = await trio.to_thread.run_sync(_scrape_gauges, self.metrics_port)
        elapsed_s = round(time.monotonic() - self.ready_s, 2)
        self.samples.append(RssSample(phase=phase, elapsed_s=elapsed_s, rss_bytes=rss, gauges=gauges))

    async def every_interval(self, phase: str) -> None:
        for _ in range(SAMPLES_MAX):  # bounded; cancelled when the load run ends
            await self.take(phase)
            await trio.sleep(self.interval_s)

    async def beside(self, phase: str, load: LoadConfig, cards: tuple) -> LoadReport:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.every_interval, phase)
            report = await run_load(load, cards=cards)
            nursery.cancel_scope.cancel()
        return report


def _load_config(config: SoakConfig, *, port: int, cards_path: Path, zpk: bytes | None, duration_s: float,
                 seed: int, weights: MixWeights) -> LoadConfig:  # fmt: skip
    return LoadConfig(
        cards_path=cards_path, port=port, rate_per_s=config.rate_per_s, duration_s=duration_s,
        connections=config.connections, timeout_s=config.timeout_s, seed=seed, zpk=zpk, weights=weights,
    )  # fmt: skip


def drive(config: SoakConfig, server: ChildProcess, ports: Ports, cards_path: Path, zpk: bytes | None,
          sampler: _Sampler, log: Callable[[str], None]) -> tuple[Step, LoadReport]:  # fmt: skip
    """Warm-up (unrecorded), then the soak, the sampler beside each; returns the soak's figures."""
    cards = load_cards(cards_path)
    trio.run(sampler.take, "start")
    if config.warmup_s > 0:
        # No wrong PINs in the warm-up: each run_load reserves its own PIN-victim cards and tracks
        # their counters, so a card the warm-up locked would answer 75 where the soak expects 00.
        warmup = _load_config(config, port=ports.iso, cards_path=cards_path, zpk=zpk, duration_s=config.warmup_s,
                              seed=config.seed - 1, weights=WARMUP_WEIGHTS)  # fmt: skip
        trio.run(functools.partial(sampler.beside, "warmup", warmup, cards))
        log(f"soak: warmed up {config.warmup_s:.0f} s at {config.rate_per_s:,.0f}/s (not recorded)")
    load = _load_config(config, port=ports.iso, cards_path=cards_path, zpk=zpk, duration_s=config.duration_s,
                        seed=config.seed, weights=MixWeights())  # fmt: skip
    log(f"soak: {config.duration_s:.0f} s at {config.rate_per_s:,.0f}/s, RSS every {config.sample_s:.0f} s")
    server_before, client_before, wall_before = server.cpu_s(), time.process_time(), time.perf_counter()
    report = trio.run(functools.partial(sampler.beside, "soak", load, cards))
    step = step_from_report(
        report, server_cpu_s=server.cpu_s() - server_before, client_cpu_s=time.process_time() - client_before,
        wall_s=time.perf_counter() - wall_before,
    )  # fmt: skip
    trio.run(sampler.take, "end")
    return step, report


def run_soak(config: SoakConfig, *, log: Callable[[str], None] = print) -> SoakResults:
    """Init, seed, serve, warm up, soak with RSS samples, stop, verify."""
    work = Path(tempfile.mkdtemp(prefix="authsrv-soak-"))
    data, log_path = work / "data", work / "authsrv.log"
    step = report = server = None
    error = exit_code = verify_code = None
    samples: list[RssSample] = []
    try:
        log(f"soak: init + seed {config.users} users in {data} (log {log_path})")
        cards_path = init_and_seed(data, users=config.users, cards_per_user=1, amount_minor=SEED_AMOUNT_MINOR,
                                   log_path=log_path)  # fmt: skip
        zpk_path = data / "keys" / "zpk.hex"
        zpk = load_zpk(zpk_path) if zpk_path.exists() else None
        ports = Ports.free()
        server = start_authsrv(data, ports, log_path)
        sampler = _Sampler(server, ports.metrics, config.sample_s)
        samples = sampler.samples
        step, report = drive(config, server, ports, cards_path, zpk, sampler, log)
        if not server.running():
            error = f"server exited with {server.process.returncode} during the soak"
    except (LoadError, TargetError, OSError, ValueError) as failure:
        error = str(failure)
    finally:
        if server is not None:
            exit_code = server.stop()
        if data.exists() and server is not None:
            verify_code = ledger_verify(data, log_path).exit_code
            log(f"soak: server exit {exit_code}, ledger verify exit {verify_code}")
        shutil.rmtree(work, ignore_errors=True)  # holds the seeded cards file (PANs, PINs)
    return SoakResults(
        created_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine_info(), settings=config, soak=step, unsent=report.unsent if report else None,
        connection_errors=list(report.connection_errors) if report else [],
        mismatch_detail=dict(report.mismatch_detail) if report else {}, rss_samples=samples,
        rss=rss_verdict(samples), error=error, server_exit_code=exit_code, ledger_verify_exit_code=verify_code,
    )  # fmt: skip


def summary(results: SoakResults) -> str:
    settings, step, rss = results.settings, results.soak, results.rss
    lines = [f"machine: {results.machine.cpu_model}, {results.machine.cores} cores, Python {results.machine.python}",
             f"soak: offered {settings.rate_per_s:,.0f}/s for {settings.duration_s:.0f} s after a"
             f" {settings.warmup_s:.0f} s warm-up, {settings.users} users, {settings.connections} connections"]  # fmt: skip
    if step is not None:
        codes = " ".join(f"{code}:{count}" for code, count in sorted(step.code_mix.items()))
        cpu = f"{step.cpu_s_per_1000:.3f}" if step.cpu_s_per_1000 is not None else "-"
        lines += [
            f"achieved {step.achieved_rate_per_s:,.1f}/s  sent {step.sent}  answered {step.answered}"
            f"  timeouts {step.timeouts}  lost {step.lost}  unsent {results.unsent}",
            f"latency ms  p50 {step.p50_ms:.2f}  p99 {step.p99_ms:.2f}  p99.9 {step.p999_ms:.2f}  max {step.max_ms:.2f}",
            f"response codes: {codes or '-'}",
            f"mismatches: {step.mismatches}" + "".join(
                f"; {kind}: " + ", ".join(f"{pair} x{count}" for pair, count in sorted(detail.items()))
                for kind, detail in results.mismatch_detail.items()),
            f"server cpu/1000 {cpu} s  client cpu share {step.client_cpu_share:.0%}"
            + ("  CLIENT SATURATED" if step.client_saturated else ""),
        ]  # fmt: skip
    lines.append("RSS samples (elapsed s, phase, MiB, holds pending / open auths / journal records):")
    for sample in results.rss_samples:
        gauges = " / ".join(f"{sample.gauges[name]:.0f}" if name in sample.gauges else "-" for name in GAUGES.values())
        lines.append(f"  {sample.elapsed_s:8.1f}  {sample.phase:<6}  {sample.rss_bytes / MIB:8.1f}  {gauges}")
    if rss.flat is None:
        lines.append("RSS growth: too few samples after the warm-up")
    else:
        assert rss.growth_bytes is not None and rss.first_bytes is not None and rss.bound_bytes is not None
        per_min = f"{rss.growth_mib_per_min:+.2f} MiB/min" if rss.growth_mib_per_min is not None else "-"
        lines.append(f"RSS growth after warm-up: {rss.growth_bytes / MIB:+.1f} MiB"
                     f" ({rss.growth_bytes / rss.first_bytes:+.1%} of {rss.first_bytes / MIB:.1f} MiB; {per_min});"
                     f" bound {rss.bound_bytes / MIB:.1f} MiB")  # fmt: skip
        if rss.growth_bytes_per_hold_added is not None:
            lines.append(f"RSS growth per pending hold added: {rss.growth_bytes_per_hold_added:,.0f} B")
    lines.append(f"rule: {rss.rule}")
    lines.append(f"server exit {results.server_exit_code}, ledger verify exit {results.ledger_verify_exit_code}")
    if results.error:
        lines.append(f"error: {results.error}")
    lines.append(f"memory flat: {'unknown' if rss.flat is None else 'yes' if rss.flat else 'no'}")
    return "\n".join(lines)


def write_results(results: SoakResults, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(results)) + b"\n")


def load_results(path: Path) -> SoakResults:
    return msgspec.json.decode(path.read_bytes(), type=SoakResults)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rate", type=float, required=True, help="offered authorizations/s (70%% of the knee)")
    parser.add_argument("--duration", type=float, required=True, help=f"recorded seconds, at most {DURATION_S_MAX:.0f}")
    parser.add_argument("--users", type=int, default=20_000, help="users to seed (one card each)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="RSS sampling interval")
    parser.add_argument("--warmup-seconds", type=float, default=30.0, help="unrecorded load before the soak")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = SoakConfig(rate_per_s=args.rate, duration_s=args.duration, users=args.users,
                            connections=args.connections, sample_s=args.sample_seconds,
                            warmup_s=args.warmup_seconds)  # fmt: skip
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        results = run_soak(config)
    except KeyboardInterrupt:
        return 130
    write_results(results, args.out)
    print()
    print(summary(results))
    print(f"\nwrote {args.out}")
    clean = results.error is None and results.server_exit_code == 0 and results.ledger_verify_exit_code == 0
    return 0 if clean and results.soak is not None and results.soak.mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
