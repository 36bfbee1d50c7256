"""`make demo` (docs/contract.md, commands): a fresh issuer under a realistic card-network load.

Two partners (issue 5): `demo` holds its users' balances here (internal), `ext` holds them itself
(external): its `api_url` is the partner simulator, started as its own process on a free loopback
port, answering in ~5 ms with no forced declines (`--no-amount-codes`). Half the users are each's.

Steps: initialise a fresh data directory, start the partner simulator, add partner `ext` with
`balance_mode = "external"`, seed both partners' users and cards, tell the simulator the external
balances, start `authsrv serve` on free loopback ports, wait for /readyz, drive the network
simulator's mixed open-loop load at each partner's cards (half the rate each, progress every few
seconds), read the partner calls from /metrics, write the clearing file of the approved purchases
and apply it with `authsrv clearing ingest` (through the running server's admin endpoint), stop the
server with SIGTERM (it must drain and exit 0), run `authsrv ledger verify`, and print the summary.
Exit 0 only when the server stopped cleanly, the ledger verified, every response matched what the
simulator expected, and every clearing record was applied.

    python -m simulators.demo [--seconds 30] [--rate 500] [--users 2000] [--data ./demo-data]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio

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
from simulators.network.cards import load_cards
from simulators.network.clearing import ClearingLog
from simulators.network.load import LoadConfig, LoadError, Progress, run_load
from simulators.network.pinblock import load_zpk
from simulators.network.report import LoadReport
from simulators.network.target import (
    ChildProcess,
    Ports,
    TargetError,
    VerifyResult,
    authsrv_command,
    free_port,
    ledger_verify,
    run_cli,
    start_authsrv,
)

SEED_AMOUNT_MINOR = 1_000_000  # 10,000.00 per balance: far more than 30 s of the mix spends
DEMO_SECONDS_MAX = 3_600.0
PROGRESS_INTERVAL_S = 3.0
VERIFY_LINES_MAX = 40
DATA_MARKER = "authsrv.toml"  # only a directory holding this is ever deleted by the demo
INTERNAL_PARTNER = "demo"  # from `authsrv init`: balances held here
EXTERNAL_PARTNER = "ext"  # added by the demo: balances held at the partner simulator
PARTNER_LATENCY_MS = 5.0  # the simulated partner's answer time (fixed)
# No forced 422s by amount ending: the mix's random amounts would otherwise end in 51/59/61 now and
# then and be declined, which the network simulator (which knows nothing of the partner) does not expect.
PARTNER_SIM_ARGS = ("--latency-ms", f"{PARTNER_LATENCY_MS:g}", "--no-amount-codes")
# Share of the offered rate sent to the external partner's cards. Far below one half because each
# external call costs authsrv ~2 ms of CPU in httpx on the reference VM (docs/benchmarks.md,
# section 4) and the simulator ~3 ms, both on the same two cores as the server and the load.
EXTERNAL_RATE_SHARE = 0.1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--rate", type=float, default=500.0, help="offered authorizations per second (default 500: sustained on a shared 2-core machine)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--cards-per-user", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--external-share", type=float, default=EXTERNAL_RATE_SHARE,
                        help=f"share of --rate sent to partner {EXTERNAL_PARTNER}'s cards (default {EXTERNAL_RATE_SHARE})")
    parser.add_argument("--data", type=Path, default=Path("demo-data"),
                        help="data directory, removed and recreated on each run")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    return parser


def fresh_data_dir(data: Path) -> None:
    """Remove a previous demo's data directory; refuse to touch anything that is not one."""
    if not data.exists():
        return
    if not data.is_dir():
        raise TargetError(f"{data} exists and is not a directory; choose another --data")
    if any(data.iterdir()) and not (data / DATA_MARKER).is_file():
        raise TargetError(f"{data} is not empty and holds no {DATA_MARKER}: not removing it; choose another --data")
    shutil.rmtree(data)


@attrs.frozen
class PartnerLoad:
    """One partner's share of the load: its cards file and what the simulator measured on it."""

    partner: str
    balance_mode: str  # "internal" | "external"
    cards_path: Path
    report: LoadReport


def _print_progress(label: str, progress: Progress) -> None:
    print(
        f"  {label:<5} t={progress.elapsed_s:5.1f}s  sent {progress.sent:>7}  answered {progress.answered:>7}"
        f"  {progress.rate_per_s:>7,.0f}/s  p99 {progress.latency_p99_ms:7.2f} ms"
        f"  timeouts {progress.timeouts}  mismatches {progress.mismatches}",
        flush=True,
    )


def verify_lines(output: str) -> list[str]:
    """The verdict and per-currency totals of `authsrv ledger verify`'s JSON, one line per currency.

    Falls back to the raw text (bounded) when the output is not the JSON object expected."""
    try:
        summary = json.loads(output)
    except ValueError:
        summary = None
    if not isinstance(summary, dict):
        return output.splitlines()[:VERIFY_LINES_MAX]
    lines = [f"{key}: {summary[key]}" for key in ("ok", "pending_holds", "last_seq") if key in summary]
    problems = summary.get("problems") or []
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines += [f"  {problem}" for problem in problems[:VERIFY_LINES_MAX]]
    totals = summary.get("totals")
    if isinstance(totals, dict):
        lines.append("totals (minor units):")
        for currency, kinds in totals.items():
            if not isinstance(kinds, dict):
                lines.append(f"  {currency}: {kinds}")
                continue
            parts = [
                f"{kind} {entry['balance']:,}" if isinstance(entry, dict) and isinstance(entry.get("balance"), int)
                else f"{kind} {entry}"
                for kind, entry in kinds.items()
            ]  # fmt: skip
            lines.append(f"  {currency}: " + ", ".join(parts))
    return lines


def run_clearing(data: Path, clearing: ClearingLog, cards_path: Path, log_path: Path, seed: int) -> tuple[str, dict]:
    """Write the clearing file of the traffic sent and apply it through the running server."""
    path = data / "clearing.jsonl"
    counts = clearing.write(path, rng=random.Random(seed), force_post_card=load_cards(cards_path)[0])
    print(f"clearing file {path}: {counts.records} records ({counts.exact} exact, {counts.under} under,"
          f" {counts.over} over, {counts.split} split, {counts.forced} force post, {counts.refunds} refund)")
    output = run_cli(authsrv_command("clearing", "ingest", "--data", str(data), str(path)), log_path=log_path)
    summary = json.loads((data / "clearing.jsonl.summary.json").read_text())
    return output, summary


def _clearing_failures(summary: dict) -> list[str]:
    refused = [entry for entry in summary.get("exceptions", []) if not entry.get("posted")]
    failures = [f"{len(refused)} clearing records not applied"] if refused else []
    if not summary.get("matched"):
        failures.append("no clearing record matched an authorization")
    return failures


def _codes(codes: dict[str, int]) -> str:
    return "  ".join(f"{code}: {count}" for code, count in sorted(codes.items(), key=lambda item: -item[1])) or "none"


def _partner_lines(load: PartnerLoad) -> list[str]:
    report, latency = load.report, load.report.latency
    lines = [
        f"partner {load.partner} ({load.balance_mode} balances): {_codes(report.codes)}",
        f"  throughput: offered {report.offered_rate_per_s:,.0f}/s, achieved {report.achieved_rate_per_s:,.0f}/s"
        f" ({report.answered} answered of {report.planned} planned in {report.elapsed_s:.1f} s)",
        f"  latency (open loop, from intended send): p50 {latency.p50_ms:.2f} ms  p99 {latency.p99_ms:.2f} ms"
        f"  p99.9 {latency.p999_ms:.2f} ms  max {latency.max_ms:.2f} ms",
        f"  mismatches against expected codes: {report.mismatches}   timeouts: {report.timeouts}"
        f"   lost: {report.lost}   unsent: {report.unsent}",
    ]
    for kind, detail in report.mismatch_detail.items():
        lines.append(f"    {kind}: " + ", ".join(f"expected {pair} x{count}" for pair, count in sorted(detail.items())))
    return lines


def _summary(loads: list[PartnerLoad], external: list[ExternalFigures], exit_code: int,
             verify: VerifyResult) -> tuple[list[str], list[str]]:  # fmt: skip
    """The printed summary lines and the list of failures (empty: the demo passed)."""
    total_codes: dict[str, int] = {}
    for load in loads:
        for code, count in load.report.codes.items():
            total_codes[code] = total_codes.get(code, 0) + count
    offered = sum(load.report.offered_rate_per_s for load in loads)
    achieved = sum(load.report.achieved_rate_per_s for load in loads)
    lines = [
        "",
        "=" * 78,
        "authorizations by response code: " + _codes(total_codes),
        f"throughput: offered {offered:,.0f}/s, achieved {achieved:,.0f}/s (both partners)",
    ]
    for load in loads:
        lines += _partner_lines(load)
    lines += [figures.render() for figures in external]
    lines.append(f"server stop (SIGTERM): exit {exit_code}")
    lines.append(f"ledger verify: {'PASS' if verify.exit_code == 0 else f'FAIL (exit {verify.exit_code})'}")
    lines += ["  " + line for line in verify_lines(verify.output)]
    failures = []
    if exit_code != 0:
        failures.append(f"server exited {exit_code}")
    if verify.exit_code != 0:
        failures.append("ledger verify failed")
    for load in loads:
        report = load.report
        if report.mismatches:
            failures.append(f"{report.mismatches} unexpected response codes (partner {load.partner})")
        if report.timeouts or report.lost or report.unsent:
            failures.append(f"{report.timeouts} timeouts, {report.lost} lost, {report.unsent} unsent"
                            f" (partner {load.partner})")  # fmt: skip
    for figures in external:
        if not figures.calls:
            failures.append(f"no external balance call reached partner {figures.partner}")
    return lines, failures


def _prepare_data(data: Path, args: argparse.Namespace, sim_url: str, log_path: Path) -> dict[str, Path]:
    """init (done by the caller), partner `ext` external at `sim_url`, both partners seeded:
    half the users each. Returns each partner's cards file."""
    internal_users = max(1, args.users // 2)
    external_users = max(1, args.users - internal_users)
    add_external_partner(data, EXTERNAL_PARTNER, sim_url, log_path)
    cards = {
        INTERNAL_PARTNER: seed_partner(data, INTERNAL_PARTNER, users=internal_users, cards_per_user=args.cards_per_user,
                                       amount_minor=SEED_AMOUNT_MINOR, out=data / "cards.jsonl", log_path=log_path),
        EXTERNAL_PARTNER: seed_partner(data, EXTERNAL_PARTNER, users=external_users, cards_per_user=args.cards_per_user,
                                       amount_minor=collateral_per_user(external_users, SEED_AMOUNT_MINOR),
                                       out=data / "cards-ext.jsonl", log_path=log_path),
    }  # fmt: skip
    # The partner holds SEED_AMOUNT_MINOR per balance; the deposit here covers more (collateral_per_user).
    linked = link_balances(sim_url, cards[EXTERNAL_PARTNER], SEED_AMOUNT_MINOR)
    print(f"  {internal_users} users on partner {INTERNAL_PARTNER} (internal balances), {external_users} on"
          f" {EXTERNAL_PARTNER} (external: {linked} balances of {SEED_AMOUNT_MINOR} linked at {sim_url})")
    return cards


async def _drive(configs: dict[str, LoadConfig], clearing: ClearingLog) -> dict[str, LoadReport]:
    """Each partner's load at once, in one event loop: one schedule per partner's cards."""
    reports: dict[str, LoadReport] = {}

    async def one(partner: str, config: LoadConfig) -> None:
        reports[partner] = await run_load(config, progress=functools.partial(_print_progress, partner),
                                          progress_interval_s=PROGRESS_INTERVAL_S, clearing=clearing)  # fmt: skip

    async with trio.open_nursery() as nursery:
        for partner, config in configs.items():
            nursery.start_soon(one, partner, config)
    assert set(reports) == set(configs)
    return reports


def _load_configs(cards: dict[str, Path], args: argparse.Namespace, port: int, zpk: bytes) -> dict[str, LoadConfig]:
    assert set(cards) == {INTERNAL_PARTNER, EXTERNAL_PARTNER}
    rates = {INTERNAL_PARTNER: args.rate * (1 - args.external_share), EXTERNAL_PARTNER: args.rate * args.external_share}
    return {
        partner: LoadConfig(
            cards_path=path, port=port, rate_per_s=rates[partner], duration_s=args.seconds,
            connections=max(1, args.connections // len(cards)), seed=args.seed + index, zpk=zpk,
            rrn_tag=f"{(args.seed + index) % 1000:03d}",  # distinct per partner: RRNs key the clearing log
        )
        for index, (partner, path) in enumerate(cards.items())
    }  # fmt: skip


def run_demo(args: argparse.Namespace) -> int:
    data = args.data.resolve()
    fresh_data_dir(data)
    print(f"data directory: {data} (removed and recreated on each run)")
    init_log = Path(tempfile.mkstemp(prefix="authsrv-demo-", suffix=".log")[1])
    started = time.monotonic()
    run_cli(authsrv_command("init", "--data", str(data)), log_path=init_log)
    log_path = data / "demo.log"
    shutil.move(init_log, log_path)
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    print(f"starting the partner simulator for {EXTERNAL_PARTNER} on {sim_url} ({' '.join(PARTNER_SIM_ARGS)})")
    sim: ChildProcess | None = start_partner_sim(sim_port, data / "partner-sim.log", PARTNER_SIM_ARGS)
    server: ChildProcess | None = None
    try:
        print(f"initialising and seeding {args.users} users x {args.cards_per_user} cards ...", flush=True)
        cards = _prepare_data(data, args, sim_url, log_path)
        print(f"  done in {time.monotonic() - started:.1f} s; server and CLI output: {log_path}")
        ports = Ports.free()
        print(f"starting authsrv serve: ISO 8583 127.0.0.1:{ports.iso}, REST :{ports.rest}, metrics :{ports.metrics}")
        server = start_authsrv(data, ports, log_path)
        print(f"ready; driving {args.rate:,.0f}/s for {args.seconds:.0f} s over {args.connections} connections,"
              f" {args.external_share:.0%} of it at partner {EXTERNAL_PARTNER}'s cards")  # fmt: skip
        clearing = ClearingLog()
        configs = _load_configs(cards, args, ports.iso, load_zpk(data / "keys" / "zpk.hex"))
        reports = trio.run(_drive, configs, clearing)
        loads = [PartnerLoad(partner, "external" if partner == EXTERNAL_PARTNER else "internal", cards[partner],
                             reports[partner]) for partner in cards]  # fmt: skip
        for load in loads:
            print(f"\n-- partner {load.partner} ({load.balance_mode} balances) --")
            print(load.report.render())
        print()
        external = [external_figures(scrape_metrics(ports.metrics), EXTERNAL_PARTNER)]
        clearing_output, clearing_summary = run_clearing(data, clearing, cards[INTERNAL_PARTNER], log_path, args.seed)
        exit_code = server.stop()
        server = None
    finally:
        if server is not None:
            server.stop()
        if sim is not None:
            sim.stop()
    verify = ledger_verify(data, log_path)
    lines, failures = _summary(loads, external, exit_code, verify)
    lines += ["reconciliation (authsrv clearing ingest):"] + ["  " + line for line in clearing_output.splitlines()]
    failures += _clearing_failures(clearing_summary)
    print("\n".join(lines))
    print("RESULT: " + ("PASS" if not failures else "FAIL - " + "; ".join(failures)))
    print(panel_hint(data))
    return 0 if not failures else 1


def panel_hint(data: Path) -> str:
    """How to open the Administration Panel (docs/panel.md) after the demo."""
    return "\n".join([
        "",
        "Administration panel: `make panel` starts a server with demo data and gentle traffic and prints",
        "its URL, the admin password and the CA to trust. On this demo's data instead:",
        f"  .venv/bin/authsrv serve --data {data}",
        "  then open https://127.0.0.1:8443/panel/ as `admin` with the password in"
        f" {data / 'admin-password'} (docs/panel.md).",
    ])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.seconds <= DEMO_SECONDS_MAX:
        print(f"error: --seconds must be in (0, {DEMO_SECONDS_MAX:.0f}]", file=sys.stderr)
        return 2
    if not 0 < args.external_share < 1:
        print("error: --external-share must be between 0 and 1 (both partners get some load)", file=sys.stderr)
        return 2
    try:
        return run_demo(args)
    except (TargetError, LoadError, ValueError, OSError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; server stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
