"""An independent REST client for tests: httpx over real TLS, JWE with jwcrypto (not the server's
joserfc), and the three channels' credentials (partner certificate, customer and admin sessions)."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

import attrs
import httpx
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk

from authsrv.pki import client_ssl_context

PROBLEM = "application/problem+json"
_CLIENT_KEY: jw_jwk.JWK | None = None


def client_key() -> jw_jwk.JWK:
    """One RSA key per test session: generating 2048-bit keys costs ~100 ms each."""
    global _CLIENT_KEY
    if _CLIENT_KEY is None:
        _CLIENT_KEY = jw_jwk.JWK.generate(kty="RSA", size=2048)
    return _CLIENT_KEY


def public_key_header() -> str:
    return base64.b64encode(client_key().export_to_pem()).decode()


def jwe_headers() -> dict[str, str]:
    """Ask for an encrypted response (card data)."""
    return {"Public-Key": public_key_header(), "Encrypt-Response": "true"}


def decrypt(reply: httpx.Response) -> dict:
    body = reply.json()
    assert set(body) == {"payload"}, body
    token = jw_jwe.JWE()
    token.deserialize(body["payload"], key=client_key())
    return json.loads(token.payload)


def encrypt_for(server_public_pem: bytes, plaintext: dict, alg: str = "RSA-OAEP-256") -> dict:
    key = jw_jwk.JWK.from_pem(server_public_pem)
    token = jw_jwe.JWE(json.dumps(plaintext).encode(), protected=json.dumps({"alg": alg, "enc": "A256GCM"}))
    token.add_recipient(key)
    return {"payload": token.serialize(compact=True)}


def assert_problem(reply: httpx.Response, status: int, title: str | None = None) -> dict:
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["content-type"] == PROBLEM, reply.headers
    body = reply.json()
    assert body["status"] == status and body["detail"], body
    if title is not None:
        assert body["title"] == title, body
    return body


def https(data_dir: Path, port: int, stem: str | None = None, *, headers: dict | None = None) -> httpx.AsyncClient:
    context = client_ssl_context(Path(data_dir) / "pki", stem)
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=20, headers=headers)


def new_user_body(**overrides) -> dict:
    tag = secrets.randbelow(10**9)
    body = {"firstName": "Ada", "lastName": "Lovelace", "phone": f"4879{tag:09d}",
            "email": f"ada{tag}@example.com", "birthDate": "1990-12-10", "wPIN": "2468",
            "state": "VERIFIED", "kyc": "SUCCESS"}  # fmt: skip
    body.update(overrides)
    return body


@attrs.define
class Customer:
    customer_id: int
    phone: str
    wpin: str
    token: str = ""


async def create_customer(partner: httpx.AsyncClient, **overrides) -> Customer:
    body = new_user_body(**overrides)
    reply = await partner.post("/lifecycle/v1/wallet", json=body)
    assert reply.status_code == 201, reply.text
    return Customer(reply.json()["customerId"], body["phone"], body["wPIN"])


async def customer_login(anonymous: httpx.AsyncClient, customer: Customer, device: str = "device-1") -> str:
    reply = await anonymous.post("/customers/sessions",
                                 json={"phone": customer.phone, "wPIN": customer.wpin, "deviceId": device})
    assert reply.status_code in (200, 201), reply.text
    customer.token = reply.json()["token"]
    return customer.token


async def admin_login(anonymous: httpx.AsyncClient, username: str, password: str) -> str:
    reply = await anonymous.post("/admin/sessions", json={"username": username, "password": password})
    assert reply.status_code in (200, 201), reply.text
    return reply.json()["token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
