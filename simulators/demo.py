"""`make demo` (CONTRACT.md section 1): a fresh issuer under a realistic card-network load.

Steps: initialise a fresh data directory, seed users and cards, start `authsrv serve` on free
loopback ports, wait for /readyz, drive the network simulator's mixed open-loop load (progress every
few seconds), write the clearing file of the approved purchases and apply it with
`authsrv clearing ingest` (through the running server's admin endpoint), stop the server with
SIGTERM (it must drain and exit 0), run `authsrv ledger verify`, and print the summary. Exit 0 only
when the server stopped cleanly, the ledger verified, every response matched what the simulator
expected, and every clearing record was applied.

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

import trio

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
    init_and_seed,
    authsrv_command,
    ledger_verify,
    run_cli,
    start_authsrv,
)

SEED_AMOUNT_MINOR = 1_000_000  # 10,000.00 per balance: far more than 30 s of the mix spends
DEMO_SECONDS_MAX = 3_600.0
PROGRESS_INTERVAL_S = 3.0
VERIFY_LINES_MAX = 40
DATA_MARKER = "authsrv.toml"  # only a directory holding this is ever deleted by the demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--rate", type=float, default=500.0, help="offered authorizations per second (default 500: sustained on a shared 2-core machine)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--cards-per-user", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
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


def _print_progress(progress: Progress) -> None:
    print(
        f"  t={progress.elapsed_s:5.1f}s  sent {progress.sent:>7}  answered {progress.answered:>7}"
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


def _summary(report: LoadReport, exit_code: int, verify: VerifyResult) -> tuple[list[str], list[str]]:
    """The printed summary lines and the list of failures (empty: the demo passed)."""
    latency = report.latency
    codes = "  ".join(f"{code}: {count}" for code, count in sorted(report.codes.items(), key=lambda item: -item[1]))
    lines = [
        "",
        "=" * 78,
        "authorizations by response code: " + (codes or "none"),
        f"throughput: offered {report.offered_rate_per_s:,.0f}/s, achieved {report.achieved_rate_per_s:,.0f}/s"
        f" ({report.answered} answered of {report.planned} planned in {report.elapsed_s:.1f} s)",
        f"latency (open loop, from intended send): p50 {latency.p50_ms:.2f} ms  p99 {latency.p99_ms:.2f} ms"
        f"  p99.9 {latency.p999_ms:.2f} ms  max {latency.max_ms:.2f} ms",
        f"mismatches against expected codes: {report.mismatches}   timeouts: {report.timeouts}"
        f"   lost: {report.lost}   unsent: {report.unsent}",
    ]
    for kind, detail in report.mismatch_detail.items():
        lines.append(f"  {kind}: " + ", ".join(f"expected {pair} x{count}" for pair, count in sorted(detail.items())))
    lines.append(f"server stop (SIGTERM): exit {exit_code}")
    lines.append(f"ledger verify: {'PASS' if verify.exit_code == 0 else f'FAIL (exit {verify.exit_code})'}")
    lines += ["  " + line for line in verify_lines(verify.output)]
    failures = []
    if exit_code != 0:
        failures.append(f"server exited {exit_code}")
    if verify.exit_code != 0:
        failures.append("ledger verify failed")
    if report.mismatches:
        failures.append(f"{report.mismatches} unexpected response codes")
    if report.timeouts or report.lost or report.unsent:
        failures.append(f"{report.timeouts} timeouts, {report.lost} lost, {report.unsent} unsent")
    return lines, failures


def run_demo(args: argparse.Namespace) -> int:
    data = args.data.resolve()
    fresh_data_dir(data)
    print(f"data directory: {data} (removed and recreated on each run)")
    init_log = Path(tempfile.mkstemp(prefix="authsrv-demo-", suffix=".log")[1])
    started = time.monotonic()
    print(f"initialising and seeding {args.users} users x {args.cards_per_user} cards ...", flush=True)
    cards_path = init_and_seed(data, users=args.users, cards_per_user=args.cards_per_user,
                               amount_minor=SEED_AMOUNT_MINOR, log_path=init_log)  # fmt: skip
    log_path = data / "demo.log"
    shutil.move(init_log, log_path)
    print(f"  done in {time.monotonic() - started:.1f} s; server and CLI output: {log_path}")
    ports = Ports.free()
    print(f"starting authsrv serve: ISO 8583 127.0.0.1:{ports.iso}, REST :{ports.rest}, metrics :{ports.metrics}")
    server: ChildProcess | None = None
    try:
        server = start_authsrv(data, ports, log_path)
        print(f"ready; driving {args.rate:,.0f}/s for {args.seconds:.0f} s over {args.connections} connections")
        config = LoadConfig(
            cards_path=cards_path, port=ports.iso, rate_per_s=args.rate, duration_s=args.seconds,
            connections=args.connections, seed=args.seed, zpk=load_zpk(data / "keys" / "zpk.hex"),
        )  # fmt: skip
        clearing = ClearingLog()
        report = trio.run(functools.partial(run_load, config, progress=_print_progress,
                                            progress_interval_s=PROGRESS_INTERVAL_S, clearing=clearing))  # fmt: skip
        print()
        print(report.render())
        print()
        clearing_output, clearing_summary = run_clearing(data, clearing, cards_path, log_path, args.seed)
        exit_code = server.stop()
        server = None
    finally:
        if server is not None:
            server.stop()
    verify = ledger_verify(data, log_path)
    lines, failures = _summary(report, exit_code, verify)
    lines += ["reconciliation (authsrv clearing ingest):"] + ["  " + line for line in clearing_output.splitlines()]
    failures += _clearing_failures(clearing_summary)
    print("\n".join(lines))
    print("RESULT: " + ("PASS" if not failures else "FAIL - " + "; ".join(failures)))
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.seconds <= DEMO_SECONDS_MAX:
        print(f"error: --seconds must be in (0, {DEMO_SECONDS_MAX:.0f}]", file=sys.stderr)
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
