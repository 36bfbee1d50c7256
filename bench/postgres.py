"""A throwaway PostgreSQL instance for the benchmark's baseline (issue 7, "Baseline").

`running_postgres(cards_path, amount_minor=...)` is a context manager: `initdb` into a temporary
directory (trust auth on a unix socket inside it and on 127.0.0.1), `pg_ctl start` on a free loopback
port with fsync and synchronous commit on, create the schema and the one-round-trip `authorize`
function, COPY the seeded cards and balances in, yield a `PgInstance`; on exit `pg_ctl stop` and
remove the directory, whatever happened.

PostgreSQL refuses to run as root: when this process is root, `initdb`, `pg_ctl` and the server run
as the `postgres` system user (Debian's packages create it) through `runuser`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import msgspec

from simulators.network.cards import CARD_LINE_SIZE_MAX, CARDS_MAX, CardLine
from simulators.network.target import free_port, log_tail, process_cpu_s

DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SYSTEM_USER = "postgres"  # who runs the server when we are root
DATABASE_USER = "bench"
DATABASE = "bench"
INITDB_TIMEOUT_S = 120.0
START_TIMEOUT_S = 60  # pg_ctl -t (seconds, an integer)
STOP_TIMEOUT_S = 60
SQL_TIMEOUT_S = 300.0
PIN_TRIES_MAX = 3  # docs/contract.md, wire profile: the third wrong PIN in a row locks the card (75)
PROCESSES_MAX = 4096  # /proc entries scanned for the server's children

# Card status values (a small subset of the contract's lock table: what the mix exercises).
STATUS_ACTIVE = "active"
STATUS_PIN_LOCKED = "pin_locked"

SERVER_SETTINGS = (  # -c options: durable like authsrv (every approval fsync'd before its answer)
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "on"),
    ("listen_addresses", "127.0.0.1"),
    ("max_connections", "50"),
    ("shared_buffers", "128MB"),
    ("log_min_messages", "warning"),
)

SCHEMA = """
CREATE TABLE balances (
    id text PRIMARY KEY,
    available bigint NOT NULL
);
CREATE TABLE cards (
    pan_index bytea PRIMARY KEY,        -- sha256 of the PAN: the lookup key
    pan_masked text NOT NULL,
    expiry char(4) NOT NULL,            -- YYMM
    cvc2 char(3) NOT NULL,              -- test data only: a real issuer keeps a CVK, not CVC2s
    pin text NOT NULL,                  -- test data only: a real issuer keeps a PVV
    status text NOT NULL,
    pin_tries integer NOT NULL DEFAULT 0,
    balance_id text NOT NULL REFERENCES balances (id)
);
CREATE TABLE holds (
    id bigserial PRIMARY KEY,
    balance_id text NOT NULL REFERENCES balances (id),
    amount bigint NOT NULL,
    rrn char(12) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX holds_rrn ON holds (rrn);
"""

# The one-round-trip variant (bench/pg_baseline.py --variant function): the whole authorization in
# one call, as a careful team would write it. Results are bench.pg_baseline.Result values; actions
# its Action values. Declines write nothing (their commit needs no WAL flush): the card row is read
# without a lock (only PIN tries change it, and those update it atomically), and the balance row is
# locked, checked and debited by one conditional UPDATE.
AUTHORIZE_FUNCTION = """
CREATE FUNCTION authorize(p_key bytea, p_action integer, p_expiry text, p_cvc2 text, p_pin text,
                          p_amount bigint, p_rrn text, p_remaining bigint, p_today text,
                          OUT o_result integer, OUT o_available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    h record;
    v_kept bigint;
    v_status text;
BEGIN
    IF p_action = 5 THEN  -- reversal: release the original's hold, all of it or down to p_remaining
        SELECT id, balance_id, amount INTO h FROM holds WHERE rrn = p_rrn ORDER BY id LIMIT 1 FOR UPDATE;
        o_result := 1;
        IF NOT FOUND THEN RETURN; END IF;
        v_kept := CASE WHEN p_remaining IS NOT NULL AND p_remaining < h.amount THEN p_remaining ELSE 0 END;
        UPDATE balances SET available = available + h.amount - v_kept WHERE id = h.balance_id
            RETURNING available INTO o_available;
        IF v_kept > 0 THEN
            UPDATE holds SET amount = v_kept WHERE id = h.id;
        ELSE
            DELETE FROM holds WHERE id = h.id;
        END IF;
        RETURN;
    END IF;
    SELECT expiry, cvc2, pin, status, pin_tries, balance_id INTO c FROM cards WHERE pan_index = p_key;
    IF NOT FOUND THEN
        o_result := CASE WHEN p_action = 4 THEN 1 ELSE 2 END;  -- an advice cannot be declined
        RETURN;
    END IF;
    IF p_action <> 4 THEN  -- status, expiry, CVC2, PIN, in authsrv's order
        IF c.status = 'pin_locked' THEN o_result := 6; RETURN; END IF;
        IF c.status <> 'active' THEN o_result := 2; RETURN; END IF;
        IF c.expiry < p_today OR (p_expiry IS NOT NULL AND p_expiry <> c.expiry) THEN
            o_result := 3; RETURN;
        END IF;
        IF p_cvc2 IS NOT NULL AND p_cvc2 <> c.cvc2 THEN o_result := 4; RETURN; END IF;
        IF p_pin IS NOT NULL THEN
            IF p_pin = c.pin THEN
                IF c.pin_tries > 0 THEN
                    UPDATE cards SET pin_tries = 0, status = 'active' WHERE pan_index = p_key;
                END IF;
            ELSE  -- the third wrong PIN in a row locks the card
                UPDATE cards SET pin_tries = pin_tries + 1,
                                 status = CASE WHEN pin_tries + 1 >= 3 THEN 'pin_locked' ELSE 'active' END
                    WHERE pan_index = p_key RETURNING status INTO v_status;
                o_result := CASE WHEN v_status = 'pin_locked' THEN 6 ELSE 5 END;
                RETURN;
            END IF;
        END IF;
    END IF;
    o_result := 1;
    IF p_action = 3 THEN  -- inquiry
        SELECT available INTO o_available FROM balances WHERE id = c.balance_id;
    ELSIF p_action = 2 THEN  -- credit
        UPDATE balances SET available = available + p_amount WHERE id = c.balance_id
            RETURNING available INTO o_available;
    ELSE
        UPDATE balances SET available = available - p_amount
            WHERE id = c.balance_id AND (p_action = 4 OR available >= p_amount)
            RETURNING available INTO o_available;
        IF NOT FOUND THEN
            SELECT available INTO o_available FROM balances WHERE id = c.balance_id;
            o_result := 7;
            RETURN;
        END IF;
        INSERT INTO holds (balance_id, amount, rrn) VALUES (c.balance_id, p_amount, p_rrn);
    END IF;
END
$$;
"""


class PostgresError(Exception):
    """The throwaway instance could not be created, started, loaded or stopped."""


def pan_index(pan: str) -> bytes:
    """The cards table key: a digest, so the lookup never needs the PAN in clear."""
    assert pan.isdigit(), "PAN must be digits"
    return hashlib.sha256(pan.encode("ascii")).digest()


def find_bin_dir() -> Path | None:
    """Where `initdb` and `pg_ctl` are: PATH first, then Debian's versioned directories (newest)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    candidates = []
    for directory in glob.glob(DEBIAN_BIN_GLOB):
        if os.access(Path(directory) / "initdb", os.X_OK) and os.access(Path(directory) / "pg_ctl", os.X_OK):
            version = Path(directory).parent.name
            candidates.append((int(version) if version.isdigit() else 0, Path(directory)))
    return max(candidates)[1] if candidates else None


def unavailable_reason() -> str | None:
    """Why the PostgreSQL baseline cannot run here, or None when it can."""
    if find_bin_dir() is None:
        return f"initdb/pg_ctl not found in PATH or {DEBIAN_BIN_GLOB} (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401  (imported for the check only)
    except ImportError:
        return 'psycopg not installed (pip install "psycopg[binary]")'
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no {SYSTEM_USER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not available"
    return None


def balance_rows(cards_path: Path, amount_minor: int) -> tuple[list[tuple], list[tuple]]:
    """(cards rows, balances rows) for COPY from a seed cards file; each balance appears once."""
    assert amount_minor >= 0
    decoder = msgspec.json.Decoder(CardLine)
    cards, balances = [], {}
    with cards_path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if number > CARDS_MAX or len(raw) > CARD_LINE_SIZE_MAX:
                raise PostgresError(f"{cards_path}:{number}: too many cards or line too long")
            if not raw.strip():
                continue
            line = decoder.decode(raw)
            balance_id = str(line.balance_id)
            balances.setdefault(balance_id, (balance_id, amount_minor))
            masked = line.pan[:6] + "*" * max(0, len(line.pan) - 10) + line.pan[-4:]
            cards.append((pan_index(line.pan), masked, line.expiry, line.cvc2, line.pin, STATUS_ACTIVE, 0,
                          balance_id))  # fmt: skip
    if not cards:
        raise PostgresError(f"{cards_path}: no cards")
    return cards, list(balances.values())


@attrs.frozen
class PgInstance:
    directory: Path
    bin_dir: Path
    port: int
    socket_dir: Path
    log_path: Path

    @property
    def conninfo(self) -> str:
        """libpq connection string over the unix socket (the fastest local path: the baseline's best case)."""
        return f"host={self.socket_dir} port={self.port} user={DATABASE_USER} dbname={DATABASE}"

    def postmaster_pid(self) -> int:
        return int((self.directory / "data" / "postmaster.pid").read_text(encoding="ascii").split("\n", 1)[0])

    def cpu_s(self) -> float:
        """CPU seconds of the postmaster and its live children (backends, WAL writer, checkpointer)."""
        parent = self.postmaster_pid()
        total = process_cpu_s(parent)
        for entry in os.listdir("/proc")[:PROCESSES_MAX]:
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text(encoding="ascii")
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
                    total += process_cpu_s(int(entry))
            except (OSError, ValueError):
                continue  # exited between the listing and the read
        return total


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", SYSTEM_USER, "--", *args] if os.geteuid() == 0 else args


def _run(args: list[str], log_path: Path, timeout_s: float) -> None:
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(args)}\n".encode())
        log.flush()
        try:
            done = subprocess.run(_as_server_user(args), stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise PostgresError(f"{Path(args[0]).name} did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise PostgresError(f"{Path(args[0]).name} exited {done.returncode}; log {log_path}:\n{log_tail(log_path)}")


def _make_directory() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="authsrv-pg-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    return directory


def _start(bin_dir: Path, directory: Path) -> PgInstance:
    data, socket_dir = directory / "data", directory / "socket"
    log_path = directory / "postgres.log"
    _run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", DATABASE_USER, "-E", "UTF8",
          "--locale=C", "--no-sync"], log_path, INITDB_TIMEOUT_S)  # fmt: skip
    _run(["mkdir", "-m", "0700", str(socket_dir)], log_path, INITDB_TIMEOUT_S)
    port = free_port()
    options = " ".join(f"-c {name}={value}" for name, value in SERVER_SETTINGS)
    options += f" -p {port} -k {socket_dir}"
    _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(directory / "server.log"), "-o", options, "-w",
          "-t", str(START_TIMEOUT_S), "start"], log_path, START_TIMEOUT_S + 10)  # fmt: skip
    return PgInstance(directory=directory, bin_dir=bin_dir, port=port, socket_dir=socket_dir, log_path=log_path)


def _stop_directory(bin_dir: Path, directory: Path) -> None:
    """Also after a failed start: a server pg_ctl gave up waiting for may still be running."""
    # immediate: the directory is removed next, so a shutdown checkpoint would be wasted writes
    _run([str(bin_dir / "pg_ctl"), "-D", str(directory / "data"), "-m", "immediate", "-w",
          "-t", str(STOP_TIMEOUT_S), "stop"], directory / "postgres.log", STOP_TIMEOUT_S + 10)  # fmt: skip


def load_schema(instance: PgInstance, cards_path: Path, amount_minor: int) -> int:
    """Create the database and tables, COPY the cards and balances in; returns the card count."""
    import psycopg

    cards, balances = balance_rows(cards_path, amount_minor)
    admin = f"host={instance.socket_dir} port={instance.port} user={DATABASE_USER} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {DATABASE}")
    with psycopg.connect(instance.conninfo) as connection:
        connection.execute(SCHEMA)
        connection.execute(AUTHORIZE_FUNCTION)
        with connection.cursor() as cursor:
            with cursor.copy("COPY balances (id, available) FROM STDIN") as copy:
                for row in balances:
                    copy.write_row(row)
            with cursor.copy("COPY cards (pan_index, pan_masked, expiry, cvc2, pin, status, pin_tries, balance_id)"
                             " FROM STDIN") as copy:  # fmt: skip
                for row in cards:
                    copy.write_row(row)
        connection.execute("ANALYZE")
    return len(cards)


@contextlib.contextmanager
def running_postgres(cards_path: Path, *, amount_minor: int) -> Iterator[PgInstance]:
    """A started, loaded instance; stopped and removed on exit even when start or load failed."""
    reason = unavailable_reason()
    if reason:
        raise PostgresError(reason)
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    directory = _make_directory()
    instance = None
    try:
        instance = _start(bin_dir, directory)
        load_schema(instance, cards_path, amount_minor)
        yield instance
    finally:
        try:
            if instance is not None or (directory / "data" / "postmaster.pid").exists():
                _stop_directory(bin_dir, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # holds CVC2s and PINs of test cards
