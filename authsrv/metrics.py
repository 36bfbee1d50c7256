"""Prometheus metrics and the plain-HTTP metrics listener (/metrics, /healthz, /readyz).

The listener runs in its own thread (prometheus-client's threaded server pattern): rendering a
scrape takes milliseconds, and inside the trio loop it would stall every authorization for that long
(measured: ~30 ms per scrape of ~4k lines). Hot-path children are pre-bound: `.labels()` on every call costs twice the observe.
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator, Sized
from typing import Protocol

from prometheus_client import ProcessCollector, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from authsrv.hotpath.outcome import RESPONSE
from authsrv.iso.request import REQUEST_MTIS, Mti
from ledger.wal import UNWRITABLE_REASONS as WAL_UNWRITABLE_REASONS

# 15, 35 and 75 ms: the tail around the soak's 25 ms p99.9 goal is read from these (bench/soak.py)
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1,
                     0.25, 0.5, 1.0)
STEP_BUCKETS_S = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.001, 0.01, 0.1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Label values come from fixed sets only, so no input can add series (each one costs memory and
# every scrape): a value read from the wire that is not in its set is counted as OTHER.
OTHER = "other"
# The wire profile's message classes, their acquirer repeats (0101, 0421...) and their responses.
MTI_LABELS: frozenset[str] = frozenset(REQUEST_MTIS | {str(mti) for mti in Mti})
# Field 39 as authsrv answers it (authsrv/hotpath/outcome.py).
CODE_LABELS: frozenset[str] = frozenset(code for code, _ in RESPONSE.values())


def bounded(value: str, allowed: frozenset[str] | set[str]) -> str:
    """`value` if it is one of `allowed`, else OTHER: the only way a label value should be chosen."""
    return value if value in allowed else OTHER


class _StepHistograms(dict):
    def __init__(self, family: Histogram) -> None:
        super().__init__()
        self._family = family

    def __missing__(self, step: str):
        # Keys are the participants' `name` class attributes: a fixed set written in the code.
        child = self[step] = self._family.labels(step=step)
        return child


class _JournalCounts(Protocol):
    evicted_early: int
    activity: Sized

    @property
    def closed_count(self) -> int: ...


class _LedgerCounts(Protocol):
    @property
    def ids_evicted_count(self) -> int: ...

    @property
    def history_trimmed_count(self) -> int: ...

    @property
    def history_entries_count(self) -> int: ...


class _RetentionCollector:
    """Early evictions of the 24-hour windows, read at scrape time from the objects that count them.

    A collector rather than counters bumped on the hot path: the journal and the ledger already keep
    the counts (and the ledger's survives a restart in its snapshot), so nothing is added per request.
    Reading two ints from the metrics thread needs no lock."""

    def __init__(self, journal: _JournalCounts, ledger: _LedgerCounts) -> None:
        self._journal, self._ledger = journal, ledger

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily(
            "authsrv_journal_records_evicted_early",
            "Authorization records dropped by [duplicates] records_max before retention_hours ran out",
            value=self._journal.evicted_early)
        yield CounterMetricFamily(
            "authsrv_ledger_ids_evicted_early",
            "Transfer ids dropped by [ledger] ids_max before their 24 h retention ran out",
            value=self._ledger.ids_evicted_count)
        # The other count bounds, so an operator (and bench/soak.py) sees them fill: O(1) reads.
        yield CounterMetricFamily(
            "authsrv_ledger_history_trimmed",
            "Ledger history entries dropped by [ledger] history_per_account_max (since the process started)",
            value=self._ledger.history_trimmed_count)
        yield GaugeMetricFamily(
            "authsrv_ledger_history_entries", "Ledger history entries kept over all accounts (1-2x the bound each)",
            value=self._ledger.history_entries_count)
        yield GaugeMetricFamily(
            "authsrv_journal_closed", "Approvals remembered after their hold closed ([duplicates] closed_max)",
            value=self._journal.closed_count)
        yield GaugeMetricFamily(
            "authsrv_activity_records", "Card activity rows kept for the history API ([history] activities_max)",
            value=len(self._journal.activity))


class _WalCollector:
    """The write-ahead log's disk, read at scrape time in the metrics thread (ledger/wal.py; no lock
    needed: ints and a reference): free space on its filesystem (statvfs), whether it can be
    written and why, failed attempts by reason, bytes waiting in memory. See docs/operations.md,
    "Full disk and I/O errors"."""

    def __init__(self, wal) -> None:
        self._wal = wal

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        wal = self._wal
        try:
            stat = os.statvfs(wal.directory)
        except OSError:
            pass  # no sample rather than a failed scrape
        else:
            yield GaugeMetricFamily("authsrv_wal_disk_free_bytes",
                                    "Bytes free for authsrv on the write-ahead log's filesystem (statvfs f_bavail)",
                                    value=stat.f_bavail * stat.f_frsize)
        reason = wal.unwritable_reason
        unwritable = GaugeMetricFamily("authsrv_wal_unwritable",
                                       "1 while the write-ahead log cannot be written, by reason (91 to what needs it)",
                                       labels=["reason"])
        errors = CounterMetricFamily("authsrv_wal_write_errors",
                                     "Failed attempts to write a group to the write-ahead log, by reason", labels=["reason"])
        for name in WAL_UNWRITABLE_REASONS:
            unwritable.add_metric([name], 1.0 if name == reason else 0.0)
            errors.add_metric([name], wal.write_errors.get(name, 0))
        yield unwritable
        yield errors
        yield GaugeMetricFamily("authsrv_wal_unwritten_bytes",
                                "Records appended to the write-ahead log and not yet on disk, in bytes",
                                value=wal.unwritten_bytes)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_start_time_seconds, ...
        self._requests = Counter("authsrv_iso_requests", "ISO 8583 requests answered, by request MTI and field 39",
                                 ["mti", "code"], registry=r)
        # (mti, code) label values -> pre-bound child; keyed by label values, never by raw input,
        # so it stays as small as the family (at most MTI_LABELS x CODE_LABELS, plus OTHER).
        self._request_children: dict[tuple[str, str], object] = {}
        self.latency = Histogram("authsrv_iso_request_seconds",
                                 "Receipt to response written, including the durable commit",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.step_seconds = _StepHistograms(Histogram(
            "authsrv_hotpath_step_seconds", "Time in each hot-path participant (sampled 1 in 16)", ["step"],
            buckets=STEP_BUCKETS_S, registry=r))
        self.in_flight = Gauge("authsrv_iso_in_flight", "Requests decided but not yet answered", registry=r)
        self.connections = Gauge("authsrv_iso_connections", "Open ISO 8583 connections", registry=r)
        self.decode_errors = Counter("authsrv_iso_decode_errors", "Frames that could not be decoded", registry=r)
        self.framing_errors = Counter("authsrv_iso_framing_errors", "Connections closed for broken framing",
                                      registry=r)
        self.duplicates = Counter("authsrv_iso_duplicates", "Duplicate requests answered from the journal",
                                  registry=r)
        self.internal_errors = Counter("authsrv_iso_internal_errors", "Messages answered 96, or ISO connections closed, after an unexpected error",
                                       registry=r)
        self.stand_in = Counter("authsrv_stand_in_decisions", "Stand-in decisions (budget or partner)", registry=r)
        self.wal_fsync_seconds = Histogram("authsrv_wal_fsync_seconds", "Write-ahead log group write + fsync",
                                           buckets=LATENCY_BUCKETS_S, registry=r)
        self.wal_batch_records = Histogram("authsrv_wal_batch_records", "Records per group commit",
                                           buckets=BATCH_BUCKETS, registry=r)
        self.holds_pending = Gauge("authsrv_ledger_holds_pending", "Pending holds in the ledger", registry=r)
        # Exposed as authsrv_holds_expired_total; counted from every batch's BatchResult.expired
        # (authsrv/clearing/expiry.py), whichever caller's batch ran the expiry.
        self.holds_expired = Counter("authsrv_holds_expired", "Holds released by expiry (user and collateral)",
                                     registry=r)
        self.open_authorizations = Gauge("authsrv_open_authorizations",
                                         "Approvals whose user hold still holds money (awaiting clearing)",
                                         registry=r)
        self.journal_records = Gauge("authsrv_journal_records", "Authorization records kept for duplicates",
                                     registry=r)
        self.snapshot_seconds = Histogram("authsrv_ledger_snapshot_seconds", "Time to write a ledger snapshot",
                                          buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.gc_pause_seconds = Histogram("authsrv_gc_pause_seconds",
                                          "Event loop held by the periodic gc.collect() + gc.freeze()",
                                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.loop_slow_step_seconds = Histogram(
            "authsrv_loop_slow_step_seconds",
            "Event-loop steps and garbage collections held at least [server] slow_step_ms, by kind (0: not watched)",
            ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.ready = Gauge("authsrv_ready", "1 when recovery is finished and the ISO listener is open", registry=r)
        # Partner deliveries (authsrv/notify): tries by result (delivered, retry, dead), rows by state.
        self.outbox_deliveries = Counter("authsrv_outbox_deliveries", "Tries of calls to partners, by result",
                                         ["result"], registry=r)
        self.outbox_scheduled = Counter("authsrv_outbox_scheduled", "Calls to partners written to the outbox",
                                        registry=r)
        self.outbox_dead_letters = Gauge("authsrv_outbox_dead_letters", "Calls to partners given up (dead letters)",
                                         registry=r)
        self.outbox_pending = Gauge("authsrv_outbox_pending", "Calls to partners not delivered yet", registry=r)
        self._retention: _RetentionCollector | None = None  # set by watch_retention
        self._wal = None  # set by watch_wal (a single node's ledger/wal.py Wal)

    def watch_retention(self, journal: _JournalCounts, ledger: _LedgerCounts) -> None:
        """Expose the journal's and the ledger's early-eviction counts (after they are opened; a
        cluster node that steps down and is promoted again points them at its new state)."""
        if self._retention is not None:
            self.registry.unregister(self._retention)
        self._retention = _RetentionCollector(journal, ledger)
        self.registry.register(self._retention)

    def watch_wal(self, wal) -> None:
        """Expose the log's disk (_WalCollector); while it cannot be written, /readyz is 503 and
        authsrv_ready 0 (whatever run_server set: 1 once the ISO listener is open)."""
        assert self._wal is None, "watch_wal called twice"
        self._wal = wal
        self.registry.register(_WalCollector(wal))
        listener = self.ready._value  # what run_server sets with ready.set()
        self.ready.set_function(lambda: listener.get() if self.not_ready_reason() is None else 0.0)

    def not_ready_reason(self) -> str | None:
        """Why /readyz is 503 although the listener is open, or None."""
        wal = self._wal
        reason = wal.unwritable_reason if wal is not None else None
        return None if reason is None else f"write-ahead log cannot be written ({reason})"

    def answered(self, mti: str, code: str, seconds: float) -> None:
        """Count one answer by request MTI (as sent) and field 39; anything outside the fixed sets
        (an MTI mutated on the wire, with control characters or not) is counted as OTHER."""
        child = self._request_children.get((mti, code))  # one dict lookup for every known pair
        if child is None:
            child = self._request_child(mti, code)
        child.inc()
        self.latency.observe(seconds)

    def _request_child(self, mti: str, code: str):
        key = (bounded(mti, MTI_LABELS), bounded(code, CODE_LABELS))
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(mti=key[0], code=key[1])
        return child

    def on_wal_commit(self, records: int, size_bytes: int, seconds: float) -> None:
        del size_bytes
        self.wal_batch_records.observe(records)
        self.wal_fsync_seconds.observe(seconds)


class MetricsServer:
    """/metrics, /healthz (the process is up), /readyz (recovery done and the ISO listener open)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.ready = False
        registry, server_ref = metrics.registry, self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ok = server_ref.ready
                    reason = metrics.not_ready_reason() if ok else None
                    if reason is not None:
                        self._reply(503, f"not ready: {reason}\n".encode(), "text/plain")
                    else:
                        self._reply(200 if ok else 503, b"ready\n" if ok else b"starting\n", "text/plain")
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        self._httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
