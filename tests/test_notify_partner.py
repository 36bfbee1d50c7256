"""Partner notifications end to end on loopback: 3DS OTP (JWE to the simulator's key, verify, fail,
expire), verification notifications after a KYC decision, and external-balance calls from advices
and reversals (force-debit, reversal with money moving at the simulator)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import pytest
import trio
from PIL import Image as PilImage

from authsrv.notify.calls import transaction_id
from authsrv.pki import client_ssl_context
from authsrv.store.partners import add_partner
from simulators.partner import PartnerSimSettings, running_partner
from tests.conftest import start_in_process
from tests.isoclient import auth, reversal_of
from tests.test_notify_outbox import (
    FAST,
    admin_client,
    assert_signed,
    authorize,
    configure_partner,
    received,
)

pytestmark = pytest.mark.timeout(60)
USER = {"firstName": "Leon", "lastName": "Bakiewicz", "phone": "48500600711", "email": "leon@example.com",
        "birthDate": "1970-01-01", "wPIN": "5058", "state": "VERIFIED", "kyc": "PENDING"}  # fmt: skip
FORM = {"firstName": "Leon", "lastName": "Bakiewicz", "street": "Pieklo", "pesel": "70010155587", "number": "17a",
        "city": "Lublin", "birthDate": "1970-01-01", "postCode": "20-128", "identityCardNo": "ASD123456",
        "apartment": "2", "documentType": "passport", "country": "PL", "documentExpirationDate": "2030-01-30",
        "nationality": "polish"}  # fmt: skip


def _image(fmt: str) -> bytes:
    out = io.BytesIO()
    PilImage.new("RGB", (16, 12), (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


IMAGES = {"imageFace": ("face.png", _image("PNG"), "image/png"),
          "imageFront": ("front.jpg", _image("JPEG"), "image/jpeg"),
          "imageBack": ("back.jpg", _image("JPEG"), "image/jpeg")}  # fmt: skip


def partner_client(data_dir: Path, port: int, stem: str = "partner") -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=client_ssl_context(data_dir / "pki", stem),
                             timeout=20)


def problem_title(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    return reply.json()["title"]


async def create_challenge(http: httpx.AsyncClient, card: dict, **extra) -> dict:
    body = {"cardId": card["cardId"], "amount": 1999, "currency": "EUR", "merchantName": "FrogShop", **extra}
    reply = await http.post("/secure/3ds/challenges", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()


async def otp_of(sim_url: str, count: int) -> list[dict]:
    calls = await received(sim_url, "otp", count)
    assert len(calls) == count, calls
    return calls


async def test_otp_end_to_end(data_dir, cards):
    add_partner(data_dir, "other")
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["otp"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            card = cards[0]
            async with partner_client(data_dir, server.rest_port) as demo, \
                    partner_client(data_dir, server.rest_port, "other") as other:  # fmt: skip
                created = await create_challenge(demo, card, customerId=card["customerId"])
                assert set(created) == {"challengeId", "expiresAt"}
                (call,) = await otp_of(sim.url, 1)
                assert call["encrypted"] and "payload" in call["rawBody"]  # JWE on the wire
                otp = call["body"]["otp"]
                assert len(otp) == 6 and otp.isdigit() and otp not in call["rawBody"]
                assert call["body"]["storageCardId"] == card["cardId"] and call["body"]["amount"] == 1999
                assert call["body"]["merchantName"] == "FrogShop"
                assert_signed(data_dir, call)
                path = f"/secure/3ds/challenges/{created['challengeId']}/verify"
                wrong = "000000" if otp != "000000" else "111111"
                assert problem_title(await other.post(path, json={"otp": otp}), 404) == "CHALLENGE_NOT_FOUND"
                assert problem_title(await demo.post(path, json={"otp": wrong}), 422) == "OTP_INVALID"
                reply = await demo.post(path, json={"otp": otp})
                assert reply.status_code == 200 and reply.json() == {"status": "VERIFIED"}, reply.text
                # Three wrong tries fail a challenge; the right OTP after that is refused too.
                second = await create_challenge(demo, card)
                (_, call) = await otp_of(sim.url, 2)
                path = f"/secure/3ds/challenges/{second['challengeId']}/verify"
                wrong = "000000" if call["body"]["otp"] != "000000" else "111111"
                titles = [problem_title(await demo.post(path, json={"otp": wrong}), 422) for _ in range(3)]
                assert titles == ["OTP_INVALID", "OTP_INVALID", "CHALLENGE_FAILED"]
                right = await demo.post(path, json={"otp": call["body"]["otp"]})
                assert problem_title(right, 422) == "CHALLENGE_FAILED"
                # Bad input and foreign cards.
                reply = await demo.post("/secure/3ds/challenges", json={"cardId": card["cardId"], "amount": 0,
                                                                        "currency": "EUR", "merchantName": "x"})
                assert problem_title(reply, 400) == "INVALID_PAYLOAD"
                reply = await other.post("/secure/3ds/challenges", json={"cardId": card["cardId"], "amount": 5,
                                                                         "currency": "EUR", "merchantName": "x"})
                assert problem_title(reply, 409) == "OTP_NOT_CONFIGURED"  # "other" has no notifier
                reply = await demo.post("/secure/3ds/challenges", json={"cardId": 10**9, "amount": 5,
                                                                        "currency": "EUR", "merchantName": "x"})
                assert problem_title(reply, 404) == "CARD_NOT_FOUND"
            # The OTP is stored only as an HMAC.
            rows = server.store.db.execute("SELECT otp_mac, state FROM otp_challenges ORDER BY id").fetchall()
            assert [state for _, state in rows] == ["VERIFIED", "FAILED"]
            assert all(len(mac) == 64 and otp not in mac for mac, _ in rows)
            server.stop.set()


async def test_otp_expires(data_dir, cards):
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["otp"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, otp__ttl_s=1, **FAST)
            async with partner_client(data_dir, server.rest_port) as demo:
                created = await create_challenge(demo, cards[1])
                (call,) = await otp_of(sim.url, 1)
                await trio.sleep(1.1)
                reply = await demo.post(f"/secure/3ds/challenges/{created['challengeId']}/verify",
                                        json={"otp": call["body"]["otp"]})
                assert problem_title(reply, 410) == "CHALLENGE_EXPIRED"
            server.stop.set()


async def test_otp_refused_while_the_partner_key_is_unavailable(data_dir, cards):
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["otp"])
        async with httpx.AsyncClient(base_url=sim.url) as control:
            await control.post("/_sim/mode", json={"down": True})
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            async with partner_client(data_dir, server.rest_port) as demo:
                reply = await demo.post("/secure/3ds/challenges", json={
                    "cardId": cards[0]["cardId"], "amount": 5, "currency": "EUR", "merchantName": "x"})
                assert problem_title(reply, 503) == "OTP_NOTIFIER_UNAVAILABLE"
            assert server.store.db.execute("SELECT COUNT(*) FROM otp_challenges").fetchone()[0] == 0
            server.stop.set()


async def test_verification_notifications_after_kyc_submit_and_accept(data_dir):
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["verification"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            async with partner_client(data_dir, server.rest_port) as demo:
                reply = await demo.post("/lifecycle/v1/wallet", json=USER)
                assert reply.status_code == 201, reply.text
                customer_id = reply.json()["customerId"]
                reply = await demo.post(f"/secure/customers/{customer_id}/register", data=FORM, files=IMAGES)
                assert reply.status_code == 201, reply.text
                form_id = reply.json()["formId"]
            async with admin_client(data_dir, server.rest_port) as admin:
                reply = await admin.post(f"/admin/kyc-forms/{form_id}/accept")
                assert reply.status_code == 200, reply.text
            calls = await received(sim.url, "verification", 2)
            assert [call["kind"] for call in calls] == ["verification-in-progress", "verification-accepted"]
            for call, status in zip(calls, ("IN_PROGRESS", "ACCEPTED")):
                assert call["body"] == {"verificationId": str(form_id), "userId": customer_id,
                                        "email": USER["email"], "firstName": "Leon", "lastName": "Bakiewicz",
                                        "status": status, "reason": None}
                assert_signed(data_dir, call)
            server.stop.set()


async def test_external_partner_gets_force_debit_for_an_advice_and_reversal_for_a_reversal(data_dir, cards):
    async with running_partner(PartnerSimSettings()) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, balance_mode="external", notify=["transaction"])
        card = cards[2]
        user, balance = str(card["customerId"]), str(card["balanceId"])
        async with httpx.AsyncClient(base_url=sim.url) as control:
            reply = await control.put(f"/_sim/balances/{user}/{balance}", json={"amount": 50_000, "currency": "EUR"})
            assert reply.status_code in (200, 204), reply.text
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            advice = auth(card, mti="0120", amount=1_500)
            (answer,) = await authorize(server.iso_port, [advice])
            assert answer["39"] == "00"
            (force,) = await received(sim.url, "force-debit", 1)
            assert force["body"]["amount"] == 1_500 and force["body"]["balanceId"] == balance
            reversal = reversal_of(advice, mti="0420")
            (answer,) = await authorize(server.iso_port, [reversal])
            assert answer["39"] == "00"
            (undo,) = await received(sim.url, "reversal", 1)
            assert undo["body"]["referenceTransactionId"] == force["body"]["transactionId"] == transaction_id(
                "|".join(_duplicate_key(advice)))
            deadline = time.monotonic() + 10
            async with httpx.AsyncClient(base_url=sim.url) as control:
                while time.monotonic() < deadline:
                    balances = (await control.get("/_sim/balances", params={"user": user})).json()
                    amounts = [item["amount"] for item in balances["balances"] if item["balanceId"] == balance]
                    if amounts == [50_000]:
                        break
                    await trio.sleep(0.05)
            assert amounts == [50_000], "force-debit then its reversal: back where it was"
            kinds = [call["body"]["transaction"]["status"] for call in await received(sim.url, "transaction", 2)]
            assert kinds == ["AUTHORIZED", "REVERSED"]
            server.stop.set()


def _duplicate_key(doc: dict) -> tuple[str, ...]:
    mti_class = doc["t"][:2] + doc["t"][2] + "0"
    return (mti_class, doc["32"].rjust(11, "0"), doc["11"], doc["7"], doc["37"])


async def test_stand_in_decisions_are_reconciled_at_the_partner_exactly_once(data_dir, cards):
    from simulators.partner import Latency

    card = cards[0]
    async with running_partner(PartnerSimSettings(latency=Latency.fixed(400))) as sim:
        configure_partner(data_dir, "demo", api_url=sim.url, balance_mode="external", stand_in="approve",
                          stand_in_max_amount=5_000, stand_in_daily_max=8_000)
        sim.state.set_amount(str(card["customerId"]), str(card["balanceId"]), 50_000, "EUR")
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, iso__budget_ms=100, **FAST)
            approved, declined = auth(card, amount=3_000), auth(card, amount=6_000)
            answers = await authorize(server.iso_port, [approved, declined])
            assert [answer["39"] for answer in answers] == ["00", "91"]  # both by stand-in
            async with httpx.AsyncClient(base_url=sim.url) as control:
                await control.post("/_sim/mode", json={"latencyMs": 0})
            reversals = await received(sim.url, "reversal", 2)
            (force,) = await received(sim.url, "force-debit", 1)
            debit_ids = {transaction_id("|".join(_duplicate_key(doc))) for doc in (approved, declined)}
            assert {call["body"]["referenceTransactionId"] for call in reversals} == debit_ids
            assert force["body"]["amount"] == 3_000
            # The approval's reversal goes before its force-debit (one balance: in order).
            first_reversal = min(call["seq"] for call in reversals
                                 if call["body"]["amount"] == 3_000)
            assert first_reversal < force["seq"]
            deadline = time.monotonic() + 10
            while sim.state.amount_of(str(card["balanceId"])) != 47_000 and time.monotonic() < deadline:
                await trio.sleep(0.05)
            assert sim.state.amount_of(str(card["balanceId"])) == 47_000  # charged once, whatever came late
            server.stop.set()


async def test_https_partner_sees_authsrv_client_certificate(data_dir, cards):
    pki_dir = data_dir / "pki"
    settings = PartnerSimSettings(tls_cert=pki_dir / "server.crt", tls_key=pki_dir / "server.key",
                                  client_ca=pki_dir / "ca.crt")
    async with running_partner(settings) as sim:
        assert sim.url.startswith("https://")
        configure_partner(data_dir, "demo", api_url=sim.url, notify=["transaction"])
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, **FAST)
            card = cards[0]
            await authorize(server.iso_port, [auth(card, amount=321, cvc2=card["cvc2"])])
            calls = await _received_tls(sim.url, pki_dir)
            assert len(calls) == 1 and calls[0]["clientCertName"] == "CN=authsrv", calls
            assert (pki_dir / "authsrv-client.crt").exists()
            server.stop.set()


async def _received_tls(url: str, pki_dir: Path) -> list[dict]:
    deadline = time.monotonic() + 15
    async with httpx.AsyncClient(base_url=url, verify=client_ssl_context(pki_dir, "partner")) as client:
        while True:
            found = (await client.get("/_sim/received", params={"kind": "transaction"})).json()["received"]
            if found or time.monotonic() > deadline:
                return found
            await trio.sleep(0.05)
