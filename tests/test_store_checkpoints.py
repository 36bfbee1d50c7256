"""The store's checkpoints in a background task, not in whichever COMMIT crosses SQLite's mark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from authsrv.store.db import WAL_AUTOCHECKPOINT_DEFERRED_PAGES, Store

PAGES_PAST_DEFAULT_MARK = 1_500  # SQLite's default autocheckpoint runs at 1,000 pages


def _write_pages(store: Store, rows: int) -> None:
    with store.transaction():
        store.db.execute("CREATE TABLE IF NOT EXISTS filler (id INTEGER PRIMARY KEY, blob BLOB)")
        store.db.conn.executemany("INSERT INTO filler (blob) VALUES (?)", [(os.urandom(3_000),) for _ in range(rows)])


def _wal_bytes(path: Path) -> int:
    return (path / "store.db-wal").stat().st_size


def test_deferred_checkpoints_leave_the_wal_to_the_background_task(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store.db", create=True) as store:
        store.defer_checkpoints()
        store.defer_checkpoints()  # a cluster node serving again: nothing changes
        assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_AUTOCHECKPOINT_DEFERRED_PAGES
        _write_pages(store, PAGES_PAST_DEFAULT_MARK)
        frames, copied = store.checkpoint()
        assert frames >= PAGES_PAST_DEFAULT_MARK  # no COMMIT checkpointed on the way (it would have reset the WAL)
        assert copied == frames  # nothing read or written meanwhile: all of it is in the database now
        # The next transaction starts the WAL over: it does not grow past what it holds now.
        size = _wal_bytes(tmp_path)
        _write_pages(store, 10)
        assert _wal_bytes(tmp_path) == size
        assert store.db.execute("SELECT COUNT(*) FROM filler").fetchone()[0] == PAGES_PAST_DEFAULT_MARK + 10


def test_without_deferral_a_commit_checkpoints_and_checkpoint_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store.db", create=True) as store:
        with pytest.raises(AssertionError):
            store.checkpoint()
        _write_pages(store, PAGES_PAST_DEFAULT_MARK)
        _write_pages(store, 10)  # this COMMIT finds the WAL past 1,000 pages: it checkpoints, then the WAL restarts
        frames = store.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        assert frames < 100
