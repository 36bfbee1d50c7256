"""The cluster's metrics, labelled by shard (docs/operations.md, "Running a cluster")."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PUBLISH_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ClusterMetrics:
    def __init__(self, registry: CollectorRegistry, shard: str) -> None:
        r = registry
        self.primary = Gauge("authsrv_cluster_primary", "1 on the shard's primary, 0 on a standby",
                             ["shard"], registry=r).labels(shard)
        self.lease_age = Gauge("authsrv_cluster_lease_age_seconds",
                               "Primary: seconds since the lease was last renewed (above lease_s: it may be lost)",
                               ["shard"], registry=r).labels(shard)
        self.lag_records = Gauge("authsrv_cluster_replication_lag_records",
                                 "Standby: stream messages not yet applied", ["shard"], registry=r).labels(shard)
        self.lag_seconds = Gauge("authsrv_cluster_replication_lag_seconds",
                                 "Standby: seconds since it was last caught up with the stream (0: caught up)",
                                 ["shard"], registry=r).labels(shard)
        self.applied_seq = Gauge("authsrv_cluster_applied_seq", "Last log record applied (standby) or appended (primary)",
                                 ["shard"], registry=r).labels(shard)
        self.publish_seconds = Histogram("authsrv_cluster_publish_seconds",
                                         "One group commit: publish to the stream until acknowledged by the replicas",
                                         ["shard"], buckets=PUBLISH_BUCKETS_S, registry=r).labels(shard)
        self.publish_records = Histogram("authsrv_cluster_publish_records", "Records per group commit",
                                         ["shard"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096),
                                         registry=r).labels(shard)
        self.fencing_refusals = Counter("authsrv_cluster_fencing_refusals",
                                        "Publishes refused by the stream because another node wrote (this node was deposed)",
                                        ["shard"], registry=r).labels(shard)
        self.takeovers = Counter("authsrv_cluster_takeovers", "Times this node became primary",
                                 ["shard"], registry=r).labels(shard)
        self.publish_retries = Counter("authsrv_cluster_publish_retries",
                                       "Publishes sent again after a timeout or a lost connection",
                                       ["shard"], registry=r).labels(shard)
        self.snapshots = Counter("authsrv_cluster_snapshots", "Snapshots written to the object store",
                                 ["shard"], registry=r).labels(shard)
        self.snapshot_bytes = Gauge("authsrv_cluster_snapshot_bytes", "Size of the newest snapshot written",
                                    ["shard"], registry=r).labels(shard)

    def on_commit(self, records: int, size_bytes: int, seconds: float) -> None:
        del size_bytes
        self.publish_records.observe(records)
        self.publish_seconds.observe(seconds)
