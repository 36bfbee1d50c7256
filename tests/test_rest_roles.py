"""The role matrix: every action on every channel, allowed and refused.

The table below is written from the reference documents' "Availability" tables (seeds 004, "Actions"),
independently of the server's own access tables, so a drift in either shows up here. Where the
documents are silent (balances, partner balances, summary, KYC review), the table states the
choice documented in docs/api.md.

Allowed means a 2xx answer for a well-formed request on fresh resources; refused means 403
FORBIDDEN for an admin role the action is not granted to, and 404/405 on a channel that does not
offer it at all.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

from tests.conftest import start_in_process
from tests.restclient import Customer, admin_login, bearer, create_customer, customer_login, decrypt, https, jwe_headers

pytestmark = pytest.mark.timeout(180)
CONFIG_ID = "0019167984"
ALL = frozenset({"Admin", "Manager", "Employee"})
NONE: frozenset[str] = frozenset()
ADDRESS = {"street": "Main St 1", "city": "Lublin", "postCode": "20-128", "country": "PL"}


@attrs.frozen
class Action:
    name: str
    method: str
    path: str  # below the channel root; {card} and {balance} are filled per call
    customer: bool
    partner: bool
    admin: frozenset[str]
    body: dict | None = None
    jwe: bool = False  # needs Public-Key for a 2xx
    admin_path: str | None = None  # admin path when it is not below /admin/customers/{id}
    needs: str = "card"  # fresh resource the action works on: "card", "digital_first", "locked", "balance", "user"


ACTIONS = [
    # Cards (documents: Actions / Availability)
    Action("create virtual", "POST", "/cards/virtual", True, True, frozenset({"Admin", "Manager"}),
           body={"balanceId": "{balance}", "configId": CONFIG_ID}, jwe=True, needs="balance"),
    Action("create virtual async", "POST", "/cards/virtual/async", True, True, NONE,
           body={"balanceId": "{balance}", "configId": CONFIG_ID}, needs="balance"),
    Action("lock", "POST", "/cards/{card}/lock", True, True, NONE, body={"reason": 3}),
    Action("unlock", "POST", "/cards/{card}/unlock", True, True, NONE, needs="locked"),
    Action("remove", "DELETE", "/cards/{card}", True, False, NONE),
    Action("get full data", "GET", "/cards/{card}", True, True, NONE, jwe=True),
    Action("reset CVV", "POST", "/cards/{card}/cvv", True, False, ALL, jwe=True, admin_path="/admin/cards/{card}/cvv"),
    Action("order physical", "POST", "/cards/physical", True, True, ALL,
           body={"balanceId": "{balance}", "configId": CONFIG_ID, "deliveryAddress": ADDRESS}, jwe=True,
           needs="balance"),
    Action("print virtual", "POST", "/cards/{card}/print", True, True, ALL, jwe=True),
    Action("set PIN", "POST", "/cards/{card}/pin", True, False, NONE, jwe=True, needs="digital_first"),
    Action("list cards", "GET", "/cards", True, True, ALL),
    # Balances (documents: "Create user balance" offers /secure and /customers/me; admin: docs/api.md)
    Action("create balance", "POST", "/balances", True, True, frozenset({"Admin", "Manager"}),
           body={"currency": "EUR"}, needs="user"),
    Action("list balances", "GET", "/balances", True, True, ALL, needs="balance"),
    Action("get balance", "GET", "/balances/{balance}", True, True, ALL, needs="balance"),
    Action("reload balance", "POST", "/balances/{balance}/reload", False, True, frozenset({"Admin", "Manager"}),
           body={"amount": 1000}, needs="balance"),
    Action("delete balance", "DELETE", "/balances/{balance}", False, True, frozenset({"Admin"}), needs="balance"),
    # KYC (documents: /customers/me/register and /secure/customers/{id}/register)
    Action("KYC form", "POST", "/register", True, True, NONE, needs="pending_user"),
]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000" "1f15c4890000000d4944415478da63fccf"
                    "c0f00f0004850180849a8c210000000049454e44ae426082")


@attrs.define
class World:
    data_dir: Path
    handle: object
    partner: object
    anonymous: object
    admin_tokens: dict[str, str]


async def _fresh(world: World, needs: str) -> tuple[Customer, int, int]:
    """A new KYC'd user with a balance and (unless only a user or balance is needed) a card."""
    customer = await create_customer(world.partner, kyc="PENDING" if needs == "pending_user" else "SUCCESS")
    await customer_login(world.anonymous, customer)
    root = f"/secure/customers/{customer.customer_id}"
    if needs in ("user", "pending_user"):
        return customer, 0, 0
    reply = await world.partner.post(f"{root}/balances", json={"currency": "EUR"})
    assert reply.status_code == 201, reply.text
    balance_id = reply.json()["id"]
    if needs == "balance":
        return customer, balance_id, 0
    reply = await world.partner.post(f"{root}/cards/virtual", headers=jwe_headers(),
                                     json={"balanceId": balance_id, "configId": CONFIG_ID})
    assert reply.status_code in (200, 201), reply.text
    card_id = decrypt(reply)["id"]
    if needs == "digital_first":  # a PIN needs a plastic: a digital-first copy takes one at once
        reply = await world.partner.post(f"{root}/cards/{card_id}/print", headers=jwe_headers())
        assert reply.status_code in (200, 201, 202), reply.text
    if needs == "locked":
        reply = await world.partner.post(f"{root}/cards/{card_id}/lock", json={"reason": 3})
        assert reply.status_code in (200, 204), reply.text
    return customer, balance_id, card_id


def _fill(value, balance_id: int, card_id: int):
    if isinstance(value, dict):
        return {key: _fill(item, balance_id, card_id) for key, item in value.items()}
    if value == "{balance}":
        return balance_id
    return value


async def _call(world: World, action: Action, channel: str, role: str | None):
    customer, balance_id, card_id = await _fresh(world, action.needs)
    sub = action.path.replace("{card}", str(card_id)).replace("{balance}", str(balance_id))
    headers = jwe_headers() if action.jwe else {}
    if channel == "customer":
        path, headers = "/customers/me" + sub, {**headers, **bearer(customer.token)}
        client = world.anonymous
    elif channel == "partner":
        path, client = f"/secure/customers/{customer.customer_id}" + sub, world.partner
    else:
        if action.admin_path is not None:
            path = action.admin_path.replace("{card}", str(card_id))
        else:
            path = f"/admin/customers/{customer.customer_id}" + sub
        headers = {**headers, **bearer(world.admin_tokens[role])}
        client = world.anonymous
    body = _fill(action.body, balance_id, card_id) if action.body is not None else None
    if body is not None and action.name == "set PIN":
        body = None
    if action.name == "set PIN":
        # The PIN travels only inside a JWE request (documents: "Set PIN", encryption required).
        from tests.restclient import encrypt_for

        server_key = (await world.anonymous.get("/customers/public_key")).json()["publicKey"]
        import base64

        body = encrypt_for(base64.b64decode(server_key), {"pin": "4321"})
        headers = {**headers, "Encrypted-Request": "true"}
    if action.name == "KYC form":
        form = {"firstName": "Ada", "lastName": "Lovelace", "birthDate": "1990-12-10", "country": "GB",
                "documentType": "passport", "identityCardNo": "P1234567"}
        return await client.post(path, data=form, files={"imageFront": ("front.png", PNG, "image/png")},
                                 headers=headers)
    return await client.request(action.method, path, json=body, headers=headers)


@pytest.mark.parametrize("action", ACTIONS, ids=[action.name for action in ACTIONS])
async def test_role_matrix(data_dir: Path, action: Action) -> None:
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir)
        async with https(data_dir, handle.rest_port, "partner") as partner, \
                https(data_dir, handle.rest_port, None) as anonymous:  # fmt: skip
            admin_password = (data_dir / "admin-password").read_text().strip()
            tokens = {"Admin": await admin_login(anonymous, "admin", admin_password)}
            for role in ("Manager", "Employee"):
                password = f"{role.lower()}-password-123"
                reply = await anonymous.post("/admin/users", headers=bearer(tokens["Admin"]),
                                             json={"username": role.lower(), "password": password, "role": role})
                assert reply.status_code in (200, 201), reply.text
                tokens[role] = await admin_login(anonymous, role.lower(), password)
            world = World(data_dir, handle, partner, anonymous, tokens)
            outcomes = {}
            for channel, allowed in (("customer", action.customer), ("partner", action.partner)):
                reply = await _call(world, action, channel, None)
                outcomes[channel] = reply.status_code
                if allowed:
                    assert 200 <= reply.status_code < 300, (channel, reply.status_code, reply.text)
                else:
                    assert reply.status_code in (404, 405), (channel, reply.status_code, reply.text)
            for role in ("Admin", "Manager", "Employee"):
                reply = await _call(world, action, "admin", role)
                outcomes[role] = reply.status_code
                if role in action.admin:
                    assert 200 <= reply.status_code < 300, (role, reply.status_code, reply.text)
                elif action.admin:
                    assert reply.status_code == 403 and reply.json()["title"] == "FORBIDDEN", (role, reply.text)
                else:
                    assert reply.status_code in (404, 405), (role, reply.status_code, reply.text)
        handle.stop.set()


async def test_admin_only_actions_by_role(data_dir: Path) -> None:
    """Admin actions that are not about one customer: who may do them."""
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir)
        async with https(data_dir, handle.rest_port, None) as anonymous:
            admin_password = (data_dir / "admin-password").read_text().strip()
            tokens = {"Admin": await admin_login(anonymous, "admin", admin_password)}
            for role in ("Manager", "Employee"):
                password = f"{role.lower()}-password-123"
                reply = await anonymous.post("/admin/users", headers=bearer(tokens["Admin"]),
                                             json={"username": role.lower(), "password": password, "role": role})
                assert reply.status_code in (200, 201), reply.text
                tokens[role] = await admin_login(anonymous, role.lower(), password)
            # Only an Admin creates admin users.
            for role in ("Manager", "Employee"):
                reply = await anonymous.post("/admin/users", headers=bearer(tokens[role]),
                                             json={"username": f"x{role}", "password": "long-enough-pass", "role": "Employee"})
                assert reply.status_code == 403, reply.text
            # Everyone reads the summary and partner balances.
            for role, token in tokens.items():
                assert (await anonymous.get("/admin/summary", headers=bearer(token))).status_code == 200, role
                assert (await anonymous.get("/admin/partner-balances", headers=bearer(token))).status_code == 200
            # Only an Admin reloads a partner balance; everyone reads it.
            listed = (await anonymous.get("/admin/partner-balances", headers=bearer(tokens["Admin"]))).json()
            deposit = next(item for item in listed["partnerBalances"] if item["partner"] == "demo")
            path = f"/admin/partner-balances/demo/{deposit['type']}/{deposit['currency']}"
            for role, token in tokens.items():
                assert (await anonymous.get(path, headers=bearer(token))).status_code == 200, role
                reply = await anonymous.post(f"{path}/reload", headers=bearer(token), json={"amount": 500})
                assert reply.status_code == (200 if role == "Admin" else 403), (role, reply.text)
            after = (await anonymous.get(path, headers=bearer(tokens["Admin"]))).json()
            assert after["amount"] == deposit["amount"] + 500  # exactly one reload went through
            # KYC review: everyone lists, Admin and Manager decide (a 404 for a missing form is "allowed").
            for role, token in tokens.items():
                assert (await anonymous.get("/admin/kyc-forms", headers=bearer(token))).status_code == 200, role
                reply = await anonymous.post("/admin/kyc-forms/999999/accept", headers=bearer(token))
                assert reply.status_code == (403 if role == "Employee" else 404), (role, reply.text)
            # No channel but the admin one reaches /admin, and an admin token is no customer session.
            reply = await anonymous.get("/customers/me", headers=bearer(tokens["Admin"]))
            assert reply.status_code == 401, reply.text
        handle.stop.set()
