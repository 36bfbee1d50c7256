"""Customer and admin sessions, device pairing, admin users, admin customer views: real HTTPS on loopback."""

from __future__ import annotations

import datetime
import json
import statistics
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from authsrv.pki import client_ssl_context
from authsrv.rest.auth import CustomerSubject
from authsrv.rest.context import RestContext
from authsrv.rest.sessions import SessionTable
from authsrv.rest.sessions_api import AttemptLimiter, revoke_customer
from authsrv.store.db import Store, hash_secret
from authsrv.store.partners import add_partner
from tests.conftest import start_in_process

PROBLEM = "application/problem+json"
WPIN = "5058"
pytestmark = pytest.mark.timeout(60)


def https(data_dir: Path, port: int, stem: str | None) -> httpx.AsyncClient:
    context = client_ssl_context(data_dir / "pki", stem)
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=10)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_problem(reply: httpx.Response, status: int, title: str) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    body = reply.json()
    assert body["title"] == title and body["status"] == status and body["detail"]
    return body


class Rest:
    """A running server and clients for each channel."""

    def __init__(self, handle, demo: httpx.AsyncClient, other: httpx.AsyncClient, anonymous: httpx.AsyncClient,
                 admin_password: str) -> None:
        self.handle, self.demo, self.other, self.anonymous = handle, demo, other, anonymous
        self.admin_password = admin_password
        self._serial = 0

    async def user(self, partner: httpx.AsyncClient | None = None, *, phone: str | None = None,
                   email: str | None = None, wpin: str = WPIN, state: str = "VERIFIED") -> dict:
        self._serial += 1
        body = {"firstName": "John", "lastName": "Doe", "phone": phone or f"4811{self._serial:08d}",
                "email": email or f"user{self._serial}@example.com", "birthDate": "2000-01-01", "wPIN": wpin,
                "state": state, "kyc": "PENDING"}  # fmt: skip
        reply = await (partner or self.demo).post("/lifecycle/v1/wallet", json=body)
        assert reply.status_code == 201, reply.text
        return {**body, "customerId": reply.json()["customerId"]}

    async def login(self, user: dict | None = None, *, wpin: str | None = None, device: str = "device-1",
                    by: str = "phone", headers: dict | None = None, **extra) -> httpx.Response:
        body = {by: user[by], "wPIN": wpin or user["wPIN"], "deviceId": device, **extra}
        return await self.anonymous.post("/customers/sessions", json=body, headers=headers or {})

    async def token(self, user: dict, **kwargs) -> str:
        reply = await self.login(user, **kwargs)
        assert reply.status_code == 201, reply.text
        return reply.json()["token"]

    async def admin_login(self, username: str = "admin", password: str | None = None) -> httpx.Response:
        return await self.anonymous.post("/admin/sessions", json={"username": username,
                                                                  "password": password or self.admin_password})

    async def admin_token(self, username: str = "admin", password: str | None = None) -> str:
        reply = await self.admin_login(username, password)
        assert reply.status_code == 201, reply.text
        return reply.json()["token"]


@asynccontextmanager
async def serving(data_dir: Path, **overrides):
    if not (data_dir / "pki" / "other.crt").exists():
        add_partner(data_dir, "other")
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir, **overrides)
        port = handle.rest_port
        async with https(data_dir, port, "partner") as demo, https(data_dir, port, "other") as other, \
                https(data_dir, port, None) as anonymous:  # fmt: skip
            yield Rest(handle, demo, other, anonymous, (data_dir / "admin-password").read_text().strip())
        handle.stop.set()


@pytest.fixture
async def rest(data_dir: Path):
    async with serving(data_dir) as running:
        yield running


# -- customer sessions -----------------------------------------------------------------------------


async def test_login_by_phone_and_by_email(rest: Rest) -> None:
    user = await rest.user()
    reply = await rest.login(user)
    assert reply.status_code == 201, reply.text
    assert reply.json()["expiresIn"] == 600 and set(reply.json()) == {"token", "expiresIn"}
    me = await rest.anonymous.get("/customers/me", headers=bearer(reply.json()["token"]))
    assert me.status_code == 200 and me.json()["customerId"] == user["customerId"]
    assert WPIN not in me.text and not any("pin" in key.lower() for key in me.json())

    token = await rest.token(user, by="email", device="device-2")
    me = await rest.anonymous.get("/customers/me", headers=bearer(token))
    assert me.json()["email"] == user["email"]
    devices = (await rest.anonymous.get("/customers/me/devices", headers=bearer(token))).json()["devices"]
    assert sorted(d["deviceId"] for d in devices) == ["device-1", "device-2"]
    assert {d["installationId"] for d in devices} == {"device-1", "device-2"}  # defaults to the deviceId


async def test_wrong_credentials_are_401(rest: Rest) -> None:
    user = await rest.user()
    assert_problem(await rest.login(user, wpin="0000"), 401, "INVALID_CREDENTIALS")
    assert_problem(await rest.login(user, wpin="not a pin"), 401, "INVALID_CREDENTIALS")
    assert_problem(await rest.login({"phone": "4899999999999", "wPIN": WPIN}), 401, "INVALID_CREDENTIALS")
    assert_problem(await rest.login({"email": "nobody@example.com", "wPIN": WPIN}, by="email"), 401,
                   "INVALID_CREDENTIALS")
    seeded = rest.handle.store.get_user(1)  # seeded users have no wPIN: no customer login at all
    assert seeded.wpin_hash == ""
    assert_problem(await rest.login({"phone": seeded.phone, "wPIN": WPIN}), 401, "INVALID_CREDENTIALS")
    assert (await rest.login(user)).status_code == 201


async def test_unknown_login_costs_a_real_check(rest: Rest) -> None:
    """The dummy hash: naming nobody must not answer measurably faster than naming a user."""
    user = await rest.user()

    async def seconds(body: dict) -> float:
        started = time.perf_counter()
        assert_problem(await rest.login(body), 401, "INVALID_CREDENTIALS")
        return time.perf_counter() - started

    known = [await seconds({"phone": user["phone"], "wPIN": "0000"}) for _ in range(3)]
    unknown = [await seconds({"phone": "4899999999999", "wPIN": "0000"}) for _ in range(3)]
    assert (await rest.login(user)).status_code == 201  # resets the 3 failures
    # scrypt is ~tens of ms; without the dummy check an unknown phone answers in ~1-2 ms.
    assert statistics.median(unknown) > 0.5 * statistics.median(known), (known, unknown)


async def test_blocked_user_is_403_only_with_the_right_wpin(rest: Rest) -> None:
    user = await rest.user(state="BLOCKED")
    assert_problem(await rest.login(user, wpin="0000"), 401, "INVALID_CREDENTIALS")
    assert_problem(await rest.login(user), 403, "CUSTOMER_NOT_ACTIVE")


async def test_same_phone_at_two_partners(rest: Rest) -> None:
    phone = "48700000001"
    at_demo = await rest.user(rest.demo, phone=phone, wpin="1111")
    at_other = await rest.user(rest.other, phone=phone, wpin="2222")
    token = await rest.token(at_demo)
    assert (await rest.anonymous.get("/customers/me", headers=bearer(token))).json()["customerId"] == \
        at_demo["customerId"]  # fmt: skip
    token = await rest.token(at_other)
    assert (await rest.anonymous.get("/customers/me", headers=bearer(token))).json()["customerId"] == \
        at_other["customerId"]  # fmt: skip
    assert_problem(await rest.login(at_other, headers={"Issuer-Code": "demo"}), 401, "INVALID_CREDENTIALS")

    phone = "48700000002"
    twin_demo = await rest.user(rest.demo, phone=phone, wpin="3333")
    twin_other = await rest.user(rest.other, phone=phone, wpin="3333")
    assert_problem(await rest.login(twin_demo), 409, "ISSUER_CODE_REQUIRED")
    token = await rest.token(twin_other, headers={"Issuer-Code": "other"})
    me = (await rest.anonymous.get("/customers/me", headers=bearer(token))).json()
    assert me["customerId"] == twin_other["customerId"]
    # A right wPIN at one partner does not count as a failure against the other user.
    assert rest.handle.store.wpin_guard(twin_demo["customerId"]) == (0, "")
    assert rest.handle.store.wpin_guard(at_demo["customerId"]) == (1, "")  # the Issuer-Code: demo guess


async def test_wrong_wpins_lock_logins_across_a_restart(data_dir: Path) -> None:
    async with serving(data_dir, sessions__wpin_lock_s=30) as rest:
        user = await rest.user()
        bystander = await rest.user()
        for _ in range(5):
            assert_problem(await rest.login(user, wpin="0000"), 401, "INVALID_CREDENTIALS")
        reply = await rest.login(user)  # the right wPIN
        assert_problem(reply, 429, "TOO_MANY_ATTEMPTS")
        assert 1 <= int(reply.headers["retry-after"]) <= 30
        assert (await rest.login(bystander)).status_code == 201
    async with serving(data_dir, sessions__wpin_lock_s=30) as rest:
        assert_problem(await rest.login(user), 429, "TOO_MANY_ATTEMPTS")
        assert_problem(await rest.login(user, wpin="0000"), 429, "TOO_MANY_ATTEMPTS")
        assert (await rest.login(bystander)).status_code == 201


async def test_lock_elapses_and_success_resets_the_count(data_dir: Path) -> None:
    async with serving(data_dir, sessions__wpin_lock_s=1) as rest:
        user = await rest.user()
        for _ in range(4):
            assert_problem(await rest.login(user, wpin="0000"), 401, "INVALID_CREDENTIALS")
        assert (await rest.login(user)).status_code == 201  # resets: four more wrong ones do not lock
        for _ in range(4):
            assert_problem(await rest.login(user, wpin="0000"), 401, "INVALID_CREDENTIALS")
        assert (await rest.login(user)).status_code == 201
        for _ in range(5):
            assert_problem(await rest.login(user, wpin="0000"), 401, "INVALID_CREDENTIALS")
        assert_problem(await rest.login(user), 429, "TOO_MANY_ATTEMPTS")
        await trio.sleep(1.2)
        assert (await rest.login(user)).status_code == 201


async def test_tokens_expire(data_dir: Path) -> None:
    async with serving(data_dir, sessions__customer_token_ttl_s=1, sessions__admin_token_ttl_s=1) as rest:
        user = await rest.user()
        reply = await rest.login(user)
        assert reply.json()["expiresIn"] == 1
        token, admin = reply.json()["token"], await rest.admin_token()
        assert (await rest.anonymous.get("/customers/me", headers=bearer(token))).status_code == 200
        assert (await rest.anonymous.get("/admin/users", headers=bearer(admin))).status_code == 200
        await trio.sleep(1.2)
        assert_problem(await rest.anonymous.get("/customers/me", headers=bearer(token)), 401, "UNAUTHORIZED")
        assert_problem(await rest.anonymous.get("/admin/users", headers=bearer(admin)), 401, "UNAUTHORIZED")


async def test_device_pairing(rest: Rest) -> None:
    user = await rest.user()
    first = await rest.token(user, device="phone-A", installationId="install-1")
    other_device = await rest.token(user, device="tablet", installationId="install-9")
    same_install = await rest.token(user, device="phone-A", installationId="install-1")
    for token in (first, other_device, same_install):  # the same installation again keeps its sessions
        assert (await rest.anonymous.get("/customers/me", headers=bearer(token))).status_code == 200

    second = await rest.token(user, device="phone-A", installationId="install-2")  # reinstalled app
    for token in (first, same_install):
        assert_problem(await rest.anonymous.get("/customers/me", headers=bearer(token)), 401, "UNAUTHORIZED")
    for token in (second, other_device):
        assert (await rest.anonymous.get("/customers/me", headers=bearer(token))).status_code == 200
    devices = (await rest.anonymous.get("/customers/me/devices", headers=bearer(second))).json()["devices"]
    assert {(d["deviceId"], d["installationId"]) for d in devices} == {("phone-A", "install-2"),
                                                                        ("tablet", "install-9")}

    assert (await rest.anonymous.delete("/customers/me/devices/tablet", headers=bearer(second))).status_code == 204
    assert_problem(await rest.anonymous.get("/customers/me", headers=bearer(other_device)), 401, "UNAUTHORIZED")
    assert_problem(await rest.anonymous.delete("/customers/me/devices/tablet", headers=bearer(second)), 404,
                   "DEVICE_NOT_FOUND")
    assert_problem(await rest.anonymous.delete("/customers/me/devices/a%20b", headers=bearer(second)), 404,
                   "DEVICE_NOT_FOUND")

    assert (await rest.anonymous.delete("/customers/me/session", headers=bearer(second))).status_code == 204
    assert_problem(await rest.anonymous.get("/customers/me", headers=bearer(second)), 401, "UNAUTHORIZED")


async def test_pairings_are_per_user(rest: Rest) -> None:
    alice, bob = await rest.user(), await rest.user()
    alice_token = await rest.token(alice, device="shared", installationId="one")
    bob_token = await rest.token(bob, device="shared", installationId="two")  # another user, same device
    me = await rest.anonymous.get("/customers/me", headers=bearer(alice_token))
    assert me.json()["customerId"] == alice["customerId"]
    me = await rest.anonymous.get("/customers/me", headers=bearer(bob_token))
    assert me.json()["customerId"] == bob["customerId"]
    assert_problem(await rest.anonymous.get(f"/customers/{alice['customerId']}", headers=bearer(bob_token)),
                   404, "NOT_FOUND")


async def test_tokens_do_not_cross_channels(rest: Rest) -> None:
    user = await rest.user()
    customer, admin = await rest.token(user), await rest.admin_token()
    assert_problem(await rest.anonymous.get("/admin/users", headers=bearer(customer)), 401, "UNAUTHORIZED")
    assert_problem(await rest.anonymous.get(f"/admin/customers/{user['customerId']}", headers=bearer(customer)),
                   401, "UNAUTHORIZED")
    assert_problem(await rest.anonymous.get("/customers/me", headers=bearer(admin)), 401, "UNAUTHORIZED")
    assert_problem(await rest.anonymous.get(f"/lifecycle/v1/wallet/{user['customerId']}", headers=bearer(customer)),
                   401, "UNAUTHORIZED")
    assert_problem(await rest.anonymous.get("/customers/me"), 401, "UNAUTHORIZED")
    assert_problem(await rest.anonymous.get("/customers/me", headers=bearer("x" * 43)), 401, "UNAUTHORIZED")


async def test_revoke_customer(rest: Rest) -> None:
    table: SessionTable[CustomerSubject] = SessionTable(60)
    ctx = RestContext(store=rest.handle.store, customer_sessions=table)
    kept = table.issue(CustomerSubject(2, "demo", "d"))
    for device in ("d1", "d2"):
        table.issue(CustomerSubject(1, "demo", device))
    assert revoke_customer(ctx, 1) == 2 and revoke_customer(ctx, 1) == 0
    assert table.lookup(kept) == CustomerSubject(2, "demo", "d")


# -- admins ----------------------------------------------------------------------------------------


async def test_admin_login(rest: Rest) -> None:
    reply = await rest.admin_login()
    assert reply.status_code == 201, reply.text
    assert reply.json()["role"] == "Admin" and reply.json()["expiresIn"] == 600
    assert rest.admin_password not in reply.text
    assert_problem(await rest.admin_login(password="wrong password!"), 401, "INVALID_CREDENTIALS")
    assert_problem(await rest.admin_login("nobody", "wrong password!"), 401, "INVALID_CREDENTIALS")

    token = reply.json()["token"]
    assert (await rest.anonymous.delete("/admin/sessions/current", headers=bearer(token))).status_code == 204
    assert_problem(await rest.anonymous.get("/admin/users", headers=bearer(token)), 401, "UNAUTHORIZED")


async def test_admin_login_rate_limit(rest: Rest) -> None:
    admin = await rest.admin_token()
    password = "employee-password-1"
    reply = await rest.anonymous.post("/admin/users", headers=bearer(admin),
                                      json={"username": "eve", "password": password, "role": "Employee"})
    assert reply.status_code == 201, reply.text
    for _ in range(5):
        assert_problem(await rest.admin_login("eve", "wrong password!"), 401, "INVALID_CREDENTIALS")
    reply = await rest.admin_login("eve", password)
    assert_problem(reply, 429, "TOO_MANY_ATTEMPTS")
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    assert (await rest.admin_login()).status_code == 201  # per username


async def test_admin_users_and_roles(rest: Rest) -> None:
    admin = bearer(await rest.admin_token())
    passwords = {"mary": "manager-password-1", "emil": "employee-password-2"}
    for username, role in (("mary", "Manager"), ("emil", "Employee")):
        reply = await rest.anonymous.post("/admin/users", headers=admin,
                                          json={"username": username, "password": passwords[username], "role": role})
        assert reply.status_code == 201, reply.text
        assert reply.json() == {**reply.json(), "username": username, "role": role, "createdBy": "admin"}
        assert passwords[username] not in reply.text and "scrypt" not in reply.text

    duplicate = {"username": "mary", "password": "another-password", "role": "Employee"}
    assert_problem(await rest.anonymous.post("/admin/users", headers=admin, json=duplicate), 409,
                   "ADMIN_ALREADY_EXISTS")
    for bad in ({"username": "root2", "password": "admin-password-1", "role": "Admin"},
                {"username": "shorty", "password": "short", "role": "Employee"},
                {"username": "bad name", "password": "employee-password", "role": "Employee"},
                {"username": "extra", "password": "employee-password", "role": "Employee", "admin": True}):
        problem = assert_problem(await rest.anonymous.post("/admin/users", headers=admin, json=bad), 400,
                                 "INVALID_PAYLOAD")
        assert bad["password"] not in problem["detail"]

    listed = await rest.anonymous.get("/admin/users", headers=admin)
    assert listed.status_code == 200
    users = {user["username"]: user for user in listed.json()["users"]}
    assert users["admin"]["role"] == "Admin" and users["mary"]["role"] == "Manager"
    assert users["emil"]["createdBy"] == "admin" and users["emil"]["createdAt"].endswith("Z")
    assert "scrypt" not in listed.text and not any(p in listed.text for p in passwords.values())
    assert all(set(user) == {"username", "role", "createdBy", "createdAt"} for user in users.values())

    for username in passwords:
        reply = await rest.admin_login(username, passwords[username])
        assert reply.status_code == 201 and passwords[username] not in reply.text
        token = bearer(reply.json()["token"])
        new = {"username": f"by-{username}", "password": "some-password-123", "role": "Employee"}
        assert_problem(await rest.anonymous.post("/admin/users", headers=token, json=new), 403, "FORBIDDEN")
        assert_problem(await rest.anonymous.get("/admin/users", headers=token), 403, "FORBIDDEN")
    assert rest.handle.store.get_admin("by-mary") is None


async def test_admin_customer_views(rest: Rest) -> None:
    at_demo = await rest.user(rest.demo)
    at_other = await rest.user(rest.other)
    admin = bearer(await rest.admin_token())
    employee_password = "employee-password-3"
    await rest.anonymous.post("/admin/users", headers=admin,
                              json={"username": "eddie", "password": employee_password, "role": "Employee"})
    employee = bearer(await rest.admin_token("eddie", employee_password))
    for token in (admin, employee):
        reply = await rest.anonymous.get(f"/admin/customers/{at_other['customerId']}", headers=token)
        assert reply.status_code == 200, reply.text
        assert reply.json()["partner"] == "other" and reply.json()["phone"] == at_other["phone"]
        assert WPIN not in reply.text
    assert_problem(await rest.anonymous.get("/admin/customers/999999999", headers=admin), 404, "CUSTOMER_NOT_FOUND")
    assert_problem(await rest.anonymous.get("/admin/customers/x", headers=admin), 404, "CUSTOMER_NOT_FOUND")

    page = (await rest.anonymous.get("/admin/customers", params={"partner": "other"}, headers=employee)).json()
    assert page["total"] == 1 and [item["customerId"] for item in page["items"]] == [at_other["customerId"]]
    page = (await rest.anonymous.get("/admin/customers", params={"pageSize": 5, "page": 2}, headers=admin)).json()
    assert page["page"] == 2 and page["pageSize"] == 5 and len(page["items"]) == 5
    assert page["total"] >= 22 and page["items"][0]["customerId"] == 6  # 20 seeded users, then ours
    last = (await rest.anonymous.get("/admin/customers", params={"pageSize": 100}, headers=admin)).json()
    assert at_demo["customerId"] in {item["customerId"] for item in last["items"]}
    for params in ({"pageSize": 0}, {"pageSize": 101}, {"page": 0}, {"page": "x"}, {"partner": "p" * 65}):
        reply = await rest.anonymous.get("/admin/customers", params=params, headers=admin)
        assert_problem(reply, 400, "INVALID_PAYLOAD")


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/customers/sessions", b"{not json"),
    ("/customers/sessions", b"[]"),
    ("/customers/sessions", json.dumps({"phone": "481", "wPIN": WPIN, "deviceId": "d", "extra": 1}).encode()),
    ("/customers/sessions", json.dumps({"phone": "481", "email": "a@b", "wPIN": WPIN, "deviceId": "d"}).encode()),
    ("/customers/sessions", json.dumps({"wPIN": WPIN, "deviceId": "d"}).encode()),
    ("/customers/sessions", json.dumps({"phone": "481", "wPIN": WPIN}).encode()),
    ("/customers/sessions", json.dumps({"phone": 481, "wPIN": WPIN, "deviceId": "d"}).encode()),
    ("/customers/sessions", json.dumps({"phone": "481", "wPIN": WPIN, "deviceId": "a b"}).encode()),
    ("/admin/sessions", b""),
    ("/admin/sessions", json.dumps({"username": "admin"}).encode()),
    ("/admin/sessions", json.dumps({"username": "admin", "password": "p" * 20, "role": "Admin"}).encode()),
])  # fmt: skip
async def test_bad_payloads(rest: Rest, path: str, body: bytes) -> None:
    reply = await rest.anonymous.post(path, content=body, headers={"content-type": "application/json"})
    problem = assert_problem(reply, 400, "INVALID_PAYLOAD")
    assert WPIN not in problem["detail"]


async def test_openapi_documents_the_routes(rest: Rest) -> None:
    document = (await rest.anonymous.get("/openapi.json")).json()
    paths = document["paths"]
    assert "201" in paths["/customers/sessions"]["post"]["responses"]
    assert "429" in paths["/customers/sessions"]["post"]["responses"]
    assert paths["/admin/users"]["post"]["x-admin-roles"] == ["Admin"]
    assert {"/customers/me", "/customers/me/devices", "/customers/me/devices/{deviceId}", "/customers/me/session",
            "/admin/sessions", "/admin/sessions/current", "/admin/customers", "/admin/customers/{customerId}"} <= \
        set(paths)  # fmt: skip
    assert {"CustomerLogin", "SessionToken", "AdminToken", "AdminUserCreate", "AdminCustomer"} <= \
        set(document["components"]["schemas"])  # fmt: skip


# -- plain units -----------------------------------------------------------------------------------


def test_attempt_limiter() -> None:
    now = [100.0]
    limiter = AttemptLimiter(failures_max=3, lock_s=60, entries_max=2, clock=lambda: now[0])
    assert [limiter.claim("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.claim("a") == 60
    now[0] += 59.5
    assert limiter.claim("a") == pytest.approx(0.5)
    now[0] += 1
    assert limiter.claim("a") == 0  # elapsed: a fresh run
    limiter.succeeded("a")
    assert [limiter.claim("a") for _ in range(3)] == [0, 0, 0]
    limiter.claim("b"), limiter.claim("c")
    assert len(limiter) == 2  # bounded: "a" was the least recently tried


def test_wpin_claims_are_charged_before_the_check(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        user = store.create_user(partner="demo", first_name="A", last_name="B", phone="4800000001",
                                 email="a@example.com", birth_date="2000-01-01", state="VERIFIED", kyc="PENDING",
                                 wpin_hash=hash_secret(WPIN))
        now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
        claims = [store.claim_wpin_attempts([user.id], failures_max=3, lock_s=10, now=now) for _ in range(4)]
        assert [claim.admitted for claim in claims] == [(user.id,)] * 3 + [()]  # three in flight lock at once
        assert claims[3].locked == (user.id,) and claims[3].retry_after_s == 10
        store.settle_wpin_success(user.id, [], failures_max=3)  # one of the three was right
        assert store.wpin_guard(user.id) == (0, "")
        for _ in range(3):
            store.claim_wpin_attempts([user.id], failures_max=3, lock_s=10, now=now)
        store.settle_wpin_success(None, [user.id], failures_max=3)  # refunded: below the limit again
        assert store.wpin_guard(user.id) == (2, "")
        later = now + datetime.timedelta(seconds=11)
        store.claim_wpin_attempts([user.id], failures_max=3, lock_s=10, now=now)
        assert store.claim_wpin_attempts([user.id], failures_max=3, lock_s=10, now=now).locked == (user.id,)
        assert store.claim_wpin_attempts([user.id], failures_max=3, lock_s=10, now=later).admitted == (user.id,)
        assert store.wpin_guard(user.id) == (1, "")


def test_device_rows_stay_bounded(data_dir: Path) -> None:
    from authsrv.store.db import DEVICES_PER_USER_MAX

    with Store.open(data_dir) as store:
        for installation in range(5):
            result = store.pair_device(1, "phone", f"install-{installation}")
            assert result.replaced_installation == (installation > 0)
        (count,) = store._conn.execute("SELECT COUNT(*) FROM devices WHERE user_id = 1").fetchone()
        assert count == 2  # the active installation and the one before it
        evicted = [store.pair_device(1, f"device-{n}", "i").evicted_device_ids for n in range(DEVICES_PER_USER_MAX)]
        assert evicted[-1] == ("phone",) and all(not e for e in evicted[:-1])
        assert len(store.devices_of_user(1)) == DEVICES_PER_USER_MAX
        assert store.unpair_device(1, "device-0") and not store.unpair_device(1, "device-0")
