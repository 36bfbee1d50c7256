"""`authsrv serve`: recovery, then the ISO 8583 listener and the metrics listener in one trio process.

Start-up order matters: the ledger and the journal are rebuilt from the snapshot and the write-ahead
log before the listener opens, and /readyz turns green only after that. SIGTERM/SIGINT stop
accepting, let decided requests finish within `shutdown_grace_s`, snapshot, and exit 0.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import attrs
import trio

from authsrv.clearing.expiry import ObservedLedger, watch_expiry, watch_expiry_fees
from authsrv.clearing.remote import ClearingPlanner
from authsrv.compactor import command as compactor_command
from authsrv.hotpath.cardstate import CardStateWriter
from authsrv.hotpath.fees import FeeBook
from authsrv.hotpath.fx import RatesFile
from authsrv.hotpath.journal import AuthJournal
from authsrv.hotpath.pipeline import Switch
from authsrv.iso.server import IsoServer
from authsrv.loopwatch import watch_loop
from authsrv.metrics import Metrics, MetricsServer
from authsrv.panel.dashboard import sampler_for
from authsrv.recovery import new_journal, rebuild_journal, set_ledger_bounds
from authsrv.rest import build_app, serve_rest
from authsrv.rest.app import make_context
from authsrv.rest.cards import CardsApi
from ledger.wal import WalUnwritableError

PARTNER_BALANCE_CHECK_INTERVAL_S = 5.0
log = logging.getLogger("authsrv")

TICK_INTERVAL_S = 1.0  # hold expiry runs on the logged clock: an empty batch per tick advances it
# A following compactor starts once the log holds this share of a snapshot interval: it has that
# much to replay at its start, while the pages are still in the cache.
FOLLOW_START_SHARE = 0.1
STORE_CHECKPOINT_S = 1.0  # the store's WAL into its database (_checkpoint_store): a few MB at most
MCC_CACHE_MAX = 10_000  # there are fewer than 10,000 MCCs
GC_GEN0_THRESHOLD = 100_000
# The pause grows with what was allocated since the last freeze (machine A, 800/s: 50 ms every 10 s,
# 4.5 ms every 1 s; machine C, 1,400/s in a clearing round: 10-20 ms every 1 s), and a pause, unlike
# the total, shows in p99.9: four short ones a second walk the same objects as one long one.
GC_FREEZE_INTERVAL_S = 0.25


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line. Card data never reaches a log call (see authsrv.cardsec.mask_pan)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("AUTHSRV_LOG_LEVEL", "INFO").upper())
    # One INFO line per partner or bureau request is noise and CPU on the hot path; failures are
    # logged by our own code with the context that matters.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def apply_gil_switch_interval(config) -> None:
    """`[server] gil_switch_interval_ms` for this process (the server's own, not a library's caller)."""
    sys.setswitchinterval(config.server.gil_switch_interval_ms / 1000)


def serve_main(data_dir: Path, *, iso_port: int | None = None, rest_port: int | None = None,
               metrics_port: int | None = None) -> int:
    from authsrv.allocator import tune_allocator
    from authsrv.config import load_config
    from authsrv.store.db import DataDirBusy, DataDirLock

    setup_logging()
    tune_allocator()  # before any worker thread: large objects mapped, not heap holes (allocator.py)
    if not (data_dir / "authsrv.toml").exists():
        print(f"authsrv serve: {data_dir} is not a data directory (run `authsrv init --data {data_dir}`)",
              file=sys.stderr)
        return 2
    config = load_config(data_dir)
    apply_gil_switch_interval(config)
    ports = {
        "iso": iso_port if iso_port is not None else config.server.iso_port,
        "rest": rest_port if rest_port is not None else config.server.rest_port,
        "metrics": metrics_port if metrics_port is not None else config.server.metrics_port,
    }
    try:
        lock = DataDirLock.acquire(data_dir)
    except DataDirBusy:
        print(f"authsrv serve: {data_dir / '.lock'} is held: is another server running on this directory?",
              file=sys.stderr)
        return 2
    try:
        trio.run(_serve, data_dir, config, ports)
    finally:
        lock.release()
    log.info("stopped cleanly")
    return 0


def _open_state(data_dir: Path, config, metrics: Metrics):
    """Rebuild ledger and journal (snapshot + log), then the store's in-memory card index."""
    from authsrv import cardsec
    from authsrv.store.db import Store
    from authsrv.store.index import load_index
    from authsrv.store.partners import sync_partners

    started = time.perf_counter()
    ledger, journal = open_ledger_and_journal(data_dir, config, on_commit=metrics.on_wal_commit)
    ledger.compactor = compactor_command(config)  # snapshots built by replay in another process
    metrics.watch_retention(journal, ledger.ledger)
    metrics.watch_wal(ledger.wal)  # free space, unwritable (and /readyz 503 meanwhile)
    watch_expiry(ledger, journal, metrics.holds_expired)
    store = Store.open(data_dir)
    for name in sync_partners(store, config):
        log.info("partner %s: settings taken from authsrv.toml", name)
    index = load_index(store)
    watch_expiry_fees(ledger, journal, index)  # before any new batch: it also makes refunds a crash lost
    _create_missing_accounts(ledger, store)
    keys = cardsec.CardKeys.load(data_dir / "keys")
    # The ledger is millions of long-lived objects: move them out of the collector's view, and
    # collect young objects less often (measured: +40% durable throughput, p99 / 4; bench/ledger_durable.py).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    log.info("recovered: ledger seq %d, %d journal records, %d pending holds in %.2f s",
             ledger.last_seq, len(journal), ledger.ledger.pending_count(), time.perf_counter() - started)
    return ledger, journal, store, index, keys


def open_ledger_and_journal(data_dir: Path, config, *, on_commit=None):
    """Ledger (snapshot + log) and the journal riding on it, rebuilt the same way by the server and
    by offline commands (`clearing ingest`)."""
    journal = new_journal(config)
    replayed: list[bytes] = []
    options = {"on_commit": on_commit} if on_commit is not None else {}
    ledger = ObservedLedger.open(data_dir / "ledger", on_app=lambda seq, data: replayed.append(data),
                                 segment_size_max=config.ledger.segment_size_max_bytes, **options)
    rebuild_journal(journal, ledger.ledger, ledger.app_snapshot, replayed, config.ledger)
    ledger.journal = journal
    return ledger, journal


def become_primary(data_dir: Path, config, metrics: Metrics, state, stream_log, snapshots):
    """A cluster node's state (authsrv/cluster/node.py), caught up with the stream, made the switch's:
    the same steps as a restart's recovery, with the replicated log as the log."""
    from authsrv import cardsec
    from authsrv.cluster.node import ReplicatedLedger
    from authsrv.store.partners import sync_partners

    state.store.replicate_to(stream_log)
    ledger = ReplicatedLedger(data_dir / "ledger", stream_log, state.ledger, snapshot_seq=state.seq,
                              app_snapshot=b"", clock_ns=time.time_ns, snapshots=snapshots)
    set_ledger_bounds(ledger.ledger, config.ledger)
    journal = state.journal
    journal.prune()
    ledger.journal = journal
    metrics.watch_retention(journal, ledger.ledger)
    watch_expiry(ledger, journal, metrics.holds_expired)
    for name in sync_partners(state.store, config):
        log.info("partner %s: settings taken from authsrv.toml", name)
    watch_expiry_fees(ledger, journal, state.index)
    _create_missing_accounts(ledger, state.store)
    state.keys = cardsec.CardKeys.load(data_dir / "keys")
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    return ledger


@contextlib.contextmanager
def offline_state(data_dir: Path) -> Iterator[OfflineState]:
    """The server's state for an offline command (`clearing ingest`, `fees run`), with the data
    directory's lock held by the caller. On a clean exit the log is flushed and a snapshot taken,
    so the next start replays nothing of the command's work. On a cluster node the command writes
    through the shard's stream instead, as its primary for the while."""
    from authsrv.config import load_config
    from authsrv.store.db import Store
    from authsrv.store.index import load_index

    config = load_config(data_dir)
    if config.cluster is not None:  # through the shard's stream (authsrv/cluster/session.py)
        from authsrv.cluster.session import shard_session

        with shard_session(data_dir, config) as state:
            yield state
        return
    ledger, journal = open_ledger_and_journal(data_dir, config)
    try:
        watch_expiry(ledger, journal)
        with Store.open(data_dir) as store:
            index = load_index(store)
            watch_expiry_fees(ledger, journal, index)
            _create_missing_accounts(ledger, store)
            state = OfflineState(config, ledger, journal, store, index)
            yield state
        if state.changed:
            ledger.flush_sync()
            ledger.snapshot(journal.to_snapshot())
    finally:
        ledger.close()


@attrs.define
class OfflineState:
    config: object
    ledger: object
    journal: AuthJournal
    store: object
    index: object
    changed: bool = True  # False: nothing was applied, no snapshot needed


def _create_missing_accounts(ledger, store) -> None:
    """Account creation is idempotent: re-create what the store knows and the ledger lost."""
    from ledger.types import Batch

    missing = tuple(spec for spec in store.all_ledger_accounts() if ledger.ledger.account(spec.id) is None)
    if missing:
        log.warning("creating %d ledger accounts the store knows but the ledger lacks", len(missing))
        ledger.submit(Batch(timestamp_ns=time.time_ns(), accounts=missing))
        ledger.flush_sync()


def hold_timeout_policy(config):
    """MCC -> hold lifetime in seconds (7 days default; 30 for travel and lodging, configurable)."""
    holds = config.holds
    cache: dict[str | None, int] = {}

    def timeout_s(mcc: str | None) -> int:
        found = cache.get(mcc)
        if found is None:
            days = holds.expiry_days(int(mcc)) if mcc is not None and mcc.isdigit() else holds.expiry_days_default
            found = days * 86400
            if len(cache) < MCC_CACHE_MAX:
                cache[mcc] = found
        return found

    return timeout_s


async def _serve(data_dir: Path, config, ports: dict[str, int]) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, stop)
            if config.cluster is None:
                await run_server(data_dir, config, ports, stop)
            else:
                await run_cluster_node(data_dir, config, ports, stop)
            nursery.cancel_scope.cancel()


async def run_cluster_node(data_dir: Path, config, ports: dict[str, int], stop: trio.Event, *,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A node of a shard (authsrv/cluster/node.py): standby until it holds the lease, then primary."""
    from authsrv.cluster.node import ClusterNode

    metrics = Metrics()
    http = MetricsServer(metrics, config.server.host, ports["metrics"])
    node = ClusterNode(data_dir, config, metrics, http)
    await node.run(ports, stop, task_status=task_status)


async def _stop_on_signal(signals, stop: trio.Event) -> None:
    async for signum in signals:
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()
        return


async def run_server(data_dir: Path, config, ports: dict[str, int], stop: trio.Event, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run until `stop` is set; task_status.started() gives {"iso_port", "metrics_port"} once ready."""
    metrics = Metrics()
    http = MetricsServer(metrics, config.server.host, ports["metrics"])
    http.start()
    try:
        ledger, journal, store, index, keys = _open_state(data_dir, config, metrics)
        try:
            await run_services(data_dir, config, ports, metrics, http, stop, ledger, journal, store, index,
                               keys=keys, task_status=task_status)
        finally:
            ledger.close()
            store.close()
    finally:
        http.close()


async def run_services(data_dir, config, ports, metrics, http, stop, ledger, journal, store, index, *,
                       keys=None, lost: trio.Event | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The switch, the REST API and the background work over opened state, until `stop`. With
    `lost` set (a cluster primary that lost its lease), nothing is drained or snapshotted: the
    state is given up."""
    if keys is None:
        from authsrv import cardsec

        keys = cardsec.CardKeys.load(data_dir / "keys")
    cards = CardStateWriter(store)
    fees = FeeBook.of_store(store, config.fees)  # shared with the panel's fee edits (rest_context.fees)
    switch = Switch(ledger=ledger, index=index, cards=cards, keys=keys, journal=journal, metrics=metrics,
                    budget_ms=config.iso.budget_ms, hold_timeout_s=hold_timeout_policy(config),
                    fx=RatesFile(data_dir / config.fx.rates_file), fees=fees,
                    partners=config.partners, pki_dir=data_dir / "pki")  # [external] partner HTTP pools
    iso = IsoServer(switch, ledger, metrics, in_flight_per_connection_max=config.iso.in_flight_per_connection_max,
                    idle_timeout_s=config.iso.idle_timeout_s, frame_size_max=config.iso.frame_size_max,
                    connections_max=config.iso.connections_max)
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        await nursery.start(cards.run)
        listeners = await trio.open_tcp_listeners(ports["iso"], host=config.server.host)
        iso_port = listeners[0].socket.getsockname()[1]
        await nursery.start(iso.run, listeners)
        rest_stop, rest_stopped = trio.Event(), trio.Event()
        rest_context = make_context(store, data_dir=data_dir, index=index, ledger=ledger, config=config, keys=keys)
        rest_context.metrics = metrics
        rest_context.fees = fees
        # A cluster primary's store writes are its stream's: there a worker thread plans clearing.
        if config.clearing.planner == "process" and not store.replicating:
            rest_context.clearing_planner = ClearingPlanner(data_dir)
            nursery.start_soon(_own_clearing_planner, rest_context.clearing_planner)
        await nursery.start(CardsApi.of(rest_context).run)  # async card issuing, bureau orders and links
        rest_port = await nursery.start(partial(serve_rest, build_app(rest_context), host=config.server.host,
                                                port=ports["rest"], pki_dir=data_dir / "pki", shutdown=rest_stop,
                                                stopped=rest_stopped))
        nursery.start_soon(_tick, ledger, journal, metrics)
        nursery.start_soon(_collect_young, metrics)
        nursery.start_soon(watch_loop, config.server.slow_step_ms, metrics.loop_slow_step_seconds)
        nursery.start_soon(_snapshot_when_due, ledger, journal, metrics, config)
        nursery.start_soon(_checkpoint_store, store)
        nursery.start_soon(_watch_partner_balances, rest_context)
        await nursery.start(sampler_for(metrics).run)  # the panel dashboard's rates (authsrv/panel/dashboard.py)
        await nursery.start(_run_delivery, store, data_dir, config, journal, index, ledger, metrics)
        _write_run_file(data_dir, iso_port, http.port, rest_port)
        http.ready = True
        metrics.ready.set(1)
        log.info("ready: ISO 8583 on %s:%d, REST (HTTPS) on %s:%d, metrics on %s:%d", config.server.host,
                 iso_port, config.server.host, rest_port, config.server.host, http.port)
        task_status.started({"iso_port": iso_port, "metrics_port": http.port, "rest_port": rest_port,
                             "switch": switch, "ledger": ledger, "journal": journal, "store": store, "index": index,
                             "clearing_planner": rest_context.clearing_planner})
        await stop.wait()
        http.ready = False
        metrics.ready.set(0)
        iso.stop()
        rest_stop.set()  # graceful: anycorn finishes in-flight requests while the ISO side drains
        if lost is not None and lost.is_set():
            with trio.move_on_after(config.iso.shutdown_grace_s):
                await rest_stopped.wait()
            nursery.cancel_scope.cancel()
            return
        with trio.move_on_after(config.iso.shutdown_grace_s):
            await iso.drained()
        cards.close()
        with trio.move_on_after(config.iso.shutdown_grace_s):
            await cards.drained.wait()
        try:
            ledger.flush_sync()
            _snapshot(ledger, journal, metrics)
        except (OSError, WalUnwritableError) as error:  # a full disk: what was acknowledged is on disk
            log.error("stopping without a final snapshot: %s", error)
        with trio.move_on_after(config.iso.shutdown_grace_s):
            await rest_stopped.wait()
        nursery.cancel_scope.cancel()
    (data_dir / "run.json").unlink(missing_ok=True)


def _write_run_file(data_dir: Path, iso_port: int, metrics_port: int, rest_port: int) -> None:
    """Where a process on this machine finds the running server (tests, the demo)."""
    tmp = data_dir / "run.json.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "iso_port": iso_port, "metrics_port": metrics_port,
                               "rest_port": rest_port}))
    tmp.replace(data_dir / "run.json")


async def _own_clearing_planner(planner) -> None:
    """Clearing's planner process (started at the first file) lives as long as this task."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await planner.aclose()


async def _run_delivery(store, data_dir, config, journal, index, ledger, metrics, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The partner outbox (authsrv/notify): notifications, force-debits, reversals, after the decision."""
    from authsrv.notify.worker import run_delivery

    await run_delivery(store=store, data_dir=data_dir, config=config, journal=journal, index=index,
                       ledger=ledger, metrics=metrics, task_status=task_status)


async def _watch_partner_balances(rest_context) -> None:
    """Card payments spend deposits without passing through REST: look for low balances here."""
    from authsrv.rest.partner_balances import check_low_balances

    while True:
        await trio.sleep(PARTNER_BALANCE_CHECK_INTERVAL_S)
        try:
            await check_low_balances(rest_context)
        except Exception:  # a store hiccup must not take the switch down; the next round retries
            log.exception("partner balance check failed")


async def _collect_young(metrics) -> None:
    """Collect only what was allocated since the last freeze, then freeze it too: the ledger's
    long-lived objects would otherwise make every full collection a stall of 100+ ms."""
    while True:
        await trio.sleep(GC_FREEZE_INTERVAL_S)
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        metrics.gc_pause_seconds.observe(time.perf_counter() - started)


async def _tick(ledger, journal, metrics) -> None:
    """Advance the logged clock so holds expire while idle."""
    from ledger.types import Batch

    while True:
        await trio.sleep(TICK_INTERVAL_S)
        accepting = getattr(ledger.wal, "accepting", True)  # False: the log's disk refuses for now
        if ledger.ledger.pending_count() and accepting:
            ledger.submit(Batch(timestamp_ns=time.time_ns()))  # expiries counted by watch_expiry
        _check_open_authorizations(ledger, journal)
        metrics.holds_pending.set(ledger.ledger.pending_count())
        metrics.open_authorizations.set(journal.open_count)
        metrics.journal_records.set(len(journal))


async def _snapshot_when_due(ledger, journal, metrics, config) -> None:
    """A snapshot every `[ledger] snapshot_interval_records`, written by another process (the
    compactor, ledger.compact) while this one goes on; a task of its own, so the tick keeps its pace
    for the seconds one takes. With `compactor_follows`, that process is started once the log holds
    FOLLOW_START_SHARE of an interval (a server that never reaches a snapshot starts none) and kept
    until this task ends; one that fails is started again."""
    snapshot_interval = config.ledger.snapshot_interval_records
    follows = config.ledger.compactor_follows and getattr(ledger, "compactor", None) is not None
    last_snapshot_seq = ledger.last_seq
    try:
        while True:  # until cancelled with the server
            await trio.sleep(TICK_INTERVAL_S)
            accepting = getattr(ledger.wal, "accepting", True)  # False: the log's disk refuses for now
            since = ledger.last_seq - last_snapshot_seq
            if follows and not ledger.compactor_follows and since >= snapshot_interval * FOLLOW_START_SHARE:
                try:
                    await ledger.start_compactor()
                except OSError as error:  # cannot start a process: one compactor per snapshot instead
                    log.error("the compactor that follows the log could not start, one per snapshot instead: %s",
                              error)
                    follows = False
            if not accepting or not ledger.snapshot_due(since, snapshot_interval):
                continue
            started = time.perf_counter()
            try:
                # journal.to_snapshot is used only where the state is captured in this process (a fork,
                # or a cluster primary); a compactor rebuilds the journal from the log.
                last_snapshot_seq = await ledger.snapshot_async(journal.to_snapshot)
            except (OSError, WalUnwritableError) as error:  # a full disk: the log keeps every record
                log.error("snapshot failed, tried again after %d more records: %s", snapshot_interval, error)
                last_snapshot_seq = ledger.last_seq
            metrics.snapshot_seconds.observe(time.perf_counter() - started)
    finally:
        if follows:
            await ledger.stop_compactor()


async def _checkpoint_store(store) -> None:
    """The store's WAL copied into its database every STORE_CHECKPOINT_S, in a worker thread, so
    that no committing thread (clearing's worker, a REST handler) pays for it (Store.defer_checkpoints).
    A failure is logged and tried again; the WAL stays bounded meanwhile."""
    store.defer_checkpoints()
    failing = False
    while True:  # until cancelled with the server
        await trio.sleep(STORE_CHECKPOINT_S)
        try:
            await trio.to_thread.run_sync(store.checkpoint)
        except sqlite3.Error as error:
            if not failing:
                log.error("store checkpoint failed, trying again every %.0f s: %s", STORE_CHECKPOINT_S, error)
            failing = True
            continue
        if failing:
            log.warning("store checkpoints work again")
        failing = False


def _check_open_authorizations(ledger, journal) -> None:
    """Each open authorization names a distinct pending user hold, so the index can never outgrow
    the ledger's pending holds; a path that resolved a hold without telling the index shows here."""
    if journal.open_count > ledger.ledger.pending_count():
        log.warning("open-authorization index above the pending holds (%d > %d): pruning",
                    journal.open_count, ledger.ledger.pending_count())
        journal.prune()
    assert journal.open_count <= ledger.ledger.pending_count(), (journal.open_count, ledger.ledger.pending_count())


def _snapshot(ledger, journal, metrics) -> None:
    # Synchronous on purpose: nothing may change the ledger or the journal while they are serialized.
    # It stalls the loop for its duration (see docs/operations.md for the measured cost).
    started = time.perf_counter()
    seq = ledger.snapshot(journal.to_snapshot())
    elapsed = time.perf_counter() - started
    metrics.snapshot_seconds.observe(elapsed)
    log.info("snapshot at seq %d in %.3f s", seq, elapsed)
