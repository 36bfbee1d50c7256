"""The management store: partners, programs, users, balances, cards, admins in `DIR/store.db`.

SQLite in WAL mode, `synchronous=FULL`: a management change the API has answered survives a power
cut. sqlite-utils creates the schema and does bulk inserts; single-row paths use plain SQL (a
sqlite-utils `upsert` costs 10x a plain statement, measured when the stack was chosen).

Never stored: a clear PAN (only `pan_enc`, AES-GCM, and `pan_index`, a keyed HMAC, plus first 6 and
last 4 digits), a CVV (recomputed from the CVK when needed) or a PIN (only its Visa PVV).

Ledger accounts are allocated here (`ledger_accounts` is the id allocator and the record of what
each account is for) and created in the ledger by the caller afterwards. Order matters: the store
commits first, so a crash in between leaves an account the store knows and the ledger lacks, which
the server re-creates at startup from `all_ledger_accounts()` (account creation is idempotent). The
other order could reuse an id the ledger already holds for something else.

Threads: one connection (`check_same_thread=False`) serialized by one re-entrant lock, so the
trio thread (hot-path PIN counters) and worker threads (REST) can share the store. A write method
called inside `transaction()` joins it; index updates wait for the outermost commit.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import enum
import fcntl
import functools
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import msgspec
import sqlite_utils

from authsrv.iban import make_iban
from authsrv.store.replica import IndexOp, RecordingConnection, StoreChange, encode_change, write_files
from authsrv.store.index import (
    IRREVERSIBLE_LOCK_REASONS,
    PAN_INDEX_LENGTH,
    CardIndex,
    CardState,
    CardStatus,
    LockReason,
    PartnerState,
)
from ledger.types import AMOUNT_MAX, ID_MAX, AccountFlags, AccountKind, AccountSpec

SCHEMA_VERSION = 1
# meta: the form of the clearing_records identities the store may hold (authsrv/clearing/records.py).
CLEARING_IDENTITY_KEY = "clearing_identity"
CLEARING_IDENTITY_DIGEST = "digest"  # some rows have the sha256 alone (written before the RRN prefix)
CLEARING_IDENTITY_RRN_DIGEST = "rrn:digest"  # every row's identity is RRN:sha256
STORE_FILE_NAME = "store.db"
LOCK_FILE_NAME = ".lock"
BUSY_TIMEOUT_MS = 5_000
# With checkpoints deferred to a background task (Store.defer_checkpoints), a COMMIT still checkpoints
# once the WAL passes this many pages (64 MiB): the bound on the WAL should that task stop.
WAL_AUTOCHECKPOINT_DEFERRED_PAGES = 16_384
# Transfer ids: the authorization hot path allocates time-based ids below 2**63 (nanoseconds since
# 1970: good until 2262); management transfers (funding, reloads, seeding) take 2**63 + n from the
# `sequences` counter, so they never meet. Both stay below 2**64, which msgpack (the write-ahead
# log's encoding) writes natively; wider ids take a much slower path.
MANAGEMENT_TRANSFER_ID_BASE = 2**63
MANAGEMENT_TRANSFER_SEQUENCE = "management_transfer"
TRANSFER_ID_ALLOCATION_MAX = 10_000_000  # one call reserves at most this many ids
SYSTEM_OWNER = ""  # ledger_accounts.owner of system accounts (settlement, funding)
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_N_MAX = 2**20  # a tampered hash must not make verification eat the machine
SCRYPT_SALT_BYTES = 16
SCRYPT_KEY_BYTES = 32
REPLICATED_WAIT_S = 10.0  # a cluster primary's store change waits this long for the stream's ack
DATA_DIR_BUSY_MESSAGE = "the server is running; stop it or use the admin API"


class ManagementTransferCode(enum.IntEnum):
    """Ledger transfer `code` of management transfers. The hot path uses 1..99. Never renumber."""

    user_funding = 101  # funding -> user balance (reload, seed)
    collateral_funding = 102  # funding -> partner deposit / credit collateral
    user_withdrawal = 103  # user balance -> funding


# Schema added after version 1, applied by every open (idempotent). Append; never edit a shipped line.
ADDED_SCHEMA: list[str] = [
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, partner TEXT NOT NULL,"
    " kind TEXT NOT NULL, subject TEXT NOT NULL, body TEXT NOT NULL, idempotency_key TEXT NOT NULL UNIQUE,"
    " created_at TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_partner ON events (partner, id)",
    # Mobile devices paired to a user: one active installation per (user, device).
    "CREATE TABLE IF NOT EXISTS devices (user_id INTEGER NOT NULL REFERENCES users(id),"
    " device_id TEXT NOT NULL, installation_id TEXT NOT NULL, active INTEGER NOT NULL,"
    " created_at TEXT NOT NULL, PRIMARY KEY (user_id, device_id, installation_id))",
    # KYC verification forms (`/register`); images are files under DIR/kyc/, encrypted.
    "CREATE TABLE IF NOT EXISTS kyc_forms (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL"
    " REFERENCES users(id), partner TEXT NOT NULL, state TEXT NOT NULL, fields_json TEXT NOT NULL,"
    " images_json TEXT NOT NULL, created_at TEXT NOT NULL, decided_at TEXT NOT NULL DEFAULT '',"
    " decided_by TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '')",
    "CREATE INDEX IF NOT EXISTS kyc_forms_user ON kyc_forms (user_id)",
    "CREATE INDEX IF NOT EXISTS kyc_forms_state ON kyc_forms (state, id)",
    # Reloads with an X-Idempotency-Key: the key's transfer id, so a retry is not applied twice.
    "CREATE TABLE IF NOT EXISTS reloads (balance_id INTEGER NOT NULL REFERENCES balances(id),"
    " key TEXT NOT NULL, transfer_id TEXT NOT NULL, amount INTEGER NOT NULL, state TEXT NOT NULL,"
    " created_at TEXT NOT NULL, PRIMARY KEY (balance_id, key))",
    # Customer login names a phone or e-mail without the partner (unique per partner only).
    "CREATE INDEX IF NOT EXISTS users_phone ON users (phone)",
    "CREATE INDEX IF NOT EXISTS users_email ON users (email)",
    # Clearing (authsrv/clearing): each file and each record applies once. A record row holds the
    # exact ledger transfers it submits and is written before they are (crash-safe re-runs).
    "CREATE TABLE IF NOT EXISTS clearing_files (sha256 TEXT PRIMARY KEY, name TEXT NOT NULL,"
    " received_at TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT '', summary_json TEXT NOT NULL DEFAULT '')",
    "CREATE TABLE IF NOT EXISTS clearing_records (identity TEXT PRIMARY KEY, file_sha256 TEXT NOT NULL,"
    " record_id TEXT NOT NULL, line INTEGER NOT NULL, outcome TEXT NOT NULL, state TEXT NOT NULL,"
    " transfers BLOB NOT NULL, plan_json TEXT NOT NULL, created_at TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS clearing_records_file ON clearing_records (file_sha256, line)",
    # Spend controls (authsrv/hotpath/limits.py): scope 'card' or 'user', the ControlsSpec as JSON.
    "CREATE TABLE IF NOT EXISTS spend_controls (scope TEXT NOT NULL, owner_id INTEGER NOT NULL,"
    " controls_json TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (scope, owner_id))",
    # Partner deliveries (authsrv/notify): one row per call that must reach a partner, with the
    # exact body and the idempotency key every try carries; `order_key` serializes one balance.
    "CREATE TABLE IF NOT EXISTS deliveries (id INTEGER PRIMARY KEY, partner TEXT NOT NULL,"
    " kind TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, body TEXT NOT NULL,"
    " idempotency_key TEXT NOT NULL UNIQUE, order_key TEXT NOT NULL, source TEXT NOT NULL,"
    " state TEXT NOT NULL, tries INTEGER NOT NULL DEFAULT 0, tries_max INTEGER NOT NULL,"
    " next_at_ms INTEGER NOT NULL, last_status INTEGER NOT NULL DEFAULT 0,"
    " last_error TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at_ms)",
    "CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (order_key, id) WHERE state = 'pending'",
    # How far each source (store events, write-ahead log records) has been scheduled.
    "CREATE TABLE IF NOT EXISTS delivery_cursors (source TEXT PRIMARY KEY, position INTEGER NOT NULL,"
    " updated_at TEXT NOT NULL)",
    # 3DS OTP challenges: the OTP only as an HMAC; it reaches the partner JWE-encrypted.
    "CREATE TABLE IF NOT EXISTS otp_challenges (id INTEGER PRIMARY KEY, partner TEXT NOT NULL,"
    " user_id INTEGER NOT NULL, card_id INTEGER NOT NULL, amount INTEGER NOT NULL, currency TEXT NOT NULL,"
    " merchant_name TEXT NOT NULL, otp_mac TEXT NOT NULL, state TEXT NOT NULL,"
    " failures INTEGER NOT NULL DEFAULT 0, expires_at_ms INTEGER NOT NULL, created_at TEXT NOT NULL)",
    # Fees (authsrv/feesrun.py): each (program, kind, period, card or balance) is charged once;
    # period 'YYYY-MM' (monthly) or 'once' (creation). `owed` is what the balance could not pay
    # yet; `transfers` the exact ledger transfers submitted (a re-run resubmits, never re-plans).
    "CREATE TABLE IF NOT EXISTS fee_periods (config_id TEXT NOT NULL, kind TEXT NOT NULL,"
    " period TEXT NOT NULL, subject INTEGER NOT NULL, balance_id INTEGER NOT NULL, partner TEXT NOT NULL,"
    " currency TEXT NOT NULL, amount INTEGER NOT NULL, charged INTEGER NOT NULL, owed INTEGER NOT NULL,"
    " waived INTEGER NOT NULL, state TEXT NOT NULL, transfers BLOB NOT NULL, created_at TEXT NOT NULL,"
    " updated_at TEXT NOT NULL, PRIMARY KEY (config_id, kind, period, subject))",
    "CREATE INDEX IF NOT EXISTS fee_periods_owed ON fee_periods (balance_id) WHERE owed > 0",
    # Audit log (authsrv/store/audit.py): every operator action through the panel or /admin, with
    # its outcome and the before/after values it changed. Append-only; never card data.
    "CREATE TABLE IF NOT EXISTS audit_log (id INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL,"
    " role TEXT NOT NULL, channel TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,"
    " outcome TEXT NOT NULL, before_json TEXT NOT NULL, after_json TEXT NOT NULL, detail TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS audit_log_actor ON audit_log (actor, id)",
    "CREATE INDEX IF NOT EXISTS audit_log_action ON audit_log (action, id)",
]
# table -> {column: declaration} added to existing tables (ALTER TABLE ADD COLUMN, once).
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    # wPIN rate limiting: failures in a row and until when logins are refused (ISO 8601, '' = not).
    "users": {"wpin_failures": "INTEGER NOT NULL DEFAULT 0", "wpin_locked_until": "TEXT NOT NULL DEFAULT ''"},
    # disabled: 1 = may not log in (an Admin disabled the account); sessions end at once.
    "admins": {"created_by": "TEXT NOT NULL DEFAULT ''", "created_at": "TEXT NOT NULL DEFAULT ''",
               "disabled": "INTEGER NOT NULL DEFAULT 0"},
    "balances": {"iban": "TEXT NOT NULL DEFAULT ''"},
    # IBANs for new balances ('' = off) and the balance opened automatically on KYC success.
    "programs": {"iban_country": "TEXT NOT NULL DEFAULT ''", "iban_bank_code": "TEXT NOT NULL DEFAULT ''",
                 "auto_balance": "INTEGER NOT NULL DEFAULT 0"},
    # low_notified: 1 once a below-threshold event was recorded, 0 again after a reload above it.
    "partner_balances": {"low_notified": "INTEGER NOT NULL DEFAULT 0"},
    "cards": {
        # Physical cards: ORDERED (at the bureau, invisible to the user) -> LINKED; '' = not ordered.
        "order_state": "TEXT NOT NULL DEFAULT ''",
        "order_json": "TEXT NOT NULL DEFAULT ''",  # delivery address, bureau reference, tracking no.
        "source_card_id": "INTEGER NOT NULL DEFAULT 0",  # digital-first copy: the virtual card it copies
        "cvv_version": "INTEGER NOT NULL DEFAULT 0",  # bumped by reset CVV; an input of the derivation
    },
}
# Statements that need ADDED_COLUMNS in place (run after them). Append; never edit a shipped line.
ADDED_INDEXES: list[str] = [
    "CREATE UNIQUE INDEX IF NOT EXISTS balances_iban ON balances (iban) WHERE iban != ''",
]
EVENT_KIND_LENGTH_MAX = 64
EVENT_KEY_TOKEN_BYTES = 8  # the random part of an event's idempotency key
_event_json = msgspec.json.Encoder(order="sorted")


def _event_body_json(body: Mapping[str, Any] | msgspec.Struct) -> str:
    """Compact, keys sorted (a Struct's by their encoded names, as its mapping's would be). A Struct
    is encoded as is: msgspec.to_builtins and then json.dumps cost clearing's worker ~10% of its
    time at 1,400 events/s."""
    return _event_json.encode(body).decode()


EVENTS_PAGE_MAX = 1_000


@attrs.frozen
class EventRow:
    id: int
    partner: str
    kind: str  # e.g. "user.created", "card.locked", "balance.reloaded", "kyc.accepted"
    subject: str  # what it is about, e.g. "customer:12", "card:7"
    body: str  # JSON, never card data beyond first 6 / last 4
    idempotency_key: str
    created_at: str


_EVENT_COLUMNS = "id, partner, kind, subject, body, idempotency_key, created_at"


class StoreError(Exception):
    """The store file is unusable (wrong schema version) or a write broke a uniqueness rule."""


class ReplicationTimeout(TimeoutError):
    """A cluster primary's store change is committed here but the shard's stream did not acknowledge
    it in time (NATS unreachable): the caller is not told it succeeded; it is published when NATS
    answers, or dropped with this node's state if another node takes over first."""


class StoreConflict(StoreError):
    """A row with this key already exists."""


class DataDirBusy(Exception):
    """Another process (normally the server) holds `DIR/.lock`."""


class Role(enum.StrEnum):
    """Admin roles of the reference documents' role table."""

    admin = "Admin"
    manager = "Manager"
    employee = "Employee"


class PartnerBalanceType(enum.StrEnum):
    deposit = "DEPOSIT"
    credit = "CREDIT"


COLLATERAL_KINDS: Mapping[str, tuple[AccountKind, PartnerBalanceType]] = {
    "deposit": (AccountKind.partner_deposit, PartnerBalanceType.deposit),
    "credit": (AccountKind.partner_credit, PartnerBalanceType.credit),
}


@attrs.frozen
class PartnerRow:
    name: str
    balance_mode: str
    collateral: str
    created_at: str


@attrs.frozen
class ProgramRow:
    config_id: str
    partner: str
    bin: str
    card_type: str
    currency: str
    expiry_years: int
    fees_json: str = "{}"
    limits_json: str = "{}"
    iban_country: str = ""  # ISO 3166 alpha-2 of the IBANs of new balances; '' = no IBANs
    iban_bank_code: str = ""  # the BBAN's bank code (authsrv.iban.make_iban)
    auto_balance: int = 0  # 1: a balance in `currency` is opened when the user's KYC succeeds


@attrs.frozen
class UserRow:
    id: int
    partner: str
    first_name: str
    last_name: str
    phone: str
    email: str
    birth_date: str
    state: str
    kyc: str
    wpin_hash: str  # hash_secret() of the wallet PIN; '' = no customer login
    created_at: str


USER_UPDATABLE_FIELDS = frozenset(
    {"first_name", "last_name", "phone", "email", "birth_date", "state", "kyc", "wpin_hash"}
)


@attrs.frozen
class BalanceRow:
    id: int
    user_id: int
    partner: str
    currency: str
    ledger_account_id: int
    status: str
    created_at: str
    iban: str = ""  # '' when the program issues no IBANs


@attrs.frozen
class CardRow:
    id: int
    user_id: int
    balance_id: int
    partner: str
    config_id: str
    card_type: str
    pan_index: bytes
    pan_enc: bytes
    pan_first6: str
    pan_last4: str
    expiry_yymm: str
    status: CardStatus
    lock_reason: int
    wrong_pin_count: int
    pvv: str
    created_at: str
    order_state: str = ""  # physical / digital-first: ORDERED -> LINKED; '' = never ordered
    order_json: str = ""  # delivery address, bureau order id, tracking number, activation time
    source_card_id: int = 0
    cvv_version: int = 0


@attrs.frozen
class NewCard:
    """What a caller supplies to create a card; the store assigns id and created_at."""

    user_id: int
    balance_id: int
    config_id: str
    card_type: str
    pan_index: bytes = attrs.field(validator=lambda _, __, value: _check_pan_index(value))
    pan_enc: bytes
    pan_first6: str
    pan_last4: str
    expiry_yymm: str
    status: CardStatus
    pvv: str = ""
    order_state: str = ""
    order_json: str = ""


@attrs.frozen
class AdminRow:
    username: str
    role: Role
    password_hash: str


@attrs.frozen
class PartnerBalanceRow:
    partner: str
    type: PartnerBalanceType
    currency: str
    ledger_account_id: int
    low_threshold: int


PARTNER_BALANCE_KINDS: Mapping[PartnerBalanceType, AccountKind] = {
    PartnerBalanceType.deposit: AccountKind.partner_deposit,
    PartnerBalanceType.credit: AccountKind.partner_credit,
}
PARTNER_BALANCES_MAX = 10_000  # rows one low-balance check reads; far above partners x currencies
RELOAD_PENDING = "PENDING"  # transfer id reserved, ledger outcome not recorded yet
RELOAD_DONE = "DONE"  # applied in the ledger and recorded with its event


@attrs.frozen
class ReloadRow:
    """A reload with an idempotency key: the key always maps to the same ledger transfer."""

    balance_id: int
    key: str
    transfer_id: int
    amount: int
    state: str  # RELOAD_PENDING -> RELOAD_DONE (a refused transfer deletes the row)


def _check_pan_index(value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != PAN_INDEX_LENGTH:
        raise ValueError(f"pan_index must be {PAN_INDEX_LENGTH} bytes")


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- customer sessions, devices, admins: values ----------------------------------------------------

LOGIN_CANDIDATES_MAX = 8  # users sharing one phone/e-mail across partners that one login checks
DEVICES_PER_USER_MAX = 16  # active pairings; pairing one more unpairs the oldest
USERS_PAGE_MAX = 100
ADMINS_LIST_MAX = 1_000


@attrs.frozen
class WpinClaim:
    """What `claim_wpin_attempts` decided: whose wPIN may be checked now."""

    admitted: tuple[int, ...]  # user ids; each was charged one failure, refunded on success
    locked: tuple[int, ...]  # user ids whose customer logins are locked right now
    retry_after_s: int  # seconds until the last of those locks elapses (0: none locked)


@attrs.frozen
class PairResult:
    replaced_installation: bool  # the device had another active installation, now inactive
    evicted_device_ids: tuple[str, ...]  # older devices unpaired to stay within DEVICES_PER_USER_MAX


@attrs.frozen
class DeviceRow:
    user_id: int
    device_id: str
    installation_id: str
    created_at: str


AUDIT_PAGE_MAX = 10_000
AUDIT_VALUE_MAX = 4_096  # characters of a before/after value kept


@attrs.frozen
class AuditEntry:
    """One operator action: who (actor, role), through what (channel: panel or api), what (action on
    target), when (at, UTC ISO 8601), how it ended (outcome) and the values it changed (JSON)."""

    id: int
    at: str
    actor: str
    role: str
    channel: str
    action: str
    target: str
    outcome: str
    before_json: str = ""
    after_json: str = ""
    detail: str = ""


@attrs.frozen
class AuditQuery:
    actor: str = ""
    action: str = ""
    channel: str = ""
    target: str = ""  # substring
    since: str = ""  # ISO 8601, inclusive
    until: str = ""  # ISO 8601, exclusive


@attrs.frozen
class AdminInfo:
    """An admin as listed: never the hash."""

    username: str
    role: Role
    created_by: str  # '' for the one `authsrv init` made
    created_at: str


def utc_iso_precise(moment: datetime.datetime) -> str:
    """ISO 8601 UTC with microseconds: lock deadlines of a second or two must not round away."""
    assert moment.tzinfo is not None
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc_iso(text: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.timezone.utc)


def verify_login_secret(stored: str, secret: str) -> bool:
    """`verify_secret`, but a missing hash ('' = no login) costs the same scrypt as a real one,
    so the answer time does not tell which logins exist."""
    if stored:
        return verify_secret(stored, secret)
    verify_secret(_dummy_hash(), secret)
    return False


KYC_FORM_SEQUENCE = "kyc_form"
KYC_FORMS_PAGE_MAX = 500
KYC_FORM_PENDING = "PENDING"
KYC_FORM_ACCEPTED = "ACCEPTED"
KYC_FORM_REJECTED = "REJECTED"


@attrs.frozen
class KycFormRow:
    id: int
    user_id: int
    partner: str
    state: str  # KYC_FORM_PENDING -> KYC_FORM_ACCEPTED | KYC_FORM_REJECTED
    fields_json: str  # the form's text fields (personal data: never logged)
    images_json: str  # [{"name", "size", "contentType"}]; the bytes are files (kycfiles)
    created_at: str
    decided_at: str = ""
    decided_by: str = ""  # the admin's username
    reason: str = ""


_KYC_FORM_COLUMNS = (
    "id, user_id, partner, state, fields_json, images_json, created_at, decided_at, decided_by, reason"
)


# -- secrets at rest -------------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    """scrypt with a random salt, as a self-describing string `scrypt$N$r$p$salt$key` (base64)."""
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    key = hashlib.scrypt(
        secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_KEY_BYTES
    )
    return "$".join(
        ["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(key)]
    )


def verify_secret(stored: str, secret: str) -> bool:
    """Constant-time check of `secret` against `hash_secret` output; False for a malformed hash."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        return False
    if not (2 <= n <= SCRYPT_N_MAX and 1 <= r <= 32 and 1 <= p <= 16 and 1 <= len(expected) <= 64):
        return False
    key = hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=256 * n * r + 2**20
    )
    return hmac.compare_digest(key, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


# -- the data-directory lock -----------------------------------------------------------------------


class DataDirLock:
    """An exclusive `flock` on `DIR/.lock`: held by the server while it runs, and by offline
    commands (seed) that must not change the store and ledger under a running server."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        path = Path(data_dir) / LOCK_FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusy(DATA_DIR_BUSY_MESSAGE) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# -- the store -------------------------------------------------------------------------------------


class Store:
    def __init__(self, conn: sqlite3.Connection, *, data_dir: Path | None = None) -> None:
        self._conn = RecordingConnection(conn)
        self.db = sqlite_utils.Database(self._conn)
        self.data_dir = data_dir
        self._lock = threading.RLock()
        self._index: CardIndex | None = None
        self._after_commit: list[IndexOp] = []  # index refreshes of this transaction, run on commit
        self._replica_ops: list[IndexOp] = []  # refreshes only a standby applying the change runs
        self._files: list[tuple[str, bytes]] = []  # files this transaction wrote (replicated with it)
        self._log = None  # a cluster primary's replicated log (ledger.jetstream.StreamLog)
        self.replicated_wait_s = REPLICATED_WAIT_S
        self._checkpoints: sqlite3.Connection | None = None  # defer_checkpoints: checkpoint()'s own
        self._checkpoint_lock = threading.Lock()
        self.clearing_digest_identities = False  # set by _add_missing_schema

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> Store:
        """Open `store.db` (or `DIR/store.db` when given the data directory); with create=True
        make the schema if the file is new."""
        path = Path(path)
        if path.is_dir():
            path = path / STORE_FILE_NAME
        if not create and not path.exists():
            raise StoreError(f"{path}: not found (run `authsrv init` first)")
        if not path.exists():
            # Encrypted PANs and PVVs: owner only. SQLite gives its -wal and -shm files this mode too.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        assert mode == "wal", mode
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        store = cls(conn, data_dir=path.parent)
        try:
            store._check_or_create_schema(create=create)
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        with self._checkpoint_lock:
            if self._checkpoints is not None:
                self._checkpoints.close()
                self._checkpoints = None
        with self._lock:
            self._conn.close()

    # -- checkpoints -------------------------------------------------------------------------------

    def defer_checkpoints(self) -> None:
        """From now on `checkpoint()`, called by a background task, copies the WAL into the database,
        not the COMMIT that crosses SQLite's 1,000-page mark (that stays as a bound, at
        WAL_AUTOCHECKPOINT_DEFERRED_PAGES). A checkpoint writes pages all over the file and fsyncs
        it: as clearing_records grew, it became most of clearing's commit time (a 400-record chunk's
        commit took 3 ms at 25k rows and 19 ms at 410k with checkpoints, 5 ms at 410k without;
        docs/benchmarks.md, section 6), and that commit runs in clearing's critical path. Deferred
        once per store: calling it again (a cluster node serving anew) changes nothing."""
        with self._checkpoint_lock:
            if self._checkpoints is not None:
                return
        with self._lock:
            path = self._conn.execute("PRAGMA database_list").fetchone()[2]
        checkpoints = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        checkpoints.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        checkpoints.execute("PRAGMA synchronous = FULL")
        with self._checkpoint_lock:
            if self._checkpoints is not None:  # deferred meanwhile by another thread
                checkpoints.close()
                return
            self._checkpoints = checkpoints
        with self._lock:
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_DEFERRED_PAGES}")

    def checkpoint(self) -> tuple[int, int]:
        """A PASSIVE checkpoint (it waits for no reader or writer): the WAL's frames, and how many of
        them are now in the database. Blocking: run it in a worker thread."""
        with self._checkpoint_lock:
            assert self._checkpoints is not None, "defer_checkpoints() first"
            _, frames, copied = self._checkpoints.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return frames, copied

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One `BEGIN IMMEDIATE` transaction; nested calls join the outermost one.

        IMMEDIATE takes the write lock at once, so ids read with `_next_id` inside stay free
        until commit. On a cluster primary the transaction's writes are also one record of the
        replicated log, appended before COMMIT (log order is commit order); the caller returns
        only once the stream acknowledged it (docs/architecture.md, "Replication and failover")."""
        wait_for = 0
        with self._lock:
            if self._conn.in_transaction:
                yield
                return
            replicating = self._log is not None
            self._conn.execute("BEGIN IMMEDIATE")
            if replicating:
                self._conn.recording = []
            try:
                yield
                if replicating:
                    wait_for = self._append_change()
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                self._after_commit.clear()
                raise
            finally:
                self._conn.recording = None
                self._replica_ops.clear()
                self._files.clear()
            pending, self._after_commit = self._after_commit, []
            for op in pending:
                self._run_index_op(op)
        if wait_for:
            try:
                self._log.wait_durable_sync(wait_for, self.replicated_wait_s)
            except TimeoutError:
                raise ReplicationTimeout(f"the shard's stream did not acknowledge within {self.replicated_wait_s:g} s"
                                         ) from None

    def _append_change(self) -> int:
        """This transaction's change as one log record (0: it wrote nothing)."""
        from ledger.jetstream import KIND_STORE

        statements = self._conn.recording
        if not statements and not self._files:
            return 0
        change = StoreChange(statements=statements, index_ops=[*self._after_commit, *self._replica_ops],
                             files=list(self._files))
        payload = encode_change(change)
        self._log.ensure_room(len(payload))
        return self._log.append(payload, KIND_STORE)

    @property
    def replicating(self) -> bool:
        """A cluster primary's store: every transaction is also a record of the shard's stream."""
        return self._log is not None

    def replicate_to(self, log) -> None:
        """From now on every transaction is also a record of `log` (a cluster primary), or, with
        None, no longer (a standby, a single node)."""
        with self._lock:
            self._log = log

    def add_file(self, relative: str, content: bytes) -> None:
        """A file the current transaction wrote under the data directory, replicated with it."""
        assert self._conn.in_transaction
        if self._log is not None:
            self._files.append((relative, content))

    def apply_change(self, change: StoreChange) -> None:
        """A standby: apply a primary's transaction (same statements, same index refreshes)."""
        assert self._log is None, "a primary does not apply changes from the log"
        if change.files:
            assert self.data_dir is not None
            write_files(self.data_dir, change.files)
        with self.transaction():
            for sql, parameters in change.statements:
                self._conn.execute(sql, parameters)
            self._after_commit.extend(tuple(op) for op in change.index_ops)

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside a transaction: undo only this block's writes if it raises (the rest stays)."""
        assert self._conn.in_transaction, "a savepoint lives inside transaction()"
        name = f"sp_{secrets.token_hex(4)}"
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._conn.execute(f"ROLLBACK TO {name}")
            self._conn.execute(f"RELEASE {name}")
            raise
        self._conn.execute(f"RELEASE {name}")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store lock (e.g. while building the index, so no change slips in between)."""
        with self._lock:
            yield

    def _on_commit(self, op: IndexOp) -> None:
        """Refresh the index entry `op` names once the current transaction has committed."""
        assert self._conn.in_transaction
        if self._index is not None or self._log is not None:
            self._after_commit.append(op)

    def _run_index_op(self, op: IndexOp) -> None:
        index = self._index
        if index is None:
            return
        match op:
            case ("card", card_id):
                self._refresh_card(card_id)
            case ("partner", name):
                index.put_partner(self._partner_state(name))
            case ("system", currency):
                for kind, put in (("settlement", index.put_settlement_account),
                                  ("funding", index.put_funding_account)):
                    account_id = self.system_accounts(kind).get(currency)
                    if account_id is not None:
                        put(currency, account_id)
            case ("controls", scope, owner_id):
                from authsrv.hotpath.limits import Controls, decode_spec

                text = self.get_spend_controls(scope, owner_id)
                if text is not None:
                    index.put_controls(scope, owner_id, Controls.from_spec(decode_spec(text)))
            case _:
                raise AssertionError(f"unknown index refresh {op!r}")

    def _next_id(self, table: str) -> int:
        assert self._conn.in_transaction, "ids are only stable under the write lock"
        (last,) = self._conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()
        return int(last) + 1

    def next_ids(self, table: str, count: int) -> range:
        """Reserve `count` consecutive row ids of `table` for a bulk insert in this transaction."""
        assert table in ("users", "balances", "cards", "ledger_accounts")
        assert count >= 0
        first = self._next_id(table)
        return range(first, first + count)

    def insert_rows(self, table: str, rows: Iterable[Mapping[str, Any]], *, batch_size: int = 500) -> None:
        """Bulk insert inside the current transaction (sqlite-utils `insert_all`, savepointed)."""
        assert self._conn.in_transaction
        self.db[table].insert_all(rows, batch_size=batch_size)

    # -- schema ------------------------------------------------------------------------------------

    def _check_or_create_schema(self, *, create: bool) -> None:
        if "meta" in self.db.table_names():
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version != SCHEMA_VERSION:
                raise StoreError(f"store schema version {version}, this build needs {SCHEMA_VERSION}")
            self._add_missing_schema()
            return
        if not create:
            raise StoreError("store.db has no schema (not created by `authsrv init`)")
        with self.transaction():
            _create_schema(self.db)
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        self._add_missing_schema()

    def _add_missing_schema(self) -> None:
        """Additive schema (new tables, indexes and columns) applied to old and new files alike."""
        with self.transaction():
            for statement in ADDED_SCHEMA:
                self._conn.execute(statement)
            for table, columns in ADDED_COLUMNS.items():
                present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                for column, declaration in columns.items():
                    if column not in present:
                        self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            for statement in ADDED_INDEXES:
                self._conn.execute(statement)
            found = self._conn.execute("SELECT value FROM meta WHERE key = ?", (CLEARING_IDENTITY_KEY,)).fetchone()
            if found is None:  # first opened by a build whose identities begin with the RRN
                older_rows = self._conn.execute("SELECT 1 FROM clearing_records LIMIT 1").fetchone() is not None
                found = (CLEARING_IDENTITY_DIGEST if older_rows else CLEARING_IDENTITY_RRN_DIGEST,)
                self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (CLEARING_IDENTITY_KEY, found[0]))
        # Rows written before clearing identities began with the RRN: ClearingStore.records looks for those too.
        self.clearing_digest_identities = found[0] == CLEARING_IDENTITY_DIGEST

    # -- events (the outbox the partner-delivery worker reads) ---------------------------------------

    def append_event(self, partner: str, kind: str, subject: str, body: Mapping[str, Any]) -> int:
        """Record a change for the partner, inside the caller's transaction when there is one.

        The event commits with the change that caused it, or neither does. `idempotency_key` is
        fixed here, so every delivery attempt of this event carries the same key."""
        return self.append_events([(partner, kind, subject, body)])[0]

    def append_events(self, events: Sequence[tuple[str, str, str, Mapping[str, Any] | msgspec.Struct]],
                      pause: Callable[[], None] | None = None) -> range:
        """`append_event` for many (partner, kind, subject, body), in order, in one statement; their
        ids. `pause` runs before each row is built (a worker thread yielding to the event loop)."""
        with self.transaction():
            first = self._next_id("events")
            created = utc_now_iso()
            rows = []
            tokens = secrets.token_hex(EVENT_KEY_TOKEN_BYTES * len(events))  # one system call for all
            step = 2 * EVENT_KEY_TOKEN_BYTES
            for offset, (partner, kind, subject, body) in enumerate(events):
                if pause is not None:
                    pause()
                assert kind and len(kind) <= EVENT_KIND_LENGTH_MAX, kind
                event_id = first + offset
                rows.append((event_id, partner, kind, subject, _event_body_json(body),
                             f"evt-{event_id}-{tokens[offset * step:(offset + 1) * step]}", created))
            if rows:
                self._conn.executemany(
                    "INSERT INTO events (id, partner, kind, subject, body, idempotency_key, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return range(first, first + len(rows))

    def events(self, *, partner: str | None = None, after_id: int = 0, limit: int = 100) -> list[EventRow]:
        assert 0 < limit <= EVENTS_PAGE_MAX
        query = f"SELECT {_EVENT_COLUMNS} FROM events WHERE id > ?"
        values: list[Any] = [after_id]
        if partner is not None:
            query += " AND partner = ?"
            values.append(partner)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id LIMIT ?", (*values, limit)).fetchall()
        return [EventRow(*row) for row in rows]

    # -- partners ----------------------------------------------------------------------------------

    def add_partner(self, name: str, *, balance_mode: str, collateral: str) -> PartnerRow:
        row = PartnerRow(name, balance_mode, collateral, utc_now_iso())
        with self.transaction():
            try:
                self._conn.execute(
                    "INSERT INTO partners (name, balance_mode, collateral, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    attrs.astuple(row),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(f"partner {name!r} already exists") from None
            self._on_commit(("partner", name))
        return row

    def get_partner(self, name: str) -> PartnerRow | None:
        with self._lock:
            found = self._conn.execute(
                "SELECT name, balance_mode, collateral, created_at FROM partners WHERE name = ?",
                (name,),
            ).fetchone()
        return PartnerRow(*found) if found else None

    def list_partners(self) -> list[PartnerRow]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, balance_mode, collateral, created_at FROM partners ORDER BY name"
            ).fetchall()
        return [PartnerRow(*row) for row in rows]

    def set_partner_modes(self, name: str, *, balance_mode: str, collateral: str) -> None:
        """Follow a changed `[partners.NAME]` table (the config file is what operators edit)."""
        with self.transaction():
            updated = self._conn.execute(
                "UPDATE partners SET balance_mode = ?, collateral = ? WHERE name = ?",
                (balance_mode, collateral, name),
            ).rowcount
            assert updated == 1, f"no partner {name!r}"
            self._on_commit(("partner", name))

    # -- card programs -----------------------------------------------------------------------------

    def add_program(self, program: ProgramRow) -> None:
        assert program.card_type in ("virtual", "physical", "digital_first")
        assert program.bin.isdigit() and 6 <= len(program.bin) <= 8
        if program.iban_country:
            make_iban(program.iban_country, program.iban_bank_code, 0)  # IbanError for a bad pair
        with self.transaction():
            try:
                self._conn.execute(
                    f"INSERT INTO programs ({_PROGRAM_COLUMNS}) VALUES ({', '.join('?' * 11)})",
                    attrs.astuple(program),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(f"card program {program.config_id!r} already exists") from None

    def get_program(self, config_id: str) -> ProgramRow | None:
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_PROGRAM_COLUMNS} FROM programs WHERE config_id = ?",
                (config_id,),
            ).fetchone()
        return ProgramRow(*found) if found else None

    # -- ledger accounts ---------------------------------------------------------------------------

    def ensure_system_accounts(self, currency: str) -> list[AccountSpec]:
        """The settlement and funding accounts of `currency`, allocated on first use."""
        with self.transaction():
            settlement = self._ensure_account(AccountKind.settlement, currency, SYSTEM_OWNER)
            funding = self._ensure_account(AccountKind.funding, currency, SYSTEM_OWNER)
            self._on_commit(("system", currency))
        return [settlement, funding]

    def ensure_partner_accounts(self, partner: str, currency: str) -> list[AccountSpec]:
        """A partner's accounts in `currency`: its collateral (deposit or credit, never below zero)
        with the `collateral_usage` counterparty, and its fee income. Allocated on first use."""
        with self.transaction():
            row = self.get_partner(partner)
            assert row is not None, f"no partner {partner!r}"
            specs = []
            if row.collateral in COLLATERAL_KINDS:
                kind, balance_type = COLLATERAL_KINDS[row.collateral]
                collateral = self._ensure_account(
                    kind, currency, partner, AccountFlags.debits_must_not_exceed_credits
                )
                self._conn.execute(
                    "INSERT OR IGNORE INTO partner_balances (partner, type, currency,"
                    " ledger_account_id, low_threshold) VALUES (?, ?, ?, ?, 0)",
                    (partner, str(balance_type), currency, collateral.id),
                )
                specs.append(collateral)
            specs.append(self._ensure_account(AccountKind.collateral_usage, currency, partner))
            specs.append(self._ensure_account(AccountKind.fee_income, currency, partner))
            self._on_commit(("partner", partner))
        return specs

    def ledger_account(self, kind: AccountKind, currency: str, owner: str) -> AccountSpec | None:
        """A system (owner '') or partner account; None when never allocated."""
        assert kind != AccountKind.user_balance, "user balances are found through their balance"
        with self._lock:
            found = self._conn.execute(
                "SELECT id, currency, kind, flags, user_data FROM ledger_accounts"
                " WHERE kind = ? AND currency = ? AND owner = ?",
                (int(kind), currency, owner),
            ).fetchone()
        return _account_spec(found) if found else None

    def all_ledger_accounts(self) -> list[AccountSpec]:
        """Every account the store has allocated, so the server can re-create any the ledger lacks."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, currency, kind, flags, user_data FROM ledger_accounts ORDER BY id"
            ).fetchall()
        return [_account_spec(row) for row in rows]

    def partner_balances(self, partner: str | None = None) -> list[PartnerBalanceRow]:
        query = "SELECT partner, type, currency, ledger_account_id, low_threshold FROM partner_balances"
        with self._lock:
            if partner is None:
                rows = self._conn.execute(query + " ORDER BY partner, currency").fetchall()
            else:
                rows = self._conn.execute(
                    query + " WHERE partner = ? ORDER BY currency", (partner,)
                ).fetchall()
        return [PartnerBalanceRow(p, PartnerBalanceType(t), c, a, low) for p, t, c, a, low in rows]

    def set_partner_balance_threshold(self, ledger_account_id: int, low_threshold: int) -> None:
        assert 0 <= low_threshold <= AMOUNT_MAX
        with self.transaction():
            updated = self._conn.execute(
                "UPDATE partner_balances SET low_threshold = ? WHERE ledger_account_id = ?",
                (low_threshold, ledger_account_id),
            ).rowcount
            assert updated == 1, f"no partner balance on account {ledger_account_id}"

    def allocate_transfer_ids(self, count: int) -> range:
        """Reserve `count` management transfer ids (2**63 + n), never handed out twice."""
        assert 1 <= count <= TRANSFER_ID_ALLOCATION_MAX
        with self.transaction():
            (last,) = self._conn.execute(
                "UPDATE sequences SET value = value + ? WHERE name = ? RETURNING value",
                (count, MANAGEMENT_TRANSFER_SEQUENCE),
            ).fetchone()
        first = MANAGEMENT_TRANSFER_ID_BASE + last - count + 1
        assert first > MANAGEMENT_TRANSFER_ID_BASE and first + count - 1 <= ID_MAX
        return range(first, first + count)

    def _ensure_account(
        self, kind: AccountKind, currency: str, owner: str, flags: AccountFlags = AccountFlags.none
    ) -> AccountSpec:
        assert self._conn.in_transaction
        assert len(currency) == 3 and currency.isalpha() and currency.isupper(), currency
        existing = self.ledger_account(kind, currency, owner)
        if existing is not None:
            assert existing.flags == flags, f"{kind.name} {currency} {owner!r} has other flags"
            return existing
        spec = AccountSpec(id=self._next_id("ledger_accounts"), currency=currency, kind=kind, flags=flags)
        self._insert_account(spec, owner)
        return spec

    def _insert_account(self, spec: AccountSpec, owner: str) -> None:
        self._conn.execute(
            "INSERT INTO ledger_accounts (id, kind, currency, owner, flags, user_data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (spec.id, int(spec.kind), spec.currency, owner, int(spec.flags), spec.user_data),
        )

    # -- admins ------------------------------------------------------------------------------------

    def add_admin(self, username: str, role: Role, password: str) -> AdminRow:
        row = AdminRow(username, Role(role), hash_secret(password))
        with self.transaction():
            try:
                self._conn.execute(
                    "INSERT INTO admins (username, role, password_hash) VALUES (?, ?, ?)",
                    (row.username, str(row.role), row.password_hash),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(f"admin {username!r} already exists") from None
        return row

    def get_admin(self, username: str) -> AdminRow | None:
        with self._lock:
            found = self._conn.execute(
                "SELECT username, role, password_hash FROM admins WHERE username = ?", (username,)
            ).fetchone()
        return AdminRow(found[0], Role(found[1]), found[2]) if found else None

    def check_admin_password(self, username: str, password: str) -> AdminRow | None:
        """The admin when the password matches, else None (an unknown name costs the same time)."""
        admin = self.get_admin(username)
        # Hash anyway for an unknown user, so timing does not reveal which usernames exist.
        stored = admin.password_hash if admin else _dummy_hash()
        if not (verify_secret(stored, password) and admin):
            return None
        return None if self.admin_disabled(username) else admin

    def admin_disabled(self, username: str) -> bool:
        """True when an Admin disabled this account (it may not log in; unknown names: False)."""
        with self._lock:
            found = self._conn.execute("SELECT disabled FROM admins WHERE username = ?", (username,)).fetchone()
        return bool(found and found[0])

    # -- audit log ---------------------------------------------------------------------------------

    def append_audit(self, entry: AuditEntry) -> int:
        """Write one audit entry durably (its own transaction, or the caller's); its id."""
        assert entry.id == 0
        with self.transaction():
            cursor = self._conn.execute(
                "INSERT INTO audit_log (at, actor, role, channel, action, target, outcome, before_json,"
                " after_json, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.at or utc_now_iso(), entry.actor[:64], entry.role[:16], entry.channel[:16],
                 entry.action[:64], entry.target[:128], entry.outcome[:64], entry.before_json[:AUDIT_VALUE_MAX],
                 entry.after_json[:AUDIT_VALUE_MAX], entry.detail[:AUDIT_VALUE_MAX]),
            )
        return int(cursor.lastrowid)

    def audit_page(self, query: AuditQuery, *, before_id: int = 0, limit: int = 50) -> list[AuditEntry]:
        """Newest first, `limit` entries with id < before_id (0: from the newest)."""
        assert 1 <= limit <= AUDIT_PAGE_MAX
        clauses, values = ["1"], []
        for column, value in (("actor", query.actor), ("action", query.action), ("channel", query.channel)):
            if value:
                clauses.append(f"{column} = ?")
                values.append(value)
        if query.target:
            clauses.append("target LIKE ? ESCAPE '\\'")
            escaped = query.target.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            values.append(f"%{escaped}%")
        if query.since:
            clauses.append("at >= ?")
            values.append(query.since)
        if query.until:
            clauses.append("at < ?")
            values.append(query.until)
        if before_id:
            clauses.append("id < ?")
            values.append(before_id)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT id, at, actor, role, channel, action, target, outcome, before_json, after_json, detail"
                f" FROM audit_log WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?", (*values, limit),
            ).fetchall()
        return [AuditEntry(*row) for row in rows]

    def audit_actions(self) -> list[str]:
        """The distinct action names logged so far (for the filter's choices)."""
        with self._lock:
            rows = self._conn.execute("SELECT DISTINCT action FROM audit_log ORDER BY action LIMIT 500").fetchall()
        return [row[0] for row in rows]

    # -- users -------------------------------------------------------------------------------------

    def create_user(
        self,
        *,
        partner: str,
        first_name: str,
        last_name: str,
        phone: str,
        email: str,
        birth_date: str,
        state: str,
        kyc: str,
        wpin_hash: str = "",
    ) -> UserRow:
        with self.transaction():
            row = UserRow(
                self._next_id("users"), partner, first_name, last_name, phone, email,
                birth_date, state, kyc, wpin_hash, utc_now_iso(),
            )  # fmt: skip
            self._conn.execute(
                "INSERT INTO users (id, partner, first_name, last_name, phone, email, birth_date,"
                " state, kyc, wpin_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(row),
            )
        return row

    def get_user(self, user_id: int) -> UserRow | None:
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)
            ).fetchone()
        return UserRow(*found) if found else None

    def find_user(self, partner: str, *, phone: str = "", email: str = "") -> UserRow | None:
        """A partner's user by phone or by e-mail (customer login)."""
        assert bool(phone) != bool(email), "exactly one of phone, email"
        column, value = ("phone", phone) if phone else ("email", email)
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE partner = ? AND {column} = ?"
                " ORDER BY id LIMIT 1",
                (partner, value),
            ).fetchone()
        return UserRow(*found) if found else None

    def update_user(self, user_id: int, **fields: str) -> UserRow | None:
        """Change some of USER_UPDATABLE_FIELDS; None when there is no such user."""
        unknown = set(fields) - USER_UPDATABLE_FIELDS
        assert not unknown, f"not updatable: {sorted(unknown)}"
        with self.transaction():
            if fields:
                assignments = ", ".join(f"{name} = ?" for name in sorted(fields))
                values = [fields[name] for name in sorted(fields)]
                self._conn.execute(f"UPDATE users SET {assignments} WHERE id = ?", (*values, user_id))
            return self.get_user(user_id)

    # -- customer sessions, devices, admins ---------------------------------------------------------

    def users_by_login(self, *, phone: str = "", email: str = "", partner: str | None = None) -> list[UserRow]:
        """The users a customer login names, oldest first, at most LOGIN_CANDIDATES_MAX: phones and
        e-mails are unique per partner only, so without `partner` several may answer."""
        assert bool(phone) != bool(email), "exactly one of phone, email"
        column, value = ("phone", phone) if phone else ("email", email)
        query = f"SELECT {_USER_COLUMNS} FROM users WHERE {column} = ?"
        values: list[Any] = [value]
        if partner is not None:
            query += " AND partner = ?"
            values.append(partner)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id LIMIT ?", (*values, LOGIN_CANDIDATES_MAX)).fetchall()
        return [UserRow(*row) for row in rows]

    def claim_wpin_attempts(self, user_ids: Iterable[int], *, failures_max: int, lock_s: int,
                            now: datetime.datetime) -> WpinClaim:
        """Charge one wPIN failure to each unlocked user *before* the wPIN is checked.

        Charging first (and locking at once when the charge reaches `failures_max`) means guesses
        running concurrently cannot slip past the limit while scrypt runs, and a crash between
        charge and check errs towards locked; `settle_wpin_success` refunds a right wPIN."""
        assert failures_max >= 1 and lock_s >= 1
        admitted: list[int] = []
        locked: list[int] = []
        retry_after_s = 0
        with self.transaction():
            for user_id in user_ids:
                found = self._conn.execute(
                    "SELECT wpin_failures, wpin_locked_until FROM users WHERE id = ?", (user_id,)
                ).fetchone()
                if found is None:
                    continue
                failures, locked_until = int(found[0]), found[1]
                if locked_until:
                    remaining_s = (parse_utc_iso(locked_until) - now).total_seconds()
                    if remaining_s > 0:
                        locked.append(user_id)
                        retry_after_s = max(retry_after_s, -int(-remaining_s // 1))  # ceil
                        continue
                    failures = 0  # the lock has elapsed: a fresh run of attempts
                failures += 1
                until = utc_iso_precise(now + datetime.timedelta(seconds=lock_s)) if failures >= failures_max else ""
                self._conn.execute(
                    "UPDATE users SET wpin_failures = ?, wpin_locked_until = ? WHERE id = ?",
                    (failures, until, user_id),
                )
                admitted.append(user_id)
        return WpinClaim(tuple(admitted), tuple(locked), retry_after_s)

    def settle_wpin_success(self, succeeded: int | None, refunded: Iterable[int], *, failures_max: int) -> None:
        """A right wPIN: clear the user's run of failures; give back the charge of the other
        users the login named (they were not guessed at)."""
        with self.transaction():
            if succeeded is not None:
                self._conn.execute(
                    "UPDATE users SET wpin_failures = 0, wpin_locked_until = '' WHERE id = ?", (succeeded,)
                )
            for user_id in refunded:
                assert user_id != succeeded
                self._conn.execute(
                    "UPDATE users SET wpin_failures = MAX(wpin_failures - 1, 0),"
                    " wpin_locked_until = CASE WHEN wpin_failures - 1 < ? THEN '' ELSE wpin_locked_until END"
                    " WHERE id = ?",
                    (failures_max, user_id),
                )

    def wpin_guard(self, user_id: int) -> tuple[int, str]:
        """(failures in a row, locked until ('' = not locked)) of a user."""
        with self._lock:
            found = self._conn.execute(
                "SELECT wpin_failures, wpin_locked_until FROM users WHERE id = ?", (user_id,)
            ).fetchone()
        assert found is not None, f"no user {user_id}"
        return int(found[0]), found[1]

    def pair_device(self, user_id: int, device_id: str, installation_id: str) -> PairResult:
        """Make `installation_id` the one active installation of (user, device).

        The previous active installation stays as one inactive row (history of one), so the
        table holds at most two rows per device."""
        assert device_id and installation_id
        with self.transaction():
            active = self._conn.execute(
                "SELECT installation_id FROM devices WHERE user_id = ? AND device_id = ? AND active = 1",
                (user_id, device_id),
            ).fetchall()
            assert len(active) <= 1, "one active installation per (user, device)"
            if active and active[0][0] == installation_id:
                return PairResult(False, ())
            self._deactivate_device(user_id, device_id)
            self._conn.execute(
                "DELETE FROM devices WHERE user_id = ? AND device_id = ? AND installation_id = ?",
                (user_id, device_id, installation_id),
            )
            self._conn.execute(
                "INSERT INTO devices (user_id, device_id, installation_id, active, created_at)"
                " VALUES (?, ?, ?, 1, ?)",
                (user_id, device_id, installation_id, utc_iso_precise(datetime.datetime.now(datetime.timezone.utc))),
            )
            evicted = self._evict_devices_over_limit(user_id)
        return PairResult(bool(active), evicted)

    def _deactivate_device(self, user_id: int, device_id: str) -> bool:
        assert self._conn.in_transaction
        self._conn.execute(
            "DELETE FROM devices WHERE user_id = ? AND device_id = ? AND active = 0", (user_id, device_id)
        )
        changed = self._conn.execute(
            "UPDATE devices SET active = 0 WHERE user_id = ? AND device_id = ? AND active = 1", (user_id, device_id)
        ).rowcount
        return changed > 0

    def _evict_devices_over_limit(self, user_id: int) -> tuple[str, ...]:
        rows = self._conn.execute(
            "SELECT device_id FROM devices WHERE user_id = ? AND active = 1 ORDER BY created_at DESC, rowid DESC",
            (user_id,),
        ).fetchall()
        evicted = tuple(row[0] for row in rows[DEVICES_PER_USER_MAX:])
        for device_id in evicted:
            self._deactivate_device(user_id, device_id)
        return evicted

    def unpair_device(self, user_id: int, device_id: str) -> bool:
        """Deactivate the device's installation; False when it had none active."""
        with self.transaction():
            return self._deactivate_device(user_id, device_id)

    def devices_of_user(self, user_id: int) -> list[DeviceRow]:
        """The user's active pairings, newest first (bounded by DEVICES_PER_USER_MAX)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT user_id, device_id, installation_id, created_at FROM devices"
                " WHERE user_id = ? AND active = 1 ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (user_id, DEVICES_PER_USER_MAX),
            ).fetchall()
        return [DeviceRow(*row) for row in rows]

    def users_page(self, *, partner: str | None, offset: int, limit: int) -> tuple[list[UserRow], int]:
        """One page of users (of one partner, or all), by id, and how many there are in all."""
        assert 0 <= offset and 1 <= limit <= USERS_PAGE_MAX
        where, values = ("WHERE partner = ?", (partner,)) if partner is not None else ("", ())
        with self._lock:
            (total,) = self._conn.execute(f"SELECT COUNT(*) FROM users {where}", values).fetchone()
            rows = self._conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users {where} ORDER BY id LIMIT ? OFFSET ?", (*values, limit, offset)
            ).fetchall()
        return [UserRow(*row) for row in rows], int(total)

    def create_admin(self, username: str, role: Role, password: str, *, created_by: str) -> AdminInfo:
        """A new admin user; StoreConflict when the username is taken. The hash (scrypt, tens of
        ms) is made before taking the store lock."""
        password_hash = hash_secret(password)
        info = AdminInfo(username, Role(role), created_by, utc_now_iso())
        with self.transaction():
            try:
                self._conn.execute(
                    "INSERT INTO admins (username, role, password_hash, created_by, created_at) VALUES (?, ?, ?, ?, ?)",
                    (info.username, str(info.role), password_hash, info.created_by, info.created_at),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(f"admin {username!r} already exists") from None
        return info

    def admins(self) -> list[AdminInfo]:
        """Every admin (at most ADMINS_LIST_MAX), by username, without password hashes."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT username, role, created_by, created_at FROM admins ORDER BY username LIMIT ?",
                (ADMINS_LIST_MAX,),
            ).fetchall()
        return [AdminInfo(row[0], Role(row[1]), row[2], row[3]) for row in rows]

    # -- balances ----------------------------------------------------------------------------------

    def create_balance(self, user_id: int, currency: str, *,
                       iban_bank: tuple[str, str] | None = None) -> tuple[BalanceRow, AccountSpec]:
        """A user balance and its ledger account (create the account in the ledger next).

        `iban_bank` (country, bank code): give the balance an IBAN whose account number is the
        balance id, so IBANs are unique by construction (checked anyway)."""
        with self.transaction():
            user = self.get_user(user_id)
            assert user is not None, f"no user {user_id}"
            balance_id = self._next_id("balances")
            iban = make_iban(iban_bank[0], iban_bank[1], balance_id) if iban_bank else ""
            if iban and self._conn.execute("SELECT 1 FROM balances WHERE iban = ?", (iban,)).fetchone():
                raise StoreConflict("a balance with this IBAN already exists")
            spec = AccountSpec(
                id=self._next_id("ledger_accounts"),
                currency=currency,
                kind=AccountKind.user_balance,
                flags=AccountFlags.debits_must_not_exceed_credits,
                user_data=balance_id,
            )
            self._insert_account(spec, user.partner)
            row = BalanceRow(balance_id, user_id, user.partner, currency, spec.id, "ACTIVE", utc_now_iso(), iban)
            self._conn.execute(
                f"INSERT INTO balances ({_BALANCE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(row),
            )
        return row, spec

    def get_balance(self, balance_id: int) -> BalanceRow | None:
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_BALANCE_COLUMNS} FROM balances WHERE id = ?", (balance_id,)
            ).fetchone()
        return BalanceRow(*found) if found else None

    def balances_of_user(self, user_id: int) -> list[BalanceRow]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_BALANCE_COLUMNS} FROM balances WHERE user_id = ? ORDER BY id", (user_id,)
            ).fetchall()
        return [BalanceRow(*row) for row in rows]

    def set_balance_status(self, balance_id: int, status: str) -> None:
        with self.transaction():
            updated = self._conn.execute(
                "UPDATE balances SET status = ? WHERE id = ?", (status, balance_id)
            ).rowcount
            assert updated == 1, f"no balance {balance_id}"

    # -- balances (REST) ---------------------------------------------------------------------------
    # For authsrv/rest/balances.py. Money moves in the ledger (the caller's job); these methods
    # record what the API decided. Callers append the event inside the same `transaction()`.

    def program_for(self, partner: str, currency: str) -> ProgramRow | None:
        """The partner's first program (by config id) in `currency`: whose fees a new balance pays."""
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_PROGRAM_COLUMNS} FROM programs WHERE partner = ? AND currency = ?"
                " ORDER BY config_id LIMIT 1", (partner, currency),
            ).fetchone()
        return ProgramRow(*found) if found else None

    def iban_program(self, partner: str) -> ProgramRow | None:
        """The partner's first program (by config id) that gives balances an IBAN."""
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_PROGRAM_COLUMNS} FROM programs WHERE partner = ? AND iban_country != ''"
                " ORDER BY config_id LIMIT 1", (partner,),
            ).fetchone()
        return ProgramRow(*found) if found else None

    def auto_balance_currencies(self, partner: str) -> list[str]:
        """Currencies of the partner's programs that open a balance when a user's KYC succeeds."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT currency FROM programs WHERE partner = ? AND auto_balance != 0"
                " ORDER BY currency", (partner,),
            ).fetchall()
        return [row[0] for row in rows]

    def open_cards_count(self, balance_id: int) -> int:
        """Cards of the balance that are not removed (ordered, inactive, active or locked)."""
        with self._lock:
            (count,) = self._conn.execute(
                "SELECT COUNT(*) FROM cards WHERE balance_id = ? AND status != ?",
                (balance_id, int(CardStatus.removed)),
            ).fetchone()
        return int(count)

    def reload_by_key(self, balance_id: int, key: str) -> ReloadRow | None:
        with self._lock:
            found = self._conn.execute(
                "SELECT balance_id, key, transfer_id, amount, state FROM reloads WHERE balance_id = ? AND key = ?",
                (balance_id, key),
            ).fetchone()
        if found is None:
            return None
        return ReloadRow(found[0], found[1], int(found[2]), found[3], found[4])

    def add_reload(self, balance_id: int, key: str, amount: int) -> ReloadRow:
        """Reserve a transfer id for the key (committed before the ledger sees the transfer, so a
        retry after a crash finds the same id); StoreConflict if the key is taken."""
        assert key and 0 < amount <= AMOUNT_MAX
        with self.transaction():
            (transfer_id,) = self.allocate_transfer_ids(1)
            row = ReloadRow(balance_id, key, transfer_id, amount, RELOAD_PENDING)
            try:
                self._conn.execute(
                    "INSERT INTO reloads (balance_id, key, transfer_id, amount, state, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (balance_id, key, str(transfer_id), amount, RELOAD_PENDING, utc_now_iso()),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict("this idempotency key was used") from None
        return row

    def finish_reload(self, balance_id: int, key: str) -> None:
        with self.transaction():
            self._conn.execute(
                "UPDATE reloads SET state = ? WHERE balance_id = ? AND key = ?", (RELOAD_DONE, balance_id, key)
            )

    def drop_reload(self, balance_id: int, key: str) -> None:
        """The ledger refused the transfer: free the key, so a retry (say after a top-up) gets a new id."""
        with self.transaction():
            self._conn.execute("DELETE FROM reloads WHERE balance_id = ? AND key = ? AND state = ?",
                               (balance_id, key, RELOAD_PENDING))

    def create_partner_balance(self, partner: str, balance_type: PartnerBalanceType, currency: str,
                               low_threshold: int) -> list[AccountSpec]:
        """A partner deposit or credit balance (never below zero) with the partner's usage and fee
        accounts and the currency's system accounts; StoreConflict if it exists."""
        assert 0 <= low_threshold <= AMOUNT_MAX
        kind = PARTNER_BALANCE_KINDS[balance_type]
        with self.transaction():
            assert self.get_partner(partner) is not None, f"no partner {partner!r}"
            if self.get_partner_balance(partner, balance_type, currency) is not None:
                raise StoreConflict(f"partner {partner!r} has a {balance_type} balance in {currency}")
            specs = self.ensure_system_accounts(currency)
            account = self._ensure_account(kind, currency, partner, AccountFlags.debits_must_not_exceed_credits)
            self._conn.execute(
                "INSERT INTO partner_balances (partner, type, currency, ledger_account_id, low_threshold)"
                " VALUES (?, ?, ?, ?, ?)", (partner, str(balance_type), currency, account.id, low_threshold),
            )
            specs.append(account)
            specs.append(self._ensure_account(AccountKind.collateral_usage, currency, partner))
            specs.append(self._ensure_account(AccountKind.fee_income, currency, partner))
            self._on_commit(("partner", partner))
        return specs

    def get_partner_balance(self, partner: str, balance_type: PartnerBalanceType,
                            currency: str) -> PartnerBalanceRow | None:
        with self._lock:
            found = self._conn.execute(
                "SELECT partner, type, currency, ledger_account_id, low_threshold FROM partner_balances"
                " WHERE partner = ? AND type = ? AND currency = ?", (partner, str(balance_type), currency),
            ).fetchone()
        return PartnerBalanceRow(found[0], PartnerBalanceType(found[1]), *found[2:]) if found else None

    def partner_balance_low_flags(self) -> list[tuple[PartnerBalanceRow, bool]]:
        """Every partner balance with a threshold, and whether its low-balance event is out."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT partner, type, currency, ledger_account_id, low_threshold, low_notified"
                " FROM partner_balances WHERE low_threshold > 0 OR low_notified != 0"
                " ORDER BY partner, type, currency LIMIT ?", (PARTNER_BALANCES_MAX,),
            ).fetchall()
        return [(PartnerBalanceRow(p, PartnerBalanceType(t), c, a, low), bool(notified))
                for p, t, c, a, low, notified in rows]  # fmt: skip

    def set_partner_balance_low(self, ledger_account_id: int, low: bool) -> bool:
        """Flip `low_notified`; True only for the call that changed it (one event per crossing)."""
        with self.transaction():
            updated = self._conn.execute(
                "UPDATE partner_balances SET low_notified = ? WHERE ledger_account_id = ? AND low_notified = ?",
                (int(low), ledger_account_id, int(not low)),
            ).rowcount
        assert updated in (0, 1)
        return updated == 1

    # -- cards -------------------------------------------------------------------------------------

    def add_card(self, card: NewCard) -> CardRow:
        """Insert a card (its PAN index must be new) and put it in the attached index."""
        with self.transaction():
            balance = self.get_balance(card.balance_id)
            assert balance is not None and balance.user_id == card.user_id
            row = CardRow(
                self._next_id("cards"), card.user_id, card.balance_id, balance.partner,
                card.config_id, card.card_type, card.pan_index, card.pan_enc, card.pan_first6,
                card.pan_last4, card.expiry_yymm, card.status, 0, 0, card.pvv, utc_now_iso(),
                order_state=card.order_state, order_json=card.order_json,
            )  # fmt: skip
            try:
                self._conn.execute(
                    f"INSERT INTO cards ({_CARD_COLUMNS}) VALUES ({', '.join('?' * _CARD_COLUMN_COUNT)})",
                    _card_tuple(row),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict("a card with this PAN already exists") from None
            self._refresh_card_on_commit(row.id)
        return row

    def get_card(self, card_id: int) -> CardRow | None:
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_CARD_COLUMNS} FROM cards WHERE id = ?", (card_id,)
            ).fetchone()
        return _card_row(found) if found else None

    def card_by_pan_index(self, pan_index: bytes) -> CardRow | None:
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_CARD_COLUMNS} FROM cards WHERE pan_index = ?", (pan_index,)
            ).fetchone()
        return _card_row(found) if found else None

    def cards_of_balance(self, balance_id: int) -> list[CardRow]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_CARD_COLUMNS} FROM cards WHERE balance_id = ? ORDER BY id", (balance_id,)
            ).fetchall()
        return [_card_row(row) for row in rows]

    def cards_of_user(self, user_id: int) -> list[CardRow]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_CARD_COLUMNS} FROM cards WHERE user_id = ? ORDER BY id", (user_id,)
            ).fetchall()
        return [_card_row(row) for row in rows]

    def pan_indexes(self) -> set[bytes]:
        """Every PAN index in use (bulk issuing checks new PANs against it)."""
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT pan_index FROM cards")}

    def set_card_status(self, card_id: int, status: CardStatus, lock_reason: int = 0) -> None:
        """Set status and lock reason (the caller enforces the lifecycle rules)."""
        assert (status == CardStatus.locked) == (lock_reason != 0)
        assert 0 <= lock_reason <= max(LockReason)
        self._update_card(card_id, "status = ?, lock_reason = ?", (int(status), lock_reason))

    def lock_card(self, card_id: int, reason: int) -> None:
        """Lock with `reason` (1..8). Re-locking keeps an irreversible reason already in place."""
        assert 1 <= reason <= max(LockReason)
        with self.transaction():
            card = self.get_card(card_id)
            assert card is not None, f"no card {card_id}"
            keep = card.status == CardStatus.locked and card.lock_reason in IRREVERSIBLE_LOCK_REASONS
            if not keep:
                self.set_card_status(card_id, CardStatus.locked, reason)

    def set_pvv(self, card_id: int, pvv: str) -> None:
        assert pvv == "" or (len(pvv) == 4 and pvv.isdigit())
        self._update_card(card_id, "pvv = ?, wrong_pin_count = 0", (pvv,))

    def record_wrong_pin(self, card_id: int) -> int:
        """Count one more wrong PIN in a row and return the new count. The caller decides what
        the count means (the third in a row locks with reason 6: `lock_card`)."""
        with self.transaction():
            found = self._conn.execute(
                "UPDATE cards SET wrong_pin_count = wrong_pin_count + 1 WHERE id = ?"
                " RETURNING wrong_pin_count",
                (card_id,),
            ).fetchone()
            assert found is not None, f"no card {card_id}"
            (count,) = found
            self._refresh_card_on_commit(card_id)
        assert count >= 1
        return int(count)

    def save_pin_state(self, card_id: int, wrong_pin_count: int, status: CardStatus, lock_reason: int) -> None:
        """Write what the authorization hot path already changed in the index (the wrong-PIN
        counter, the reason-6 lock). No index refresh: the in-memory state is newer than this
        write may be by the time it commits."""
        assert wrong_pin_count >= 0 and (status == CardStatus.locked) == (lock_reason != 0)
        with self.transaction():
            updated = self._conn.execute(
                "UPDATE cards SET wrong_pin_count = ?, status = ?, lock_reason = ? WHERE id = ?",
                (wrong_pin_count, int(status), lock_reason, card_id),
            ).rowcount
            assert updated == 1, f"no card {card_id}"
            if self._log is not None:
                self._replica_ops.append(("card", card_id))  # a standby's index follows

    def reset_wrong_pin(self, card_id: int) -> None:
        """A correct PIN ends the run of wrong ones."""
        self._update_card(card_id, "wrong_pin_count = 0", ())

    def _update_card(self, card_id: int, assignments: str, values: tuple[Any, ...]) -> None:
        with self.transaction():
            updated = self._conn.execute(
                f"UPDATE cards SET {assignments} WHERE id = ?", (*values, card_id)
            ).rowcount
            assert updated == 1, f"no card {card_id}"
            self._refresh_card_on_commit(card_id)

    # -- cards (REST) ------------------------------------------------------------------------------
    # Card lifecycle changes of the management API. Each refreshes the in-memory index on commit,
    # so the switch sees it on the next message; the caller records the event in the same
    # transaction (`with store.transaction(): store.<change>(...); store.append_event(...)`).

    def visible_cards_of_user(self, user_id: int) -> list[CardRow]:
        """The user's cards as the user may see them: not removed, and a physical card only once
        the bureau produced it and it was linked (reference documents, "Link card")."""
        return [card for card in self.cards_of_user(user_id) if card_visible(card)]

    def set_card_order(self, card_id: int, *, order_state: str, order_json: str, card_type: str = "") -> None:
        """Order state and details; `card_type` also changes a virtual card into a digital-first one."""
        assert order_state in CARD_ORDER_STATES, order_state
        assert card_type in ("", "digital_first")
        json.loads(order_json)  # must be JSON: the bureau worker reads it back
        if card_type:
            self._update_card(card_id, "order_state = ?, order_json = ?, card_type = ?",
                              (order_state, order_json, card_type))
        else:
            self._update_card(card_id, "order_state = ?, order_json = ?", (order_state, order_json))

    def bump_cvv_version(self, card_id: int) -> int:
        """Reset CVV: the next CVV version (1..CVV_VERSION_MAX), 0 when none is left."""
        with self.transaction():
            card = self.get_card(card_id)
            assert card is not None, f"no card {card_id}"
            if card.cvv_version >= CVV_VERSION_MAX:
                return 0
            self._update_card(card_id, "cvv_version = ?", (card.cvv_version + 1,))
        return card.cvv_version + 1

    def cards_to_order(self, limit: int) -> list[CardRow]:
        """Ordered cards not yet sent to the bureau, oldest first."""
        assert 0 < limit <= CARD_ORDERS_PAGE_MAX
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_CARD_COLUMNS} FROM cards WHERE order_state = ? AND status != ?"
                " AND json_extract(order_json, '$.bureauOrderId') IS NULL ORDER BY id LIMIT ?",
                (CARD_ORDER_ORDERED, int(CardStatus.removed), limit),
            ).fetchall()
        return [_card_row(row) for row in rows]

    # -- KYC forms ---------------------------------------------------------------------------------
    # Rows only; the images are files (authsrv.store.kycfiles). Callers decide inside one
    # `transaction()`: check the user's forms, insert or decide, update users.kyc, append the event.

    def reserve_kyc_form_id(self) -> int:
        """A fresh form id, committed before the form's image files are written, so a crash in
        between can never hand the same id (and directory) to another form."""
        with self.transaction():
            self._conn.execute(
                "INSERT OR IGNORE INTO sequences (name, value)"
                " VALUES (?, (SELECT COALESCE(MAX(id), 0) FROM kyc_forms))", (KYC_FORM_SEQUENCE,),
            )
            (value,) = self._conn.execute(
                "UPDATE sequences SET value = value + 1 WHERE name = ? RETURNING value", (KYC_FORM_SEQUENCE,),
            ).fetchone()
        assert 0 < value <= ID_MAX
        return int(value)

    def insert_kyc_form(self, form_id: int, *, user_id: int, partner: str, fields_json: str,
                        images_json: str) -> KycFormRow:
        """A PENDING form with a reserved id (the caller checked there is no open one)."""
        with self.transaction():
            row = KycFormRow(form_id, user_id, partner, KYC_FORM_PENDING, fields_json, images_json, utc_now_iso())
            self._conn.execute(
                f"INSERT INTO kyc_forms ({_KYC_FORM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(row),
            )
            if self._log is not None and self.data_dir is not None:  # the images travel with the row
                for path in sorted((self.data_dir / "kyc" / str(form_id)).glob("*")):
                    self.add_file(str(path.relative_to(self.data_dir)), path.read_bytes())
        return row

    def get_kyc_form(self, form_id: int) -> KycFormRow | None:
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_KYC_FORM_COLUMNS} FROM kyc_forms WHERE id = ?", (form_id,)
            ).fetchone()
        return KycFormRow(*found) if found else None

    def latest_kyc_form(self, user_id: int) -> KycFormRow | None:
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_KYC_FORM_COLUMNS} FROM kyc_forms WHERE user_id = ? ORDER BY id DESC LIMIT 1",
                (user_id,),
            ).fetchone()
        return KycFormRow(*found) if found else None

    def kyc_forms(self, *, state: str | None = None, after_id: int = 0, limit: int = 50) -> list[KycFormRow]:
        """A page of forms by id (optionally in one state), for the admin review list."""
        assert 0 < limit <= KYC_FORMS_PAGE_MAX and after_id >= 0
        query = f"SELECT {_KYC_FORM_COLUMNS} FROM kyc_forms WHERE id > ?"
        values: list[Any] = [after_id]
        if state is not None:
            query += " AND state = ?"
            values.append(state)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id LIMIT ?", (*values, limit)).fetchall()
        return [KycFormRow(*row) for row in rows]

    def kyc_form_ids(self) -> set[int]:
        with self._lock:
            return {row[0] for row in self._conn.execute("SELECT id FROM kyc_forms")}

    def decide_kyc_form(self, form_id: int, *, state: str, decided_by: str, reason: str = "") -> bool:
        """PENDING -> `state`; False (nothing changed) when the form is not pending any more."""
        assert state in (KYC_FORM_ACCEPTED, KYC_FORM_REJECTED), state
        with self.transaction():
            updated = self._conn.execute(
                "UPDATE kyc_forms SET state = ?, decided_at = ?, decided_by = ?, reason = ?"
                " WHERE id = ? AND state = ?",
                (state, utc_now_iso(), decided_by, reason, form_id, KYC_FORM_PENDING),
            ).rowcount
        assert updated in (0, 1)
        return updated == 1

    # -- spend controls ----------------------------------------------------------------------------
    # Per card and per user (authsrv/hotpath/limits.py). The spec is stored as its JSON; the index
    # holds it compiled, replaced on commit so the very next authorization sees a change.

    def get_spend_controls(self, scope: str, owner_id: int) -> str | None:
        """The stored ControlsSpec JSON, None when never set."""
        assert scope in SPEND_CONTROL_SCOPES
        with self._lock:
            row = self._conn.execute("SELECT controls_json FROM spend_controls WHERE scope = ? AND owner_id = ?",
                                     (scope, owner_id)).fetchone()
        return None if row is None else row[0]

    def set_spend_controls(self, scope: str, owner_id: int, controls_json: str, controls: Any, *,
                           partner: str, event_kind: str, subject: str, event_body: Mapping[str, Any]) -> None:
        """Replace the controls (`controls`: the compiled value for the index) and record the event."""
        assert scope in SPEND_CONTROL_SCOPES and owner_id > 0
        with self.transaction():
            self._conn.execute(
                "INSERT INTO spend_controls (scope, owner_id, controls_json, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (scope, owner_id) DO UPDATE SET controls_json = excluded.controls_json,"
                " updated_at = excluded.updated_at", (scope, owner_id, controls_json, utc_now_iso()))
            self.append_event(partner, event_kind, subject, event_body)
            self._on_commit(("controls", scope, owner_id))

    def spend_controls_all(self) -> list[tuple[str, int, Any]]:
        """(scope, owner id, compiled Controls) of every stored spec: the index at startup."""
        from authsrv.hotpath.limits import Controls, decode_spec

        with self._lock:
            rows = self._conn.execute("SELECT scope, owner_id, controls_json FROM spend_controls").fetchall()
        return [(scope, owner_id, Controls.from_spec(decode_spec(text))) for scope, owner_id, text in rows]

    # -- the in-memory index -----------------------------------------------------------------------

    def attach_index(self, index: CardIndex) -> None:
        """From now on every committed change to cards and partners also updates `index`."""
        with self._lock:
            self._index = index

    def card_states(self) -> list[tuple[bytes, CardState]]:
        """(pan_index, CardState) for every card, joined with its balance: one query."""
        with self._lock:
            rows = self._conn.execute(_CARD_STATE_QUERY).fetchall()
        return [(row[0], _card_state(row)) for row in rows]

    def partner_states(self) -> list[PartnerState]:
        with self._lock:
            return [self._partner_state(row.name) for row in self.list_partners()]

    def system_accounts(self, kind_name: str) -> dict[str, int]:
        """currency -> account id of the system accounts of kind `settlement` or `funding`."""
        kind = AccountKind[kind_name]
        assert kind in (AccountKind.settlement, AccountKind.funding)
        with self._lock:
            rows = self._conn.execute(
                "SELECT currency, id FROM ledger_accounts WHERE kind = ? AND owner = ?",
                (int(kind), SYSTEM_OWNER),
            ).fetchall()
        return dict(rows)

    def _partner_state(self, name: str) -> PartnerState:
        row = self.get_partner(name)
        assert row is not None
        accounts = self._conn.execute(
            "SELECT kind, currency, id FROM ledger_accounts WHERE owner = ? AND kind IN (?, ?, ?, ?)",
            (name, AccountKind.partner_deposit, AccountKind.partner_credit,
             AccountKind.collateral_usage, AccountKind.fee_income),
        ).fetchall()  # fmt: skip
        by_kind: dict[int, dict[str, int]] = {}
        for kind, currency, account_id in accounts:
            by_kind.setdefault(kind, {})[currency] = account_id
        collateral_kind = COLLATERAL_KINDS[row.collateral][0] if row.collateral in COLLATERAL_KINDS else None
        return PartnerState(
            name=row.name,
            balance_mode=row.balance_mode,
            collateral=row.collateral,
            collateral_account_ids=dict(by_kind.get(collateral_kind, {})) if collateral_kind else {},
            collateral_usage_account_ids=by_kind.get(AccountKind.collateral_usage, {}),
            fee_income_account_ids=by_kind.get(AccountKind.fee_income, {}),
        )

    def _refresh_card_on_commit(self, card_id: int) -> None:
        self._on_commit(("card", card_id))

    def _refresh_card(self, card_id: int) -> None:
        index = self._index
        assert index is not None
        found = self._conn.execute(_CARD_STATE_QUERY + " WHERE c.id = ?", (card_id,)).fetchone()
        assert found is not None
        existing = index.card_by_id(card_id)
        fresh = _card_state(found)
        if existing is None:
            index.put_card(fresh, found[0])
            return
        # In place: the hot path may hold a reference to this very object.
        for field in attrs.fields(CardState):
            setattr(existing, field.name, getattr(fresh, field.name))


SPEND_CONTROL_SCOPES = ("card", "user")
CARD_ORDER_ORDERED = "ORDERED"  # at the bureau (or waiting for one): invisible to the user if physical
CARD_ORDER_LINKED = "LINKED"  # produced and linked to the user and balance
CARD_ORDER_STATES = frozenset({"", CARD_ORDER_ORDERED, CARD_ORDER_LINKED})
CARD_ORDERS_PAGE_MAX = 1_000
CVV_VERSION_MAX = 999  # authsrv.cardsec.CVV_VERSION_MAX


def card_visible(card: CardRow) -> bool:
    """Removed cards are gone; a physical card appears once linked."""
    if card.status == CardStatus.removed:
        return False
    return not (card.card_type == "physical" and card.order_state != CARD_ORDER_LINKED)


@functools.cache
def _dummy_hash() -> str:
    return hash_secret(secrets.token_hex(16))


_USER_COLUMNS = (
    "id, partner, first_name, last_name, phone, email, birth_date, state, kyc, wpin_hash, created_at"
)
_BALANCE_COLUMNS = "id, user_id, partner, currency, ledger_account_id, status, created_at, iban"
_PROGRAM_COLUMNS = (
    "config_id, partner, bin, card_type, currency, expiry_years, fees_json, limits_json,"
    " iban_country, iban_bank_code, auto_balance"
)
_CARD_COLUMNS = (
    "id, user_id, balance_id, partner, config_id, card_type, pan_index, pan_enc, pan_first6,"
    " pan_last4, expiry_yymm, status, lock_reason, wrong_pin_count, pvv, created_at,"
    " order_state, order_json, source_card_id, cvv_version"
)
_CARD_COLUMN_COUNT = len(_CARD_COLUMNS.split(","))
_CARD_STATE_QUERY = (
    "SELECT c.pan_index, c.id, c.user_id, c.balance_id, c.partner, c.config_id, c.card_type,"
    " c.pan_first6, c.pan_last4, c.expiry_yymm, c.status, c.lock_reason, c.wrong_pin_count,"
    " c.pvv, b.currency, b.ledger_account_id, c.cvv_version FROM cards c JOIN balances b ON b.id = c.balance_id"
)


def _card_state(row: tuple[Any, ...]) -> CardState:
    return CardState(
        row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
        CardStatus(row[10]), row[11], row[12], row[13], row[14], row[15], row[16],
    )  # fmt: skip


def _card_row(row: tuple[Any, ...]) -> CardRow:
    values = list(row)
    values[11] = CardStatus(values[11])
    return CardRow(*values)


def _card_tuple(row: CardRow) -> tuple[Any, ...]:
    values = attrs.astuple(row)
    return (*values[:11], int(row.status), *values[12:])


def _account_spec(row: tuple[Any, ...]) -> AccountSpec:
    account_id, currency, kind, flags, user_data = row
    return AccountSpec(
        id=account_id,
        currency=currency,
        kind=AccountKind(kind),
        flags=AccountFlags(flags),
        user_data=user_data,
    )


def _create_schema(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key", not_null={"value"})
    db["sequences"].create({"name": str, "value": int}, pk="name", not_null={"value"})
    db["sequences"].insert({"name": MANAGEMENT_TRANSFER_SEQUENCE, "value": 0})
    db["partners"].create(
        {"name": str, "balance_mode": str, "collateral": str, "created_at": str},
        pk="name",
        not_null={"balance_mode", "collateral", "created_at"},
    )
    db["programs"].create(
        {"config_id": str, "partner": str, "bin": str, "card_type": str, "currency": str,
         "expiry_years": int, "fees_json": str, "limits_json": str},
        pk="config_id",
        not_null={"partner", "bin", "card_type", "currency", "expiry_years", "fees_json", "limits_json"},
        foreign_keys=[("partner", "partners", "name")],
    )  # fmt: skip
    db["users"].create(
        {"id": int, "partner": str, "first_name": str, "last_name": str, "phone": str,
         "email": str, "birth_date": str, "state": str, "kyc": str, "wpin_hash": str,
         "created_at": str},
        pk="id",
        not_null={"partner", "kyc", "state", "wpin_hash", "created_at"},
        foreign_keys=[("partner", "partners", "name")],
    )  # fmt: skip
    db["users"].create_index(["partner", "phone"])
    db["users"].create_index(["partner", "email"])
    db["ledger_accounts"].create(
        {"id": int, "kind": int, "currency": str, "owner": str, "flags": int, "user_data": int},
        pk="id",
        not_null={"kind", "currency", "owner", "flags", "user_data"},
    )
    # One system or partner account per (kind, currency, owner); user balances have many.
    db.execute(
        "CREATE UNIQUE INDEX ledger_accounts_role ON ledger_accounts (kind, currency, owner)"
        f" WHERE kind != {int(AccountKind.user_balance)}"
    )
    db["balances"].create(
        {"id": int, "user_id": int, "partner": str, "currency": str, "ledger_account_id": int,
         "status": str, "created_at": str},
        pk="id",
        not_null={"user_id", "partner", "currency", "ledger_account_id", "status", "created_at"},
        foreign_keys=[("user_id", "users", "id"), ("ledger_account_id", "ledger_accounts", "id")],
    )  # fmt: skip
    db["balances"].create_index(["ledger_account_id"], unique=True)
    db["balances"].create_index(["user_id"])
    db["partner_balances"].create(
        {"partner": str, "type": str, "currency": str, "ledger_account_id": int, "low_threshold": int},
        pk=("partner", "type", "currency"),
        not_null={"ledger_account_id", "low_threshold"},
        foreign_keys=[("partner", "partners", "name"), ("ledger_account_id", "ledger_accounts", "id")],
    )
    db["cards"].create(
        {"id": int, "user_id": int, "balance_id": int, "partner": str, "config_id": str,
         "card_type": str, "pan_index": bytes, "pan_enc": bytes, "pan_first6": str,
         "pan_last4": str, "expiry_yymm": str, "status": int, "lock_reason": int,
         "wrong_pin_count": int, "pvv": str, "created_at": str},
        pk="id",
        not_null={"user_id", "balance_id", "partner", "config_id", "card_type", "pan_index",
                  "pan_enc", "pan_first6", "pan_last4", "expiry_yymm", "status", "lock_reason",
                  "wrong_pin_count", "pvv", "created_at"},
        foreign_keys=[("user_id", "users", "id"), ("balance_id", "balances", "id"),
                      ("config_id", "programs", "config_id")],
    )  # fmt: skip
    db["cards"].create_index(["pan_index"], unique=True)
    db["cards"].create_index(["balance_id"])
    db["cards"].create_index(["user_id"])
    db["admins"].create(
        {"username": str, "role": str, "password_hash": str},
        pk="username",
        not_null={"role", "password_hash"},
    )
