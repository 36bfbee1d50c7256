"""The 24-hour windows' count bounds: `[duplicates] records_max` and `[ledger] ids_max` are validated,
reach the journal and the ledger, evict past the bound, and the evictions are counted and exposed."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authsrv.app import open_ledger_and_journal
from authsrv.config import Config, ConfigError, decode_config, render_default_config
from authsrv.hotpath.journal import RECORDS_MAX, AuthJournal, AuthRecord
from authsrv.metrics import Metrics
from ledger.state import HOLDS_PENDING_MAX, IDS_MAX, Ledger
from ledger.types import AccountKind, AccountSpec, Batch, TransferSpec

T0_NS = 1_700_000_000 * 10**9


def _config(records_max: int, ids_max: int) -> Config:
    text = render_default_config().replace("records_max = 20000000", f"records_max = {records_max}")
    text = text.replace("ids_max = 10000000", f"ids_max = {ids_max}")
    return decode_config(text.encode())


def test_defaults_are_the_code_bounds_and_the_keys_are_documented() -> None:
    config = Config()
    assert config.duplicates.records_max == RECORDS_MAX == 20_000_000
    assert config.ledger.ids_max == IDS_MAX == 10_000_000
    text = render_default_config()
    assert "records_max = 20000000" in text and "ids_max = 10000000" in text
    assert text.count("no longer recognized") == 2  # the price of a bound below 24 h of traffic
    assert _config(5_000, HOLDS_PENDING_MAX + 1).ledger.ids_max == HOLDS_PENDING_MAX + 1


@pytest.mark.parametrize(
    ("records_max", "ids_max", "expected"),
    [
        (999, IDS_MAX, "$.duplicates.records_max"),
        (1_000, HOLDS_PENDING_MAX, "must be above the ledger's pending-hold bound 1000000"),
        (1_000, 0, "$.ledger.ids_max"),
    ],
)
def test_bounds_out_of_range_are_refused_with_the_reason(records_max: int, ids_max: int, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(records_max, ids_max)
    assert expected in str(caught.value)


def _record(number: int) -> AuthRecord:
    return AuthRecord(key=f"0100|1|{number:06d}|k", original_key=f"0100|1|{number:06d}", timestamp_ns=T0_NS + number,
                      mti="0110", processing_code="000000", outcome=0, response_code="00")  # fmt: skip


def test_a_journal_record_past_the_bound_is_evicted_and_counted() -> None:
    journal = AuthJournal(records_max=1_000)
    for number in range(1_003):
        journal.add(_record(number))
    assert len(journal) == 1_000 and journal.evicted_early == 3
    assert journal.get(_record(0).key) is None and journal.get(_record(1_002).key) is not None


def _transfer(number: int) -> TransferSpec:
    return TransferSpec(id=1_000 + number, debit_account_id=1, credit_account_id=2, amount=1)


def test_set_ids_max_evicts_on_the_next_apply_and_counts() -> None:
    ledger = Ledger(holds_pending_max=2, ids_max=10)
    accounts = (AccountSpec(id=1, currency="EUR", kind=AccountKind.settlement),
                AccountSpec(id=2, currency="EUR", kind=AccountKind.settlement))
    ledger.apply(Batch(timestamp_ns=T0_NS, accounts=accounts))
    ledger.apply(Batch(timestamp_ns=T0_NS + 1, transfers=tuple(_transfer(n) for n in range(8))))
    assert ledger.ids_evicted_count == 0
    ledger.set_ids_max(5)
    assert ledger.ids_evicted_count == 0  # applied by the next batch, as the cap always is
    ledger.apply(Batch(timestamp_ns=T0_NS + 2, transfers=(_transfer(8),)))
    assert ledger.ids_evicted_count == 4 and ledger.transfer_status(1_000) is None
    assert ledger.transfer_status(1_008) is not None
    ledger.check_invariants()
    with pytest.raises(AssertionError):
        ledger.set_ids_max(2)  # not above holds_pending_max: pending hold ids are never evicted


def test_config_reaches_journal_ledger_and_metrics(tmp_path: Path) -> None:
    config = _config(1_234, HOLDS_PENDING_MAX + 7)
    ledger, journal = open_ledger_and_journal(tmp_path, config)
    try:
        assert journal._records_max == 1_234
        assert ledger.ledger._ids_max == HOLDS_PENDING_MAX + 7
        metrics = Metrics()
        metrics.watch_retention(journal, ledger.ledger)
        journal.evicted_early = 5
        values = {sample.name: sample.value for family in text_string_to_metric_families(_scrape(metrics))
                  for sample in family.samples}  # fmt: skip
        assert values["authsrv_journal_records_evicted_early_total"] == 5
        assert values["authsrv_ledger_ids_evicted_early_total"] == 0
    finally:
        ledger.close()


def _scrape(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_ledger_verify_rebuilds_with_the_operators_ids_bound(tmp_path: Path, monkeypatch) -> None:
    """A ledger whose ids bound was lowered at open, snapshotted with ids evicted: verify's second
    rebuild from the first record uses the same bound and finds the same digest (no false alarm)."""
    from ledger.durable import DurableLedger
    from ledger.verify import verify

    # Small default bounds so that a few hundred transfers reach them (the real ones are millions).
    defaults = dict(Ledger.__init__.__kwdefaults__, holds_pending_max=2, ids_max=400)
    monkeypatch.setattr(Ledger.__init__, "__kwdefaults__", defaults)
    durable = DurableLedger.open(tmp_path)
    try:
        durable.ledger.set_ids_max(100)
        accounts = (AccountSpec(id=1, currency="EUR", kind=AccountKind.settlement),
                    AccountSpec(id=2, currency="EUR", kind=AccountKind.settlement))  # fmt: skip
        durable.submit(Batch(timestamp_ns=T0_NS, accounts=accounts))
        for start in range(0, 300, 50):
            transfers = tuple(TransferSpec(id=1_000 + n, debit_account_id=1, credit_account_id=2, amount=1)
                              for n in range(start, start + 50))  # fmt: skip
            durable.submit(Batch(timestamp_ns=T0_NS + 1 + start, transfers=transfers))
        assert durable.ledger.ids_evicted_count > 0
        durable.flush_sync()
        durable.snapshot()
    finally:
        durable.close()
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert "digest matches" in report.cross_check
