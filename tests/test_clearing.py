"""Clearing (docs/contract.md, clearing file, issue 6): matching, posting, idempotency and the summary, on a
real in-process server (authorizations over loopback ISO 8583), then through the CLI and the admin
endpoint. After each scenario the ledger's invariants hold and every currency's books balance."""

from __future__ import annotations

import json
import random

import msgspec
import pytest
import trio

from authsrv import cardsec
from authsrv.clearing import ClearingDeps, apply_clearing
from authsrv.clearing.engine import pace_s
from authsrv.clearing.records import ClearingFileError, legacy_identity, parse_clearing_file
from authsrv.store.db import CLEARING_IDENTITY_KEY, DataDirLock, Store
from ledger.state import HoldState
from ledger.types import AccountKind
from tests.conftest import SEED_AMOUNT, run_cli, start_in_process
from tests.isoclient import IsoClient, auth

PAN_FAKE_BIN = "535522"


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def solo(cards) -> list[dict]:
    """One card per balance (the seed gives each user two cards on one balance)."""
    seen, picked = set(), []
    for card in cards:
        if card["balanceId"] not in seen:
            seen.add(card["balanceId"])
            picked.append(card)
    return picked


async def authorize(server, card: dict, amount: int, *, mcc: str = "5411", mti: str = "0100") -> dict:
    client = await IsoClient.connect(server.iso_port)
    try:
        request = auth(card, amount=amount, mcc=mcc, mti=mti, cvc2=card["cvc2"] if mti == "0100" else None)
        response = await client.call(request)
    finally:
        await client.aclose()
    assert response["39"] == "00", response
    return {"rrn": request["37"], "authCode": response["38"], "pan": card["pan"], "amount": amount, "mcc": mcc}


_record_ids = iter(range(1, 10**9))


def record(authorization: dict, amount: int | None = None, *, type: str = "purchase", record_id: str | None = None,
           currency: str = "EUR", **changes) -> dict:
    amount = authorization["amount"] if amount is None else amount
    line = {
        "recordId": record_id or f"R{next(_record_ids):08d}", "type": type, "rrn": authorization["rrn"],
        "authCode": authorization["authCode"], "pan": authorization["pan"], "amount": amount, "currency": currency,
        "billingAmount": amount, "billingCurrency": currency, "mcc": authorization.get("mcc", "5411"),
        "merchantName": "FROGSHOP LUBLIN", "date": "2026-09-14",
    }  # fmt: skip
    line.update(changes)
    return line


def clearing_file(*records: dict) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def deps(server, data_dir, *, thread: bool = False) -> ClearingDeps:
    """What the server's REST ingest uses: planning in the server's planner process when it runs one
    (`[clearing] planner = "process"`, remote.py), else (or with `thread`) in a worker thread."""
    keys = cardsec.CardKeys.load(data_dir / "keys")
    return ClearingDeps(ledger=server.ledger, journal=server.journal, index=server.index,
                        vault=cardsec.PanVault(keys), store=server.store,
                        planner=None if thread else server.clearing_planner)


async def clear(server, data_dir, *records: dict, name: str = "file.jsonl", thread: bool = False):
    return await apply_clearing(deps(server, data_dir, thread=thread), clearing_file(*records), name)


def account(server, card: dict) -> int:
    return server.index.card_by_id(card["cardId"]).balance_account_id


def balance(server, card: dict):
    return server.ledger.ledger.balance(account(server, card))


def collateral(server, card: dict):
    partner = server.index.partner(server.index.card_by_id(card["cardId"]).partner)
    return server.ledger.ledger.balance(partner.collateral_account_ids["EUR"])


def check_books(ledger) -> None:
    """`authsrv ledger verify`'s checks on the live ledger: invariants, and per currency every kind
    together (user + partner + settlement + funding + ...) sums to zero, posted and pending."""
    ledger.check_invariants()
    sums: dict[str, list[int]] = {}
    for (currency, kind), totals in ledger.totals().items():
        assert isinstance(kind, AccountKind)
        row = sums.setdefault(currency, [0, 0])
        row[0] += totals.credits_posted - totals.debits_posted
        row[1] += totals.credits_pending - totals.debits_pending
    assert all(row == [0, 0] for row in sums.values()), sums


def hold_state(server, authorization_rrn: str):
    found = server.journal.open_authorizations(authorization_rrn) or server.journal.closed_authorizations(
        authorization_rrn)
    assert found, authorization_rrn
    return server.ledger.ledger.hold(found[-1].user_hold_id)


# -- the file format -------------------------------------------------------------------------------


def test_parse_reports_bad_lines_without_card_data():
    good = record({"rrn": "000000000001", "authCode": "ABC123", "pan": "5355220000000001", "amount": 10})
    bad_amount = dict(good, recordId="B1", amount=-5)
    unknown_field = dict(good, recordId="B2", cvv="123")
    repeated = dict(good)
    data = clearing_file(good, bad_amount, unknown_field, repeated) + b"{not json\n\n"
    parsed = parse_clearing_file(data)
    assert [line.number for line in parsed.lines] == [1]
    reasons = {error.number: error for error in parsed.errors}
    assert set(reasons) == {2, 3, 4, 5}
    assert reasons[2].record_id == "B1" and reasons[2].masked_pan == "535522******0001"
    assert "$.amount" in reasons[2].reason and "-5" not in reasons[2].reason
    assert reasons[4].reason == "recordId repeated in the file"
    assert all("5355220000000001" not in error.reason for error in parsed.errors)


def test_identity_is_the_canonical_record():
    one = record({"rrn": "1", "authCode": "A", "pan": "5355220000000001", "amount": 10}, record_id="X")
    reordered = dict(reversed(list(one.items())))
    first, second = parse_clearing_file(clearing_file(one)), parse_clearing_file(clearing_file(reordered))
    assert first.lines[0].identity == second.lines[0].identity
    assert first.sha256 != second.sha256  # different files, same record


def test_identity_begins_with_the_rrn_and_ends_with_the_digest():
    """The RRN in front keeps a chunk's rows together in the store's key; the digest alone decides."""
    one = record({"rrn": "612345000001", "authCode": "A", "pan": "5355220000000001", "amount": 10}, record_id="X")
    identity = parse_clearing_file(clearing_file(one)).lines[0].identity
    rrn, digest = identity.split(":")
    assert rrn == "612345000001" and len(digest) == 64 and legacy_identity(identity) == digest
    other = parse_clearing_file(clearing_file({**one, "amount": 11, "billingAmount": 11})).lines[0].identity
    assert other.startswith("612345000001:") and other != identity


async def test_records_written_with_digest_identities_are_still_recognised(server, data_dir, solo):
    """A store written before identities began with the RRN: its rows are found by their digest,
    counted as duplicates (nothing posted twice), and take the new identity."""
    card = solo[7]
    first_auth, second_auth = await authorize(server, card, 1400), await authorize(server, card, 1500)
    first_record = record(first_auth)
    first = await clear(server, data_dir, first_record, name="before.jsonl")
    assert first.exact == 1
    identity = parse_clearing_file(clearing_file(first_record)).lines[0].identity
    with server.store.transaction():  # as an older build wrote it
        server.store.db.execute("UPDATE clearing_records SET identity = ? WHERE identity = ?",
                                (legacy_identity(identity), identity))
    assert not server.store.clearing_digest_identities  # a store created by this build: none of those
    server.store.clearing_digest_identities = True  # what Store.open finds in an older store (see below)
    # In this process's store only (a planner process would have opened its own, marked as this build's).
    mixed = await clear(server, data_dir, first_record, record(second_auth), name="after.jsonl", thread=True)
    assert mixed.duplicates == 1 and mixed.exact == 1
    assert balance(server, card).posted == SEED_AMOUNT - 1400 - 1500
    identities = {row[0] for row in server.store.db.execute("SELECT identity FROM clearing_records")}
    assert identity in identities and legacy_identity(identity) not in identities
    check_books(server.ledger.ledger)


def test_an_older_store_with_clearing_rows_is_opened_with_digest_lookups(tmp_path):
    path = tmp_path / "store.db"
    Store.open(path, create=True).close()
    with Store.open(path) as store:
        assert not store.clearing_digest_identities  # no clearing rows when this build first opened it
        with store.transaction():
            store.db.execute("DELETE FROM meta WHERE key = ?", (CLEARING_IDENTITY_KEY,))  # as before the key
            store.db.execute("INSERT INTO clearing_records (identity, file_sha256, record_id, line, outcome, state,"
                             " transfers, plan_json, created_at) VALUES (?, 'f', 'r', 1, 'exact', 'applied', x'90',"
                             " '{}', '')", ("0" * 64,))
    with Store.open(path) as store:
        assert store.clearing_digest_identities
    with Store.open(path) as store:  # kept in meta: not looked for again
        assert store.clearing_digest_identities


def test_file_bounds():
    from authsrv.clearing import records

    with pytest.raises(ClearingFileError):
        parse_clearing_file(b"x" * (records.CLEARING_FILE_BYTES_MAX + 1))


# -- scenarios on a running server -----------------------------------------------------------------


async def test_exact_partial_over_and_the_books(server, data_dir, solo):
    exact_card, under_card, over_card = solo[0], solo[1], solo[2]
    exact = await authorize(server, exact_card, 5000)
    under = await authorize(server, under_card, 4000)
    over = await authorize(server, over_card, 3000)
    deposit_before = collateral(server, exact_card).posted
    summary = await clear(server, data_dir, record(exact), record(under, 2500), record(over, 3600))
    assert (summary.matched, summary.exact, summary.partial, summary.over) == (3, 1, 1, 1)
    assert summary.applied == 3 and summary.exceptions_count == 0 and not summary.duplicate_file
    assert summary.totals["EUR"].cleared == 5000 + 2500 + 3600
    assert summary.totals["EUR"].released == 1500
    for card, charged in ((exact_card, 5000), (under_card, 2500), (over_card, 3600)):
        view = balance(server, card)
        assert view.posted == SEED_AMOUNT - charged and view.available == SEED_AMOUNT - charged
    for authorization in (exact, under, over):
        assert hold_state(server, authorization["rrn"]).state is HoldState.posted
        assert server.journal.open_authorizations(authorization["rrn"]) == []
    # The deposit collateral is charged by the same amounts, its holds resolved with the user's.
    assert collateral(server, exact_card).posted == deposit_before - (5000 + 2500 + 3600)
    assert collateral(server, exact_card).debits_pending == 0
    check_books(server.ledger.ledger)


async def test_split_shipments_post_parts_and_the_last_releases(server, data_dir, solo):
    card = solo[3]
    order = await authorize(server, card, 10_000)
    first = await clear(server, data_dir, record(order, 3000), record(order, 2000), name="day1")
    assert (first.split, first.partial, first.matched) == (1, 1, 2)
    assert hold_state(server, order["rrn"]).state is HoldState.posted
    assert balance(server, card).available == SEED_AMOUNT - 5000  # the rest was released by the last
    other = await authorize(server, card, 9000)
    two_days = await clear(server, data_dir, record(other, 4000), name="day2")
    assert two_days.partial == 1  # the last record of its file: final
    three = await authorize(server, card, 6000)
    summary = await clear(server, data_dir, record(three, 1000), record(three, 2000), record(three, 3000))
    assert (summary.split, summary.exact) == (2, 1)
    assert hold_state(server, three["rrn"]).posted == 6000
    check_books(server.ledger.ledger)


async def test_split_across_files_keeps_the_rest_held(server, data_dir, solo):
    card = solo[4]
    order = await authorize(server, card, 8000)
    head = record(order, 3000)
    tail = record(order, 5000)
    # One file with one record: it is that file's last for the authorization, so it is final...
    summary = await clear(server, data_dir, head, record(await authorize(server, card, 100), 100))
    assert summary.partial == 1 and summary.exact == 1
    assert hold_state(server, order["rrn"]).state is HoldState.posted
    # ...and a later record for it is a late (forced) post, still charged and reported.
    late = await clear(server, data_dir, tail)
    assert late.late == 1 and late.exceptions[0].posted
    assert balance(server, card).posted == SEED_AMOUNT - 3000 - 100 - 5000
    check_books(server.ledger.ledger)


async def test_unmatched_unknown_pan_and_bad_currency(server, data_dir, solo):
    card = solo[5]
    phantom = {"rrn": "999999999999", "authCode": "", "pan": card["pan"], "amount": 700}
    unknown = {"rrn": "999999999998", "authCode": "ZZZZZZ", "pan": cardsec.generate_pan(PAN_FAKE_BIN, 987_654_321),
               "amount": 800}
    real = await authorize(server, card, 900)
    summary = await clear(server, data_dir, record(phantom), record(unknown), record(real, currency="USD"),
                          dict(record(real), amount=0, billingAmount=0), record(real))
    assert summary.forced == 1 and summary.exact == 1 and summary.applied == 2
    reasons = {entry.line: entry for entry in summary.exceptions}
    assert reasons[1].posted and reasons[1].reason.startswith("no matching authorization")
    assert reasons[2].reason == "unknown_card" and not reasons[2].posted
    assert reasons[2].masked_pan == unknown["pan"][:6] + "******" + unknown["pan"][-4:]
    assert reasons[3].reason == "billing_currency_not_balance_currency"
    assert reasons[4].reason == "amount_zero"
    assert summary.exceptions_count == 4
    assert balance(server, card).posted == SEED_AMOUNT - 700 - 900
    text = json.dumps(msgspec.to_builtins(summary))
    assert unknown["pan"] not in text and card["pan"] not in text
    check_books(server.ledger.ledger)


async def test_duplicate_file_and_duplicate_record(server, data_dir, solo):
    card = solo[6]
    first_auth = await authorize(server, card, 1200)
    second_auth = await authorize(server, card, 1300)
    first_record = record(first_auth)
    data = clearing_file(first_record)
    first = await apply_clearing(deps(server, data_dir), data, "a.jsonl")
    seq = server.ledger.last_seq
    again = await apply_clearing(deps(server, data_dir), data, "a-again.jsonl")
    assert again.duplicate_file and again.exact == 1 and again.file_sha256 == first.file_sha256
    assert server.ledger.last_seq == seq  # nothing submitted at all
    mixed = await clear(server, data_dir, first_record, record(second_auth))
    assert mixed.duplicates == 1 and mixed.exact == 1 and not mixed.duplicate_file
    assert balance(server, card).posted == SEED_AMOUNT - 1200 - 1300
    check_books(server.ledger.ledger)


async def test_refunds_matched_and_unmatched(server, data_dir, solo):
    card = solo[7]
    purchase = await authorize(server, card, 2000)
    await clear(server, data_dir, record(purchase))
    refund_of_purchase = record(purchase, 500, type="refund")
    free_refund = record({"rrn": "888888888888", "authCode": "", "pan": card["pan"], "amount": 300}, type="refund")
    summary = await clear(server, data_dir, refund_of_purchase, free_refund)
    assert (summary.refunds, summary.refunds_referenced) == (2, 1)
    assert summary.totals["EUR"].refunded == 800 and summary.exceptions_count == 0
    assert balance(server, card).posted == SEED_AMOUNT - 2000 + 800
    check_books(server.ledger.ledger)


async def test_advice_hold_is_cleared_like_an_authorization(server, data_dir, solo):
    card = solo[8]
    advice = await authorize(server, card, 1500, mti="0120")
    summary = await clear(server, data_dir, record(advice))
    assert summary.exact == 1
    check_books(server.ledger.ledger)


async def test_authorizations_flow_while_a_large_file_applies(server, data_dir, solo):
    """Chunks are separate batches awaited one by one: the ISO listener answers in between."""
    rng = random.Random(7)
    authorizations = [await authorize(server, solo[9 + i % 10], rng.randint(100, 900)) for i in range(40)]
    records = [record(a) for a in authorizations]
    records += [record({"rrn": f"7{i:011d}", "authCode": "", "pan": solo[9]["pan"], "amount": 1})
                for i in range(1100)]  # fmt: skip
    answered = []

    async def traffic():
        client = await IsoClient.connect(server.iso_port)
        for _ in range(20):
            answered.append((await client.call(auth(solo[19], amount=1, cvc2=solo[19]["cvc2"])))["39"])
        await client.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(traffic)
        summary = await clear(server, data_dir, *records)
    assert summary.exact == 40 and summary.forced == 1100 and summary.applied == 1140
    assert summary.exceptions_count == 1100 and len(summary.exceptions) == 1000  # the list is bounded
    assert answered == ["00"] * 20
    check_books(server.ledger.ledger)


async def test_open_authorizations_survive_restart_and_journal_age_out(data_dir, solo):
    """The open index rides in the snapshot and is rebuilt by replay; closed ones leave it."""
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        kept = await authorize(server, solo[0], 1000)
        posted = await authorize(server, solo[1], 1000)
        await clear(server, data_dir, record(posted))
        server.stop.set()  # the shutdown writes a snapshot
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        assert [r.auth_code for r in server.journal.open_authorizations(kept["rrn"])] == [kept["authCode"]]
        assert server.journal.open_authorizations(posted["rrn"]) == []
        summary = await clear(server, data_dir, record(kept, 400))
        assert summary.partial == 1
        check_books(server.ledger.ledger)
        server.stop.set()


# -- the two front doors ---------------------------------------------------------------------------


def _offline_authorizations(data_dir, solo) -> list[dict]:
    async def run():
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir)
            made = [await authorize(server, solo[i], 1000 + i) for i in range(3)]
            server.stop.set()
            return made

    return trio.run(run)


def test_cli_offline_twice(data_dir, solo, tmp_path):
    made = _offline_authorizations(data_dir, solo)
    path = tmp_path / "clearing.jsonl"
    path.write_bytes(clearing_file(record(made[0]), record(made[1], 500), record(made[2], 2000)))
    first = run_cli("clearing", "ingest", "--data", str(data_dir), str(path))
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "clearing.jsonl.summary.json").read_text())
    assert (summary["exact"], summary["partial"], summary["over"], summary["duplicateFile"]) == (1, 1, 1, False)
    assert "matched 3" in first.stdout
    second = run_cli("clearing", "ingest", "--data", str(data_dir), str(path), "--summary-out",
                     str(tmp_path / "again.json"))
    assert second.returncode == 0, second.stderr
    assert json.loads((tmp_path / "again.json").read_text())["duplicateFile"] is True
    assert "DUPLICATE FILE" in second.stdout
    verify = run_cli("ledger", "verify", "--data", str(data_dir))
    assert verify.returncode == 0, verify.stdout
    totals = json.loads(verify.stdout)["totals"]["EUR"]
    assert sum(kind["balance"] for kind in totals.values()) == 0


def test_cli_refuses_a_missing_file(data_dir, tmp_path):
    result = run_cli("clearing", "ingest", "--data", str(data_dir), str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2 and "nope.jsonl" in result.stderr


async def test_admin_endpoint_on_a_running_server(server, data_dir, solo):
    from tests.restclient import admin_login, assert_problem, bearer, https

    made = await authorize(server, solo[10], 2500)
    data = clearing_file(record(made, 2000))
    password = (data_dir / "admin-password").read_text().strip()
    async with https(data_dir, server.rest_port) as client:
        token = await admin_login(client, "admin", password)
        headers = {**bearer(token), "Content-Type": "application/x-ndjson"}
        reply = await client.post("/admin/clearing", content=data, headers=headers)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["partial"] == 1 and body["totals"]["EUR"]["released"] == 500
        again = await client.post("/admin/clearing", content=data, headers=headers)
        assert again.json()["duplicateFile"] is True
        wrong_type = await client.post("/admin/clearing", content=data, headers={**bearer(token),
                                                                               "Content-Type": "application/json"})
        assert_problem(wrong_type, 415)
        anonymous = await client.post("/admin/clearing", content=data,
                                      headers={"Content-Type": "application/x-ndjson"})
        assert_problem(anonymous, 401)
        # Far above the 64 KiB default body bound: the per-path bound lets a clearing file through.
        big = clearing_file(*[record({"rrn": f"6{i:011d}", "authCode": "", "pan": solo[11]["pan"], "amount": 1})
                              for i in range(700)])  # fmt: skip
        assert len(big) > 64 * 1024
        large = await client.post("/admin/clearing", content=big, headers=headers)
        assert large.status_code == 200, large.text
        assert large.json()["forced"] == 700
    check_books(server.ledger.ledger)


def test_cli_sends_to_the_running_server(server_process, solo, tmp_path):
    server_process.start()
    path = tmp_path / "via-server.jsonl"
    path.write_bytes(clearing_file(record({"rrn": "555555555555", "authCode": "", "pan": solo[12]["pan"],
                                           "amount": 42})))
    with pytest.raises(Exception):
        DataDirLock.acquire(server_process.data_dir).release()
    result = run_cli("clearing", "ingest", "--data", str(server_process.data_dir), str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "via-server.jsonl.summary.json").read_text())["forced"] == 1
    assert server_process.terminate() == 0


def test_pace_waits_until_the_lines_taken_fit_the_rate():
    assert pace_s(0, 1000, 0.0) == 0.0  # the first chunk goes at once
    assert pace_s(400, 1000, 0.1) == pytest.approx(0.3)  # 400 lines at 1,000/s: not before 0.4 s
    assert pace_s(400, 1000, 0.5) == 0.0  # behind the rate already: no wait


async def test_a_capped_file_takes_at_least_its_lines_over_the_rate(server, data_dir, solo):
    """[clearing] records_per_second_max: each chunk starts no sooner than the rate allows, so 1,000
    lines at 1,000/s (chunks of 400: at 0, 0.4 and 0.8 s) take 0.8 s at least; authorizations are
    answered meanwhile, and the books balance."""
    records = [record({"rrn": f"8{i:011d}", "authCode": "", "pan": solo[8]["pan"], "amount": 1}) for i in range(1000)]
    answered = []

    async def traffic():
        client = await IsoClient.connect(server.iso_port)
        for _ in range(10):
            answered.append((await client.call(auth(solo[18], amount=1, cvc2=solo[18]["cvc2"])))["39"])
            await trio.sleep(0.05)
        await client.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(traffic)
        started = trio.current_time()
        summary = await apply_clearing(deps(server, data_dir), clearing_file(*records), "capped.jsonl",
                                       records_per_second_max=1000)
        took_s = trio.current_time() - started
    assert took_s >= 0.8
    assert summary.forced == 1000 and summary.applied == 1000
    assert answered == ["00"] * 10
    check_books(server.ledger.ledger)


# -- the planner process (remote.py) ------------------------------------------------------------------

def _counted(summary) -> dict:
    """A summary's counts and exceptions, without what names the file or the log."""
    fields = msgspec.structs.asdict(summary)
    for name in ("file_sha256", "name", "ledger_seq"):
        fields.pop(name)
    fields["exceptions"] = [(entry.line, entry.reason, entry.posted) for entry in summary.exceptions]
    return fields


@pytest.fixture
async def planning_server(data_dir):
    """A server that plans clearing in its planner process (`[clearing] planner = "process"`)."""
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir, clearing__planner="process")
        assert handle.clearing_planner is not None
        yield handle
        handle.stop.set()


async def test_the_default_planner_is_a_worker_thread(server):
    assert server.clearing_planner is None


async def test_the_planner_process_and_a_worker_thread_count_a_file_alike(planning_server, data_dir, solo):
    """The same kinds of records, planned in the server's planner process and in a worker thread:
    the same summary, the same postings, the same books."""
    server = planning_server
    summaries = []
    for thread, picked in ((False, solo[12:15]), (True, solo[15:18])):
        exact = await authorize(server, picked[0], 5000)
        under = await authorize(server, picked[1], 4000)
        over = await authorize(server, picked[2], 3000)
        unknown = {"rrn": "000000000001", "authCode": "", "pan": "5355229999999999", "amount": 100}
        records = (record(exact), record(under, 2500), record(over, 3600), record(unknown),
                   record(exact, 10, type="refund"), record(under, 1, currency="USD"))
        summaries.append(await apply_clearing(deps(server, data_dir, thread=thread), clearing_file(*records),
                                              f"thread-{thread}.jsonl"))
        for card, charged in ((picked[0], 5000 - 10), (picked[1], 2500), (picked[2], 3600)):
            assert balance(server, card).posted == SEED_AMOUNT - charged
    by_process, by_thread = summaries
    assert (by_process.applied, by_process.matched, by_process.refunds) == (4, 3, 1)
    assert by_process.exceptions_count == 2  # the unknown card, the currency
    assert _counted(by_process) == _counted(by_thread)
    check_books(server.ledger.ledger)


async def test_a_planner_that_died_fails_the_file_and_the_next_one_resumes_it(planning_server, data_dir, solo):
    """Killed between two files, it is started again; killed in the middle of one, the file fails
    with a clear error, and applying it again finishes it, each record posted once."""
    from authsrv.clearing.remote import PlannerError

    server = planning_server
    planner = server.clearing_planner
    first = await authorize(server, solo[18], 1200)
    assert (await clear(server, data_dir, record(first))).exact == 1
    planner._process.kill()
    second = await authorize(server, solo[19], 1300)
    assert (await apply_clearing(deps(server, data_dir), clearing_file(record(second)), "b.jsonl")).exact == 1
    third = [await authorize(server, solo[i], 100 + i) for i in range(3)]
    data = clearing_file(*[record(made) for made in third])
    original = planner.durable_then_plan
    calls = 0

    async def dies_at_the_second_step(run, gathered):
        nonlocal calls
        calls += 1
        if calls == 2:
            planner._process.kill()
        return await original(run, gathered)

    planner.durable_then_plan = dies_at_the_second_step
    try:
        with pytest.raises(PlannerError, match="gave no answer"):
            await apply_clearing(deps(server, data_dir), data, "c.jsonl")
    finally:
        del planner.durable_then_plan
    again = await apply_clearing(deps(server, data_dir), data, "c.jsonl")
    assert (again.applied, again.exact, again.exceptions_count) == (3, 3, 0)
    for index, made in enumerate(third):
        assert balance(server, solo[index]).posted == SEED_AMOUNT - made["amount"]
    check_books(server.ledger.ledger)


def test_the_planners_index_finds_a_card_issued_after_it_loaded(data_dir, cards):
    from authsrv.clearing.remote import _RefreshingIndex
    from authsrv.store.db import Store
    from authsrv.store.index import CardIndex

    vault = cardsec.PanVault(cardsec.CardKeys.load(data_dir / "keys"))
    with Store.open(data_dir) as store:
        index = _RefreshingIndex(store)
        pan_index = vault.index(cards[0]["pan"])
        issued = index.card_by_pan_index(pan_index)
        assert issued is not None and issued.card_id == cards[0]["cardId"]
        index._index = CardIndex()  # loaded before the card was issued
        store.attach_index(index._index)
        index.refresh()
        assert index.partner(issued.partner) is not None
        assert index.card_by_pan_index(pan_index) == issued  # looked up in the store
        assert index.card_by_pan_index(vault.index("5355229999999999")) is None
