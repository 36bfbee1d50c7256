"""IBANs (ISO 13616): make one for a new balance, check one for validity.

An IBAN is `CC` (ISO 3166 country) + 2 check digits + the BBAN (the national account number).
The check digits make the whole string, rearranged (first four characters moved to the end,
letters A..Z written as 10..35), equal 1 modulo 97 (ISO 7064 MOD 97-10).

The BBAN we issue is the program's bank code followed by the account number, zero-padded to the
country's BBAN length (SWIFT IBAN Registry). Countries whose BBAN also carries a national check
digit (FR, ES, IT, BE, ...) get no such digit here: the IBAN's own mod-97 check is exact, the
national one is not computed. Development programs use DE (no national check digit in the BBAN).
"""

from __future__ import annotations

IBAN_LENGTH_MIN = 15  # Norway, the shortest
IBAN_LENGTH_MAX = 34  # ISO 13616 upper bound
MOD97 = 97

# Total IBAN length per country (SWIFT IBAN Registry). Unknown countries are checked against the
# ISO bounds only by `valid_iban`; `make_iban` refuses them (it must know the BBAN length).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip
_ALPHANUMERIC = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class IbanError(ValueError):
    """The country, bank code or account number cannot form an IBAN."""


def make_iban(country: str, bank_code: str, account_number: int | str) -> str:
    """`country` + check digits + `bank_code` + `account_number` zero-padded to the BBAN length."""
    if country not in IBAN_LENGTHS:
        raise IbanError(f"no IBAN format known for country {country!r}")
    if not bank_code or not set(bank_code) <= _ALPHANUMERIC:
        raise IbanError("bank code must be 1 or more of 0-9 and A-Z")
    account = str(account_number)
    if not account.isascii() or not account.isdigit():
        raise IbanError("account number must be digits")
    width = IBAN_LENGTHS[country] - 4 - len(bank_code)
    if width < 1:
        raise IbanError(f"bank code too long for a {country} IBAN")
    if len(account) > width:
        raise IbanError(f"account number longer than the {width} digits a {country} IBAN leaves")
    bban = bank_code + account.zfill(width)
    iban = country + check_digits(country, bban) + bban
    assert len(iban) == IBAN_LENGTHS[country] and valid_iban(iban), "made an invalid IBAN"
    return iban


def check_digits(country: str, bban: str) -> str:
    """The two ISO 13616 check digits for `country` and `bban` ("00" in their place, 98 - mod)."""
    return f"{MOD97 + 1 - _mod97(bban + country + '00'):02d}"


def valid_iban(text: str) -> bool:
    """True for a well-formed IBAN with correct check digits (spaces of the print form allowed)."""
    iban = text.replace(" ", "")
    if not IBAN_LENGTH_MIN <= len(iban) <= IBAN_LENGTH_MAX or not set(iban) <= _ALPHANUMERIC:
        return False
    country, digits = iban[:2], iban[2:4]
    if not country.isalpha() or not digits.isdigit():
        return False
    if len(iban) != IBAN_LENGTHS.get(country, len(iban)):
        return False
    if digits in ("00", "01", "99"):  # never produced by 98 - mod (mod is 0..96): not a real IBAN
        return False
    return _mod97(iban[4:] + iban[:4]) == 1


def format_iban(iban: str) -> str:
    """The print form: groups of four separated by spaces."""
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))


def _mod97(text: str) -> int:
    # int(c, 36) writes 0-9 as themselves and A-Z as 10..35, as ISO 13616 says.
    return int("".join(str(int(c, 36)) for c in text)) % MOD97
