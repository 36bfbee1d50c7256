"""The panel's operations pages over real HTTPS: transactions (search and a transaction's page),
clearing uploads, the outbox's dead letters, FX rates and admin users."""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.parse

import httpx
import pytest
import trio

from authsrv.hotpath.journal import AuthJournal, AuthRecord
from authsrv.notify.outbox import DEAD, OutboxStore
from authsrv.panel.txindex import TransactionIndex
from authsrv.store.db import AuditQuery
from simulators.partner import PartnerSimSettings, running_partner
from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth, reversal_of
from tests.restclient import admin_login, bearer, https
from tests.test_notify_outbox import configure_delivery, configure_partner, sim_mode
from tests.test_panel_core import admin_password, csrf_of, panel_login

pytestmark = pytest.mark.timeout(90)
T0_NS = 1_800_000_000 * 10**9


async def _purchase(server, card: dict, amount: int) -> tuple[dict, dict]:
    client = await IsoClient.connect(server.iso_port)
    try:
        request = auth(card, amount=amount, cvc2=card["cvc2"])
        response = await client.call(request)
    finally:
        await client.aclose()
    return request, response


@contextlib.asynccontextmanager
async def panel_as(data_dir, server, username: str = "admin", password: str | None = None):
    async with https(data_dir, server.rest_port) as client:
        reply = await panel_login(client, username, password or admin_password(data_dir))
        assert reply.status_code == 303, reply.text
        yield client


def _links(page: httpx.Response) -> list[str]:
    return [urllib.parse.unquote(link).replace("&amp;", "&")
            for link in re.findall(r'href="(/panel/transactions/[^"]+)"', page.text)]


# -- transactions ----------------------------------------------------------------------------------


async def test_purchase_found_by_rrn_masked_pan_and_code_with_its_ledger_entries(server, data_dir, cards):
    card = cards[3]
    request, response = await _purchase(server, card, 1234)
    assert response["39"] == "00", response
    declined_request, declined = await _purchase(server, card, 10**9)  # above the balance
    assert declined["39"] == "51"
    rrn, pan = request["37"], card["pan"]
    masked = f"{pan[:6]}******{pan[-4:]}"
    async with panel_as(data_dir, server) as client:
        by_rrn = await client.get("/panel/transactions", params={"rrn": rrn})
        assert by_rrn.status_code == 200 and rrn in by_rrn.text and declined_request["37"] not in by_rrn.text
        (link,) = _links(by_rrn)
        for query in ({"pan": masked}, {"pan": f"{pan[:6]}...{pan[-4:]}"}):
            by_pan = await client.get("/panel/transactions", params=query)
            assert by_pan.status_code == 200 and rrn in by_pan.text and declined_request["37"] in by_pan.text
            assert pan not in by_pan.text
        newest = await client.get("/panel/transactions")
        assert newest.status_code == 200 and rrn in newest.text and declined_request["37"] in newest.text
        assert newest.text.index(declined_request["37"]) < newest.text.index(rrn)  # newest first
        by_code = await client.get("/panel/transactions", params={"code": "51"})
        assert declined_request["37"] in by_code.text and rrn not in by_code.text
        by_auth = await client.get("/panel/transactions", params={"auth": response["38"]})
        assert rrn in by_auth.text
        today = time.strftime("%Y-%m-%d", time.gmtime())
        by_date = await client.get("/panel/transactions", params={"from": today, "to": today, "code": "00"})
        assert rrn in by_date.text
        assert rrn not in (await client.get("/panel/transactions", params={"to": "2001-01-01"})).text
        # A full PAN typed in: matched, then the search goes on by card id; never echoed.
        full = await client.get("/panel/transactions", params={"pan": pan, "rrn": rrn}, follow_redirects=False)
        assert full.status_code == 303 and pan not in full.headers["location"]
        followed = await client.get(full.headers["location"])
        assert rrn in followed.text and pan not in followed.text and masked in followed.text
        bad = await client.get("/panel/transactions", params={"pan": "12345", "rrn": "!!"})
        assert bad.status_code == 400 and "first 6" in bad.text
        unknown = await client.get("/panel/transactions", params={"pan": "4" * 16})
        assert unknown.status_code == 200 and "4" * 16 not in unknown.text and "No card has this number" in unknown.text

        page = await client.get(link)
        assert page.status_code == 200, page.text
        assert pan not in page.text and masked in page.text
        assert "Approved" in page.text and ">00<" in page.text
        hold_id = server.journal.get(next(r.key for r in server.journal.records() if r.rrn == rrn)).user_hold_id
        assert hold_id and str(hold_id) in page.text and "pending" in page.text
        assert "12.34" in page.text and "FROGSHOP LUBLIN" in page.text
        entries = page.text.split("Ledger entries", 1)[1]
        assert "hold" in entries and "purchase" in entries

        declined_link = _links(await client.get("/panel/transactions", params={"rrn": declined_request["37"]}))[0]
        declined_page = await client.get(declined_link)
        assert "51" in declined_page.text and "Insufficient funds" in declined_page.text
        assert (await client.get("/panel/transactions/nope%7Cx")).status_code == 404


def _record(n: int, *, card_id: int = 1, code: str = "00", rrn: str | None = None, auth_code: str = "",
            outcome: int = 0, **fields) -> AuthRecord:
    key_rrn = rrn or f"R{n:011d}"
    fields.setdefault("processing_code", "000000")
    return AuthRecord(key=f"01|123456|{n:06d}|1121221500|{key_rrn}", original_key=f"01|123456|{n:06d}|1121221500",
                      timestamp_ns=T0_NS + n, mti="0100", outcome=outcome,
                      response_code=code, auth_code=auth_code or f"A{n:05d}", card_id=card_id, rrn=key_rrn,
                      amount=100, currency="EUR", user_hold_id=n if outcome == 0 else 0, **fields)


async def test_transaction_index_is_bounded_follows_replacements_and_reseeds() -> None:
    journal = AuthJournal()
    for n in range(1, 4):
        journal.add(_record(n, card_id=n))  # before the index: seeded from the card activity
    index = TransactionIndex(capacity=4)
    index.follow(journal)
    assert len(index) == 3 and [r.rrn for r in index.by_rrn("R00000000002")] == ["R00000000002"]
    for n in range(4, 8):
        journal.add(_record(n, card_id=1, code="51" if n % 2 else "00", outcome=16 if n % 2 else 0))
    journal.add(_record(8, card_id=1, processing_code="300000"))  # an inquiry is not listed
    assert len(index) == 4 and index.by_rrn("R00000000008") == []  # the bound; the inquiry is not listed
    assert index.by_rrn("R00000000001") == [] and index.by_auth_code("A00001") == []
    assert index.get("01|123456|000007|1121221500|R00000000007").response_code == "51"
    # A decision replaced under the same key (a stand-in) is the same entry, not a new one.
    journal.add(_record(7, card_id=1, code="91", outcome=24, stand_in=True))
    assert len(index) == 4 and [r.response_code for r in index.by_rrn("R00000000007")] == ["91"]
    found, cursor = await index.scan(lambda r: r.response_code == "00", before_seq=None, limit=1)
    assert [r.rrn for r in found] == ["R00000000006"] and cursor is not None
    more, end = await index.scan(lambda r: r.response_code == "00", before_seq=cursor, limit=1)
    assert [r.rrn for r in more] == ["R00000000004"] and end is None
    # Two records with one RRN (different acquirers' keys) are both found, newest first.
    journal.add(_record(9, card_id=2, rrn="R00000000006"))
    assert [r.key.split("|")[2] for r in index.by_rrn("R00000000006")] == ["000009", "000006"]
    # A failure inside the listener never reaches journal.add; the next search rebuilds the index.
    real_append = index._append
    index._append = lambda record: (_ for _ in ()).throw(RuntimeError("bug"))
    journal.add(_record(10, card_id=3))
    assert journal.get("01|123456|000010|1121221500|R00000000010") is not None
    index._append = real_append
    journal.add(_record(11, card_id=3))
    assert index.by_rrn("R00000000011") == []  # not indexing meanwhile
    index.follow(journal)
    assert [r.rrn for r in index.by_rrn("R00000000011")] == ["R00000000011"] and index.by_rrn("R00000000010")
    assert journal.listeners.count(index._on_record) == 1
    # A new journal (a takeover) is followed afresh, from its activity.
    other = AuthJournal()
    other.add(_record(20, card_id=5))
    index.follow(other)
    assert len(index) == 1 and index.by_rrn("R00000000006") == []
    journal.add(_record(21, card_id=5))
    assert index.by_rrn("R00000000021") == []  # the old journal no longer feeds it


async def test_index_scan_skips_entries_overwritten_while_it_yields(monkeypatch) -> None:
    from authsrv.panel import txindex

    monkeypatch.setattr(txindex, "SCAN_CHUNK", 2)
    index = TransactionIndex(capacity=10)
    for n in range(1, 11):
        index._append(_record(n))
    real_checkpoint = trio.lowlevel.checkpoint
    fed = iter(range(11, 16))

    async def checkpoint_while_traffic_flows() -> None:
        index._append(_record(next(fed)))  # the switch appends while the scan is suspended
        await real_checkpoint()

    monkeypatch.setattr(trio.lowlevel, "checkpoint", checkpoint_while_traffic_flows)
    found, cursor = await index.scan(lambda record: True, before_seq=None, limit=10)
    numbers = [int(record.rrn[1:]) for record in found]
    # Newest first from where it started (10), two per chunk; by the time the scan reached 3, the
    # traffic of three suspensions (11..13) had overwritten 1..3: skipped, never shown stale.
    assert numbers == [10, 9, 8, 7, 6, 5, 4] and cursor is None


async def test_reversal_shown_and_search_survives_a_restart(data_dir, cards):
    card = cards[9]
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        request = auth(card, amount=4200, cvc2=card["cvc2"])
        assert (await client.call(request))["39"] == "00"
        assert (await client.call(reversal_of(request)))["39"] == "00"
        await client.aclose()
        async with panel_as(data_dir, server) as panel:
            page = await panel.get("/panel/transactions", params={"rrn": request["37"]})
            assert page.text.count('<td data-label="RRN">') == 1 and "REVERSED" in page.text
        server.stop.set()
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)  # the index is rebuilt from the card activity
        async with panel_as(data_dir, server) as panel:
            for query in ({"rrn": request["37"]}, {"code": "00"}, {"customer": str(card["customerId"])}):
                page = await panel.get("/panel/transactions", params=query)
                assert request["37"] in page.text and "REVERSED" in page.text, query
        server.stop.set()


# -- clearing --------------------------------------------------------------------------------------


def _clearing_line(record_id: str, rrn: str, auth_code: str, pan: str, amount: int) -> bytes:
    return json.dumps({
        "recordId": record_id, "type": "purchase", "rrn": rrn, "authCode": auth_code, "pan": pan,
        "amount": amount, "currency": "EUR", "billingAmount": amount, "billingCurrency": "EUR", "mcc": "5411",
        "merchantName": "FROGSHOP LUBLIN", "date": "2026-09-14"}).encode() + b"\n"


async def _create_admin(client: httpx.AsyncClient, username: str, role: str, password: str) -> httpx.Response:
    page = await client.get("/panel/admins")
    return await client.post("/panel/admins", data={"username": username, "role": role, "password": password,
                                                    "csrf_token": csrf_of(page)})


async def test_clearing_upload_in_the_panel_is_the_rest_ingest(server, data_dir, cards):
    card, other = cards[5], cards[7]
    request, response = await _purchase(server, card, 2500)
    assert response["39"] == "00"
    data = (_clearing_line("P1", request["37"], response["38"], card["pan"], 2000)
            + _clearing_line("P2", "999999999999", "", other["pan"], 300) + b"{not json\n")
    async with panel_as(data_dir, server) as client:
        page = await client.get("/panel/clearing")
        assert page.status_code == 200 and 'type="file"' in page.text and "multipart/form-data" in page.text
        token = csrf_of(page)
        refused = await client.post("/panel/clearing/upload", files={"file": ("a.jsonl", data, "text/plain")})
        assert refused.status_code == 403  # no CSRF token
        empty = await client.post("/panel/clearing/upload", data={"csrf_token": token},
                                  files={"file": ("empty.jsonl", b"", "text/plain")})
        assert empty.status_code == 400 and "empty" in empty.text
        uploaded = await client.post("/panel/clearing/upload", data={"csrf_token": token},
                                     files={"file": ("panel-upload.jsonl", data, "application/x-ndjson")})
        assert uploaded.status_code == 303, uploaded.text
        file_page = await client.get(uploaded.headers["location"])
        assert file_page.status_code == 200 and "Reconciliation summary" in file_page.text
        assert "Applied 2 of 3 records; 2 exceptions." in file_page.text
        assert card["pan"] not in file_page.text and other["pan"] not in file_page.text
        assert f"{other['pan'][:6]}" in file_page.text and "force-posted" in file_page.text
        sha = uploaded.headers["location"].rsplit("/", 1)[-1]
        listed = await client.get("/panel/clearing")
        assert "panel-upload.jsonl" in listed.text and f"/panel/clearing/{sha}" in listed.text
        # The transaction's page shows its clearing.
        (link,) = _links(await client.get("/panel/transactions", params={"rrn": request["37"]}))
        tx_page = await client.get(link)
        assert "panel-upload.jsonl" in tx_page.text and "partial" in tx_page.text and "P1" in tx_page.text
        assert "clearing post" in tx_page.text.split("Ledger entries", 1)[1]
        # The REST ingest of the same file answers the same (first) summary as a duplicate.
        rest_token = await admin_login(client, "admin", admin_password(data_dir))
        rest = await client.post("/admin/clearing", content=data,
                                 headers={**bearer(rest_token), "Content-Type": "application/x-ndjson"})
        assert rest.status_code == 200 and rest.json()["duplicateFile"] is True
        with server.store.locked():
            (stored,) = server.store.db.execute("SELECT summary_json FROM clearing_files WHERE sha256 = ?",
                                                (sha,)).fetchone()
        panel_summary = json.loads(stored)
        assert {**rest.json(), "duplicateFile": False} == panel_summary
        assert panel_summary["lines"] == 3 and panel_summary["partial"] == 1 and panel_summary["forced"] == 1
        assert panel_summary["exceptionsCount"] == 2 and panel_summary["totals"]["EUR"]["released"] == 500
        again = await client.post("/panel/clearing/upload", data={"csrf_token": token},
                                  files={"file": ("again.jsonl", data, "text/plain")})
        assert again.status_code == 303
        assert "applied before: nothing changed" in (await client.get(again.headers["location"])).text
        # Far above the 64 KiB form bound: the upload path has the clearing file's bound.
        big = b"".join(_clearing_line(f"B{i}", f"7{i:011d}", "", other["pan"], 1) for i in range(700))
        assert len(big) > 64 * 1024
        large = await client.post("/panel/clearing/upload", data={"csrf_token": token},
                                  files={"file": ("big.jsonl", big, "text/plain")})
        assert large.status_code == 303, large.text
        assert "Applied 700 of 700 records; 700 exceptions." in (await client.get(large.headers["location"])).text
        assert (await _create_admin(client, "emp.clearing", "Employee", "e" * 14)).status_code == 303
    async with panel_as(data_dir, server, "emp.clearing", "e" * 14) as employee:
        page = await employee.get("/panel/clearing")
        assert page.status_code == 200 and "panel-upload.jsonl" in page.text and 'type="file"' not in page.text
        forbidden = await employee.post("/panel/clearing/upload", data={"csrf_token": csrf_of(page)},
                                        files={"file": ("x.jsonl", data, "text/plain")})
        assert forbidden.status_code == 403
        assert (await employee.get(f"/panel/clearing/{sha}")).status_code == 200
    actions = [(e.action, e.outcome) for e in server.store.audit_page(AuditQuery(channel="panel"), limit=50)]
    assert ("clearing.upload", "applied") in actions and ("clearing.upload", "duplicate file") in actions


def test_clearing_rows_found_near_their_ledger_times_or_among_the_newest(data_dir) -> None:
    from authsrv.store import panel_transactions as queries
    from authsrv.store.db import Store

    def plan(hold_id: int) -> str:
        return json.dumps({"outcome": "exact", "currency": "EUR", "cleared": 5, "released": 0, "refunded": 0,
                           "referenced": False, "holdId": hold_id, "maskedPan": "535522******0001"},
                          separators=(",", ":"))

    base = 1_800_000_000
    with Store.open(data_dir) as store:
        with store.transaction():
            store.db.execute("INSERT INTO clearing_files (sha256, name, received_at) VALUES (?, ?, ?)",
                             ("f" * 64, "f.jsonl", "2027-01-15T08:00:00Z"))
            for n in range(1, 201):  # one row a minute; hold 1000 + n
                moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base + 60 * n))
                store.db.execute(
                    "INSERT INTO clearing_records (identity, file_sha256, record_id, line, outcome, state, transfers,"
                    " plan_json, created_at) VALUES (?, ?, ?, ?, 'exact', 'applied', x'90', ?, ?)",
                    (f"id{n}", "f" * 64, f"R{n}", n, plan(1000 + n), moment))
            store.db.execute("DELETE FROM clearing_records WHERE identity IN ('id50', 'id51')")  # rowid gaps
        near = queries.clearing_rows_of_holds(store, [1100], around_ns=[(base + 6000 + 1) * 10**9])
        assert [(row.record_id, row.hold_id, row.file_name, row.cleared) for row in near] == [
            ("R100", 1100, "f.jsonl", 5)]
        assert queries.clearing_rows_of_holds(store, [1100], around_ns=[(base + 9000) * 10**9]) == []
        assert [r.record_id for r in queries.clearing_rows_of_holds(store, [1052], around_ns=[(base + 3120) * 10**9])
                ] == ["R52"]  # just past the gap
        assert [r.record_id for r in queries.clearing_rows_of_holds(store, [1003, 1199], newest=True)] == ["R3", "R199"]
        assert queries.clearing_rows_of_holds(store, [1010]) == []  # neither a time nor the newest rows asked


# -- outbox ----------------------------------------------------------------------------------------


async def test_dead_letter_listed_and_replayed(data_dir, cards):
    configure_delivery(data_dir, tries_max=2)
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, delivery__backoff_initial_ms=10,
                                            delivery__backoff_max_s=1)
            await sim_mode(sim.url, fail5xx=1.0)
            _, response = await _purchase(server, cards[1], 777)
            assert response["39"] == "00"
            outbox = OutboxStore(server.store)
            deadline = time.monotonic() + 15
            while not outbox.dead(limit=10) and time.monotonic() < deadline:
                await trio.sleep(0.05)
            (dead,) = outbox.dead(limit=10)
            await sim_mode(sim.url, fail5xx=0.0)
            async with panel_as(data_dir, server) as client:
                page = await client.get("/panel/outbox")
                assert page.status_code == 200
                row = page.text.split(f'<td data-label="Id">{dead.id}</td>', 1)[1].split("</tr>", 1)[0]
                assert "demo" in row and dead.kind in row and "2 of 2" in row and "500" in row
                assert f'action="/panel/outbox/{dead.id}/replay"' in row and ">Replay<" in row
                assert (await client.post(f"/panel/outbox/{dead.id}/replay", data={})).status_code == 403
                assert outbox.get(dead.id).state == DEAD
                replayed = await client.post(f"/panel/outbox/{dead.id}/replay", data={"csrf_token": csrf_of(page)})
                assert replayed.status_code == 303
                assert outbox.get(dead.id).state != DEAD
                after = await client.get("/panel/outbox")
                assert f"Letter {dead.id}" in after.text and "No dead letters." in after.text
                again = await client.post(f"/panel/outbox/{dead.id}/replay", data={"csrf_token": csrf_of(page)})
                assert again.status_code == 303 and outbox.get(dead.id).state != DEAD
                assert (await _create_admin(client, "emp.outbox", "Employee", "o" * 14)).status_code == 303
            (call,) = await received_calls(sim.url)
            assert call["idempotencyKey"] == dead.idempotency_key
            async with panel_as(data_dir, server, "emp.outbox", "o" * 14) as employee:
                assert (await employee.get("/panel/outbox")).status_code == 403
                assert '<li><a href="/panel/outbox"' not in (await employee.get("/panel/audit")).text  # not in the menu
            entries = server.store.audit_page(AuditQuery(action="outbox.replay"))
            assert [(e.target, e.outcome) for e in entries] == [(f"delivery:{dead.id}", "not a dead letter"),
                                                                (f"delivery:{dead.id}", "ok")]
            assert json.loads(entries[1].before_json) == {"state": DEAD, "tries": 2}
            server.stop.set()


async def received_calls(sim_url: str) -> list[dict]:
    from tests.test_notify_outbox import received

    return await received(sim_url, "transaction", 1)


# -- FX rates --------------------------------------------------------------------------------------


async def test_fx_rates_view_and_edit_with_validation(server, data_dir):
    async with panel_as(data_dir, server) as client:
        page = await client.get("/panel/fx-rates")
        assert page.status_code == 200 and 'name="rates"' in page.text
        token = csrf_of(page)
        bad = await client.post("/panel/fx-rates", data={"csrf_token": token, "base": "EUR",
                                                         "as_of": "2026-12-05T16:00:00Z", "rates": "USD 1.08x\nGBP 0.85"})
        assert bad.status_code == 400 and "rate of USD" in bad.text and "1.08x" in bad.text  # typed values kept
        for rates, message in (("XYZ 1.1", "ISO 4217"), ("USD", "currency code and a rate"),
                               ("EUR 2", "base currency")):
            reply = await client.post("/panel/fx-rates", data={"csrf_token": token, "base": "EUR",
                                                               "as_of": "2026-12-05T16:00:00Z", "rates": rates})
            assert reply.status_code == 400 and message in reply.text, (rates, reply.text)
        local = await client.post("/panel/fx-rates", data={"csrf_token": token, "base": "EUR",
                                                           "as_of": "2026-12-05T16:00:00", "rates": "USD 1.1"})
        assert local.status_code == 400 and "UTC" in local.text
        assert (await client.post("/panel/fx-rates", data={"base": "EUR", "rates": "USD 1"})).status_code == 403
        saved = await client.post("/panel/fx-rates", data={"csrf_token": token, "base": "EUR",
                                                           "as_of": "2026-12-05T16:00:00Z",
                                                           "rates": "USD 1.0842\nGBP: 0.8571\n\nPLN=4.3"})
        assert saved.status_code == 303
        shown = await client.get("/panel/fx-rates")
        assert "FX rates saved" in shown.text and "1.0842" in shown.text and "4.3" in shown.text
        token_api = await admin_login(client, "admin", admin_password(data_dir))
        document = (await client.get("/admin/fx-rates", headers=bearer(token_api))).json()
        assert document == {"base": "EUR", "rates": {"USD": "1.0842", "GBP": "0.8571", "PLN": "4.3"},
                            "asOf": "2026-12-05T16:00:00Z"}
        assert (await _create_admin(client, "emp.fx", "Employee", "f" * 14)).status_code == 303
    async with panel_as(data_dir, server, "emp.fx", "f" * 14) as employee:
        view = await employee.get("/panel/fx-rates")
        assert view.status_code == 200 and "1.0842" in view.text and 'name="rates"' not in view.text
        refused = await employee.post("/panel/fx-rates", data={"csrf_token": csrf_of(view), "base": "EUR",
                                                               "as_of": "2026-12-05T16:00:00Z", "rates": "USD 9"})
        assert refused.status_code == 403
    (entry,) = server.store.audit_page(AuditQuery(action="fx.rates.replace"))
    assert json.loads(entry.after_json)["rates"]["USD"] == "1.0842"


# -- admin users -----------------------------------------------------------------------------------


async def test_admin_creates_disables_and_resets_an_employee(server, data_dir):
    password = "employee-pass-1"
    async with panel_as(data_dir, server) as admin:
        weak = await _create_admin(admin, "emp.one", "Employee", "short-pw")
        assert weak.status_code == 400 and "the password needs 12" in weak.text
        assert "short-pw" not in weak.text and 'value="emp.one"' in weak.text  # the name kept, never the password
        assert (await _create_admin(admin, "emp.one", "Admin", password)).status_code == 400
        assert (await _create_admin(admin, "emp.one", "Employee", password)).status_code == 303
        assert (await _create_admin(admin, "emp.one", "Employee", password)).status_code == 409
        assert (await _create_admin(admin, "man.one", "Manager", "manager-pass-1")).status_code == 303
        listing = await admin.get("/panel/admins")
        row = listing.text.split(">emp.one<", 1)[1].split("</tr>", 1)[0]
        assert "Employee" in row and "admin" in row and "active" in row and ">Disable<" in row.replace(
            '<span class="skip"> emp.one</span>', "")
        assert (await admin.post("/panel/admins", data={"username": "x" * 5, "role": "Employee",
                                                        "password": "p" * 14})).status_code == 403  # no CSRF

        async with panel_as(data_dir, server, "man.one", "manager-pass-1") as manager:
            assert (await manager.get("/panel/admins")).status_code == 403
            home = await manager.get("/panel/")
            assert 'href="/panel/admins"' not in home.text
            forged = await manager.post("/panel/admins/emp.one/disable", data={"csrf_token": csrf_of(home)})
            assert forged.status_code == 403

        async with https(data_dir, server.rest_port) as employee:
            assert (await panel_login(employee, "emp.one", password)).status_code == 303
            assert (await employee.get("/panel/")).status_code == 200
            api_token = await admin_login(employee, "emp.one", password)
            assert (await employee.get("/admin/fx-rates", headers=bearer(api_token))).status_code in (200, 404)

            token = csrf_of(listing)
            assert (await admin.post("/panel/admins/admin/disable", data={"csrf_token": token})).status_code == 403
            assert (await admin.post("/panel/admins/admin/password", data={"csrf_token": token})).status_code == 403
            assert (await admin.post("/panel/admins/nobody/disable", data={"csrf_token": token})).status_code == 404
            disabled = await admin.post("/panel/admins/emp.one/disable", data={"csrf_token": token})
            assert disabled.status_code == 303
            assert "disabled" in (await admin.get("/panel/admins")).text.split(">emp.one<", 1)[1].split("</tr>")[0]
            # Their live sessions ended, and they cannot log in again.
            assert (await employee.get("/panel/")).status_code == 303
            assert (await employee.get("/admin/fx-rates", headers=bearer(api_token))).status_code == 401
            assert (await panel_login(employee, "emp.one", password)).status_code == 401
            assert (await employee.post("/admin/sessions", json={"username": "emp.one",
                                                                 "password": password})).status_code == 401

            assert (await admin.post("/panel/admins/emp.one/enable", data={"csrf_token": token})).status_code == 303
            assert (await panel_login(employee, "emp.one", password)).status_code == 303
            user_page = await admin.get("/panel/admins/emp.one")
            assert user_page.status_code == 200 and 'action="/panel/admins/emp.one/password"' in user_page.text
            assert (await admin.get("/panel/admins/admin")).status_code == 403
            short = await admin.post("/panel/admins/emp.one/password", data={"csrf_token": token, "password": "x"})
            assert short.status_code == 400 and "Not changed" in short.text
            reset = await admin.post("/panel/admins/emp.one/password", data={"csrf_token": token, "password": ""})
            assert reset.status_code == 200 and "shown only once" in reset.text
            new_password = re.search(r"<code>([^<]+)</code>", reset.text).group(1)
            assert len(new_password) >= 12
            assert (await employee.get("/panel/")).status_code == 303  # the reset ended the session
            assert (await panel_login(employee, "emp.one", password)).status_code == 401
            assert (await panel_login(employee, "emp.one", new_password)).status_code == 303
            typed = await admin.post("/panel/admins/emp.one/password",
                                     data={"csrf_token": token, "password": "typed-password-2"})
            assert typed.status_code == 303
            assert (await panel_login(employee, "emp.one", "typed-password-2")).status_code == 303

    entries = server.store.audit_page(AuditQuery(channel="panel"), limit=200)
    actions = [(e.action, e.target, e.outcome) for e in entries]
    for expected in (("admin.users.create", "admin:emp.one", "ok"), ("admin.users.create", "admin:emp.one", "exists"),
                     ("admin.users.disable", "admin:emp.one", "ok"), ("admin.users.enable", "admin:emp.one", "ok"),
                     ("admin.users.password", "admin:emp.one", "ok")):
        assert expected in actions, expected
    disable = next(e for e in entries if e.action == "admin.users.disable")
    assert json.loads(disable.before_json) == {"disabled": False} and json.loads(disable.after_json) == {"disabled": True}
    dump = repr(entries)
    for secret in (password, new_password, "typed-password-2", "manager-pass-1"):
        assert secret not in dump
