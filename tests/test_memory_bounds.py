"""The count bounds added for a flat memory soak: `[ledger] history_per_account_max` and
`holds_pending_max`, `[duplicates] closed_max`, `[history] activities_max`. Each is validated in the
config, enforced past the bound, applied at open, survives a snapshot and a restart, and `ledger
verify` passes on state built under a non-default bound (the ids bound's cases are in
test_retention_bounds.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authsrv.app import open_ledger_and_journal
from authsrv.config import (
    ACTIVITIES_MAX_MIN,
    CLOSED_MAX_MIN,
    HISTORY_PER_ACCOUNT_MAX_MIN,
    HOLDS_PENDING_MAX_MIN,
    Config,
    ConfigError,
    decode_config,
    render_default_config,
)
from authsrv.hotpath.activity import ACTIVITIES_MAX
from authsrv.hotpath.journal import CLOSED_MAX, AuthJournal, AuthRecord
from authsrv.metrics import Metrics
from ledger.durable import DurableLedger
from ledger.state import HISTORY_PER_ACCOUNT_MAX, HOLDS_PENDING_MAX, Ledger
from ledger.types import AccountKind, AccountSpec, Batch, TransferFlags, TransferSpec, TransferStatus
from ledger.verify import verify

T0_NS = 1_700_000_000 * 10**9
USER, SETTLEMENT = 1, 2


def _config(**bounds: int) -> Config:
    text = render_default_config()
    for key, value in bounds.items():
        text, found = re.subn(rf"^{key} = \d+$", f"{key} = {value}", text, flags=re.MULTILINE)
        assert found == 1, key
    return decode_config(text.encode())


def test_defaults_are_the_code_bounds_and_every_key_is_documented() -> None:
    config = Config()
    assert config.ledger.history_per_account_max == HISTORY_PER_ACCOUNT_MAX == 1_000
    assert config.ledger.holds_pending_max == HOLDS_PENDING_MAX
    assert config.duplicates.closed_max == CLOSED_MAX and config.history.activities_max == ACTIVITIES_MAX
    text = render_default_config()
    for line in ("history_per_account_max = 1000", "holds_pending_max = 1000000", "closed_max = 200000",
                 "activities_max = 1000000"):  # fmt: skip
        assert line in text
    low = _config(history_per_account_max=HISTORY_PER_ACCOUNT_MAX_MIN, holds_pending_max=HOLDS_PENDING_MAX_MIN,
                  ids_max=HOLDS_PENDING_MAX_MIN + 1, closed_max=CLOSED_MAX_MIN,
                  activities_max=ACTIVITIES_MAX_MIN)  # fmt: skip
    assert low.ledger.ids_max == HOLDS_PENDING_MAX_MIN + 1 and low.history.activities_max == ACTIVITIES_MAX_MIN


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ({"history_per_account_max": HISTORY_PER_ACCOUNT_MAX_MIN - 1}, "$.ledger.history_per_account_max"),
        ({"holds_pending_max": HOLDS_PENDING_MAX_MIN - 1}, "$.ledger.holds_pending_max"),
        ({"holds_pending_max": HOLDS_PENDING_MAX + 1}, "$.ledger.holds_pending_max"),
        ({"holds_pending_max": 5_000, "ids_max": 5_000}, "must be above the ledger's pending-hold bound 5000"),
        ({"closed_max": CLOSED_MAX_MIN - 1}, "$.duplicates.closed_max"),
        ({"activities_max": ACTIVITIES_MAX_MIN - 1}, "$.history.activities_max"),
    ],
)
def test_bounds_out_of_range_are_refused_naming_the_key(bounds: dict[str, int], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(**bounds)
    assert expected in str(caught.value)


# -- the ledger's bounds ------------------------------------------------------------------------


def _accounts() -> tuple[AccountSpec, ...]:
    return (AccountSpec(id=USER, currency="EUR", kind=AccountKind.user_balance),
            AccountSpec(id=SETTLEMENT, currency="EUR", kind=AccountKind.settlement))  # fmt: skip


def _transfers(first: int, count: int) -> tuple[TransferSpec, ...]:
    return tuple(TransferSpec(id=first + n, debit_account_id=SETTLEMENT, credit_account_id=USER, amount=1,
                              reference=f"r{first + n}") for n in range(count))  # fmt: skip


def _history_lengths(ledger: Ledger) -> list[int]:
    return [len(ledger._accounts[account].history) for account in (USER, SETTLEMENT)]  # noqa: SLF001


def test_history_stays_within_twice_its_bound_and_a_lowered_bound_trims_at_once() -> None:
    ledger = Ledger(history_per_account_max=5, holds_pending_max=10, ids_max=1_000)
    ledger.apply(Batch(timestamp_ns=T0_NS, accounts=_accounts()))
    for batch in range(40):  # 200 events per account, forty times the bound
        ledger.apply(Batch(timestamp_ns=T0_NS + 1 + batch, transfers=_transfers(1_000 + 5 * batch, 5)))
        assert max(_history_lengths(ledger)) <= 2 * 5
    entries = ledger.history(USER, limit=1_000)
    assert len(entries) == 5 and entries[0].transfer_id == 1_199  # the newest kept, newest first
    assert ledger.history_entries_count == sum(_history_lengths(ledger))
    assert ledger.history_trimmed_count == 2 * 200 - ledger.history_entries_count
    ledger.check_invariants()
    ledger.set_history_per_account_max(2)
    assert _history_lengths(ledger) == [2, 2] and ledger.history_entries_count == 4  # not on the next event
    assert [entry.transfer_id for entry in ledger.history(USER, limit=10)] == [1_199, 1_198]
    ledger.set_history_per_account_max(50)  # raising keeps what is there; lists grow again
    ledger.apply(Batch(timestamp_ns=T0_NS + 100, transfers=_transfers(5_000, 20)))
    assert _history_lengths(ledger) == [22, 22] and ledger.history_per_account_max == 50
    ledger.check_invariants()


def test_a_chain_rolled_back_keeps_the_history_count_exact() -> None:
    ledger = Ledger(history_per_account_max=2, holds_pending_max=10, ids_max=1_000)
    ledger.apply(Batch(timestamp_ns=T0_NS, accounts=_accounts()))
    good = _transfers(1_000, 6)
    chain = tuple(TransferSpec(id=t.id, debit_account_id=t.debit_account_id, credit_account_id=t.credit_account_id,
                               amount=t.amount, flags=TransferFlags.linked) for t in good[:5]) + (good[5],)  # fmt: skip
    ledger.apply(Batch(timestamp_ns=T0_NS + 1, transfers=chain))  # six events in one chain: trimmed after it
    assert _history_lengths(ledger) == [2, 2] and ledger.history_entries_count == 4
    bad = (TransferSpec(id=2_000, debit_account_id=SETTLEMENT, credit_account_id=USER, amount=1,
                        flags=TransferFlags.linked),
           TransferSpec(id=2_001, debit_account_id=SETTLEMENT, credit_account_id=99, amount=1))  # fmt: skip
    result = ledger.apply(Batch(timestamp_ns=T0_NS + 2, transfers=bad))
    assert result.transfer_results[0] is TransferStatus.linked_event_failed
    assert ledger.history_entries_count == 4
    ledger.check_invariants()


def test_holds_past_the_lowered_pending_bound_are_refused_and_the_ids_bound_stays_above_it() -> None:
    ledger = Ledger(holds_pending_max=100, ids_max=1_000)
    ledger.apply(Batch(timestamp_ns=T0_NS, accounts=_accounts()))
    ledger.set_holds_pending_max(3)
    holds = tuple(TransferSpec(id=1_000 + n, debit_account_id=SETTLEMENT, credit_account_id=USER, amount=1,
                               flags=TransferFlags.pending) for n in range(5))  # fmt: skip
    result = ledger.apply(Batch(timestamp_ns=T0_NS + 1, transfers=holds))
    assert list(result.transfer_results) == [TransferStatus.created] * 3 + [TransferStatus.pending_transfers_full] * 2
    assert ledger.pending_count() == 3 == ledger.holds_pending_max
    with pytest.raises(AssertionError):
        ledger.set_holds_pending_max(1_000)  # must stay below ids_max: pending hold ids are never evicted
    ledger.check_invariants()


# -- the journal's bounds -----------------------------------------------------------------------


def _approval(number: int) -> AuthRecord:
    return AuthRecord(key=f"0100|1|{number:06d}|k", original_key=f"0100|1|{number:06d}",
                      timestamp_ns=T0_NS + number, mti="0110", processing_code="000000", outcome=0,
                      response_code="00", card_id=1 + number % 50, rrn=f"{number:012d}", amount=100,
                      currency="EUR", user_hold_id=10_000 + number)  # fmt: skip


def test_closed_approvals_and_activity_rows_stay_at_their_bounds() -> None:
    journal = AuthJournal(records_max=1_000, closed_max=1_000, activities_max=1_000, hold_open=lambda hold: False)
    for number in range(2_500):  # every hold already resolved: each approval goes straight to closed
        journal.add(_approval(number))
    assert journal.closed_count == 1_000 == journal.closed_max
    assert len(journal.activity) == 1_000 and len(journal) == 1_000
    assert journal.closed_authorizations(f"{0:012d}") == []  # the oldest went first
    assert [r.rrn for r in journal.closed_authorizations(f"{2_499:012d}")] == [f"{2_499:012d}"]
    restored = AuthJournal(records_max=1_000, closed_max=1_000, activities_max=1_000)
    restored.load_snapshot(journal.to_snapshot())
    assert restored.closed_count == 1_000 and len(restored.activity) == 1_000
    smaller = AuthJournal(records_max=1_000, closed_max=1_000, activities_max=500)
    smaller.load_snapshot(journal.to_snapshot())  # a lowered bound applies as the image is loaded
    assert len(smaller.activity) == 500


# -- through the data directory: open, snapshot, restart, verify ----------------------------------


def _bounded_config() -> Config:
    return _config(history_per_account_max=3, holds_pending_max=1_000, ids_max=1_500, closed_max=1_000,
                   activities_max=1_000)  # fmt: skip


def _fill(durable: DurableLedger, first: int, batches: int) -> None:
    for batch in range(batches):
        durable.submit(Batch(timestamp_ns=T0_NS + first + batch, transfers=_transfers(first * 100 + 10 * batch, 10)))


def test_bounds_reach_journal_ledger_and_metrics_and_survive_snapshot_and_restart(tmp_path: Path) -> None:
    config = _bounded_config()
    ledger, journal = open_ledger_and_journal(tmp_path, config)
    try:
        assert (ledger.ledger.history_per_account_max, ledger.ledger.holds_pending_max, ledger.ledger.ids_max) == (
            3, 1_000, 1_500)
        assert journal.closed_max == 1_000 and journal.activity._total_max == 1_000  # noqa: SLF001
        ledger.submit(Batch(timestamp_ns=T0_NS, accounts=_accounts()))
        _fill(ledger, 1, 20)
        metrics = Metrics()
        metrics.watch_retention(journal, ledger.ledger)
        values = {sample.name: sample.value for family in text_string_to_metric_families(
            generate_latest(metrics.registry).decode()) for sample in family.samples}  # fmt: skip
        assert values["authsrv_ledger_history_entries"] == ledger.ledger.history_entries_count <= 2 * 2 * 3
        assert values["authsrv_ledger_history_trimmed_total"] == 2 * 200 - values["authsrv_ledger_history_entries"]
        assert values["authsrv_journal_closed"] == 0 and values["authsrv_activity_records"] == 0
        ledger.flush_sync()
        ledger.snapshot(journal.to_snapshot())
        digest = ledger.ledger.digest()
    finally:
        ledger.close()
    ledger, journal = open_ledger_and_journal(tmp_path, config)
    try:
        assert ledger.ledger.digest() == digest and ledger.ledger.history_per_account_max == 3
        assert ledger.ledger.holds_pending_max == 1_000 and len(ledger.ledger.history(USER, limit=100)) == 3
    finally:
        ledger.close()
    report = verify(tmp_path / "ledger")
    assert report.ok, report.problems


def test_a_lowered_history_bound_at_restart_trims_and_verify_agrees(tmp_path: Path) -> None:
    """Built under the default bound, snapshotted, reopened under 3, more traffic, snapshotted again:
    `ledger verify` rebuilds from the older snapshot (default bound) and must not call it a mismatch."""
    durable = DurableLedger.open(tmp_path / "ledger")
    try:
        durable.submit(Batch(timestamp_ns=T0_NS, accounts=_accounts()))
        _fill(durable, 1, 5)
        durable.flush_sync()
        durable.snapshot()
    finally:
        durable.close()
    ledger, journal = open_ledger_and_journal(tmp_path, _bounded_config())
    try:
        assert max(_history_lengths(ledger.ledger)) == 3  # trimmed at open, not on the next event
        _fill(ledger, 100, 5)
        ledger.flush_sync()
        ledger.snapshot(journal.to_snapshot())
    finally:
        ledger.close()
    report = verify(tmp_path / "ledger")
    assert report.ok, report.problems
    assert "digest matches" in report.cross_check


def test_a_raised_history_bound_at_restart_is_compared_at_the_bound_both_rebuilds_can_show(tmp_path: Path) -> None:
    """Snapshotted under 3, reopened under the default: the rebuild from the older snapshot has only 3
    events per account from before it, the newer state more; compared at 3, they agree."""
    ledger, journal = open_ledger_and_journal(tmp_path, _bounded_config())
    try:
        ledger.submit(Batch(timestamp_ns=T0_NS, accounts=_accounts()))
        _fill(ledger, 1, 5)
        ledger.flush_sync()
        ledger.snapshot(journal.to_snapshot())
    finally:
        ledger.close()
    report = _reopen_under_default_bound_and_verify(tmp_path, Config(), (100, 5), (200, 2))
    assert report.ok, report.problems
    assert "digest matches" in report.cross_check


def _reopen_under_default_bound_and_verify(tmp_path: Path, config, snapshotted: tuple[int, int],
                                           logged: tuple[int, int]):  # fmt: skip
    """Reopen under the default history bound, fill (then snapshot), fill more (in the log only)
    and return `ledger verify`'s report."""
    ledger, journal = open_ledger_and_journal(tmp_path, config)
    try:
        assert ledger.ledger.history_per_account_max == HISTORY_PER_ACCOUNT_MAX
        _fill(ledger, *snapshotted)
        ledger.flush_sync()
        ledger.snapshot(journal.to_snapshot())
        _fill(ledger, *logged)  # after the newest snapshot, in the log only
        ledger.flush_sync()
    finally:
        ledger.close()
    return verify(tmp_path / "ledger")


def test_verify_rebuilds_from_an_older_snapshot_under_another_history_bound(tmp_path: Path) -> None:
    """Small log segments, so snapshots let the log start after the first record: the second rebuild
    starts from the older snapshot, taken under bound 3, while the newest state runs under 1,000."""
    small = _config(history_per_account_max=3, holds_pending_max=1_000, ids_max=1_500, segment_size_max_bytes=4096)
    ledger, journal = open_ledger_and_journal(tmp_path, small)
    try:
        ledger.submit(Batch(timestamp_ns=T0_NS, accounts=_accounts()))
        for round_ in range(3):
            _fill(ledger, 1 + 100 * round_, 30)
            ledger.flush_sync()
            ledger.snapshot(journal.to_snapshot())
        assert ledger.wal.first_seq > 1  # the older records are gone
    finally:
        ledger.close()
    report = _reopen_under_default_bound_and_verify(tmp_path, _config(segment_size_max_bytes=4096), (1_000, 30),
                                                    (2_000, 3))  # fmt: skip
    assert report.ok, report.problems
    assert "the snapshot at seq" in report.cross_check and "digest matches" in report.cross_check


# -- the readers of the history use the configured bound, not the default ---------------------------


def _deep_history_ledger() -> tuple[Ledger, int]:
    """A cardholder account with a posted hold followed by 1,200 purchases (more than the default
    1,000 events), under a bound of 1,500; the hold's id is forgotten (small ids bound)."""
    from authsrv.hotpath.steps import TransferCode

    ledger = Ledger(history_per_account_max=1_500, holds_pending_max=10, ids_max=20)
    ledger.apply(Batch(timestamp_ns=T0_NS, accounts=_accounts()))
    hold = TransferSpec(id=900, debit_account_id=USER, credit_account_id=SETTLEMENT, amount=7,
                        flags=TransferFlags.pending, code=TransferCode.purchase)  # fmt: skip
    post = TransferSpec(id=901, debit_account_id=0, credit_account_id=0, amount=0, pending_id=900,
                        flags=TransferFlags.post_pending)  # fmt: skip
    ledger.apply(Batch(timestamp_ns=T0_NS + 1, transfers=(hold, post)))
    for batch in range(12):
        purchases = tuple(TransferSpec(id=1_000 + 100 * batch + n, debit_account_id=USER, credit_account_id=SETTLEMENT,
                                       amount=1, code=TransferCode.purchase) for n in range(100))  # fmt: skip
        ledger.apply(Batch(timestamp_ns=T0_NS + 10 + batch, transfers=purchases))
    assert ledger.transfer_status(900) is None  # forgotten: only the history knows how it ended
    return ledger, 900


def test_fee_run_month_spend_and_history_statuses_read_the_whole_configured_history() -> None:
    from authsrv.feesrun import month_spend
    from authsrv.rest.history_api import Statuses

    ledger, hold_id = _deep_history_ledger()
    assert len(ledger.history(USER, limit=10**6)) == 1_202
    # The purchases (1,200 x 1) and the hold (7, posted: nothing released) are all in the month.
    assert month_spend(ledger, USER, T0_NS, T0_NS + 10**12) == 1_207
    assert Statuses(ledger, USER).of_hold(hold_id) == ("CLEARED", None)  # 1,201 events back
