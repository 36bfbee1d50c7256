"""A shard's NATS resources: its stream (the replicated log), its lease and its snapshots.

Names derive from the shard (`[cluster] shard`), so a second shard is only configuration:
stream `AUTHSRV_<shard>` on subject `authsrv.<shard>.log`, key-value bucket `authsrv_lease_<shard>`
(key `primary`), object store `authsrv_snap_<shard>` (object `latest`).

Everything here runs in the NATS thread (`ledger.jetstream.NatsBridge`); callers cross with
`bridge.call` (trio) or `bridge.run` (any other thread).
"""

from __future__ import annotations

import logging

import attrs
import msgspec

from ledger.jetstream import NatsBridge

log = logging.getLogger("authsrv.cluster")

LEASE_KEY = "primary"
SNAPSHOT_OBJECT = "latest"
DUPLICATE_WINDOW_S = 120.0  # a publish retried within this is stored once (Nats-Msg-Id)
SNAPSHOT_CHUNK_BYTES = 256 * 1024
ENSURE_TIMEOUT_S = 30.0


@attrs.frozen
class ShardNames:
    stream: str
    subject: str
    lease_bucket: str
    snapshot_bucket: str

    @classmethod
    def of(cls, shard: str) -> ShardNames:
        return cls(stream=f"AUTHSRV_{shard}", subject=f"authsrv.{shard}.log",
                   lease_bucket=f"authsrv_lease_{shard}", snapshot_bucket=f"authsrv_snap_{shard}")


class ClusterSnapshot(msgspec.Struct, array_like=True, frozen=True):
    """The state of a shard at a point of its log, in the object store.

    `ledger_image` (ledger + authorization journal, `DurableLedger`'s snapshot format) is the state
    after record `seq`; `store` (the SQLite file) after record `store_seq`. Records after them are
    read from stream message `stream_seq` on (earlier records in it are skipped)."""

    seq: int
    store_seq: int
    stream_seq: int
    term: int
    node: str
    ledger_image: bytes
    store: bytes


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(ClusterSnapshot)


class Lease(msgspec.Struct, frozen=True):
    node: str
    revision: int


class Shard:
    """Create-if-missing and use the shard's stream, lease bucket and object store."""

    def __init__(self, bridge: NatsBridge, *, shard: str, replicas: int, lease_s: float) -> None:
        self.bridge = bridge
        self.names = ShardNames.of(shard)
        self.replicas = replicas
        self.lease_s = lease_s
        self._kv = None
        self._objects = None

    async def ensure(self, timeout_s: float = ENSURE_TIMEOUT_S) -> None:
        """Create what is missing; retried while JetStream elects its leaders (a fresh cluster)."""
        import asyncio

        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                return await self._ensure()
            except Exception as error:  # noqa: BLE001 - nats-py: timeouts, no responders, 503s
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.info("cluster: JetStream not ready yet (%s); retrying", type(error).__name__)
                await asyncio.sleep(0.25)

    async def _ensure(self) -> None:
        from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        js = self.bridge.js
        try:
            await js.stream_info(self.names.stream)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=self.names.stream, subjects=[self.names.subject],
                                             num_replicas=self.replicas, storage=StorageType.FILE,
                                             duplicate_window=DUPLICATE_WINDOW_S))
            log.info("cluster: created stream %s (replicas %d)", self.names.stream, self.replicas)
        self._kv = await js.create_key_value(KeyValueConfig(bucket=self.names.lease_bucket, history=1,
                                                            ttl=self.lease_s, replicas=self.replicas))
        self._objects = await js.create_object_store(self.names.snapshot_bucket,
                                                     ObjectStoreConfig(replicas=self.replicas))

    # -- the lease ---------------------------------------------------------------------------------

    async def take_lease(self, node: str) -> Lease | None:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            revision = await self._kv.create(LEASE_KEY, node.encode())
        except KeyWrongLastSequenceError:
            return None
        return Lease(node, revision)

    async def renew_lease(self, lease: Lease) -> Lease | None:
        """The renewed lease, or None when it is no longer ours (someone else took it, or it
        expired: then it is taken again if free)."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            revision = await self._kv.update(LEASE_KEY, lease.node.encode(), last=lease.revision)
        except KeyWrongLastSequenceError:
            return None
        return Lease(lease.node, revision)

    async def release_lease(self, lease: Lease) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await self._kv.delete(LEASE_KEY, last=lease.revision)
        except KeyWrongLastSequenceError:
            pass

    async def lease_holder(self) -> str | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(LEASE_KEY)
        except KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    # -- the stream --------------------------------------------------------------------------------

    async def stream_bounds(self) -> tuple[int, int]:
        info = await self.bridge.js.stream_info(self.names.stream)
        return info.state.first_seq, info.state.last_seq

    async def trim_before(self, stream_seq: int) -> None:
        """Drop the stream's messages before `stream_seq` (a snapshot covers them)."""
        if stream_seq > 1:
            await self.bridge.js.purge_stream(self.names.stream, seq=stream_seq)

    # -- snapshots ---------------------------------------------------------------------------------

    async def put_snapshot(self, snapshot: ClusterSnapshot) -> int:
        payload = _snapshot_encoder.encode(snapshot)
        from nats.js.api import ObjectMeta, ObjectMetaOptions

        meta = ObjectMeta(name=SNAPSHOT_OBJECT, options=ObjectMetaOptions(max_chunk_size=SNAPSHOT_CHUNK_BYTES))
        await self._objects.put(SNAPSHOT_OBJECT, payload, meta=meta)
        return len(payload)

    async def get_snapshot(self) -> ClusterSnapshot | None:
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        try:
            result = await self._objects.get(SNAPSHOT_OBJECT)
        except (ObjectNotFoundError, NotFoundError):
            return None
        return _snapshot_decoder.decode(result.data)
