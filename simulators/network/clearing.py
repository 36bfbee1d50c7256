"""The clearing file of the traffic sent (docs/contract.md, clearing file): what the network would send the
issuer days later for the purchases the server approved.

The simulator knows what it sent and what was approved (field 38 of each `00` answer), so it can
write the file the acquirers' presentments would make: most purchases cleared exactly, some for
less (the rest is released) or more (a tip), a few in two parts (split shipment), plus one record
matching nothing (a force post) and one refund referencing a cleared purchase. Reversed purchases
are cleared at what the reversal left (a full reversal: not at all).
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
from pathlib import Path

import attrs

from simulators.network.cards import CURRENCY_NUMERIC, SimCard

APPROVALS_MAX = 1_000_000  # approvals remembered for the file; the oldest are dropped beyond it
UNDER_SHARE = 0.06
OVER_SHARE = 0.04
SPLIT_SHARE = 0.03
UNDER_PERCENT = 90
OVER_PERCENT = 110
FORCE_POST_AMOUNT_MINOR = 1_234
REFUND_AMOUNT_MINOR_MAX = 500
_ALPHA = {numeric: alpha for alpha, numeric in CURRENCY_NUMERIC.items()}


@attrs.define
class Clearable:
    """An approved purchase as the clearing record needs it."""

    pan: str = attrs.field(repr=False)
    rrn: str
    amount: int  # field 4, transaction currency
    currency: str  # alpha
    billing_amount: int  # charged to the card's balance
    billing_currency: str  # alpha: the card's balance currency
    mcc: str
    merchant_name: str
    auth_code: str = ""


def clearable_of(message: dict[str, str], card: SimCard) -> Clearable:
    amount = int(message["4"])
    billing = int(message["6"]) if "6" in message else amount
    return Clearable(pan=card.pan, rrn=message["37"], amount=amount, currency=_ALPHA.get(message["49"], "EUR"),
                     billing_amount=billing, billing_currency=card.currency, mcc=message["18"],
                     merchant_name=message["43"][:25].rstrip())


@attrs.frozen
class ClearingFileCounts:
    records: int
    exact: int
    under: int
    over: int
    split: int
    forced: int
    refunds: int


class ClearingLog:
    """Approvals in answer order, keyed by RRN; reversals adjust or drop them."""

    def __init__(self, approvals_max: int = APPROVALS_MAX) -> None:
        assert approvals_max > 0
        self._approved: collections.OrderedDict[str, Clearable] = collections.OrderedDict()
        self._approvals_max = approvals_max
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._approved)

    def approved(self, clearable: Clearable, auth_code: str) -> None:
        if not auth_code:
            return
        if len(self._approved) >= self._approvals_max:
            self._approved.popitem(last=False)
            self.dropped += 1
        self._approved[clearable.rrn] = attrs.evolve(clearable, auth_code=auth_code)

    def reversed(self, rrn: str, remaining: int | None) -> None:
        """A reversal was approved: full (drop it) or partial (clear only what remains)."""
        found = self._approved.get(rrn)
        if found is None:
            return
        if not remaining:
            del self._approved[rrn]
            return
        billing = remaining * found.billing_amount // found.amount if found.amount else remaining
        self._approved[rrn] = attrs.evolve(found, amount=remaining, billing_amount=billing)

    def write(self, path: Path, *, rng: random.Random, force_post_card: SimCard | None = None) -> ClearingFileCounts:
        date = time.strftime("%Y-%m-%d", time.gmtime())
        lines: list[dict] = []
        counts = collections.Counter()
        for clearable in self._approved.values():
            for amount, billing in _presentments(clearable, rng, counts):
                lines.append(_record(f"C{len(lines) + 1:09d}", "purchase", clearable, amount, billing, date))
        if force_post_card is not None:
            tag = f"{rng.randrange(10**11):011d}"
            phantom = Clearable(pan=force_post_card.pan, rrn="9" + tag, amount=FORCE_POST_AMOUNT_MINOR,
                                currency=force_post_card.currency, billing_amount=FORCE_POST_AMOUNT_MINOR,
                                billing_currency=force_post_card.currency, mcc="5999", merchant_name="LATE PRESENTMENT")
            lines.append(_record(f"C{len(lines) + 1:09d}", "purchase", phantom, phantom.amount, phantom.amount, date))
            counts["forced"] += 1
        first = next(iter(self._approved.values()), None)
        if first is not None:
            refund = min(REFUND_AMOUNT_MINOR_MAX, first.billing_amount)
            lines.append(_record(f"C{len(lines) + 1:09d}", "refund", first, refund, refund, date))
            counts["refunds"] += 1
        _write_owner_only(path, "".join(json.dumps(line) + "\n" for line in lines))
        return ClearingFileCounts(records=len(lines), exact=counts["exact"], under=counts["under"],
                                  over=counts["over"], split=counts["split"], forced=counts["forced"],
                                  refunds=counts["refunds"])


def _write_owner_only(path: Path, text: str) -> None:
    """The file holds full PANs: mode 0600 like the cards file, whatever the umask or an older file
    at `path` said (O_CREAT's mode applies only to a new file, hence the fchmod)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(text)


def _presentments(clearable: Clearable, rng: random.Random, counts: collections.Counter) -> list[tuple[int, int]]:
    """(amount, billing amount) of each record that clears this approval."""
    amount, billing = clearable.amount, clearable.billing_amount
    draw = rng.random()
    if draw < UNDER_SHARE and billing >= 2:
        counts["under"] += 1
        return [(max(1, amount * UNDER_PERCENT // 100), max(1, billing * UNDER_PERCENT // 100))]
    if draw < UNDER_SHARE + OVER_SHARE:
        counts["over"] += 1
        return [(amount * OVER_PERCENT // 100 + 1, billing * OVER_PERCENT // 100 + 1)]
    if draw < UNDER_SHARE + OVER_SHARE + SPLIT_SHARE and billing >= 2 and amount >= 2:
        counts["split"] += 1
        first_billing = billing // 3 or 1
        first_amount = amount // 3 or 1
        return [(first_amount, first_billing), (amount - first_amount, billing - first_billing)]
    counts["exact"] += 1
    return [(amount, billing)]


def _record(record_id: str, kind: str, clearable: Clearable, amount: int, billing: int, date: str) -> dict:
    return {
        "recordId": record_id, "type": kind, "rrn": clearable.rrn, "authCode": clearable.auth_code,
        "pan": clearable.pan, "amount": amount, "currency": clearable.currency, "billingAmount": billing,
        "billingCurrency": clearable.billing_currency, "mcc": clearable.mcc,
        "merchantName": clearable.merchant_name, "date": date,
    }  # fmt: skip
