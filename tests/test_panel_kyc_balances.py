"""Panel pages for KYC review, partner balances, the balance summary and fees (view tests over real
HTTPS): the queue and a form with its images, Accept and Reject through the REST decision code,
role and CSRF refusals, partner balances and the summary as the REST API reports them, an
idempotent reload, a threshold, and a fee edit the next authorization charges."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import trio

from authsrv.store.db import AuditQuery, PartnerBalanceType, Role
from tests.conftest import SEED_AMOUNT, SEED_USERS
from tests.isoclient import IsoClient, auth
from tests.restclient import admin_login, bearer, https, new_user_body
from tests.test_panel_core import admin_password, csrf_of, panel_login
from tests.test_rest_kyc import FORM, IMAGES, JPEG, PNG

pytestmark = pytest.mark.timeout(90)
PASSWORD = "a-long-passphrase-1"
DEMO_CONFIG_ID = "0019167984"
IMG = re.compile(r'<img src="(/panel/kyc/\d+/images/\w+)"')


async def login(client: httpx.AsyncClient, server, data_dir: Path, role: Role = Role.admin) -> None:
    if role is Role.admin:
        username, password = "admin", admin_password(data_dir)
    else:
        username, password = f"panel-{role.value.lower()}", PASSWORD
        if server.store.get_admin(username) is None:
            server.store.add_admin(username, role, password)
    client.cookies.clear()  # a new session (a logged-in browser is sent from the login page to the dashboard)
    reply = await panel_login(client, username, password)
    assert reply.status_code == 303, reply.text


async def submitted_form(server, data_dir: Path, images: dict = IMAGES) -> tuple[int, int]:
    """A new user of partner demo with a KYC form waiting for review: (customerId, formId)."""
    async with https(data_dir, server.rest_port, "partner") as partner:
        reply = await partner.post("/lifecycle/v1/wallet", json=new_user_body(kyc="PENDING"))
        assert reply.status_code == 201, reply.text
        customer_id = reply.json()["customerId"]
        reply = await partner.post(f"/secure/customers/{customer_id}/register", data=FORM, files=images)
        assert reply.status_code == 201, reply.text
        return customer_id, reply.json()["formId"]


def kyc_events(server, customer_id: int) -> list[tuple[str, dict]]:
    return [(event.kind, json.loads(event.body)) for event in server.store.events(partner="demo", limit=1000)
            if event.kind.startswith("kyc.") and event.subject == f"customer:{customer_id}"]


def panel_audit(server, action: str) -> list:
    return [entry for entry in server.store.audit_page(AuditQuery(channel="panel")) if entry.action == action]


# -- KYC ------------------------------------------------------------------------------------------------


async def test_queue_form_images_and_accept(server, data_dir: Path) -> None:
    customer_id, form_id = await submitted_form(server, data_dir)
    async with https(data_dir, server.rest_port) as client:
        await login(client, server, data_dir)
        queue = await client.get("/panel/kyc")
        assert queue.status_code == 200
        assert f'href="/panel/kyc/{form_id}"' in queue.text and f'href="/panel/users/{customer_id}"' in queue.text
        assert "Leon Bakiewicz" in queue.text
        page = await client.get(f"/panel/kyc/{form_id}")
        assert page.status_code == 200 and "ASD123456" in page.text and "Lublin" in page.text
        assert f'href="/panel/users/{customer_id}"' in page.text
        sources = IMG.findall(page.text)
        assert sorted(sources) == sorted(f"/panel/kyc/{form_id}/images/{name}" for name in IMAGES)
        front = await client.get(f"/panel/kyc/{form_id}/images/imageFront")
        assert front.status_code == 200 and front.content == JPEG
        assert front.headers["content-type"] == "image/jpeg" and front.headers["cache-control"] == "no-store"
        face = await client.get(f"/panel/kyc/{form_id}/images/imageFace")
        assert face.content == PNG and face.headers["content-type"] == "image/png"
        assert (await client.get(f"/panel/kyc/{form_id}/images/nope")).status_code == 404
        assert ">Accept</button>" in page.text and ">Reject</button>" in page.text

        reply = await client.post(f"/panel/kyc/{form_id}/accept", data={"csrf_token": csrf_of(page)})
        assert reply.status_code == 303 and reply.headers["location"] == f"/panel/kyc/{form_id}"
        decided = await client.get(f"/panel/kyc/{form_id}")
        assert "ACCEPTED" in decided.text and "already accepted" in decided.text
        assert ">Accept</button>" not in decided.text and ">Reject</button>" not in decided.text
        again = await client.post(f"/panel/kyc/{form_id}/accept", data={"csrf_token": csrf_of(page)})
        assert again.status_code == 409 and "already decided" in again.text
        # The decided form leaves the queue and shows under its filter.
        assert f'href="/panel/kyc/{form_id}"' not in (await client.get("/panel/kyc")).text
        accepted = await client.get("/panel/kyc", params={"state": "ACCEPTED"})
        assert f'href="/panel/kyc/{form_id}"' in accepted.text

    assert server.store.get_user(customer_id).kyc == "SUCCESS"
    assert [balance.currency for balance in server.store.balances_of_user(customer_id)] == ["EUR"]  # success hook
    events = kyc_events(server, customer_id)
    assert [kind for kind, _ in events] == ["kyc.submitted", "kyc.accepted"]
    assert events[-1][1] == {"customerId": customer_id, "formId": form_id, "status": "ACCEPTED", "reason": None}
    (entry, *_) = panel_audit(server, "kyc.accept")
    assert entry.outcome.startswith("refused") and entry.actor == "admin"  # the second accept, newest first
    ok = [e for e in panel_audit(server, "kyc.accept") if e.outcome == "ok"]
    assert len(ok) == 1 and json.loads(ok[0].before_json) == {"form": "PENDING", "reason": None, "userKyc": "PENDING"}
    assert json.loads(ok[0].after_json) == {"form": "ACCEPTED", "reason": None, "userKyc": "SUCCESS"}


async def test_panel_and_rest_accept_emit_the_same_event(server, data_dir: Path) -> None:
    by_panel, panel_form = await submitted_form(server, data_dir)
    by_rest, rest_form = await submitted_form(server, data_dir)
    async with https(data_dir, server.rest_port) as client:
        await login(client, server, data_dir, Role.manager)
        page = await client.get(f"/panel/kyc/{panel_form}")
        assert (await client.post(f"/panel/kyc/{panel_form}/accept", data={"csrf_token": csrf_of(page)})).status_code == 303
        token = await admin_login(client, "admin", admin_password(data_dir))
        assert (await client.post(f"/admin/kyc-forms/{rest_form}/accept", headers=bearer(token))).status_code == 200
    (panel_kind, panel_body), (rest_kind, rest_body) = kyc_events(server, by_panel)[-1], kyc_events(server, by_rest)[-1]
    assert panel_kind == rest_kind == "kyc.accepted"
    assert {**panel_body, "customerId": 0, "formId": 0} == {**rest_body, "customerId": 0, "formId": 0}
    assert server.store.get_kyc_form(panel_form).decided_by == "panel-manager"
    assert len(server.store.balances_of_user(by_panel)) == len(server.store.balances_of_user(by_rest)) == 1


async def test_reject_needs_a_reason(server, data_dir: Path) -> None:
    customer_id, form_id = await submitted_form(server, data_dir, images={"imageFront": IMAGES["imageFront"]})
    async with https(data_dir, server.rest_port) as client:
        await login(client, server, data_dir)
        page = await client.get(f"/panel/kyc/{form_id}")
        token = csrf_of(page)
        for reason in ("", "   ", "bad\x07bell", "x" * 257):
            refused = await client.post(f"/panel/kyc/{form_id}/reject", data={"csrf_token": token, "reason": reason})
            assert refused.status_code == 400 and 'role="alert"' in refused.text, reason
        assert server.store.get_kyc_form(form_id).state == "PENDING"
        reply = await client.post(f"/panel/kyc/{form_id}/reject",
                                  data={"csrf_token": token, "reason": "INVALID_CUSTOMER_DATA"})
        assert reply.status_code == 303
        decided = await client.get(f"/panel/kyc/{form_id}")
        assert "REJECTED" in decided.text and "INVALID_CUSTOMER_DATA" in decided.text
        assert ">Reject</button>" not in decided.text
    assert server.store.get_user(customer_id).kyc == "REJECTED"
    kind, body = kyc_events(server, customer_id)[-1]
    assert kind == "kyc.rejected" and body["reason"] == "INVALID_CUSTOMER_DATA" and body["status"] == "REJECTED"
    (entry,) = [e for e in panel_audit(server, "kyc.reject") if e.outcome == "ok"]
    assert json.loads(entry.after_json)["reason"] == "INVALID_CUSTOMER_DATA"


async def test_employee_sees_no_images_and_may_not_decide(server, data_dir: Path) -> None:
    customer_id, form_id = await submitted_form(server, data_dir)
    async with https(data_dir, server.rest_port) as client:
        await login(client, server, data_dir, Role.employee)
        assert f'href="/panel/kyc/{form_id}"' in (await client.get("/panel/kyc")).text
        assert "/images/" not in (await client.get("/panel/kyc")).text
        page = await client.get(f"/panel/kyc/{form_id}")
        assert page.status_code == 200 and "ASD123456" in page.text
        assert "<img" not in page.text and "/images/" not in page.text
        assert ">Accept</button>" not in page.text and ">Reject</button>" not in page.text
        image = await client.get(f"/panel/kyc/{form_id}/images/imageFront")
        assert image.status_code == 403 and JPEG not in image.content
        token = csrf_of(page)
        assert (await client.post(f"/panel/kyc/{form_id}/accept", data={"csrf_token": token})).status_code == 403
        assert (await client.post(f"/panel/kyc/{form_id}/reject",
                                  data={"csrf_token": token, "reason": "no"})).status_code == 403
    assert server.store.get_kyc_form(form_id).state == "PENDING"
    assert server.store.get_user(customer_id).kyc == "PENDING"


async def test_decisions_without_csrf_token_are_403(server, data_dir: Path) -> None:
    _, form_id = await submitted_form(server, data_dir)
    async with https(data_dir, server.rest_port) as client:
        await login(client, server, data_dir)
        assert (await client.post(f"/panel/kyc/{form_id}/accept", data={})).status_code == 403
        assert (await client.post(f"/panel/kyc/{form_id}/reject", data={"reason": "x", "csrf_token": "f"})).status_code == 403
        assert (await client.post("/panel/partner-balances/demo/DEPOSIT/EUR/reload",
                                  data={"amount": "1", "idempotency_key": "k" * 20})).status_code == 403
        assert (await client.post(f"/panel/fees/{DEMO_CONFIG_ID}", data={"pos_fixed": "1"})).status_code == 403
    assert server.store.get_kyc_form(form_id).state == "PENDING"


# -- partner balances and the summary -------------------------------------------------------------------


def amounts_in(page: str) -> str:
    return re.sub(r"\s+", " ", page)


def money(minor: int) -> str:
    return f"{minor // 100:,}.{minor % 100:02d}"


async def test_partner_balances_and_summary_match_the_rest_api(server, data_dir: Path, cards) -> None:
    iso = await IsoClient.connect(server.iso_port)
    try:  # a pending authorization: holds on the user balance and on the partner's deposit
        assert (await iso.call(auth(cards[0], amount=123_45)))["39"] == "00"
    finally:
        await iso.aclose()
    async with https(data_dir, server.rest_port) as client:
        token = await admin_login(client, "admin", admin_password(data_dir))
        (deposit,) = (await client.get("/admin/partner-balances", headers=bearer(token))).json()["partnerBalances"]
        (eur,) = (await client.get("/admin/summary", headers=bearer(token))).json()["currencies"]
        assert deposit["amount"] == SEED_USERS * SEED_AMOUNT and deposit["available"] == deposit["amount"] - 123_45
        assert eur["usersAvailable"] == eur["users"] - 123_45
        await login(client, server, data_dir, Role.employee)
        page = amounts_in((await client.get("/panel/partner-balances")).text)
        assert "demo" in page and "DEPOSIT" in page and "Reload</button>" not in page
        for value in (deposit["amount"], deposit["available"], deposit["amount"] - deposit["available"]):
            assert f">{money(value)}<" in page, value
        summary = amounts_in((await client.get("/panel/summary")).text)
        for key in ("users", "usersAvailable", "partners", "wallet"):
            assert f">{money(eur[key])}<" in summary, key
        assert "Wallet" in summary and "user and partner" in summary
        detail = await client.get("/panel/partner-balances/demo/DEPOSIT/EUR")
        assert detail.status_code == 200 and "reload" in detail.text  # the seed's funding, in the history
        assert (await client.get("/panel/partner-balances/demo/CREDIT/EUR")).status_code == 404


async def test_reload_is_applied_once_per_form_and_threshold(server, data_dir: Path) -> None:
    account = server.store.get_partner_balance("demo", PartnerBalanceType.deposit, "EUR").ledger_account_id
    before = server.ledger.ledger.balance(account).posted
    async with https(data_dir, server.rest_port) as client:
        await login(client, server, data_dir, Role.manager)
        page = await client.get("/panel/partner-balances")
        assert "Reload</button>" not in page.text
        key = "m" * 24
        refused = await client.post("/panel/partner-balances/demo/DEPOSIT/EUR/reload",
                                    data={"csrf_token": csrf_of(page), "amount": "10", "idempotency_key": key})
        assert refused.status_code == 403
        await login(client, server, data_dir)
        page = await client.get("/panel/partner-balances")
        assert "Reload</button>" in page.text and 'name="idempotency_key"' in page.text
        form = {"csrf_token": csrf_of(page), "amount": "1500.25",
                "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', page.text).group(1)}
        path = "/panel/partner-balances/demo/DEPOSIT/EUR/reload"
        first = await client.post(path, data=form)
        assert first.status_code == 303
        assert "Reloaded" in (await client.get(first.headers["location"])).text
        second = await client.post(path, data=form)  # the same form again: a double submit
        assert second.status_code == 303
        assert "already applied" in (await client.get(second.headers["location"])).text
        assert server.ledger.ledger.balance(account).posted == before + 1500_25
        racing = {**form, "amount": "0.75", "idempotency_key": "r" * 24}  # two submits at once
        statuses = []

        async def post() -> None:
            statuses.append((await client.post(path, data=racing)).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(post)
        assert statuses == [303, 303]
        assert server.ledger.ledger.balance(account).posted == before + 1500_25 + 75
        other_amount = await client.post(path, data={**form, "amount": "7"})
        assert other_amount.status_code == 409
        for bad in ("", "-5", "0", "1.234", "abc", "1e3"):
            reply = await client.post(path, data={**form, "amount": bad, "idempotency_key": "n" * 24})
            assert reply.status_code == 400 and 'role="alert"' in reply.text, bad
        assert (await client.post(path, data={**form, "idempotency_key": ""})).status_code == 400
        assert server.ledger.ledger.balance(account).posted == before + 1500_25 + 75
        events = [e for e in server.store.events(partner="demo", limit=1000) if e.kind == "partner_balance.reloaded"]
        assert sorted(json.loads(e.body)["amount"] for e in events) == [75, 1500_25]

        threshold = await client.post("/panel/partner-balances/demo/DEPOSIT/EUR/threshold",
                                      data={"csrf_token": form["csrf_token"], "low_threshold": "99999999.99"})
        assert threshold.status_code == 303
        token = await admin_login(client, "admin", admin_password(data_dir))
        view = (await client.get("/admin/partner-balances/demo/DEPOSIT/EUR", headers=bearer(token))).json()
        assert view["lowThreshold"] == 99_999_999_99 and view["amount"] == before + 1500_25 + 75
        low = [e for e in server.store.events(partner="demo", limit=1000) if e.kind == "partner_balance.low"]
        assert len(low) == 1  # the new threshold is itself a crossing
        bad = await client.post("/panel/partner-balances/demo/DEPOSIT/EUR/threshold",
                                data={"csrf_token": form["csrf_token"], "low_threshold": "-1"})
        assert bad.status_code == 400
    *_, entry = [e for e in panel_audit(server, "partner_balance.reload") if e.outcome == "ok"]  # the oldest
    assert json.loads(entry.before_json)["amount"] == before and json.loads(entry.after_json)["amount"] == before + 1500_25
    assert [e.outcome for e in panel_audit(server, "partner_balance.threshold")] == ["ok"]


# -- fees -----------------------------------------------------------------------------------------------


def available(server, card: dict) -> int:
    return server.ledger.ledger.balance(server.index.card_by_id(card["cardId"]).balance_account_id).available


async def test_a_fee_edit_is_charged_by_the_next_authorization(server, data_dir: Path, cards) -> None:
    iso = await IsoClient.connect(server.iso_port)
    try:
        first = await iso.call(auth(cards[0], amount=10_000))  # the switch caches the program's (empty) fees
        assert first["39"] == "00" and available(server, cards[0]) == SEED_AMOUNT - 10_000
        async with https(data_dir, server.rest_port) as client:
            await login(client, server, data_dir, Role.manager)
            page = await client.get("/panel/fees")
            assert page.status_code == 200 and DEMO_CONFIG_ID in page.text and "Currency conversion" in page.text
            assert f'action="/panel/fees/{DEMO_CONFIG_ID}"' not in page.text
            values = {key: "0" for key in ("account_creation", "card_creation", "monthly_per_card",
                                           "monthly_per_account", "pos_fixed", "pos_bp", "ecommerce_fixed",
                                           "ecommerce_bp", "atm_fixed", "atm_bp", "fx_bp", "monthly_waiver_spend")}
            form = {**values, "csrf_token": csrf_of(page), "pos_fixed": "50", "pos_bp": "100"}
            assert (await client.post(f"/panel/fees/{DEMO_CONFIG_ID}", data=form)).status_code == 403
            await login(client, server, data_dir)
            page = await client.get("/panel/fees")
            assert f'action="/panel/fees/{DEMO_CONFIG_ID}"' in page.text
            form["csrf_token"] = csrf_of(page)
            for key, bad in (("pos_fixed", "-1"), ("pos_bp", "10001"), ("atm_fixed", "1.5"), ("fx_bp", "")):
                reply = await client.post(f"/panel/fees/{DEMO_CONFIG_ID}", data={**form, key: bad})
                assert reply.status_code == 400 and 'role="alert"' in reply.text, (key, bad)
            assert server.store.get_program(DEMO_CONFIG_ID).fees_json == "{}"
            assert (await client.post("/panel/fees/nope", data=form)).status_code == 404
            reply = await client.post(f"/panel/fees/{DEMO_CONFIG_ID}", data=form)
            assert reply.status_code == 303
            shown = await client.get("/panel/fees")
            assert "this program" in shown.text and "1.00 %" in shown.text
        assert json.loads(server.store.get_program(DEMO_CONFIG_ID).fees_json) == {"pos_bp": 100, "pos_fixed": 50}
        second = await iso.call(auth(cards[2], amount=10_000))
        assert second["39"] == "00"
        assert available(server, cards[2]) == SEED_AMOUNT - 10_000 - 150  # 0.50 + 1 % of 100.00
    finally:
        await iso.aclose()
    (entry,) = panel_audit(server, "fees.edit")
    assert (json.loads(entry.before_json or "{}"), json.loads(entry.after_json)) == ({}, {"pos_bp": 100, "pos_fixed": 50})


def test_a_fee_edit_keeps_the_program_own_fees_and_adds_the_changed_ones(data_dir: Path) -> None:
    from authsrv.config import FeesConfig
    from authsrv.hotpath.fees import FeesError
    from authsrv.store.db import Store
    from authsrv.store.program_fees import FEE_KEYS, ProgramNotFound, edit_program_fees, fee_table

    defaults = FeesConfig(card_creation=100, atm_fixed=200)
    with Store.open(data_dir) as store:
        with store.transaction():
            store._conn.execute("UPDATE programs SET fees_json = ? WHERE config_id = ?",
                                ('{"atm_fixed": 200, "pos_bp": 10}', DEMO_CONFIG_ID))
        (program,) = fee_table(store, defaults)
        assert program.overridden == {"atm_fixed", "pos_bp"} and program.schedule.card_creation == 100
        values = {**{key: getattr(program.schedule, key) for key in FEE_KEYS}, "pos_bp": 20, "fx_bp": 150}
        edit = edit_program_fees(store, DEMO_CONFIG_ID, values, defaults)
        assert edit.before == {"atm_fixed": 200, "pos_bp": 10}
        # atm_fixed stays the program's own though equal to the default; card_creation keeps following it.
        assert edit.after == {"atm_fixed": 200, "pos_bp": 20, "fx_bp": 150}
        assert json.loads(store.get_program(DEMO_CONFIG_ID).fees_json) == edit.after
        with pytest.raises(FeesError, match="pos_fixed"):
            edit_program_fees(store, DEMO_CONFIG_ID, {**values, "pos_fixed": 10**9}, defaults)
        with pytest.raises(ProgramNotFound):
            edit_program_fees(store, "nope", values, defaults)
        assert json.loads(store.get_program(DEMO_CONFIG_ID).fees_json) == edit.after  # the refused edit changed nothing
