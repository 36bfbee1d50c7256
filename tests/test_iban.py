"""IBANs: published valid IBANs pass, any single-character change fails, made IBANs are valid."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authsrv.iban import IBAN_LENGTHS, IbanError, check_digits, format_iban, make_iban, valid_iban

# Examples published by the SWIFT IBAN Registry and national banks (the classic test IBANs).
PUBLISHED = [
    "GB82WEST12345698765432",
    "DE89370400440532013000",
    "FR1420041010050500013M02606",
    "NL91ABNA0417164300",
    "BE68539007547034",
    "NO9386011117947",
    "CH9300762011623852957",
    "AT611904300234573201",
    "ES9121000418450200051332",
    "IT60X0542811101000000123456",
    "PL61109010140000071219812874",
    "MT84MALT011000012345MTLCAST001S",
]


@pytest.mark.parametrize("iban", PUBLISHED)
def test_published_ibans_are_valid(iban: str) -> None:
    assert valid_iban(iban)
    assert valid_iban(format_iban(iban))  # the print form, in groups of four
    assert len(iban) == IBAN_LENGTHS[iban[:2]]
    assert check_digits(iban[:2], iban[4:]) == iban[2:4]


@pytest.mark.parametrize("bad", [
    "GB82WEST12345698765433",  # last digit changed
    "GB28WEST12345698765432",  # check digits swapped
    "DE89370400440532013",  # too short for DE
    "DE8937040044053201300000",  # too long for DE
    "gb82west12345698765432",  # lower case is not the electronic form
    "GB82WEST1234569876543!",
    "1282WEST12345698765432",  # country must be letters
    "GBX2WEST12345698765432",  # check digits must be digits
    "", "GB82", "X" * 40,
])  # fmt: skip
def test_invalid_ibans(bad: str) -> None:
    assert not valid_iban(bad)


def test_check_digits_00_01_99_are_never_valid() -> None:
    # 98 - (n mod 97) is 02..98; 00/01/99 can satisfy mod 97 == 1 by arithmetic, but no IBAN has them.
    bban = "370400440532013000"
    for digits in ("00", "01", "99"):
        assert not valid_iban("DE" + digits + bban)


def test_make_iban_known_examples() -> None:
    assert make_iban("DE", "37040044", "532013000") == "DE89370400440532013000"
    assert make_iban("GB", "WEST123456", 98765432) == "GB82WEST12345698765432"
    assert make_iban("DE", "99990000", 1) == "DE07999900000000000001"


@given(country=st.sampled_from(sorted(c for c, n in IBAN_LENGTHS.items() if n >= 22)),
       account=st.integers(min_value=0, max_value=10**10 - 1))
def test_made_ibans_are_valid_and_detect_any_single_digit_change(country: str, account: int) -> None:
    iban = make_iban(country, "1234", account)
    assert valid_iban(iban) and iban.startswith(country) and len(iban) == IBAN_LENGTHS[country]
    assert iban.endswith(str(account))
    for position in range(4, len(iban)):  # mod 97 catches every single-character substitution
        changed = iban[:position] + str((int(iban[position]) + 1) % 10) + iban[position + 1:]
        assert not valid_iban(changed), changed


@pytest.mark.parametrize("country, bank, account", [
    ("XX", "1234", 1),  # no known format
    ("DE", "", 1),
    ("DE", "9999-000", 1),
    ("DE", "99990000", "12a"),
    ("DE", "99990000", 10**10),  # 11 digits; DE leaves 10
    ("NO", "12345678901", 1),  # bank code fills the whole BBAN
])  # fmt: skip
def test_make_iban_refuses(country: str, bank: str, account) -> None:
    with pytest.raises(IbanError):
        make_iban(country, bank, account)
