"""The benchmark (docs/contract.md, benchmark output): authsrv against the baseline (PostgreSQL) and the floor.

For each target the harness offers the simulator's open-loop mix at a rising series of rates
(stopping once p99 passes `p99_stop_ms` or the achieved rate falls under `achieved_stop_ratio` of
the offered one), measures the server's CPU seconds per 1,000 authorizations from /proc/PID/stat,
and reports the highest rate sustained with p99 under `sustain_p99_ms`. The load generator runs in
this process, so each step also records the generator's own CPU share: near 1.0 means the client,
not the server, was the limit of that step.

Targets (`--targets`, all by default):
- `authsrv`: the internal-balance partner `demo` (balances in our ledger);
- `floor`: codec + transport only (bench/floor_server.py): what any Python ISO 8583 server on trio
  costs before doing any work;
- `postgres`, the baseline (issue 7): the same front end with each authorization a PostgreSQL
  transaction (bench/pg_baseline.py, a throwaway instance from bench/postgres.py); skipped, with the
  reason printed, where initdb/pg_ctl or psycopg cannot be found;
- `postgres-fn`, the same baseline as a careful team would build it (issue 16): one round trip per
  authorization, a PL/pgSQL function, over nonblocking connections driven by the trio loop;
- `external-5ms`: every card on partner `ext` with `balance_mode = "external"`, its api_url the
  partner simulator (its own process) answering in 5 ms;
- `external-timeout`: the same with the simulator answering after 400 ms, past the ISO budget
  (250 ms): every debit ends in the stand-in decline (91) when the budget runs out;
- `cluster`: the same cards and mix against the primary of a shard (a standby, 3 NATS servers with
  `sync_interval: always`, bench/cluster.py), then kill -9 rounds of the primary: the takeover times.
The external targets offer only the rates up to EXTERNAL_RATE_MAX (one simulator process answers
~700 calls/s on an idle 2-core VM, far fewer when it shares the cores with the server and the load,
and each call costs the server itself ~3 ms of CPU there) and seed at most EXTERNAL_USERS_MAX users (each balance is told to the simulator one call at a
time). Their ratios are taken against the `authsrv` run of the same invocation.

Results carry two comparisons: `ratios`, authsrv / the baseline (`BenchResults.baseline`: the stronger
of the PostgreSQL variants that ran, by sustained rate; each one's in `baseline_ratios`), and
`floor_ratios`, authsrv / the floor.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import msgspec
import trio

from bench import postgres
from bench.cluster import KILLS_DEFAULT, ClusterFigures, bench_cluster
from bench.external import (
    ExternalFigures,
    add_external_partner,
    collateral_per_user,
    external_figures,
    link_balances,
    scrape_metrics,
    seed_partner,
    start_partner_sim,
)
from simulators.network.cards import load_cards, write_synthetic_cards
from simulators.network.load import LoadConfig, LoadError, run_load
from simulators.network.mix import HOT_CARDS_FRACTION_DEFAULT, HOT_SHARE_DEFAULT, HotCards
from simulators.network.pinblock import load_zpk
from simulators.network.report import LoadReport
from simulators.network.target import (
    ChildProcess,
    Ports,
    TargetError,
    authsrv_command,
    free_port,
    init_and_seed,
    ledger_verify,
    run_cli,
    start_authsrv,
    start_floor,
)

TARGETS = ("authsrv", "floor", "postgres", "postgres-fn", "external-5ms", "external-timeout", "cluster")
BASELINE = "postgres"  # issue 7: the implementation authsrv is compared with
# The PostgreSQL baselines: target -> bench.pg_baseline --variant. Ratios are stated against the
# stronger of those that ran (issue 16: an honest baseline).
BASELINE_VARIANTS = {"postgres": "transactions", "postgres-fn": "function"}
FLOOR = "floor"  # codec + transport only
EXTERNAL_PARTNER = "ext"
ISO_BUDGET_MS = 250  # authsrv.toml [iso] budget_ms at its default: what a timed-out call costs
# Partner simulator settings per external target. No forced 422s by amount ending: the mix's
# random amounts would otherwise be declined now and then where the load generator expects 00.
EXTERNAL_SCENARIOS = {
    "external-5ms": ("--latency-ms", "5", "--no-amount-codes"),
    "external-timeout": ("--latency-ms", "400", "--no-amount-codes"),
}
# Offered/s. ~80% of the mix calls the partner. On machine A (docs/benchmarks.md) one call costs
# authsrv ~3 ms of CPU (httpx on trio) and the simulator ~3 ms: 250/s already fills a core each.
EXTERNAL_RATE_MAX = 250.0
EXTERNAL_RATE_LOW = 100.0
EXTERNAL_USERS_MAX = 2_000  # linking is one control-API call per balance
RATES_MAX = 50  # steps per target
USERS_MAX = 1_000_000
STEP_SECONDS_MAX = 600.0
SEED_AMOUNT_MINOR = 1_000_000  # 10,000.00 per balance: the mix spends a few hundred per card per run
SYNTHETIC_CARDS = 20_000  # cards the floor and the baseline are driven with when authsrv did not seed any
SUSTAIN_P99_MS = 10.0  # the knee: the highest offered rate with p99 under this (the plot draws it)
CLIENT_SATURATED_SHARE = 0.9  # generator CPU / wall time above which a step measured the client
DEFAULT_RATES = (250.0, 500.0, 750.0, 1000.0, 1250.0, 1500.0, 2000.0, 2500.0, 3000.0, 4000.0, 5000.0, 6000.0,
                 8000.0, 10000.0)  # fmt: skip
QUICK_RATES = (100.0, 300.0, 600.0)  # external targets: 100 only (EXTERNAL_RATE_MAX)
QUICK_STEP_SECONDS = 1.5
QUICK_USERS = 1_000


@attrs.frozen(kw_only=True)
class BenchConfig:
    # Fine steps up to the 8,000/s target and past it: stepping stops at the first overloaded rate.
    rates: tuple[float, ...] = DEFAULT_RATES
    step_seconds: float = 10.0
    users: int = 20_000
    cards_per_user: int = 1
    connections: int = 8
    targets: tuple[str, ...] = TARGETS
    out_dir: Path = Path("bench/results")
    p99_stop_ms: float = 50.0
    achieved_stop_ratio: float = 0.9
    sustain_p99_ms: float = SUSTAIN_P99_MS
    timeout_s: float = 5.0
    pause_s: float = 1.0  # between steps, so one step's tail does not land in the next
    warmup_s: float = 3.0  # unrecorded load at the first rate: caches, allocator, first-touch pages
    seed: int = 1
    quick: bool = False
    # The realistic card mix (issue 7): a few hot cards get a large share of the purchases. The
    # external targets run without (their balances sit at the partner simulator, funded alike).
    hot_cards: float = HOT_CARDS_FRACTION_DEFAULT
    hot_share: float = HOT_SHARE_DEFAULT

    def __attrs_post_init__(self) -> None:
        _ = self.hot  # HotCards checks both fractions (ValueError)
        if not 0 < len(self.rates) <= RATES_MAX or any(rate <= 0 for rate in self.rates):
            raise ValueError(f"rates: 1..{RATES_MAX} positive values")
        if list(self.rates) != sorted(self.rates):
            raise ValueError("rates must rise: stepping stops at the first overloaded one")
        if not 0 < self.step_seconds <= STEP_SECONDS_MAX:
            raise ValueError(f"step_seconds must be in (0, {STEP_SECONDS_MAX}]")
        if not 0 <= self.warmup_s <= STEP_SECONDS_MAX:
            raise ValueError(f"warmup_s must be in [0, {STEP_SECONDS_MAX}]")
        if not 0 < self.users <= USERS_MAX:
            raise ValueError(f"users must be in 1..{USERS_MAX}")
        if not self.targets or set(self.targets) - set(TARGETS):
            raise ValueError(f"targets: a subset of {TARGETS}")

    @property
    def hot(self) -> HotCards:
        return HotCards(fraction=self.hot_cards, share=self.hot_share)

    @classmethod
    def quick_preset(cls, **overrides: object) -> BenchConfig:
        """Short steps at modest rates: exercises every part of the harness in seconds."""
        settings = {"rates": QUICK_RATES, "step_seconds": QUICK_STEP_SECONDS, "users": QUICK_USERS,
                    "connections": 2, "pause_s": 0.2, "warmup_s": 0.0, "quick": True}  # fmt: skip
        settings.update(overrides)
        return cls(**settings)


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    cpu_model: str
    cores: int
    python: str
    platform: str


class Step(msgspec.Struct, frozen=True, kw_only=True):
    offered_rate_per_s: float
    achieved_rate_per_s: float
    sent: int
    answered: int
    timeouts: int
    lost: int
    mismatches: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    service_p99_ms: float
    send_lag_p99_ms: float
    send_lag_p999_ms: float = 0.0  # how late the load generator's own sends were (its share of the tail)
    code_mix: dict[str, int]
    server_cpu_s: float
    cpu_s_per_1000: float | None  # server CPU seconds per 1,000 answered authorizations
    client_cpu_share: float  # load generator CPU / wall time during the step
    client_saturated: bool


class ExternalCalls(msgspec.Struct, frozen=True, kw_only=True):
    """The hot path's calls to the external partner over the whole target run (authsrv /metrics)."""

    partner: str
    simulator: list[str]  # the partner simulator's knobs
    calls: dict[str, int]  # result -> calls
    stand_in: dict[str, int]  # decision -> count
    mean_ms: float | None
    p50_ms_max: float | None  # histogram bucket bounds
    p99_ms_max: float | None
    simulator_cpu_s: float | None  # the simulator process over the run (linking included)


class TargetResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    steps: list[Step]
    sustained_rate_per_s: float | None  # highest offered rate with p99 < sustain_p99_ms, all answered
    stop_reason: str
    error: str | None = None
    server_exit_code: int | None = None
    ledger_verify_exit_code: int | None = None
    external: ExternalCalls | None = None  # external-* targets only


class RateRatio(msgspec.Struct, frozen=True, kw_only=True):
    offered_rate_per_s: float
    cpu_s_per_1000: float | None  # ours / theirs
    p50: float | None
    p99: float | None


class Ratios(msgspec.Struct, frozen=True, kw_only=True):
    """ours / theirs (authsrv / postgres, authsrv / floor, external-* / authsrv): above 1 means ours
    costs more (CPU, latency) or sustains more (rate)."""

    sustained_rate: float | None
    per_rate: list[RateRatio]


class BenchResults(msgspec.Struct, frozen=True, kw_only=True):
    created_utc: str
    machine: Machine
    settings: dict[str, object]
    targets: dict[str, TargetResult]
    ratios: Ratios | None  # authsrv / the baseline; None when either did not run (postgres skipped)
    baseline: str = BASELINE  # the target `ratios` divides by: the stronger PostgreSQL variant that ran
    baseline_ratios: dict[str, Ratios] = {}  # authsrv / each PostgreSQL variant that ran
    floor_ratios: Ratios | None = None  # authsrv / floor, same run
    external_ratios: dict[str, Ratios] = {}  # external target -> it / authsrv (internal), same run
    cluster_ratios: Ratios | None = None  # cluster / authsrv (one node), same run
    cluster: ClusterFigures | None = None  # takeovers after kill -9 of the primary


def machine_info() -> Machine:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return Machine(
        cpu_model=cpu_model,
        cores=os.cpu_count() or 0,
        python=platform.python_version(),
        platform=platform.platform(),
    )


def step_from_report(report: LoadReport, *, server_cpu_s: float, client_cpu_s: float, wall_s: float) -> Step:
    share = round(client_cpu_s / wall_s, 3) if wall_s > 0 else 0.0
    return Step(
        offered_rate_per_s=report.offered_rate_per_s,
        achieved_rate_per_s=report.achieved_rate_per_s,
        sent=report.sent,
        answered=report.answered,
        timeouts=report.timeouts,
        lost=report.lost,
        mismatches=report.mismatches,
        p50_ms=report.latency.p50_ms,
        p90_ms=report.latency.p90_ms,
        p99_ms=report.latency.p99_ms,
        p999_ms=report.latency.p999_ms,
        max_ms=report.latency.max_ms,
        service_p99_ms=report.service_time.p99_ms,
        send_lag_p99_ms=report.send_lag.p99_ms,
        send_lag_p999_ms=report.send_lag.p999_ms,
        code_mix=report.codes,
        server_cpu_s=round(server_cpu_s, 3),
        cpu_s_per_1000=round(server_cpu_s / (report.answered / 1000), 4) if report.answered else None,
        client_cpu_share=share,
        client_saturated=share >= CLIENT_SATURATED_SHARE,
    )


def p99_stop_ms(name: str, config: BenchConfig) -> float:
    """`external-timeout` answers every debit at the end of the ISO budget by design: its stop line
    sits that much higher, so it measures the stand-in's cost rather than stopping at once."""
    return config.p99_stop_ms + (ISO_BUDGET_MS if name == "external-timeout" else 0.0)


def target_rates(name: str, config: BenchConfig) -> tuple[float, ...]:
    """The rates a target is offered: external targets stay under the partner simulator's ceiling."""
    if name not in EXTERNAL_SCENARIOS:
        return config.rates
    capped = tuple(rate for rate in config.rates if rate <= EXTERNAL_RATE_MAX)
    if capped and not config.quick and EXTERNAL_RATE_LOW not in capped:
        # The default grid starts at 250/s, where a 2-core VM is already full (server + simulator
        # ~3 ms of CPU per call each): also offer a rate the external path sustains.
        capped = tuple(sorted({EXTERNAL_RATE_LOW, *capped}))
    return capped or (min(config.rates[0], EXTERNAL_RATE_MAX),)


def overload_reason(step: Step, config: BenchConfig, stop_ms: float | None = None) -> str | None:
    """Why stepping stops after this step, or None to go on."""
    stop_ms = config.p99_stop_ms if stop_ms is None else stop_ms
    if step.p99_ms > stop_ms:
        return f"p99 {step.p99_ms:.1f} ms > {stop_ms:.0f} ms at {step.offered_rate_per_s:.0f}/s"
    if step.achieved_rate_per_s < config.achieved_stop_ratio * step.offered_rate_per_s:
        return (f"achieved {step.achieved_rate_per_s:.0f}/s < {config.achieved_stop_ratio:.0%} of "
                f"{step.offered_rate_per_s:.0f}/s")  # fmt: skip
    return None


def sustained_rate(steps: list[Step], config: BenchConfig) -> float | None:
    good = [
        step.offered_rate_per_s
        for step in steps
        if step.p99_ms < config.sustain_p99_ms
        and step.achieved_rate_per_s >= config.achieved_stop_ratio * step.offered_rate_per_s
        and step.timeouts == 0
        and step.lost == 0
    ]
    return max(good) if good else None


def run_steps(
    name: str, server: ChildProcess, *, port: int, cards_path: Path, zpk: bytes | None, config: BenchConfig,
    log: Callable[[str], None],
) -> tuple[list[Step], str]:  # fmt: skip
    """Offer each rate in turn; returns the steps and why stepping ended."""
    steps: list[Step] = []
    rates = target_rates(name, config)
    cards = load_cards(cards_path)  # once per target, not once per step
    hot = HotCards() if name in EXTERNAL_SCENARIOS else config.hot  # see BenchConfig.hot_cards
    if config.warmup_s > 0:
        warmup = LoadConfig(
            cards_path=cards_path, port=port, rate_per_s=rates[0], duration_s=config.warmup_s,
            connections=config.connections, timeout_s=config.timeout_s, seed=config.seed - 1, zpk=zpk, hot=hot,
        )  # fmt: skip
        trio.run(functools.partial(run_load, warmup, cards=cards))
        log(f"{name:<16} warmed up: {config.warmup_s:.0f} s at {rates[0]:,.0f}/s (not recorded)")
        time.sleep(config.pause_s)
    for rate in rates:  # bounded: RATES_MAX
        load = LoadConfig(
            cards_path=cards_path, port=port, rate_per_s=rate, duration_s=config.step_seconds,
            connections=config.connections, timeout_s=config.timeout_s, seed=config.seed + len(steps), zpk=zpk,
            hot=hot, pin_victims_reused=config.warmup_s > 0 or bool(steps),
        )  # fmt: skip
        server_before, client_before, wall_before = server.cpu_s(), time.process_time(), time.perf_counter()
        report = trio.run(functools.partial(run_load, load, cards=cards))
        server_cpu_s = server.cpu_s() - server_before
        step = step_from_report(
            report, server_cpu_s=server_cpu_s, client_cpu_s=time.process_time() - client_before,
            wall_s=time.perf_counter() - wall_before,
        )  # fmt: skip
        steps.append(step)
        log(_step_line(name, step))
        if not server.running():
            return steps, f"server exited with {server.process.returncode}"
        reason = overload_reason(step, config, p99_stop_ms(name, config))
        if reason:
            return steps, reason
        time.sleep(config.pause_s)
    return steps, "all rates offered"


def _step_line(name: str, step: Step) -> str:
    cpu = f"{step.cpu_s_per_1000:.3f}" if step.cpu_s_per_1000 is not None else "-"
    return (
        f"{name:<16} offered {step.offered_rate_per_s:>7,.0f}/s achieved {step.achieved_rate_per_s:>7,.0f}/s"
        f"  p50 {step.p50_ms:7.2f}  p99 {step.p99_ms:7.2f}  p99.9 {step.p999_ms:7.2f}  max {step.max_ms:7.2f} ms"
        f"  cpu/1000 {cpu} s  client {step.client_cpu_share:.0%}{' SATURATED' if step.client_saturated else ''}"
    )


def bench_authsrv(config: BenchConfig, work: Path, log: Callable[[str], None]) -> tuple[TargetResult, Path | None]:
    """Init, seed, serve, step, stop, verify. Returns the result and the cards file (if seeded)."""
    data, log_path = work / "data", work / "authsrv.log"
    log(f"authsrv: init + seed {config.users} users in {data} (log {log_path})")
    try:
        cards_path = init_and_seed(data, users=config.users, cards_per_user=config.cards_per_user,
                                   amount_minor=SEED_AMOUNT_MINOR, log_path=log_path, hot=config.hot)  # fmt: skip
        zpk_path = data / "keys" / "zpk.hex"
        zpk = load_zpk(zpk_path) if zpk_path.exists() else None
        ports = Ports.free()
        server = start_authsrv(data, ports, log_path)
    except (TargetError, OSError, ValueError) as error:
        return TargetResult(name="authsrv", steps=[], sustained_rate_per_s=None, stop_reason="not started",
                            error=str(error)), None  # fmt: skip
    steps: list[Step] = []
    error = None
    try:
        steps, reason = run_steps("authsrv", server, port=ports.iso, cards_path=cards_path, zpk=zpk,
                                  config=config, log=log)  # fmt: skip
    except (LoadError, TargetError, OSError, ValueError) as failure:
        reason, error = "load failed", str(failure)
    finally:
        exit_code = server.stop()
    verify = ledger_verify(data, log_path)
    log(f"authsrv: server exit {exit_code}, ledger verify exit {verify.exit_code}")
    return TargetResult(
        name="authsrv", steps=steps, sustained_rate_per_s=sustained_rate(steps, config), stop_reason=reason,
        error=error, server_exit_code=exit_code, ledger_verify_exit_code=verify.exit_code,
    ), cards_path  # fmt: skip


def bench_floor(
    config: BenchConfig, work: Path, cards_path: Path | None, log: Callable[[str], None]
) -> TargetResult:
    """The floor server (codec + transport only), stepped like authsrv with the same cards."""
    if cards_path is None:  # no seeded cards: same file format, synthetic numbers
        cards_path = work / "synthetic-cards.jsonl"
        write_synthetic_cards(cards_path, min(SYNTHETIC_CARDS, config.users * config.cards_per_user), seed=config.seed)
    port, log_path = free_port(), work / "floor.log"
    try:
        server = start_floor(port, log_path)
    except (TargetError, OSError) as error:
        return TargetResult(name=FLOOR, steps=[], sustained_rate_per_s=None, stop_reason="not started",
                            error=str(error))  # fmt: skip
    steps: list[Step] = []
    error = None
    try:
        steps, reason = run_steps(FLOOR, server, port=port, cards_path=cards_path, zpk=None,
                                  config=config, log=log)  # fmt: skip
    except (LoadError, TargetError, OSError, ValueError) as failure:
        reason, error = "load failed", str(failure)
    finally:
        exit_code = server.stop()
    return TargetResult(name=FLOOR, steps=steps, sustained_rate_per_s=sustained_rate(steps, config),
                        stop_reason=reason, error=error, server_exit_code=exit_code)  # fmt: skip


@attrs.define
class ServerWithHelpers:
    """A server and the processes doing its work beside it (the baseline's PostgreSQL, a cluster's
    NATS servers), seen by run_steps as one server: its CPU figure adds theirs."""

    child: ChildProcess
    helpers_cpu_s: Callable[[], float]

    @property
    def process(self):  # noqa: ANN201  run_steps reads process.returncode
        return self.child.process

    def running(self) -> bool:
        return self.child.running()

    def cpu_s(self) -> float:
        return self.child.cpu_s() + self.helpers_cpu_s()


def _postgres_inputs(config: BenchConfig, work: Path, cards_path: Path | None) -> tuple[Path, Path]:
    """The cards file and ZPK file the PostgreSQL baseline is loaded and driven with: authsrv's when it
    seeded (so both answer the same PIN blocks), else synthetic cards and a random key."""
    if cards_path is not None and (cards_path.parent / "keys" / "zpk.hex").is_file():
        return cards_path, cards_path.parent / "keys" / "zpk.hex"
    if cards_path is None:
        cards_path = work / "synthetic-cards.jsonl"
        if not cards_path.exists():
            write_synthetic_cards(cards_path, min(SYNTHETIC_CARDS, config.users * config.cards_per_user),
                                  seed=config.seed)  # fmt: skip
    zpk_path = work / "postgres-zpk.hex"
    descriptor = os.open(zpk_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as out:
        out.write(os.urandom(16).hex().upper() + "\n")
    return cards_path, zpk_path


def bench_postgres(
    config: BenchConfig, work: Path, cards_path: Path | None, log: Callable[[str], None], name: str = BASELINE
) -> TargetResult:
    """A throwaway PostgreSQL loaded with the same cards, the pg_baseline server in front (the variant
    BASELINE_VARIANTS[name]), stepped."""
    reason = postgres.unavailable_reason()
    if reason:
        log(f"{name}: skipped: {reason}")
        return TargetResult(name=name, steps=[], sustained_rate_per_s=None, stop_reason=f"skipped: {reason}")
    cards_path, zpk_path = _postgres_inputs(config, work, cards_path)
    port, log_path = free_port(), work / f"pg-baseline-{name}.log"
    steps: list[Step] = []
    error, exit_code, reason = None, None, "not started"
    try:
        # Every baseline balance gets what a hot one needs (the baseline cannot tell hot cards
        # apart, and a larger number costs it nothing).
        amount_minor = SEED_AMOUNT_MINOR * config.hot.funding_factor(len(load_cards(cards_path)))
        with postgres.running_postgres(cards_path, amount_minor=amount_minor) as database:
            log(f"{name}: PostgreSQL up on port {database.port}, cards loaded (log {log_path})")
            args = [sys.executable, "-m", "bench.pg_baseline", "--port", str(port), "--conninfo", database.conninfo,
                    "--zpk-file", str(zpk_path), "--variant", BASELINE_VARIANTS[name]]  # fmt: skip
            child = ChildProcess.start("PostgreSQL baseline server", args, log_path)
            try:
                child.wait_tcp_ready(port)
                steps, reason = run_steps(name, ServerWithHelpers(child, database.cpu_s), port=port,
                                          cards_path=cards_path, zpk=load_zpk(zpk_path), config=config, log=log)  # fmt: skip
            finally:
                exit_code = child.stop()
    except (postgres.PostgresError, LoadError, TargetError, OSError, ValueError) as failure:
        reason = "load failed" if steps else reason
        error = str(failure)
    return TargetResult(name=name, steps=steps, sustained_rate_per_s=sustained_rate(steps, config),
                        stop_reason=reason, error=error, server_exit_code=exit_code)  # fmt: skip


def stronger_baseline(targets: dict[str, TargetResult]) -> str:
    """The PostgreSQL variant authsrv is compared with: of those that ran, the highest sustained rate
    (a tie: the one that kept up at more rates); BASELINE when none ran."""
    ran = [targets[name] for name in BASELINE_VARIANTS if name in targets and targets[name].steps]
    if not ran:
        return BASELINE
    return max(ran, key=lambda target: (target.sustained_rate_per_s or 0.0, len(target.steps))).name


def _prepare_external(data: Path, users: int, sim_url: str, log_path: Path) -> Path:
    """init, partner `ext` external at `sim_url`, its users seeded and linked at the simulator."""
    run_cli(authsrv_command("init", "--data", str(data)), log_path=log_path)
    add_external_partner(data, EXTERNAL_PARTNER, sim_url, log_path)
    cards_path = seed_partner(data, EXTERNAL_PARTNER, users=users, cards_per_user=1,
                              amount_minor=collateral_per_user(users, SEED_AMOUNT_MINOR),
                              out=data / "cards.jsonl", log_path=log_path)  # fmt: skip
    link_balances(sim_url, cards_path, SEED_AMOUNT_MINOR)
    return cards_path


def _external_calls(figures: ExternalFigures | None, sim_args: tuple[str, ...], sim_cpu_s: float | None) -> ExternalCalls:
    return ExternalCalls(
        partner=EXTERNAL_PARTNER, simulator=list(sim_args), calls=figures.calls if figures else {},
        stand_in=figures.stand_in if figures else {},
        mean_ms=round(figures.mean_ms, 3) if figures and figures.mean_ms is not None else None,
        p50_ms_max=figures.p50_ms_max if figures else None, p99_ms_max=figures.p99_ms_max if figures else None,
        simulator_cpu_s=round(sim_cpu_s, 3) if sim_cpu_s is not None else None,
    )  # fmt: skip


def bench_external(config: BenchConfig, name: str, work: Path, log: Callable[[str], None]) -> TargetResult:
    """Like bench_authsrv, with every card's balance at the partner simulator (its own process)."""
    sim_args = EXTERNAL_SCENARIOS[name]
    data, log_path = work / name, work / f"{name}.log"
    users = min(config.users, EXTERNAL_USERS_MAX)
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    log(f"{name}: partner simulator {' '.join(sim_args)} on {sim_url}; init + seed {users} users of partner"
        f" {EXTERNAL_PARTNER} (external) in {data} (log {log_path})")  # fmt: skip
    sim = server = None
    try:
        sim = start_partner_sim(sim_port, work / f"{name}-partner-sim.log", sim_args)
        cards_path = _prepare_external(data, users, sim_url, log_path)
        zpk = load_zpk(data / "keys" / "zpk.hex")
        ports = Ports.free()
        server = start_authsrv(data, ports, log_path)
    except (TargetError, OSError, ValueError) as error:
        for child in (server, sim):
            if child is not None:
                child.stop()
        return TargetResult(name=name, steps=[], sustained_rate_per_s=None, stop_reason="not started",
                            error=str(error), external=_external_calls(None, sim_args, None))  # fmt: skip
    steps: list[Step] = []
    error = figures = None
    try:
        steps, reason = run_steps(name, server, port=ports.iso, cards_path=cards_path, zpk=zpk, config=config,
                                  log=log)  # fmt: skip
        figures = external_figures(scrape_metrics(ports.metrics), EXTERNAL_PARTNER)
    except (LoadError, TargetError, OSError, ValueError) as failure:
        reason, error = "load failed", str(failure)
    finally:
        exit_code = server.stop()
        sim_cpu_s = sim.cpu_s() if sim.running() else None
        sim.stop()
    verify = ledger_verify(data, log_path)
    log(f"{name}: server exit {exit_code}, ledger verify exit {verify.exit_code}"
        + (f"; {figures.render()}" if figures else ""))  # fmt: skip
    return TargetResult(
        name=name, steps=steps, sustained_rate_per_s=sustained_rate(steps, config), stop_reason=reason, error=error,
        server_exit_code=exit_code, ledger_verify_exit_code=verify.exit_code,
        external=_external_calls(figures, sim_args, sim_cpu_s),
    )  # fmt: skip


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def compute_ratios(targets: dict[str, TargetResult], ours_name: str = "authsrv",
                   theirs_name: str = BASELINE) -> Ratios | None:  # fmt: skip
    """`ours_name` / `theirs_name` at each rate both ran, and of their sustained rates; None when
    either did not run or has no steps (a skipped PostgreSQL)."""
    if ours_name not in targets or theirs_name not in targets or not targets[theirs_name].steps:
        return None
    ours, theirs = targets[ours_name], targets[theirs_name]
    their_steps = {step.offered_rate_per_s: step for step in theirs.steps}
    per_rate = [
        RateRatio(
            offered_rate_per_s=step.offered_rate_per_s,
            cpu_s_per_1000=_ratio(step.cpu_s_per_1000, their_steps[step.offered_rate_per_s].cpu_s_per_1000),
            p50=_ratio(step.p50_ms, their_steps[step.offered_rate_per_s].p50_ms),
            p99=_ratio(step.p99_ms, their_steps[step.offered_rate_per_s].p99_ms),
        )
        for step in ours.steps
        if step.offered_rate_per_s in their_steps
    ]
    return Ratios(sustained_rate=_ratio(ours.sustained_rate_per_s, theirs.sustained_rate_per_s), per_rate=per_rate)


def compute_external_ratios(targets: dict[str, TargetResult]) -> dict[str, Ratios]:
    """Each external target against the internal-partner run (`authsrv`) of the same invocation."""
    found = {name: compute_ratios(targets, name, "authsrv") for name in EXTERNAL_SCENARIOS if name in targets}
    return {name: ratios for name, ratios in found.items() if ratios is not None}


def compute_baseline_ratios(targets: dict[str, TargetResult]) -> dict[str, Ratios]:
    """authsrv against each PostgreSQL variant of the same invocation."""
    found = {name: compute_ratios(targets, "authsrv", name) for name in BASELINE_VARIANTS}
    return {name: ratios for name, ratios in found.items() if ratios is not None}


def run_bench(config: BenchConfig, *, log: Callable[[str], None] = print) -> BenchResults:
    """Run every target, write latest.json and latest.png into `config.out_dir`, return the results."""
    work = Path(tempfile.mkdtemp(prefix="authsrv-bench-"))
    targets: dict[str, TargetResult] = {}
    cluster = None
    try:
        cards_path = None
        if "authsrv" in config.targets:
            targets["authsrv"], cards_path = bench_authsrv(config, work, log)
        if FLOOR in config.targets:
            targets[FLOOR] = bench_floor(config, work, cards_path, log)
        for name in BASELINE_VARIANTS:
            if name in config.targets:
                targets[name] = bench_postgres(config, work, cards_path, log, name)
        for name in EXTERNAL_SCENARIOS:
            if name in config.targets:
                targets[name] = bench_external(config, name, work, log)
        if "cluster" in config.targets:
            targets["cluster"], cluster = bench_cluster(config, work, log, kills=2 if config.quick else KILLS_DEFAULT)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # holds the seeded cards file (PANs, PINs)
    results = BenchResults(
        created_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine_info(),
        settings=_settings(config),
        targets=targets,
        ratios=compute_ratios(targets, "authsrv", stronger_baseline(targets)),
        baseline=stronger_baseline(targets),
        baseline_ratios=compute_baseline_ratios(targets),
        floor_ratios=compute_ratios(targets, "authsrv", FLOOR),
        external_ratios=compute_external_ratios(targets),
        cluster_ratios=compute_ratios(targets, "cluster", "authsrv"),
        cluster=cluster,
    )
    write_results(results, config.out_dir)
    return results


def _settings(config: BenchConfig) -> dict[str, object]:
    settings = attrs.asdict(config)
    settings["out_dir"] = str(config.out_dir)
    settings["rates"] = list(config.rates)
    settings["targets"] = list(config.targets)
    return settings


def write_results(results: BenchResults, out_dir: Path) -> None:
    from bench.plot import write_latency_plot  # matplotlib is slow to import: only when writing

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_bytes(msgspec.json.format(msgspec.json.encode(results)) + b"\n")
    write_latency_plot(results, out_dir / "latest.png")


def load_results(path: Path) -> BenchResults:
    return msgspec.json.decode(path.read_bytes(), type=BenchResults)


def p99_bound_ms(results: BenchResults) -> float:
    """The p99 bound of the knee search in this run (`sustain_p99_ms`; older results lack it)."""
    bound = results.settings.get("sustain_p99_ms", SUSTAIN_P99_MS)
    return float(bound) if isinstance(bound, (int, float)) and bound > 0 else SUSTAIN_P99_MS


def summary(results: BenchResults) -> str:
    lines = [f"machine: {results.machine.cpu_model}, {results.machine.cores} cores, Python {results.machine.python}"]
    for target in results.targets.values():
        sustained = f"{target.sustained_rate_per_s:,.0f}/s" if target.sustained_rate_per_s else "none"
        lines.append(f"{target.name}: sustained with p99 < {p99_bound_ms(results):g} ms: {sustained};"
                     f" stopped: {target.stop_reason}")
        if target.error:
            lines.append(f"  error: {target.error.splitlines()[0]}")
        lines += ["  " + _step_line(target.name, step) for step in target.steps]
        if target.external is not None:
            lines.append("  " + _external_line(target.external))
    comparisons = [(f"authsrv / {results.baseline} (baseline)", results.ratios)]
    comparisons += [(f"authsrv / {name} (the weaker baseline)", ratios)
                    for name, ratios in results.baseline_ratios.items() if name != results.baseline]  # fmt: skip
    comparisons.append((f"authsrv / {FLOOR} (codec + transport only)", results.floor_ratios))
    comparisons += [(f"{name} / authsrv", ratios) for name, ratios in results.external_ratios.items()]
    if results.cluster_ratios is not None:
        comparisons.append(("cluster / authsrv (one node)", results.cluster_ratios))
    if results.cluster is not None:
        figures = results.cluster
        times = ", ".join(f"{t:.2f}" for t in figures.takeover_s)
        lines.append(f"cluster takeovers after kill -9 ({figures.kills}, lease {figures.lease_s:g} s): {times} s;"
                     f" median {figures.median_s}, max {figures.max_s}; within lease_s + 2: {figures.within_bound};"
                     f" purchase approved after each: {figures.approved_after_each};"
                     f" ledger verify exit {figures.ledger_verify_exit_code}")
    for label, ratios in comparisons:
        if ratios is None:
            if label.startswith(f"authsrv / {results.baseline}") and "authsrv" in results.targets:
                lines.append(f"{label}: not compared ({results.baseline} did not run)")
            continue
        lines.append(f"{label} sustained rate: {ratios.sustained_rate}")
        for ratio in ratios.per_rate:
            lines.append(f"  at {ratio.offered_rate_per_s:,.0f}/s: cpu/1000 x{ratio.cpu_s_per_1000}"
                         f"  p50 x{ratio.p50}  p99 x{ratio.p99}")  # fmt: skip
    return "\n".join(lines)


def _external_line(external: ExternalCalls) -> str:
    calls = " ".join(f"{result}:{count}" for result, count in sorted(external.calls.items())) or "none"
    stand_in = " ".join(f"{decision}:{count}" for decision, count in sorted(external.stand_in.items())) or "none"
    mean = f"{external.mean_ms:.2f} ms" if external.mean_ms is not None else "-"
    sim_cpu = f"{external.simulator_cpu_s:.1f} s" if external.simulator_cpu_s is not None else "-"
    return (f"partner calls {calls}; mean {mean}, p99 <= {external.p99_ms_max} ms; stand-in {stand_in};"
            f" simulator ({' '.join(external.simulator)}) cpu {sim_cpu}")  # fmt: skip

