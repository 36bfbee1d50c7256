"""`authsrv serve` on a node with `[cluster]`: standby, takeover, primary, step-down.

    restore ──► standby ──(lease taken)──► catch up ──► TERM record ──► primary ──(lease lost,
      ▲   (snapshot + stream)   applies the stream as it grows            fenced)──┐
      └──────────────────────────────────────────────────────────────────────────────┘

- **Restore.** A node rebuilds its state from the shard's newest snapshot in the object store
  (ledger, journal and the SQLite store at a known log position) and then the stream after it. Its
  local files are a cache of that; a deposed primary, whose memory and store may hold records the
  stream refused, always starts again from here.
- **Standby.** Applies every record as it arrives: ledger batches to the in-memory ledger and the
  journal, store changes to SQLite and the card index. It does not listen on the ISO port; its REST
  port answers 503 `NOT_PRIMARY`; `/readyz` is 503.
- **Takeover.** The standby that creates the lease key (a key-value bucket with a TTL of `lease_s`)
  applies the stream to its end, then appends a TERM record with the stream's last sequence as the
  expected one: from then on every publish of an earlier primary is refused by the stream itself.
  Only then does it open the ISO port.
- **Primary.** The switch as on a single node, with `ledger.jetstream.StreamLog` as the log: an
  answer that moves money, and every store change, waits for the stream's acknowledgement. The
  lease is renewed every lease_s / 3; a refused renewal or a refused publish (fencing) ends the
  primary term: what could not be committed is answered 91 and the node restores as a standby.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from functools import partial
from pathlib import Path

import msgspec
import trio

from authsrv.clearing.expiry import ObservedLedger
from authsrv.cluster.metrics import ClusterMetrics
from authsrv.cluster.shard import ClusterSnapshot, Lease, Shard
from ledger.durable import _SnapshotImage, decode_batch, decode_snapshot
from ledger.jetstream import KIND_LEDGER, LogClosedError, KIND_STORE, KIND_TERM, FrameReader, NatsBridge, StreamFollower, StreamLog
from ledger.types import Batch

log = logging.getLogger("authsrv.cluster")

CONNECT_RETRY_S = 1.0
TRANSIENT_RETRY_S = 1.0


def _transient_errors() -> tuple[type[BaseException], ...]:
    import nats.errors

    return (nats.errors.Error, TimeoutError, OSError)


# What NATS raises while servers restart or elect leaders: the node starts over from a snapshot.
TRANSIENT = _transient_errors()
FOLLOW_WAIT_S = 0.2
TERM_COMMIT_TIMEOUT_S = 5.0
VERIFY_ATTEMPTS = 10
VERIFY_CONNECT_S = 20.0
SNAPSHOT_INTERVAL_S = 60.0  # a primary with new records snapshots at least this often
JOINED_MARKER = "cluster-joined"  # a `cluster join` directory: it never starts a shard's history


class TermRecord(msgspec.Struct, array_like=True, frozen=True):
    node: str
    term: int


_term_encoder = msgspec.msgpack.Encoder()


# --------------------------------------------------------------------------------- node state


class NodeState:
    """A node's state at log record `seq`: ledger, journal, store and card index."""

    def __init__(self, data_dir: Path, config, snapshot: ClusterSnapshot) -> None:
        from authsrv.recovery import hold_pending, new_journal
        from authsrv.store.db import Store
        from authsrv.store.index import load_index

        self.data_dir = data_dir
        install_store_image(data_dir, snapshot.store)
        self.ledger, app_image = decode_snapshot(snapshot.ledger_image)
        self.journal = new_journal(config)
        self.journal.hold_open = hold_pending(self.ledger)
        self.journal.load_snapshot(app_image)
        self.store = Store.open(data_dir)
        self.index = load_index(self.store)
        self.ledger_seq = snapshot.seq
        self.store_seq = snapshot.store_seq
        self.seq = min(snapshot.seq, snapshot.store_seq)  # every record up to here is applied
        self.stream_seq = snapshot.stream_seq - 1  # the last stream message read
        self.term = snapshot.term
        self._reader = FrameReader()
        self._batches = msgspec.msgpack.Decoder(Batch)

    def feed(self, stream_seq: int, body: bytes) -> int:
        """Apply one stream message's records; return how many were applied."""
        from authsrv.store.replica import decode_change

        applied = 0
        for record in self._reader.feed(body, stream_seq):
            if record.seq <= self.seq:
                continue
            assert record.seq == self.seq + 1, (record.seq, self.seq)
            if record.kind == KIND_LEDGER:
                if record.seq > self.ledger_seq:
                    batch = decode_batch(self._batches, record.payload)
                    self.ledger.apply(batch)
                    if batch.app:
                        self.journal.on_app(record.seq, batch.app)
            elif record.kind == KIND_STORE:
                if record.seq > self.store_seq:
                    self.store.apply_change(decode_change(record.payload))
            elif record.kind == KIND_TERM:
                self.term = msgspec.msgpack.decode(record.payload, type=TermRecord).term
            else:
                raise AssertionError(f"unknown record kind {record.kind} at seq {record.seq}")
            self.seq = record.seq
            applied += 1
        self.stream_seq = stream_seq
        return applied

    def close(self) -> None:
        self.store.close()


def install_store_image(data_dir: Path, image: bytes) -> None:
    """Replace DIR/store.db with a snapshot's copy (0600, fsync'd)."""
    path = data_dir / "store.db"
    tmp = data_dir / "store.db.restore"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
        file.write(image)
        file.flush()
        os.fsync(file.fileno())
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    tmp.replace(path)


def store_image(store) -> bytes:
    """A consistent copy of the SQLite file (the caller holds the store's lock)."""
    copy = sqlite3.connect(":memory:")
    try:
        store.db.conn._conn.backup(copy)
        return copy.serialize()
    finally:
        copy.close()


def local_genesis(data_dir: Path, config) -> ClusterSnapshot:
    """The first snapshot of a shard, from a node's local state (`init`, `seed` before [cluster])."""
    from authsrv.app import open_ledger_and_journal
    from authsrv.store.db import Store

    ledger, journal = open_ledger_and_journal(data_dir, config)
    try:
        image = msgspec.msgpack.encode(_SnapshotImage(ledger.ledger.to_snapshot(), journal.to_snapshot()))
        seq = ledger.last_seq
    finally:
        ledger.close()
    with Store.open(data_dir) as store, store.locked():
        database = store_image(store)
    return ClusterSnapshot(seq=seq, store_seq=seq, stream_seq=0, term=0, node="", ledger_image=image, store=database)


# --------------------------------------------------------------------------------- the node


class ClusterNode:
    def __init__(self, data_dir: Path, config, metrics, http) -> None:
        self.data_dir = data_dir
        self.config = config
        self.cluster = config.cluster
        self.name = self.cluster.node
        self.metrics = metrics
        self.cluster_metrics = ClusterMetrics(metrics.registry, self.cluster.shard)
        self.http = http
        self.control: NatsBridge | None = None  # publishes and the lease
        self.bulk: NatsBridge | None = None  # snapshots and reading the stream
        self.shard: Shard | None = None
        self.bulk_shard: Shard | None = None

    # -- connections ---------------------------------------------------------------------------

    async def connect(self) -> None:
        self.control = NatsBridge(self.cluster.nats, name=f"{self.name}-control")
        self.bulk = NatsBridge(self.cluster.nats, name=f"{self.name}-bulk")
        for bridge in (self.control, self.bulk):
            while True:
                try:
                    await trio.to_thread.run_sync(bridge.connect)
                    break
                except Exception as error:  # no server reachable yet: keep trying (the operator sees it)
                    log.warning("cluster: cannot reach NATS %s (%s); retrying", ",".join(self.cluster.nats), error)
                    await trio.sleep(CONNECT_RETRY_S)
        options = {"shard": self.cluster.shard, "replicas": self.cluster.replicas, "lease_s": self.cluster.lease_s}
        self.shard = Shard(self.control, **options)
        self.bulk_shard = Shard(self.bulk, **options)
        await self.control.call(self.shard.ensure())
        await self.bulk.call(self.bulk_shard.ensure())

    def close(self) -> None:
        for bridge in (self.control, self.bulk):
            if bridge is not None:
                bridge.close()

    # -- restore and follow --------------------------------------------------------------------

    async def restore(self) -> NodeState | None:
        """The newest snapshot, applied; None when the shard has none yet."""
        snapshot = await self.bulk.call(self.bulk_shard.get_snapshot())
        if snapshot is None:
            return None
        started = time.perf_counter()
        state = await trio.to_thread.run_sync(NodeState, self.data_dir, self.config, snapshot)
        log.info("cluster: restored the snapshot at seq %d (store at %d, stream from %d) in %.2f s",
                 snapshot.seq, snapshot.store_seq, snapshot.stream_seq, time.perf_counter() - started)
        return state

    async def follow(self, state: NodeState, *, until_stream_seq: int | None = None,
                     stop: trio.Event | None = None, want_lease: bool = False) -> Lease | None:
        """Apply the stream as it grows. Returns once `until_stream_seq` is applied, or (with
        want_lease) once this node took the lease, or when `stop` is set."""
        follower = StreamFollower(self.bulk, stream=self.shard.names.stream, subject=self.shard.names.subject,
                                  start=state.stream_seq + 1)
        await self.bulk.call(follower.open())
        next_lease_try = 0.0
        try:
            while stop is None or not stop.is_set():
                if until_stream_seq is not None and state.stream_seq >= until_stream_seq:
                    return None
                if want_lease and time.monotonic() >= next_lease_try:
                    next_lease_try = time.monotonic() + min(0.25, self.cluster.lease_s / 8)
                    lease = await self._try_lease()
                    if lease is not None:
                        return lease
                batch = await self.bulk.call(follower.next_batch(FOLLOW_WAIT_S))
                for stream_seq, body in batch:
                    state.feed(stream_seq, body)
                self._observe_lag(state, follower)
            return None
        finally:
            with trio.CancelScope(shield=True):
                await self.bulk.call(follower.close())

    async def _try_lease(self) -> Lease | None:
        try:
            return await self.control.call(self.shard.take_lease(self.name))
        except Exception as error:  # NATS unreachable: a standby keeps following and trying
            log.debug("cluster: lease attempt failed: %s", error)
            return None

    def _observe_lag(self, state: NodeState, follower: StreamFollower) -> None:
        metrics = self.cluster_metrics
        metrics.applied_seq.set(state.seq)
        metrics.lag_records.set(follower.behind)
        metrics.lag_seconds.set(max(0.0, time.time() - follower.behind_since) if follower.behind else 0.0)

    # -- the whole life of a node --------------------------------------------------------------

    async def run(self, ports: dict[str, int], stop: trio.Event, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from authsrv.rest.server import serve_rest

        self.http.start()
        started = False
        try:
            await self.connect()
            while not stop.is_set():
                standby_stop, standby_stopped = trio.Event(), trio.Event()
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(serve_rest, not_primary_app, host=self.config.server.host,
                                                port=ports["rest"], pki_dir=self.data_dir / "pki",
                                                shutdown=standby_stop, stopped=standby_stopped))
                    if not started:
                        task_status.started({"role": "standby"})
                        started = True
                    try:
                        promoted = await self._standby(stop)
                    except TRANSIENT as error:  # NATS restarting, a leader election: start over
                        self._transient("standby", error)
                        promoted = False
                    finally:
                        standby_stop.set()
                        with trio.CancelScope(shield=True):
                            await standby_stopped.wait()
                if promoted is None:
                    break
                if promoted is False:
                    await trio.sleep(TRANSIENT_RETRY_S)
                    continue
                lease, state = promoted
                try:
                    await self._primary(lease, state, ports, stop)
                except TRANSIENT as error:  # e.g. NATS gone while taking over: a standby again
                    self._transient("primary", error)
        finally:
            self.http.ready = False
            self.metrics.ready.set(0)
            self.cluster_metrics.primary.set(0)
            self.close()
            self.http.close()

    def _transient(self, role: str, error: BaseException) -> None:
        log.warning("cluster: %s interrupted by NATS (%s: %s); restoring again", role, type(error).__name__, error)

    async def _standby(self, stop: trio.Event) -> tuple[Lease, NodeState] | None:
        """Restore, follow and try for the lease; (lease, caught-up state) once promoted."""
        self.cluster_metrics.primary.set(0)
        self.http.ready = False
        self.metrics.ready.set(0)
        while not stop.is_set():
            state = await self.restore()
            if state is None:
                genesis = await self._genesis_if_allowed(stop)
                if genesis is None:
                    return None
                continue
            try:
                log.info("cluster: node %s is a standby of shard %s (seq %d)", self.name, self.cluster.shard, state.seq)
                while not stop.is_set():
                    lease = await self.follow(state, stop=stop, want_lease=True)
                    if lease is None:
                        break
                    if await self._take_over(lease, state):
                        return lease, state
                    await self.control.call(self.shard.release_lease(lease))
            except BaseException:
                state.close()
                raise
            state.close()
        return None

    async def _genesis_if_allowed(self, stop: trio.Event) -> bool | None:
        """No snapshot yet: a node with local state (not made by `cluster join`) starts the
        shard's history with it; the others wait for one. None when stopped."""
        waited = False
        while not stop.is_set():
            if self.may_start_shard():
                lease = await self._try_lease()
                if lease is not None:
                    try:
                        await self.start_shard()
                    finally:
                        await self.control.call(self.shard.release_lease(lease))
                    return True
            elif await self.bulk.call(self.bulk_shard.get_snapshot()) is not None:
                return True
            if not waited:
                log.info("cluster: waiting for shard %s's first snapshot", self.cluster.shard)
                waited = True
            await trio.sleep(min(1.0, self.cluster.lease_s / 3))
        return None

    def may_start_shard(self) -> bool:
        """An initialised directory (not one made by `cluster join`) may start a shard's history."""
        return (self.data_dir / "store.db").exists() and not (self.data_dir / JOINED_MARKER).exists()

    async def start_shard(self) -> None:
        """With the lease held: if the shard has no snapshot yet, this node's local state is its first."""
        if await self.bulk.call(self.bulk_shard.get_snapshot()) is not None:
            return
        genesis = await trio.to_thread.run_sync(local_genesis, self.data_dir, self.config)
        _, last = await self.bulk.call(self.bulk_shard.stream_bounds())
        genesis = msgspec.structs.replace(genesis, stream_seq=last + 1, node=self.name)
        size = await self.bulk.call(self.bulk_shard.put_snapshot(genesis))
        log.info("cluster: shard %s starts from this node's local state (seq %d, %d bytes)",
                 self.cluster.shard, genesis.seq, size)

    async def _take_over(self, lease: Lease, state: NodeState) -> bool:
        """Apply the stream to its end, then fence earlier writers with a TERM record."""
        for _ in range(5):
            _, last = await self.control.call(self.shard.stream_bounds())
            await self.follow(state, until_stream_seq=last)
            term_log = StreamLog(self.control, stream=self.shard.names.stream, subject=self.shard.names.subject,
                                 term=lease.revision, last_seq=state.seq, stream_last=state.stream_seq)
            term_log.start_publisher()
            try:
                seq = term_log.append(_term_encoder.encode(TermRecord(self.name, lease.revision)), KIND_TERM)
                with trio.move_on_after(TERM_COMMIT_TIMEOUT_S):
                    try:
                        await term_log.wait_durable(seq)
                    except Exception as error:  # fenced: a late write of the old primary; read it, retry
                        log.info("cluster: takeover raced a late write (%s); catching up again", error)
                        continue
                    state.seq, state.stream_seq, state.term = seq, term_log.stream_last, lease.revision
                    return True
                log.warning("cluster: the TERM record was not acknowledged within %s s", TERM_COMMIT_TIMEOUT_S)
                return False
            finally:
                term_log.stop_publisher()
        return False

    # -- primary -------------------------------------------------------------------------------

    async def _primary(self, lease: Lease, state: NodeState, ports: dict[str, int], stop: trio.Event) -> None:
        from authsrv.app import become_primary, run_services

        lost = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def fenced(error: BaseException) -> None:  # from the NATS thread
            if not isinstance(error, LogClosedError):
                self.cluster_metrics.fencing_refusals.inc()
                try:
                    token.run_sync_soon(lost.set)
                except trio.RunFinishedError:
                    pass

        stream_log = StreamLog(self.control, stream=self.shard.names.stream, subject=self.shard.names.subject,
                               term=lease.revision, last_seq=state.seq, stream_last=state.stream_seq,
                               on_commit=self.cluster_metrics.on_commit, on_fenced=fenced)
        stream_log.start_publisher()
        self.cluster_metrics.takeovers.inc()
        self.cluster_metrics.primary.set(1)
        log.info("cluster: node %s is the primary of shard %s (term %d, seq %d)", self.name, self.cluster.shard,
                 lease.revision, state.seq)
        snapshots = Snapshots(self, stream_log, state, lease.revision)
        self._log = stream_log
        either = trio.Event()
        try:
            ledger = become_primary(self.data_dir, self.config, self.metrics, state, stream_log, snapshots)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, lease, lost)
                nursery.start_soon(_either, stop, lost, either)
                try:
                    await run_services(self.data_dir, self.config, ports, self.metrics, self.http, either, ledger,
                                       state.journal, state.store, state.index, lost=lost)
                except BaseException:
                    if stream_log.failed is None or isinstance(stream_log.failed, LogClosedError):
                        raise
                    # Deposed: a task met the refusing log before `lost` was seen. The state is given
                    # up either way; the node restores as a standby.
                    log.info("cluster: primary services ended by the fenced log", exc_info=True)
                    lost.set()
                if not lost.is_set():
                    with trio.move_on_after(self.cluster.lease_s):
                        await self.control.call(self.shard.release_lease(self._lease))
                nursery.cancel_scope.cancel()
        finally:
            self.cluster_metrics.primary.set(0)
            self.http.ready = False
            self.metrics.ready.set(0)
            state.store.replicate_to(None)
            stream_log.stop_publisher()
            state.close()
        if lost.is_set():
            log.warning("cluster: node %s is no longer the primary of shard %s: stepping down", self.name,
                        self.cluster.shard)

    async def _keep_lease(self, lease: Lease, lost: trio.Event) -> None:
        self._lease = lease
        renewed_at = time.monotonic()
        interval = self.cluster.lease_s / 3
        while not lost.is_set():
            await trio.sleep(interval)
            try:
                with trio.fail_after(interval):
                    renewed = await self.control.call(self.shard.renew_lease(self._lease))
            except Exception as error:  # NATS unreachable: fencing decides if another node takes over
                log.warning("cluster: lease renewal failed (%s)", type(error).__name__)
                self.cluster_metrics.lease_age.set(time.monotonic() - renewed_at)
                continue
            if renewed is None:
                log.warning("cluster: the lease of shard %s was taken or expired", self.cluster.shard)
                lost.set()
                return
            self._lease = renewed
            renewed_at = time.monotonic()
            self.cluster_metrics.lease_age.set(0)
            self.cluster_metrics.applied_seq.set(self._log.durable_seq)


async def _either(first: trio.Event, second: trio.Event, either: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        async def wait(event: trio.Event) -> None:
            await event.wait()
            either.set()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, first)
        nursery.start_soon(wait, second)


class SnapshotUploadError(OSError):
    """NATS did not take the snapshot; the stream keeps every record, the next interval tries again."""


class Snapshots:
    """A primary's snapshots: the state goes to the object store, the stream is trimmed behind it."""

    def __init__(self, node: ClusterNode, stream_log: StreamLog, state: NodeState, term: int) -> None:
        self.node = node
        self.log = stream_log
        self.state = state
        self.term = term
        self.last_at = time.monotonic()

    def due(self, records_since: int, interval_records: int) -> bool:
        return records_since >= interval_records or (
            records_since > 0 and time.monotonic() - self.last_at >= SNAPSHOT_INTERVAL_S)

    def write(self, seq: int, ledger_image: bytes) -> int:
        """Worker thread: the store's copy, then upload, then trim; returns the snapshot's size."""
        store = self.state.store
        with store.locked():  # every store change appended so far is in this copy, none after
            store_seq = self.log.last_seq
            database = store_image(store)
        self.log.wait_durable_sync(max(seq, store_seq), 30.0)
        stream_seq = self.log.stream_seq_for(min(seq, store_seq))
        snapshot = ClusterSnapshot(seq=seq, store_seq=store_seq, stream_seq=stream_seq, term=self.term,
                                   node=self.node.name, ledger_image=ledger_image, store=database)
        bulk, shard = self.node.bulk, self.node.bulk_shard
        try:
            size = bulk.run(shard.put_snapshot(snapshot), 120.0)
            bulk.run(shard.trim_before(stream_seq), 30.0)
        except TRANSIENT as error:  # the caller tries again later (as after a full disk)
            raise SnapshotUploadError(f"snapshot at seq {seq} not written to the object store: "
                                      f"{type(error).__name__}: {error}") from error
        self.last_at = time.monotonic()
        self.node.cluster_metrics.snapshots.inc()
        self.node.cluster_metrics.snapshot_bytes.set(size)
        log.info("cluster: snapshot at seq %d (store %d) in the object store, %d bytes; stream kept from %d",
                 seq, store_seq, size, stream_seq)
        return size


# --------------------------------------------------------------------------------- NOT_PRIMARY


async def not_primary_app(scope, receive, send) -> None:
    """The REST port of a standby: every request 503 problem+json NOT_PRIMARY."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = msgspec.json.encode({"type": "about:blank", "title": "NOT_PRIMARY", "status": 503,
                                "detail": "this node is a standby; send requests to the shard's primary"})
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------- the primary's ledger


class ReplicatedLedger(ObservedLedger):
    """The switch's ledger on a cluster primary: the log is the shard's stream, snapshots go to the
    object store (and the stream is trimmed behind them)."""

    FORK_SNAPSHOTS = False  # the upload needs this process's NATS connection

    def __init__(self, *args, snapshots: Snapshots, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._snapshots = snapshots

    def snapshot_due(self, records_since: int, interval_records: int) -> bool:
        return self._snapshots.due(records_since, interval_records)

    def _store_snapshot(self, seq: int, payload: bytes) -> None:
        """DurableLedger.snapshot(_async) captured the state at `seq` (durable): to the object store."""
        self._snapshots.write(seq, payload)
        self.snapshot_seq = seq

    def close(self) -> None:
        """The node stops the log's publisher."""


# --------------------------------------------------------------------------------- ledger verify


def verify_shard(data_dir: Path, config):
    """`authsrv ledger verify` on a cluster node: rebuild the shard's state as a takeover would
    (newest snapshot + the stream to its end, read-only) and check every ledger invariant."""
    import tempfile

    from ledger.state import LedgerInvariantError
    from ledger.verify import VerifyReport, totals_json

    async def rebuild(scratch: Path) -> VerifyReport:
        node = ClusterNode(scratch, config, _NoMetrics(), None)
        try:
            with trio.move_on_after(VERIFY_CONNECT_S) as connecting:
                await node.connect()
            if connecting.cancelled_caught:
                return VerifyReport(ok=False, problems=[f"cannot reach NATS at {', '.join(config.cluster.nats)}"
                                                        f" within {VERIFY_CONNECT_S:g} s: the shard's state lives there"],
                                    directory=f"shard {config.cluster.shard}")
            snapshot = await node.bulk.call(node.bulk_shard.get_snapshot())
            if snapshot is None:
                return VerifyReport(ok=False, problems=[f"shard {config.cluster.shard} has no snapshot yet"],
                                    directory=f"shard {config.cluster.shard}")
            state = await trio.to_thread.run_sync(NodeState, scratch, config, snapshot)
            try:
                _, last = await node.control.call(node.shard.stream_bounds())
                await node.follow(state, until_stream_seq=last)
                problems = []
                try:
                    state.ledger.check_invariants()
                except LedgerInvariantError as error:
                    problems.append(f"invariant broken: {error}")
                return VerifyReport(ok=not problems, problems=problems,
                                    directory=f"shard {config.cluster.shard} ({', '.join(config.cluster.nats)})",
                                    last_seq=state.seq, snapshot_seq=snapshot.seq, log_first_seq=snapshot.seq + 1,
                                    digest=state.ledger.digest(),
                                    cross_check=f"rebuilt from the shard's snapshot at seq {snapshot.seq} and "
                                                f"the stream to message {state.stream_seq}",
                                    pending_holds=state.ledger.pending_count(), totals=totals_json(state.ledger))
            finally:
                state.close()
        finally:
            node.close()

    for attempt in range(VERIFY_ATTEMPTS):
        with tempfile.TemporaryDirectory(prefix="authsrv-verify-", dir=data_dir) as scratch:
            try:
                return trio.run(rebuild, Path(scratch))
            except TRANSIENT as error:  # NATS restarting or electing: the rebuild is read-only, again
                if attempt == VERIFY_ATTEMPTS - 1:
                    return VerifyReport(ok=False, problems=[f"NATS did not answer: {type(error).__name__}: {error}"],
                                        directory=f"shard {config.cluster.shard}")
                time.sleep(TRANSIENT_RETRY_S)
    raise AssertionError("unreachable")


class _NoMetrics:
    """Metrics of a command that serves none."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
