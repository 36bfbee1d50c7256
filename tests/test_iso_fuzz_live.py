"""A live mutation fuzz of the ISO port (slow suite): 100,000 hostile frames to a real `authsrv serve`,
then the process is alive, its metric families are bounded, and it answers a valid request."""

from __future__ import annotations

import random
import time
import urllib.request

import pytest
import trio

from tests import isofuzz
from tests.conftest import SEED_AMOUNT, run_cli
from tests.isoclient import IsoClient, auth
from tests.test_metrics_cardinality import check_bounded, scrape, send_and_drain

FRAMES = 100_000
CONNECTIONS = 4
BATCH = 5_000  # frames per send_and_drain round on a connection
TIME_MAX_S = 900


async def _broken_framing(port: int, data: bytes) -> None:
    """A connection whose framing breaks: the server closes it (reads EOF within 10 s)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(10):
            while await stream.receive_some(65536):
                pass


@pytest.mark.slow
async def test_live_mutation_fuzz_of_the_iso_port(server_process, cards):
    server = server_process.start()
    rng = random.Random(8583)
    seeds = isofuzz.seed_payloads(cards[:4])  # the other cards are left alone
    started = time.monotonic()
    answered = 0

    async def connection(worker: int) -> None:
        nonlocal answered
        for round_number in range(FRAMES // CONNECTIONS // BATCH):  # bounded: 5 rounds of 5,000
            payloads = list(isofuzz.hostile_payloads(rng, seeds, BATCH))
            sentinel = f"9{worker}{round_number:04d}"
            got = await send_and_drain(server.iso_port, payloads, sentinel, timeout_s=TIME_MAX_S / 2)
            answered += got  # not `answered += await ...`: that reads `answered` before the await

    with trio.fail_after(TIME_MAX_S):
        async with trio.open_nursery() as nursery:
            for worker in range(CONNECTIONS):
                nursery.start_soon(connection, worker)
        for data in (b"\x00\x00", b"\xff\xff" + b"x" * 10, b"\x00\x10" + b"0100", b"\x20\x01" + b"0" * 40):
            if data.startswith(b"\x00\x10"):
                stream = await trio.open_tcp_stream("127.0.0.1", server.iso_port)
                await stream.send_all(data)  # EOF inside a frame
                await stream.aclose()
            else:
                await _broken_framing(server.iso_port, data)
    seconds = time.monotonic() - started

    assert server.proc.poll() is None, server.read_log()[-3000:]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/healthz", timeout=5) as reply:
        assert reply.status == 200
    exposition = await trio.to_thread.run_sync(scrape, server.metrics_port)
    counts = check_bounded(exposition)
    assert "authsrv_iso_internal_errors_total 0.0" in exposition  # no frame reached an unexpected error
    print(f"\n{FRAMES} frames in {seconds:.1f} s, {answered} answered; series per family: {counts}")

    # Valid requests get their right answers: a balance inquiry (moves nothing) shows the untouched
    # balance; a purchase is approved unless the fuzz's forced advices used up the partner's deposit.
    card = cards[10]  # a user the fuzz never touched
    client = await IsoClient.connect(server.iso_port)
    inquiry = auth(card, amount=0, processing="300000", cvc2=card["cvc2"])
    response = await client.call(inquiry)
    assert (response["t"], response["39"], response["2"]) == ("0110", "00", card["pan"])
    assert response["54"][7:20] == f"C{SEED_AMOUNT:012d}"
    echo = await client.call(isofuzz.network("123123"))
    assert (echo["t"], echo["39"], echo["70"]) == ("0810", "00", "301")
    purchase = await client.call(auth(card, amount=1234, cvc2=card["cvc2"]))
    assert purchase["39"] in ("00", "51"), purchase["39"]
    await client.aclose()

    assert await trio.to_thread.run_sync(server.terminate) == 0
    verify = run_cli("ledger", "verify", "--data", str(server.data_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
