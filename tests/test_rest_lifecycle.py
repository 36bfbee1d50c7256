"""The lifecycle wallet endpoints over real HTTPS with partner client certificates on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from authsrv.pki import client_ssl_context
from authsrv.store.db import verify_secret
from authsrv.store.partners import add_partner
from tests.conftest import start_in_process

PROBLEM = "application/problem+json"
USER = {"firstName": "John", "lastName": "Doe", "phone": "481234567899", "email": "john.doe@example.com",
        "birthDate": "2000-01-01", "wPIN": "5058", "state": "VERIFIED", "kyc": "PENDING"}  # fmt: skip
pytestmark = pytest.mark.timeout(60)


def client(data_dir: Path, port: int, stem: str | None) -> httpx.AsyncClient:
    # An SSLContext rather than httpx's deprecated verify=<path>, cert=(...): that pair sent no
    # client certificate here (httpx 0.28).
    context = client_ssl_context(data_dir / "pki", stem)
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=10)


def assert_problem(reply: httpx.Response, status: int, title: str) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    body = reply.json()
    assert body["title"] == title and body["status"] == status and body["detail"]
    return body


@pytest.fixture
async def rest(data_dir: Path):
    add_partner(data_dir, "other")  # before the server starts, as an operator would
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir)
        async with client(data_dir, handle.rest_port, "partner") as demo, \
                client(data_dir, handle.rest_port, "other") as other, \
                client(data_dir, handle.rest_port, None) as anonymous:  # fmt: skip
            yield handle, demo, other, anonymous
        handle.stop.set()


async def test_create_get_update_user(rest) -> None:
    handle, demo, _, _ = rest
    reply = await demo.post("/lifecycle/v1/wallet", json=USER)
    assert reply.status_code == 201, reply.text
    customer_id = reply.json()["customerId"]
    assert isinstance(customer_id, int)

    reply = await demo.get(f"/lifecycle/v1/wallet/{customer_id}")
    assert reply.status_code == 200
    user = reply.json()
    assert user["customerId"] == customer_id and user["kyc"] == "PENDING" and user["phone"] == USER["phone"]
    assert not any("pin" in key.lower() for key in user), user
    assert "5058" not in reply.text

    reply = await demo.put(f"/lifecycle/v1/wallet/{customer_id}", json={"kyc": "SUCCESS"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["kyc"] == "SUCCESS" and reply.json()["firstName"] == "John"

    reply = await demo.put(f"/lifecycle/v1/wallet/{customer_id}", json={"wPIN": "987654", "lastName": "Roe"})
    assert reply.status_code == 200 and reply.json()["lastName"] == "Roe"
    row = handle.store.get_user(customer_id)
    assert row.partner == "demo" and row.kyc == "SUCCESS"
    assert "987654" not in row.wpin_hash and verify_secret(row.wpin_hash, "987654")


@pytest.mark.parametrize("body", [
    b"{not json", b"[]", json.dumps({**USER, "cvv": "123"}).encode(),  # unknown field
    json.dumps({**USER, "phone": 481234567899}).encode(),  # wrong type
    json.dumps({k: v for k, v in USER.items() if k != "email"}).encode(),  # missing field
    json.dumps({**USER, "wPIN": "12"}).encode(),  # out of bounds
])  # fmt: skip
async def test_invalid_payload(rest, body: bytes) -> None:
    _, demo, _, _ = rest
    reply = await demo.post("/lifecycle/v1/wallet", content=body, headers={"content-type": "application/json"})
    problem = assert_problem(reply, 400, "INVALID_PAYLOAD")
    assert "12" not in problem["detail"] or "wPIN" in problem["detail"]  # names the field, not the value
    created = (await demo.post("/lifecycle/v1/wallet", json=USER)).json()["customerId"]
    reply = await demo.put(f"/lifecycle/v1/wallet/{created}", json={"kyc": "SUCCESS", "pan": "4111111111111111"})
    problem = assert_problem(reply, 400, "INVALID_PAYLOAD")
    assert "4111" not in problem["detail"]


async def test_client_certificate_required(rest) -> None:
    _, _, _, anonymous = rest
    assert_problem(await anonymous.post("/lifecycle/v1/wallet", json=USER), 401, "UNAUTHORIZED")
    assert_problem(await anonymous.get("/lifecycle/v1/wallet/1"), 401, "UNAUTHORIZED")
    assert_problem(await anonymous.get("/secure/public_key"), 401, "UNAUTHORIZED")


async def test_certificate_of_unknown_partner_forbidden(rest, data_dir: Path) -> None:
    from authsrv import pki

    handle, _, _, _ = rest
    pki.issue_client_cert(data_dir / "pki", "ghost", "ghost")  # signed by the CA, but no partner row
    async with client(data_dir, handle.rest_port, "ghost") as ghost:
        assert_problem(await ghost.post("/lifecycle/v1/wallet", json=USER), 403, "FORBIDDEN")


async def test_partner_sees_only_its_own_users(rest) -> None:
    _, demo, other, _ = rest
    customer_id = (await demo.post("/lifecycle/v1/wallet", json=USER)).json()["customerId"]
    assert_problem(await other.get(f"/lifecycle/v1/wallet/{customer_id}"), 404, "CUSTOMER_NOT_FOUND")
    reply = await other.put(f"/lifecycle/v1/wallet/{customer_id}", json={"kyc": "SUCCESS"})
    assert_problem(reply, 404, "CUSTOMER_NOT_FOUND")
    assert (await demo.get(f"/lifecycle/v1/wallet/{customer_id}")).json()["kyc"] == "PENDING"
    assert_problem(await other.get("/lifecycle/v1/wallet/999999999"), 404, "CUSTOMER_NOT_FOUND")
    assert_problem(await other.get("/lifecycle/v1/wallet/abc"), 404, "CUSTOMER_NOT_FOUND")
    own = (await other.post("/lifecycle/v1/wallet", json=USER)).json()["customerId"]
    assert (await other.get(f"/lifecycle/v1/wallet/{own}")).status_code == 200
    assert_problem(await demo.get(f"/lifecycle/v1/wallet/{own}"), 404, "CUSTOMER_NOT_FOUND")


async def test_oversized_body(rest) -> None:
    from authsrv.rest.errors import REQUEST_BODY_BYTES_MAX

    _, demo, _, _ = rest
    body = json.dumps({**USER, "firstName": "x" * REQUEST_BODY_BYTES_MAX}).encode()
    reply = await demo.post("/lifecycle/v1/wallet", content=body, headers={"content-type": "application/json"})
    assert_problem(reply, 413, "PAYLOAD_TOO_LARGE")

    async def chunks():  # no Content-Length: the bound applies while reading
        for _ in range(REQUEST_BODY_BYTES_MAX // 1024 + 2):
            yield b" " * 1024

    reply = await demo.post("/lifecycle/v1/wallet", content=chunks())
    assert_problem(reply, 413, "PAYLOAD_TOO_LARGE")


async def test_unknown_route_and_method_are_problems(rest) -> None:
    _, demo, _, _ = rest
    assert_problem(await demo.get("/lifecycle/v1/nothing"), 404, "NOT_FOUND")
    assert_problem(await demo.delete("/lifecycle/v1/wallet"), 405, "METHOD_NOT_ALLOWED")


async def test_openapi_from_types(rest) -> None:
    _, _, _, anonymous = rest
    reply = await anonymous.get("/openapi.json")
    assert reply.status_code == 200
    document = reply.json()
    schemas = document["components"]["schemas"]
    assert {"WalletCreate", "WalletUpdate", "WalletUser", "CustomerCreated", "Problem"} <= set(schemas)
    create = schemas["WalletCreate"]
    assert {"firstName", "lastName", "phone", "email", "birthDate", "wPIN"} <= set(create["required"])
    assert "wPIN" not in schemas["WalletUser"]["properties"]
    assert "/lifecycle/v1/wallet/{customerId}" in document["paths"]
