"""The partner simulator over real HTTP on loopback (httpx): money, idempotency, notifications, knobs, TLS."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from authsrv import pki
from simulators.partner import (
    Kind,
    Latency,
    PartnerSimSettings,
    SimKey,
    Title,
    running_partner,
    serve_partner,
)

REPO = Path(__file__).resolve().parent.parent
USER = "1337"
BALANCE = "b334b384-328c-11ed-a261-0242ac120002"


@pytest.fixture(scope="session")
def jwe_key() -> SimKey:
    return SimKey.generate()  # ~0.1 s: once for the whole file


@pytest.fixture
async def sim(jwe_key):
    async with running_partner(PartnerSimSettings(jwe_key=jwe_key, seed=7)) as sim:
        yield sim


@pytest.fixture
async def client(sim):
    async with httpx.AsyncClient(base_url=sim.url, timeout=5.0) as client:
        yield client


def tx(amount: int, *, transaction_id: str = "ab3d89e4-3291-11ed-a261-0242ac120002", balance: str = BALANCE,
       currency: str = "EUR", reference: str | None = None, status: str = "AUTHORIZED") -> dict:
    """The documents' "Transaction object" example, with our amount."""
    body = {
        "balanceId": balance, "resourceId": "9d673932-3291-11ed-a261-0242ac120002", "resource": "card",
        "transactionId": transaction_id, "type": "POS", "amount": amount, "currency": currency,
        "originalAmount": amount, "originalCurrency": currency, "status": status,
        "description": "transaction description", "date": "2020-08-17T18:43:42+00:00",
        "transactionData": {"mcc": "5942", "merchantIdentifier": "003060300000005", "merchantName": "Book store",
                            "captureMode": "NFC", "lastFourDigits": "4560", "acquirerCountry": "PL"},
    }
    if reference is not None:
        body["referenceTransactionId"] = reference
    return body


def key() -> dict[str, str]:
    return {"X-Idempotency-Key": str(uuid.uuid4())}


async def post(client: httpx.AsyncClient, what: str, amount: int, **fields) -> httpx.Response:
    """POST /transactions/WHAT with a fresh idempotency key."""
    return await client.post(f"/transactions/{what}", json=tx(amount, **fields), headers=key())


async def link(client: httpx.AsyncClient, amount: int, *, user: str = USER, balance: str = BALANCE) -> None:
    response = await client.post(f"/users/{user}/balances", json={"balanceId": balance, "currency": "EUR"})
    assert response.status_code == 204, response.text
    response = await client.put(f"/_sim/balances/{user}/{balance}", json={"amount": amount})
    assert response.status_code == 200, response.text


async def amount_of(client: httpx.AsyncClient, *, user: str = USER, balance: str = BALANCE) -> int:
    response = await client.get(f"/users/{user}/balances/{balance}")
    assert response.status_code == 200, response.text
    assert response.json()["currency"] == "EUR"
    return response.json()["amount"]


# -- balances and money -------------------------------------------------------------------------


async def test_link_get_list_delete(client):
    assert (await client.get(f"/users/{USER}/balances")).json() == []
    await link(client, 250)
    assert (await client.get(f"/users/{USER}/balances/{BALANCE}")).json() == {"currency": "EUR", "amount": 250}
    assert (await client.get(f"/users/{USER}/balances")).json() == [{"id": BALANCE, "currency": "EUR", "amount": 250}]
    # Relinking is idempotent; someone else's balance is forbidden; an unknown one is 404.
    again = await client.post(f"/users/{USER}/balances", json={"balanceId": BALANCE, "currency": "EUR"})
    assert again.status_code == 204
    other = await client.get(f"/users/42/balances/{BALANCE}")
    assert other.status_code == 403 and other.json()["title"] == "FORBIDDEN"
    missing = await client.get(f"/users/{USER}/balances/nope")
    assert missing.status_code == 404 and missing.json()["title"] == "BALANCE_NOT_FOUND"
    # Deleting is refused while money is on it.
    refused = await client.delete(f"/users/{USER}/balances/{BALANCE}")
    assert refused.status_code == 422 and refused.json()["title"] == "BALANCE_NOT_EMPTY"
    await client.put(f"/_sim/balances/{USER}/{BALANCE}", json={"amount": 0})
    assert (await client.delete(f"/users/{USER}/balances/{BALANCE}")).status_code == 204
    assert (await client.get(f"/users/{USER}/balances")).json() == []


async def test_link_refuses_bad_bodies(client):
    for body in ({"balanceId": BALANCE}, {"balanceId": BALANCE, "currency": "eur"},
                 {"balanceId": BALANCE, "currency": "EUR", "extra": 1}, {"balanceId": "", "currency": "EUR"}):
        response = await client.post(f"/users/{USER}/balances", json=body)
        assert response.status_code == 400, body
        assert response.json()["title"] == "INVALID_PAYLOAD"
    assert (await client.get(f"/users/{USER}/balances")).json() == []


async def test_debit_credit_force_and_reversal_move_real_amounts(client, sim):
    await link(client, 10_000)
    assert (await post(client, "debit", 3_000, transaction_id="t1")).status_code == 204
    assert await amount_of(client) == 7_000
    assert (await post(client, "credit", 500, transaction_id="t2")).status_code == 204
    assert await amount_of(client) == 7_500
    # A force-debit cannot be refused, even past zero.
    force = await post(client, "force-debit", 9_000, transaction_id="t3")
    assert force.status_code == 204
    assert await amount_of(client) == -1_500
    assert (await post(client, "force-credit", 1_000, transaction_id="t4")).status_code == 204
    assert await amount_of(client) == -500
    # Reversal of the first debit gives its 3,000 back; partial reversal of the force-debit: 4,000.
    reversal = await post(client, "reversal", 3_000, transaction_id="t1", status="REVERSED")
    assert reversal.status_code == 204
    assert await amount_of(client) == 2_500
    partial = tx(4_000, transaction_id="r-t3", reference="t3", status="REVERSED")
    assert (await client.post("/transactions/reversal", json=partial, headers=key())).status_code == 204
    assert await amount_of(client) == 6_500
    # Reversing t1 again (a new key) gives nothing more: only what the debit took comes back.
    assert (await post(client, "reversal", 3_000, transaction_id="t1")).status_code == 204
    assert await amount_of(client) == 6_500
    # Reversal of a credit takes it back.
    assert (await post(client, "reversal", 500, transaction_id="t2")).status_code == 204
    assert await amount_of(client) == 6_000
    assert sim.state.amount_of(BALANCE) == 6_000


async def test_insufficient_funds_is_the_documented_422(client, sim):
    await link(client, 1_000)
    response = await post(client, "debit", 1_001)
    assert response.status_code == 422
    assert set(response.json()) == {"title", "detail"}
    assert response.json()["title"] == "INSUFFICIENT_FUNDS"
    assert await amount_of(client) == 1_000
    assert (await post(client, "debit", 1_000)).status_code == 204
    assert await amount_of(client) == 0


async def test_forced_codes_by_amount_ending_and_by_user(client, sim):
    await link(client, 1_000_000)
    for amount, title in ((10_051, "INSUFFICIENT_FUNDS"), (10_061, "LIMITS_EXCEEDED"), (10_059, "FRAUDS_DETECTED")):
        response = await post(client, "debit", amount)
        assert (response.status_code, response.json()["title"]) == (422, title)
    # A credit can only be refused for fraud; force-debit and reversal never are.
    assert (await post(client, "credit", 10_051)).status_code == 204
    fraud = await post(client, "credit", 10_059)
    assert (fraud.status_code, fraud.json()["title"]) == (422, "FRAUDS_DETECTED")
    assert (await post(client, "force-debit", 10_061)).status_code == 204
    assert await amount_of(client) == 1_000_000 + 10_051 - 10_061
    # By user, switched at run time; the amount codes can be switched off.
    mode = await client.post("/_sim/mode", json={"forcedUsers": {USER: "LIMITS_EXCEEDED"}, "amountCodes": False})
    assert mode.status_code == 200 and mode.json()["forcedUsers"] == {USER: "LIMITS_EXCEEDED"}
    response = await post(client, "debit", 100)
    assert (response.status_code, response.json()["title"]) == (422, "LIMITS_EXCEEDED")
    await client.post("/_sim/mode", json={"forcedUsers": {USER: None}})
    assert (await post(client, "debit", 10_051)).status_code == 204
    bad = await client.post("/_sim/mode", json={"forcedUsers": {USER: "BALANCE_NOT_FOUND"}})
    assert bad.status_code == 400
    assert sim.state.mode.forced_users == {}


async def test_unknown_balance_is_404_and_reversal_never_fails(client, sim):
    for path in ("/transactions/debit", "/transactions/credit", "/transactions/force-debit"):
        response = await client.post(path, json=tx(100, balance="unknown"), headers=key())
        assert (response.status_code, response.json()["title"]) == (404, "BALANCE_NOT_FOUND"), path
    reversal = await post(client, "reversal", 100, balance="unknown")
    assert reversal.status_code == 204
    await link(client, 100)
    unmatched = await post(client, "reversal", 100, transaction_id="never-seen")
    assert unmatched.status_code == 204
    assert await amount_of(client) == 100
    assert (await client.get("/_sim/stats")).json()["unmatchedReversals"] == 2


async def test_currency_mismatch_refused_unless_forced(client, sim):
    await link(client, 1_000)
    refused = await post(client, "debit", 100, currency="PLN")
    assert (refused.status_code, refused.json()["title"]) == (422, "CURRENCY_MISMATCH")
    assert (await post(client, "force-debit", 100, currency="PLN")).status_code == 204
    assert await amount_of(client) == 900
    assert sim.state.currency_mismatches_forced == 1


async def test_status_update_records_the_cleared_amount(client, sim):
    await link(client, 1_000)
    await post(client, "debit", 400, transaction_id="t-clear")
    cleared = await client.put("/transactions/t-clear", json=tx(380, transaction_id="t-clear", status="CLEARED"))
    assert cleared.status_code == 204
    posting = sim.state.postings[(BALANCE, "t-clear")][-1]
    assert (posting.status, posting.cleared_amount_minor) == ("CLEARED", 380)
    assert await amount_of(client) == 600  # clearing records; it does not move money
    missing = await client.put("/transactions/nope", json=tx(1, transaction_id="nope", status="CLEARED"))
    assert (missing.status_code, missing.json()["title"]) == (404, "TRANSACTION_NOT_FOUND")


async def test_transaction_bodies_are_decoded_strictly(client):
    await link(client, 1_000)
    wrong = [
        {**tx(100), "descripion": "typo"},  # unknown field
        {**tx(100), "type": "pos"},  # not an allowed value
        {**tx(100), "amount": "100"},
        {**tx(100), "amount": -1},
        {**tx(100), "status": "PENDING"},
        {**tx(100), "date": "2020-08-17T18:43:42"},  # no time zone
        {key_: value for key_, value in tx(100).items() if key_ != "currency"},
    ]
    for body in wrong:
        response = await client.post("/transactions/debit", json=body, headers=key())
        assert response.status_code == 400, body
        assert response.json()["title"] == "INVALID_PAYLOAD"
    not_json = await client.post("/transactions/debit", content=b"{", headers=key())
    assert not_json.status_code == 400
    too_big = await client.post("/transactions/debit", content=b" " * (65 * 1024), headers=key())
    assert too_big.status_code == 413
    no_key = await client.post("/transactions/debit", json=tx(100))
    assert (no_key.status_code, no_key.json()["title"]) == (400, "IDEMPOTENCY_KEY_REQUIRED")
    assert await amount_of(client) == 1_000


# -- idempotency --------------------------------------------------------------------------------


async def test_replay_returns_the_cached_answer_and_moves_money_once(client, sim):
    await link(client, 1_000)
    headers = key()
    first = await client.post("/transactions/debit", json=tx(300), headers=headers)
    second = await client.post("/transactions/debit", json=tx(300), headers=headers)
    assert first.status_code == second.status_code == 204
    assert await amount_of(client) == 700
    # A 422 is cached too: the same key stays declined after a top-up.
    declined_key = key()
    declined = await client.post("/transactions/debit", json=tx(5_000), headers=declined_key)
    await client.put(f"/_sim/balances/{USER}/{BALANCE}", json={"amount": 100_000})
    replay = await client.post("/transactions/debit", json=tx(5_000), headers=declined_key)
    assert (replay.status_code, replay.content) == (declined.status_code, declined.content)
    assert replay.status_code == 422
    assert await amount_of(client) == 100_000
    # The same key for another request is refused, not replayed, and changes nothing.
    reused = await client.post("/transactions/debit", json=tx(301), headers=headers)
    assert (reused.status_code, reused.json()["title"]) == (409, "IDEMPOTENCY_KEY_REUSED")
    assert await amount_of(client) == 100_000
    stats = (await client.get("/_sim/stats")).json()
    assert stats["endpoints"]["debit"]["replays"] == 2
    assert stats["endpoints"]["debit"]["processed"] == 2
    assert stats["endpoints"]["debit"]["invalid"] == 1
    debits = sim.state.received_of("debit")
    assert [(one.idempotency_key, one.replays) for one in debits] == [
        (headers["X-Idempotency-Key"], 1), (declined_key["X-Idempotency-Key"], 1)]


async def test_concurrent_replays_apply_once(jwe_key):
    settings = PartnerSimSettings(jwe_key=jwe_key, latency=Latency.fixed(20))
    async with running_partner(settings) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        await link(client, 1_000)
        headers = key()
        statuses = []

        async def debit():
            statuses.append((await client.post("/transactions/debit", json=tx(100), headers=headers)).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(debit)
        assert statuses == [204] * 10
        assert sim.state.amount_of(BALANCE) == 900
        assert sim.state.stats[Kind.debit].replays == 9


# -- notifications ------------------------------------------------------------------------------


def transaction_notification(description: str = "APPROVED") -> dict:
    """The documents' "Transactions notifier" example."""
    return {
        "status": "SUCCESS" if description == "APPROVED" else "DECLINED",
        "date": "2023-11-17T11:32:16+00:00",
        "description": description,
        "transaction": {
            "id": "b4f534ef-77c2-4f16-ab4d-496806a76fb6", "balanceId": "60036f20-3b2c-470e-b9de-3c6cfbe8a5ff",
            "resourceId": "b3de5060-2ae2-4f3c-9b94-9c27a90dc6fe", "resource": "card", "cardId": "357970",
            "externalTransactionId": "d275ecb8-138e-4d0e-b5bf-c4158b4ce516",
            "referenceExternalTransactionId": None, "type": "POS", "category": "DEBIT", "amount": 10000,
            "currency": "PLN", "originalAmount": 12300, "originalCurrency": "PLN", "status": "AUTHORIZED",
            "description": "FrogShop Lublin POL", "date": "2023-11-17T11:32:16+00:00",
            "referenceExternalTransactionDate": None,
            "transactionData": {"mcc": "5122", "merchantIdentifier": "12345", "captureMode": "NFC",
                                "lastFourDigits": "0911", "acquirerCountry": "PL"},
        },
    }


def verification(status: str, reason: str | None = None) -> dict:
    return {"verificationId": "6faaa45a-41f6-4922-95fe-16e316ba7e91", "userId": "1337",
            "email": "leon@example.com", "firstName": "Leon", "lastName": "Bakiewicz",
            "status": status, "reason": reason}


async def test_notification_replay_is_not_recorded_twice(client, sim):
    headers = {**key(), "X-Authsrv-Timestamp": "1700000000", "X-Authsrv-Signature": "v1=abc123"}
    body = json.dumps(transaction_notification()).encode()
    for _ in range(3):
        response = await client.post("/notifications/transaction", content=body, headers=headers)
        assert response.status_code == 204
    declined = await client.post("/notifications/transaction",
                                 json=transaction_notification("INSUFFICIENT_FUNDS"), headers=key())
    assert declined.status_code == 204
    received = (await client.get("/_sim/received", params={"kind": "transaction"})).json()
    assert [one["replays"] for one in received["received"]] == [2, 0]
    first = received["received"][0]
    assert first["idempotencyKey"] == headers["X-Idempotency-Key"]
    assert (first["signature"], first["signatureTimestamp"]) == ("v1=abc123", "1700000000")
    assert first["rawBody"].encode() == body  # the exact bytes a signature covers
    assert first["body"]["transaction"]["cardId"] == "357970"
    stats = (await client.get("/_sim/stats")).json()["endpoints"]["transaction"]
    assert (stats["processed"], stats["replays"]) == (2, 2)
    # Undocumented description codes and missing keys are refused, not recorded.
    bad = await client.post("/notifications/transaction", json=transaction_notification("OK"), headers=key())
    assert bad.status_code == 400
    no_key = await client.post("/notifications/transaction", json=transaction_notification())
    assert no_key.status_code == 400
    assert len(sim.state.received_of("transaction")) == 2


async def test_verification_notifications(client, sim):
    for path, status, reason in (("verificationInProgress", "IN_PROGRESS", None),
                                 ("verificationAccepted", "ACCEPTED", None),
                                 ("verificationRejected", "REJECTED", "INVALID_CUSTOMER_DATA")):
        response = await client.post(f"/notifications/{path}", json=verification(status, reason), headers=key())
        assert response.status_code == 204, response.text
    missing_reason = {name: value for name, value in verification("ACCEPTED").items() if name != "reason"}
    wrong = [("verificationAccepted", missing_reason), ("verificationAccepted", verification("REJECTED", "X")),
             ("verificationRejected", verification("REJECTED")), ("verificationInProgress", verification("ACCEPTED"))]
    for path, body in wrong:
        response = await client.post(f"/notifications/{path}", json=body, headers=key())
        assert response.status_code == 400, (path, body)
    found = (await client.get("/_sim/received", params={"kind": "verification"})).json()["received"]
    kinds = ["verification-in-progress", "verification-accepted", "verification-rejected"]
    assert [one["kind"] for one in found] == kinds
    assert found[2]["body"]["reason"] == "INVALID_CUSTOMER_DATA"


async def test_otp_arrives_as_jwe_to_the_public_key(client, sim):
    from jwcrypto import jwe, jwk  # an independent JOSE implementation as the sender

    published = (await client.get("/public-key")).json()
    assert set(published) == {"publicKey"}
    pem = base64.b64decode(published["publicKey"])
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    recipient = jwk.JWK.from_pem(pem)
    otp = {"storageCustomerId": "1337", "storageCardId": 1337, "balanceId": BALANCE, "amount": "1000",
           "currency": "PLN", "merchantName": "merchant test", "otp": "482915"}
    tokens = {}
    for alg in ("RSA-OAEP-256", "RSA-OAEP"):
        token = jwe.JWE(json.dumps(otp).encode(), protected=json.dumps({"alg": alg, "enc": "A256GCM"}),
                        recipient=recipient)
        tokens[alg] = token.serialize(compact=True)
        response = await client.post("/notifications/otp", json={"payload": tokens[alg]}, headers=key())
        assert response.status_code == 204, response.text
    received = sim.state.received_of("otp")
    assert len(received) == 2 and all(one.encrypted for one in received)
    assert msgspec.json.decode(received[0].body)["otp"] == "482915"
    assert json.loads(received[0].raw_body) == {"payload": tokens["RSA-OAEP-256"]}
    # A retry re-encrypted (new ciphertext, same plaintext) under the same key is a replay.
    headers = key()
    first = await client.post("/notifications/otp", json={"payload": tokens["RSA-OAEP"]}, headers=headers)
    assert first.status_code == 204
    again = jwe.JWE(json.dumps(otp).encode(), protected=json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"}),
                    recipient=recipient).serialize(compact=True)
    assert (await client.post("/notifications/otp", json={"payload": again}, headers=headers)).status_code == 204
    assert len(sim.state.received_of("otp")) == 3
    # Plain, undecryptable, or encrypted to another key: refused with the documents' codes.
    plain = await client.post("/notifications/otp", json=otp, headers=key())
    assert (plain.status_code, plain.json()["title"]) == (400, "ENCRYPTION_REQUIRED")
    garbage = await client.post("/notifications/otp", json={"payload": "a.b.c.d.e"}, headers=key())
    assert (garbage.status_code, garbage.json()["title"]) == (400, "CANT_DECRYPT_PAYLOAD")
    stranger = jwk.JWK.generate(kty="RSA", size=2048)
    foreign = jwe.JWE(json.dumps(otp).encode(), protected=json.dumps({"alg": "RSA-OAEP-256", "enc": "A256GCM"}),
                      recipient=stranger).serialize(compact=True)
    response = await client.post("/notifications/otp", json={"payload": foreign}, headers=key())
    assert (response.status_code, response.json()["title"]) == (400, "CANT_DECRYPT_PAYLOAD")
    assert "482915" not in response.text
    assert len(sim.state.received_of("otp")) == 3


# -- knobs --------------------------------------------------------------------------------------


async def test_latency_knob_delays_measurably(client):
    await link(client, 1_000)

    async def timed() -> float:
        start = trio.current_time()
        assert (await client.get(f"/users/{USER}/balances/{BALANCE}")).status_code == 200
        return trio.current_time() - start

    fast = min([await timed() for _ in range(3)])
    await client.post("/_sim/mode", json={"latencyMs": 150})
    slow = min([await timed() for _ in range(3)])
    assert slow >= 0.150
    assert slow > 3 * fast, (slow, fast)
    await client.post("/_sim/mode", json={"latencyMs": 0})
    assert await timed() < 0.150


def test_lognormal_latency_has_the_asked_median_and_p99():
    latency = Latency(median_ms=5.0, p99_ms=50.0)
    rng = random.Random(3)
    draws = sorted(latency.sample_ms(rng) for _ in range(20_000))
    assert 4.5 < draws[10_000] < 5.5
    assert 40.0 < draws[19_800] < 62.0
    assert all(0.0 < draw <= 60_000.0 for draw in draws)
    assert Latency.fixed(7).sample_ms(rng) == 7
    with pytest.raises(AssertionError):
        Latency(median_ms=10.0, p99_ms=5.0)


async def test_down_mode_answers_503_then_comes_back(client, sim):
    await link(client, 1_000)
    await client.post("/_sim/mode", json={"down": True})
    for response in (await client.get("/public-key"),
                     await post(client, "debit", 100),
                     await client.post("/notifications/transaction", json=transaction_notification(), headers=key())):
        assert (response.status_code, response.json()["title"]) == (503, "SERVICE_UNAVAILABLE")
    assert (await client.get("/_sim/stats")).status_code == 200  # the control API stays up
    assert sim.state.amount_of(BALANCE) == 1_000
    headers = key()
    await client.post("/_sim/mode", json={"down": False})
    assert (await client.post("/transactions/debit", json=tx(100), headers=headers)).status_code == 204
    assert sim.state.amount_of(BALANCE) == 900
    assert sim.state.stats[Kind.debit].unavailable == 1


async def test_injected_5xx_changes_nothing_and_a_retry_succeeds(client, sim):
    await link(client, 1_000)
    await client.post("/_sim/mode", json={"fail5xx": 1.0})
    headers = key()
    failed = await client.post("/transactions/debit", json=tx(100), headers=headers)
    assert (failed.status_code, failed.json()["title"]) == (500, "INTERNAL_ERROR")
    assert sim.state.amount_of(BALANCE) == 1_000
    await client.post("/_sim/mode", json={"fail5xx": 0.0})
    assert (await client.post("/transactions/debit", json=tx(100), headers=headers)).status_code == 204
    assert sim.state.amount_of(BALANCE) == 900
    assert sim.state.stats[Kind.debit].injected_5xx == 1


async def test_timeout_applies_late_and_the_retry_gets_the_cached_answer(client, sim):
    await link(client, 1_000)
    await client.post("/_sim/mode", json={"timeoutRate": 1.0, "timeoutMs": 2_000})
    headers = key()
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/transactions/debit", json=tx(100), headers=headers, timeout=0.2)
    assert sim.state.amount_of(BALANCE) == 900  # applied: only the answer is late
    await client.post("/_sim/mode", json={"timeoutRate": 0.0})
    retry = await client.post("/transactions/debit", json=tx(100), headers=headers)
    assert retry.status_code == 204
    assert sim.state.amount_of(BALANCE) == 900
    assert (sim.state.stats[Kind.debit].injected_timeouts, sim.state.stats[Kind.debit].replays) == (1, 1)


async def test_drop_closes_the_connection_after_applying(client, sim):
    await link(client, 1_000)
    await client.post("/_sim/mode", json={"dropRate": 1.0})
    headers = key()
    with pytest.raises(httpx.TransportError):
        await client.post("/transactions/debit", json=tx(100), headers=headers)
    await client.post("/_sim/mode", json={"dropRate": 0.0})
    assert (await client.post("/transactions/debit", json=tx(100), headers=headers)).status_code == 204
    assert sim.state.amount_of(BALANCE) == 900
    assert sim.state.stats[Kind.debit].injected_drops == 1


async def test_mode_and_control_api_refuse_bad_input(client, sim):
    for body in ({"fail5xx": 1.5}, {"fail5xx": 0.6, "dropRate": 0.6}, {"latencyMedianMs": 5},
                 {"latencyMedianMs": 50, "latencyP99Ms": 5}, {"latencyMs": -1}, {"nope": 1}):
        response = await client.post("/_sim/mode", json=body)
        assert response.status_code == 400, body
    assert sim.state.mode.fail_5xx == 0.0 and sim.state.mode.drop_rate == 0.0
    lognormal = await client.post("/_sim/mode", json={"latencyMedianMs": 1, "latencyP99Ms": 4})
    assert lognormal.json()["latencyP99Ms"] == 4
    assert (await client.get("/_sim/received", params={"limit": "0"})).status_code == 400
    assert (await client.put(f"/_sim/balances/{USER}/{BALANCE}", json={"amount": "1"})).status_code == 400
    await link(client, 5)
    listed = (await client.get("/_sim/balances")).json()["balances"]
    assert listed == [{"userId": USER, "balanceId": BALANCE, "currency": "EUR", "amount": 5}]
    assert (await client.post("/_sim/reset")).status_code == 204
    assert sim.state.received_of() == [] and sim.state.stats[Kind.link_balance].requests == 0
    assert sim.state.amount_of(BALANCE) == 5


def test_settings_refuse_impossible_combinations(jwe_key, tmp_path):
    with pytest.raises(ValueError):
        PartnerSimSettings(fail_5xx=0.7, drop_rate=0.7)
    with pytest.raises(ValueError):
        PartnerSimSettings(tls_cert=tmp_path / "x.crt")
    with pytest.raises(ValueError):
        PartnerSimSettings(forced_users={"1": Title.BALANCE_NOT_FOUND})
    with pytest.raises(ValueError):
        PartnerSimSettings(port=70_000)


async def test_stop_cancel_and_errors_shut_down_gracefully(jwe_key):
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(serve_partner, PartnerSimSettings(jwe_key=jwe_key))
        async with httpx.AsyncClient(base_url=sim.url) as client:
            assert (await client.get("/public-key")).status_code == 200
            sim.stop()
            with trio.fail_after(5):
                await sim.stopped.wait()
            with pytest.raises(httpx.ConnectError):
                await client.get("/public-key")
    # Cancelled from outside, or left by an error: the server still stops cleanly (no lifespan error).
    with trio.move_on_after(0.3) as outer:
        async with running_partner(PartnerSimSettings(jwe_key=jwe_key)):
            await trio.sleep_forever()
    assert outer.cancelled_caught
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="body failed")):
        async with running_partner(PartnerSimSettings(jwe_key=jwe_key)):
            raise ValueError("body failed")


# -- TLS and the command line -------------------------------------------------------------------


@pytest.fixture
def pki_dir(tmp_path) -> Path:
    directory = tmp_path / "pki"
    pki.create_ca(directory)
    pki.issue_server_cert(directory)
    pki.issue_client_cert(directory, "demo", "partner")
    return directory


async def test_tls_requires_a_client_certificate_from_the_ca(jwe_key, pki_dir):
    settings = PartnerSimSettings(jwe_key=jwe_key, tls_cert=pki_dir / "server.crt", tls_key=pki_dir / "server.key",
                                  client_ca=pki_dir / "ca.crt")
    async with running_partner(settings) as sim:
        assert sim.url.startswith("https://127.0.0.1:")
        with_cert = pki.client_ssl_context(pki_dir, "partner")
        async with httpx.AsyncClient(base_url=sim.url, verify=with_cert) as client:
            await link(client, 700)
            assert (await post(client, "debit", 200)).status_code == 204
            assert await amount_of(client) == 500
        assert sim.state.received_of("debit")[0].client_cert_name == "CN=demo"
        without_cert = pki.client_ssl_context(pki_dir)
        async with httpx.AsyncClient(base_url=sim.url, verify=without_cert) as client:
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await client.get("/public-key")
        # A certificate from another CA is refused too.
        other = pki_dir.parent / "other"
        pki.create_ca(other)
        pki.issue_client_cert(other, "mallory", "partner")
        foreign = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        foreign.load_cert_chain(other / "partner.crt", other / "partner.key")
        async with httpx.AsyncClient(base_url=sim.url, verify=foreign) as client:
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await client.get("/public-key")
        assert sim.state.stats[Kind.public_key].requests == 0


def test_command_line_prints_the_port_and_stops_on_sigterm():
    process = subprocess.Popen(
        [sys.executable, "-m", "simulators.partner", "--port", "0", "--latency-ms", "1", "--seed", "1",
         "--force-user", "42=FRAUDS_DETECTED", "--initial-balance", "900"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = process.stdout.readline()  # bounded by the pytest timeout
        assert line.startswith("partner simulator listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            assert client.post("/users/42/balances", json={"balanceId": "b", "currency": "EUR"}).status_code == 204
            assert client.get("/users/42/balances/b").json() == {"currency": "EUR", "amount": 900}
            refused = client.post("/transactions/debit", json=tx(10, balance="b"), headers=key())
            assert refused.json()["title"] == "FRAUDS_DETECTED"
            assert client.get("/_sim/mode").json()["latencyMs"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "simulators.partner", "--force-user", "42=NOPE"], cwd=REPO,
                         capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and "--force-user" in bad.stderr


@pytest.mark.slow
async def test_sustained_load_with_faults_keeps_the_books_straight(jwe_key):
    """Many clients, random faults, every call retried with its key until answered: the balance is
    exactly what the answered debits say, whatever was dropped or late."""
    # The client's read timeout (1 s) is shorter than a late answer (1.5 s) and far above a normal one,
    # even on a busy machine: tighter timeouts turn connection churn into a retry storm.
    settings = PartnerSimSettings(jwe_key=jwe_key, seed=11, fail_5xx=0.1, timeout_rate=0.05, timeout_ms=1_500,
                                  drop_rate=0.1, amount_codes=False, latency=Latency(median_ms=1, p99_ms=10))
    approved = 0
    operations = 1_000
    limiter = trio.CapacityLimiter(50)
    timeout = httpx.Timeout(1.0, pool=10.0)  # waiting for a pooled connection is not the partner's fault
    async with running_partner(settings) as sim, httpx.AsyncClient(base_url=sim.url, timeout=timeout) as client:
        await link(client, 10**9)

        async def one(index: int) -> None:
            headers = key()
            async with limiter:
                await retry_until_answered(index, headers)

        async def retry_until_answered(index: int, headers: dict[str, str]) -> None:
            nonlocal approved
            for _ in range(50):  # P(50 faults in a row) = 0.25 ** 50
                try:
                    response = await client.post("/transactions/debit", json=tx(7, transaction_id=f"t{index}"),
                                                 headers=headers)
                except httpx.TransportError:
                    continue
                if response.status_code == 204:
                    approved += 1
                    return
                assert response.status_code == 500
            raise AssertionError("never answered")

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for index in range(operations):
                nursery.start_soon(one, index)
        assert time.monotonic() - started < 120
        assert approved == operations
        assert sim.state.amount_of(BALANCE) == 10**9 - 7 * operations
        stats = sim.state.stats[Kind.debit]
        assert stats.processed == operations
        assert stats.injected_5xx > 0 and stats.injected_drops > 0 and stats.injected_timeouts > 0


async def test_force_debit_with_the_debit_key_reconciles_a_late_debit(client, sim):
    """Stand-in: the issuer gave up waiting, approved, and sends a force-debit with the debit's key.
    If the partner applied the debit late, the force-debit is that same operation: money moves once.
    A force-debit under a fresh key (no debit seen) applies."""
    await link(client, 1_000)
    headers = key()
    assert (await client.post("/transactions/debit", json=tx(300), headers=headers)).status_code == 204
    forced = await client.post("/transactions/force-debit", json=tx(300), headers=headers)
    assert forced.status_code == 204
    assert await amount_of(client) == 700
    other = await client.post("/transactions/force-debit", json=tx(200, transaction_id="1b3d89e4-3291-11ed-a261-0242ac120002"),
                              headers=key())
    assert other.status_code == 204 and await amount_of(client) == 500
    # A reversal must never reuse the debit's key: it would be refused, not replayed.
    refused = await client.post("/transactions/reversal", json=tx(300, reference="ab3d89e4-3291-11ed-a261-0242ac120002"),
                                headers=headers)
    assert refused.status_code == 409
