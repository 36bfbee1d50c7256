"""Store changes as log records: how a standby's SQLite and card index follow the primary's.

On a cluster primary every store transaction is recorded statement by statement (with its bound
parameters) by `RecordingConnection`; at commit the statements, the index refreshes they imply and
any files they wrote (KYC images) become one `StoreChange` record in the replicated log, appended
under the store's write lock, so log order is commit order. A standby applies the record with the
same statements in one transaction, then the same index refreshes: its store and card index equal
the primary's at the same log sequence.

Replaying statements is deterministic because the store never asks SQLite for a value it did not
choose itself: ids (`MAX(id) + 1` read inside the transaction), times and random keys are computed
in Python and bound as parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

# Statements that change the database (or structure a transaction's savepoints). Reads, PRAGMAs,
# BEGIN/COMMIT/ROLLBACK (the store's own transaction) are not recorded.
_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE|SAVEPOINT|RELEASE|ROLLBACK\s+TO|CREATE|ALTER|DROP)\b",
                    re.IGNORECASE)

IndexOp = tuple  # ("card", id) | ("partner", name) | ("system", currency) | ("controls", scope, owner_id)


class StoreChange(msgspec.Struct, array_like=True, frozen=True):
    statements: list[tuple[str, Any]]  # (sql, parameters: a list or a dict)
    index_ops: list[tuple]  # refreshes of the in-memory index, run after commit
    files: list[tuple[str, bytes]] = []  # (path relative to the data directory, content)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StoreChange)


def encode_change(change: StoreChange) -> bytes:
    return _encoder.encode(change)


def decode_change(payload: bytes) -> StoreChange:
    return _decoder.decode(payload)


def is_write(sql: str) -> bool:
    return _WRITE.match(sql) is not None


class RecordingConnection:
    """A sqlite3.Connection that, while `recording` is a list, appends every write statement
    executed through it. Only statements that succeed are recorded (a failed one changed nothing).
    Everything else is the connection's own."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self.recording: list[tuple[str, Any]] | None = None

    def execute(self, sql: str, parameters: Any = ()):
        cursor = self._conn.execute(sql, parameters)
        if self.recording is not None and is_write(sql):
            self.recording.append((sql, _plain(parameters)))
        return cursor

    def executemany(self, sql: str, seq_of_parameters):
        if self.recording is None:
            return self._conn.executemany(sql, seq_of_parameters)
        rows = [_plain(parameters) for parameters in seq_of_parameters]
        cursor = self._conn.executemany(sql, rows)
        if is_write(sql):
            self.recording.extend((sql, parameters) for parameters in rows)
        return cursor

    def executescript(self, script: str):
        assert self.recording is None, "executescript cannot be replicated"
        return self._conn.executescript(script)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def _plain(parameters: Any) -> Any:
    if isinstance(parameters, dict):
        return {key: _value(value) for key, value in parameters.items()}
    return [_value(value) for value in parameters]


def _value(value: Any) -> Any:
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    if isinstance(value, bool):
        return int(value)
    return value


def write_files(data_dir: Path, files: list[tuple[str, bytes]]) -> None:
    """A change's files on a standby: written with the mode the primary gives them (0600)."""
    import os

    for relative, content in files:
        path = (data_dir / relative).resolve()
        assert data_dir.resolve() in path.parents, relative
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(path)
