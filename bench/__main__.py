"""`python -m bench` (`make bench`): authsrv against the baseline (postgres) and the floor (codec +
transport only); writes bench/results/latest.{json,png}."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.harness import TARGETS, BenchConfig, run_bench, summary


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short steps at modest rates (a smoke test)")
    parser.add_argument("--rates", type=_floats, default=None,
                        help="offered rates, rising, e.g. 1000,2000,4000 (default: 250 .. 10000)")
    parser.add_argument("--step-seconds", type=float, default=None, help="seconds per rate step")
    parser.add_argument("--warmup-seconds", type=float, default=None, help="unrecorded load before the steps")
    parser.add_argument("--users", type=int, default=None, help="users to seed (one card each)")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--hot-cards", type=float, default=None, metavar="FRACTION",
                        help="share of the cards that are hot (default 0.01; 0: uniform picks)")
    parser.add_argument("--hot-share", type=float, default=None, metavar="FRACTION",
                        help="share of the purchases the hot cards get (default 0.2; 0: uniform picks)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="a comma-separated subset, e.g. authsrv,floor")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        key: value
        for key, value in {
            "rates": args.rates,
            "step_seconds": args.step_seconds,
            "warmup_s": args.warmup_seconds,
            "users": args.users,
            "connections": args.connections,
            "hot_cards": args.hot_cards,
            "hot_share": args.hot_share,
        }.items()
        if value is not None
    }
    overrides["targets"] = tuple(part.strip() for part in args.targets.split(",") if part.strip())
    overrides["out_dir"] = args.out_dir
    try:
        config = BenchConfig.quick_preset(**overrides) if args.quick else BenchConfig(**overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        results = run_bench(config)
    except KeyboardInterrupt:
        return 130
    print()
    print(summary(results))
    print(f"\nwrote {config.out_dir / 'latest.json'} and {config.out_dir / 'latest.png'}")
    return 1 if any(target.error for target in results.targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
