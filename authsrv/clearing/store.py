"""Clearing's own rows in the management store (`clearing_files`, `clearing_records`).

A file row says a file was seen (and, once `applied_at` is set, finished, with its summary). A
record row says a record was planned, with the exact ledger transfers it submits, so a re-run after
a crash resubmits the same transfers (the ledger answers `exists` for those it already has) instead
of planning again against a state that already contains them.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from authsrv.clearing.cleared import ClearedTransaction, ForcedTransaction, event_kind
from authsrv.clearing.records import legacy_identity
from authsrv.store.db import Store, utc_now_iso
from ledger.types import TransferSpec

QUERY_IDENTITIES_MAX = 500  # bound on SQL parameters per lookup (SQLite allows 32766)


class RecordState:
    planned = "planned"  # rows written, ledger batch submitted or about to be
    applied = "applied"  # the batch is durable
    failed = "failed"  # the ledger refused the record's chain (reported; never retried blindly)


class PlanRow(msgspec.Struct, frozen=True, rename="camel", gc=False):
    """What the summary needs of a record applied earlier (a resumed run counts it again)."""

    outcome: str
    currency: str
    cleared: int
    released: int
    refunded: int
    referenced: bool
    hold_id: int
    masked_pan: str
    cleared_event: ClearedTransaction | None = None  # written when the row becomes applied (cleared.py)
    # Rows planned before these fields existed decode with the defaults.
    forced_event: ForcedTransaction | None = None  # an external card's forced post or refund (cleared.py)
    fee_refunded: int = 0  # the transaction fee's share given back with a release (plan.py)

    @property
    def event(self) -> ClearedTransaction | ForcedTransaction | None:
        """The partner event this row writes once applied (at most one of the two is set)."""
        assert self.cleared_event is None or self.forced_event is None
        return self.cleared_event or self.forced_event


class RecordRow(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A clearing record's row (a msgspec Struct: it crosses the pipe from the planner process)."""

    identity: str
    file_sha256: str
    record_id: str
    line: int
    state: str
    transfers: tuple[TransferSpec, ...]
    plan: PlanRow


_transfers_encoder = msgspec.msgpack.Encoder()
_transfers_decoder = msgspec.msgpack.Decoder(tuple[TransferSpec, ...])
_plan_decoder = msgspec.json.Decoder(PlanRow)


class ClearingStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    def file_summary(self, sha256: str) -> bytes | None:
        """The summary JSON of a file applied to the end, None if never finished."""
        with self._store.locked():
            found = self._store.db.execute(
                "SELECT summary_json FROM clearing_files WHERE sha256 = ? AND applied_at != ''", (sha256,)
            ).fetchone()
        return found[0].encode() if found else None

    def begin_file(self, sha256: str, name: str) -> None:
        with self._store.transaction():
            self._store.db.execute(
                "INSERT OR IGNORE INTO clearing_files (sha256, name, received_at) VALUES (?, ?, ?)",
                (sha256, name[:255], utc_now_iso()),
            )

    def finish_file(self, sha256: str, summary_json: bytes) -> None:
        with self._store.transaction():
            updated = self._store.db.execute(
                "UPDATE clearing_files SET applied_at = ?, summary_json = ? WHERE sha256 = ?",
                (utc_now_iso(), summary_json.decode(), sha256),
            ).rowcount
            assert updated == 1, sha256

    def records(self, identities: list[str]) -> dict[str, RecordRow]:
        """The rows of these identities that the store has, by identity.

        In a store that also holds rows written before identities began with the RRN
        (Store.clearing_digest_identities), an identity not found is looked up by its digest
        alone, and a row found that way is given the new identity (in the caller's transaction
        when there is one), so the rest of the run, a resumed one included, knows it by that."""
        assert len(identities) <= QUERY_IDENTITIES_MAX
        if not identities:
            return {}
        found = self._select(identities)
        missing = [identity for identity in identities if identity not in found]
        if missing and self._store.clearing_digest_identities:
            by_digest = {legacy_identity(identity): identity for identity in missing}
            older = self._select(list(by_digest))
            if older:
                with self._store.transaction():
                    self._store.db.conn.executemany("UPDATE clearing_records SET identity = ? WHERE identity = ?",
                                                    [(by_digest[digest], digest) for digest in older])
                for digest, row in older.items():
                    found[by_digest[digest]] = msgspec.structs.replace(row, identity=by_digest[digest])
        return found

    def _select(self, identities: list[str]) -> dict[str, RecordRow]:
        marks = ",".join("?" * len(identities))
        with self._store.locked():
            rows = self._store.db.execute(
                "SELECT identity, file_sha256, record_id, line, state, transfers, plan_json FROM clearing_records"
                f" WHERE identity IN ({marks})", identities,
            ).fetchall()
        return {row[0]: RecordRow(row[0], row[1], row[2], row[3], row[4], _transfers_decoder.decode(row[5]),
                                  _plan_decoder.decode(row[6])) for row in rows}

    def allocate_and_insert(self, count: int, build) -> list[RecordRow]:
        """In one transaction: reserve `count` transfer ids, let `build(ids)` make the rows, store them.

        The rows (with the transfers they will submit) are on disk before the caller submits."""
        with self._store.transaction():
            ids = self._store.allocate_transfer_ids(count) if count else range(0)
            rows: list[RecordRow] = build(iter(ids))
            created = utc_now_iso()
            self._store.db.conn.executemany(
                "INSERT INTO clearing_records (identity, file_sha256, record_id, line, outcome, state, transfers,"
                " plan_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(row.identity, row.file_sha256, row.record_id, row.line, row.plan.outcome, row.state,
                  _transfers_encoder.encode(row.transfers), msgspec.json.encode(row.plan).decode(), created)
                 for row in rows],
            )
        return rows

    def replan(self, count: int, build) -> list[RecordRow]:
        """In one transaction: reserve `count` transfer ids, let `build(ids)` make the new rows of
        records planned but never submitted (their plan went stale before it could apply), and
        replace each one's transfers and plan. Only a `planned` row is replaced; the ids it held
        were never submitted, so they are simply never used."""
        with self._store.transaction():
            ids = self._store.allocate_transfer_ids(count) if count else range(0)
            rows: list[RecordRow] = build(iter(ids))
            for row in rows:  # bounded: one chunk's records
                updated = self._store.db.execute(
                    "UPDATE clearing_records SET outcome = ?, transfers = ?, plan_json = ?"
                    " WHERE identity = ? AND file_sha256 = ? AND state = ?",
                    (row.plan.outcome, _transfers_encoder.encode(row.transfers),
                     msgspec.json.encode(row.plan).decode(), row.identity, row.file_sha256, RecordState.planned),
                ).rowcount
                assert updated == 1, row.identity
        return rows

    def mark_applied(self, identities: list[str], events: dict[str, ClearedTransaction | ForcedTransaction],
                     pause: Callable[[], None] | None = None) -> tuple[int, int]:
        """In one transaction: planned rows become applied, and each row that moves writes its
        `transaction.cleared` or `transaction.forced` event. A row already applied (a concurrent
        or later run) moves not, so its event is never written twice. Returns the events written
        (cleared, forced). One UPDATE per QUERY_IDENTITIES_MAX rows and one insert for the events
        (a statement per row cost the worker a third of its GIL time); `pause` runs between them
        and before each event."""
        assert set(events) <= set(identities)
        with self._store.transaction():
            moved: set[str] = set()
            for start in range(0, len(identities), QUERY_IDENTITIES_MAX):  # bounded: one chunk's records
                part = identities[start:start + QUERY_IDENTITIES_MAX]
                marks = ",".join("?" * len(part))
                moved.update(row[0] for row in self._store.db.execute(
                    f"UPDATE clearing_records SET state = ? WHERE state = ? AND identity IN ({marks})"
                    " RETURNING identity", (RecordState.applied, RecordState.planned, *part)).fetchall())
                if pause is not None:
                    pause()
            written = [events[identity] for identity in identities if identity in moved and identity in events]
            self._store.append_events([(event.partner, event_kind(event), f"transaction:{event.transaction_id}",
                                        event) for event in written], pause)
        forced = sum(isinstance(event, ForcedTransaction) for event in written)
        return len(written) - forced, forced

    def set_state(self, identities: list[str], state: str) -> None:
        if not identities:
            return
        with self._store.transaction():
            self._store.db.conn.executemany(
                "UPDATE clearing_records SET state = ? WHERE identity = ?", [(state, i) for i in identities]
            )
