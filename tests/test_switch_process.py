"""The switch as a real process: SIGTERM drains and exits 0; kill -9 under load loses no approval
and applies nothing twice; `authsrv ledger verify` passes; promtool accepts the metrics."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import urllib.request

import pytest
import trio

from tests.conftest import SEED_AMOUNT, ServerProcess, run_cli
from tests.isoclient import IsoClient, auth


async def _load(port: int, cards: list[dict], sent: dict, answers: dict, count: int, connections: int) -> None:
    """Send `count` authorizations over several pipelined connections; record every answer."""

    async def connection(worker: int) -> None:
        try:
            client = await IsoClient.connect(port)
        except OSError:
            return
        mine = [auth(cards[(worker + i) % len(cards)], amount=random.randint(1, 50)) for i in range(count)]
        async with trio.open_nursery() as nursery:
            async def writer() -> None:
                try:
                    for request in mine:
                        sent[request["37"]] = request
                        await client.send(request)
                        await trio.sleep(0.001)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            nursery.start_soon(writer)
            try:
                for _ in mine:
                    response = await client.receive(timeout=30)
                    answers[response["37"]] = response
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for worker in range(connections):
            nursery.start_soon(connection, worker)


def _verify(data_dir) -> dict:
    result = run_cli("ledger", "verify", "--data", str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


async def _settle(port: int, sent: dict) -> dict:
    """Ask again for every request ever sent: duplicates get their original answer; the rest are new."""
    final = {}
    client = await IsoClient.connect(port)
    for rrn, request in sent.items():
        final[rrn] = await client.call(request)
    await client.aclose()
    return final


def _assert_books(data_dir, cards, final: dict, sent: dict) -> None:
    from ledger.durable import DurableLedger
    from authsrv.store.db import Store
    from authsrv.store.index import load_index

    spent: dict[str, int] = {}
    for rrn, response in final.items():
        if response["39"] == "00":
            spent[sent[rrn]["2"]] = spent.get(sent[rrn]["2"], 0) + int(sent[rrn]["4"])
    store = Store.open(data_dir)
    index = load_index(store)
    ledger = DurableLedger.open(data_dir / "ledger")
    try:
        by_balance: dict[int, int] = {}
        for card in cards:
            by_balance[card["balanceId"]] = by_balance.get(card["balanceId"], 0) + spent.get(card["pan"], 0)
        for card in cards:
            state = index.card_by_id(card["cardId"])
            balance = ledger.ledger.balance(state.balance_account_id)
            assert balance.available == SEED_AMOUNT - by_balance[card["balanceId"]], card["cardId"]
    finally:
        ledger.close()
        store.close()


async def test_sigterm_drains_and_exits_zero(server_process, cards):
    server = server_process.start()
    client = await IsoClient.connect(server.iso_port)
    assert (await client.call(auth(cards[0], amount=10)))["39"] == "00"
    code = await trio.to_thread.run_sync(server.terminate)
    assert code == 0, server.read_log()[-3000:]
    assert "stopped cleanly" in server.read_log()
    _verify(server.data_dir)


async def _kill_rounds(data_dir, cards, rounds: int) -> None:
    server = ServerProcess(data_dir)
    sent: dict = {}
    answers: dict = {}
    try:
        for round_number in range(rounds):
            server.start()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_load, server.iso_port, cards, sent, answers, 400, 4)
                await trio.sleep(random.uniform(0.2, 0.8))
                server.kill()
        server.start()
        final = await _settle(server.iso_port, sent)
        for rrn, answer in answers.items():  # every answer a client received stands
            assert final[rrn]["39"] == answer["39"], rrn
            if answer["39"] == "00":
                assert final[rrn]["38"] == answer["38"]
        assert sum(1 for a in answers.values() if a["39"] == "00") > 0
        assert server.terminate() == 0
    finally:
        server.cleanup()
    _verify(data_dir)
    _assert_books(data_dir, cards, final, sent)


async def test_kill_9_under_load_keeps_every_approval(data_dir, cards):
    await _kill_rounds(data_dir, cards, rounds=3)


@pytest.mark.slow
async def test_kill_9_many_rounds(data_dir, cards):
    await _kill_rounds(data_dir, cards, rounds=20)


async def test_promtool_accepts_metrics(server_process, cards):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    server = server_process.start()
    client = await IsoClient.connect(server.iso_port)
    await client.call(auth(cards[0], amount=10))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
        text = reply.read()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
