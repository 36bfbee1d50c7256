"""One process per core, measured: the upper bound of the per-card-range design.

    python -m bench.shards [--rates 1000,1500,2000,2500,3000] [--step-seconds 10] [--users 10000]

docs/architecture.md ("Past one core") designs authsrv past one core as one process per card range,
each with its own ledger and log, the network's ISO connections assigned per range. This measures
what that buys on this machine before anything is built: two independent `authsrv serve` processes,
each seeded with half the users, each offered half of every rate on half of the connections with
its own cards; and, in the same run, one process seeded with all the users at the full rate.

A step's percentiles for the pair are the worse of the two processes' (an upper bound of the
combined percentile, never flattering); achieved rates and CPU add up. Stepping stops at the first
rate whose p99 passes --stop-p99-ms. Writes bench/results/shards.json and prints a table.
There is no router and no collateral rebalancing here: it is the design's ceiling, not the product.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import attrs
import msgspec
import trio

from bench.harness import SEED_AMOUNT_MINOR, Step, machine_info, step_from_report
from simulators.network.cards import load_cards
from simulators.network.load import LoadConfig, LoadError, run_load
from simulators.network.mix import HotCards
from simulators.network.pinblock import load_zpk
from simulators.network.report import LoadReport
from simulators.network.target import ChildProcess, Ports, TargetError, init_and_seed, ledger_verify, start_authsrv

PROCESSES = 2
DEFAULT_RATES = (1000.0, 1500.0, 2000.0, 2500.0, 3000.0, 4000.0)
RATES_MAX = 16
STEP_SECONDS_MAX = 120.0
RESULTS = Path(__file__).resolve().parent / "results" / "shards.json"


@attrs.frozen(kw_only=True)
class Shard:
    data: Path
    cards_path: Path
    zpk: bytes
    server: ChildProcess
    ports: Ports


class ShardsResult(msgspec.Struct, frozen=True, kw_only=True):
    machine: object
    settings: dict[str, object]
    one_process: list[Step]
    two_processes: list[Step]
    sustained_one: float | None
    sustained_two: float | None
    ratio: float | None
    ledger_verify_exit_codes: list[int]


def _seed(data: Path, users: int, hot: HotCards, log_path: Path) -> tuple[Path, bytes]:
    cards_path = init_and_seed(data, users=users, cards_per_user=1, amount_minor=SEED_AMOUNT_MINOR,
                               log_path=log_path, hot=hot)  # fmt: skip
    return cards_path, load_zpk(data / "keys" / "zpk.hex")


def _start(data: Path, cards_path: Path, zpk: bytes, log_path: Path) -> Shard:
    ports = Ports.free()
    return Shard(data=data, cards_path=cards_path, zpk=zpk, server=start_authsrv(data, ports, log_path), ports=ports)


def _load(shard: Shard, rate: float, seconds: float, connections: int, seed: int, hot: HotCards,
          reused: bool) -> LoadConfig:  # fmt: skip
    return LoadConfig(cards_path=shard.cards_path, port=shard.ports.iso, rate_per_s=rate, duration_s=seconds,
                      connections=connections, seed=seed, zpk=shard.zpk, hot=hot,
                      pin_victims_reused=reused)  # fmt: skip


async def _together(configs: list[LoadConfig], cards: list) -> list[LoadReport]:
    reports: list[LoadReport | None] = [None] * len(configs)

    async def one(index: int) -> None:
        reports[index] = await run_load(configs[index], cards=cards[index])

    async with trio.open_nursery() as nursery:
        for index in range(len(configs)):
            nursery.start_soon(one, index)
    assert all(report is not None for report in reports)
    return reports  # type: ignore[return-value]


def _combined(reports: list[LoadReport], *, server_cpu_s: float, client_cpu_s: float, wall_s: float) -> Step:
    """One Step for the pair: counts and rates summed, percentiles the worse of the two."""
    steps = [step_from_report(r, server_cpu_s=0.0, client_cpu_s=client_cpu_s, wall_s=wall_s) for r in reports]
    answered = sum(s.answered for s in steps)
    codes: dict[str, int] = {}
    for step in steps:
        for code, count in step.code_mix.items():
            codes[code] = codes.get(code, 0) + count
    worst = functools.partial(max, default=0.0)
    return msgspec.structs.replace(
        steps[0],
        offered_rate_per_s=sum(s.offered_rate_per_s for s in steps),
        achieved_rate_per_s=sum(s.achieved_rate_per_s for s in steps),
        sent=sum(s.sent for s in steps), answered=answered, timeouts=sum(s.timeouts for s in steps),
        lost=sum(s.lost for s in steps), mismatches=sum(s.mismatches for s in steps),
        p50_ms=worst(s.p50_ms for s in steps), p90_ms=worst(s.p90_ms for s in steps),
        p99_ms=worst(s.p99_ms for s in steps), p999_ms=worst(s.p999_ms for s in steps),
        max_ms=worst(s.max_ms for s in steps), service_p99_ms=worst(s.service_p99_ms for s in steps),
        send_lag_p99_ms=worst(s.send_lag_p99_ms for s in steps), code_mix=codes,
        server_cpu_s=round(server_cpu_s, 3),
        cpu_s_per_1000=round(server_cpu_s / (answered / 1000), 4) if answered else None,
    )  # fmt: skip


def _step(shards: list[Shard], rate: float, args, seed: int, hot: HotCards, cards: list, reused: bool) -> Step:
    share = rate / len(shards)
    connections = max(1, args.connections // len(shards))
    configs = [_load(shard, share, args.step_seconds, connections, seed + i, hot, reused)
               for i, shard in enumerate(shards)]  # fmt: skip
    server_before = sum(shard.server.cpu_s() for shard in shards)
    client_before, wall_before = time.process_time(), time.perf_counter()
    reports = trio.run(_together, configs, cards)
    return _combined(
        reports, server_cpu_s=sum(shard.server.cpu_s() for shard in shards) - server_before,
        client_cpu_s=time.process_time() - client_before, wall_s=time.perf_counter() - wall_before,
    )  # fmt: skip


def _ramp(name: str, shards: list[Shard], args, hot: HotCards) -> list[Step]:
    cards = [load_cards(shard.cards_path) for shard in shards]
    steps: list[Step] = []
    for index, rate in enumerate(args.rates):  # bounded: RATES_MAX
        step = _step(shards, rate, args, seed=100 * index, hot=hot, cards=cards, reused=index > 0)
        steps.append(step)
        print(f"{name:<12} offered {step.offered_rate_per_s:>7,.0f}/s achieved {step.achieved_rate_per_s:>7,.0f}/s"
              f"  p50 {step.p50_ms:7.2f}  p99 {step.p99_ms:7.2f}  p99.9 {step.p999_ms:7.2f} ms"
              f"  cpu/1000 {step.cpu_s_per_1000 or 0:.3f} s  mismatches {step.mismatches}", flush=True)  # fmt: skip
        if any(not shard.server.running() for shard in shards):
            print(f"{name}: a server exited; stopping", flush=True)
            break
        if step.p99_ms > args.stop_p99_ms or step.timeouts or step.lost:
            break
        time.sleep(1.0)
    return steps


def _sustained(steps: list[Step], p99_ms: float) -> float | None:
    good = [s.offered_rate_per_s for s in steps
            if s.p99_ms < p99_ms and s.achieved_rate_per_s >= 0.95 * s.offered_rate_per_s and not s.timeouts]
    return max(good) if good else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES),
                        help="total offered rates per step, comma separated")
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=10_000, help="users (one card each), split between processes")
    parser.add_argument("--connections", type=int, default=8, help="in total; each process gets its share")
    parser.add_argument("--sustain-p99-ms", type=float, default=10.0)
    parser.add_argument("--stop-p99-ms", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.rates = tuple(float(r) for r in args.rates.split(",") if r.strip())
    except ValueError:
        print("bench.shards: --rates must be numbers, e.g. 1000,2000", file=sys.stderr)
        return 2
    if not 0 < len(args.rates) <= RATES_MAX or min(args.rates) <= 0 or not 0 < args.step_seconds <= STEP_SECONDS_MAX:
        print(f"bench.shards: 1..{RATES_MAX} positive rates and 0 < --step-seconds <= {STEP_SECONDS_MAX:g}",
              file=sys.stderr)
        return 2
    if args.users < 2 * PROCESSES or args.connections < PROCESSES:
        print(f"bench.shards: at least {2 * PROCESSES} users and {PROCESSES} connections", file=sys.stderr)
        return 2
    hot = HotCards.default()
    work = Path(tempfile.mkdtemp(prefix="authsrv-shards-"))
    verify_codes: list[int] = []
    try:
        print(f"seeding: one process with {args.users} users, {PROCESSES} with {args.users // PROCESSES} each "
              f"(in {work})", flush=True)
        single_seed = _seed(work / "one", args.users, hot, work / "one.log")
        shard_seeds = [_seed(work / f"p{i}", args.users // PROCESSES, hot, work / f"p{i}.log") for i in range(PROCESSES)]
        one = [_start(work / "one", *single_seed, work / "one.log")]
        try:
            one_steps = _ramp("1 process", one, args, hot)
        finally:
            one[0].server.stop()
        pair = []
        try:
            for i in range(PROCESSES):
                pair.append(_start(work / f"p{i}", *shard_seeds[i], work / f"p{i}.log"))
            two_steps = _ramp(f"{PROCESSES} processes", pair, args, hot)
        finally:
            for shard in pair:
                shard.server.stop()
        for data, log_name in [(work / "one", "one.log")] + [(work / f"p{i}", f"p{i}.log") for i in range(PROCESSES)]:
            verify_codes.append(ledger_verify(data, work / log_name).exit_code)
    except (TargetError, LoadError, OSError, ValueError) as error:
        print(f"bench.shards: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sustained_one = _sustained(one_steps, args.sustain_p99_ms)
    sustained_two = _sustained(two_steps, args.sustain_p99_ms)
    ratio = round(sustained_two / sustained_one, 2) if sustained_one and sustained_two else None
    result = ShardsResult(
        machine=machine_info(), settings={k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        one_process=one_steps, two_processes=two_steps, sustained_one=sustained_one, sustained_two=sustained_two,
        ratio=ratio, ledger_verify_exit_codes=verify_codes,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    print(f"sustained at p99 < {args.sustain_p99_ms:g} ms: 1 process {sustained_one or 0:,.0f}/s, "
          f"{PROCESSES} processes {sustained_two or 0:,.0f}/s (x{ratio if ratio else '-'}); "
          f"ledger verify exit codes {verify_codes}; {args.out}")
    return 0 if all(code == 0 for code in verify_codes) else 1


if __name__ == "__main__":
    sys.exit(main())
