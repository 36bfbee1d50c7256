"""How online clearing yields to authorizations: the loop-idle gate, the worker's pause, and the
store writes a chunk makes in one statement each (authsrv/clearing/engine.py, store.py)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import trio

from authsrv.clearing import engine
from authsrv.clearing.store import QUERY_IDENTITIES_MAX, ClearingStore, RecordState
from authsrv.store.db import Store


async def test_the_gate_opens_only_while_the_loop_waits_for_io():
    gate = engine.LoopIdleGate()
    trio.lowlevel.add_instrument(gate)
    try:
        busy = []
        for _ in range(50):  # this task is always runnable: the loop only polls, with timeout 0
            await trio.lowlevel.checkpoint()
            busy.append(gate.open.is_set())
        assert not any(busy)
        # While the loop waits for this thread it has nothing to run: the gate opens for it.
        assert await trio.to_thread.run_sync(gate.open.wait, 5.0)
        assert not gate.open.is_set()  # the loop woke up to resume this task: shut again
    finally:
        trio.lowlevel.remove_instrument(gate)


class _Gate:
    def __init__(self, is_open: bool) -> None:
        self.is_open, self.waits = is_open, []

    def is_set(self) -> bool:
        return self.is_open

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return self.is_open


def test_a_pause_at_a_shut_gate_waits_there_instead_of_taking_the_gil(monkeypatch):
    clock = [0.0]
    sleeps: list[float] = []
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(engine.time, "sleep", sleeps.append)
    shut = _Gate(False)
    pause = engine.GilYield(0.001, gate=shut)
    for _ in range(4):
        clock[0] += 0.002  # past the interval every time
        pause()
    assert shut.waits == [engine.GATE_WAIT_S_MAX] * 4 and sleeps == []
    shut.is_open = True  # an idle loop: the plain interval rule again
    clock[0] += 0.002
    pause()
    assert sleeps == [0] and len(shut.waits) == 4


def _planned(store: Store, count: int) -> list[str]:
    identities = [f"id-{n:05d}" for n in range(count)]
    with store.transaction():
        store.db.conn.executemany(
            "INSERT INTO clearing_records (identity, file_sha256, record_id, line, outcome, state, transfers,"
            " plan_json, created_at) VALUES (?, 'f', ?, ?, 'exact', ?, x'90', '{}', '')",
            [(identity, identity, n, RecordState.planned) for n, identity in enumerate(identities)])
    return identities


class _Event(msgspec.Struct, rename="camel"):
    """What mark_applied reads of a ClearedTransaction; written as its JSON body."""

    partner: str
    transaction_id: str


def test_mark_applied_moves_each_planned_row_once_and_writes_its_event_once(tmp_path: Path, monkeypatch):
    from authsrv.clearing import store as clearing_store

    monkeypatch.setattr(clearing_store, "event_kind", lambda event: "transaction.cleared")
    with Store.open(tmp_path / "store.db", create=True) as store:
        store.add_partner("demo", balance_mode="internal", collateral="deposit")
        identities = _planned(store, QUERY_IDENTITIES_MAX + 7)  # two statements
        events = {identity: _Event("demo", f"t{n}") for n, identity in enumerate(identities) if n % 3 == 0}
        pauses = []
        rows = ClearingStore(store)
        assert rows.mark_applied(identities, events, lambda: pauses.append(1)) == (len(events), 0)
        assert len(pauses) == 2 + len(events)  # after each UPDATE, before each event
        states = dict(store.db.execute("SELECT identity, state FROM clearing_records").fetchall())
        assert set(states.values()) == {RecordState.applied}
        written = store.db.execute("SELECT id, subject, body, idempotency_key FROM events ORDER BY id").fetchall()
        assert [subject for _, subject, _, _ in written] == [f"transaction:t{n}" for n in range(0, len(identities), 3)]
        assert [json.loads(body)["transactionId"] for _, _, body, _ in written] == [
            f"t{n}" for n in range(0, len(identities), 3)]
        assert [row[0] for row in written] == list(range(written[0][0], written[0][0] + len(written)))
        assert len({key for *_, key in written}) == len(written)  # every event its own idempotency key
        # Again (a resumed or concurrent run): nothing moves, nothing is written twice.
        assert rows.mark_applied(identities, events) == (0, 0)
        assert store.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == len(written)
