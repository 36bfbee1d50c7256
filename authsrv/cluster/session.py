"""Offline commands on a cluster node: `seed`, `partner add`, `clearing ingest`, `fees run`.

On a node with `[cluster]` they write through the shard's stream, so every node (and a standby made
later with `cluster join`) sees their effects. The command becomes the shard's primary for its
duration: it takes the lease (refused while a running primary holds it: use that primary's admin
API instead), restores the shard's state, fences earlier writers with a TERM record, runs with the
replicated log (its store transactions and ledger batches are records of the stream), writes a
snapshot to the object store at the end and gives the lease back. A running standby keeps
following and applies what the command wrote.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from authsrv.cluster.node import ClusterNode, ReplicatedLedger, Snapshots, _NoMetrics
from authsrv.cluster.shard import Lease
from ledger.jetstream import StreamLog

log = logging.getLogger("authsrv.cluster")

CONNECT_TIMEOUT_S = 30.0


class ShardBusy(Exception):
    """The shard cannot be written from here now (a primary runs, NATS is unreachable, ...)."""


@contextlib.contextmanager
def shard_session(data_dir: Path, config) -> Iterator[object]:
    """An `authsrv.app.OfflineState` whose changes go through the shard's stream."""
    from authsrv.app import OfflineState, _create_missing_accounts
    from authsrv.recovery import set_ledger_bounds
    from authsrv.clearing.expiry import watch_expiry, watch_expiry_fees

    node = ClusterNode(Path(data_dir), config, _NoMetrics(), None)
    try:
        lease, state = trio.run(_begin, node)
    except BaseException:
        node.close()
        raise
    stream_log = StreamLog(node.control, stream=node.shard.names.stream, subject=node.shard.names.subject,
                           term=lease.revision, last_seq=state.seq, stream_last=state.stream_seq)
    stream_log.start_publisher()
    keeper = _LeaseKeeper(node, lease)
    try:
        state.store.replicate_to(stream_log)
        ledger = ReplicatedLedger(Path(data_dir) / "ledger", stream_log, state.ledger, snapshot_seq=state.seq,
                                  app_snapshot=b"", clock_ns=time.time_ns,
                                  snapshots=Snapshots(node, stream_log, state, lease.revision))
        set_ledger_bounds(ledger.ledger, config.ledger)
        state.journal.prune()
        ledger.journal = state.journal
        watch_expiry(ledger, state.journal)
        watch_expiry_fees(ledger, state.journal, state.index)
        _create_missing_accounts(ledger, state.store)
        offline = OfflineState(config, ledger, state.journal, state.store, state.index)
        yield offline
        if offline.changed:
            ledger.flush_sync()
            ledger.snapshot(state.journal.to_snapshot())  # a standby joined later starts from it
    finally:
        keeper.stop()
        state.store.replicate_to(None)
        stream_log.stop_publisher()
        state.close()
        try:
            node.control.run(node.shard.release_lease(keeper.lease), 10.0)
        except Exception:  # the lease expires by itself
            log.warning("cluster: could not give the lease back; it expires in %s s", config.cluster.lease_s)
        node.close()


async def _begin(node: ClusterNode):
    cluster = node.cluster
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            await node.connect()
    except trio.TooSlowError:
        raise ShardBusy(f"cannot reach NATS at {', '.join(cluster.nats)} within {CONNECT_TIMEOUT_S:.0f} s") from None
    deadline = trio.current_time() + cluster.lease_s + 2  # a dead primary's lease runs out meanwhile
    while (lease := await node._try_lease()) is None:
        if trio.current_time() > deadline:
            holder = await node.control.call(node.shard.lease_holder())
            raise ShardBusy(f"node {holder} is the primary of shard {cluster.shard}: stop it, or use its admin API")
        await trio.sleep(0.25)
    try:
        state = await node.restore()
        if state is None:
            if not node.may_start_shard():
                raise ShardBusy(f"shard {cluster.shard} has no state yet; start it from an initialised node")
            await node.start_shard()
            state = await node.restore()
        if not await node._take_over(lease, state):
            state.close()
            raise ShardBusy(f"could not become the writer of shard {cluster.shard}")
    except BaseException:
        with trio.CancelScope(shield=True):
            await node.control.call(node.shard.release_lease(lease))
        raise
    return lease, state


class _LeaseKeeper:
    """Renews the lease every lease_s / 3 while a command runs (a seed can outlast the lease)."""

    def __init__(self, node: ClusterNode, lease: Lease) -> None:
        self._node = node
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        node = self._node
        while not self._stop.wait(node.cluster.lease_s / 3):
            try:
                renewed = node.control.run(node.shard.renew_lease(self.lease), node.cluster.lease_s)
            except Exception as error:  # fencing protects the stream if another node takes over
                log.warning("cluster: lease renewal failed (%s)", type(error).__name__)
                continue
            if renewed is None:
                log.error("cluster: the lease was taken while the command ran; its writes are refused")
                return
            self.lease = renewed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
