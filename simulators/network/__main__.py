"""`python -m simulators.network`: drive open-loop ISO 8583 load at a server and print the report.

Hot cards are off by default (a plain `authsrv seed` funds every card alike); `--hot-cards 0.01
--hot-share 0.2` (what `make bench` uses) gives the first cards of the file 20% of the purchases.
Seed them with a larger balance first (target.init_and_seed(hot=...) does it; by hand, run
`authsrv seed` for the hot users first with a larger --amount) or a long run will find them out of
funds (51 where 00 is expected).
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
from pathlib import Path

import trio

from simulators.network.cards import load_cards
from simulators.network.clearing import ClearingLog
from simulators.network.codec import Codec
from simulators.network.load import LoadConfig, LoadError, Progress, run_load
from simulators.network.mix import HOT_CARDS_FRACTION_DEFAULT, HOT_SHARE_DEFAULT, HotCards, MixWeights
from simulators.network.pinblock import load_zpk


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators.network", description=__doc__)
    parser.add_argument("--cards", type=Path, required=True, help="cards file written by `authsrv seed --out`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8583)
    parser.add_argument("--rate", type=float, default=1000.0, help="offered requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of schedule (0: use --count only)")
    parser.add_argument("--count", type=int, default=None, help="requests at most")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--outstanding", type=int, default=1000, help="in flight per connection at most")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before a request counts as timed out")
    parser.add_argument("--echo-interval", type=float, default=3.0, help="seconds between 0800 echoes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mix", default="", help="weight overrides, e.g. purchase=50,atm=10")
    parser.add_argument("--hot-cards", type=float, default=0.0, metavar="FRACTION",
                        help=f"share of the cards that are hot: the first ones of the file (default 0: uniform "
                             f"picks; the bench uses {HOT_CARDS_FRACTION_DEFAULT})")
    parser.add_argument("--hot-share", type=float, default=HOT_SHARE_DEFAULT, metavar="FRACTION",
                        help="share of the purchase-type requests that go to the hot cards, when --hot-cards > 0")
    parser.add_argument("--zpk-file", type=Path, default=None, help="DIR/keys/zpk.hex of the server")
    parser.add_argument("--codec", choices=[codec.value for codec in Codec], default=Codec.fast.value)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--clearing-out", type=Path, default=None,
                        help="write the clearing file of the approved purchases here (docs/contract.md, clearing file)")
    parser.add_argument("--progress", type=float, default=5.0, help="seconds between progress lines (0: none)")
    return parser


def _print_progress(progress: Progress) -> None:
    print(
        f"t={progress.elapsed_s:>6.1f}s  sent {progress.sent}  answered {progress.answered}"
        f"  rate {progress.rate_per_s:,.0f}/s  p99 {progress.latency_p99_ms:.2f} ms"
        f"  timeouts {progress.timeouts}  mismatches {progress.mismatches}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = LoadConfig(
            cards_path=args.cards,
            host=args.host,
            port=args.port,
            rate_per_s=args.rate,
            duration_s=args.duration or None,
            count=args.count,
            connections=args.connections,
            outstanding_per_connection_max=args.outstanding,
            timeout_s=args.timeout,
            echo_interval_s=args.echo_interval,
            seed=args.seed,
            weights=MixWeights.parse(args.mix),
            hot=HotCards(fraction=args.hot_cards, share=args.hot_share),
            zpk=load_zpk(args.zpk_file) if args.zpk_file else None,
            codec=Codec(args.codec),
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    progress = _print_progress if args.progress > 0 else None
    try:
        interval_s = args.progress or 5.0
        clearing = ClearingLog() if args.clearing_out else None
        report = trio.run(functools.partial(run_load, config, progress=progress, progress_interval_s=interval_s,
                                            clearing=clearing))
    except (LoadError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(report.render())
    if args.json:
        args.json.write_bytes(report.to_json())
    if clearing is not None:
        cards = load_cards(config.cards_path)
        counts = clearing.write(args.clearing_out, rng=random.Random(args.seed), force_post_card=cards[0])
        print(f"clearing file {args.clearing_out}: {counts.records} records ({counts.exact} exact, {counts.under}"
              f" under, {counts.over} over, {counts.split} split, {counts.forced} force post, {counts.refunds} refund)")
    return 0 if report.mismatches == 0 and report.timeouts == 0 and not report.connection_errors else 1


if __name__ == "__main__":
    sys.exit(main())
