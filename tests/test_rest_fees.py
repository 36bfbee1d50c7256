"""Creation fees charged through the management API: the card-creation fee lands in the partner's
fee income in the same currency; an account-creation fee a new (empty) balance cannot pay is owed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.conftest import start_in_process
from tests.restclient import create_customer, decrypt, https, jwe_headers
from ledger.types import AccountKind

pytestmark = pytest.mark.timeout(60)
CONFIG_ID = "0019167984"


def fee_income(handle) -> int:
    totals = handle.ledger.ledger.totals()
    found = totals.get(("EUR", AccountKind.fee_income))
    return 0 if found is None else found.credits_posted - found.debits_posted


async def test_card_creation_fee_reaches_fee_income(data_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        handle = await start_in_process(nursery, data_dir, fees__card_creation=250, fees__account_creation=100)
        before = fee_income(handle)
        async with https(data_dir, handle.rest_port, "partner") as partner:
            customer = await create_customer(partner)
            root = f"/secure/customers/{customer.customer_id}"
            balance = (await partner.post(f"{root}/balances", json={"currency": "EUR"})).json()["id"]
            assert fee_income(handle) == before  # an empty balance owes its account fee
            reply = await partner.post(f"{root}/balances/{balance}/reload", json={"amount": 1000})
            assert reply.status_code == 200, reply.text
            reply = await partner.post(f"{root}/cards/virtual", headers=jwe_headers(),
                                       json={"balanceId": balance, "configId": CONFIG_ID})
            assert reply.status_code == 201, reply.text
            decrypt(reply)
            assert fee_income(handle) == before + 250
            view = (await partner.get(f"{root}/balances/{balance}")).json()
            assert view["amount"] == 1000 - 250
        handle.ledger.ledger.check_invariants()
        handle.stop.set()
