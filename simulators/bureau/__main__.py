"""`python -m simulators.bureau --port N --delay S`: the bureau on 127.0.0.1 until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from simulators.bureau.server import DELAY_S_MAX, ORDERS_MAX, serve_bureau


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators.bureau", description=__doc__)
    parser.add_argument("--port", type=int, default=8780, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--delay", type=float, default=5.0,
                        help="seconds from an order's arrival until it is PRODUCED (stands in for 48 hours)")
    parser.add_argument("--orders-max", type=int, default=ORDERS_MAX, help="orders held in memory at most")
    return parser


async def _main(port: int, delay_s: float, orders_max: int) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(lambda task_status: serve_bureau(
                port=port, delay_s=delay_s, orders_max=orders_max, shutdown=stop, task_status=task_status))
            print(f"bureau listening on http://127.0.0.1:{bound} (delay {delay_s} s)", flush=True)
            async for _ in signals:
                stop.set()
                break


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port < 65536 or not 0 <= args.delay <= DELAY_S_MAX or not 1 <= args.orders_max <= ORDERS_MAX:
        print(f"bureau: port 0..65535, delay 0..{DELAY_S_MAX} s, orders-max 1..{ORDERS_MAX}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trio.run(_main, args.port, args.delay, args.orders_max)
    return 0


if __name__ == "__main__":
    sys.exit(main())
