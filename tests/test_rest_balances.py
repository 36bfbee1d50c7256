"""User balances, partner balances and the summary over real HTTPS, on each channel they are offered on.

Partners: `demo` (internal balances, deposit collateral, the init program with IBANs and a balance
on KYC success), `other` (collateral credit: reloads charge its CREDIT balance) and `ext`
(external balances: no reload here).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from authsrv.iban import valid_iban
from authsrv.pki import client_ssl_context
from authsrv.rest.context import RestContext
from authsrv.rest.partner_balances import check_low_balances
from authsrv.store.db import NewCard, Role, Store
from authsrv.store.index import PAN_INDEX_LENGTH, CardStatus
from authsrv.store.init import DEMO_CONFIG_ID, DEMO_IBAN_BANK_CODE, DEMO_IBAN_COUNTRY
from authsrv.store.partners import add_partner
from ledger.types import AccountKind
from tests.conftest import SEED_AMOUNT, SEED_USERS, start_in_process

pytestmark = pytest.mark.timeout(60)
PROBLEM = "application/problem+json"
ROLES = ("Admin", "Manager", "Employee")
PASSWORDS = {"Manager": "manager-password-1", "Employee": "employee-password-1"}


def https(data_dir: Path, port: int, stem: str | None) -> httpx.AsyncClient:
    context = client_ssl_context(data_dir / "pki", stem)
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=20)


def assert_problem(reply: httpx.Response, status: int, title: str) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    body = reply.json()
    assert body["title"] == title and body["status"] == status and body["detail"], body
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def set_partner(data_dir: Path, store: Store, name: str, *, balance_mode: str, collateral: str) -> None:
    """What an operator does: edit the partner's table in authsrv.toml (and the store follows)."""
    path = data_dir / "authsrv.toml"
    head, _, table = path.read_text().partition(f"[partners.{name}]")
    assert table, name
    table = table.replace('balance_mode = "internal"', f'balance_mode = "{balance_mode}"', 1)
    table = table.replace('collateral = "deposit"', f'collateral = "{collateral}"', 1)
    path.write_text(f"{head}[partners.{name}]{table}")
    store.set_partner_modes(name, balance_mode=balance_mode, collateral=collateral)


@attrs.define
class World:
    handle: object
    demo: httpx.AsyncClient
    other: httpx.AsyncClient
    ext: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    tokens: dict[str, str]

    @property
    def store(self) -> Store:
        return self.handle.store

    def admin(self, role: str = "Admin") -> dict[str, str]:
        return bearer(self.tokens[role])

    async def user(self, partner: httpx.AsyncClient, *, kyc: str = "SUCCESS") -> tuple[int, str]:
        phone = f"4871{secrets.randbelow(10**9):09d}"
        body = {"firstName": "Ada", "lastName": "Lovelace", "phone": phone, "email": f"{phone}@example.com",
                "birthDate": "1990-12-10", "wPIN": "2468", "state": "VERIFIED", "kyc": kyc}
        reply = await partner.post("/lifecycle/v1/wallet", json=body)
        assert reply.status_code == 201, reply.text
        return reply.json()["customerId"], phone

    async def customer_token(self, phone: str) -> str:
        reply = await self.anonymous.post("/customers/sessions",
                                          json={"phone": phone, "wPIN": "2468", "deviceId": "phone-1"})
        assert reply.status_code in (200, 201), reply.text
        return reply.json()["token"]

    async def balance(self, partner: httpx.AsyncClient, customer_id: int, currency: str = "EUR") -> dict:
        reply = await partner.post(f"/secure/customers/{customer_id}/balances", json={"currency": currency})
        assert reply.status_code == 201, reply.text
        return reply.json()

    def ledger_balance(self, account_id: int):
        return self.handle.ledger.ledger.balance(account_id)

    def events(self, kind: str) -> list:
        return [event for event in self.store.events(limit=1000) if event.kind == kind]


@pytest.fixture
async def world(data_dir: Path):
    add_partner(data_dir, "other")
    add_partner(data_dir, "ext")
    with Store.open(data_dir) as store:
        set_partner(data_dir, store, "other", balance_mode="internal", collateral="credit")
        set_partner(data_dir, store, "ext", balance_mode="external", collateral="deposit")
        for role, password in PASSWORDS.items():
            store.add_admin(role.lower(), Role(role), password)
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir)
        port = handle.rest_port
        async with https(data_dir, port, "partner") as demo, https(data_dir, port, "other") as other, \
                https(data_dir, port, "ext") as ext, https(data_dir, port, None) as anonymous:  # fmt: skip
            tokens = {}
            logins = {"Admin": ("admin", (data_dir / "admin-password").read_text().strip()),
                      **{role: (role.lower(), password) for role, password in PASSWORDS.items()}}
            for role, (username, password) in logins.items():
                reply = await anonymous.post("/admin/sessions", json={"username": username, "password": password})
                assert reply.status_code in (200, 201), reply.text
                tokens[role] = reply.json()["token"]
            yield World(handle, demo, other, ext, anonymous, tokens)
        handle.stop.set()


# -- user balances ---------------------------------------------------------------------------------


async def test_create_list_get_on_each_channel(world: World) -> None:
    customer_id, phone = await world.user(world.demo)
    # The demo program opens a EUR balance on KYC success (here: created with kyc SUCCESS).
    auto = world.store.balances_of_user(customer_id)
    assert [(row.currency, row.status) for row in auto] == [("EUR", "ACTIVE")]

    created = await world.balance(world.demo, customer_id)
    assert set(created) == {"id", "currency", "iban"} and created["currency"] == "EUR"
    iban = created["iban"]
    assert valid_iban(iban) and iban.startswith(DEMO_IBAN_COUNTRY) and iban[4:12] == DEMO_IBAN_BANK_CODE
    assert iban.endswith(f"{created['id']:010d}") and iban != auto[0].iban and valid_iban(auto[0].iban)

    token = await world.customer_token(phone)
    reply = await world.anonymous.post("/customers/me/balances", json={"currency": "USD"}, headers=bearer(token))
    assert reply.status_code == 201, reply.text
    usd = reply.json()["id"]
    reply = await world.anonymous.get("/customers/me/balances", headers=bearer(token))
    assert reply.status_code == 200
    listed = reply.json()["balances"]
    assert [b["id"] for b in listed] == [auto[0].id, created["id"], usd]
    assert all(b["amount"] == 0 and b["available"] == 0 and b["status"] == "ACTIVE" and b["cards"] == []
               for b in listed)  # fmt: skip
    reply = await world.anonymous.get(f"/customers/me/balances/{usd}", headers=bearer(token))
    assert reply.status_code == 200 and reply.json()["currency"] == "USD"

    # Admin: every role reads; Admin and Manager create; Employee does not.
    root = f"/admin/customers/{customer_id}/balances"
    for role in ROLES:
        assert (await world.anonymous.get(root, headers=world.admin(role))).status_code == 200, role
        reply = await world.anonymous.get(f"{root}/{usd}", headers=world.admin(role))
        assert reply.status_code == 200 and reply.json()["id"] == usd, role
    for role in ("Admin", "Manager"):
        reply = await world.anonymous.post(root, json={"currency": "GBP"}, headers=world.admin(role))
        assert reply.status_code == 201, (role, reply.text)
    assert_problem(await world.anonymous.post(root, json={"currency": "GBP"}, headers=world.admin("Employee")),
                   403, "FORBIDDEN")
    assert len(world.store.balances_of_user(customer_id)) == 5
    created_events = [e for e in world.events("balance.created") if json.loads(e.body)["customerId"] == customer_id]
    assert len(created_events) == 5 and all(e.partner == "demo" for e in created_events)

    # The mobile channel offers no reload and no delete.
    reply = await world.anonymous.post(f"/customers/me/balances/{usd}/reload", json={"amount": 100},
                                       headers=bearer(token))
    assert reply.status_code in (404, 405)
    assert (await world.anonymous.delete(f"/customers/me/balances/{usd}", headers=bearer(token))).status_code in (
        404, 405)


async def test_kyc_gate_and_bad_input(world: World) -> None:
    customer_id, _ = await world.user(world.demo, kyc="PENDING")
    root = f"/secure/customers/{customer_id}/balances"
    assert_problem(await world.demo.post(root, json={"currency": "EUR"}), 403, "KYC_REQUIRED")
    assert world.store.balances_of_user(customer_id) == []
    reply = await world.demo.put(f"/lifecycle/v1/wallet/{customer_id}", json={"kyc": "SUCCESS"})
    assert reply.status_code == 200, reply.text
    (auto,) = (await world.demo.get(root)).json()["balances"]  # opened by the KYC hook
    assert auto["currency"] == "EUR" and valid_iban(auto["iban"])
    assert world.ledger_balance(world.store.get_balance(auto["id"]).ledger_account_id) is not None
    # KYC passing again (after a revocation) opens no second EUR balance.
    for kyc in ("PENDING", "SUCCESS"):
        assert (await world.demo.put(f"/lifecycle/v1/wallet/{customer_id}", json={"kyc": kyc})).status_code == 200
    assert len((await world.demo.get(root)).json()["balances"]) == 1

    for body in ({"currency": "XYZ"}, {"currency": "eur"}, {"currency": "EUR", "amount": 1}, {}, {"currency": 978}):
        assert_problem(await world.demo.post(root, json=body), 400, "INVALID_PAYLOAD")
    assert_problem(await world.demo.post(root, content=b"{nope", headers={"content-type": "application/json"}),
                   400, "INVALID_PAYLOAD")
    for balance_id in ("abc", "0", "999999999", "-1", "1" * 30):
        assert_problem(await world.demo.get(f"{root}/{balance_id}"), 404, "BALANCE_NOT_FOUND")
    # Another user's balance (same partner) is as unknown as a missing one.
    neighbour, _ = await world.user(world.demo)
    (theirs,) = world.store.balances_of_user(neighbour)
    assert_problem(await world.demo.get(f"{root}/{theirs.id}"), 404, "BALANCE_NOT_FOUND")
    assert_problem(await world.demo.post(f"{root}/{theirs.id}/reload", json={"amount": 5}), 404, "BALANCE_NOT_FOUND")
    for amount in (0, -5, 10**12, "5", 1.5):
        assert_problem(await world.demo.post(f"{root}/{auto['id']}/reload", json={"amount": amount}),
                       400, "INVALID_PAYLOAD")


async def test_partner_isolation(world: World) -> None:
    mine, _ = await world.user(world.demo)
    (balance,) = world.store.balances_of_user(mine)
    theirs, _ = await world.user(world.other)
    assert world.store.balances_of_user(theirs) == []  # `other` has no auto-balance program
    foreign = f"/secure/customers/{mine}/balances"
    assert_problem(await world.other.get(foreign), 404, "CUSTOMER_NOT_FOUND")
    assert_problem(await world.other.get(f"{foreign}/{balance.id}"), 404, "CUSTOMER_NOT_FOUND")
    assert_problem(await world.other.post(foreign, json={"currency": "EUR"}), 404, "CUSTOMER_NOT_FOUND")
    assert_problem(await world.other.post(f"{foreign}/{balance.id}/reload", json={"amount": 1}),
                   404, "CUSTOMER_NOT_FOUND")
    assert_problem(await world.other.delete(f"{foreign}/{balance.id}"), 404, "CUSTOMER_NOT_FOUND")
    # Its own customer's path with the demo user's balance id: not that customer's balance.
    own = f"/secure/customers/{theirs}/balances"
    assert_problem(await world.other.get(f"{own}/{balance.id}"), 404, "BALANCE_NOT_FOUND")
    assert_problem(await world.other.delete(f"{own}/{balance.id}"), 404, "BALANCE_NOT_FOUND")
    created = await world.balance(world.other, theirs)
    assert created["iban"] is None  # no program of `other` issues IBANs
    assert world.store.get_balance(balance.id).status == "ACTIVE"
    # Partner balances: each partner sees its own only.
    reply = await world.demo.get("/secure/partner-balances")
    assert reply.status_code == 200
    assert {b["partner"] for b in reply.json()["partnerBalances"]} == {"demo"}
    assert (await world.other.get("/secure/partner-balances")).json()["partnerBalances"] == []


async def test_reload_from_funding_with_idempotency_key(world: World) -> None:
    customer_id, _ = await world.user(world.demo)
    (balance,) = world.store.balances_of_user(customer_id)
    root = f"/secure/customers/{customer_id}/balances/{balance.id}"
    funding = world.store.ledger_account(AccountKind.funding, "EUR", "")
    funding_before = world.ledger_balance(funding.id).posted

    reply = await world.demo.post(f"{root}/reload", json={"amount": 50_00})
    assert reply.status_code == 200, reply.text
    assert (reply.json()["amount"], reply.json()["available"]) == (50_00, 50_00)
    keyed = {"X-Idempotency-Key": "reload-7f3a"}
    for _ in range(3):  # a retried request with the same key moves money once
        reply = await world.demo.post(f"{root}/reload", json={"amount": 10_00}, headers=keyed)
        assert reply.status_code == 200 and reply.json()["amount"] == 60_00, reply.text
    assert_problem(await world.demo.post(f"{root}/reload", json={"amount": 11_00}, headers=keyed),
                   409, "IDEMPOTENCY_KEY_REUSED")
    assert world.ledger_balance(balance.ledger_account_id).posted == 60_00
    assert world.ledger_balance(funding.id).posted == funding_before - 60_00
    reloaded = [json.loads(e.body) for e in world.events("balance.reloaded")]
    assert [(e["balanceId"], e["amount"], e["source"]) for e in reloaded] == [
        (balance.id, 50_00, "funding"), (balance.id, 10_00, "funding")]
    # Admin: Admin and Manager reload; Employee does not.
    admin_root = f"/admin/customers/{customer_id}/balances/{balance.id}"
    for role in ("Admin", "Manager"):
        reply = await world.anonymous.post(f"{admin_root}/reload", json={"amount": 1}, headers=world.admin(role))
        assert reply.status_code == 200, (role, reply.text)
    assert_problem(await world.anonymous.post(f"{admin_root}/reload", json={"amount": 1},
                                              headers=world.admin("Employee")), 403, "FORBIDDEN")
    assert world.ledger_balance(balance.ledger_account_id).posted == 60_02
    world.handle.ledger.ledger.check_invariants()


async def test_credit_partner_reload_charges_credit_and_low_threshold(world: World) -> None:
    customer_id, _ = await world.user(world.other)
    balance = await world.balance(world.other, customer_id)
    reload = f"/secure/customers/{customer_id}/balances/{balance['id']}/reload"
    assert_problem(await world.other.post(reload, json={"amount": 10_00}), 422, "INSUFFICIENT_FUNDS")  # no credit

    create = {"partner": "other", "type": "CREDIT", "currency": "EUR", "lowThreshold": 30_00}
    assert_problem(await world.anonymous.post("/admin/partner-balances", json=create, headers=world.admin("Manager")),
                   403, "FORBIDDEN")
    reply = await world.anonymous.post("/admin/partner-balances", json=create, headers=world.admin())
    assert reply.status_code == 201, reply.text
    assert reply.json() == {"partner": "other", "type": "CREDIT", "currency": "EUR", "amount": 0, "available": 0,
                            "lowThreshold": 30_00}
    assert_problem(await world.anonymous.post("/admin/partner-balances", json=create, headers=world.admin()),
                   409, "PARTNER_BALANCE_EXISTS")
    credit_path = "/admin/partner-balances/other/CREDIT/EUR"
    reply = await world.anonymous.post(f"{credit_path}/reload", json={"amount": 100_00}, headers=world.admin())
    assert reply.status_code == 200 and reply.json()["amount"] == 100_00, reply.text
    # The admin API's audit entry holds the balance before and after the reload.
    from authsrv.store.db import AuditQuery
    (entry,) = world.store.audit_page(AuditQuery(action="admin.partner_balance.reload"))
    assert entry.channel == "api" and entry.outcome == "HTTP 200"
    assert json.loads(entry.before_json)["amount"] == 0 and json.loads(entry.after_json)["amount"] == 100_00

    assert (await world.other.post(reload, json={"amount": 60_00})).json()["amount"] == 60_00  # credit: 40_00
    assert world.events("partner_balance.low") == []
    totals_before = world.handle.ledger.ledger.totals()
    assert_problem(await world.other.post(reload, json={"amount": 50_00}), 422, "INSUFFICIENT_FUNDS")
    assert world.handle.ledger.ledger.totals() == totals_before  # nothing moved
    assert (await world.anonymous.get(credit_path, headers=world.admin("Employee"))).json()["amount"] == 40_00
    retry = {"X-Idempotency-Key": "short-credit"}
    assert_problem(await world.other.post(reload, json={"amount": 50_00}, headers=retry), 422, "INSUFFICIENT_FUNDS")

    assert (await world.other.post(reload, json={"amount": 20_00})).status_code == 200  # credit 20_00 < 30_00
    assert len(world.events("partner_balance.low")) == 1
    assert (await world.other.post(reload, json={"amount": 5_00})).status_code == 200  # still low: no new event
    assert len(world.events("partner_balance.low")) == 1
    ctx = RestContext(store=world.store, ledger=world.handle.ledger)
    assert await check_low_balances(ctx) == []  # the tick finds nothing new either
    # Top-up above the threshold re-arms; the next crossing notifies again.
    reply = await world.anonymous.post(f"{credit_path}/reload", json={"amount": 100_00}, headers=world.admin())
    assert reply.json()["amount"] == 115_00
    # The key refused for a short credit balance is free again: now it reloads.
    assert (await world.other.post(reload, json={"amount": 50_00}, headers=retry)).json()["amount"] == 135_00
    assert (await world.other.post(reload, json={"amount": 40_00})).status_code == 200  # credit 25_00
    low = [json.loads(e.body) for e in world.events("partner_balance.low")]
    assert [(e["partner"], e["type"], e["available"]) for e in low] == [("other", "CREDIT", 20_00),
                                                                        ("other", "CREDIT", 25_00)]
    credit = world.store.get_partner_balance("other", "CREDIT", "EUR")
    user_account = world.store.get_balance(balance["id"]).ledger_account_id
    assert world.ledger_balance(credit.ledger_account_id).posted == 25_00
    assert world.ledger_balance(user_account).posted == 175_00
    world.handle.ledger.ledger.check_invariants()


async def test_external_partner_creates_but_does_not_reload(world: World) -> None:
    customer_id, _ = await world.user(world.ext)
    balance = await world.balance(world.ext, customer_id)
    path = f"/secure/customers/{customer_id}/balances/{balance['id']}/reload"
    assert_problem(await world.ext.post(path, json={"amount": 10_00}), 409, "EXTERNAL_BALANCE")
    assert (await world.ext.get(f"/secure/customers/{customer_id}/balances/{balance['id']}")).json()["amount"] == 0


async def test_delete_only_at_zero_without_cards(world: World) -> None:
    customer_id, _ = await world.user(world.demo)
    (funded,) = world.store.balances_of_user(customer_id)
    empty = await world.balance(world.demo, customer_id)
    root = f"/secure/customers/{customer_id}/balances"
    assert (await world.demo.post(f"{root}/{funded.id}/reload", json={"amount": 1})).status_code == 200
    assert_problem(await world.demo.delete(f"{root}/{funded.id}"), 409, "BALANCE_NOT_EMPTY")

    card = await trio.to_thread.run_sync(lambda: world.store.add_card(NewCard(
        user_id=customer_id, balance_id=empty["id"], config_id=DEMO_CONFIG_ID, card_type="virtual",
        pan_index=os.urandom(PAN_INDEX_LENGTH), pan_enc=b"not a real ciphertext", pan_first6="535522",
        pan_last4="0042", expiry_yymm="2912", status=CardStatus.active)))
    reply = await world.demo.get(f"{root}/{empty['id']}")
    assert reply.json()["cards"] == [{"id": card.id, "type": "virtual", "status": "ACTIVE",
                                      "maskedPan": "535522******0042"}]
    assert_problem(await world.demo.delete(f"{root}/{empty['id']}"), 409, "BALANCE_HAS_CARDS")
    await trio.to_thread.run_sync(world.store.set_card_status, card.id, CardStatus.removed)

    admin_path = f"/admin/customers/{customer_id}/balances/{empty['id']}"
    assert_problem(await world.anonymous.delete(admin_path, headers=world.admin("Manager")), 403, "FORBIDDEN")
    reply = await world.demo.delete(f"{root}/{empty['id']}")
    assert reply.status_code == 204, reply.text
    reply = await world.demo.get(f"{root}/{empty['id']}")
    assert reply.json()["status"] == "DELETED" and reply.json()["cards"] == []  # removed cards are gone
    assert_problem(await world.demo.delete(f"{root}/{empty['id']}"), 409, "BALANCE_NOT_ACTIVE")
    assert_problem(await world.demo.post(f"{root}/{empty['id']}/reload", json={"amount": 1}), 409,
                   "BALANCE_NOT_ACTIVE")
    (deleted,) = [json.loads(e.body) for e in world.events("balance.deleted")]
    assert deleted["balanceId"] == empty["id"] and deleted["status"] == "DELETED"
    # Admin (role Admin) deletes too.
    third = await world.balance(world.demo, customer_id)
    reply = await world.anonymous.delete(f"/admin/customers/{customer_id}/balances/{third['id']}",
                                         headers=world.admin())
    assert reply.status_code == 204, reply.text


# -- partner balances and the summary --------------------------------------------------------------


async def test_partner_balance_endpoints(world: World) -> None:
    for role in ROLES:
        reply = await world.anonymous.get("/admin/partner-balances?partner=demo", headers=world.admin(role))
        assert reply.status_code == 200, role
    (deposit,) = reply.json()["partnerBalances"]
    # init + seed funded the demo deposit with the seeded users' total.
    assert deposit == {"partner": "demo", "type": "DEPOSIT", "currency": "EUR", "amount": SEED_USERS * SEED_AMOUNT,
                       "available": SEED_USERS * SEED_AMOUNT, "lowThreshold": 0}
    path = "/admin/partner-balances/demo/DEPOSIT/EUR"
    assert (await world.anonymous.get(path, headers=world.admin("Employee"))).json() == deposit
    assert (await world.anonymous.get(path.replace("DEPOSIT", "deposit"), headers=world.admin())).json() == deposit
    for missing in ("/admin/partner-balances/demo/CREDIT/EUR", "/admin/partner-balances/demo/DEPOSIT/USD",
                    "/admin/partner-balances/nobody/DEPOSIT/EUR", "/admin/partner-balances/demo/OTHER/EUR"):
        assert_problem(await world.anonymous.get(missing, headers=world.admin()), 404, "PARTNER_BALANCE_NOT_FOUND")
    body = {"partner": "nobody", "type": "DEPOSIT", "currency": "EUR"}
    assert_problem(await world.anonymous.post("/admin/partner-balances", json=body, headers=world.admin()),
                   404, "PARTNER_NOT_FOUND")
    for bad in ({**body, "partner": "demo", "type": "LOAN"}, {**body, "partner": "demo", "currency": "ZZZ"},
                {**body, "partner": "demo", "lowThreshold": -1}):
        assert_problem(await world.anonymous.post("/admin/partner-balances", json=bad, headers=world.admin()),
                       400, "INVALID_PAYLOAD")
    assert_problem(await world.anonymous.post(f"{path}/reload", json={"amount": 1}, headers=world.admin("Manager")),
                   403, "FORBIDDEN")
    assert_problem(await world.anonymous.put(f"{path}/threshold", json={"lowThreshold": 1},
                                             headers=world.admin("Manager")), 403, "FORBIDDEN")
    # A threshold above what is available is itself a crossing: one event, at once.
    above = SEED_USERS * SEED_AMOUNT + 1
    reply = await world.anonymous.put(f"{path}/threshold", json={"lowThreshold": above}, headers=world.admin())
    assert reply.status_code == 200 and reply.json()["lowThreshold"] == above
    (low,) = world.events("partner_balance.low")
    assert low.partner == "demo" and json.loads(low.body)["available"] == SEED_USERS * SEED_AMOUNT
    reply = await world.anonymous.post(f"{path}/reload", json={"amount": 5}, headers=world.admin())
    assert reply.json()["amount"] == above + 4
    assert len(world.events("partner_balance.low")) == 1 and len(world.events("partner_balance.reloaded")) == 1
    # A new currency: the partner balance and the system accounts it needs appear together.
    body = {"partner": "demo", "type": "DEPOSIT", "currency": "USD", "lowThreshold": 10}
    reply = await world.anonymous.post("/admin/partner-balances", json=body, headers=world.admin())
    assert reply.status_code == 201, reply.text
    reply = await world.anonymous.post("/admin/partner-balances/demo/DEPOSIT/USD/reload", json={"amount": 7},
                                       headers=world.admin())
    assert reply.json()["amount"] == 7
    assert len(world.events("partner_balance.low")) == 2  # 7 < 10
    world.handle.ledger.ledger.check_invariants()


async def test_summary_sums_users_and_partners(world: World) -> None:
    def summary_of(reply: httpx.Response, currency: str = "EUR") -> dict:
        assert reply.status_code == 200, reply.text
        (entry,) = [entry for entry in reply.json()["currencies"] if entry["currency"] == currency]
        assert entry["wallet"] == entry["users"] + entry["partners"]
        return entry

    before = summary_of(await world.anonymous.get("/admin/summary", headers=world.admin("Employee")))
    # Independently: the seeded users' balances and the demo deposit.
    assert before["users"] == before["usersAvailable"] == SEED_USERS * SEED_AMOUNT
    assert before["partners"] == SEED_USERS * SEED_AMOUNT

    customer_id, _ = await world.user(world.demo)  # deposit partner: reload from funding
    (balance,) = world.store.balances_of_user(customer_id)
    await world.demo.post(f"/secure/customers/{customer_id}/balances/{balance.id}/reload", json={"amount": 12_34})
    after = summary_of(await world.anonymous.get("/admin/summary", headers=world.admin()))
    assert (after["users"], after["partners"]) == (before["users"] + 12_34, before["partners"])

    create = {"partner": "other", "type": "CREDIT", "currency": "EUR"}
    await world.anonymous.post("/admin/partner-balances", json=create, headers=world.admin())
    await world.anonymous.post("/admin/partner-balances/other/CREDIT/EUR/reload", json={"amount": 100_00},
                               headers=world.admin())
    other_id, _ = await world.user(world.other)
    other_balance = await world.balance(world.other, other_id)
    await world.other.post(f"/secure/customers/{other_id}/balances/{other_balance['id']}/reload",
                           json={"amount": 30_00})
    final = summary_of(await world.anonymous.get("/admin/summary", headers=world.admin("Manager")))
    # The credit reload moved money from a partner balance to a user balance: the wallet keeps it.
    assert final["users"] == after["users"] + 30_00
    assert final["partners"] == after["partners"] + 100_00 - 30_00
    assert final["wallet"] == after["wallet"] + 100_00
    user_sum = sum(world.ledger_balance(row.ledger_account_id).posted
                   for user in range(1, other_id + 1) for row in world.store.balances_of_user(user)
                   if row.currency == "EUR")  # fmt: skip
    assert final["users"] == user_sum


async def test_openapi_documents_the_balance_routes(world: World) -> None:
    paths = (await world.anonymous.get("/openapi.json")).json()["paths"]
    for path in ("/secure/customers/{customerId}/balances/{balanceId}/reload", "/customers/me/balances",
                 "/admin/customers/{customerId}/balances/{balanceId}", "/admin/partner-balances",
                 "/admin/partner-balances/{partner}/{type}/{currency}/threshold", "/admin/summary",
                 "/secure/partner-balances"):
        assert path in paths, path
    assert paths["/admin/customers/{customerId}/balances/{balanceId}"]["delete"]["x-admin-roles"] == ["Admin"]
    assert "delete" not in paths["/customers/me/balances/{balanceId}"]
