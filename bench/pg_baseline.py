"""The benchmark's PostgreSQL baseline: the same ISO 8583 front end, the ledger the usual way.

Issue 7, "Baseline": each authorization is one PostgreSQL transaction on a connection from a
bounded pool: `SELECT ... FOR UPDATE` of the card and its balance row, the checks (card status,
expiry, CVC2 or PIN, funds), `UPDATE balances`, `INSERT INTO holds`, `COMMIT` with synchronous
commit on; the answer is sent only after COMMIT returns. A 0400/0420 releases the hold found by RRN
(all of it, or down to field 95's remaining amount). Declines that change nothing roll back; a wrong
PIN commits its try counter (the third in a row locks the card: 75), as authsrv does.

The front end is bench/floor_server.py's: trio, 2-byte length framing, pyiso8583 `specs.default`,
responses of one connection batched into one `send_all`. Requests of one connection are worked on
concurrently (up to IN_FLIGHT_MAX), so the pool, not the connection count, bounds the concurrency.
psycopg (sync) runs in worker threads through `trio.to_thread.run_sync`, one thread per connection.

`--variant function` is the baseline a careful team would build: one round trip per authorization,
`SELECT * FROM authorize(...)` (the PL/pgSQL function in bench/postgres.py: lock, check, update,
insert, in autocommit), on a pool of nonblocking libpq connections driven by the trio loop itself
(no worker threads): the request is sent, the task waits for the socket with `wait_readable`.

    python -m bench.pg_baseline --port N --conninfo "host=... port=... user=bench dbname=bench" --zpk-file F
                                [--variant transactions|function] [--pool-size N]
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import signal
import sys
import time
from pathlib import Path

import attrs
import iso8583
import iso8583.specs
import trio

from bench.floor_server import ECHOED_FIELDS, ECHOED_FIELDS_MANAGEMENT, RECEIVE_SIZE_MAX
from bench.postgres import PIN_TRIES_MAX, STATUS_ACTIVE, STATUS_PIN_LOCKED, pan_index
from simulators.network.codec import FrameReader, FramingError, frame
from simulators.network.pinblock import decrypt_pin_block, load_zpk

SPEC = iso8583.specs.default
POOL_SIZE_DEFAULT = 8  # PostgreSQL connections (and worker threads)
FUNCTION_POOL_SIZE_DEFAULT = 16  # the function variant's connections (no threads: more are cheap here)
VARIANTS = ("transactions", "function")
POOL_SIZE_MAX = 64
IN_FLIGHT_MAX = 512  # requests of one ISO connection being worked on at once
RESPONSES_BATCH_MAX = 256  # responses joined into one send_all
AUTHORIZATION_CODE = "PGBASE"
CVC2_TAG = "92"
FIELD48_ITEMS_MAX = 32

DEBIT_CODES = frozenset({"00", "01", "09"})
CREDIT_CODES = frozenset({"20", "28"})
INQUIRY_CODES = frozenset({"30"})


class Result(enum.IntEnum):
    approved = 1
    unknown_card = 2
    expired = 3
    wrong_cvc2 = 4
    wrong_pin = 5
    pin_locked = 6
    insufficient_funds = 7
    unsupported = 8
    format_error = 9
    internal_error = 10


RESPONSE_CODES = {
    Result.approved: "00",
    Result.unknown_card: "14",
    Result.expired: "54",
    Result.wrong_cvc2: "N7",
    Result.wrong_pin: "55",
    Result.pin_locked: "75",
    Result.insufficient_funds: "51",
    Result.unsupported: "12",
    Result.format_error: "30",
    Result.internal_error: "96",
}
assert set(RESPONSE_CODES) == set(Result)


class Action(enum.IntEnum):
    debit = 1  # 0100/0200 purchase, withdrawal: checks, then a hold
    credit = 2  # refund, payment
    inquiry = 3
    force = 4  # 0120/0220 advice: cannot be declined
    reversal = 5  # 0400/0420


@attrs.frozen(kw_only=True)
class Auth:
    """What the transaction needs from one request (card data never in the repr)."""

    action: Action
    pan: str = attrs.field(repr=False)
    expiry: str | None = attrs.field(repr=False)  # YYMM from field 14 or track 2
    cvc2: str | None = attrs.field(repr=False)
    pin_block: bytes | None = attrs.field(repr=False)
    amount_minor: int
    rrn: str
    remaining_minor: int | None = None  # partial reversal: field 95


@attrs.frozen
class Outcome:
    result: Result
    available_minor: int | None = None
    changed: bool = False  # the transaction wrote something: COMMIT, else ROLLBACK


def cvc2_of(field48: str) -> str | None:
    """Subelement 92 of field 48 (`TT LL value` items), or None."""
    position = 0
    for _ in range(FIELD48_ITEMS_MAX):  # bounded: a few subelements at most
        if position + 4 > len(field48):
            return None
        tag, length = field48[position : position + 2], int(field48[position + 2 : position + 4])
        if tag == CVC2_TAG:
            return field48[position + 4 : position + 4 + length]
        position += 4 + length
    return None


def parse_request(request: dict[str, str]) -> Auth | Result:
    """The transaction's input, or the result that needs no database (12, 30)."""
    mti, code = request["t"], request.get("3", "")[:2]
    if "35" in request:  # track 2: PAN=YYMM...
        pan, _, rest = request["35"].partition("=")
        expiry = rest[:4]
    else:
        pan, expiry = request.get("2", ""), request.get("14")
    if not (pan.isdigit() and 12 <= len(pan) <= 19) or "4" not in request or "37" not in request:
        return Result.format_error
    amount = int(request.get("6") or request["4"])  # billing amount when 6 and 51 are sent (docs/contract.md)
    if mti in ("0400", "0420"):
        action = Action.reversal
    elif mti in ("0120", "0220"):
        action = Action.force
    elif mti in ("0100", "0200") and code in DEBIT_CODES:
        action = Action.debit
    elif mti in ("0100", "0200") and code in CREDIT_CODES:
        action = Action.credit
    elif mti in ("0100", "0200") and code in INQUIRY_CODES:
        action = Action.inquiry
    else:
        return Result.unsupported
    remaining = int(request["95"][:12]) if action is Action.reversal and "95" in request else None
    return Auth(
        action=action, pan=pan, expiry=expiry, cvc2=cvc2_of(request["48"]) if "48" in request else None,
        pin_block=bytes.fromhex(request["52"]) if "52" in request else None, amount_minor=amount,
        rrn=request["37"], remaining_minor=remaining,
    )  # fmt: skip


def pin_of(pin_block: bytes, pan: str, zpk: bytes) -> str | None:
    """The clear PIN of an ISO 9564 format 0 block, or None when the block is malformed."""
    clear = decrypt_pin_block(pin_block, zpk)
    pan_field = bytes.fromhex("0000" + pan[-13:-1])
    digits = bytes(a ^ b for a, b in zip(clear, pan_field, strict=True)).hex().upper()
    length = int(digits[1], 16)
    pin = digits[2 : 2 + length]
    if digits[0] != "0" or not 4 <= length <= 12 or not pin.isdigit():
        return None
    return pin


def current_yymm() -> str:
    return time.strftime("%y%m", time.gmtime())


# -- the transaction (runs in a worker thread, on its own connection) ---------------------------

SELECT_CARD = (
    "SELECT c.expiry, c.cvc2, c.pin, c.status, c.pin_tries, c.balance_id, b.available"
    " FROM cards c JOIN balances b ON b.id = c.balance_id WHERE c.pan_index = %s FOR UPDATE"
)
DEBIT = "UPDATE balances SET available = available - %s WHERE id = %s RETURNING available"
CREDIT = "UPDATE balances SET available = available + %s WHERE id = %s RETURNING available"
INSERT_HOLD = "INSERT INTO holds (balance_id, amount, rrn) VALUES (%s, %s, %s)"
SET_PIN_TRIES = "UPDATE cards SET pin_tries = %s, status = %s WHERE pan_index = %s"
SELECT_HOLD = "SELECT id, balance_id, amount FROM holds WHERE rrn = %s ORDER BY id LIMIT 1 FOR UPDATE"
SHRINK_HOLD = "UPDATE holds SET amount = %s WHERE id = %s"
DELETE_HOLD = "DELETE FROM holds WHERE id = %s"


def authorize(connection, auth: Auth, zpk: bytes | None, today_yymm: str) -> Outcome:
    """One request in one transaction; returns after COMMIT, or after ROLLBACK when nothing changed
    (a decline commits nothing: even its row locks would cost a WAL flush)."""
    try:
        if auth.action is Action.reversal:
            outcome = _reverse(connection, auth)
        else:
            outcome = _authorize_card(connection, auth, zpk, today_yymm)
        if outcome.changed:
            connection.commit()  # synchronous_commit = on: returns once the WAL is flushed
        else:
            connection.rollback()
        return outcome
    except Exception:  # noqa: BLE001  a deadlock, a lost connection: the contract's 96
        with contextlib.suppress(Exception):
            connection.rollback()
        return Outcome(Result.internal_error)


def _authorize_card(connection, auth: Auth, zpk: bytes | None, today_yymm: str) -> Outcome:
    key = pan_index(auth.pan)
    row = connection.execute(SELECT_CARD, (key,)).fetchone()
    if row is None:
        return Outcome(Result.approved if auth.action is Action.force else Result.unknown_card)
    expiry, cvc2, pin, status, pin_tries, balance_id, available = row
    wrote = False  # the PIN try counter
    if auth.action is not Action.force:
        result, wrote = _check_card(connection, auth, key, zpk, today_yymm, (expiry, cvc2, pin, status, pin_tries))
        if result is not Result.approved:
            return Outcome(result, changed=wrote)
    if auth.action is Action.inquiry:
        return Outcome(Result.approved, available, changed=wrote)
    if auth.action is Action.credit:
        (available,) = connection.execute(CREDIT, (auth.amount_minor, balance_id)).fetchone()
        return Outcome(Result.approved, available, changed=True)
    if auth.action is Action.debit and available < auth.amount_minor:
        return Outcome(Result.insufficient_funds, available)
    (available,) = connection.execute(DEBIT, (auth.amount_minor, balance_id)).fetchone()
    connection.execute(INSERT_HOLD, (balance_id, auth.amount_minor, auth.rrn))
    return Outcome(Result.approved, available, changed=True)


def _check_card(
    connection, auth: Auth, key: bytes, zpk: bytes | None, today_yymm: str, card: tuple
) -> tuple[Result, bool]:
    """Status, expiry, CVC2, PIN, in authsrv's order; a wrong PIN, or a right one after wrong ones,
    writes the try counter (the bool: the transaction must commit)."""
    expiry, cvc2, pin, status, pin_tries = card
    if status == STATUS_PIN_LOCKED:
        return Result.pin_locked, False
    if status != STATUS_ACTIVE:
        return Result.unknown_card, False
    if expiry < today_yymm or (auth.expiry is not None and auth.expiry != expiry):
        return Result.expired, False
    if auth.cvc2 is not None and auth.cvc2 != cvc2:
        return Result.wrong_cvc2, False
    if auth.pin_block is None:
        return Result.approved, False
    offered = pin_of(auth.pin_block, auth.pan, zpk) if zpk is not None else None
    if offered == pin:
        if pin_tries:
            connection.execute(SET_PIN_TRIES, (0, STATUS_ACTIVE, key))
        return Result.approved, pin_tries > 0
    tries = pin_tries + 1
    locked = tries >= PIN_TRIES_MAX
    connection.execute(SET_PIN_TRIES, (tries, STATUS_PIN_LOCKED if locked else STATUS_ACTIVE, key))
    return (Result.pin_locked if locked else Result.wrong_pin), True


def _reverse(connection, auth: Auth) -> Outcome:
    """Release the hold of the original (by RRN); an unknown original is acknowledged and ignored."""
    row = connection.execute(SELECT_HOLD, (auth.rrn,)).fetchone()
    if row is None:
        return Outcome(Result.approved)
    hold_id, balance_id, amount = row
    remaining = auth.remaining_minor if auth.remaining_minor is not None and auth.remaining_minor < amount else 0
    (available,) = connection.execute(CREDIT, (amount - remaining, balance_id)).fetchone()
    if remaining:
        connection.execute(SHRINK_HOLD, (remaining, hold_id))
    else:
        connection.execute(DELETE_HOLD, (hold_id,))
    return Outcome(Result.approved, available, changed=True)


# -- the one-round-trip variant: a PL/pgSQL function over nonblocking libpq connections ---------

AUTHORIZE_STATEMENT = b"authorize"
AUTHORIZE_CALL = b"SELECT o_result, o_available FROM authorize($1, $2, $3, $4, $5, $6, $7, $8, $9)"
AUTHORIZE_FORMATS = [1, 0, 0, 0, 0, 0, 0, 0, 0]  # the card key is sent as binary bytea, the rest as text
RESULTS_PER_CALL_MAX = 4  # one statement: its result, then the end (bounds the drain loop)


def _text(value: object) -> bytes | None:
    return None if value is None else str(value).encode("ascii")


def function_params(auth: Auth, zpk: bytes | None, today_yymm: str) -> list[bytes | None]:
    """The arguments of `authorize(...)`: the card key, the action, what the checks compare (the PIN
    decrypted here, as the transactions variant does; '' for a block that does not decrypt)."""
    offered = None
    if auth.pin_block is not None and auth.action is not Action.reversal:
        offered = (pin_of(auth.pin_block, auth.pan, zpk) if zpk is not None else None) or ""
    return [pan_index(auth.pan), _text(int(auth.action)), _text(auth.expiry), _text(auth.cvc2), _text(offered),
            _text(auth.amount_minor), _text(auth.rrn), _text(auth.remaining_minor), today_yymm.encode("ascii")]


def function_outcome(result: int, available: int | None) -> Outcome:
    return Outcome(Result(result), available)  # (`changed` is not reported by the function)


class FunctionPool:
    """Nonblocking libpq connections (psycopg.pq), each used by one trio task at a time: send the
    prepared call, flush, then wait for the socket in the trio loop until the result is in."""

    def __init__(self, conninfo: str, size: int) -> None:
        import psycopg

        assert 0 < size <= POOL_SIZE_MAX
        self._connections = [psycopg.connect(conninfo, autocommit=True) for _ in range(size)]
        self.idle = []
        for connection in self._connections:
            pgconn = connection.pgconn
            prepared = pgconn.prepare(AUTHORIZE_STATEMENT, AUTHORIZE_CALL)
            if prepared.status != psycopg.pq.ExecStatus.COMMAND_OK:
                raise RuntimeError(f"PREPARE authorize failed: {prepared.error_message.decode(errors='replace')}")
            pgconn.nonblocking = 1
            self.idle.append(pgconn)
        self.available = trio.Semaphore(size)
        self.errors = 0

    async def run(self, auth: Auth, zpk: bytes | None) -> Outcome:
        await self.available.acquire()
        pgconn = self.idle.pop()  # the semaphore guarantees one is idle
        try:
            outcome = await self._call(pgconn, function_params(auth, zpk, current_yymm()))
        except BaseException:
            # Cancelled or broken halfway through the protocol: the connection is not reused, and
            # its semaphore token goes with it (the pool is one smaller; closed in close()).
            self.errors += 1
            raise
        self.idle.append(pgconn)
        self.available.release()
        if outcome.result is Result.internal_error:
            self.errors += 1
        return outcome

    @staticmethod
    async def _call(pgconn, params: list[bytes | None]) -> Outcome:
        from psycopg import pq

        pgconn.send_query_prepared(AUTHORIZE_STATEMENT, params, param_formats=AUTHORIZE_FORMATS)
        descriptor = pgconn.socket
        # Bounded by the socket buffer: each pass sends some of the request or waits until it can.
        while pgconn.flush():
            await trio.lowlevel.wait_writable(descriptor)
        results = []
        # Bounded by the server: each pass reads what arrived; the statement ends with a None result.
        while True:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    if len(results) != 1 or results[0].status != pq.ExecStatus.TUPLES_OK:
                        return Outcome(Result.internal_error)
                    row = results[0]
                    available = row.get_value(0, 1)
                    return function_outcome(int(row.get_value(0, 0)), None if available is None else int(available))
                if len(results) >= RESULTS_PER_CALL_MAX:
                    return Outcome(Result.internal_error)
                results.append(result)
            await trio.lowlevel.wait_readable(descriptor)

    def close(self) -> None:
        for connection in self._connections:
            connection.close()


# -- the front end ----------------------------------------------------------------------------


def build_response(request: dict[str, str], outcome: Outcome, currency: str | None = None) -> dict[str, str]:
    mti = request["t"]
    management = mti.startswith("08")
    fields = ECHOED_FIELDS_MANAGEMENT if management else ECHOED_FIELDS
    response = {key: request[key] for key in fields if key in request}
    response["t"] = mti[:2] + str(int(mti[2]) + 1) + mti[3]
    response["39"] = RESPONSE_CODES[outcome.result]
    if not management and outcome.result is Result.approved:
        response["38"] = AUTHORIZATION_CODE
    if outcome.available_minor is not None and not management:
        sign = "C" if outcome.available_minor >= 0 else "D"
        response["54"] = f"0002{currency or request.get('49', '000')}{sign}{abs(outcome.available_minor):012d}"
    return response


@attrs.define
class ConnectionPool:
    """A fixed set of psycopg connections, each used by one worker thread at a time."""

    idle: list
    # Two bounds of the same size: the semaphore hands out connections; the limiter is the worker
    # threads' own (to_thread takes a token of its own, so sharing one would deadlock at size/2).
    available: trio.Semaphore
    threads: trio.CapacityLimiter
    errors: int = 0

    @classmethod
    def open(cls, conninfo: str, size: int) -> ConnectionPool:
        import psycopg

        assert 0 < size <= POOL_SIZE_MAX
        connections = [psycopg.connect(conninfo) for _ in range(size)]
        return cls(connections, trio.Semaphore(size), trio.CapacityLimiter(size))

    async def run(self, auth: Auth, zpk: bytes | None) -> Outcome:
        async with self.available:
            connection = self.idle.pop()  # the semaphore guarantees one is idle
            try:
                outcome = await trio.to_thread.run_sync(authorize, connection, auth, zpk, current_yymm(),
                                                        limiter=self.threads)  # fmt: skip
            finally:
                self.idle.append(connection)
        if outcome.result is Result.internal_error:
            self.errors += 1
        return outcome

    def close(self) -> None:
        for connection in self.idle:
            connection.close()


@attrs.define
class Server:
    pool: ConnectionPool | FunctionPool
    zpk: bytes | None
    answered: int = 0
    undecodable: int = 0

    async def answer(self, payload: bytes) -> bytes | None:
        try:
            request, _ = iso8583.decode(payload, SPEC)
        except (iso8583.DecodeError, ValueError):
            self.undecodable += 1
            return None
        if request["t"].startswith("08"):
            outcome = Outcome(Result.approved)
        else:
            try:
                parsed = parse_request(request)
            except (KeyError, ValueError):
                parsed = Result.format_error
            outcome = Outcome(parsed) if isinstance(parsed, Result) else await self.pool.run(parsed, self.zpk)
        try:
            raw, _ = iso8583.encode(build_response(request, outcome), SPEC)
        except (iso8583.EncodeError, KeyError, ValueError):
            self.undecodable += 1
            return None
        self.answered += 1
        return frame(bytes(raw))

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        # serve_listeners lets a handler error crash the server: contain one bad peer here.
        send, receive = trio.open_memory_channel[bytes](IN_FLIGHT_MAX)
        in_flight = trio.Semaphore(IN_FLIGHT_MAX)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, stream, receive)
                async with send:
                    await self._read(stream, nursery, send, in_flight)
        except (trio.BrokenResourceError, trio.ClosedResourceError, FramingError):
            pass
        finally:
            await stream.aclose()

    async def _read(self, stream, nursery, send, in_flight: trio.Semaphore) -> None:
        reader = FrameReader()
        while True:  # bounded by the peer: ends at EOF or a broken stream
            data = await stream.receive_some(RECEIVE_SIZE_MAX)
            if not data:
                # let the requests already read finish before the writer's channel closes
                for _ in range(IN_FLIGHT_MAX):
                    await in_flight.acquire()
                return
            for payload in reader.feed(data):
                await in_flight.acquire()
                nursery.start_soon(self._one, payload, send.clone(), in_flight)

    async def _one(self, payload: bytes, send, in_flight: trio.Semaphore) -> None:
        try:
            async with send:
                response = await self.answer(payload)
                if response is not None:
                    await send.send(response)
        finally:
            in_flight.release()

    @staticmethod
    async def _write(stream: trio.SocketStream, receive) -> None:
        async with receive:
            async for first in receive:  # ends when every sender has closed
                batch = [first]
                while len(batch) < RESPONSES_BATCH_MAX:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await stream.send_all(b"".join(batch))


async def serve_pg_baseline(
    port: int, server: Server, *, host: str = "127.0.0.1", task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; `await nursery.start(serve_pg_baseline, 0, server)` returns the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(server.handle_connection, listeners)


async def _main(host: str, port: int, server: Server) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound_port = await nursery.start(functools.partial(serve_pg_baseline, port, server, host=host))
            print(f"PostgreSQL baseline ISO 8583 server listening on {host}:{bound_port}", flush=True)
            async for _ in signals:  # the first SIGTERM or SIGINT ends the server with exit 0
                nursery.cancel_scope.cancel()
                break
    print(f"answered {server.answered}, undecodable {server.undecodable}, internal errors {server.pool.errors}",
          flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8583, help="TCP port (0: any free port, printed)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--conninfo", required=True, help="libpq connection string of the loaded database")
    parser.add_argument("--zpk-file", type=Path, default=None, help="32 hex digits; without it every PIN is wrong")
    parser.add_argument("--variant", choices=VARIANTS, default="transactions",
                        help="transactions: 4 round trips from worker threads; function: 1 round trip, async")
    parser.add_argument("--pool-size", type=int, default=None,
                        help=f"connections (default {POOL_SIZE_DEFAULT}, function variant {FUNCTION_POOL_SIZE_DEFAULT})")
    args = parser.parse_args(argv)
    function = args.variant == "function"
    size = args.pool_size or (FUNCTION_POOL_SIZE_DEFAULT if function else POOL_SIZE_DEFAULT)
    if not 0 < size <= POOL_SIZE_MAX:
        parser.error(f"--pool-size must be in 1..{POOL_SIZE_MAX}")
    zpk = load_zpk(args.zpk_file) if args.zpk_file else None
    pool = FunctionPool(args.conninfo, size) if function else ConnectionPool.open(args.conninfo, size)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # SIGINT is handled in _main; this covers start-up
            trio.run(_main, args.host, args.port, Server(pool, zpk))
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
