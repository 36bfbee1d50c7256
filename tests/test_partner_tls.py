"""https partners (issue 5 follow-ups): the partner's own CA (`[partners.NAME] ca_file`) for both
clients, authsrv's client certificate, and a clear start error for a bad CA file.

The partner simulator serves with a certificate of a CA made here, not the data directory's
development CA, and requires authsrv's client certificate (signed by the development CA)."""

from __future__ import annotations

import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from authsrv import pki
from authsrv.config import PartnerConfig, render_partner_table
from authsrv.hotpath.context import External
from authsrv.notify.outbox import PENDING, OutboxStore
from authsrv.notify.partner_http import PartnerClient
from simulators.partner import PartnerSimSettings, running_partner
from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth

pytestmark = pytest.mark.timeout(60)
WAIT_S = 15.0
PARTNER_AMOUNT = 50_000


def partner_ca(tmp_path: Path) -> Path:
    """A CA of the partner's own with its server certificate (127.0.0.1): `DIR/server.crt/.key`."""
    directory = tmp_path / "partner-pki"
    pki.create_ca(directory)
    pki.issue_server_cert(directory)
    return directory


def sim_settings(partner_pki: Path, data_dir: Path, **more) -> PartnerSimSettings:
    return PartnerSimSettings(tls_cert=partner_pki / "server.crt", tls_key=partner_pki / "server.key",
                              client_ca=data_dir / "pki" / "ca.crt", **more)


def use_partner(data_dir: Path, **settings) -> None:
    """The `[partners.demo]` table rewritten as an operator would (it is the file's last table)."""
    path = data_dir / "authsrv.toml"
    head, _, _ = path.read_text().partition("[partners.demo]")
    path.write_text(head + render_partner_table("demo", PartnerConfig(**settings)))


def key_of(response: dict) -> str:
    return f"{response['t'][:2]}00|{response['32'].zfill(11)}|{response['11']}|{response['7']}|{response['37']}"


@asynccontextmanager
async def serving(data_dir: Path, **overrides):
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir, **overrides)
        client = await IsoClient.connect(server.iso_port)
        try:
            yield server, client
        finally:
            await client.aclose()
            server.stop.set()


async def wait_for(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what
        await trio.sleep(0.05)


# -- the partner's CA --------------------------------------------------------------------------------


async def test_partner_ca_file_verifies_both_clients_with_authsrv_certificate(data_dir, cards, tmp_path):
    partner_pki = partner_ca(tmp_path)
    shutil.copy(partner_pki / "ca.crt", data_dir / "partner-ca.crt")  # relative to the data directory
    card = cards[0]
    async with running_partner(sim_settings(partner_pki, data_dir)) as sim:
        assert sim.url.startswith("https://")
        sim.state.set_amount(str(card["customerId"]), str(card["balanceId"]), PARTNER_AMOUNT, "EUR")
        use_partner(data_dir, balance_mode="external", api_url=sim.url, notify=("transaction",),
                    ca_file="partner-ca.crt")
        async with serving(data_dir, delivery__backoff_initial_ms=50) as (server, client):
            response = await client.call(auth(card, amount=1234, cvc2=card["cvc2"]))
            assert response["39"] == "00"
            assert server.journal.get(key_of(response)).external == External.approved
            (debit,) = sim.state.received_of("debit")
            assert debit.client_cert_name == "CN=authsrv"
            await wait_for(lambda: sim.state.received_of("transaction"), "the outbox's notification")
            (notification,) = sim.state.received_of("transaction")
            assert notification.client_cert_name == "CN=authsrv"
    assert sim.state.amount_of(str(card["balanceId"])) == PARTNER_AMOUNT - 1234


async def test_without_the_partner_ca_calls_fail_stand_in_and_the_outbox_retries(data_dir, cards, tmp_path):
    partner_pki = partner_ca(tmp_path)
    card = cards[0]
    async with running_partner(sim_settings(partner_pki, data_dir)) as sim:
        sim.state.set_amount(str(card["customerId"]), str(card["balanceId"]), PARTNER_AMOUNT, "EUR")
        # ca_file = "": the development CA, which did not sign the simulator's certificate.
        use_partner(data_dir, balance_mode="external", api_url=sim.url, notify=("transaction",))
        async with serving(data_dir, delivery__backoff_initial_ms=50) as (server, client):
            response = await client.call(auth(card, amount=1234, cvc2=card["cvc2"]))
            assert response["39"] == "91"
            record = server.journal.get(key_of(response))
            assert record.stand_in and record.external == External.failed
            outbox = OutboxStore(server.store)

            def rows() -> list:
                return [row for row in (outbox.get(number) for number in range(1, 10)) if row]

            # The reversal of the failed debit goes first (per balance, tried until delivered).
            await wait_for(lambda: any(row.tries >= 2 for row in rows()), "a call tried twice")
            assert {row.kind for row in rows()} == {"reversal", "notify.transaction"}
            assert all(row.state == PENDING and row.last_status == 0 for row in rows())
            assert any(row.last_error.startswith("ConnectError") for row in rows())
        assert sim.state.received_of("") == []  # no handshake completed, nothing reached the partner
    assert sim.state.amount_of(str(card["balanceId"])) == PARTNER_AMOUNT


async def test_a_missing_ca_file_stops_the_start_naming_the_partner(data_dir, tmp_path):
    use_partner(data_dir, balance_mode="internal", api_url="https://127.0.0.1:9", notify=("transaction",),
                ca_file=str(tmp_path / "nowhere.crt"))
    with pytest.raises(pki.PkiError, match=r"partner 'demo': CA file .*nowhere\.crt \(ca_file\) not found"):
        try:
            async with serving(data_dir):
                pytest.fail("the server started")
        except* pki.PkiError as group:
            raise group.exceptions[0] from None
    assert not (data_dir / "run.json").exists()  # never got as far as listening


def test_an_unusable_ca_file_is_refused_by_the_outbox_client(data_dir, tmp_path):
    bad = tmp_path / "not-a-certificate.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    with pytest.raises(pki.PkiError, match=r"partner 'demo': CA file .* unusable"):
        PartnerClient("demo", "https://127.0.0.1:9", data_dir=data_dir, timeout_s=1.0, ca_file=str(bad))
    assert pki.partner_ca_path(data_dir, "") == data_dir / "pki" / "ca.crt"
    assert pki.partner_ca_path(data_dir, "x/ca.pem") == data_dir / "x" / "ca.pem"
    assert pki.partner_ca_path(data_dir, str(bad)) == bad
