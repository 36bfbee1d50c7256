"""The card lifecycle over real HTTPS on every channel, checked on the ISO 8583 port.

Card data comes back as JWE and is decrypted with jwcrypto (tests/restclient.py), not the
server's joserfc; authorizations go through tests/isoclient.py, an independent ISO peer.
Balances are opened through the store and the running ledger (the balances API is tested
elsewhere), so these tests depend only on the card endpoints and the sessions they need.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio

import authsrv.app
from authsrv import cardsec
from authsrv.rest import money
from authsrv.rest.cards import CardsApi
from authsrv.rest.cards_worker import AsyncCardRequest
from authsrv.rest.context import RestContext
from authsrv.store.db import ManagementTransferCode, ProgramRow
from authsrv.store.partners import add_partner
from ledger.types import TransferSpec
from simulators.bureau import BureauState, serve_bureau
from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth
from tests.restclient import (
    Customer,
    admin_login,
    assert_problem,
    bearer,
    create_customer,
    customer_login,
    decrypt,
    encrypt_for,
    https,
    jwe_headers,
)

pytestmark = pytest.mark.timeout(60)
CONFIG_ID = "0019167984"  # the demo program of `authsrv init`
FUNDS = 50_000


@attrs.define
class Rest:
    handle: object
    ctx: RestContext
    data_dir: Path
    demo: httpx.AsyncClient
    other: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    iso: IsoClient
    bureau: BureauState | None

    @property
    def api(self) -> CardsApi:
        return CardsApi.of(self.ctx)

    async def customer(self, **overrides) -> Customer:
        return await create_customer(self.demo, **overrides)

    async def balance(self, customer_id: int, currency: str = "EUR", amount: int = FUNDS) -> int:
        """A funded balance, made the way the balances API does: store first, then the ledger."""
        store, ledger = self.handle.store, self.handle.ledger
        row, spec = store.create_balance(customer_id, currency)
        accounts = [*store.ensure_system_accounts(currency), spec]
        (transfer_id,) = store.allocate_transfer_ids(1)
        funding = store.system_accounts("funding")[currency]
        await money.submit(ledger, accounts=accounts, transfers=[TransferSpec(
            transfer_id, funding, spec.id, amount, code=ManagementTransferCode.user_funding)])
        return row.id

    async def virtual(self, customer_id: int, balance_id: int, http: httpx.AsyncClient | None = None,
                      root: str | None = None) -> dict:
        http = http or self.demo
        root = root or f"/secure/customers/{customer_id}"
        reply = await http.post(f"{root}/cards/virtual", json={"balanceId": balance_id, "configId": CONFIG_ID},
                                headers=jwe_headers())
        assert reply.status_code == 201, reply.text
        return decrypt(reply)

    def events(self, kind: str) -> list[dict]:
        return [json.loads(event.body) for event in self.handle.store.events(partner="demo", limit=1000)
                if event.kind == kind]  # fmt: skip


async def _cancellable(scope: trio.CancelScope, function, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with scope:
        await function(task_status=task_status)


async def start(nursery, data_dir: Path, monkeypatch, **overrides) -> tuple[object, RestContext, trio.CancelScope]:
    """The server in-process, and the context it built; stop with `stop(handle)` (the nursery
    then ends by itself: cancelling anycorn mid-shutdown makes its lifespan fail)."""
    contexts: list[RestContext] = []
    make_context = authsrv.app.make_context

    def capturing(*args, **kwargs):
        contexts.append(make_context(*args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(authsrv.app, "make_context", capturing)
    handle = await start_in_process(nursery, data_dir, **overrides)
    (ctx,) = contexts
    api = CardsApi.of(ctx)
    await trio.sleep(0)
    extras = trio.CancelScope()
    if not api.worker.running:
        # The server's nursery is where `CardsApi.run` belongs (test_worker_runs_in_the_server
        # checks it does); run it here so the other tests test the cards, not the wiring.
        await nursery.start(partial(_cancellable, extras, api.run))
    return handle, ctx, extras


def stop(handle, extras: trio.CancelScope) -> None:
    extras.cancel()
    handle.stop.set()


@pytest.fixture
async def rest(data_dir: Path, monkeypatch, request):
    add_partner(data_dir, "other")
    bureau_delay_s = getattr(request, "param", None)
    async with trio.open_nursery() as nursery:
        overrides, bureau, bureau_stop = {}, None, trio.Event()
        if bureau_delay_s is not None:
            bureau = BureauState(delay_s=bureau_delay_s)
            port = await nursery.start(partial(serve_bureau, port=0, delay_s=bureau_delay_s, state=bureau,
                                               shutdown=bureau_stop))
            overrides = {"bureau__url": f"http://127.0.0.1:{port}", "bureau__poll_interval_s": 0.05}
        handle, ctx, extras = await start(nursery, data_dir, monkeypatch, **overrides)
        iso = await IsoClient.connect(handle.iso_port)
        async with https(data_dir, handle.rest_port, "partner") as demo, \
                https(data_dir, handle.rest_port, "other") as other, \
                https(data_dir, handle.rest_port) as anonymous:  # fmt: skip
            yield Rest(handle, ctx, data_dir, demo, other, anonymous, iso, bureau)
        await iso.aclose()
        stop(handle, extras)
        bureau_stop.set()


async def authorize(rest: Rest, card: dict, *, amount: int = 1000, **more) -> dict:
    wire = {"pan": card["cardNo"], "expiry": card["expiry"]}
    return await rest.iso.call(auth(wire, amount=amount, **more))


async def customer_session(rest: Rest, customer: Customer) -> httpx.AsyncClient:
    token = await customer_login(rest.anonymous, customer, device=f"device-{customer.customer_id}")
    return https(rest.data_dir, rest.handle.rest_port, headers=bearer(token))


def assert_no_card_data(text: str, *cards: dict) -> None:
    for card in cards:
        assert card["cardNo"] not in text
        assert f'"{card["cvv"]}"' not in text and f"cvv={card['cvv']}" not in text


# -- issuing and the switch ------------------------------------------------------------------------


async def test_virtual_card_authorizes_and_an_irreversible_lock_stays(rest: Rest, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    customer = await rest.customer()
    balance_id = await rest.balance(customer.customer_id)
    card = await rest.virtual(customer.customer_id, balance_id)
    assert cardsec.luhn_valid(card["cardNo"]) and card["cardNo"].startswith("535522") and len(card["cardNo"]) == 16
    assert card["type"] == "virtual" and card["balanceId"] == balance_id and len(card["cvv"]) == 3
    assert card["exp"][2:4] == card["expiry"][:2] and card["exp"][5:7] == card["expiry"][2:]
    assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] == "00"
    wrong = f"{(int(card['cvv']) + 1) % 1000:03d}"
    assert (await authorize(rest, card, cvc2=wrong))["39"] == "N7"

    path = f"/secure/customers/{customer.customer_id}/cards/{card['id']}"
    reply = await rest.demo.post(f"{path}/lock", json={"reason": 1})
    assert reply.status_code == 200 and reply.json()["status"] == "LOCKED" and reply.json()["lockReason"] == 1
    declined = await authorize(rest, card, cvc2=card["cvv"])
    assert declined["39"] == "41" and declined["44"] == "2008"
    assert_problem(await rest.demo.post(f"{path}/unlock"), 409, "CARD_LOCKED_IRREVERSIBLY")
    reply = await rest.demo.post(f"{path}/lock", json={"reason": 3})  # cannot soften an irreversible lock
    assert reply.json()["lockReason"] == 1
    assert (await authorize(rest, card))["39"] == "41"

    created, locked = rest.events("card.created"), rest.events("card.locked")
    assert [event["cardId"] for event in created] == [card["id"]]
    assert created[0]["maskedPan"] == card["cardNo"][:6] + "******" + card["cardNo"][-4:]
    assert locked[0]["reason"] == 1 and locked[0]["customerId"] == customer.customer_id
    events_text = json.dumps([event.body for event in rest.handle.store.events(limit=1000)])
    assert_no_card_data(events_text + caplog.text, card)


async def test_reversible_lock_unlock_and_remove(rest: Rest) -> None:
    customer = await rest.customer()
    card = await rest.virtual(customer.customer_id, await rest.balance(customer.customer_id))
    path = f"/secure/customers/{customer.customer_id}/cards/{card['id']}"
    assert (await rest.demo.post(f"{path}/lock", json={"reason": 3})).status_code == 200
    assert (await authorize(rest, card))["39"] == "05"
    reply = await rest.demo.post(f"{path}/unlock")
    assert reply.status_code == 200 and reply.json()["status"] == "ACTIVE", reply.text
    assert (await authorize(rest, card))["39"] == "00"
    assert_problem(await rest.demo.post(f"{path}/unlock"), 409, "CARD_NOT_LOCKED")
    for body in ({"reason": 0}, {"reason": 9}, {"reason": "1"}, {}, {"reason": 1, "pan": "1"}):
        assert_problem(await rest.demo.post(f"{path}/lock", json=body), 400, "INVALID_PAYLOAD")

    http = await customer_session(rest, customer)
    async with http:
        assert (await http.delete(f"/customers/me/cards/{card['id']}")).status_code == 204
        assert (await authorize(rest, card))["39"] == "14"
        assert_problem(await http.delete(f"/customers/me/cards/{card['id']}"), 404, "CARD_NOT_FOUND")
        assert_problem(await http.post(f"/customers/me/cards/{card['id']}/unlock"), 404, "CARD_NOT_FOUND")
        assert (await http.get("/customers/me/cards")).json() == {"cards": []}
    assert_problem(await rest.demo.get(path, headers=jwe_headers()), 404, "CARD_NOT_FOUND")
    assert rest.events("card.removed")[0]["status"] == "REMOVED"


async def test_card_data_needs_a_client_key_before_anything_changes(rest: Rest) -> None:
    customer = await rest.customer()
    balance_id = await rest.balance(customer.customer_id)
    root = f"/secure/customers/{customer.customer_id}"
    body = {"balanceId": balance_id, "configId": CONFIG_ID}
    assert_problem(await rest.demo.post(f"{root}/cards/virtual", json=body), 400, "ENCRYPTION_REQUIRED")
    bad_key = {"Public-Key": "bm90IGEga2V5", "Encrypt-Response": "true"}
    assert_problem(await rest.demo.post(f"{root}/cards/virtual", json=body, headers=bad_key),
                   400, "INVALID_PUBLIC_KEY")
    order = {**body, "deliveryAddress": {"street": "Main 1", "city": "Lublin", "postCode": "20-001",
                                         "country": "PL"}}  # fmt: skip
    assert_problem(await rest.demo.post(f"{root}/cards/physical", json=order), 400, "ENCRYPTION_REQUIRED")
    assert rest.handle.store.cards_of_user(customer.customer_id) == []

    card = await rest.virtual(customer.customer_id, balance_id)
    assert_problem(await rest.demo.get(f"{root}/cards/{card['id']}"), 400, "ENCRYPTION_REQUIRED")
    assert_problem(await rest.demo.post(f"{root}/cards/{card['id']}/print"), 400, "ENCRYPTION_REQUIRED")
    assert rest.handle.store.get_card(card["id"]).card_type == "virtual"
    full = decrypt(await rest.demo.get(f"{root}/cards/{card['id']}", headers=jwe_headers()))
    assert full == card
    listed = (await rest.demo.get(f"{root}/cards")).json()["cards"]
    assert listed == [{"id": card["id"], "type": "virtual", "status": "ACTIVE", "lockReason": 0,
                       "maskedPan": card["cardNo"][:6] + "******" + card["cardNo"][-4:],
                       "balanceId": balance_id, "orderState": ""}]  # fmt: skip


async def test_issuing_rules(rest: Rest) -> None:
    pending = await rest.customer(kyc="PENDING")
    verified = await rest.customer()
    stranger = await rest.customer()
    own = await rest.balance(verified.customer_id)
    foreign = await rest.balance(stranger.customer_id)
    dollars = await rest.balance(verified.customer_id, "USD")
    rest.handle.store.add_program(ProgramRow("OTHER00001", "other", "535523", "virtual", "EUR", 3))

    async def create(customer_id: int, balance_id: int, config_id: str = CONFIG_ID, http=None):
        return await (http or rest.demo).post(f"/secure/customers/{customer_id}/cards/virtual",
                                              json={"balanceId": balance_id, "configId": config_id},
                                              headers=jwe_headers())

    assert_problem(await create(pending.customer_id, own), 403, "KYC_REQUIRED")
    assert_problem(await create(verified.customer_id, foreign), 404, "BALANCE_NOT_FOUND")
    assert_problem(await create(verified.customer_id, 999_999), 404, "BALANCE_NOT_FOUND")
    assert_problem(await create(verified.customer_id, own, "9999999999"), 404, "CONFIG_NOT_FOUND")
    assert_problem(await create(verified.customer_id, own, "OTHER00001"), 404, "CONFIG_NOT_FOUND")
    assert_problem(await create(verified.customer_id, dollars), 400, "CURRENCY_MISMATCH")
    assert_problem(await create(verified.customer_id, own, http=rest.other), 404, "CUSTOMER_NOT_FOUND")
    assert_problem(await create(999_999, own), 404, "CUSTOMER_NOT_FOUND")
    rest.handle.store.set_balance_status(own, "CLOSED")
    assert_problem(await create(verified.customer_id, own), 404, "BALANCE_NOT_FOUND")
    rest.handle.store.set_balance_status(own, "ACTIVE")
    for body in (b"{", b"[]", b'{"balanceId": "1", "configId": "0019167984"}', b'{"balanceId": 1}',
                 b'{"balanceId": 0, "configId": "0019167984"}',
                 b'{"balanceId": 1, "configId": "0019167984", "cardNo": "5355220000000000"}'):
        reply = await rest.demo.post(f"/secure/customers/{verified.customer_id}/cards/virtual", content=body,
                                     headers={**jwe_headers(), "content-type": "application/json"})
        assert_problem(reply, 400, "INVALID_PAYLOAD")
    assert rest.handle.store.cards_of_user(verified.customer_id) == []
    assert (await create(verified.customer_id, own)).status_code == 201


# -- the customer channel --------------------------------------------------------------------------


async def test_customer_channel_and_user_isolation(rest: Rest, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    alice, bob = await rest.customer(), await rest.customer()
    alice_balance = await rest.balance(alice.customer_id)
    await rest.balance(bob.customer_id)
    http_a, http_b = await customer_session(rest, alice), await customer_session(rest, bob)
    async with http_a, http_b:
        card = await rest.virtual(alice.customer_id, alice_balance, http=http_a, root="/customers/me")
        assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] == "00"
        assert [c["id"] for c in (await http_a.get("/customers/me/cards")).json()["cards"]] == [card["id"]]
        full = decrypt(await http_a.get(f"/customers/me/cards/{card['id']}", headers=jwe_headers()))
        assert full["cardNo"] == card["cardNo"] and full["cvv"] == card["cvv"]

        # Bob sees nothing of Alice's card, on any action, exactly as if it did not exist.
        path = f"/customers/me/cards/{card['id']}"
        assert_problem(await http_b.get(path, headers=jwe_headers()), 404, "CARD_NOT_FOUND")
        assert_problem(await http_b.post(f"{path}/lock", json={"reason": 3}), 404, "CARD_NOT_FOUND")
        assert_problem(await http_b.delete(path), 404, "CARD_NOT_FOUND")
        assert_problem(await http_b.post(f"{path}/cvv", headers=jwe_headers()), 404, "CARD_NOT_FOUND")
        assert (await http_b.get("/customers/me/cards")).json() == {"cards": []}
        reply = await http_b.post("/customers/me/cards/virtual", json={"balanceId": alice_balance,
                                                                      "configId": CONFIG_ID}, headers=jwe_headers())
        assert_problem(reply, 404, "BALANCE_NOT_FOUND")
        assert_problem(await rest.other.get(f"/secure/customers/{alice.customer_id}/cards"), 404,
                       "CUSTOMER_NOT_FOUND")
        assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] == "00"

        # Reset CVV: the old CVC2 declines from the next message, the new one approves.
        assert_problem(await http_a.post(f"{path}/cvv"), 400, "ENCRYPTION_REQUIRED")
        reset = decrypt(await http_a.post(f"{path}/cvv", headers=jwe_headers()))
        assert reset["id"] == card["id"] and len(reset["cvv"]) == 3
        if reset["cvv"] != card["cvv"]:  # 1 in 1,000 the new value equals the old one
            assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] == "N7"
        assert (await authorize(rest, card, cvc2=reset["cvv"]))["39"] == "00"
        assert decrypt(await http_a.get(path, headers=jwe_headers()))["cvv"] == reset["cvv"]
        # Set PIN is for physical and digital-first cards only.
        pin_body = encrypt_for(rest.ctx.jwe.server_key.public_pem, {"pin": "4321"})
        reply = await http_a.post(f"{path}/pin", json=pin_body, headers={"Encrypted-Request": "true"})
        assert_problem(reply, 409, "CARD_TYPE_NOT_SUPPORTED")
    events = json.dumps([event.body for event in rest.handle.store.events(limit=1000)])
    assert_no_card_data(events + caplog.text, card, {**card, "cvv": reset["cvv"]})
    assert rest.events("card.cvv_reset")[0]["cardId"] == card["id"]


# -- channels and roles ----------------------------------------------------------------------------


async def test_channels_and_admin_roles(rest: Rest) -> None:
    customer = await rest.customer()
    balance_id = await rest.balance(customer.customer_id)
    card = await rest.virtual(customer.customer_id, balance_id)
    password = (rest.data_dir / "admin-password").read_text().strip()
    admin = https(rest.data_dir, rest.handle.rest_port,
                  headers=bearer(await admin_login(rest.anonymous, "admin", password)))
    async with admin:
        for role in ("Manager", "Employee"):
            reply = await admin.post("/admin/users", json={"username": role.lower() + "1", "password": "secret-pass-1",
                                                          "role": role})
            assert reply.status_code in (200, 201), reply.text
    employee = https(rest.data_dir, rest.handle.rest_port,
                     headers=bearer(await admin_login(rest.anonymous, "employee1", "secret-pass-1")))
    manager = https(rest.data_dir, rest.handle.rest_port,
                    headers=bearer(await admin_login(rest.anonymous, "manager1", "secret-pass-1")))
    admin = https(rest.data_dir, rest.handle.rest_port,
                  headers=bearer(await admin_login(rest.anonymous, "admin", password)))
    root = f"/admin/customers/{customer.customer_id}"
    body = {"balanceId": balance_id, "configId": CONFIG_ID}
    async with admin, manager, employee:
        # Create virtual: Admin and Manager; the admin channel never gets the card number or CVV.
        for http in (admin, manager):
            reply = await http.post(f"{root}/cards/virtual", json=body, headers=jwe_headers())
            assert reply.status_code == 201, reply.text
            made = decrypt(reply)
            assert "cardNo" not in made and "cvv" not in made and made["maskedPan"].startswith("535522")
        assert_problem(await employee.post(f"{root}/cards/virtual", json=body, headers=jwe_headers()), 403,
                       "FORBIDDEN")
        # Not on the admin channel at all: async create, lock, unlock, remove, full data, PIN.
        assert (await admin.post(f"{root}/cards/virtual/async", json=body)).status_code in (404, 405)
        for method, suffix in (("POST", "/lock"), ("POST", "/unlock"), ("DELETE", ""), ("GET", ""),
                               ("POST", "/pin"), ("POST", "/cvv")):
            reply = await admin.request(method, f"{root}/cards/{card['id']}{suffix}", json={"reason": 3})
            assert reply.status_code in (404, 405), (method, suffix, reply.text)
        # Every role lists, and resets a CVV without seeing it.
        for http in (admin, manager, employee):
            listed = (await http.get(f"{root}/cards")).json()["cards"]
            assert card["id"] in [c["id"] for c in listed]
            assert_problem(await http.post(f"/admin/cards/{card['id']}/cvv"), 400, "ENCRYPTION_REQUIRED")
            reset = decrypt(await http.post(f"/admin/cards/{card['id']}/cvv", headers=jwe_headers()))
            assert reset["id"] == card["id"] and "cvv" not in reset
        assert_problem(await employee.post("/admin/cards/999999/cvv", headers=jwe_headers()), 404, "CARD_NOT_FOUND")
        assert rest.handle.store.get_card(card["id"]).cvv_version == 3
        assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] in ("N7", "00")  # 00: 1 in 1,000
    # The partner channel has no remove, reset CVV or set PIN.
    path = f"/secure/customers/{customer.customer_id}/cards/{card['id']}"
    assert (await rest.demo.delete(path)).status_code == 405
    assert (await rest.demo.post(f"{path}/cvv", headers=jwe_headers())).status_code == 404
    assert (await rest.demo.post(f"{path}/pin", json={})).status_code == 404
    assert (await rest.anonymous.get(f"{path}/../..")).status_code in (401, 404)
    assert_problem(await rest.anonymous.get(f"/customers/me/cards"), 401, "UNAUTHORIZED")


# -- physical and digital-first cards, the bureau --------------------------------------------------


async def wait_linked(rest: Rest, customer_id: int, card_id: int, timeout_s: float = 10) -> dict:
    with trio.fail_after(timeout_s):
        while True:
            listed = (await rest.demo.get(f"/secure/customers/{customer_id}/cards")).json()["cards"]
            found = [card for card in listed if card["id"] == card_id and card["orderState"] == "LINKED"]
            if found:
                return found[0]
            await trio.sleep(0.05)


ADDRESS = {"street": "Krakowskie Przedmiescie 1", "city": "Lublin", "postCode": "20-002", "country": "PL"}


@pytest.mark.parametrize("rest", [0.2], indirect=True)
async def test_physical_card_is_produced_linked_activated_and_gets_a_pin(rest: Rest, zpk: bytes, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    customer = await rest.customer()
    balance_id = await rest.balance(customer.customer_id)
    root = f"/secure/customers/{customer.customer_id}"
    reply = await rest.demo.post(f"{root}/cards/physical", headers=jwe_headers(),
                                 json={"balanceId": balance_id, "configId": CONFIG_ID, "deliveryAddress": ADDRESS,
                                       "nameOnCard": "ADA LOVELACE"})  # fmt: skip
    assert reply.status_code == 201, reply.text
    ordered = decrypt(reply)
    assert ordered["status"] == "INACTIVE" and ordered["orderState"] == "ORDERED" and ordered["type"] == "physical"
    card_id = ordered["id"]
    # Invisible until linked ("around 48 hours after ordering").
    assert (await rest.demo.get(f"{root}/cards")).json() == {"cards": []}
    assert_problem(await rest.demo.get(f"{root}/cards/{card_id}", headers=jwe_headers()), 404, "CARD_NOT_FOUND")
    assert_problem(await rest.demo.post(f"{root}/cards/{card_id}/activate"), 404, "CARD_NOT_FOUND")

    linked = await wait_linked(rest, customer.customer_id, card_id)
    assert linked["status"] == "INACTIVE"
    (order,) = rest.bureau.orders.values()
    assert order.reference == f"card-{card_id}" and order.acknowledged and order.name_on_card == "ADA LOVELACE"
    assert order.delivery_address["city"] == "Lublin"
    details = json.loads(rest.handle.store.get_card(card_id).order_json)
    assert details["trackingNumber"] == order.tracking_number
    assert rest.events("card.linked")[0]["trackingNumber"] == order.tracking_number

    card = decrypt(await rest.demo.get(f"{root}/cards/{card_id}", headers=jwe_headers()))
    assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] == "78"
    assert_problem(await rest.demo.post(f"{root}/cards/{card_id}/print", headers=jwe_headers()), 409,
                   "CARD_TYPE_NOT_SUPPORTED")
    reply = await rest.demo.post(f"{root}/cards/{card_id}/activate")
    assert reply.status_code == 200 and reply.json()["status"] == "ACTIVE", reply.text
    assert_problem(await rest.demo.post(f"{root}/cards/{card_id}/activate"), 409, "CARD_NOT_ACTIVATABLE")
    assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] == "00"

    http = await customer_session(rest, customer)
    async with http:
        path = f"/customers/me/cards/{card_id}/pin"
        assert_problem(await http.post(path, json={"pin": "4321"}), 400, "ENCRYPTION_REQUIRED")
        assert_problem(await http.post(f"/customers/me/cards/{card_id}/cvv", headers=jwe_headers()), 409,
                       "CARD_TYPE_NOT_SUPPORTED")
        server_pem = rest.ctx.jwe.server_key.public_pem
        bad = encrypt_for(server_pem, {"pin": "77"})
        problem = assert_problem(await http.post(path, json=bad, headers={"Encrypted-Request": "true"}), 400,
                                 "INVALID_PAYLOAD")
        assert "77" not in problem["detail"]
        reply = await http.post(path, json=encrypt_for(server_pem, {"pin": "4321"}),
                                headers={"Encrypted-Request": "true"})
        assert reply.status_code == 204, reply.text
    block = cardsec.encrypt_pin_block("4321", card["cardNo"], zpk)
    atm = await authorize(rest, card, mti="0200", processing="010000", amount=2000, pin_block=block)
    assert atm["39"] == "00"
    assert rest.events("card.pin_set")[0]["cardId"] == card_id
    assert rest.events("card.activated")[0]["status"] == "ACTIVE"
    events = json.dumps([event.body for event in rest.handle.store.events(limit=1000)])
    assert_no_card_data(events + caplog.text, card)
    assert "4321" not in events and "4321" not in caplog.text


@pytest.mark.parametrize("rest", [0.1], indirect=True)
async def test_print_virtual_keeps_the_card_working(rest: Rest, zpk: bytes) -> None:
    customer = await rest.customer()
    card = await rest.virtual(customer.customer_id, await rest.balance(customer.customer_id))
    root = f"/secure/customers/{customer.customer_id}/cards/{card['id']}"
    reply = await rest.demo.post(f"{root}/print", headers=jwe_headers())
    assert reply.status_code == 200, reply.text
    printed = decrypt(reply)
    assert printed["type"] == "digital_first" and printed["status"] == "ACTIVE" and printed["orderState"] == "ORDERED"
    assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] == "00"  # same PAN, no activation
    assert_problem(await rest.demo.post(f"{root}/print", headers=jwe_headers()), 409, "CARD_ALREADY_ORDERED")
    linked = await wait_linked(rest, customer.customer_id, card["id"])
    assert linked["type"] == "digital_first" and linked["status"] == "ACTIVE"
    assert_problem(await rest.demo.post(f"{root}/activate"), 409, "CARD_NOT_ACTIVATABLE")
    http = await customer_session(rest, customer)
    async with http:
        pin = encrypt_for(rest.ctx.jwe.server_key.public_pem, {"pin": "908172"})
        reply = await http.post(f"/customers/me/cards/{card['id']}/pin", json=pin, headers={"Encrypted-Request": "true"})
        assert reply.status_code == 204, reply.text
        reset = decrypt(await http.post(f"/customers/me/cards/{card['id']}/cvv", headers=jwe_headers()))
    block = cardsec.encrypt_pin_block("908172", card["cardNo"], zpk)
    assert (await authorize(rest, card, pin_block=block, cvc2=reset["cvv"]))["39"] == "00"
    assert rest.events("card.printed")[0]["type"] == "digital_first"


async def test_orders_wait_without_a_bureau_and_a_down_bureau_is_retried(data_dir: Path, monkeypatch) -> None:
    async with trio.open_nursery() as nursery:
        # Nothing listens on this port (bound then closed): every call fails to connect.
        probe = trio.socket.socket()
        await probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
        probe.close()
        handle, ctx, extras = await start(nursery, data_dir, monkeypatch, bureau__url=f"http://127.0.0.1:{dead_port}",
                                  bureau__poll_interval_s=0.05)
        async with https(data_dir, handle.rest_port, "partner") as demo:
            customer = await create_customer(demo)
            rest = Rest(handle, ctx, data_dir, demo, demo, demo, None, None)  # type: ignore[arg-type]
            balance_id = await rest.balance(customer.customer_id)
            reply = await demo.post(f"/secure/customers/{customer.customer_id}/cards/physical", headers=jwe_headers(),
                                    json={"balanceId": balance_id, "configId": CONFIG_ID, "deliveryAddress": ADDRESS})
            assert reply.status_code == 201
            polls = CardsApi.of(ctx).worker.polls
            with trio.fail_after(5):
                while CardsApi.of(ctx).worker.polls < polls + 3:
                    await trio.sleep(0.02)
            card = handle.store.get_card(decrypt(reply)["id"])
            assert card.order_state == "ORDERED" and "bureauOrderId" not in json.loads(card.order_json)
            assert (await demo.get("/openapi.json")).status_code == 200  # still serving
        stop(handle, extras)


# -- async issuing ---------------------------------------------------------------------------------


async def test_async_virtual_card_appears_and_a_full_queue_answers_503(rest: Rest) -> None:
    customer = await rest.customer()
    balance_id = await rest.balance(customer.customer_id)
    path = f"/secure/customers/{customer.customer_id}/cards/virtual/async"
    body = {"balanceId": balance_id, "configId": CONFIG_ID}
    reply = await rest.demo.post(path, json=body)
    assert reply.status_code == 202, reply.text
    pending = reply.json()
    assert pending["status"] == "PENDING" and isinstance(pending["id"], int)
    assert "cardNo" not in reply.text
    with trio.fail_after(5):
        while not rest.events("card.created"):
            await trio.sleep(0.02)
    (event,) = rest.events("card.created")
    assert event["requestId"] == pending["id"]
    listed = (await rest.demo.get(f"/secure/customers/{customer.customer_id}/cards")).json()["cards"]
    assert [card["id"] for card in listed] == [event["cardId"]]
    card = decrypt(await rest.demo.get(f"/secure/customers/{customer.customer_id}/cards/{event['cardId']}",
                                       headers=jwe_headers()))
    assert (await authorize(rest, card, cvc2=card["cvv"]))["39"] == "00"

    assert_problem(await rest.demo.post(f"/secure/customers/{customer.customer_id}/cards/virtual/async",
                                        json={**body, "configId": "9999999999"}), 404, "CONFIG_NOT_FOUND")
    # A queue nobody drains, of size zero, is a full queue.
    send, _receive = trio.open_memory_channel[AsyncCardRequest](0)
    rest.api.requests_in = send
    assert_problem(await rest.demo.post(path, json=body), 503, "CARD_QUEUE_FULL")


async def test_worker_runs_in_the_server(data_dir: Path, monkeypatch) -> None:
    """`CardsApi.of(ctx).run` must be started by the server itself (authsrv/app.py)."""
    contexts: list[RestContext] = []
    make_context = authsrv.app.make_context
    monkeypatch.setattr(authsrv.app, "make_context", lambda *a, **k: contexts.append(make_context(*a, **k))
                        or contexts[-1])
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir)
        await trio.sleep(0.05)
        running = CardsApi.of(contexts[0]).worker.running
        handle.stop.set()
    assert running, "start it in authsrv/app.py: await nursery.start(CardsApi.of(rest_context).run)"


async def test_openapi_documents_the_card_routes(rest: Rest) -> None:
    document = (await rest.anonymous.get("/openapi.json")).json()
    paths = document["paths"]
    assert "/customers/me/cards/{cardId}/pin" in paths and "/admin/cards/{cardId}/cvv" in paths
    assert "delete" in paths["/customers/me/cards/{cardId}"]
    assert "delete" not in paths.get("/secure/customers/{customerId}/cards/{cardId}", {})
    assert paths["/admin/customers/{customerId}/cards/virtual"]["post"]["x-admin-roles"] == ["Admin", "Manager"]
    assert paths["/customers/me/cards/{cardId}"]["get"]["x-jwe"] is True


def test_cvc2_version_zero_is_the_original_and_versions_are_bounded() -> None:
    keys = cardsec.CardKeys.generate()
    pan = cardsec.generate_pan("535522", 123_456_789)
    assert cardsec.cvc2(pan, "2812", keys.cvk) == cardsec.cvv(pan, "2812", "000", keys.cvk)
    assert cardsec.cvc2(pan, "2812", keys.cvk, 0) == cardsec.cvc2(pan, "2812", keys.cvk)
    versions = {cardsec.cvc2(pan, "2812", keys.cvk, version) for version in range(1, 40)}
    assert len(versions) > 20  # 3 digits: a few repeats among 39 draws, never all the same
    for version in (-1, cardsec.CVV_VERSION_MAX + 1):
        with pytest.raises(cardsec.CardSecurityError):
            cardsec.cvc2(pan, "2812", keys.cvk, version)
