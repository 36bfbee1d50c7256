"""`DIR/authsrv.toml`: every setting of a data directory, as strict msgspec Structs.

The file is decoded once at startup with `forbid_unknown_fields`, so a misspelt key is an error that
names it rather than a setting silently left at its default. `render_default_config` writes the
file `authsrv init` creates: hand-written text, because TOML writers drop comments, and a test
checks that it decodes to exactly the defaults below and mentions every field.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

CONFIG_FILE_NAME = "authsrv.toml"
PORT_MAX = 65535
PARTNER_NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
MCC_MAX = 9999
HOLD_EXPIRY_DAYS_MAX = 366  # card-network rules never keep an authorization open longer
CONFIG_SIZE_MAX_BYTES = 1_048_576  # a config file larger than this is a mistake, not a config

# Port 0 means "any free port" (tests and benchmarks start servers on ephemeral ports).
Port = Annotated[int, Meta(ge=0, le=PORT_MAX)]
Positive = Annotated[int, Meta(ge=1)]
PartnerName = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,32}$")]


class ConfigError(Exception):
    """authsrv.toml is missing, malformed or names an unknown or invalid setting."""


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    iso_port: Port = 8583
    rest_port: Port = 8443
    metrics_port: Port = 9108


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
    segment_size_max_bytes: Annotated[int, Meta(ge=4096)] = 67_108_864


class MccRule(_Section):
    mcc_from: Annotated[int, Meta(ge=0, le=MCC_MAX)]
    mcc_to: Annotated[int, Meta(ge=0, le=MCC_MAX)]
    days: Annotated[int, Meta(ge=1, le=HOLD_EXPIRY_DAYS_MAX)]

    def __post_init__(self) -> None:
        if self.mcc_from > self.mcc_to:
            raise ValueError(f"mcc_from {self.mcc_from} is above mcc_to {self.mcc_to}")


# CONTRACT section 4: holds expire after 7 days, 30 for travel and lodging (airlines 3000-3999,
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
    # CONTRACT section 2: duplicates answered identically for at least 24 hours.
    retention_hours: Annotated[int, Meta(ge=24, le=24 * 366)] = 24


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


BalanceMode = Literal["internal", "external"]
Collateral = Literal["credit", "deposit", "none"]
NotifyKind = Literal["transaction", "verification", "otp"]
# Only "decline" exists today; later issues add policies, so this stays a string type.
StandIn = Literal["decline"]


class PartnerConfig(_Section):
    balance_mode: BalanceMode = "internal"
    # A BIN sponsor does not carry a partner's users unsecured: collateral is on unless turned off.
    collateral: Collateral = "deposit"
    api_url: str = ""
    notify: tuple[NotifyKind, ...] = ()
    stand_in: StandIn = "decline"

    def __post_init__(self) -> None:
        problem = api_url_problem(self.api_url)
        if problem:
            raise ValueError(problem)
        if len(set(self.notify)) != len(self.notify):
            raise ValueError("notify lists a kind twice")


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    iso: IsoConfig = msgspec.field(default_factory=IsoConfig)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    holds: HoldsConfig = msgspec.field(default_factory=HoldsConfig)
    duplicates: DuplicatesConfig = msgspec.field(default_factory=DuplicatesConfig)
    sessions: SessionsConfig = msgspec.field(default_factory=SessionsConfig)
    bureau: BureauConfig = msgspec.field(default_factory=BureauConfig)
    partners: dict[PartnerName, PartnerConfig] = msgspec.field(default_factory=dict)


def api_url_problem(url: str) -> str:
    """Why `url` is not acceptable as a partner API base URL, or "" when it is.

    CONTRACT section 1: `http://` only on loopback; anything leaving the machine uses https.
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
# Start a new write-ahead log segment when the current one reaches this size.
segment_size_max_bytes = 67108864

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
# Notifications to send: any of "transaction", "verification", "otp".
notify = [{notify}]
# What to answer when the partner's external balance does not reply in time: "decline" (91).
stand_in = "{partner.stand_in}"
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
