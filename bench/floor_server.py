"""The benchmark's floor: codec + transport only, a Python ISO 8583 server on trio (issue 7 names it
the floor; the baseline is the PostgreSQL implementation, bench/pg_baseline.py).

Same wire profile as authsrv (docs/contract.md, wire profile: 2-byte big-endian length, pyiso8583
`specs.default`). Each request is decoded with pyiso8583, answered `00` with the echoed fields and
an authorization code, encoded with pyiso8583 and written. No ledger, no fsync, no checks: whatever
authsrv costs beyond this is the price of its actual work. Responses to all frames of one receive
are written with one `send_all`, as a good server would (batching multiplies the rate).

    python -m bench.floor_server --port N
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys

import iso8583
import iso8583.specs
import trio

from simulators.network.codec import FrameReader, FramingError, frame

SPEC = iso8583.specs.default
RECEIVE_SIZE_MAX = 65_536  # bytes per receive_some
ECHOED_FIELDS = ("2", "3", "4", "6", "7", "11", "32", "37", "41", "42", "49", "51")  # docs/contract.md, wire profile
ECHOED_FIELDS_MANAGEMENT = ("7", "11", "70")
AUTHORIZATION_CODE = "FLOOR1"


def build_response(request: dict[str, str]) -> dict[str, str]:
    """The `00` answer: response MTI, the echoed fields, 39, and 38 for financial messages."""
    mti = request["t"]
    response_mti = mti[:2] + str(int(mti[2]) + 1) + mti[3]
    management = mti.startswith("08")
    fields = ECHOED_FIELDS_MANAGEMENT if management else ECHOED_FIELDS
    response = {key: request[key] for key in fields if key in request}
    response["t"] = response_mti
    response["39"] = "00"
    if not management:
        response["38"] = AUTHORIZATION_CODE
    return response


def answer(payload: bytes) -> bytes:
    """Decode one request, build its response, encode it (pyiso8583 both ways)."""
    request, _ = iso8583.decode(payload, SPEC)
    raw, _ = iso8583.encode(build_response(request), SPEC)
    return bytes(raw)


class Stats:
    def __init__(self) -> None:
        self.answered = 0
        self.undecodable = 0


STATS = Stats()


async def handle_connection(stream: trio.SocketStream) -> None:
    # serve_listeners lets a handler error crash the server: contain one bad peer here.
    reader = FrameReader()
    try:
        while True:  # bounded by the peer: ends at EOF or a broken stream
            data = await stream.receive_some(RECEIVE_SIZE_MAX)
            if not data:
                return
            responses = []
            for payload in reader.feed(data):
                try:
                    responses.append(frame(answer(payload)))
                except (iso8583.DecodeError, iso8583.EncodeError, KeyError, ValueError):
                    STATS.undecodable += 1  # framing intact: keep the connection, drop the frame
            if responses:
                STATS.answered += len(responses)
                await stream.send_all(b"".join(responses))
    except (trio.BrokenResourceError, trio.ClosedResourceError, FramingError):
        pass
    finally:
        await stream.aclose()


async def serve_floor(
    port: int,
    *,
    host: str = "127.0.0.1",
    handler=handle_connection,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `await nursery.start(serve_floor, 0)` returns the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    task_status.started(bound_port)
    await trio.serve_listeners(handler, listeners)


async def _main(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound_port = await nursery.start(functools.partial(serve_floor, port, host=host))
            print(f"floor ISO 8583 server listening on {host}:{bound_port}", flush=True)
            async for _ in signals:  # the first SIGTERM or SIGINT ends the server with exit 0
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8583, help="TCP port (0: any free port, printed)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT is handled in _main; this covers start-up
        trio.run(_main, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
