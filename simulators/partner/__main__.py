"""`python -m simulators.partner`: the partner simulator on 127.0.0.1 until SIGINT/SIGTERM.

Prints `partner simulator listening on 127.0.0.1:PORT` once it is ready. The knobs are described
in `simulators/partner/__init__.py` (and below); `POST /_sim/mode` changes them at run time.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from simulators.partner import __doc__ as PACKAGE_DOC
from simulators.partner.jwe import SimKey
from simulators.partner.server import PartnerSimSettings, serve_partner
from simulators.partner.state import LATENCY_MS_MAX, Latency
from simulators.partner.wire import DEBIT_DECLINES, Title


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.partner", description=PACKAGE_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--port", type=int, default=8790, help="port on 127.0.0.1 (0: any free port)")
    add("--latency-ms", type=float, default=0.0, help="fixed latency of every partner call, ms")
    add("--latency-median-ms", type=float, default=None, help="lognormal latency: median, ms")
    add("--latency-p99-ms", type=float, default=None, help="lognormal latency: 99th percentile, ms")
    add("--fail-5xx", type=float, default=0.0, help="probability of answering 500 without applying")
    add("--timeout-rate", type=float, default=0.0, help="probability of answering only after --timeout-ms")
    add("--timeout-ms", type=float, default=5_000.0, help="how late a 'timeout' answer comes, ms")
    add("--drop-rate", type=float, default=0.0, help="probability of dropping the connection after applying")
    add("--no-amount-codes", action="store_true",
        help="do not force 422s by amount ending (51 INSUFFICIENT_FUNDS, 61 LIMITS_EXCEEDED, 59 FRAUDS_DETECTED)")
    add("--force-user", action="append", default=[], metavar="USER=CODE",
        help=f"force a 422 for this user's balances; CODE one of {', '.join(DEBIT_DECLINES)} (repeatable)")
    add("--initial-balance", type=int, default=0, help="amount (minor units) of a newly linked balance")
    add("--currency", default="EUR", help="currency of balances set by /_sim without one")
    add("--seed", type=int, default=None, help="seed of the latency and fault draws")
    add("--jwe-key", type=Path, default=None, help="PEM RSA private key (default: a new one per run)")
    add("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    add("--tls-key", type=Path, default=None, help="... and this key (PEM)")
    add("--client-ca", type=Path, default=None, help="require client certificates signed by this CA")
    add("--no-key-required", action="store_true", help="accept calls without X-Idempotency-Key")
    add("--plain-otp", action="store_true", help="accept OTP notifications that are not JWE-encrypted")
    add("--log-level", default="INFO")
    return parser


def _settings(args: argparse.Namespace) -> PartnerSimSettings:
    """Raises ValueError with a message for the operator."""
    if (args.latency_median_ms is None) != (args.latency_p99_ms is None):
        raise ValueError("--latency-median-ms and --latency-p99-ms go together")
    if args.latency_median_ms is not None:
        if not 0 < args.latency_median_ms < args.latency_p99_ms <= LATENCY_MS_MAX:
            raise ValueError(f"need 0 < median < p99 <= {LATENCY_MS_MAX} ms")
        latency = Latency(median_ms=args.latency_median_ms, p99_ms=args.latency_p99_ms)
    else:
        if not 0 <= args.latency_ms <= LATENCY_MS_MAX:
            raise ValueError(f"--latency-ms must be 0..{LATENCY_MS_MAX}")
        latency = Latency.fixed(args.latency_ms)
    forced = {}
    for item in args.force_user:
        user, _, code = item.partition("=")
        if not user or code not in {title.value for title in DEBIT_DECLINES}:
            raise ValueError(f"--force-user {item!r}: want USER=CODE, CODE one of {', '.join(DEBIT_DECLINES)}")
        forced[user] = Title(code)
    return PartnerSimSettings(
        port=args.port, latency=latency, fail_5xx=args.fail_5xx, timeout_rate=args.timeout_rate,
        timeout_ms=args.timeout_ms, drop_rate=args.drop_rate, amount_codes=not args.no_amount_codes,
        forced_users=forced, initial_amount_minor=args.initial_balance, currency=args.currency,
        seed=args.seed, jwe_key=SimKey.load(args.jwe_key) if args.jwe_key else None,
        tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca,
        idempotency_key_required=not args.no_key_required, otp_encryption_required=not args.plain_otp,
    )


async def _main(settings: PartnerSimSettings) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            sim = await nursery.start(serve_partner, settings)
            print(f"partner simulator listening on 127.0.0.1:{sim.port}", flush=True)
            async for _ in signals:
                sim.stop()
                break


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except (ValueError, OSError) as error:
        print(f"partner simulator: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trio.run(_main, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
