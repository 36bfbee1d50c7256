"""A refusal hit by every request logs one line per interval, not one per request."""

from __future__ import annotations

import logging

import pytest

from authsrv.ratelog import RateLimitedLog


def test_repeats_within_the_interval_are_counted_into_the_next_line(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelog"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="test.ratelog"):
        for _ in range(5):
            limited.error("ledger refused a hot-path transfer: %s", "pending_transfers_full")
        now[0] += 9.9
        limited.error("ledger refused a hot-path transfer: %s", "pending_transfers_full")
        assert len(caplog.records) == 1  # the first, at once
        now[0] += 0.2
        limited.error("ledger refused a hot-path transfer: %s", "pending_transfers_full")
        now[0] += 10.0
        limited.error("ledger refused a hot-path transfer: %s", "pending_transfers_full")
    assert [record.getMessage() for record in caplog.records] == [
        "ledger refused a hot-path transfer: pending_transfers_full",
        "ledger refused a hot-path transfer: pending_transfers_full (5 more like it since the last line)",
        "ledger refused a hot-path transfer: pending_transfers_full",
    ]
