"""The authorization switch through its wire contract (docs/contract.md, wire profile), on real loopback
sockets: every response-code row, every message class, duplicates, pipelining and bad input."""

from __future__ import annotations

import struct

import pytest
import trio

from authsrv import cardsec
from tests.conftest import SEED_AMOUNT, start_in_process
from tests.isoclient import IsoClient, auth, reversal_of


def available(server, card: dict) -> int:
    state = server.index.card_by_id(card["cardId"])
    return server.ledger.ledger.balance(state.balance_account_id).available


def posted(server, card: dict) -> int:
    state = server.index.card_by_id(card["cardId"])
    return server.ledger.ledger.balance(state.balance_account_id).posted


def wrong_pin_for(card: dict, data_dir) -> str:
    """A PIN other than the card's that its 4-digit PVV refuses (about 1 in 10,000 would verify)."""
    keys = cardsec.CardKeys.load(data_dir / "keys")
    stored = cardsec.pvv(card["pan"], card["pin"], keys.pvk)
    for step in range(1, 10_000):
        candidate = f"{(int(card['pin']) + step) % 10000:04d}"
        if not cardsec.verify_pin(card["pan"], candidate, stored, keys.pvk):
            return candidate
    raise AssertionError("no refused PIN")


def field54_amount(value: str) -> int:
    assert value[:2] == "00" and value[2:4] == "02" and value[4:7] == "978", value
    sign = -1 if value[7] == "D" else 1
    return sign * int(value[8:20])


async def test_approval_holds_funds_and_echoes_fields(server, cards):
    card = cards[0]
    client = await IsoClient.connect(server.iso_port)
    request = auth(card, amount=1234, cvc2=card["cvc2"])
    response = await client.call(request)
    assert response["t"] == "0110"
    assert response["39"] == "00"
    assert len(response["38"]) == 6
    for field in ("2", "3", "4", "7", "11", "32", "37", "41", "42", "49"):
        assert response[field] == request[field], field
    assert field54_amount(response["54"]) == SEED_AMOUNT - 1234
    assert available(server, card) == SEED_AMOUNT - 1234
    assert posted(server, card) == SEED_AMOUNT  # a hold, not a posting
    assert "44" not in response


@pytest.mark.parametrize(
    "case, change, code",
    [
        ("unknown PAN", {"pan": "5355220000000000000"}, "14"),
        ("field 14 not the card's expiry", {"expiry": "2901"}, "54"),
        ("wrong CVC2", {"cvc2": "wrong"}, "N7"),
        ("zero amount", {"amount": 0}, "13"),
        ("currency without conversion", {"currency": "840"}, "57"),
        ("unsupported processing code", {"processing": "400000"}, "12"),
        ("over the balance", {"amount": SEED_AMOUNT + 1}, "51"),
    ],
)
async def test_decline_codes(server, cards, case, change, code):
    card = cards[1]
    change = dict(change)
    if change.get("cvc2") == "wrong":
        change["cvc2"] = f"{(int(card['cvc2']) + 1) % 1000:03d}"
    if "pan" in change:
        change["pan"] = cardsec.generate_pan("535522", 999_999_999)
    client = await IsoClient.connect(server.iso_port)
    response = await client.call(auth(card, **change))
    assert response["39"] == code, case
    assert "38" not in response
    assert available(server, card) == SEED_AMOUNT


async def test_expired_card(server, cards):
    card = cards[2]
    state = server.index.card_by_id(card["cardId"])
    state.expiry_yymm = "2001"  # a card whose expiry has passed
    client = await IsoClient.connect(server.iso_port)
    response = await client.call(auth(card, expiry="2001"))
    assert response["39"] == "54"


async def test_format_error_on_missing_mandatory_field(server, cards):
    client = await IsoClient.connect(server.iso_port)
    request = auth(cards[0])
    del request["41"]
    response = await client.call(request)
    assert response["39"] == "30"


async def test_unsupported_mti(server, cards):
    client = await IsoClient.connect(server.iso_port)
    request = auth(cards[0], mti="0300")
    response = await client.call(request)
    assert response["39"] == "12"


@pytest.mark.parametrize(
    "reason, code, action",
    [(1, "41", "2008"), (2, "43", "2009"), (3, "05", "1000"), (4, "05", "1016"), (5, "78", "1018"),
     (6, "75", "1006"), (7, "59", "1002"), (8, "14", "1011")],
)
async def test_lock_reasons(server, cards, reason, code, action):
    card = cards[3]
    server.store.lock_card(card["cardId"], reason)
    client = await IsoClient.connect(server.iso_port)
    response = await client.call(auth(card))
    assert response["39"] == code
    assert response["44"] == action
    assert available(server, card) == SEED_AMOUNT


async def test_wrong_pin_then_lock_on_third(server, cards, zpk, data_dir):
    card = cards[4]
    wrong = wrong_pin_for(card, data_dir)
    client = await IsoClient.connect(server.iso_port)

    def atm(pin: str) -> dict:
        block = cardsec.encrypt_pin_block(pin, card["pan"], zpk)
        return auth(card, mti="0200", processing="010000", amount=2000, pin_block=block)

    assert (await client.call(atm(wrong)))["39"] == "55"
    assert (await client.call(atm(wrong)))["39"] == "55"
    third = await client.call(atm(wrong))
    assert third["39"] == "75" and third["44"] == "1006"
    locked = await client.call(atm(card["pin"]))  # the right PIN no longer helps: the card is locked
    assert locked["39"] == "75"
    assert available(server, card) == SEED_AMOUNT


async def test_right_pin_resets_the_counter(server, cards, zpk, data_dir):
    card = cards[5]
    wrong = wrong_pin_for(card, data_dir)
    client = await IsoClient.connect(server.iso_port)

    def atm(pin: str) -> dict:
        return auth(card, mti="0200", processing="010000", amount=500,
                    pin_block=cardsec.encrypt_pin_block(pin, card["pan"], zpk))

    for _ in range(2):
        assert (await client.call(atm(wrong)))["39"] == "55"
    response = await client.call(atm(card["pin"]))
    assert response["39"] == "00" and response["t"] == "0210"
    assert posted(server, card) == SEED_AMOUNT - 500  # 0200 posts at once
    for _ in range(2):
        assert (await client.call(atm(wrong)))["39"] == "55"  # counter was reset: still not locked


async def test_removed_and_inactive_cards(server, cards):
    from authsrv.store.index import CardStatus

    removed, inactive = cards[6], cards[7]
    server.index.card_by_id(removed["cardId"]).status = CardStatus.removed
    server.index.card_by_id(inactive["cardId"]).status = CardStatus.inactive
    client = await IsoClient.connect(server.iso_port)
    assert (await client.call(auth(removed)))["39"] == "14"
    assert (await client.call(auth(inactive)))["39"] == "78"


async def test_insufficient_collateral(server, cards):
    from ledger.types import Batch, TransferSpec

    card = cards[8]
    state = server.index.card_by_id(card["cardId"])
    partner = server.index.partner(state.partner)
    collateral = partner.collateral_account_ids["EUR"]
    left = server.ledger.ledger.balance(collateral).available
    funding = server.index.funding_account("EUR")
    result, seq = server.ledger.submit(Batch(timestamp_ns=0, transfers=(
        TransferSpec(2**120 + 7, collateral, funding, left - 500),)))
    await server.ledger.wait_durable(seq)
    client = await IsoClient.connect(server.iso_port)
    response = await client.call(auth(card, amount=600))
    assert response["39"] == "51"
    assert server.journal.get(_key(response)).cause == "collateral"
    assert available(server, card) == SEED_AMOUNT  # linked: the user hold was not placed either
    assert (await client.call(auth(card, amount=400)))["39"] == "00"


def _key(response: dict) -> str:
    return f"{response['t'][:2]}00|{response['32'].zfill(11)}|{response['11']}|{response['7']}|{response['37']}"


async def test_billing_amount_is_charged(server, cards):
    card = cards[9]
    client = await IsoClient.connect(server.iso_port)
    response = await client.call(auth(card, amount=1100, currency="840", billing=(1000, "978")))
    assert response["39"] == "00"
    assert response["6"] == "000000001000" and response["51"] == "978"
    assert available(server, card) == SEED_AMOUNT - 1000


async def test_refund_and_payment_credit_at_once(server, cards):
    card = cards[10]
    client = await IsoClient.connect(server.iso_port)
    refund = await client.call(auth(card, processing="200000", amount=700))
    assert refund["39"] == "00"
    assert available(server, card) == SEED_AMOUNT + 700 and posted(server, card) == SEED_AMOUNT + 700
    payment = await client.call(auth(card, mti="0200", processing="280000", amount=300))
    assert payment["39"] == "00"
    assert available(server, card) == SEED_AMOUNT + 1000


async def test_balance_inquiry_moves_nothing(server, cards):
    card = cards[11]
    client = await IsoClient.connect(server.iso_port)
    response = await client.call(auth(card, processing="300000", amount=0))
    assert response["39"] == "00"
    assert field54_amount(response["54"]) == SEED_AMOUNT
    assert available(server, card) == SEED_AMOUNT


async def test_advices_cannot_be_declined(server, cards):
    card = cards[12]
    client = await IsoClient.connect(server.iso_port)
    hold = await client.call(auth(card, mti="0120", amount=SEED_AMOUNT + 5000))
    assert hold["t"] == "0130" and hold["39"] == "00"
    assert available(server, card) == -5000  # forced past zero
    post = await client.call(auth(card, mti="0220", amount=100))
    assert post["t"] == "0230" and post["39"] == "00"
    assert posted(server, card) == SEED_AMOUNT - 100
    unknown = await client.call(auth(card, mti="0120", pan=cardsec.generate_pan("535522", 999_999_998)))
    assert unknown["39"] == "00"


async def test_full_and_partial_reversals(server, cards):
    card = cards[13]
    client = await IsoClient.connect(server.iso_port)
    original = auth(card, amount=5000)
    assert (await client.call(original))["39"] == "00"
    assert available(server, card) == SEED_AMOUNT - 5000
    partial = await client.call(reversal_of(original, remaining=3000))
    assert partial["t"] == "0410" and partial["39"] == "00"
    assert available(server, card) == SEED_AMOUNT - 3000
    second = await client.call(reversal_of(original, remaining=1000))
    assert second["39"] == "00"
    assert available(server, card) == SEED_AMOUNT - 1000
    full = await client.call(reversal_of(original))
    assert full["39"] == "00"
    assert available(server, card) == SEED_AMOUNT
    assert posted(server, card) == SEED_AMOUNT


async def test_reversal_of_a_posted_financial(server, cards):
    card = cards[14]
    client = await IsoClient.connect(server.iso_port)
    original = auth(card, mti="0200", amount=2500)
    assert (await client.call(original))["39"] == "00"
    assert posted(server, card) == SEED_AMOUNT - 2500
    assert (await client.call(reversal_of(original)))["39"] == "00"
    assert posted(server, card) == SEED_AMOUNT


async def test_reversal_of_unknown_original(server, cards):
    client = await IsoClient.connect(server.iso_port)
    phantom = auth(cards[0], amount=100)
    request = reversal_of(phantom)
    assert (await client.call(request))["39"] == "25"
    advice = reversal_of(phantom, mti="0420")
    response = await client.call(advice)
    assert response["t"] == "0430" and response["39"] == "00"


async def test_network_management(server):
    client = await IsoClient.connect(server.iso_port)
    for code in ("001", "301", "002"):
        request = {"t": "0800", "7": "1121221500", "11": f"{int(code):06d}", "70": code}
        await client.send(request)
        response = await client.receive()
        assert response["t"] == "0810" and response["39"] == "00" and response["70"] == code


async def test_duplicate_gets_the_same_answer_and_no_second_effect(server, cards):
    card = cards[15]
    client = await IsoClient.connect(server.iso_port)
    request = auth(card, amount=4000)
    first = await client.call(request)
    second = await client.call(request)
    assert first["39"] == second["39"] == "00"
    assert first["38"] == second["38"] and first["54"] == second["54"]
    assert available(server, card) == SEED_AMOUNT - 4000
    declined = auth(card, amount=SEED_AMOUNT * 2)
    assert (await client.call(declined))["39"] == "51"
    assert (await client.call(declined))["39"] == "51"


async def test_duplicates_survive_a_restart(data_dir, cards):
    card = cards[16]
    request = auth(card, amount=3000)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        first = await client.call(request)
        server.stop.set()
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        again = await client.call(request)
        assert again["38"] == first["38"] and again["39"] == "00"
        assert available(server, card) == SEED_AMOUNT - 3000
        server.stop.set()


async def test_a_pass_that_yields_between_connections_answers_every_frame_once(data_dir, cards, monkeypatch):
    """A reader's pass over a backlog yields between two connections (PASS_SLICE_S; 0 here: after
    every one). Connections that end, or frames that arrive, meanwhile change nothing: each frame
    is decided and answered once."""
    from authsrv.iso import server as iso_server

    monkeypatch.setattr(iso_server, "PASS_SLICE_S", 0.0)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        clients = [await IsoClient.connect(server.iso_port) for _ in range(6)]
        quitter = await IsoClient.connect(server.iso_port)
        requests = {index: [auth(cards[index * 2 + j % 2], amount=10) for j in range(40)] for index in range(6)}
        for index, client in enumerate(clients):  # a backlog on every connection: one pass takes them all
            for request in requests[index]:
                await client.send(request)
        await quitter.send(auth(cards[15], amount=10))
        await quitter.aclose()  # gone while the pass may be yielding
        for index, client in enumerate(clients):
            responses = [await client.receive() for _ in requests[index]]
            assert sorted((r["11"], r["37"]) for r in responses) == sorted((r["11"], r["37"]) for r in requests[index])
            assert all(r["39"] == "00" for r in responses)
        again = await IsoClient.connect(server.iso_port)  # and the reader reads on
        assert (await again.call(auth(cards[14], amount=10)))["39"] == "00"
        server.stop.set()


async def test_pipelining_on_one_connection(server, cards):
    client = await IsoClient.connect(server.iso_port)
    requests = [auth(cards[i % 4 + 16], amount=10) for i in range(300)]
    async with trio.open_nursery() as nursery:
        async def send_all() -> None:
            for request in requests:
                await client.send(request)
        nursery.start_soon(send_all)
        responses = [await client.receive() for _ in requests]
    assert {(r["11"], r["37"]) for r in responses} == {(r["11"], r["37"]) for r in requests}
    assert all(r["39"] == "00" for r in responses)


async def test_garbage_keeps_a_framed_connection_and_drops_a_broken_one(server, cards):
    client = await IsoClient.connect(server.iso_port)
    junk = b"\x00\x01garbage that is not ISO 8583"
    await client.send_raw(struct.pack(">H", len(junk)) + junk)
    response = await client.call(auth(cards[0], amount=10))  # framing intact: the connection lives
    assert response["39"] == "00"
    broken = await IsoClient.connect(server.iso_port)
    await broken.send_raw(b"\xff\xff" + b"x" * 100)  # a length beyond the frame bound: framing lost
    with pytest.raises((EOFError, trio.BrokenResourceError)):
        await broken.receive(timeout=5)
    fresh = await IsoClient.connect(server.iso_port)  # the server keeps serving
    assert (await fresh.call(auth(cards[1], amount=10)))["39"] == "00"
    assert server.switch._metrics.decode_errors._value.get() >= 1


async def test_metrics_endpoint(server, cards):
    import urllib.request

    client = await IsoClient.connect(server.iso_port)
    await client.call(auth(cards[0], amount=10))

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
            return reply.read().decode()

    text = await trio.to_thread.run_sync(scrape)
    assert 'authsrv_iso_requests_total{code="00",mti="0100"} 1.0' in text
    assert "authsrv_wal_fsync_seconds_bucket" in text
    assert "authsrv_gc_pause_seconds_count" in text  # observed every GC_FREEZE_INTERVAL_S, exposed from the start
    assert cards[0]["pan"] not in text


async def test_partial_approval_only_when_the_request_allows_it(server, cards):
    card = cards[17]
    client = await IsoClient.connect(server.iso_port)
    assert (await client.call(auth(card, amount=SEED_AMOUNT - 300)))["39"] == "00"
    refused = await client.call(auth(card, amount=1000))  # 300 left, no indicator: 51
    assert refused["39"] == "51"
    partial = await client.call(auth(card, amount=1000, **{"48": "610510000"}))
    assert partial["39"] == "10"
    assert partial["4"] == f"{300:012d}"
    assert field54_amount(partial["54"]) == 0
    assert available(server, card) == 0


async def test_pin_lock_survives_a_restart(data_dir, cards, zpk):
    card = cards[18]
    wrong = wrong_pin_for(card, data_dir)
    atm = lambda pin: auth(card, mti="0200", processing="010000", amount=100,  # noqa: E731
                           pin_block=cardsec.encrypt_pin_block(pin, card["pan"], zpk))
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        codes = [(await client.call(atm(wrong)))["39"] for _ in range(3)]
        assert codes == ["55", "55", "75"]
        server.stop.set()
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        response = await client.call(atm(card["pin"]))
        assert response["39"] == "75" and response["44"] == "1006"
        server.stop.set()


async def test_snapshots_while_serving_and_recovery_from_them(data_dir, cards):
    requests = [auth(cards[i % 8], amount=7) for i in range(120)]
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, ledger__snapshot_interval_records=20)
        client = await IsoClient.connect(server.iso_port)
        first = [await client.call(request) for request in requests[:60]]
        await trio.sleep(1.5)  # the ticker snapshots every second once 20 records have passed
        first += [await client.call(request) for request in requests[60:]]
        assert server.ledger.snapshot_seq > 0
        server.stop.set()
    assert len(list((data_dir / "ledger").glob("snapshot-*"))) >= 1
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        for request, answer in zip(requests, first):
            again = await client.call(request)
            assert (again["39"], again.get("38")) == (answer["39"], answer.get("38"))
        same_balance = {card["pan"] for card in cards if card["balanceId"] == cards[0]["balanceId"]}
        spent = sum(7 for request in requests if request["2"] in same_balance)
        assert available(server, cards[0]) == SEED_AMOUNT - spent
        server.stop.set()


async def test_an_unexpected_error_answers_96_and_keeps_serving(server, cards, monkeypatch):
    from ledger.wal import WalFullError

    client = await IsoClient.connect(server.iso_port)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug (fault injection)")

    def full(*args, **kwargs):
        raise WalFullError("log buffer full (fault injection)")

    with monkeypatch.context() as patch:
        patch.setattr(server.ledger, "submit", broken)
        response = await client.call(auth(cards[0], amount=10))
        assert response["39"] == "96"
        patch.setattr(server.ledger, "submit", full)  # refused before anything was applied: stand-in
        response = await client.call(auth(cards[0], amount=10))
        assert response["39"] == "91"
    assert (await client.call(auth(cards[0], amount=10)))["39"] == "00"
    assert available(server, cards[0]) == SEED_AMOUNT - 10


async def test_a_peer_that_vanishes_mid_answer_does_not_hurt_the_server(server, cards):
    import socket as stdsocket

    for _ in range(5):
        rude = await IsoClient.connect(server.iso_port)
        for _ in range(50):
            await rude.send(auth(cards[0], amount=1))
        # RST instead of FIN: the server's next send_all fails
        rude.stream.socket.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
        await rude.aclose()
    await trio.sleep(0.5)
    polite = await IsoClient.connect(server.iso_port)
    assert (await polite.call(auth(cards[1], amount=1)))["39"] == "00"
    await trio.sleep(0.2)  # the writer updates the gauge just after send_all
    assert server.switch._metrics.in_flight._value.get() == 0


async def test_a_step_past_the_budget_gets_the_stand_in_decision(data_dir, cards, monkeypatch):
    import time as stdtime

    from authsrv.hotpath import steps

    real_cvc2 = steps.cardsec.cvc2

    def slow_cvc2(*args):
        stdtime.sleep(0.03)  # a step that overruns a 10 ms budget
        return real_cvc2(*args)

    monkeypatch.setattr(steps.cardsec, "cvc2", slow_cvc2)
    card = cards[19]
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, iso__budget_ms=10)
        client = await IsoClient.connect(server.iso_port)
        response = await client.call(auth(card, amount=100, cvc2=card["cvc2"]))
        assert response["39"] == "91"
        record = server.journal.get(_key(response))
        assert record.stand_in and "budget exceeded before pin" in record.cause
        assert available(server, card) == SEED_AMOUNT
        assert server.switch._metrics.stand_in._value.get() == 1
        server.stop.set()


async def test_idle_connections_are_closed(data_dir, cards):
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, iso__idle_timeout_s=0.5)
        client = await IsoClient.connect(server.iso_port)
        assert (await client.call(auth(cards[0], amount=1)))["39"] == "00"  # activity resets the clock
        with pytest.raises(EOFError):
            await client.receive(timeout=5)  # then silence: the server closes the connection
        fresh = await IsoClient.connect(server.iso_port)
        assert (await fresh.call(auth(cards[0], amount=1)))["39"] == "00"
        server.stop.set()


async def test_shutdown_answers_everything_it_decided(data_dir, cards):
    card = cards[19]
    requests = [auth(card, amount=3) for _ in range(300)]
    answers = []
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        for request in requests[:150]:
            await client.send(request)
        server.stop.set()  # stop while requests are in flight
        try:
            for request in requests[150:]:
                await client.send(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        try:
            while True:
                answers.append(await client.receive(timeout=10))
        except (EOFError, trio.BrokenResourceError, OSError):
            pass
    assert answers and all(answer["39"] == "00" for answer in answers)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        same_balance = sum(1 for c in cards if c["balanceId"] == card["balanceId"])
        assert same_balance >= 1
        # every decision the server made was answered: the balance moved by exactly the answers
        assert available(server, card) == SEED_AMOUNT - 3 * len(answers)
        server.stop.set()


async def test_a_commit_past_the_budget_releases_the_hold_and_answers_91(data_dir, cards, monkeypatch):
    card = cards[18]
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, iso__budget_ms=100)
        import time as stdtime

        from tests.diskfaults import before_each_sync

        # Fault injection: the sync takes longer than the budget.
        before_each_sync(monkeypatch, lambda fd: stdtime.sleep(0.3))
        client = await IsoClient.connect(server.iso_port)
        response = await client.call(auth(card, amount=500))
        assert response["39"] == "91" and "38" not in response
        record = server.journal.get(_key(response))
        assert record.stand_in and record.cause == "commit missed the budget"
        assert available(server, card) == SEED_AMOUNT  # the hold was voided
        assert server.ledger.ledger.pending_count() == 0
        monkeypatch.undo()
        again = await client.call(auth(card, amount=500, stan=response["11"], rrn=response["37"]))
        assert again["39"] == "91"  # a duplicate gets the stand-in answer, not a second hold
        server.stop.set()
