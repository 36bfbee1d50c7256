"""FX (issue 6): the rates table, exact conversion with half-up rounding, the hot path converting
field 4 when fields 6/51 are absent, 57 without a rate, advices without a rate, and the admin
endpoint replacing the table so the very next authorization uses it."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import httpx
import pytest
import trio

from authsrv.hotpath import fx
from authsrv.hotpath.journal import AuthRecord
from authsrv.pki import client_ssl_context
from tests.conftest import SEED_AMOUNT, start_in_process
from tests.isoclient import IsoClient, auth

RATES = {"base": "EUR", "rates": {"USD": "1.0842", "GBP": "0.8571", "JPY": "162.35"}, "asOf": "2025-01-02T16:00:00Z"}


def write_rates(data_dir: Path, document: dict = RATES) -> None:
    (data_dir / fx.RATES_FILE_NAME).write_text(json.dumps(document))


def available(server, card: dict) -> int:
    state = server.index.card_by_id(card["cardId"])
    return server.ledger.ledger.balance(state.balance_account_id).available


def record_of(server, response: dict) -> AuthRecord:
    mti = response["t"]
    request_class = f"{mti[:2]}{int(mti[2]) - 1}0"  # 0110 -> 0100, 0130 -> 0120
    key = f"{request_class}|{response['32'].zfill(11)}|{response['11']}|{response['7']}|{response['37']}"
    record = server.journal.get(key)
    assert record is not None
    return record


def rates_of(server) -> fx.RatesFile:
    """The switch's RatesFile (held by its `amount` participant)."""
    for participants in server.switch._pipelines.values():
        for participant in participants:
            if participant.name == "amount":
                return participant._fx
    raise AssertionError("no amount participant")


# -- the table and the arithmetic -----------------------------------------------------------------


def test_conversion_is_exact_and_rounds_half_up_once() -> None:
    table = fx.decode_rates(json.dumps(RATES).encode())
    # 10.00 USD -> EUR at 1 / 1.0842 = 9.2233905183... -> 9.22
    assert table.convert(1000, "USD", "EUR").amount == 922
    # 10.00 EUR -> USD = 10.842 -> 10.84; 1.05 EUR -> USD = 1.13841 -> 1.14
    assert table.convert(1000, "EUR", "USD").amount == 1084
    assert table.convert(105, "EUR", "USD").amount == 114
    # half-up exactly at .5: 0.05 EUR at a rate of 1.1 is 0.055 USD -> 0.06 (binary floats say 0.05)
    half = fx.convert_minor(5, "EUR", "USD", Fraction("1.1"))
    assert half == 6
    # exponents: JPY has none, so 1.00 EUR -> 162.35 JPY -> 162 yen; 1000 yen -> 6.159531... EUR -> 6.16
    assert table.convert(100, "EUR", "JPY").amount == 162
    assert table.convert(1000, "JPY", "EUR").amount == 616
    # a cross rate through the base: USD -> GBP = 0.8571 / 1.0842
    cross = table.convert(10_000, "USD", "GBP")
    assert cross.amount == 7905 and cross.rate == "0.790536801328"
    assert table.convert(100, "USD", "CHF") is None
    assert table.rate("EUR", "EUR") == 1


def test_format_rate_keeps_twelve_significant_digits() -> None:
    assert fx.format_rate(Fraction("1.0842")) == "1.0842"
    assert fx.format_rate(Fraction(1, 3)) == "0.333333333333"
    assert fx.format_rate(Fraction("162.35")) == "162.35"
    assert fx.format_rate(Fraction(2, 3) * 1000) == "666.666666667"


@pytest.mark.parametrize("document, rule", [
    ({**RATES, "base": "XXX"}, "ISO 4217"),
    ({**RATES, "rates": {"ABC": "1.0"}}, "ISO 4217"),
    ({**RATES, "rates": {"USD": "-1.0"}}, "digits"),
    ({**RATES, "rates": {"USD": "1e3"}}, "digits"),
    ({**RATES, "rates": {"USD": "0"}}, "between"),
    ({**RATES, "rates": {"USD": "1.2.3"}}, "decimal string"),
    ({**RATES, "rates": {"EUR": "1.1"}}, "base currency"),
    ({**RATES, "asOf": "yesterday"}, "ISO 8601"),
    ({**RATES, "asOf": "2025-01-02T16:00:00+02:00"}, "UTC"),
    ({**RATES, "extra": 1}, "unknown field"),
    ({"base": "EUR", "rates": {"USD": 1.08}, "asOf": "2025-01-02T16:00:00Z"}, "Expected `str`"),
])
def test_invalid_tables_are_refused_with_the_rule(document: dict, rule: str) -> None:
    with pytest.raises(fx.RatesError, match=rule):
        fx.decode_rates(json.dumps(document).encode())


def test_rates_file_sees_a_replacement_at_once_and_keeps_the_last_good_table(tmp_path: Path) -> None:
    rates = fx.RatesFile(tmp_path / fx.RATES_FILE_NAME)
    assert rates.table().convert(100, "USD", "EUR") is None  # no file: no rates
    rates.replace(fx.decode_rates(json.dumps(RATES).encode()))
    reader = fx.RatesFile(tmp_path / fx.RATES_FILE_NAME)  # another reader, as the switch is
    assert reader.table().convert(1000, "USD", "EUR").amount == 922
    for step in range(5):  # quick replacements of the same size are all seen
        rates.replace(fx.decode_rates(json.dumps({**RATES, "rates": {"USD": f"1.{step}000"}}).encode()))
        assert reader.table().rate("EUR", "USD") == Fraction(f"1.{step}")
    (tmp_path / fx.RATES_FILE_NAME).write_text("{not json")
    assert reader.table().rate("EUR", "USD") == Fraction("1.4")  # the bad file is ignored, logged
    assert not list(tmp_path.glob(".*.tmp"))


# -- the hot path -----------------------------------------------------------------------------------


async def test_converts_without_billing_fields_and_records_the_rate(data_dir: Path, cards) -> None:
    write_rates(data_dir)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        card = cards[0]
        response = await client.call(auth(card, amount=1000, currency="840"))  # 10.00 USD
        assert response["39"] == "00" and response["49"] == "840" and response["4"] == "000000001000"
        assert available(server, card) == SEED_AMOUNT - 922
        record = record_of(server, response)
        assert (record.amount, record.currency, record.request_amount, record.request_currency) == (
            922, "EUR", 1000, "USD")
        assert record.fx_rate == "0.922339051835"
        # with fields 6/51 the billing amount is charged as sent: no conversion, no rate recorded
        billed = await client.call(auth(card, amount=1000, currency="840", billing=(900, "978")))
        assert billed["39"] == "00" and available(server, card) == SEED_AMOUNT - 922 - 900
        assert record_of(server, billed).fx_rate == ""
        # no rate for the pair: 57, nothing held
        declined = await client.call(auth(card, amount=1000, currency="756"))  # CHF
        assert declined["39"] == "57" and "38" not in declined
        assert "no FX rate" in record_of(server, declined).cause
        assert available(server, card) == SEED_AMOUNT - 1822
        server.ledger.ledger.check_invariants()
        server.stop.set()


async def test_an_advice_without_a_rate_is_acknowledged_and_moves_nothing(data_dir: Path, cards) -> None:
    write_rates(data_dir)
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        card = cards[1]
        advice = await client.call(auth(card, mti="0120", amount=5000, currency="756"))
        assert advice["t"] == "0130" and advice["39"] == "00"
        assert available(server, card) == SEED_AMOUNT
        assert record_of(server, advice).cause.startswith("advice not applied")
        assert rates_of(server).advices_without_rate == 1
        converted = await client.call(auth(card, mti="0120", amount=1000, currency="840"))
        assert converted["39"] == "00" and available(server, card) == SEED_AMOUNT - 922
        server.ledger.ledger.check_invariants()
        server.stop.set()


async def test_admin_endpoint_replaces_the_table_for_the_next_authorization(data_dir: Path, cards) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        client = await IsoClient.connect(server.iso_port)
        card = cards[2]
        assert (await client.call(auth(card, amount=1000, currency="840")))["39"] == "57"  # no table yet
        password = (data_dir / "admin-password").read_text().strip()
        context = client_ssl_context(data_dir / "pki")
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{server.rest_port}", verify=context) as http:
            login = await http.post("/admin/sessions", json={"username": "admin", "password": password})
            headers = {"Authorization": f"Bearer {login.json()['token']}"}
            missing = await http.get("/admin/fx-rates", headers=headers)
            assert missing.status_code == 404 and missing.json()["title"] == "FX_RATES_NOT_FOUND"
            bad = await http.put("/admin/fx-rates", headers=headers, json={**RATES, "rates": {"USD": "x"}})
            assert bad.status_code == 400 and bad.json()["title"] == "INVALID_PAYLOAD"
            assert not (data_dir / fx.RATES_FILE_NAME).exists()
            put = await http.put("/admin/fx-rates", headers=headers, json=RATES)
            assert put.status_code == 200 and put.json() == RATES
            response = await client.call(auth(card, amount=1000, currency="840"))
            assert response["39"] == "00" and available(server, card) == SEED_AMOUNT - 922
            changed = {**RATES, "rates": {"USD": "2"}}
            assert (await http.put("/admin/fx-rates", headers=headers, json=changed)).status_code == 200
            assert (await client.call(auth(card, amount=1000, currency="840")))["39"] == "00"
            assert available(server, card) == SEED_AMOUNT - 922 - 500
            got = await http.get("/admin/fx-rates", headers=headers)
            assert got.status_code == 200 and got.json() == changed
            assert json.loads((data_dir / fx.RATES_FILE_NAME).read_text()) == changed
            unauthenticated = await http.put("/admin/fx-rates", json=RATES)
            assert unauthenticated.status_code == 401
        server.ledger.ledger.check_invariants()
        server.stop.set()
