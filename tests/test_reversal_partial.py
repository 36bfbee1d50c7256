"""Partial reversals (field 95, docs/contract.md, wire profile; issue 6): several on one authorization, and a
reversal after a partial clearing, which releases only what is still held."""

from __future__ import annotations

import pytest

from authsrv.clearing import engine
from authsrv.clearing.engine import ClearingRun
from authsrv.clearing.records import parse_clearing_file
from ledger.state import HoldState
from tests.conftest import SEED_AMOUNT
from tests.isoclient import IsoClient, auth, reversal_of
from tests.test_clearing import balance, check_books, clear, clearing_file, collateral, deps, record, solo  # noqa: F401


async def _approve(client, card: dict, amount: int) -> tuple[dict, dict]:
    request = auth(card, amount=amount, cvc2=card["cvc2"])
    response = await client.call(request)
    assert response["39"] == "00"
    made = {"rrn": request["37"], "authCode": response["38"], "pan": card["pan"], "amount": amount}
    return request, made


async def test_several_partial_reversals_then_clearing_the_rest(server, data_dir, solo):
    card = solo[0]
    client = await IsoClient.connect(server.iso_port)
    request, made = await _approve(client, card, 10_000)
    deposit = collateral(server, card).available
    for remaining in (7000, 4000, 2500):
        assert (await client.call(reversal_of(request, remaining=remaining)))["39"] == "00"
        assert balance(server, card).available == SEED_AMOUNT - remaining
        assert collateral(server, card).available == deposit + 10_000 - remaining  # released in step
    # A field 95 above what is still held releases nothing more (never a negative release).
    assert (await client.call(reversal_of(request, remaining=5000)))["39"] == "00"
    assert balance(server, card).available == SEED_AMOUNT - 2500
    summary = await clear(server, data_dir, record(made, 2500))
    assert summary.exact == 1 and summary.totals["EUR"].released == 0
    assert balance(server, card).posted == SEED_AMOUNT - 2500 and balance(server, card).debits_pending == 0
    assert collateral(server, card).debits_pending == 0
    check_books(server.ledger.ledger)


async def test_full_reversal_then_clearing_is_late(server, data_dir, solo):
    card = solo[1]
    client = await IsoClient.connect(server.iso_port)
    request, made = await _approve(client, card, 3000)
    assert (await client.call(reversal_of(request)))["39"] == "00"
    assert server.journal.open_authorizations(made["rrn"]) == []  # the void closed it
    summary = await clear(server, data_dir, record(made))
    assert summary.late == 1  # the merchant cleared anyway: charged, and reported
    assert balance(server, card).posted == SEED_AMOUNT - 3000
    check_books(server.ledger.ledger)


async def test_reversal_after_a_final_partial_clearing_releases_nothing(server, data_dir, solo):
    card = solo[2]
    client = await IsoClient.connect(server.iso_port)
    request, made = await _approve(client, card, 6000)
    assert (await clear(server, data_dir, record(made, 4000))).partial == 1
    reversal = reversal_of(request)
    assert (await client.call(reversal))["39"] == "00"
    key = "|".join(("0400", reversal["32"].zfill(11), reversal["11"], reversal["7"], reversal["37"]))
    assert server.journal.get(key).cause == "nothing left to release"
    view = balance(server, card)
    assert view.posted == SEED_AMOUNT - 4000 and view.available == SEED_AMOUNT - 4000
    check_books(server.ledger.ledger)


@pytest.fixture
def one_record_chunks(monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_RECORDS_MAX", 1)


async def test_reversal_between_split_parts_releases_only_what_is_held(server, data_dir, solo, one_record_chunks):
    """Split shipment: the first part is posted (not final), a partial reversal arrives, then the last
    part. The reversal releases from what is still held, never from what was posted."""
    card = solo[3]
    client = await IsoClient.connect(server.iso_port)
    request, made = await _approve(client, card, 10_000)
    parsed = parse_clearing_file(clearing_file(record(made, 3000), record(made, 2000)))
    run = ClearingRun(deps(server, data_dir), parsed, "split.jsonl")
    assert run.start() is None
    await server.ledger.wait_durable(run.step())
    run.durable()
    hold_id = server.journal.open_authorizations(made["rrn"])[0].user_hold_id
    assert server.ledger.ledger.hold(hold_id).remaining == 7000
    # Field 95 = 5000: the final amount is 5000, so 5000 of the 10,000 is released; 7000 was held.
    assert (await client.call(reversal_of(request, remaining=5000)))["39"] == "00"
    hold = server.ledger.ledger.hold(hold_id)
    assert (hold.posted, hold.released, hold.remaining) == (3000, 5000, 2000)
    # A full reversal now releases the 2000 still held, not the 3000 already posted.
    assert (await client.call(reversal_of(request)))["39"] == "00"
    assert server.ledger.ledger.hold(hold_id).state is HoldState.voided
    await server.ledger.wait_durable(run.step())
    run.durable()
    summary = run.finish()
    assert (summary.split, summary.late) == (1, 1)  # the second part came after the void
    assert balance(server, card).posted == SEED_AMOUNT - 3000 - 2000
    assert balance(server, card).debits_pending == 0
    check_books(server.ledger.ledger)
