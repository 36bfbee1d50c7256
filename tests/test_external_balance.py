"""External balances in the hot path (issue 5; docs/contract.md, partner settings and wire profile):
the seeded partner `demo` is switched to `balance_mode = "external"` in authsrv.toml, pointed at the
partner simulator on loopback, and every answer of the documents' debit/credit API is driven through
real ISO 8583."""

from __future__ import annotations

import random
import socket
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from authsrv.config import PartnerConfig, render_partner_table
from authsrv.hotpath.context import External
from authsrv.hotpath.external import StandInWindow, idempotency_key, transaction_id
from simulators.partner import Latency, PartnerSimSettings, running_partner
from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth, reversal_of

PARTNER_AMOUNT = 50_000


def use_external(data_dir: Path, api_url: str, **settings) -> None:
    """What an operator does: the partner's table in authsrv.toml says external, with its api_url."""
    path = data_dir / "authsrv.toml"
    text = path.read_text()
    head, _, _ = text.partition("[partners.demo]")
    table = render_partner_table("demo", PartnerConfig(balance_mode="external", api_url=api_url, **settings))
    path.write_text(head + table)


def key_of(response: dict) -> str:
    return f"{response['t'][:2]}00|{response['32'].zfill(11)}|{response['11']}|{response['7']}|{response['37']}"


@asynccontextmanager
async def world(data_dir: Path, cards: list[dict], *, sim_settings: PartnerSimSettings | None = None,
                api_url: str | None = None, budget_ms: int = 250, link: bool = True, **partner):
    async with running_partner(sim_settings or PartnerSimSettings()) as sim:
        use_external(data_dir, api_url or sim.url, **partner)
        if link:
            for card in cards:
                sim.state.set_amount(str(card["customerId"]), str(card["balanceId"]), PARTNER_AMOUNT, "EUR")
        async with trio.open_nursery() as nursery:
            server = await start_in_process(nursery, data_dir, iso__budget_ms=budget_ms)
            client = await IsoClient.connect(server.iso_port)
            try:
                yield sim, server, client
            finally:
                server.stop.set()


def deposit_available(server) -> int:
    partner = server.index.partner("demo")
    return server.ledger.ledger.balance(partner.collateral_account_ids["EUR"]).available


def partner_amount(sim, card: dict) -> int:
    return sim.state.amount_of(str(card["balanceId"]))


async def test_approval_debits_the_partner_and_holds_the_deposit(data_dir, cards):
    card = cards[0]
    async with world(data_dir, cards[:1]) as (sim, server, client):
        deposit = deposit_available(server)
        request = auth(card, amount=1234, cvc2=card["cvc2"])
        response = await client.call(request)
        assert response["39"] == "00" and len(response["38"]) == 6
        assert partner_amount(sim, card) == PARTNER_AMOUNT - 1234
        assert deposit_available(server) == deposit - 1234  # only the deposit collateral is held here
        record = server.journal.get(key_of(response))
        assert record.external == External.approved and record.collateral_hold_id and not record.user_hold_id
        assert record.external_key == idempotency_key(record.key)
        (debit,) = sim.state.received_of("debit")
        assert debit.idempotency_key == record.external_key
        assert b'"transactionId":"%s"' % transaction_id(record.key).encode() in debit.body
        assert card["pan"].encode() not in debit.body
        # a reversal gives the collateral back here; the partner hears of it from the outbox
        reversed_ = await client.call(reversal_of(request))
        assert reversed_["39"] == "00"
        assert deposit_available(server) == deposit
        assert server.journal.get(key_of(reversed_)).external == External.deferred


async def test_partner_declines_map_to_codes_and_roll_the_collateral_back(data_dir, cards):
    async with world(data_dir, cards[:2]) as (sim, server, client):
        deposit = deposit_available(server)
        for amount, code in ((1051, "51"), (1061, "61"), (1059, "59"), (PARTNER_AMOUNT + 1, "51")):
            response = await client.call(auth(cards[0], amount=amount))
            assert response["39"] == code, amount
            assert "38" not in response
            record = server.journal.get(key_of(response))
            assert record.external == External.declined and not record.collateral_hold_id
            assert deposit_available(server) == deposit  # voided in the same decision
        assert partner_amount(sim, cards[0]) == PARTNER_AMOUNT
        unknown = cards[2]  # its balance was never linked at the partner: 404 BALANCE_NOT_FOUND
        assert (await client.call(auth(unknown, amount=100)))["39"] == "14"
        assert deposit_available(server) == deposit
        assert (await client.call(auth(cards[1], mti="0200", amount=700)))["39"] == "00"
        assert deposit_available(server) == deposit - 700  # 0200: the hold became a posting
        assert partner_amount(sim, cards[1]) == PARTNER_AMOUNT - 700


async def test_slow_partner_gets_the_stand_in_decline(data_dir, cards):
    settings = PartnerSimSettings(latency=Latency.fixed(400))
    async with world(data_dir, cards[:1], sim_settings=settings, budget_ms=150) as (sim, server, client):
        deposit = deposit_available(server)
        started = trio.current_time()
        response = await client.call(auth(cards[0], amount=500))
        assert trio.current_time() - started < 0.4  # cut short at the budget, not the partner's pace
        assert response["39"] == "91"
        record = server.journal.get(key_of(response))
        assert record.stand_in and record.external == External.timed_out and record.external_key
        assert deposit_available(server) == deposit


async def test_stand_in_approval_within_limits(data_dir, cards):
    settings = PartnerSimSettings(latency=Latency.fixed(400))
    async with world(data_dir, cards[:2], sim_settings=settings, budget_ms=100, stand_in="approve",
                     stand_in_max_amount=5_000, stand_in_daily_max=8_000) as (sim, server, client):
        deposit = deposit_available(server)
        codes = [(await client.call(auth(cards[0], amount=amount)))["39"] for amount in (3_000, 6_000, 4_000, 2_000)]
        assert codes == ["00", "91", "00", "91"]  # 6,000 is over the per-transaction limit; 9,000 over the day's
        assert deposit_available(server) == deposit - 7_000  # approvals keep their collateral hold
        assert (await client.call(auth(cards[1], amount=2_000)))["39"] == "00"  # the limit is per card
        approved = [record for record in server.journal.records() if record.stand_in and record.response_code == "00"]
        assert len(approved) == 3 and all(record.external == External.timed_out for record in approved)
        window = StandInWindow()
        assert window.rebuild(server.journal.records(), approved[0].timestamp_ns) == 3
        assert window.used(cards[0]["cardId"], approved[0].timestamp_ns) == 7_000


async def test_5xx_and_refused_connections_get_the_stand_in(data_dir, cards):
    async with world(data_dir, cards[:1], sim_settings=PartnerSimSettings(fail_5xx=1.0)) as (sim, server, client):
        response = await client.call(auth(cards[0], amount=300))
        assert response["39"] == "91"
        assert server.journal.get(key_of(response)).external == External.failed
        assert partner_amount(sim, cards[0]) == PARTNER_AMOUNT
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens on it once closed
    async with world(data_dir, cards[:1], api_url=f"http://127.0.0.1:{port}") as (sim, server, client):
        deposit = deposit_available(server)
        response = await client.call(auth(cards[0], amount=300))
        assert response["39"] == "91"
        assert server.journal.get(key_of(response)).external == External.failed
        assert deposit_available(server) == deposit


def _seed_drop_then_answer(rate: float) -> int:
    """A simulator seed whose first fault roll drops the connection and whose second does not."""
    for seed in range(10_000):
        rng = random.Random(seed)
        if rng.random() < rate <= rng.random():
            return seed
    raise AssertionError("no seed")


async def test_one_fast_retry_after_a_dropped_connection(data_dir, cards):
    settings = PartnerSimSettings(drop_rate=0.5, seed=_seed_drop_then_answer(0.5))
    async with world(data_dir, cards[:1], sim_settings=settings) as (sim, server, client):
        response = await client.call(auth(cards[0], amount=800))
        assert response["39"] == "00"
        stats = sim.state.stats
        from simulators.partner import Kind

        assert stats[Kind.debit].injected_drops == 1 and stats[Kind.debit].replays == 1  # the same key, once applied
        assert partner_amount(sim, cards[0]) == PARTNER_AMOUNT - 800


async def test_credits_inquiries_and_advices(data_dir, cards):
    from simulators.partner import Kind

    card = cards[0]
    async with world(data_dir, cards[:1]) as (sim, server, client):
        deposit = deposit_available(server)
        assert (await client.call(auth(card, processing="200000", amount=700)))["39"] == "00"
        assert (await client.call(auth(card, mti="0200", processing="280000", amount=300)))["39"] == "00"
        assert partner_amount(sim, card) == PARTNER_AMOUNT + 1_000
        assert (await client.call(auth(card, processing="200000", amount=1059)))["39"] == "59"
        inquiry = await client.call(auth(card, processing="300000", amount=0))
        assert inquiry["39"] == "00" and inquiry["54"].endswith(f"C{PARTNER_AMOUNT + 1_000:012d}")
        debits = sim.state.stats[Kind.debit].requests
        advice = await client.call(auth(card, mti="0120", amount=PARTNER_AMOUNT * 3))
        assert advice["39"] == "00" and advice["t"] == "0130"
        assert sim.state.stats[Kind.debit].requests == debits  # never called in the hot path
        record = server.journal.get("0120" + key_of(advice)[4:])
        assert record.external == External.deferred and record.collateral_hold_id
        assert deposit_available(server) == deposit - PARTNER_AMOUNT * 3


async def test_duplicates_answer_the_same_without_a_second_call(data_dir, cards):
    from simulators.partner import Kind

    settings = PartnerSimSettings(latency=Latency.fixed(30))
    async with world(data_dir, cards[:1], sim_settings=settings) as (sim, server, client):
        request = auth(cards[0], amount=900)
        await client.send(request)
        await client.send(request)  # while the original is still at the partner
        first, second = await client.receive(), await client.receive()
        again = await client.call(request)  # after it was decided
        assert first["39"] == second["39"] == again["39"] == "00"
        assert first["38"] == second["38"] == again["38"]
        assert sim.state.stats[Kind.debit].requests == 1
        assert partner_amount(sim, cards[0]) == PARTNER_AMOUNT - 900


async def test_many_in_flight_on_one_connection(data_dir, cards):
    # 20, not hundreds: the simulator shares this process (and its CPU) with the server here.
    settings = PartnerSimSettings(latency=Latency.fixed(5))
    async with world(data_dir, cards[:4], sim_settings=settings) as (sim, server, client):
        requests = [auth(cards[i % 4], amount=10) for i in range(20)]
        async with trio.open_nursery() as nursery:
            async def send_all() -> None:
                for request in requests:
                    await client.send(request)
            nursery.start_soon(send_all)
            responses = [await client.receive() for _ in requests]
        assert {(r["11"], r["37"]) for r in responses} == {(r["11"], r["37"]) for r in requests}
        causes = {server.journal.get(key_of(r)).cause for r in responses if r["39"] != "00"}
        assert all(r["39"] == "00" for r in responses), causes
        balances = {card["balanceId"]: card for card in cards[:4]}  # a user's two cards share one balance
        assert sum(PARTNER_AMOUNT - partner_amount(sim, card) for card in balances.values()) == 200


async def test_linking_a_new_balance(data_dir, cards):
    from authsrv.rest.balances import PartnerLinkFailed, create_checked
    from authsrv.hotpath.external import link_balance
    from authsrv.store.db import Store

    async with running_partner(PartnerSimSettings()) as sim:
        partner = PartnerConfig(balance_mode="external", api_url=sim.url)
        with Store.open(data_dir) as store:
            user = store.get_user(cards[0]["customerId"])
            before = len(store.balances_of_user(user.id))

            def link(row) -> str:
                return link_balance(partner, data_dir / "pki", row.user_id, row.id, row.currency).reason

            result, row, _ = await trio.to_thread.run_sync(create_checked, store, user, "EUR", link)
            assert row is not None and sim.state.amount_of(str(row.id)) == 0  # linked at the partner
            (linked,) = sim.state.received_of("link-balance")
            assert linked.path == f"/users/{user.id}/balances"
            sim.state.mode.down = True  # 503: the partner refuses, nothing is created here
            try:
                await trio.to_thread.run_sync(create_checked, store, user, "EUR", link)
            except PartnerLinkFailed as failure:
                assert "503" in str(failure)
            else:
                raise AssertionError("a failed link must not create the balance")
            assert len(store.balances_of_user(user.id)) == before + 1


async def test_kyc_success_opens_and_links_the_automatic_balance(data_dir, cards):
    """The demo program opens a EUR balance on KYC success; for an external partner it is linked at
    the partner (documents, "Process of linking balances"). A partner that cannot link it leaves
    the user verified and without that balance, rather than refusing the KYC update."""
    from tests.restclient import create_customer, https

    async with world(data_dir, [], link=False) as (sim, server, _):
        async with https(data_dir, server.rest_port, "partner") as partner:
            customer = await create_customer(partner, kyc="PENDING")
            reply = await partner.put(f"/lifecycle/v1/wallet/{customer.customer_id}", json={"kyc": "SUCCESS"})
            assert reply.status_code == 200, reply.text
            (balance,) = (await partner.get(f"/secure/customers/{customer.customer_id}/balances")).json()["balances"]
            (linked,) = sim.state.received_of("link")
            assert linked.path == f"/users/{customer.customer_id}/balances"
            assert str(balance["id"]).encode() in linked.body

            await sim_mode(sim, down=True)
            other = await create_customer(partner, kyc="PENDING")
            reply = await partner.put(f"/lifecycle/v1/wallet/{other.customer_id}", json={"kyc": "SUCCESS"})
            assert reply.status_code == 200 and reply.json()["kyc"] == "SUCCESS", reply.text
            listed = (await partner.get(f"/secure/customers/{other.customer_id}/balances")).json()["balances"]
            assert listed == []


async def sim_mode(sim, **mode) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=sim.url) as client:
        reply = await client.post("/_sim/mode", json=mode)
        assert reply.status_code == 200, reply.text
