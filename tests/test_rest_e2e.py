"""End to end, as a partner integrates (issue 4): create a user, pass KYC, open and reload a
balance, issue a virtual card, then pay with it on the ISO 8583 port using the PAN and CVC2 that
arrived in the JWE response; lock (decline with the lock's code), unlock, pay again."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth
from tests.restclient import assert_problem, create_customer, decrypt, https, jwe_headers

pytestmark = pytest.mark.timeout(90)
CONFIG_ID = "0019167984"  # the demo program `authsrv init` writes (docs/contract.md, commands)


async def test_partner_quick_start_then_pay_lock_unlock(data_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir)
        async with https(data_dir, handle.rest_port, "partner") as partner:
            # 1. user, KYC not yet done: no balance
            customer = await create_customer(partner, kyc="PENDING")
            root = f"/secure/customers/{customer.customer_id}"
            refused = await partner.post(f"{root}/balances", json={"currency": "EUR"})
            assert refused.status_code == 403 and refused.json()["title"] == "KYC_REQUIRED", refused.text
            # 2. KYC passed (the partner's own KYC)
            reply = await partner.put(f"/lifecycle/v1/wallet/{customer.customer_id}", json={"kyc": "SUCCESS"})
            assert reply.status_code == 200 and reply.json()["kyc"] == "SUCCESS"
            # 3. balance: the program opens one on KYC success; the quick start creates one explicitly
            reply = await partner.post(f"{root}/balances", json={"currency": "EUR"})
            assert reply.status_code == 201, reply.text
            balance_id = reply.json()["id"]
            reply = await partner.post(f"{root}/balances/{balance_id}/reload", json={"amount": 50_00})
            assert reply.status_code == 200, reply.text
            # 4. virtual card; card data only inside the JWE
            plain = await partner.post(f"{root}/cards/virtual", json={"balanceId": balance_id, "configId": CONFIG_ID})
            assert_problem(plain, 400, "ENCRYPTION_REQUIRED")
            reply = await partner.post(f"{root}/cards/virtual", headers=jwe_headers(),
                                       json={"balanceId": balance_id, "configId": CONFIG_ID})
            assert reply.status_code in (200, 201), reply.text
            assert "cardNo" not in reply.text
            card_data = decrypt(reply)
            card_id, pan = card_data["id"], card_data["cardNo"]
            card = {"pan": pan, "expiry": card_data["expiry"]}

            iso = await IsoClient.connect(handle.iso_port)
            approved = await iso.call(auth(card, amount=12_34, cvc2=card_data["cvv"]))
            assert approved["39"] == "00", approved
            wrong_cvc2 = f"{(int(card_data['cvv']) + 1) % 1000:03d}"
            assert (await iso.call(auth(card, amount=100, cvc2=wrong_cvc2)))["39"] == "N7"

            reply = await partner.get(f"{root}/balances/{balance_id}")
            assert reply.status_code == 200
            balance = reply.json()
            assert balance["amount"] == 50_00 and balance["available"] == 50_00 - 12_34
            assert [c["id"] for c in balance["cards"]] == [card_id]
            assert pan not in reply.text and balance["cards"][0]["maskedPan"].endswith(pan[-4:])

            # 5. lock (pending query: 05, reversible), the very next message declines
            reply = await partner.post(f"{root}/cards/{card_id}/lock", json={"reason": 3})
            assert reply.status_code in (200, 204), reply.text
            locked = await iso.call(auth(card, amount=100))
            assert locked["39"] == "05" and locked["44"] == "1000", locked
            # 6. unlock, pay again
            reply = await partner.post(f"{root}/cards/{card_id}/unlock")
            assert reply.status_code in (200, 204), reply.text
            assert (await iso.call(auth(card, amount=100)))["39"] == "00"
            # an irreversible lock stays
            reply = await partner.post(f"{root}/cards/{card_id}/lock", json={"reason": 2})
            assert reply.status_code in (200, 204)
            assert (await iso.call(auth(card, amount=100)))["39"] == "43"
            refused = await partner.post(f"{root}/cards/{card_id}/unlock")
            assert refused.status_code == 409, refused.text
            assert (await iso.call(auth(card, amount=100)))["39"] == "43"
            await iso.aclose()
        handle.ledger.ledger.check_invariants()
        handle.stop.set()
