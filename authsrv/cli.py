"""The `authsrv` command line (docs/contract.md, commands).

Each subcommand is a thin shell over a library function; imports are lazy so `authsrv --help` is fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def _cmd_init(args: argparse.Namespace) -> int:
    from authsrv.store.init import InitError, init_data_dir

    try:
        init_data_dir(args.data)
    except InitError as error:
        print(f"authsrv init: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from authsrv.app import serve_main

    return serve_main(
        args.data, iso_port=args.iso_port, rest_port=args.rest_port, metrics_port=args.metrics_port
    )


def _cmd_seed(args: argparse.Namespace) -> int:
    from authsrv.store.seed import SeedError, seed

    try:
        report = seed(
            args.data,
            users=args.users,
            cards_per_user=args.cards_per_user,
            amount=args.amount,
            currency=args.currency,
            out=args.out,
            partner=args.partner,
            config_id=args.config_id,
            progress=not args.quiet,
            unlinked=args.unlinked,
        )
    except SeedError as error:
        print(f"authsrv seed: {error}", file=sys.stderr)
        return 2
    print(report.summary() if hasattr(report, "summary") else report)
    return 0


def _cmd_ledger_verify(args: argparse.Namespace) -> int:
    from authsrv.config import ConfigError, load_config
    from ledger.verify import verify

    try:
        cluster = load_config(args.data).cluster if (args.data / "authsrv.toml").exists() else None
    except ConfigError as error:
        print(f"authsrv ledger verify: {error}", file=sys.stderr)
        return 2
    if cluster is not None:
        from authsrv.cluster.node import verify_shard

        report = verify_shard(args.data, load_config(args.data))
    else:
        report = verify(args.data / "ledger")
    print(report.to_json())
    return 0 if report.ok else 1


def _cmd_cluster_join(args: argparse.Namespace) -> int:
    from authsrv.cluster.join import JoinError, join

    try:
        join(args.data, args.source, args.node)
    except JoinError as error:
        print(f"authsrv cluster join: {error}", file=sys.stderr)
        return 2
    print(f"{args.data}: node {args.node}; it catches up from the shard's stream when started")
    return 0


def _cmd_partner_add(args: argparse.Namespace) -> int:
    from authsrv.store.partners import PartnerError, add_partner

    try:
        add_partner(args.data, args.name)
    except PartnerError as error:
        print(f"authsrv partner add: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_clearing_ingest(args: argparse.Namespace) -> int:
    from authsrv.clearing.cli import ingest_main

    return ingest_main(args.data, args.file, args.summary_out)


def _cmd_fees_run(args: argparse.Namespace) -> int:
    from authsrv.feesrun import fees_run_main

    return fees_run_main(args.data, args.date)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="authsrv", description="authsrv issuer processor")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_data(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data", type=Path, required=True, help="data directory")
        return p

    p = with_data(commands.add_parser("init", help="create a data directory"))
    p.set_defaults(run=_cmd_init)

    p = with_data(commands.add_parser("serve", help="run the ISO 8583, REST and metrics listeners"))
    p.add_argument("--iso-port", type=int)
    p.add_argument("--rest-port", type=int)
    p.add_argument("--metrics-port", type=int)
    p.set_defaults(run=_cmd_serve)

    p = with_data(commands.add_parser("seed", help="create funded users with active cards"))
    p.add_argument("--users", type=_positive, required=True)
    p.add_argument("--cards-per-user", type=_positive, default=1)
    p.add_argument("--amount", type=int, default=100_000, help="minor units per balance")
    p.add_argument("--currency", default="EUR")
    p.add_argument("--out", type=Path, help="cards file (default DIR/cards.jsonl)")
    p.add_argument("--partner", default="demo")
    p.add_argument("--config-id", default="0019167984")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--unlinked", action="store_true",
                   help="for a partner with balance_mode = \"external\": create the balances without telling the"
                        " partner (you link them there yourself); without it, seeding such a partner is refused")
    p.set_defaults(run=_cmd_seed)

    ledger = commands.add_parser("ledger", help="ledger tools").add_subparsers(dest="ledger_command", required=True)
    p = with_data(ledger.add_parser("verify", help="rebuild the ledger and check every invariant"))
    p.set_defaults(run=_cmd_ledger_verify)

    partner = commands.add_parser("partner", help="partners").add_subparsers(dest="partner_command", required=True)
    p = with_data(partner.add_parser("add", help="add a partner with its client certificate"))
    p.add_argument("name")
    p.set_defaults(run=_cmd_partner_add)

    clearing = commands.add_parser("clearing", help="clearing").add_subparsers(dest="clearing_command", required=True)
    p = with_data(clearing.add_parser("ingest", help="apply a clearing file"))
    p.add_argument("file", type=Path)
    p.add_argument("--summary-out", type=Path, help="summary JSON (default FILE.summary.json)")
    p.set_defaults(run=_cmd_clearing_ingest)

    cluster = commands.add_parser("cluster", help="replication").add_subparsers(dest="cluster_command", required=True)
    p = cluster.add_parser("join", help="make a standby's data directory from an existing node's")
    p.add_argument("--data", type=Path, required=True, help="the new node's data directory")
    p.add_argument("--from", dest="source", type=Path, required=True, help="an existing node's data directory")
    p.add_argument("--node", required=True, help="the new node's name, unique in the shard")
    p.set_defaults(run=_cmd_cluster_join)

    fees = commands.add_parser("fees", help="fees").add_subparsers(dest="fees_command", required=True)
    p = with_data(fees.add_parser("run", help="charge the monthly fees of a month, once (server stopped)"))
    p.add_argument("--date", required=True, help="YYYY-MM-DD: any day of the month to charge")
    p.set_defaults(run=_cmd_fees_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # `authsrv ledger verify | head` should end quietly, as any Unix filter does. Never for
        # serve: a peer that resets its connection would then kill the server with SIGPIPE.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return args.run(args)
    except Exception as error:
        from authsrv.cluster.session import ShardBusy

        if not isinstance(error, ShardBusy):
            raise
        print(f"authsrv {args.command}: {error}", file=sys.stderr)  # a cluster node's shard, not this data
        return 2


if __name__ == "__main__":
    sys.exit(main())
