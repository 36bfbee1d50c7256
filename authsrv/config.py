"""`DIR/authsrv.toml`: every setting of a data directory, as strict msgspec Structs.

The file is decoded once at startup with `forbid_unknown_fields`, so a misspelt key is an error that
names it rather than a setting silently left at its default. `render_default_config` writes the
file `authsrv init` creates: hand-written text, because TOML writers drop comments, and a test
checks that it decodes to exactly the defaults below and mentions every field.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from authsrv.hotpath.activity import ACTIVITIES_MAX
from authsrv.hotpath.journal import CLOSED_MAX, RECORDS_MAX
from ledger.state import HISTORY_PER_ACCOUNT_MAX, HOLDS_PENDING_MAX, IDS_MAX

CONFIG_FILE_NAME = "authsrv.toml"
PORT_MAX = 65535
PARTNER_NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
MCC_MAX = 9999
HOLD_EXPIRY_DAYS_MAX = 366  # card-network rules never keep an authorization open longer
CONFIG_SIZE_MAX_BYTES = 1_048_576  # a config file larger than this is a mistake, not a config
# Duplicate records kept at least: below this the journal would forget a retry within seconds.
RECORDS_MAX_MIN = 1_000
# Closed authorizations kept to call a late clearing "late": below this a clearing a few minutes
# behind its final post would already read as unmatched.
CLOSED_MAX_MIN = 1_000
# Ledger events kept per account: the newest hold and the event that resolved it. Statement depth,
# the fee run's month spend (docs/money.md "Fees") and the history API's status of a hold the
# ledger forgot all read this history, so a bound this low is for tests and the soak, not production.
HISTORY_PER_ACCOUNT_MAX_MIN = 2
# At most: ~0.3-0.6 GB per account at this bound; readers page it with int limits below it.
HISTORY_PER_ACCOUNT_MAX_MAX = 1_000_000
# Pending holds at least: a ledger that refuses holds below this is misconfigured, not protected.
HOLDS_PENDING_MAX_MIN = 1_000
# Card activity rows kept in total at least (one card's ACTIVITY_PER_CARD_MAX is 100).
ACTIVITIES_MAX_MIN = 1_000

# Port 0 means "any free port" (tests and benchmarks start servers on ephemeral ports).
Port = Annotated[int, Meta(ge=0, le=PORT_MAX)]
Positive = Annotated[int, Meta(ge=1)]
PartnerName = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,32}$")]
PATH_CHARS_MAX = 4096  # a file path setting (Linux PATH_MAX)


class ConfigError(Exception):
    """authsrv.toml is missing, malformed or names an unknown or invalid setting."""


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    iso_port: Port = 8583
    rest_port: Port = 8443
    metrics_port: Port = 9108
    # How long a thread may hold the GIL while another waits for it (sys.setswitchinterval).
    gil_switch_interval_ms: Annotated[float, Meta(ge=0.1, le=100)] = 1.0
    # Log and count event-loop steps and collections held this long or longer (authsrv/loopwatch.py); 0: off.
    slow_step_ms: Annotated[float, Meta(ge=0, le=60_000)] = 0.0


class IsoConfig(_Section):
    budget_ms: Annotated[int, Meta(ge=1, le=60_000)] = 250
    in_flight_per_connection_max: Annotated[int, Meta(ge=1, le=65_536)] = 256
    connections_max: Annotated[int, Meta(ge=1, le=100_000)] = 1024
    idle_timeout_s: Positive = 300
    # The 2-byte length prefix cannot describe more than 65535 bytes.
    frame_size_max: Annotated[int, Meta(ge=64, le=65_535)] = 8192
    shutdown_grace_s: Annotated[int, Meta(ge=0, le=3600)] = 5


class LedgerConfig(_Section):
    snapshot_interval_records: Positive = 500_000
    # The compactor stays and reads the log as it is written (ledger.compact, follow mode): a
    # snapshot then reads nothing cold from the disk; it holds a copy of the state meanwhile.
    compactor_follows: bool = True
    segment_size_max_bytes: Annotated[int, Meta(ge=4096)] = 67_108_864
    # Transfer ids remembered for idempotency (24 h); past it the oldest go early, counted.
    ids_max: Positive = IDS_MAX
    # Holds pending at once (awaiting clearing or expiry); past it a new hold fails (declined).
    # Above HOLDS_PENDING_MAX the open-authorization index's own bound would be passed.
    holds_pending_max: Annotated[int, Meta(ge=HOLDS_PENDING_MAX_MIN, le=HOLDS_PENDING_MAX)] = HOLDS_PENDING_MAX
    # Ledger events kept per account (statement depth); lists grow to twice this before trimming.
    history_per_account_max: Annotated[int, Meta(ge=HISTORY_PER_ACCOUNT_MAX_MIN, le=HISTORY_PER_ACCOUNT_MAX_MAX)] = (
        HISTORY_PER_ACCOUNT_MAX)

    def __post_init__(self) -> None:
        # Pending hold ids are never evicted, so the bound must leave room for every one of them.
        if self.ids_max <= self.holds_pending_max:
            raise ValueError(f"ids_max {self.ids_max} must be above the ledger's pending-hold bound "
                             f"{self.holds_pending_max} (pending hold ids are never evicted)")


class MccRule(_Section):
    mcc_from: Annotated[int, Meta(ge=0, le=MCC_MAX)]
    mcc_to: Annotated[int, Meta(ge=0, le=MCC_MAX)]
    days: Annotated[int, Meta(ge=1, le=HOLD_EXPIRY_DAYS_MAX)]

    def __post_init__(self) -> None:
        if self.mcc_from > self.mcc_to:
            raise ValueError(f"mcc_from {self.mcc_from} is above mcc_to {self.mcc_to}")


# docs/contract.md, clearing file: holds expire after 7 days, 30 for travel and lodging (airlines 3000-3999,
# cruise lines 4411, hotels 7011, car rental 7512), where the final amount is known late.
MCC_RULES_DEFAULT: tuple[MccRule, ...] = (
    MccRule(mcc_from=3000, mcc_to=3999, days=30),
    MccRule(mcc_from=4411, mcc_to=4411, days=30),
    MccRule(mcc_from=7011, mcc_to=7011, days=30),
    MccRule(mcc_from=7512, mcc_to=7512, days=30),
)


class HoldsConfig(_Section):
    expiry_days_default: Annotated[int, Meta(ge=1, le=HOLD_EXPIRY_DAYS_MAX)] = 7
    mcc_rules: tuple[MccRule, ...] = MCC_RULES_DEFAULT

    @property
    def expiry(self) -> tuple[MccRule, ...]:
        """Alias of `mcc_rules` (the name authsrv/app.py reads)."""
        return self.mcc_rules

    def expiry_days(self, mcc: int) -> int:
        """Days a hold for this merchant category stays open; the first matching rule wins."""
        for rule in self.mcc_rules:
            if rule.mcc_from <= mcc <= rule.mcc_to:
                return rule.days
        return self.expiry_days_default


class DuplicatesConfig(_Section):
    # docs/contract.md, durability: duplicates answered identically for at least 24 hours.
    retention_hours: Annotated[int, Meta(ge=24, le=24 * 366)] = 24
    # Authorization records kept for duplicates at most; past it the oldest go early, counted.
    records_max: Annotated[int, Meta(ge=RECORDS_MAX_MIN)] = RECORDS_MAX
    # Approvals kept after their hold closed, to report a late clearing as late; oldest go first.
    closed_max: Annotated[int, Meta(ge=CLOSED_MAX_MIN)] = CLOSED_MAX


class HistoryConfig(_Section):
    # Card activity rows (authorizations and declines with merchant, for the transaction history
    # API) kept in total; past it the card charged longest ago loses its oldest row.
    activities_max: Annotated[int, Meta(ge=ACTIVITIES_MAX_MIN)] = ACTIVITIES_MAX


class SessionsConfig(_Section):
    customer_token_ttl_s: Annotated[int, Meta(ge=1, le=86_400)] = 600
    admin_token_ttl_s: Annotated[int, Meta(ge=1, le=86_400)] = 600
    wpin_failures_max: Annotated[int, Meta(ge=1, le=100)] = 5
    wpin_lock_s: Annotated[int, Meta(ge=1, le=86_400 * 30)] = 900


class BureauConfig(_Section):
    # Base URL of the card personalisation bureau (simulators/bureau); "" = physical orders wait.
    url: str = ""
    poll_interval_s: Annotated[float, Meta(ge=0.05, le=3600)] = 5.0

    def __post_init__(self) -> None:
        problem = api_url_problem(self.url)
        if problem:
            raise ValueError(problem.replace("api_url", "bureau url"))


# Fees (issue 6): amounts in minor units of the balance's currency; rates in basis points
# (1 bp = 0.01 %). A card program's `fees_json` overrides any of these per `configId`.
FEE_AMOUNT_MAX = 100_000_000  # a fee above a million in major units is a typo
FEE_BP_MAX = 10_000  # 100 %
FeeAmount = Annotated[int, Meta(ge=0, le=FEE_AMOUNT_MAX)]
FeeBp = Annotated[int, Meta(ge=0, le=FEE_BP_MAX)]


class FeesConfig(_Section):
    account_creation: FeeAmount = 0
    card_creation: FeeAmount = 0
    monthly_per_card: FeeAmount = 0
    monthly_per_account: FeeAmount = 0
    pos_fixed: FeeAmount = 0
    pos_bp: FeeBp = 0
    ecommerce_fixed: FeeAmount = 0
    ecommerce_bp: FeeBp = 0
    atm_fixed: FeeAmount = 0
    atm_bp: FeeBp = 0
    fx_bp: FeeBp = 0
    # Reference documents: "if users do 1000 eur transaction monthly we do not charge monthly fee".
    monthly_waiver_spend: Annotated[int, Meta(ge=0)] = 0


class FxConfig(_Section):
    # Relative to the data directory (authsrv/hotpath/fx.py describes the format).
    rates_file: Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._-]+$")] = "fx-rates.json"


class DeliveryConfig(_Section):
    # Calls to partners after a decision (authsrv/notify): tries before a dead letter (the documents: 5).
    tries_max: Annotated[int, Meta(ge=1, le=50)] = 5
    backoff_initial_ms: Annotated[int, Meta(ge=1, le=3_600_000)] = 1000
    backoff_max_s: Annotated[int, Meta(ge=1, le=86_400)] = 300
    timeout_s: Annotated[float, Meta(ge=0.1, le=300)] = 10.0
    in_flight_max: Annotated[int, Meta(ge=1, le=1024)] = 32


class ClearingConfig(_Section):
    # Records per second at most while a clearing file is applied on the running server (0: no cap).
    records_per_second_max: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    # Where a single node plans clearing: "thread" (a worker thread, gated on the idle loop) or
    # "process" (authsrv/clearing/remote.py: off the server's GIL). A cluster primary always uses a thread.
    planner: Literal["thread", "process"] = "thread"


class OtpConfig(_Section):
    # 3DS challenges (POST /secure/3ds/challenges): lifetime and wrong tries before it fails.
    ttl_s: Annotated[int, Meta(ge=1, le=3600)] = 300
    failures_max: Annotated[int, Meta(ge=1, le=10)] = 3


BalanceMode = Literal["internal", "external"]
Collateral = Literal["credit", "deposit", "none"]
# "partner_balance": partner deposit/credit below its threshold (authsrv/notify; not in the documents).
NotifyKind = Literal["transaction", "verification", "otp", "partner_balance"]
# What answers when an external balance does not (docs/contract.md, latency budget: "the stand-in policy decides").
StandIn = Literal["decline", "approve"]
STAND_IN_AMOUNT_MAX = 10**12  # minor units: far above any card transaction, below every ledger bound
StandInAmount = Annotated[int, Meta(ge=0, le=STAND_IN_AMOUNT_MAX)]


class PartnerConfig(_Section):
    balance_mode: BalanceMode = "internal"
    # A BIN sponsor does not carry a partner's users unsecured: collateral is on unless turned off.
    collateral: Collateral = "deposit"
    api_url: str = ""
    notify: tuple[NotifyKind, ...] = ()
    stand_in: StandIn = "decline"
    # With stand_in = "approve": the largest amount approved without the partner (per transaction),
    # and the most approved that way per card and UTC day (minor units of the card's currency).
    stand_in_max_amount: StandInAmount = 0
    stand_in_daily_max: StandInAmount = 0
    # The CA that signs an https api_url's server certificate (PEM; absolute or relative to the data
    # directory; "" = the development CA, pki/ca.crt). Checked at start: authsrv/pki.py.
    ca_file: Annotated[str, Meta(max_length=PATH_CHARS_MAX)] = ""

    def __post_init__(self) -> None:
        problem = api_url_problem(self.api_url)
        if problem:
            raise ValueError(problem)
        if self.stand_in_max_amount > self.stand_in_daily_max and self.stand_in == "approve":
            raise ValueError("stand_in_max_amount is above stand_in_daily_max: no such approval could happen")
        if len(set(self.notify)) != len(self.notify):
            raise ValueError("notify lists a kind twice")


ShardName = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]


class ClusterConfig(_Section):
    # docs/operations.md, "Running a cluster". Without this table: one node, the local log.
    nats: Annotated[tuple[str, ...], Meta(min_length=1, max_length=16)]
    shard: ShardName = "a"
    node: ShardName = "n1"
    replicas: Annotated[int, Meta(ge=1, le=5)] = 3
    lease_s: Annotated[float, Meta(ge=1, le=60)] = 3.0

    def __post_init__(self) -> None:
        for url in self.nats:
            if not url.startswith(("nats://", "tls://")):
                raise ValueError(f"cluster.nats: {url!r} is not a nats:// or tls:// URL")


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    iso: IsoConfig = msgspec.field(default_factory=IsoConfig)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    holds: HoldsConfig = msgspec.field(default_factory=HoldsConfig)
    duplicates: DuplicatesConfig = msgspec.field(default_factory=DuplicatesConfig)
    history: HistoryConfig = msgspec.field(default_factory=HistoryConfig)
    sessions: SessionsConfig = msgspec.field(default_factory=SessionsConfig)
    bureau: BureauConfig = msgspec.field(default_factory=BureauConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    otp: OtpConfig = msgspec.field(default_factory=OtpConfig)
    clearing: ClearingConfig = msgspec.field(default_factory=ClearingConfig)
    fees: FeesConfig = msgspec.field(default_factory=FeesConfig)
    fx: FxConfig = msgspec.field(default_factory=FxConfig)
    partners: dict[PartnerName, PartnerConfig] = msgspec.field(default_factory=dict)
    cluster: ClusterConfig | None = None


def api_url_problem(url: str) -> str:
    """Why `url` is not acceptable as a partner API base URL, or "" when it is.

    docs/contract.md, partner settings: `http://` only on loopback; anything leaving the machine uses https.
    """
    if url == "":
        return ""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"api_url must be an http(s) URL with a host, got {url!r}"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return f"api_url may use http:// only for a loopback host, got {parts.hostname!r}"
    return ""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def valid_partner_name(name: str) -> bool:
    return PARTNER_NAME_PATTERN.fullmatch(name) is not None


def config_path(data_dir: Path) -> Path:
    return Path(data_dir) / CONFIG_FILE_NAME


def load_config(data_dir: Path) -> Config:
    path = config_path(data_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run `authsrv init --data {data_dir}` first)") from None
    return decode_config(raw, source=str(path))


def decode_config(raw: bytes, *, source: str = CONFIG_FILE_NAME) -> Config:
    """Decode config text; errors name the file and the line (syntax) or the key path (values)."""
    if len(raw) > CONFIG_SIZE_MAX_BYTES:
        raise ConfigError(f"{source}: larger than {CONFIG_SIZE_MAX_BYTES} bytes")
    try:
        return msgspec.toml.decode(raw, type=Config)
    except msgspec.ValidationError as error:
        raise ConfigError(f"{source}: {_name_partner(raw, error)}") from None
    except msgspec.DecodeError as error:  # TOML syntax: the message carries line and column
        raise ConfigError(f"{source}: {error}") from None


def _name_partner(raw: bytes, error: msgspec.ValidationError) -> str:
    """Put the partner's name into the error.

    msgspec reports dict entries as `$.partners[...]`, and a check in `__post_init__` without any
    path; decoding each partner table alone finds the one at fault.
    """
    message = str(error)
    if "$.partners[...]" not in message and " - at `" in message:
        return message
    partners = tomllib.loads(raw.decode()).get("partners", {})
    for name, table in partners.items():
        try:
            msgspec.convert(table, PartnerConfig)
        except msgspec.ValidationError as partner_error:
            located = str(partner_error)
            if " - at `$" in located:
                return located.replace(" - at `$", f" - at `$.partners.{name}", 1)
            return f"{located} - at `$.partners.{name}`"
    return message


# The template lists every setting at its default with a comment saying what it does. Keep it in
# step with the Structs above: tests/test_config.py decodes it and compares with Config().
_TEMPLATE = """\
# authsrv configuration. Every setting is listed at its default; edit and restart the server.
# Unknown keys are refused, so a typo is reported instead of being ignored.

[server]
# Address every listener binds to. Keep the loopback address unless a proxy fronts the server.
host = "127.0.0.1"
# ISO 8583 listener (2-byte big-endian length framing).
iso_port = 8583
# REST API over HTTPS (partner client certificates on /secure and /lifecycle).
rest_port = 8443
# Plain HTTP: /metrics (Prometheus), /healthz, /readyz.
metrics_port = 9108
# How long one of the server's threads may keep the GIL while another waits for it (Python's
# default is 5 ms). The log's writer thread needs it back after each write and fdatasync, and every
# approval in its group waits meanwhile: at 1 ms, the group commits over 10 ms in clearing rounds
# fell from 2.2 to 0.5 a second on a 2-core VM (docs/benchmarks.md, section 6).
gil_switch_interval_ms = 1.0
# Log (at most a line a second) and count (authsrv_loop_slow_step_seconds) every step of the event
# loop, and every garbage collection, that holds it this many milliseconds or more: what makes the
# latency's tail. 0 is off; on, each step costs about 2 microseconds more.
slow_step_ms = 0

[iso]
# Deadline per request from receipt; a step that would pass it is cut short and stand-in decides.
budget_ms = 250
# Requests one connection may have outstanding before the server stops reading from it.
in_flight_per_connection_max = 256
# Connections accepted at once; further ones wait in the listen backlog.
connections_max = 1024
# A connection silent for this long is closed.
idle_timeout_s = 300
# Largest message accepted, in bytes, after the length prefix.
frame_size_max = 8192
# On SIGTERM/SIGINT, time given to in-flight requests before connections are closed.
shutdown_grace_s = 5

[ledger]
# Write a snapshot (and drop older log segments) after this many log records.
snapshot_interval_records = 500000
# Keep the process that builds snapshots running, reading the log as it is written, so that a
# snapshot reads nothing back from the disk. It holds a copy of the ledger (about the server's
# memory). false: start one per snapshot, which reads the previous snapshot and the log each time.
compactor_follows = true
# Start a new write-ahead log segment when the current one reaches this size.
segment_size_max_bytes = 67108864
# Transfer ids remembered so a retried transfer is not applied twice (24 h retention); about 0.25 KB
# each plus the transfer, so this bounds memory. Size it to transfers/s x 86400 (about two per cleared
# authorization). Past it the oldest ids are forgotten early (authsrv_ledger_ids_evicted_early_total):
# a retry older than the bound is no longer recognized. Must be above holds_pending_max (pending
# hold ids are never forgotten).
ids_max = 10000000
# Holds pending at once (approvals awaiting clearing or expiry; two per approval), 1000 to 1000000;
# about 0.8 KB each with its share of the approval kept for clearing. Past it a new hold fails and
# the authorization is declined.
holds_pending_max = 1000000
# Ledger events kept per account for statements, the fee run's monthly spend and the history API
# (2 to 1000000). An account holds 1 to 2 times this many, about 0.3 KB each: size it to accounts x
# 2 x this x 0.31 KB (docs/operations.md). Older events stay in the log and the management store.
history_per_account_max = 1000

[holds]
# Days an authorization hold stays open before it is released when no clearing arrives.
expiry_days_default = 7
# Merchant categories whose holds stay open longer (travel and lodging); the first match wins.
mcc_rules = [
    { mcc_from = 3000, mcc_to = 3999, days = 30 },  # airlines
    { mcc_from = 4411, mcc_to = 4411, days = 30 },  # cruise lines
    { mcc_from = 7011, mcc_to = 7011, days = 30 },  # hotels and lodging
    { mcc_from = 7512, mcc_to = 7512, days = 30 },  # car rental
]

[duplicates]
# How long a repeated request gets the original response instead of being processed again.
retention_hours = 24
# Authorization records kept for duplicate answers at most (at least 1000), so this bounds memory
# (bench/soak.py reports the bytes per authorization). Size it to authorizations/s x 3600 x
# retention_hours. Past it the oldest go before retention_hours (authsrv_journal_records_evicted_early_total):
# a duplicate older than the bound is no longer recognized and is processed again.
records_max = 20000000
# Approvals remembered after their hold closed (final clearing, expiry), so a clearing arriving
# later is reported as late rather than unmatched (at least 1000; about 0.8 KB each once the record
# has left the duplicate window). Reporting only: a late clearing is force-posted either way.
closed_max = 200000

[history]
# Card activity rows (authorizations and declines, with merchant and response code) kept in total
# for the transaction history API, at most 100 per card (at least 1000; about 0.6 KB each once the
# record has left the duplicate window). Past it the card charged longest ago loses its oldest row.
activities_max = 1000000

[sessions]
# Lifetime of a customer session token (POST /customers/sessions).
customer_token_ttl_s = 600
# Lifetime of an admin session token (POST /admin/sessions).
admin_token_ttl_s = 600
# Wrong wPINs in a row before customer logins of that user are refused for a while.
wpin_failures_max = 5
# How long (seconds) logins stay refused after wpin_failures_max wrong wPINs.
wpin_lock_s = 900

[bureau]
# Card personalisation bureau for physical cards (simulators/bureau); "" = orders wait for one.
url = ""
# How often produced cards are fetched from the bureau and linked.
poll_interval_s = 5.0

[delivery]
# Tries of each call to a partner (notifications, force-debits, status updates) before it becomes a
# dead letter (GET /admin/outbox/dead). Reversals are never given up: retried until 2xx.
tries_max = 5
# Wait before the second try; doubled each try (with jitter) up to backoff_max_s.
backoff_initial_ms = 1000
# Longest wait between two tries.
backoff_max_s = 300
# Time one try may take (connect, send, answer).
timeout_s = 10.0
# Calls in flight at once, over all partners.
in_flight_max = 32

[clearing]
# Records per second at most while a clearing file is applied through the running server (POST
# /admin/clearing, `authsrv clearing ingest` with the server up); 0 = no cap. Clearing shares the
# server's core with authorizations: a cap spreads a file's work over a longer time, for a shorter
# authorization tail while it applies. Keep it well above the approvals per second to clear, or
# clearing falls behind (docs/operations.md). Offline runs are never capped.
records_per_second_max = 0
# Where clearing is planned on a single node: "thread", a worker thread of the server that works
# while its event loop waits for I/O, or "process", a process of its own (nice +10) that takes none
# of the server's GIL but competes for the machine's cores. On a 2-core VM, "process" did not shorten
# the authorization tail in clearing rounds (docs/benchmarks.md, section 6); try it where cores are
# spare. A cluster primary plans in a thread either way.
planner = "thread"

[otp]
# Lifetime of a 3DS one-time password (the documents: 5 minutes).
ttl_s = 300
# Wrong OTPs before the challenge fails.
failures_max = 3

[fees]
# Default fee schedule of every card program; a program's fees_json overrides any key. Amounts
# are minor units of the balance's currency, rates basis points (100 = 1 %). 0 = no fee.
# Charged once when a balance is opened through the API (owed if the balance cannot pay yet).
account_creation = 0
# Charged once when a card is issued through the API.
card_creation = 0
# Charged by `authsrv fees run` once a month for every card that is not removed.
monthly_per_card = 0
# Charged by `authsrv fees run` once a month for every balance.
monthly_per_account = 0
# Card-present purchase: fixed part.
pos_fixed = 0
# Card-present purchase: percentage part, in basis points of the amount charged.
pos_bp = 0
# E-commerce purchase (POS entry mode 81, 09 or 10): fixed part.
ecommerce_fixed = 0
# E-commerce purchase: percentage part, in basis points.
ecommerce_bp = 0
# Cash withdrawal (processing code 01 or MCC 6011): fixed part.
atm_fixed = 0
# Cash withdrawal: percentage part, in basis points.
atm_bp = 0
# Currency conversion: basis points of the converted amount, when field 49 is not the balance's currency.
fx_bp = 0
# No monthly fees for a balance that spent more than this in the month (minor units); 0 = always charged.
monthly_waiver_spend = 0

# [cluster]
# Replication and failover on a NATS JetStream cluster (docs/operations.md, "Running a cluster").
# Without this table the node runs alone on its local write-ahead log.
# nats = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223", "nats://127.0.0.1:4224"]
# shard = "a"        # the replicated group; the stream and lease names derive from it
# node = "n1"        # this node's name, unique in the shard
# replicas = 3       # the stream's replica count (1 for a one-server NATS)
# lease_s = 3        # leadership lease; a standby takes over at most lease_s + 2 s after a primary dies

[fx]
# Rates table used when an authorization has no billing amount (fields 6/51) and its currency is
# not the balance's; in the data directory, replaced by PUT /admin/fx-rates. No rate: declined 57.
rates_file = "fx-rates.json"
"""


def render_default_config(partners: Mapping[str, PartnerConfig] | None = None) -> str:
    """The text of a fresh authsrv.toml: every setting at its default, plus these partners."""
    tables = [render_partner_table(name, partner) for name, partner in (partners or {}).items()]
    return "\n".join([_TEMPLATE, *tables])


def render_partner_table(name: str, partner: PartnerConfig) -> str:
    assert valid_partner_name(name), "caller validates partner names"
    notify = ", ".join(f'"{kind}"' for kind in partner.notify)
    return f"""\
[partners.{name}]
# "internal": user balances are held here; "external": the partner holds them and answers the
# external-balance API within the ISO budget.
balance_mode = "{partner.balance_mode}"
# Partner collateral charged alongside user balances: "deposit", "credit" or "none".
collateral = "{partner.collateral}"
# Base URL of the partner's API (external balances, notifications); http:// only on loopback.
api_url = "{partner.api_url}"
# Notifications to send: any of "transaction", "verification", "otp", "partner_balance".
notify = [{notify}]
# What to answer when the partner's external balance does not reply in time (or fails):
# "decline" (91), or "approve" within the two limits below (the partner is told later by a force-debit).
stand_in = "{partner.stand_in}"
# Largest amount stand-in approves in one transaction (minor units; 0: none).
stand_in_max_amount = {partner.stand_in_max_amount}
# Most stand-in approves per card and UTC day (minor units; 0: none).
stand_in_daily_max = {partner.stand_in_daily_max}
# CA certificate (PEM) that signs the partner's HTTPS server certificate, for an https api_url:
# absolute or relative to the data directory; "" = this directory's development CA (pki/ca.crt).
ca_file = {json.dumps(partner.ca_file)}
"""


def append_partner_config(data_dir: Path, name: str, partner: PartnerConfig | None = None) -> None:
    """Add a `[partners.NAME]` table to authsrv.toml, keeping the rest of the text as it is."""
    if not valid_partner_name(name):
        raise ConfigError(f"partner name {name!r} must match [a-z0-9_-]{{1,32}}")
    path = config_path(data_dir)
    text = path.read_text()
    config = decode_config(text.encode(), source=str(path))
    if name in config.partners:
        raise ConfigError(f"{path}: partner {name!r} already exists")
    separator = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    new_text = text + separator + render_partner_table(name, partner or PartnerConfig())
    updated = decode_config(new_text.encode(), source=str(path))
    assert name in updated.partners
    _replace_file(path, new_text)


def _replace_file(path: Path, text: str) -> None:
    """Write-then-rename so a crash leaves either the old or the new file, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(text.encode())
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
