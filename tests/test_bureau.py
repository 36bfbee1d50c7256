"""The personalisation bureau simulator over real HTTP on loopback, in-process and as `python -m`."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import httpx
import pytest
import trio

from simulators.bureau import BureauState, serve_bureau

pytestmark = pytest.mark.timeout(30)
ORDER = {"reference": "card-7", "cardType": "physical", "nameOnCard": "ADA LOVELACE", "maskedPan": "535522******1234",
         "deliveryAddress": {"street": "Main 1", "city": "Lublin", "postCode": "20-001", "country": "PL"}}


@pytest.fixture
async def bureau(request):
    delay_s, orders_max = getattr(request, "param", (0.2, 100))
    state = BureauState(delay_s=delay_s, orders_max=orders_max)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_bureau, port=0, delay_s=delay_s, state=state, shutdown=stop))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            yield client, state
        stop.set()


async def test_order_is_produced_after_the_delay_and_acknowledged(bureau) -> None:
    client, state = bureau
    reply = await client.post("/orders", json=ORDER)
    assert reply.status_code == 201, reply.text
    order = reply.json()
    assert order["state"] == "RECEIVED" and order["trackingNumber"] == "" and order["reference"] == "card-7"
    again = await client.post("/orders", json=ORDER)  # idempotent on the caller's reference
    assert again.status_code == 200 and again.json()["id"] == order["id"]
    assert (await client.get("/orders", params={"state": "PRODUCED"})).json() == {"orders": []}
    ack = await client.post(f"/orders/{order['id']}/ack")
    assert ack.status_code == 409 and ack.json()["title"] == "ORDER_NOT_PRODUCED"

    await trio.sleep(0.25)
    (produced,) = (await client.get("/orders", params={"state": "PRODUCED"})).json()["orders"]
    assert produced["id"] == order["id"] and produced["trackingNumber"].startswith("TRK")
    assert produced["producedAt"] >= produced["receivedAt"]
    ack = await client.post(f"/orders/{order['id']}/ack")
    assert ack.status_code == 200 and ack.json()["state"] == "ACKNOWLEDGED"
    assert (await client.post(f"/orders/{order['id']}/ack")).status_code == 200  # idempotent
    assert (await client.get("/orders", params={"state": "PRODUCED"})).json() == {"orders": []}
    assert (await client.get(f"/orders/{order['id']}")).json()["trackingNumber"] == produced["trackingNumber"]
    assert state.orders[order["id"]].delivery_address["city"] == "Lublin"


@pytest.mark.parametrize("body", [
    {**ORDER, "maskedPan": "5355221234561234"},  # a full PAN is refused: the bureau gets masked ones only
    {**ORDER, "cardType": "virtual"},
    {**ORDER, "reference": ""},
    {**ORDER, "reference": "a/b"},
    {**ORDER, "extra": 1},
    {"cardType": "physical"},
])  # fmt: skip
async def test_bad_orders_are_refused(bureau, body) -> None:
    client, state = bureau
    reply = await client.post("/orders", json=body)
    assert reply.status_code == 400 and reply.json()["title"] == "INVALID_PAYLOAD"
    assert "5355221234561234" not in reply.text
    assert not state.orders


async def test_unknown_orders_and_bad_queries(bureau) -> None:
    client, _ = bureau
    assert (await client.get("/orders/BO123")).status_code == 404
    assert (await client.post("/orders/BO123/ack")).status_code == 404
    assert (await client.get("/orders", params={"state": "LOST"})).status_code == 400
    assert (await client.get("/orders", params={"limit": "0"})).status_code == 400
    assert (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize("bureau", [(0.0, 2)], indirect=True)
async def test_bounded_forgets_acknowledged_orders_first(bureau) -> None:
    client, state = bureau
    first = (await client.post("/orders", json={**ORDER, "reference": "r1"})).json()
    assert (await client.post("/orders", json={**ORDER, "reference": "r2"})).status_code == 201
    full = await client.post("/orders", json={**ORDER, "reference": "r3"})
    assert full.status_code == 503 and full.json()["title"] == "BUREAU_FULL"
    assert (await client.post(f"/orders/{first['id']}/ack")).status_code == 200
    assert (await client.post("/orders", json={**ORDER, "reference": "r3"})).status_code == 201
    assert len(state.orders) == 2 and first["id"] not in state.orders
    listed = (await client.get("/orders", params={"limit": "1"})).json()["orders"]
    assert len(listed) == 1


def test_command_line_serves_until_terminated() -> None:
    process = subprocess.Popen([sys.executable, "-m", "simulators.bureau", "--port", "0", "--delay", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("bureau listening on http://127.0.0.1:"), line
        url = line.split()[3]
        reply = httpx.post(f"{url}/orders", json=ORDER, timeout=5)
        assert reply.status_code == 201
        produced = httpx.get(f"{url}/orders", params={"state": "PRODUCED"}, timeout=5).json()["orders"]
        assert [order["reference"] for order in produced] == ["card-7"]
    finally:
        process.terminate()
        assert process.wait(10) == 0
    assert subprocess.run([sys.executable, "-m", "simulators.bureau", "--delay", "-1"],
                          capture_output=True).returncode == 2
