"""The cards the simulator spends with: the JSON Lines file `authsrv seed --out FILE` writes.

Card data never leaves this process in clear: `SimCard` masks the PAN in its repr and nothing in
the report names a card.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import attrs
import msgspec

CARDS_MAX = 2_000_000  # lines read from one cards file
CARD_LINE_SIZE_MAX = 4096  # bytes
UNKNOWN_BIN = "535522"  # the demo program's BIN (docs/contract.md, commands); unknown PANs reuse it
PAN_DIGITS = 16
UNKNOWN_PAN_TRIES_MAX = 100

# ISO 4217 alpha -> numeric for the currencies a seeded program can plausibly use.
CURRENCY_NUMERIC = {
    "EUR": "978", "USD": "840", "GBP": "826", "PLN": "985", "CHF": "756", "CZK": "203",
    "SEK": "752", "NOK": "578", "DKK": "208", "HUF": "348", "RON": "946", "JPY": "392",
}  # fmt: skip


class CardLine(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One line of the cards file (docs/contract.md, commands: `authsrv seed`).

    Unknown fields are tolerated on purpose, and ids may be numbers or strings: the file is another
    component's output and the contract fixes neither; the simulator only reports ids.
    """

    pan: str
    expiry: str
    cvc2: str
    pin: str
    card_id: str | int
    customer_id: str | int
    balance_id: str | int
    currency: str


@attrs.frozen
class SimCard:
    pan: str = attrs.field(repr=False)
    expiry: str = attrs.field(repr=False)  # YYMM
    cvc2: str = attrs.field(repr=False)
    pin: str = attrs.field(repr=False)
    card_id: str
    currency: str  # ISO 4217 alpha
    currency_numeric: str

    @property
    def masked_pan(self) -> str:
        return mask_pan(self.pan)

    @classmethod
    def from_line(cls, line: CardLine) -> SimCard:
        problem = _card_problem(line)
        if problem:
            raise ValueError(f"card {line.card_id!r}: {problem}")
        return cls(
            pan=line.pan,
            expiry=line.expiry,
            cvc2=line.cvc2,
            pin=line.pin,
            card_id=str(line.card_id),
            currency=line.currency,
            currency_numeric=CURRENCY_NUMERIC[line.currency],
        )


def _card_problem(line: CardLine) -> str | None:
    """What is wrong with one line, described without its card data."""
    if not (line.pan.isdigit() and 12 <= len(line.pan) <= 19):
        return "pan is not 12..19 digits"
    if not (line.expiry.isdigit() and len(line.expiry) == 4 and 1 <= int(line.expiry[2:]) <= 12):
        return "expiry is not YYMM"
    if not (line.cvc2.isdigit() and len(line.cvc2) == 3):
        return "cvc2 is not 3 digits"
    if not (line.pin.isdigit() and 4 <= len(line.pin) <= 12):
        return "pin is not 4..12 digits"
    if line.currency not in CURRENCY_NUMERIC:
        return f"currency {line.currency!r} unknown to the simulator"
    return None


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits at most, as the house rules allow."""
    return pan[:6] + "*" * max(0, len(pan) - 10) + pan[-4:]


def load_cards(path: Path) -> tuple[SimCard, ...]:
    decoder = msgspec.json.Decoder(CardLine)
    cards = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if number > CARDS_MAX:
                raise ValueError(f"{path}: more than {CARDS_MAX} cards")
            if len(raw) > CARD_LINE_SIZE_MAX:
                raise ValueError(f"{path}:{number}: line longer than {CARD_LINE_SIZE_MAX} bytes")
            if not raw.strip():
                continue
            try:
                cards.append(SimCard.from_line(decoder.decode(raw)))
            except msgspec.ValidationError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    if not cards:
        raise ValueError(f"{path}: no cards")
    return tuple(cards)


def luhn_check_digit(digits: str) -> str:
    """The digit that makes `digits + digit` pass the Luhn check."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 0:  # doubled: these sit at odd positions once the check digit is appended
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return str((10 - total % 10) % 10)


def luhn_valid(pan: str) -> bool:
    return pan.isdigit() and len(pan) >= 2 and luhn_check_digit(pan[:-1]) == pan[-1]


def random_pan(rng: random.Random, bin_prefix: str = UNKNOWN_BIN) -> str:
    body = bin_prefix + "".join(rng.choices("0123456789", k=PAN_DIGITS - 1 - len(bin_prefix)))
    return body + luhn_check_digit(body)


def unknown_pan(rng: random.Random, known: frozenset[str]) -> str:
    """A Luhn-valid PAN in the issued BIN that is not one of the seeded cards."""
    for _ in range(UNKNOWN_PAN_TRIES_MAX):
        pan = random_pan(rng)
        if pan not in known:
            return pan
    raise RuntimeError("could not draw a PAN outside the seeded cards")


def write_synthetic_cards(path: Path, count: int, *, seed: int, currency: str = "EUR") -> None:
    """A cards file in the seed format for targets that have no card store (the baseline server)."""
    assert 0 < count <= CARDS_MAX
    assert currency in CURRENCY_NUMERIC
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        lines.append(
            json.dumps(
                {
                    "pan": random_pan(rng),
                    "expiry": f"{rng.randint(27, 32):02d}{rng.randint(1, 12):02d}",
                    "cvc2": f"{rng.randint(0, 999):03d}",
                    "pin": f"{rng.randint(0, 9999):04d}",
                    "cardId": f"synthetic-card-{index}",
                    "customerId": f"synthetic-customer-{index}",
                    "balanceId": f"synthetic-balance-{index}",
                    "currency": currency,
                }
            )
        )
    # The file holds PINs and CVC2s: create it owner-only, like `authsrv seed` does.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as out:
        out.write("\n".join(lines) + "\n")
