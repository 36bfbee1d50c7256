"""Hold expiry (issue 6, docs/contract.md, clearing file): the MCC policy, expiry on the ledger's logged clock
(timestamps injected into the batches, as the server's idle tick submits them), the metric, the
open-authorization index, and a clearing that arrives after expiry."""

from __future__ import annotations

import time
import urllib.request

import msgspec
import pytest

from authsrv.app import hold_timeout_policy
from authsrv.config import Config, HoldsConfig, MccRule
from authsrv.hotpath.journal import AuthJournal, AuthRecord, JournalImage
from ledger.state import HoldState
from ledger.types import Batch
from tests.test_clearing import authorize, check_books, clear, record, solo  # noqa: F401 (fixture)

DAY_S = 86_400
NS = 10**9


# -- the policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mcc, days",
    [("5411", 7), ("2999", 7), ("3000", 30), ("3512", 30), ("3999", 30), ("4000", 7), ("4411", 30),
     ("4412", 7), ("7011", 30), ("7512", 30), ("7513", 7), (None, 7), ("12a4", 7)],
)
def test_default_policy_by_mcc_class(mcc, days):
    assert hold_timeout_policy(Config())(mcc) == days * DAY_S


def test_policy_table_is_configurable():
    holds = HoldsConfig(expiry_days_default=3, mcc_rules=(MccRule(mcc_from=5000, mcc_to=5999, days=14),))
    timeout = hold_timeout_policy(msgspec.structs.replace(Config(), holds=holds))
    assert timeout("5411") == 14 * DAY_S and timeout("7011") == 3 * DAY_S and timeout(None) == 3 * DAY_S


# -- expiry on a running server --------------------------------------------------------------------


def _scrape(server, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


async def _advance(server, seconds: int) -> tuple[int, ...]:
    """An empty batch stamped `seconds` past the ledger's clock: what the idle tick does, in days."""
    ts = max(time.time_ns(), server.ledger.ledger.timestamp_ns) + seconds * NS
    result, seq = server.ledger.submit(Batch(timestamp_ns=ts))
    await server.ledger.wait_durable(seq)
    return result.expired


async def test_holds_expire_by_mcc_class_and_late_clearing_is_forced(server, data_dir, solo):
    classes = {"5411": 7, "5812": 7, "3000": 30, "3999": 30, "4411": 30, "7011": 30, "7512": 30}
    made = {mcc: await authorize(server, solo[i], 1000 + i, mcc=mcc) for i, mcc in enumerate(classes)}
    holds = {mcc: server.journal.open_authorizations(a["rrn"])[0] for mcc, a in made.items()}
    assert server.journal.open_count == len(classes)
    before = _scrape(server, "authsrv_holds_expired_total")

    assert await _advance(server, 7 * DAY_S - 60) == ()  # a minute before: nothing yet
    expired = await _advance(server, 120)
    short = {mcc for mcc, days in classes.items() if days == 7}
    # user hold and deposit-collateral hold of each 7-day authorization
    assert set(expired) == {holds[m].user_hold_id for m in short} | {holds[m].collateral_hold_id for m in short}
    for mcc, days in classes.items():
        state = server.ledger.ledger.hold(holds[mcc].user_hold_id).state
        assert state is (HoldState.expired if days == 7 else HoldState.pending), mcc
        assert bool(server.journal.open_authorizations(made[mcc]["rrn"])) is (days == 30)
        account_id = server.index.card_by_id(solo[list(classes).index(mcc)]["cardId"]).balance_account_id
        held = server.ledger.ledger.balance(account_id).debits_pending
        assert held == (0 if days == 7 else holds[mcc].amount), mcc
    assert _scrape(server, "authsrv_holds_expired_total") == before + 2 * len(short)
    assert _scrape(server, "authsrv_open_authorizations") >= 0

    expired = await _advance(server, 23 * DAY_S + 120)  # past 30 days
    assert len(expired) == 2 * (len(classes) - len(short))
    assert server.journal.open_count == 0
    assert _scrape(server, "authsrv_holds_expired_total") == before + 2 * len(classes)

    summary = await clear(server, data_dir, record(made["5411"]), record(made["7011"], 500))
    assert summary.late == 2 and summary.matched == 0 and summary.applied == 2
    assert all(entry.posted and "closed" in entry.reason for entry in summary.exceptions)
    check_books(server.ledger.ledger)


async def test_clearing_just_before_expiry_posts_and_at_expiry_is_late(server, data_dir, solo):
    early, due = await authorize(server, solo[0], 700), await authorize(server, solo[1], 800)
    await _advance(server, 7 * DAY_S - 3600)
    assert (await clear(server, data_dir, record(early))).exact == 1
    # The clearing batch itself would expire this hold as it applies: it is planned as late.
    await _advance(server, 3600 - 1)
    hold = server.ledger.ledger.hold(server.journal.open_authorizations(due["rrn"])[0].user_hold_id)
    assert hold.state is HoldState.pending and hold.deadline_ns <= server.ledger.ledger.timestamp_ns + 10 * NS
    summary = await clear(server, data_dir, record(due))
    assert summary.late + summary.exact == 1  # whichever side of the deadline the batch landed on
    check_books(server.ledger.ledger)


# -- the open-authorization index, unit level ------------------------------------------------------


def _approval(n: int, *, ts: int, rrn: str = "", hold: int = 0) -> AuthRecord:
    return AuthRecord(key=f"0100|k{n}", original_key=f"0100|o{n}", timestamp_ns=ts, mti="0100",
                      processing_code="000000", outcome=0, response_code="00", auth_code=f"A{n:05d}", card_id=1,
                      rrn=rrn or f"R{n}", amount=100, currency="EUR", user_hold_id=hold or 1000 + n)


def test_open_index_outlives_the_duplicate_window():
    pending = {1001, 1002, 1003}
    journal = AuthJournal(retention_ns=10, hold_open=lambda hold_id: hold_id in pending)
    for n in (1, 2, 3):
        journal.add(_approval(n, ts=n))
    journal.add(_approval(4, ts=10**6, hold=2000))  # ages the others out of the duplicate window
    assert journal.get("0100|k1") is None and len(journal) == 1
    assert [r.auth_code for r in journal.open_authorizations("R1")] == ["A00001"]
    assert journal.open_authorizations("R4") == []  # its hold is not pending: remembered as closed
    assert [r.user_hold_id for r in journal.closed_authorizations("R4")] == [2000]
    pending.discard(1002)
    assert journal.prune() == 1 and journal.open_count == 2
    assert journal.close_holds([1003, 999]) == 1 and journal.open_count == 1


def test_snapshot_v2_round_trip_and_v1_still_reads():
    journal = AuthJournal(retention_ns=10)
    for n in (1, 2):
        journal.add(_approval(n, ts=n))
    journal.add(_approval(3, ts=10**6))
    journal.close_holds([1002])
    restored = AuthJournal(retention_ns=10)
    restored.load_snapshot(journal.to_snapshot())
    assert [r.key for r in restored.open_authorizations("R1")] == ["0100|k1"]
    assert [r.key for r in restored.open_authorizations("R3")] == ["0100|k3"]
    assert [r.key for r in restored.closed_authorizations("R2")] == ["0100|k2"]
    image = msgspec.msgpack.decode(journal.to_snapshot(), type=JournalImage)
    assert image.version == 2 and image.open_keys == ["0100|k3"] and len(image.open_records) == 1
    old = msgspec.msgpack.encode([_approval(5, ts=5), _approval(6, ts=6)])  # format 1: a bare list
    legacy = AuthJournal(hold_open=lambda hold_id: hold_id == 1005)
    legacy.load_snapshot(old)
    assert legacy.open_count == 2 and legacy.get("0100|k6") is not None
    assert legacy.prune() == 1 and [r.key for r in legacy.open_authorizations("R5")] == ["0100|k5"]


def test_closed_memory_is_bounded():
    journal = AuthJournal(closed_max=3, hold_open=lambda hold_id: False)
    for n in range(10):
        journal.add(_approval(n, ts=n, rrn="SAME"))
    assert [r.key for r in journal.closed_authorizations("SAME")] == ["0100|k7", "0100|k8", "0100|k9"]
    assert journal.open_count == 0
