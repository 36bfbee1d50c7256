"""The memory soak (issue 7): `authsrv serve` under a steady open-loop load, its RSS sampled throughout.

    python -m bench.soak --rate R --duration S [--users N] [--sample-seconds 10] [--clearing-seconds 60]
        [--journal-records-max N] [--ledger-ids-max N] [--holds-pending-max N] [--history-per-account-max N]
        [--closed-max N] [--activities-max N] [--settle-seconds S] [--out bench/results/soak.json]

Seeds and starts `authsrv serve` as the benchmark harness does (bench/harness.py), offers the
realistic mix for `--warmup-seconds` unrecorded, then for `--duration` seconds at `--rate`, one
uninterrupted open-loop run. Every `--sample-seconds` it reads the server's VmRSS from
/proc/PID/status and, for explaining growth, the ledger and journal gauges from /metrics. At the end
it stops the server with SIGTERM, runs `authsrv ledger verify`, prints the figures and writes them.

What the traffic leaves behind, and how the soak bounds it within minutes:
- Pending holds (ledger hold, open-authorization index): released when clearing posts them. As an
  issuer does, the soak clears during the run: every `--clearing-seconds`, on a fixed cadence, it
  writes the approvals seen since the last round (simulators/network/clearing.py) and uploads them
  to the running server (`POST /admin/clearing`, as `authsrv clearing ingest` does) from a task
  beside the load. A round still running when the next is due is counted as an overrun (the output
  says whether clearing kept up), and the next round starts as soon as it ends.
- Every other structure traffic grows, each bounded by a count in authsrv.toml: the 24-hour
  windows (journal records for duplicate answers, `[duplicates] records_max`; the ledger's
  remembered transfer ids, `[ledger] ids_max`), per-account ledger history (`[ledger]
  history_per_account_max`), approvals remembered after their hold closed (`[duplicates]
  closed_max`), card activity for the history API (`[history] activities_max`). A run of minutes
  cannot reach their production sizes, so the soak writes small bounds into the data directory's
  authsrv.toml (by default what the offered rate fills in about BOUND_FILL_S; see default_bounds),
  reports when each was reached (its /metrics eviction counter or count gauge), the RSS growth per
  authorization before the first bound, and a sizing table: each bound x the bytes one entry
  retains (BYTES_PER_ENTRY, measured in process with tracemalloc; docs/operations.md). The ids
  bound must stay above `[ledger] holds_pending_max` (pending hold ids are never evicted), so with
  clearing on the soak lowers that one too, to what clearing keeps pending with headroom.

The flatness rule (`memory flat: yes/no`): the RSS growth from the first sample of the judged part
to the last must stay within RSS_GROWTH_FRACTION_MAX of that first sample or
RSS_GROWTH_BYTES_FLOOR, whichever is larger. The judged part starts at the first sample after the
warm-up taken once every bound is reached (the /metrics counters and gauges), or `--settle-seconds`
into the recorded run when given; when neither happens it is the whole recorded run, and the output
says which. The floor absorbs what is not a leak: pymalloc arenas and the allocator's free lists
settling, the snapshot writer's buffers, the periodic `gc.freeze()`.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import functools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import threading
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import httpx
import msgspec
import trio
from prometheus_client.parser import text_string_to_metric_families

from authsrv.clearing.cli import ADMIN_USERNAME, IngestError
from authsrv.clearing.records import ClearingFileError
from authsrv.clearing.summary import summary_decoder
from authsrv.config import (
    ACTIVITIES_MAX_MIN,
    CLOSED_MAX_MIN,
    HISTORY_PER_ACCOUNT_MAX_MIN,
    HOLDS_PENDING_MAX_MIN,
    RECORDS_MAX_MIN,
    ConfigError,
    config_path,
    decode_config,
)
from authsrv.panel.dashboard import Histo
from authsrv.pki import client_ssl_context
from bench.external import scrape_metrics
from bench.harness import SEED_AMOUNT_MINOR, Machine, Step, machine_info, step_from_report
from ledger.state import HOLDS_PENDING_MAX
from simulators.network.cards import load_cards
from simulators.network.clearing import Clearable, ClearingLog
from simulators.network.load import LoadConfig, LoadError, run_load
from simulators.network.mix import HOT_CARDS_FRACTION_DEFAULT, HOT_SHARE_DEFAULT, REVERSAL_POOL_MAX, HotCards, MixWeights
from simulators.network.pinblock import load_zpk
from simulators.network.report import LoadReport
from simulators.network.target import (
    ChildProcess,
    Ports,
    TargetError,
    init_and_seed,
    ledger_verify,
    start_authsrv,
)

DURATION_S_MAX = 3_600.0
WARMUP_S_MAX = 600.0
SAMPLE_S_MIN = 0.5
SAMPLE_S_MAX = 600.0
USERS_MAX = 1_000_000
RSS_GROWTH_FRACTION_MAX = 0.05  # of the first RSS sample after the warm-up
RSS_GROWTH_BYTES_FLOOR = 20 * 1024 * 1024
SAMPLES_MAX = 10_000  # per phase; duration / sample-seconds is far below this within the bounds above
MIB = 1024 * 1024
WARMUP_WEIGHTS = MixWeights(wrong_pin=0)  # the realistic mix without PIN-counter traffic (see drive)
CLEARING_S_MIN = 5.0
CLEARING_RATE_MAX_MAX = 1_000_000  # as authsrv.config.ClearingConfig
SLOW_STEP_MS_MAX = 60_000  # as authsrv.config.ServerConfig
GENERATION_APPROVALS = 2_000  # approvals per clearing file
HOLD_BACK_APPROVALS = 2 * REVERSAL_POOL_MAX  # margin: the pool holds reversible kinds, not only purchases
HOLD_BACK_APPROVALS_MAX = 1_000_000  # ClearingLog's APPROVALS_MAX
ADMIN_TOKEN_REFRESH_S = 240.0  # below the default admin_token_ttl_s (600 s)
UPLOAD_TIMEOUT_S = 120.0
# Files per run: (warm-up + duration) x rate / GENERATION_APPROVALS, 9,000 at an hour at 5,000/s.
INGESTIONS_MAX = 10_000
ROUNDS_MAX = 1_000  # uploads per run: duration / clearing-seconds is far below this within the bounds above
# Default bounds: what the offered rate fills in this time (warm-up included), so that every bound
# is reached in the first ~2-3 minutes and the rest of a 4-minute run judges flatness with all of
# them evicting. (The growth per authorization before the first bound then often spans rising
# pending holds too: the first clearing upload comes after a minute plus the hold-back.)
BOUND_FILL_S = 90.0
# Remembered ledger ids per cleared approval, for the default bound: the user hold and the partner's
# collateral hold (holds_pending is twice open_authorizations), each posted by clearing.
IDS_PER_AUTHORIZATION = 4
BOUND_COUNT_MAX = 100_000_000
# Pending holds per open approval (user and collateral), and how long clearing may lag behind the
# load before the soak's lowered `[ledger] holds_pending_max` would decline new holds: wide headroom.
HOLDS_PER_AUTHORIZATION = 2
HOLDS_HEADROOM_S = 60.0
# Ledger history events per authorization on the cardholder's balance (the hold, the clearing post).
# The bound is chosen so that an average account passes twice it (where trimming starts) by BOUND_FILL_S.
HISTORY_EVENTS_PER_AUTHORIZATION = 2
# Closed approvals and card activity rows fill fast (one per cleared or shown authorization).
SMALL_FILL_S = 30.0
# History has no single eviction point (each account trims on its own): reached once the kept entries
# grow by at most this fraction over this window.
LEVEL_GROWTH_FRACTION = 0.05
LEVEL_WINDOW_S = 60.0
# Bytes one entry of each bounded structure retains, measured in process (tracemalloc from before
# the warm-up, net growth while one structure fills and the others are at their bounds, less the
# pending holds' share; CPython 3.11; history: one event on a cardholder's account with its id and
# reference forgotten). The record columns count the AuthRecord
# with its strings once: an approval in the journal, the activity log and the closed map at once
# is one record, so these overstate when the windows overlap. docs/operations.md has the table.
BYTES_PER_ENTRY = {
    "journal records (records_max)": 730,
    "ledger ids (ids_max)": 250,
    "pending holds (holds_pending_max)": 830,
    "history entries (history_per_account_max x accounts x 2)": 310,
    "closed approvals (closed_max)": 820,
    "activity rows (activities_max)": 620,
}
# /metrics values recorded with each sample: the state that traffic builds up in the server, and the
# early evictions that show a count bound has been reached.
GAUGES = {
    "authsrv_ledger_holds_pending": "holds_pending",
    "authsrv_open_authorizations": "open_authorizations",
    "authsrv_journal_records": "journal_records",
    "authsrv_journal_records_evicted_early_total": "journal_evicted_early",
    "authsrv_ledger_ids_evicted_early_total": "ledger_ids_evicted_early",
    "authsrv_ledger_history_trimmed_total": "history_trimmed",
    "authsrv_ledger_history_entries": "history_entries",
    "authsrv_journal_closed": "journal_closed",
    "authsrv_activity_records": "activity_records",
    # Not memory: what stalls the loop (the tail), as totals since start (histogram sum and count).
    "authsrv_gc_pause_seconds_sum": "gc_pause_s",
    "authsrv_gc_pause_seconds_count": "gc_pauses",
}
# With --slow-step-ms: what held the loop that long, by kind (authsrv/loopwatch.py), totals since start.
SLOW_STEP_FAMILY = "authsrv_loop_slow_step_seconds"


class SoakConfig(msgspec.Struct, frozen=True, kw_only=True):
    rate_per_s: float
    duration_s: float
    users: int = 20_000
    connections: int = 8
    sample_s: float = 10.0
    warmup_s: float = 30.0
    timeout_s: float = 5.0
    seed: int = 1
    clearing_s: float = 60.0  # 0: no clearing during the run
    clearing_hold_back: int = HOLD_BACK_APPROVALS  # newest approvals not cleared yet (see _ClearingFeed)
    journal_records_max: int = 0  # 0: derived from the rate (default_bounds)
    ledger_ids_max: int = 0  # 0: derived from the rate (default_bounds)
    holds_pending_max: int = 0  # 0: derived (default_bounds)
    history_per_account_max: int = 0  # 0: derived from rate and users (default_bounds)
    closed_max: int = 0  # 0: derived from the rate (default_bounds)
    activities_max: int = 0  # 0: derived from the rate (default_bounds)
    settle_s: float | None = None  # judge flatness from this far into the recorded run
    snapshot_interval_records: int = 0  # 0: authsrv.toml's default; the log records between two snapshots
    clearing_rate_max: int = 0  # [clearing] records_per_second_max (0: no cap)
    compactor_one_shot: bool = False  # [ledger] compactor_follows = false: a compactor per snapshot
    clearing_planner: str = ""  # [clearing] planner: "thread" or "process" ("": authsrv.toml's default)
    slow_step_ms: float = 0.0  # [server] slow_step_ms: count what holds the loop this long (0: off)
    hot_cards: float = HOT_CARDS_FRACTION_DEFAULT  # the bench's mix: a few hot cards (0: uniform picks)
    hot_share: float = HOT_SHARE_DEFAULT

    @property
    def hot(self) -> HotCards:
        return HotCards(fraction=self.hot_cards, share=self.hot_share)

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise ValueError("rate must be > 0")
        HotCards(fraction=self.hot_cards, share=self.hot_share)  # ValueError when out of range
        if not 0 < self.duration_s <= DURATION_S_MAX:
            raise ValueError(f"duration must be in (0, {DURATION_S_MAX:.0f}] s")
        if not 0 <= self.warmup_s <= WARMUP_S_MAX:
            raise ValueError(f"warm-up must be in [0, {WARMUP_S_MAX:.0f}] s")
        if not SAMPLE_S_MIN <= self.sample_s <= SAMPLE_S_MAX:
            raise ValueError(f"sample interval must be in [{SAMPLE_S_MIN}, {SAMPLE_S_MAX:.0f}] s")
        if not 0 < self.users <= USERS_MAX:
            raise ValueError(f"users must be in 1..{USERS_MAX}")
        if self.clearing_planner not in ("", "thread", "process"):
            raise ValueError('clearing planner must be "thread" or "process" (or empty: as configured)')
        if not 0 <= self.slow_step_ms <= SLOW_STEP_MS_MAX:
            raise ValueError(f"slow step threshold must be in [0, {SLOW_STEP_MS_MAX:.0f}] ms (0: off)")
        if self.snapshot_interval_records < 0:
            raise ValueError("snapshot interval must be >= 0 records (0: the default)")
        if not 0 <= self.clearing_rate_max <= CLEARING_RATE_MAX_MAX:
            raise ValueError(f"clearing records per second must be in [0, {CLEARING_RATE_MAX_MAX}] (0: no cap)")
        if self.clearing_s != 0 and not CLEARING_S_MIN <= self.clearing_s <= DURATION_S_MAX:
            raise ValueError(f"clearing interval must be 0 (off) or in [{CLEARING_S_MIN:.0f}, {DURATION_S_MAX:.0f}] s")
        if not 0 <= self.clearing_hold_back <= HOLD_BACK_APPROVALS_MAX:
            raise ValueError(f"clearing hold-back must be in [0, {HOLD_BACK_APPROVALS_MAX}] approvals")
        if self.journal_records_max != 0 and not RECORDS_MAX_MIN <= self.journal_records_max <= BOUND_COUNT_MAX:
            raise ValueError(f"journal records bound must be in [{RECORDS_MAX_MIN}, {BOUND_COUNT_MAX}]")
        holds = self.holds_pending_max or HOLDS_PENDING_MAX
        if self.ledger_ids_max != 0 and not holds < self.ledger_ids_max <= BOUND_COUNT_MAX:
            raise ValueError(f"ledger ids bound must be above {holds} (the pending-hold bound)"
                             f" and at most {BOUND_COUNT_MAX}")
        if self.holds_pending_max != 0 and not HOLDS_PENDING_MAX_MIN <= self.holds_pending_max <= HOLDS_PENDING_MAX:
            raise ValueError(f"pending-hold bound must be in [{HOLDS_PENDING_MAX_MIN}, {HOLDS_PENDING_MAX}]")
        for name, value, low in (("history_per_account_max", self.history_per_account_max, HISTORY_PER_ACCOUNT_MAX_MIN),
                                 ("closed_max", self.closed_max, CLOSED_MAX_MIN),
                                 ("activities_max", self.activities_max, ACTIVITIES_MAX_MIN)):  # fmt: skip
            if value != 0 and not low <= value <= BOUND_COUNT_MAX:
                raise ValueError(f"{name} must be 0 (derived) or in [{low}, {BOUND_COUNT_MAX}]")
        if self.settle_s is not None and not 0 <= self.settle_s < self.duration_s:
            raise ValueError("settle time must be in [0, duration) s")


def _filled(count: float, low: int) -> int:
    return min(max(low, int(count)), BOUND_COUNT_MAX)


def default_bounds(config: SoakConfig) -> SoakConfig:
    """The config with its zero bounds replaced by what the offered rate fills in about BOUND_FILL_S.

    Pending holds: with clearing on, what clearing keeps pending (an interval's approvals plus the
    hold-back) with HOLDS_HEADROOM_S of headroom, so that the ids bound above it can be reached
    within minutes; without clearing nothing releases holds, so the production bound stays."""
    rate = config.rate_per_s
    records = config.journal_records_max or _filled(rate * BOUND_FILL_S, RECORDS_MAX_MIN)
    holds = config.holds_pending_max
    if not holds:
        holds = HOLDS_PENDING_MAX
        if config.clearing_s > 0:
            pending = rate * HOLDS_PER_AUTHORIZATION * (HOLDS_HEADROOM_S + config.clearing_s)
            holds = min(HOLDS_PENDING_MAX, _filled(pending + HOLDS_PER_AUTHORIZATION * config.clearing_hold_back,
                                                   HOLDS_PENDING_MAX_MIN))  # fmt: skip
    ids = config.ledger_ids_max or _filled(rate * BOUND_FILL_S * IDS_PER_AUTHORIZATION, holds + 1)
    events_per_account = rate * BOUND_FILL_S * HISTORY_EVENTS_PER_AUTHORIZATION / config.users
    history = config.history_per_account_max or _filled(events_per_account / 4, HISTORY_PER_ACCOUNT_MAX_MIN)
    closed = config.closed_max or _filled(rate * SMALL_FILL_S, CLOSED_MAX_MIN)
    activities = config.activities_max or _filled(rate * SMALL_FILL_S, ACTIVITIES_MAX_MIN)
    return msgspec.structs.replace(config, journal_records_max=records, ledger_ids_max=ids, holds_pending_max=holds,
                                   history_per_account_max=history, closed_max=closed,
                                   activities_max=activities)  # fmt: skip


def write_bounds(data: Path, *, records_max: int, ids_max: int, holds_pending_max: int | None = None,
                 history_per_account_max: int | None = None, closed_max: int | None = None,
                 activities_max: int | None = None, snapshot_interval_records: int | None = None,
                 records_per_second_max: int | None = None, compactor_follows: bool | None = None,
                 clearing_planner: str | None = None, slow_step_ms: float | None = None) -> None:  # fmt: skip
    """Set the count bounds (the snapshot interval, clearing's cap, the compactor's mode) in the
    data directory's authsrv.toml (keys of the default template); None leaves a key as it is."""
    path = config_path(data)
    text = path.read_text()
    if compactor_follows is not None:
        text, found = re.subn(r"^compactor_follows = (true|false)$",
                              f"compactor_follows = {str(compactor_follows).lower()}", text, flags=re.MULTILINE)
        if found != 1:
            raise ValueError(f"{path}: expected one `compactor_follows = true|false` line, found {found}")
    if clearing_planner is not None:
        text, found = re.subn(r'^planner = "(thread|process)"$', f'planner = "{clearing_planner}"', text,
                              flags=re.MULTILINE)
        if found != 1:
            raise ValueError(f"{path}: expected one `planner = \"thread|process\"` line, found {found}")
    if slow_step_ms is not None:
        text, found = re.subn(r"^slow_step_ms = [0-9.]+$", f"slow_step_ms = {slow_step_ms:g}", text, flags=re.MULTILINE)
        if found != 1:
            raise ValueError(f"{path}: expected one `slow_step_ms = N` line, found {found}")
    wanted = {"records_max": records_max, "ids_max": ids_max, "holds_pending_max": holds_pending_max,
              "history_per_account_max": history_per_account_max, "closed_max": closed_max,
              "activities_max": activities_max, "snapshot_interval_records": snapshot_interval_records,
              "records_per_second_max": records_per_second_max}  # fmt: skip
    for key, value in wanted.items():
        if value is None:
            continue
        text, found = re.subn(rf"^{key} = \d+$", f"{key} = {value}", text, flags=re.MULTILINE)
        if found != 1:
            raise ValueError(f"{path}: expected one `{key} = N` line, found {found}")
    try:
        config = decode_config(text.encode(), source=str(path))
    except ConfigError as error:  # run_soak reports ValueErrors as the run's error
        raise ValueError(str(error)) from None
    written = {"records_max": config.duplicates.records_max, "ids_max": config.ledger.ids_max,
               "holds_pending_max": config.ledger.holds_pending_max,
               "history_per_account_max": config.ledger.history_per_account_max,
               "closed_max": config.duplicates.closed_max, "activities_max": config.history.activities_max,
               "snapshot_interval_records": config.ledger.snapshot_interval_records,
               "records_per_second_max": config.clearing.records_per_second_max}  # fmt: skip
    assert all(value is None or written[key] == value for key, value in wanted.items()), written
    assert compactor_follows is None or config.ledger.compactor_follows == compactor_follows
    assert clearing_planner is None or config.clearing.planner == clearing_planner
    assert slow_step_ms is None or config.server.slow_step_ms == slow_step_ms
    path.write_text(text)


class RssSample(msgspec.Struct, frozen=True, kw_only=True):
    phase: str  # "start" (idle, after /readyz), "warmup", "soak", "end" (load drained, before SIGTERM)
    elapsed_s: float  # since the server was ready
    rss_bytes: int
    gauges: dict[str, float]  # GAUGES values at that moment; empty when /metrics did not answer


class Ingestion(msgspec.Struct, frozen=True, kw_only=True):
    """One clearing file uploaded to the running server during the run."""

    phase: str  # "warmup" or "soak": the load running meanwhile
    elapsed_s: float  # since the server was ready, when the upload started
    approvals: int  # approvals taken from the load for this file
    records: int  # lines of the file (splits are two; plus one refund)
    applied: int
    matched: int
    exceptions: int
    seconds: float  # upload to summary, while the load kept running
    error: str | None = None


class ClearingCadence(msgspec.Struct, frozen=True, kw_only=True):
    """Whether clearing kept up: every round (the files of one interval) done before the next was due."""

    interval_s: float
    rounds: int
    overruns: int  # rounds that ended after the next one was due
    round_s_max: float  # the longest round

    @property
    def kept_up(self) -> bool:
        return self.rounds > 0 and self.overruns == 0


class RetentionBounds(msgspec.Struct, frozen=True, kw_only=True):
    journal_records_max: int
    ledger_ids_max: int
    journal_reached_s: float | None  # first sample showing early evictions (elapsed since ready)
    ledger_reached_s: float | None
    # RSS growth over the rise in journal records up to the last sample before either bound evicted:
    # what one authorization leaves in memory while the 24-hour windows fill (with pending holds
    # kept level by clearing when the span starts after an upload). Times rate x 86,400 sizes a day.
    growth_bytes_per_authorization: float | None
    growth_span_s: float | None  # the span that figure covers
    growth_from: str = ""  # where that span starts: after the first clearing upload, or the warm-up
    # The other bounds (0 in results of older runs) and when each was reached (None: not reached, or
    # its gauge absent from /metrics: see `unobserved`): closed and activity when their count gauge
    # reaches the bound; history when its entry count levelled (grew less than LEVEL_GROWTH_FRACTION
    # over LEVEL_WINDOW_S: accounts hold between 1 and 2 times the bound, so the gauge never equals it).
    holds_pending_max: int = 0
    history_per_account_max: int = 0
    closed_max: int = 0
    activities_max: int = 0
    history_reached_s: float | None = None
    closed_reached_s: float | None = None
    activities_reached_s: float | None = None
    unobserved: list[str] = []  # bounds whose gauge no sample had
    # bound name -> (bound, bytes per entry, bytes at the bound): BYTES_PER_ENTRY x the bound.
    sizing: dict[str, tuple[int, int, int]] = {}


class RssVerdict(msgspec.Struct, frozen=True, kw_only=True):
    first_bytes: int | None  # first sample of the recorded run (after the warm-up)
    last_bytes: int | None  # last sample with the server still under load or just drained
    peak_bytes: int | None
    growth_bytes: int | None
    growth_mib_per_min: float | None
    bound_bytes: int | None  # max(RSS_GROWTH_FRACTION_MAX x first, RSS_GROWTH_BYTES_FLOOR)
    flat: bool | None  # None: fewer than two samples after the warm-up
    rule: str
    # Growth over the rise in pending holds between the same two samples: a figure near the cost
    # of the state each hold carries (ledger hold, journal record, open authorization) means the
    # growth is retained state that hold expiry bounds, not a leak. None when holds did not rise.
    growth_bytes_per_hold_added: float | None = None
    judged_from_s: float | None = None  # elapsed (since ready) of the first sample judged
    judged_from: str = ""  # why from there: bounds reached, settle time, or the whole run


class ServerLatency(msgspec.Struct, frozen=True, kw_only=True):
    """The server's own view of the recorded run: `authsrv_iso_request_seconds` (receipt to answer
    written) scraped before and after it. Percentiles are interpolated inside the histogram's buckets,
    so each is within its bucket (10-15-25-35-50-75-100 ms around the goal). Unlike the load's figures,
    it leaves out the load generator's own delays on a shared machine."""

    answered: int
    p99_ms: float
    p999_ms: float
    over_25ms_fraction: float
    # The log's group commits over the same run (`authsrv_wal_fsync_seconds`: write + fsync): the
    # disk's share of the tail. None in an older results file.
    fsync_groups: int | None = None
    fsync_p99_ms: float | None = None
    fsync_p999_ms: float | None = None
    fsync_over_100ms: int | None = None


class SoakResults(msgspec.Struct, frozen=True, kw_only=True):
    created_utc: str
    machine: Machine
    settings: SoakConfig
    soak: Step | None  # the recorded run: rates, percentiles, code mix, mismatches, server CPU
    unsent: int | None
    connection_errors: list[str]
    mismatch_detail: dict[str, dict[str, int]]  # kind -> "expected->got" -> count (the load report's)
    rss_samples: list[RssSample]
    rss: RssVerdict
    bounds: RetentionBounds | None
    ingestions: list[Ingestion]
    error: str | None
    server_exit_code: int | None
    ledger_verify_exit_code: int | None
    server_latency: ServerLatency | None = None  # None: /metrics did not answer (or an older results file)
    clearing: ClearingCadence | None = None  # None: no clearing during the run (or an older results file)


def read_rss_bytes(pid: int) -> int:
    """VmRSS of a live process, from /proc/PID/status (reported in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace").splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise ProcessLookupError(f"no VmRSS for pid {pid} (a zombie?)")


def parse_gauges(metrics_text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in GAUGES and not sample.labels:
                found[GAUGES[sample.name]] = sample.value
            elif sample.name in (SLOW_STEP_FAMILY + "_count", SLOW_STEP_FAMILY + "_sum") and "kind" in sample.labels:
                what = "slow_steps" if sample.name.endswith("_count") else "slow_step_s"
                found[f"{what}:{sample.labels['kind']}"] = sample.value
    return found


LATENCY_FAMILY = "authsrv_iso_request_seconds"
FSYNC_FAMILY = "authsrv_wal_fsync_seconds"


def parse_latency_buckets(metrics_text: str, family_name: str = LATENCY_FAMILY) -> Histo:
    """A histogram of the server's (cumulative counts by upper bound, in seconds): by default the
    request latency."""
    found: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == family_name:
            for sample in family.samples:
                if sample.name == family_name + "_bucket":
                    found[float(sample.labels["le"])] = sample.value
    bounds = tuple(sorted(found))
    return Histo(bounds, tuple(found[bound] for bound in bounds))


def _scrape_latency(metrics_port: int) -> tuple[Histo, Histo]:
    """The request latency and the log's fsync histograms, from one scrape."""
    try:
        text = scrape_metrics(metrics_port)
        return parse_latency_buckets(text), parse_latency_buckets(text, FSYNC_FAMILY)
    except (OSError, ValueError):
        return Histo(), Histo()


def server_latency(before: Histo, after: Histo, fsync_before: Histo | None = None,
                   fsync_after: Histo | None = None) -> ServerLatency | None:
    """Percentiles of what the histogram counted between two scrapes (the panel's histogram_quantile
    rule); None when either scrape is missing or the buckets differ. The fsync figures likewise,
    when both of their scrapes are given and agree."""
    if not before.bounds or before.bounds != after.bounds:
        return None
    run = after.minus(before)
    p99, p999 = run.quantile(0.99), run.quantile(0.999)
    if p99 is None or p999 is None:
        return None
    over = run.count - run.counts[run.bounds.index(0.025)] if 0.025 in run.bounds else 0.0
    fsync: dict[str, float | int] = {}
    if fsync_before is not None and fsync_after is not None and fsync_before.bounds \
            and fsync_before.bounds == fsync_after.bounds:
        groups = fsync_after.minus(fsync_before)
        f99, f999 = groups.quantile(0.99), groups.quantile(0.999)
        if f99 is not None and f999 is not None:
            slow = groups.count - groups.counts[groups.bounds.index(0.1)] if 0.1 in groups.bounds else 0.0
            fsync = {"fsync_groups": int(groups.count), "fsync_p99_ms": round(f99 * 1000, 2),
                     "fsync_p999_ms": round(f999 * 1000, 2), "fsync_over_100ms": int(slow)}
    return ServerLatency(answered=int(run.count), p99_ms=round(p99 * 1000, 2), p999_ms=round(p999 * 1000, 2),
                         over_25ms_fraction=round(over / run.count, 6), **fsync)


def _scrape_gauges(metrics_port: int) -> dict[str, float]:
    try:
        return parse_gauges(scrape_metrics(metrics_port))
    except (OSError, ValueError):  # a busy or stopping server: the RSS figure still stands
        return {}


def _recorded(samples: list[RssSample]) -> list[RssSample]:
    return [sample for sample in samples if sample.phase in ("soak", "end")]


def rss_verdict(samples: list[RssSample], *, from_s: float | None = None, judged_from: str = "") -> RssVerdict:
    """The flatness rule over the samples taken after the warm-up (phases soak and end), from the
    first one at or after `from_s` (elapsed since ready) when given."""
    rule = (f"flat when RSS growth from the first judged sample to the last is at most "
            f"max({RSS_GROWTH_FRACTION_MAX:.0%} of the first, {RSS_GROWTH_BYTES_FLOOR // MIB} MiB)")  # fmt: skip
    recorded = [sample for sample in _recorded(samples) if from_s is None or sample.elapsed_s >= from_s]
    if len(recorded) < 2:
        return RssVerdict(first_bytes=None, last_bytes=None, peak_bytes=None, growth_bytes=None,
                          growth_mib_per_min=None, bound_bytes=None, flat=None, rule=rule,
                          judged_from=judged_from)  # fmt: skip
    first, last = recorded[0], recorded[-1]
    assert last.elapsed_s >= first.elapsed_s
    growth = last.rss_bytes - first.rss_bytes
    minutes = (last.elapsed_s - first.elapsed_s) / 60
    bound = max(int(RSS_GROWTH_FRACTION_MAX * first.rss_bytes), RSS_GROWTH_BYTES_FLOOR)
    return RssVerdict(
        first_bytes=first.rss_bytes, last_bytes=last.rss_bytes,
        peak_bytes=max(sample.rss_bytes for sample in recorded), growth_bytes=growth,
        growth_mib_per_min=round(growth / MIB / minutes, 3) if minutes > 0 else None,
        bound_bytes=bound, flat=growth <= bound, rule=rule,
        growth_bytes_per_hold_added=_per_hold(first, last, growth), judged_from_s=first.elapsed_s,
        judged_from=judged_from,
    )  # fmt: skip


def _first_evicting_s(samples: list[RssSample], counter: str) -> float | None:
    """Elapsed time of the first sample whose early-eviction counter is above zero: the bound is reached."""
    return next((sample.elapsed_s for sample in samples if sample.gauges.get(counter, 0) > 0), None)


def _first_at_least_s(samples: list[RssSample], gauge: str, bound: int) -> float | None:
    return next((sample.elapsed_s for sample in samples if bound and sample.gauges.get(gauge, -1) >= bound), None)


def _first_level_s(samples: list[RssSample], gauge: str) -> float | None:
    """Elapsed time of the first sample whose gauge grew by at most LEVEL_GROWTH_FRACTION of its value
    over the LEVEL_WINDOW_S before it (bounded: quadratic in the samples, at most SAMPLES_MAX x 2)."""
    seen = [sample for sample in samples if gauge in sample.gauges]
    for index, sample in enumerate(seen):
        earlier = [old for old in seen[:index] if sample.elapsed_s - old.elapsed_s >= LEVEL_WINDOW_S]
        if earlier and sample.gauges[gauge] > 0:
            growth = sample.gauges[gauge] - earlier[-1].gauges[gauge]
            if growth <= LEVEL_GROWTH_FRACTION * sample.gauges[gauge]:
                return sample.elapsed_s
    return None


def sizing(config: SoakConfig) -> dict[str, tuple[int, int, int]]:
    """Each bound of the run x the bytes one entry retains (BYTES_PER_ENTRY): RAM at the bound."""
    counts = {"journal records (records_max)": config.journal_records_max,
              "ledger ids (ids_max)": config.ledger_ids_max,
              "pending holds (holds_pending_max)": config.holds_pending_max,
              "history entries (history_per_account_max x accounts x 2)":
                  config.history_per_account_max * config.users * 2,
              "closed approvals (closed_max)": config.closed_max,
              "activity rows (activities_max)": config.activities_max}  # fmt: skip
    return {name: (count, BYTES_PER_ENTRY[name], count * BYTES_PER_ENTRY[name]) for name, count in counts.items()}


def retention_bounds(samples: list[RssSample], config: SoakConfig,
                     ingestions: Sequence[Ingestion] = ()) -> RetentionBounds:
    """When each bound started evicting, and the RSS growth per authorization while they filled:
    from the first sample after the first clearing upload (pending holds level from then on) when
    there are two such samples before the first bound, else from the first sample after the warm-up."""
    journal_s = _first_evicting_s(samples, "journal_evicted_early")
    ledger_s = _first_evicting_s(samples, "ledger_ids_evicted_early")
    first_reached_s = min((s for s in (journal_s, ledger_s) if s is not None), default=None)
    filling = [sample for sample in _recorded(samples) if "journal_records" in sample.gauges
               and (first_reached_s is None or sample.elapsed_s < first_reached_s)]  # fmt: skip
    cleared_s = next((done.elapsed_s + done.seconds for done in ingestions if done.error is None), None)
    cleared = [sample for sample in filling if cleared_s is not None and sample.elapsed_s >= cleared_s]
    span, growth_from = (cleared, "after the first clearing upload") if len(cleared) >= 2 else (
        filling, "after the warm-up, pending holds still rising")  # fmt: skip
    per_authorization = span_s = None
    if len(span) >= 2:
        first, last = span[0], span[-1]
        authorizations = last.gauges["journal_records"] - first.gauges["journal_records"]
        if authorizations > 0:
            per_authorization = round((last.rss_bytes - first.rss_bytes) / authorizations, 1)
            span_s = round(last.elapsed_s - first.elapsed_s, 2)
    observed = {name for sample in samples for name in sample.gauges}
    gauges = (("history_per_account_max", "history_entries"), ("closed_max", "journal_closed"),
              ("activities_max", "activity_records"))
    unobserved = [name for name, gauge in gauges if gauge not in observed]
    return RetentionBounds(journal_records_max=config.journal_records_max, ledger_ids_max=config.ledger_ids_max,
                           journal_reached_s=journal_s, ledger_reached_s=ledger_s,
                           growth_bytes_per_authorization=per_authorization, growth_span_s=span_s,
                           growth_from=growth_from if per_authorization is not None else "",
                           holds_pending_max=config.holds_pending_max,
                           history_per_account_max=config.history_per_account_max, closed_max=config.closed_max,
                           activities_max=config.activities_max,
                           history_reached_s=_first_level_s(samples, "history_entries"),
                           closed_reached_s=_first_at_least_s(samples, "journal_closed", config.closed_max),
                           activities_reached_s=_first_at_least_s(samples, "activity_records", config.activities_max),
                           unobserved=unobserved, sizing=sizing(config))  # fmt: skip


def reached_times(bounds: RetentionBounds) -> dict[str, float | None]:
    """Bound name -> when it was reached (None: not reached); bounds without a gauge left out."""
    times = {"journal records_max": bounds.journal_reached_s, "ledger ids_max": bounds.ledger_reached_s,
             "history_per_account_max": bounds.history_reached_s, "closed_max": bounds.closed_reached_s,
             "activities_max": bounds.activities_reached_s}  # fmt: skip
    return {name: at_s for name, at_s in times.items() if name not in bounds.unobserved}


def judged_start(samples: list[RssSample], bounds: RetentionBounds, settle_s: float | None) -> tuple[float | None, str]:
    """Where the flatness rule starts (elapsed since ready; None: the whole recorded run), and why."""
    recorded = _recorded(samples)
    if not recorded:
        return None, "no samples after the warm-up"
    if settle_s is not None:
        return recorded[0].elapsed_s + settle_s, f"from {settle_s:.0f} s into the recorded run (--settle-seconds)"
    times = reached_times(bounds)
    missing = [name for name, at_s in times.items() if at_s is None]
    if not missing:
        reached_s = max(at_s for at_s in times.values() if at_s is not None)
        return reached_s, f"from {reached_s:.0f} s after ready, when every count bound observed was reached"
    return None, f"whole recorded run: {' and '.join(missing)} not reached, retained state still filling"


def _per_hold(first: RssSample, last: RssSample, growth_bytes: int) -> float | None:
    holds_added = last.gauges.get("holds_pending", 0.0) - first.gauges.get("holds_pending", 0.0)
    if "holds_pending" not in first.gauges or "holds_pending" not in last.gauges or holds_added <= 0:
        return None
    return round(growth_bytes / holds_added, 1)


class _ClearingFeed:
    """What the load learns for clearing, in generations of GENERATION_APPROVALS, handed over at each
    upload so that every approval is cleared once. The newest `hold_back` stay: the load reverses the
    oldest of its last REVERSAL_POOL_MAX approvals, and a reversal after clearing finds no open
    authorization (25, counted as a mismatch). A run too short to fill the pool reverses its first
    approvals, so with a smaller hold-back such 25s are expected there. The load's pump thread adds
    approvals while the soak's trio thread takes them: hence the lock (held for dict work, never I/O)."""

    def __init__(self, hold_back: int) -> None:
        assert hold_back >= 0
        self._hold_back = hold_back
        self._lock = threading.Lock()
        self._sealed: collections.deque[ClearingLog] = collections.deque()
        self._current = ClearingLog()

    def approved(self, clearable: Clearable, auth_code: str) -> None:
        with self._lock:
            self._current.approved(clearable, auth_code)
            if len(self._current) >= GENERATION_APPROVALS:
                self._sealed.append(self._current)
                self._current = ClearingLog()

    def reversed(self, rrn: str, remaining: int | None) -> None:
        # Bounded: about hold_back / GENERATION_APPROVALS generations, plus one interval's worth.
        with self._lock:
            self._current.reversed(rrn, remaining)
            for generation in self._sealed:
                generation.reversed(rrn, remaining)

    def take(self) -> list[ClearingLog]:
        """The oldest sealed generations, leaving at least `hold_back` approvals behind."""
        taken: list[ClearingLog] = []
        with self._lock:
            # Counted afresh: full reversals shrink sealed generations.
            held = sum(len(generation) for generation in self._sealed)
            while self._sealed and held - len(self._sealed[0]) >= self._hold_back:
                generation = self._sealed.popleft()
                held -= len(generation)
                taken.append(generation)
        return taken


class _Clearer:
    """Every `interval_s`, the approvals so far as a clearing file, applied by the running server.

    The file is written and uploaded by a separate process (`_Uploader`): done by a thread of this
    one, it shared the load's GIL, and the load's clock, for the seconds each file took, which the
    soak then reported as the server's latency. A network's clearing system is not its terminals."""

    def __init__(self, data: Path, work: Path, config: SoakConfig, clock: Callable[[], float]) -> None:
        assert config.clearing_s > 0
        self.data, self.work, self.interval_s, self.clock = data, work, config.clearing_s, clock
        self.feed = _ClearingFeed(config.clearing_hold_back)
        self.ingestions: list[Ingestion] = []
        self.rounds = self.overruns = 0  # uploads every interval_s; those that ended after the next was due
        self.round_s_max = 0.0
        self._rng = random.Random(config.seed)
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"))  # fmt: skip

    async def every_interval(self, phase: str) -> None:
        """A round every `interval_s` on a fixed cadence, as a network sends its files: a round that
        overruns its interval is counted, and the next one starts at once. (Sleeping `interval_s`
        after each round made each round's backlog grow with the last one's length, and the pending
        holds with it, whenever clearing was less than twice as fast as the load.)"""
        due = trio.current_time()
        for _ in range(ROUNDS_MAX):  # bounded; cancelled when the load run ends
            due += self.interval_s
            await trio.sleep_until(due)
            if len(self.ingestions) >= INGESTIONS_MAX:
                return
            started = trio.current_time()
            with trio.CancelScope(shield=True):  # taken approvals are cleared, even as the load ends
                await self.ingest(phase)
            ended = trio.current_time()
            self.rounds += 1
            self.round_s_max = max(self.round_s_max, ended - started)
            if ended > due + self.interval_s:
                self.overruns += 1
                due = ended - self.interval_s  # the next round at once, the cadence from there

    async def ingest(self, phase: str) -> None:
        for generation in self.feed.take():  # bounded by the generations sealed since the last upload
            if len(self.ingestions) >= INGESTIONS_MAX:
                return
            await self._upload(phase, generation)

    async def _upload(self, phase: str, generation: ClearingLog) -> None:
        elapsed_s, started = self.clock(), time.perf_counter()
        path = self.work / f"clearing-{len(self.ingestions) + 1:04d}.jsonl"
        records = applied = matched = exceptions = 0
        error = None
        try:
            future = self._pool.submit(_upload_in_child, generation, path, self.data, self._rng.getrandbits(64))
            records, reply, error = await trio.to_thread.run_sync(future.result)  # a thread that only waits
            if error is None:
                summary = summary_decoder.decode(reply)
                applied, matched, exceptions = summary.applied, summary.matched, summary.exceptions_count
        except (concurrent.futures.process.BrokenProcessPool, msgspec.DecodeError) as failure:
            error = str(failure)[:500]  # reported; the soak goes on
        finally:
            path.unlink(missing_ok=True)  # card numbers
        seconds = round(time.perf_counter() - started, 3)
        self.ingestions.append(Ingestion(
            phase=phase, elapsed_s=round(elapsed_s, 2), approvals=len(generation), records=records, applied=applied,
            matched=matched, exceptions=exceptions, seconds=seconds, error=error))  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _upload_in_child(generation: ClearingLog, path: Path, data: Path, seed: int) -> tuple[int, bytes, str | None]:
    """In the uploader process: write the file, POST it. (records, summary JSON, error or None);
    errors come back as text, since httpx's exceptions do not survive pickling."""
    global _UPLOADER
    if _UPLOADER is None:
        _UPLOADER = _Uploader(data)
    try:
        return _UPLOADER.write_and_apply(generation, path, random.Random(seed))
    except (IngestError, ClearingFileError, OSError, httpx.HTTPError) as failure:
        return 0, b"", f"{type(failure).__name__}: {failure}"[:500]


class _Uploader:
    """The uploader process's HTTPS client and admin session (one login per ADMIN_TOKEN_REFRESH_S:
    each login costs the server a scrypt, ~16 MiB in a store thread, which would add to the RSS)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        port = json.loads((data / "run.json").read_text())["rest_port"]
        self._client = httpx.Client(base_url=f"https://127.0.0.1:{port}", timeout=UPLOAD_TIMEOUT_S,
                                    verify=client_ssl_context(data / "pki"))  # fmt: skip
        self._token: str | None = None
        self._token_s = 0.0

    def write_and_apply(self, generation: ClearingLog, path: Path, rng: random.Random) -> tuple[int, bytes, None]:
        counts = generation.write(path, rng=rng)
        reply = self._post(path)
        if reply.status_code == 401:  # the admin token expired early (a shorter configured TTL)
            self._token = None
            reply = self._post(path)
        if reply.status_code != 200:
            raise IngestError(f"the server refused the clearing file: {reply.status_code} {reply.text[:300]}")
        return counts.records, reply.content, None

    def _post(self, path: Path) -> httpx.Response:
        if self._token is None or time.monotonic() - self._token_s > ADMIN_TOKEN_REFRESH_S:
            password = (self.data / "admin-password").read_text().strip()
            login = self._client.post("/admin/sessions", json={"username": ADMIN_USERNAME, "password": password})
            if login.status_code not in (200, 201):
                raise IngestError(f"admin login refused: {login.status_code} {login.text[:200]}")
            self._token, self._token_s = login.json()["token"], time.monotonic()
        return self._client.post("/admin/clearing", content=path.read_bytes(), headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/x-ndjson", "X-File-Name": path.name})


_UPLOADER: _Uploader | None = None  # in the uploader process


class _Sampler:
    """RSS (and gauges) of the server every `interval_s`, from a task beside the load."""

    def __init__(self, server: ChildProcess, metrics_port: int, interval_s: float,
                 log: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.server, self.metrics_port, self.interval_s, self.log = server, metrics_port, interval_s, log
        self.samples: list[RssSample] = []
        self.ready_s = time.monotonic()

    async def take(self, phase: str) -> None:
        try:
            rss = read_rss_bytes(self.server.pid)
        except (OSError, ProcessLookupError):  # the server died: the load run reports that
            return
        gauges = await trio.to_thread.run_sync(_scrape_gauges, self.metrics_port)
        elapsed_s = round(time.monotonic() - self.ready_s, 2)
        self.samples.append(RssSample(phase=phase, elapsed_s=elapsed_s, rss_bytes=rss, gauges=gauges))
        if self.log is not None:  # progress: a long run is otherwise silent until its summary
            self.log(f"soak: {elapsed_s:7.1f} s  {phase:<7} RSS {rss / 2**20:7.1f} MiB  holds pending "
                     f"{gauges.get('holds_pending', 0):>9,.0f}  journal records {gauges.get('journal_records', 0):>9,.0f}")

    async def every_interval(self, phase: str) -> None:
        for _ in range(SAMPLES_MAX):  # bounded; cancelled when the load run ends
            await self.take(phase)
            await trio.sleep(self.interval_s)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.ready_s

    async def beside(self, phase: str, load: LoadConfig, cards: tuple, clearer: _Clearer | None) -> LoadReport:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.every_interval, phase)
            feed = None
            if clearer is not None:
                nursery.start_soon(clearer.every_interval, phase)
                feed = cast(ClearingLog, clearer.feed)  # the two methods the load calls, behind a lock
            report = await run_load(load, cards=cards, clearing=feed)
            nursery.cancel_scope.cancel()
        return report


def _load_config(config: SoakConfig, *, port: int, cards_path: Path, zpk: bytes | None, duration_s: float,
                 seed: int, weights: MixWeights) -> LoadConfig:  # fmt: skip
    return LoadConfig(
        cards_path=cards_path, port=port, rate_per_s=config.rate_per_s, duration_s=duration_s,
        connections=config.connections, timeout_s=config.timeout_s, seed=seed, zpk=zpk, weights=weights,
        hot=config.hot,
    )  # fmt: skip


def drive(config: SoakConfig, server: ChildProcess, ports: Ports, cards_path: Path, zpk: bytes | None,
          sampler: _Sampler, clearer: _Clearer | None,
          log: Callable[[str], None]) -> tuple[Step, LoadReport, ServerLatency | None]:  # fmt: skip
    """Warm-up (unrecorded), then the soak, the sampler beside each; returns the soak's figures."""
    cards = load_cards(cards_path)
    trio.run(sampler.take, "start")
    if config.warmup_s > 0:
        # No wrong PINs in the warm-up: each run_load reserves its own PIN-victim cards and tracks
        # their counters, so a card the warm-up locked would answer 75 where the soak expects 00.
        warmup = _load_config(config, port=ports.iso, cards_path=cards_path, zpk=zpk, duration_s=config.warmup_s,
                              seed=config.seed - 1, weights=WARMUP_WEIGHTS)  # fmt: skip
        trio.run(functools.partial(sampler.beside, "warmup", warmup, cards, clearer))
        log(f"soak: warmed up {config.warmup_s:.0f} s at {config.rate_per_s:,.0f}/s (not recorded)")
    load = _load_config(config, port=ports.iso, cards_path=cards_path, zpk=zpk, duration_s=config.duration_s,
                        seed=config.seed, weights=MixWeights())  # fmt: skip
    clearing = f", clearing every {config.clearing_s:.0f} s" if clearer is not None else ", no clearing"
    log(f"soak: {config.duration_s:.0f} s at {config.rate_per_s:,.0f}/s, RSS every {config.sample_s:.0f} s{clearing}")
    latency_before, fsync_before = _scrape_latency(ports.metrics)
    server_before, client_before, wall_before = server.cpu_s(), time.process_time(), time.perf_counter()
    report = trio.run(functools.partial(sampler.beside, "soak", load, cards, clearer))
    latency_after, fsync_after = _scrape_latency(ports.metrics)
    latency = server_latency(latency_before, latency_after, fsync_before, fsync_after)
    step = step_from_report(
        report, server_cpu_s=server.cpu_s() - server_before, client_cpu_s=time.process_time() - client_before,
        wall_s=time.perf_counter() - wall_before,
    )  # fmt: skip
    trio.run(sampler.take, "end")
    return step, report, latency


MEMTRACE_DIR = Path(__file__).parent / "memtrace"  # its sitecustomize traces the server (--trace-memory)


@contextlib.contextmanager
def _memory_traced(directory: Path | None, interval_s: float, tracemalloc_on: bool = False):
    """While starting the server: the environment that makes bench/memtrace report on it (children
    inherit it at start; restored afterwards, so `ledger verify` and the rest run untraced)."""
    if directory is None:
        yield
        return
    names = ("PYTHONPATH", "AUTHSRV_MEMTRACE_DIR", "AUTHSRV_MEMTRACE_SECONDS", "AUTHSRV_MEMTRACE_TRACEMALLOC")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(MEMTRACE_DIR), saved["PYTHONPATH"])))
    os.environ["AUTHSRV_MEMTRACE_DIR"] = str(directory.resolve())
    os.environ["AUTHSRV_MEMTRACE_SECONDS"] = str(interval_s)
    os.environ["AUTHSRV_MEMTRACE_TRACEMALLOC"] = "1" if tracemalloc_on else "0"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_soak(config: SoakConfig, *, log: Callable[[str], None] = print, trace_memory: Path | None = None,
             trace_memory_s: float = 60.0, tracemalloc_on: bool = False) -> SoakResults:
    """Init, seed, bound, serve, warm up, soak with RSS samples and clearing, stop, verify.

    `trace_memory`: a directory where the server writes its allocators' figures every
    `trace_memory_s` (bench/memtrace), with tracemalloc's growth by site when `tracemalloc_on`
    (diagnosis only: it slows the server down a lot)."""
    config = default_bounds(config)
    work = Path(tempfile.mkdtemp(prefix="authsrv-soak-"))
    data, log_path = work / "data", work / "authsrv.log"
    step = report = server = latency = None
    error = exit_code = verify_code = None
    samples: list[RssSample] = []
    ingestions: list[Ingestion] = []
    cadence = None
    try:
        log(f"soak: init + seed {config.users} users in {data} (log {log_path})")
        cards_path = init_and_seed(data, users=config.users, cards_per_user=1, amount_minor=SEED_AMOUNT_MINOR,
                                   log_path=log_path, hot=config.hot)  # fmt: skip
        zpk_path = data / "keys" / "zpk.hex"
        zpk = load_zpk(zpk_path) if zpk_path.exists() else None
        write_bounds(data, records_max=config.journal_records_max, ids_max=config.ledger_ids_max,
                     holds_pending_max=config.holds_pending_max,
                     history_per_account_max=config.history_per_account_max, closed_max=config.closed_max,
                     activities_max=config.activities_max,
                     snapshot_interval_records=config.snapshot_interval_records or None,
                     records_per_second_max=config.clearing_rate_max or None,
                     compactor_follows=False if config.compactor_one_shot else None,
                     clearing_planner=config.clearing_planner or None,
                     slow_step_ms=config.slow_step_ms or None)  # fmt: skip
        log(f"soak: bounds [duplicates] records_max = {config.journal_records_max:,},"
            f" closed_max = {config.closed_max:,}; [ledger] ids_max = {config.ledger_ids_max:,},"
            f" holds_pending_max = {config.holds_pending_max:,},"
            f" history_per_account_max = {config.history_per_account_max:,};"
            f" [history] activities_max = {config.activities_max:,};"
            f" [clearing] records_per_second_max = {config.clearing_rate_max:,} (0: no cap);"
            f" compactor {'one per snapshot' if config.compactor_one_shot else 'following the log'};"
            f" clearing planner {config.clearing_planner or 'as configured'}")  # fmt: skip
        ports = Ports.free()
        with _memory_traced(trace_memory, trace_memory_s, tracemalloc_on):
            server = start_authsrv(data, ports, log_path)
        if trace_memory is not None:
            log(f"soak: memory reports every {trace_memory_s:.0f} s in {trace_memory}"
                + (" (tracemalloc on)" if tracemalloc_on else ""))
        sampler = _Sampler(server, ports.metrics, config.sample_s, log)
        samples = sampler.samples
        clearer = None
        if config.clearing_s > 0:
            clearer = _Clearer(data, work, config, sampler.elapsed_s)
            ingestions = clearer.ingestions
        try:
            step, report, latency = drive(config, server, ports, cards_path, zpk, sampler, clearer, log)
        finally:
            if clearer is not None:
                clearer.close()
                cadence = ClearingCadence(interval_s=config.clearing_s, rounds=clearer.rounds,
                                          overruns=clearer.overruns, round_s_max=round(clearer.round_s_max, 2))
        if not server.running():
            error = f"server exited with {server.process.returncode} during the soak"
    except (LoadError, TargetError, OSError, ValueError) as failure:
        error = str(failure)
    finally:
        if server is not None:
            exit_code = server.stop()
        if data.exists() and server is not None:
            verified = ledger_verify(data, log_path)
            verify_code = verified.exit_code
            log(f"soak: server exit {exit_code}, ledger verify exit {verify_code}")
            if verify_code != 0:
                log(f"soak: ledger verify: {_verify_problems(verified.output)}")
        shutil.rmtree(work, ignore_errors=True)  # holds the seeded cards file (PANs, PINs)
    bounds = retention_bounds(samples, config, ingestions)
    from_s, judged_from = judged_start(samples, bounds, config.settle_s)
    return SoakResults(
        created_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine_info(), settings=config, soak=step, unsent=report.unsent if report else None,
        connection_errors=list(report.connection_errors) if report else [],
        mismatch_detail=dict(report.mismatch_detail) if report else {}, rss_samples=samples,
        rss=rss_verdict(samples, from_s=from_s, judged_from=judged_from), bounds=bounds, ingestions=ingestions,
        error=error, server_exit_code=exit_code, ledger_verify_exit_code=verify_code, server_latency=latency,
        clearing=cadence,
    )  # fmt: skip


def _verify_problems(output: str) -> str:
    """The problems and cross-check of `authsrv ledger verify`'s JSON report (no card data in it)."""
    try:
        report = json.loads(output)
    except ValueError:
        return output[-500:]
    return f"problems {report.get('problems')}; cross-check: {report.get('cross_check')}"


def summary(results: SoakResults) -> str:
    settings, step, rss, server = results.settings, results.soak, results.rss, results.server_latency
    lines = [f"machine: {results.machine.cpu_model}, {results.machine.cores} cores, Python {results.machine.python}",
             f"soak: offered {settings.rate_per_s:,.0f}/s for {settings.duration_s:.0f} s after a"
             f" {settings.warmup_s:.0f} s warm-up, {settings.users} users, {settings.connections} connections"]  # fmt: skip
    if step is not None:
        codes = " ".join(f"{code}:{count}" for code, count in sorted(step.code_mix.items()))
        cpu = f"{step.cpu_s_per_1000:.3f}" if step.cpu_s_per_1000 is not None else "-"
        lines += [
            f"achieved {step.achieved_rate_per_s:,.1f}/s  sent {step.sent}  answered {step.answered}"
            f"  timeouts {step.timeouts}  lost {step.lost}  unsent {results.unsent}",
            f"latency ms  p50 {step.p50_ms:.2f}  p99 {step.p99_ms:.2f}  p99.9 {step.p999_ms:.2f}  max {step.max_ms:.2f}",
            *([f"server's own histogram (receipt to answer written): p99 {server.p99_ms:.1f} ms  p99.9"
               f" {server.p999_ms:.1f} ms  over 25 ms {server.over_25ms_fraction:.3%} of {server.answered:,}"]
              if server is not None else []),
            *([f"the log's group commits (write + fsync): p99 {server.fsync_p99_ms:.1f} ms  p99.9"
               f" {server.fsync_p999_ms:.1f} ms  over 100 ms {server.fsync_over_100ms:,} of {server.fsync_groups:,}"]
              if server is not None and server.fsync_p99_ms is not None else []),
            f"response codes: {codes or '-'}",
            f"mismatches: {step.mismatches}" + "".join(
                f"; {kind}: " + ", ".join(f"{pair} x{count}" for pair, count in sorted(detail.items()))
                for kind, detail in results.mismatch_detail.items()),
            f"server cpu/1000 {cpu} s  client cpu share {step.client_cpu_share:.0%}  client send lag p99"
            f" {step.send_lag_p99_ms:.2f} ms  p99.9 {step.send_lag_p999_ms:.2f} ms"
            + ("  CLIENT SATURATED" if step.client_saturated else ""),
        ]  # fmt: skip
    lines.append("RSS samples (elapsed s, phase, MiB, holds pending / open auths / journal records"
                 " / journal evicted early / ledger ids evicted early / history trimmed / history entries"
                 " / closed / activity rows / GC pause s / GC pauses):")
    for sample in results.rss_samples:
        gauges = " / ".join(f"{sample.gauges[name]:.0f}" if name in sample.gauges else "-" for name in GAUGES.values())
        lines.append(f"  {sample.elapsed_s:8.1f}  {sample.phase:<6}  {sample.rss_bytes / MIB:8.1f}  {gauges}")
    lines += _ingestion_lines(results.ingestions, results.clearing) + _gc_lines(results.rss_samples)
    lines += _slow_step_lines(results.rss_samples, results.settings.slow_step_ms)
    lines += _bounds_lines(results)
    lines.append(f"judged: {rss.judged_from}")
    if rss.flat is None:
        lines.append("RSS growth: too few samples in the judged part")
    else:
        assert rss.growth_bytes is not None and rss.first_bytes is not None and rss.bound_bytes is not None
        per_min = f"{rss.growth_mib_per_min:+.2f} MiB/min" if rss.growth_mib_per_min is not None else "-"
        lines.append(f"RSS growth over the judged part: {rss.growth_bytes / MIB:+.1f} MiB"
                     f" ({rss.growth_bytes / rss.first_bytes:+.1%} of {rss.first_bytes / MIB:.1f} MiB; {per_min});"
                     f" bound {rss.bound_bytes / MIB:.1f} MiB")  # fmt: skip
        if rss.growth_bytes_per_hold_added is not None:
            lines.append(f"RSS growth per pending hold added: {rss.growth_bytes_per_hold_added:,.0f} B")
    lines.append(f"rule: {rss.rule}")
    lines.append(f"server exit {results.server_exit_code}, ledger verify exit {results.ledger_verify_exit_code}")
    if results.error:
        lines.append(f"error: {results.error}")
    lines.append(f"memory flat: {'unknown' if rss.flat is None else 'yes' if rss.flat else 'no'}")
    return "\n".join(lines)


def _gc_lines(samples: list[RssSample]) -> list[str]:
    """The periodic gc.collect() + gc.freeze() over the recorded run: each one holds the event loop."""
    seen = [sample for sample in _recorded(samples) if "gc_pauses" in sample.gauges and "gc_pause_s" in sample.gauges]
    if len(seen) < 2 or seen[-1].gauges["gc_pauses"] <= seen[0].gauges["gc_pauses"]:
        return []
    count = seen[-1].gauges["gc_pauses"] - seen[0].gauges["gc_pauses"]
    total_s = seen[-1].gauges["gc_pause_s"] - seen[0].gauges["gc_pause_s"]
    return [f"GC pauses (collect + freeze, event loop held): {count:.0f}, mean {total_s / count * 1000:.1f} ms"]


def _slow_step_lines(samples: list[RssSample], slow_step_ms: float) -> list[str]:
    """With --slow-step-ms: what held the event loop that long over the recorded run, by kind."""
    seen = _recorded(samples)
    if slow_step_ms <= 0 or len(seen) < 2:
        return []
    first, last = seen[0].gauges, seen[-1].gauges
    kinds = sorted({key.split(":", 1)[1] for key in last if key.startswith("slow_steps:")})
    parts = []
    for kind in kinds:
        count = last[f"slow_steps:{kind}"] - first.get(f"slow_steps:{kind}", 0.0)
        total_s = last.get(f"slow_step_s:{kind}", 0.0) - first.get(f"slow_step_s:{kind}", 0.0)
        if count > 0:
            parts.append(f"{kind} {count:,.0f} ({total_s:.1f} s)")
    return [f"event loop held {slow_step_ms:g} ms or more: " + (", ".join(parts) if parts else "never")]


INGESTION_LINES_SHOWN = 10  # the first and last files; the rest are summed (all are in the JSON)


def _ingestion_lines(ingestions: list[Ingestion], cadence: ClearingCadence | None = None) -> list[str]:
    if not ingestions:
        return ["clearing: none during the run"]
    lines = ["clearing uploads (elapsed s, phase, approvals, records, matched, applied, exceptions, seconds):"]
    half = INGESTION_LINES_SHOWN // 2
    shown = ingestions if len(ingestions) <= INGESTION_LINES_SHOWN else [*ingestions[:half], None, *ingestions[-half:]]
    for done in shown:
        if done is None:
            lines.append(f"  ... {len(ingestions) - 2 * half} more")
            continue
        lines.append(f"  {done.elapsed_s:8.1f}  {done.phase:<6}  {done.approvals:7d}  {done.records:7d}"
                     f"  {done.matched:7d}  {done.applied:7d}  {done.exceptions:5d}  {done.seconds:7.2f}"
                     + (f"  ERROR {done.error}" if done.error else ""))  # fmt: skip
    records = sum(done.records for done in ingestions)
    busy_s = sum(done.seconds for done in ingestions)
    errors = sum(done.error is not None for done in ingestions)
    lines.append(f"clearing: {len(ingestions)} files, {records:,} records in {busy_s:.0f} s of uploads"
                 f" ({records / busy_s if busy_s else 0:,.0f} records/s while busy), {errors} failed")
    if cadence is not None:
        lines.append(f"clearing cadence: {cadence.rounds} rounds every {cadence.interval_s:.0f} s, longest"
                     f" {cadence.round_s_max:.1f} s, {cadence.overruns} overran: kept up {'yes' if cadence.kept_up else 'NO'}")
    return lines


def _bounds_lines(results: SoakResults) -> list[str]:
    bounds = results.bounds
    if bounds is None:
        return []

    def reached(at_s: float | None) -> str:
        return f"evicting from {at_s:.0f} s" if at_s is not None else "not reached"

    lines = [f"bounds: journal records_max {bounds.journal_records_max:,} ({reached(bounds.journal_reached_s)}),"
             f" ledger ids_max {bounds.ledger_ids_max:,} ({reached(bounds.ledger_reached_s)})"]  # fmt: skip
    if bounds.history_per_account_max:
        def seen(name: str, at_s: float | None, how: str) -> str:
            if name in bounds.unobserved:
                return "no gauge"
            return f"{how} {at_s:.0f} s" if at_s is not None else "not reached"

        lines.append(f"        holds_pending_max {bounds.holds_pending_max:,},"
                     f" history_per_account_max {bounds.history_per_account_max:,}"
                     f" ({seen('history_per_account_max', bounds.history_reached_s, 'levelled at')}),"
                     f" closed_max {bounds.closed_max:,} ({seen('closed_max', bounds.closed_reached_s, 'full at')}),"
                     f" activities_max {bounds.activities_max:,}"
                     f" ({seen('activities_max', bounds.activities_reached_s, 'full at')})")  # fmt: skip
    if bounds.sizing:
        lines.append("sizing at these bounds (bound x bytes per entry, docs/operations.md):")
        for name, (count, per_entry, total) in bounds.sizing.items():
            lines.append(f"  {name:<58} {count:>12,} x {per_entry:>4} B = {total / MIB:9.1f} MiB")
    if bounds.growth_bytes_per_authorization is not None:
        day_bytes = bounds.growth_bytes_per_authorization * results.settings.rate_per_s * 86_400
        per_authorization = bounds.growth_bytes_per_authorization
        lines.append(f"RSS growth per authorization before the first bound: {per_authorization:,.0f} B"
                     f" over {bounds.growth_span_s:.0f} s {bounds.growth_from};"
                     f" x rate x 86,400 = {day_bytes / 1024**3:,.1f} GiB"
                     f" for 24 h at {results.settings.rate_per_s:,.0f}/s")  # fmt: skip
    return lines


def write_results(results: SoakResults, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(results)) + b"\n")


def load_results(path: Path) -> SoakResults:
    return msgspec.json.decode(path.read_bytes(), type=SoakResults)


def write_rss_plot(results: SoakResults, path: Path) -> None:
    """RSS and pending holds against time since ready: the judged part shaded, the flatness bound as
    a band over its first sample, each clearing upload a tick on the time axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to PNG
    import matplotlib.pyplot as plt

    samples = results.rss_samples
    figure, axes = plt.subplots(figsize=(11.0, 5.0), dpi=110)
    try:
        elapsed = [sample.elapsed_s for sample in samples]
        axes.plot(elapsed, [sample.rss_bytes / MIB for sample in samples], "-", color="tab:blue", label="VmRSS (MiB)")
        verdict = results.rss
        if verdict.judged_from_s is not None and verdict.first_bytes is not None and verdict.bound_bytes is not None:
            end_s = elapsed[-1]
            axes.axvspan(verdict.judged_from_s, end_s, color="tab:green", alpha=0.08, label="judged part")
            low = verdict.first_bytes / MIB
            axes.fill_between([verdict.judged_from_s, end_s], low, low + verdict.bound_bytes / MIB, color="tab:green",
                              alpha=0.2, label=f"flat: within {verdict.bound_bytes / MIB:.0f} MiB of the first")
        for done in results.ingestions:
            axes.axvline(done.elapsed_s, ymax=0.03, color="tab:grey", linewidth=0.6)
        axes.set_xlabel("seconds since the server was ready (warm-up first)")
        axes.set_ylabel("resident memory (MiB)")
        axes.grid(True, alpha=0.3)
        holds = [(sample.elapsed_s, sample.gauges["holds_pending"]) for sample in samples
                 if "holds_pending" in sample.gauges]
        lines, labels = axes.get_legend_handles_labels()
        if holds:
            twin = axes.twinx()
            twin.plot([at for at, _ in holds], [count / 1000 for _, count in holds], "-", color="tab:orange",
                      linewidth=0.8, label="pending holds (thousands)")
            twin.set_ylabel("pending holds (thousands)")
            more_lines, more_labels = twin.get_legend_handles_labels()
            lines, labels = lines + more_lines, labels + more_labels
        axes.legend(lines, labels, fontsize=8, loc="lower right")
        settings = results.settings
        step = results.soak
        tail = f", p99.9 {step.p999_ms:.1f} ms" if step is not None else ""
        axes.set_title(f"soak: {settings.rate_per_s:,.0f}/s for {settings.duration_s:.0f} s, clearing every"
                       f" {settings.clearing_s:.0f} s{tail} - {results.machine.cpu_model}, {results.machine.cores} cores",
                       fontsize=9)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rate", type=float, required=True, help="offered authorizations/s (70%% of the knee)")
    parser.add_argument("--duration", type=float, required=True, help=f"recorded seconds, at most {DURATION_S_MAX:.0f}")
    parser.add_argument("--users", type=int, default=20_000, help="users to seed (one card each)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="RSS sampling interval")
    parser.add_argument("--warmup-seconds", type=float, default=30.0, help="unrecorded load before the soak")
    parser.add_argument("--clearing-seconds", type=float, default=60.0,
                        help="upload the approvals so far as a clearing file this often (0: no clearing)")
    parser.add_argument("--clearing-hold-back", type=int, default=HOLD_BACK_APPROVALS,
                        help="newest approvals kept out of clearing so the load can still reverse them")
    parser.add_argument("--journal-records-max", type=int, default=0,
                        help=f"[duplicates] records_max for the run (default: rate x {BOUND_FILL_S:.0f} s)")
    parser.add_argument("--ledger-ids-max", type=int, default=0,
                        help=f"[ledger] ids_max for the run (default: rate x {BOUND_FILL_S:.0f} s x"
                             f" {IDS_PER_AUTHORIZATION}, above --holds-pending-max)")
    parser.add_argument("--holds-pending-max", type=int, default=0,
                        help="[ledger] holds_pending_max for the run (default with clearing: rate x"
                             f" {HOLDS_PER_AUTHORIZATION} x ({HOLDS_HEADROOM_S:.0f} s + clearing interval) + hold-back;"
                             f" without: {HOLDS_PENDING_MAX})")
    parser.add_argument("--history-per-account-max", type=int, default=0,
                        help="[ledger] history_per_account_max for the run (default: a quarter of the events an"
                             f" average account sees in {BOUND_FILL_S:.0f} s, at least {HISTORY_PER_ACCOUNT_MAX_MIN})")
    parser.add_argument("--closed-max", type=int, default=0,
                        help=f"[duplicates] closed_max for the run (default: rate x {SMALL_FILL_S:.0f} s)")
    parser.add_argument("--activities-max", type=int, default=0,
                        help=f"[history] activities_max for the run (default: rate x {SMALL_FILL_S:.0f} s)")
    parser.add_argument("--settle-seconds", type=float, default=None,
                        help="judge flatness from this far into the recorded run (default: once both bounds evict)")
    parser.add_argument("--hot-cards", type=float, default=HOT_CARDS_FRACTION_DEFAULT, metavar="FRACTION",
                        help="share of the cards that are hot, funded for it (0: uniform picks)")
    parser.add_argument("--hot-share", type=float, default=HOT_SHARE_DEFAULT, metavar="FRACTION",
                        help="share of the purchase-type requests that go to the hot cards")
    parser.add_argument("--snapshot-interval-records", type=int, default=0, metavar="N",
                        help="log records between two snapshots (authsrv.toml [ledger]); 0: the default")
    parser.add_argument("--clearing-rate-max", type=int, default=0, metavar="N",
                        help="clearing records per second at most (authsrv.toml [clearing] records_per_second_max);"
                             " 0: no cap")
    parser.add_argument("--compactor-one-shot", action="store_true",
                        help="a compactor per snapshot (authsrv.toml [ledger] compactor_follows = false), as before")
    parser.add_argument("--clearing-planner", choices=("thread", "process"), default="",
                        help="where the server plans clearing (authsrv.toml [clearing] planner);"
                             " default: as configured")
    parser.add_argument("--slow-step-ms", type=float, default=0.0, metavar="MS",
                        help="diagnosis: the server counts event-loop steps and collections held MS or more, by"
                             " kind (authsrv.toml [server] slow_step_ms), and the report sums them; 0: off")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    parser.add_argument("--trace-memory", type=Path, default=None, metavar="DIR",
                        help="diagnosis: the server writes its allocators' figures (pymalloc, glibc) against"
                             " its RSS into DIR every --trace-memory-seconds (bench/memtrace)")
    parser.add_argument("--trace-memory-seconds", type=float, default=60.0)
    parser.add_argument("--tracemalloc", action="store_true",
                        help="with --trace-memory: also tracemalloc's growth by allocation site (slows the server"
                             " down a lot: for small runs)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="the RSS plot (PNG; default: --out with .png)")
    parser.add_argument("--plot-only", action="store_true",
                        help="no run: draw the plot of the results already in --out")
    return parser


def _interrupt_on_sigterm() -> None:
    """`kill` (SIGTERM) stops a soak as Ctrl-C does: the server is stopped and the work directory,
    which holds the seeded cards file (PANs, PINs), removed. Killed soaks used to leave it behind.

    The signal goes to whatever handles SIGINT at that moment: inside `trio.run` that is trio's
    handler, which raises only where it is safe and otherwise wakes the main task. Raising from
    here directly could land inside trio's own bookkeeping and corrupt its nursery stack."""

    def interrupt(signum: int, frame: types.FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored or left to C (not set by this program): stop anyway
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plot = args.plot or args.out.with_suffix(".png")
    if args.plot_only:
        write_rss_plot(load_results(args.out), plot)
        print(f"wrote {plot}")
        return 0
    if not args.trace_memory_seconds >= 1:
        print("error: --trace-memory-seconds must be at least 1", file=sys.stderr)
        return 2
    try:
        config = SoakConfig(rate_per_s=args.rate, duration_s=args.duration, users=args.users,
                            connections=args.connections, sample_s=args.sample_seconds,
                            warmup_s=args.warmup_seconds, clearing_s=args.clearing_seconds,
                            clearing_hold_back=args.clearing_hold_back,
                            journal_records_max=args.journal_records_max, ledger_ids_max=args.ledger_ids_max,
                            holds_pending_max=args.holds_pending_max,
                            history_per_account_max=args.history_per_account_max, closed_max=args.closed_max,
                            activities_max=args.activities_max, settle_s=args.settle_seconds,
                            snapshot_interval_records=args.snapshot_interval_records,
                            clearing_rate_max=args.clearing_rate_max, compactor_one_shot=args.compactor_one_shot,
                            clearing_planner=args.clearing_planner, slow_step_ms=args.slow_step_ms,
                            hot_cards=args.hot_cards, hot_share=args.hot_share)  # fmt: skip
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _interrupt_on_sigterm()
    try:
        results = run_soak(config, trace_memory=args.trace_memory, trace_memory_s=args.trace_memory_seconds,
                           tracemalloc_on=args.tracemalloc)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # raised inside a trio task (SIGTERM's handler): in a group
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        return 130
    write_results(results, args.out)
    write_rss_plot(results, plot)
    print()
    print(summary(results))
    print(f"\nwrote {args.out} and {plot}")
    clean = results.error is None and results.server_exit_code == 0 and results.ledger_verify_exit_code == 0
    clean = clean and not any(done.error for done in results.ingestions)
    return 0 if clean and results.soak is not None and results.soak.mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
