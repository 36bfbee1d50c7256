"""The server when its write-ahead log cannot be written (docs/contract.md, "Operating limits";
docs/operations.md, "Full disk and I/O errors"): it stays up, answers 91 to what needs a durable
record, /readyz is 503 and the metrics say why, one error line per episode, REST changes that need
the ledger are 503 problems, and approvals resume by themselves once the disk takes the log again.
After a restart every approval a client received is in the ledger and `ledger verify` passes.

Faults are injected into the log's own calls only (tests/diskfaults.py); a real small filesystem is
filled in the slow test at the end."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import trio

from authsrv.pki import client_ssl_context
from ledger import wal as wal_module
from tests.conftest import SEED_AMOUNT, ServerProcess, run_cli, start_in_process
from tests.diskfaults import DiskFaults
from tests.isoclient import IsoClient, auth

pytestmark = pytest.mark.timeout(120)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(metrics_text: str, name: str) -> float | None:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def echo() -> dict:
    from tests.isoclient import next_ids

    stan, _ = next_ids()
    return {"t": "0800", "7": "1121221500", "11": stan, "70": "301"}


def verify(data_dir: Path) -> dict:
    result = run_cli("ledger", "verify", "--data", str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


async def settle(port: int, sent: dict) -> dict:
    """Ask again for every request sent: a duplicate gets its original's answer (approvals must all
    still be there), anything the server never journaled is decided now."""
    client = await IsoClient.connect(port)
    try:
        return {rrn: await client.call(request) for rrn, request in sent.items()}
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "code, calls, reason",
    [
        (errno.ENOSPC, ("fallocate", "write"), "enospc"),  # a full disk, found at allocation
        (errno.EIO, ("fdatasync",), "eio"),  # an I/O error: the unsynced tail is written again
    ],
)
async def test_a_refusing_disk_answers_91_and_approvals_resume_by_themselves(
        data_dir, cards, monkeypatch, caplog, code, calls, reason):
    monkeypatch.setattr(wal_module, "PREALLOCATE_BYTES", 1)  # every group allocates: the fault is met at once
    caplog.set_level(logging.INFO)
    sent: dict[str, dict] = {}
    answers: dict[str, dict] = {}

    async def call(client: IsoClient, request: dict) -> dict:
        sent[request["37"]] = request
        response = await client.call(request)
        answers[request["37"]] = response
        return response

    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        faults = DiskFaults(monkeypatch, data_dir / "ledger")
        client = await IsoClient.connect(server.iso_port)
        for index in range(5):
            assert (await call(client, auth(cards[index], amount=100)))["39"] == "00"
        assert http_get(server.metrics_port, "/readyz")[0] == 200

        faults.arm(code, *calls)
        # Pipelined: the first approvals wait for the failing commit until their budget, then are
        # voided and answered 91; once the log says it is unwritable, 91 comes at once.
        burst = [auth(cards[index % len(cards)], amount=7) for index in range(30)]
        for request in burst:
            sent[request["37"]] = request
            await client.send(request)
        for _ in burst:
            response = await client.receive(timeout=10)
            answers[response["37"]] = response
        assert {answers[request["37"]]["39"] for request in burst} == {"91"}
        assert server.ledger.wal.unwritable_reason == reason
        started = trio.current_time()
        assert (await call(client, auth(cards[0], amount=5)))["39"] == "91"
        assert trio.current_time() - started < 0.1  # refused up front, not after the budget
        assert (await client.call(echo()))["39"] == "00"  # what needs no record is still answered

        status, body = await trio.to_thread.run_sync(http_get, server.metrics_port, "/readyz")
        assert status == 503 and reason in body, body
        assert (await trio.to_thread.run_sync(http_get, server.metrics_port, "/healthz"))[0] == 200
        _, text = await trio.to_thread.run_sync(http_get, server.metrics_port, "/metrics")
        assert sample(text, f'authsrv_wal_unwritable{{reason="{reason}"}}') == 1.0
        assert sample(text, f'authsrv_wal_write_errors_total{{reason="{reason}"}}') >= 1
        assert sample(text, "authsrv_ready") == 0.0
        assert sample(text, "authsrv_wal_disk_free_bytes") > 0

        # A REST change that needs the ledger: a clear 503, nothing changed.
        from authsrv.store.db import Store

        with Store.open(data_dir) as store:
            customer_id = store.get_balance(cards[0]["balanceId"]).user_id
        root = f"/secure/customers/{customer_id}/balances/{cards[0]['balanceId']}"
        context = client_ssl_context(data_dir / "pki", "partner")
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{server.rest_port}", verify=context,
                                     timeout=20) as partner:
            reply = await partner.post(f"{root}/reload", json={"amount": 1_00},
                                       headers={"X-Idempotency-Key": "during-the-outage"})
            assert reply.status_code == 503, reply.text
            assert reply.headers["content-type"] == "application/problem+json"
            assert reply.json()["title"] == "LEDGER_UNAVAILABLE" and reply.headers["retry-after"]
            # A wallet with KYC done needs ledger accounts: refused before the store is changed.
            wallet = {"firstName": "Ada", "lastName": "Lovelace", "phone": "48710000001",
                      "email": "ada.outage@example.com", "birthDate": "1990-12-10", "wPIN": "2468",
                      "state": "VERIFIED", "kyc": "SUCCESS"}
            reply = await partner.post("/lifecycle/v1/wallet", json=wallet)
            assert reply.status_code == 503 and reply.json()["title"] == "LEDGER_UNAVAILABLE", reply.text
            with Store.open(data_dir) as store:
                assert store.users_by_login(email=wallet["email"]) == []

            await trio.sleep(1.5)  # a few more retries: still one error line
            faults.disarm()
            freed = trio.current_time()
            with trio.fail_after(5):
                while (await trio.to_thread.run_sync(http_get, server.metrics_port, "/readyz"))[0] != 200:
                    await trio.sleep(0.05)
            resumed_s = trio.current_time() - freed
            assert resumed_s < wal_module.RETRY_INTERVAL_S_MAX + 1.0
            for index in range(5):
                assert (await call(client, auth(cards[index], amount=3)))["39"] == "00"
            reply = await partner.post(f"{root}/reload", json={"amount": 1_00},
                                       headers={"X-Idempotency-Key": "during-the-outage"})
            assert reply.status_code == 200, reply.text
            assert (await partner.post("/lifecycle/v1/wallet", json=wallet)).status_code == 201
        _, text = await trio.to_thread.run_sync(http_get, server.metrics_port, "/metrics")
        assert sample(text, f'authsrv_wal_unwritable{{reason="{reason}"}}') == 0.0
        await client.aclose()
        server.stop.set()

    errors = [r.getMessage() for r in caplog.records if r.name == "ledger.wal" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"({reason})" in errors[0], errors
    assert faults.failures[calls[0]] >= 2
    verify(data_dir)
    async with trio.open_nursery() as nursery:  # a restart: every approval sent is still there
        server = await start_in_process(nursery, data_dir)
        final = await settle(server.iso_port, sent)
        server.stop.set()
    for rrn, answer in answers.items():
        if answer["39"] == "00":
            assert final[rrn]["39"] == "00" and final[rrn]["38"] == answer["38"], rrn
    # The reload during the outage moved nothing; its retry with the same key moved it once.
    assert_books_with_reload(data_dir, cards, final, sent, cards[0]["balanceId"], 1_00)
    verify(data_dir)


def assert_books_with_reload(data_dir, cards, final, sent, balance_id: int, reloaded: int) -> None:
    """Every balance is the seed amount (plus the reload) less exactly what was approved: the 91s
    were compensated."""
    from authsrv.store.db import Store
    from authsrv.store.index import load_index
    from ledger.durable import DurableLedger

    spent: dict[int, int] = {}
    by_pan = {card["pan"]: card for card in cards}
    for rrn, response in final.items():
        if response["39"] == "00":
            card = by_pan[sent[rrn]["2"]]
            spent[card["balanceId"]] = spent.get(card["balanceId"], 0) + int(sent[rrn]["4"])
    store = Store.open(data_dir)
    ledger = DurableLedger.open(data_dir / "ledger")
    try:
        index = load_index(store)
        for card in cards:
            balance = ledger.ledger.balance(index.card_by_id(card["cardId"]).balance_account_id)
            extra = reloaded if card["balanceId"] == balance_id else 0
            assert balance.available == SEED_AMOUNT + extra - spent.get(card["balanceId"], 0), card["cardId"]
    finally:
        ledger.close()
        store.close()


async def test_an_answer_that_cannot_be_compensated_waits_without_holding_up_the_connection(
        data_dir, cards, monkeypatch):
    """A purchase (0200, posted at once: no hold to void) whose commit misses its budget while the
    disk refuses is answered once durable; the 91s behind it on the same connection go out first."""
    monkeypatch.setattr(wal_module, "PREALLOCATE_BYTES", 1)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        faults = DiskFaults(monkeypatch, data_dir / "ledger")
        client = await IsoClient.connect(server.iso_port)
        assert (await client.call(auth(cards[0], amount=100)))["39"] == "00"
        faults.arm(errno.ENOSPC, "fallocate", "write")
        purchase = auth(cards[1], mti="0200", amount=250)
        await client.send(purchase)
        with trio.fail_after(5):
            while server.ledger.wal.writable:
                await trio.sleep(0.01)
        later = auth(cards[2], amount=10)
        await client.send(later)
        first = await client.receive(timeout=5)
        assert (first["37"], first["39"]) == (later["37"], "91")  # not held up behind the purchase
        with pytest.raises(trio.TooSlowError):
            await client.receive(timeout=0.5)  # the purchase waits for the log, past its budget
        faults.disarm()
        answer = await client.receive(timeout=5)
        assert (answer["t"], answer["37"], answer["39"]) == ("0210", purchase["37"], "00")
        await client.aclose()
        server.stop.set()
    verify(data_dir)


async def test_a_snapshot_that_does_not_fit_is_tried_again_later(data_dir, cards, monkeypatch, caplog):
    """The log still has its preallocated room, a snapshot does not fit: logged, its temporary file
    removed, approvals go on, and the next interval writes it."""
    from ledger.snapshot import list_snapshots

    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, ledger__snapshot_interval_records=20)
        faults = DiskFaults(monkeypatch, data_dir / "ledger")
        before = [seq for seq, _ in list_snapshots(data_dir / "ledger")]
        faults.arm(errno.ENOSPC, "fsync")  # the snapshot's own fsync; the log uses fdatasync
        client = await IsoClient.connect(server.iso_port)
        for index in range(25):
            assert (await client.call(auth(cards[index % len(cards)], amount=1)))["39"] == "00"
        with trio.fail_after(5):
            while not any("snapshot failed" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.1)
        assert [seq for seq, _ in list_snapshots(data_dir / "ledger")] == before
        assert not [path for path in (data_dir / "ledger").iterdir() if path.name.endswith(".tmp")]
        assert (await client.call(auth(cards[0], amount=1)))["39"] == "00"
        faults.disarm()
        for index in range(25):
            assert (await client.call(auth(cards[index % len(cards)], amount=1)))["39"] == "00"
        with trio.fail_after(5):
            while [seq for seq, _ in list_snapshots(data_dir / "ledger")] == before:
                await trio.sleep(0.1)
        await client.aclose()
        server.stop.set()
    verify(data_dir)


async def test_card_state_writes_wait_for_the_store(data_dir, cards, monkeypatch, caplog):
    """A wrong-PIN counter the store cannot save (SQLite on a full disk) is kept and saved later,
    in order; the writer does not end (it used to take the server down)."""
    import sqlite3

    from authsrv.hotpath import cardstate
    from authsrv.store.db import Store
    from authsrv.store.index import load_index

    monkeypatch.setattr(cardstate, "STORE_RETRY_S", 0.05)
    with Store.open(data_dir) as store:
        card = load_index(store).card_by_id(cards[0]["cardId"])
        real = store.save_pin_state
        failures = [3]

        def full(*args) -> None:
            if failures[0]:
                failures[0] -= 1
                raise sqlite3.OperationalError("database or disk is full (injected)")
            real(*args)

        monkeypatch.setattr(store, "save_pin_state", full)
        writer = cardstate.CardStateWriter(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            writer.wrong_pin(card)
            writer.wrong_pin(card)
            writer.close()
            with trio.fail_after(5):
                await writer.drained.wait()
        assert load_index(store).card_by_id(card.card_id).wrong_pin_count == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "database or disk is full" in errors[0].getMessage()


# ----------------------------------------------------------------------------- a real small disk


def _mount_tmpfs(directory: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
                            capture_output=True)
    return result.returncode == 0


@pytest.mark.slow
async def test_a_real_full_disk_under_the_network_simulator(template_dir: Path, tmp_path: Path) -> None:
    """The data directory on a 24 MiB tmpfs, most of it taken by a ballast file; the network
    simulator at 800/s fills the rest. The server stays up, answers 91, /readyz 503, one error
    line; the ballast is removed and it resumes by itself; a restart finds every approval."""
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "24m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        data = mount / "data"
        shutil.copytree(template_dir, data)
        free = shutil.disk_usage(mount).free
        ballast = mount / "ballast"
        with open(ballast, "wb") as out:
            out.write(b"\0" * (free - 3 * 1024 * 1024))  # 3 MiB left: ~10 s of log at 800/s
        server = ServerProcess(data).start()
        try:
            report = tmp_path / "report.json"
            simulator = subprocess.Popen(
                [sys.executable, "-m", "simulators.network", "--cards", str(data / "cards.jsonl"),
                 "--zpk-file", str(data / "keys" / "zpk.hex"), "--port", str(server.iso_port),
                 "--rate", "800", "--duration", "40", "--progress", "0", "--json", str(report)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            full_at = None
            deadline = time.monotonic() + 35
            while time.monotonic() < deadline and full_at is None:
                time.sleep(0.2)
                assert server.proc.poll() is None, server.read_log()[-3000:]
                status, body = http_get(server.metrics_port, "/readyz")
                if status == 503 and "enospc" in body:
                    full_at = time.monotonic()
            assert full_at is not None, "the disk never filled"
            time.sleep(2)  # full for a while under load
            assert server.proc.poll() is None
            _, text = http_get(server.metrics_port, "/metrics")
            assert sample(text, 'authsrv_wal_unwritable{reason="enospc"}') == 1.0
            answered_91 = sample(text, 'authsrv_iso_requests_total{code="91",mti="0100"}') or 0
            ballast.unlink()  # the operator frees space
            freed = time.monotonic()
            while http_get(server.metrics_port, "/readyz")[0] != 200:
                assert time.monotonic() - freed < 10, server.read_log()[-3000:]
                time.sleep(0.05)
            resumed_s = time.monotonic() - freed
            _, text = http_get(server.metrics_port, "/metrics")
            assert sample(text, 'authsrv_wal_unwritable{reason="enospc"}') == 0.0
            simulator.wait(90)
            assert server.proc.poll() is None
            assert answered_91 > 0
            assert server.terminate() == 0
        finally:
            server.cleanup()
        log_lines = [json.loads(line) for line in server.read_log().splitlines() if line.startswith("{")]
        wal_errors = [entry for entry in log_lines if entry["logger"] == "ledger.wal" and entry["level"] == "error"]
        assert len(wal_errors) == 1, wal_errors
        print(f"log unwritable for {freed - full_at:.1f} s, resumed {resumed_s:.2f} s after space was freed; "
              f"{json.loads(report.read_text()).get('codes', {})}")
        verify(data)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
