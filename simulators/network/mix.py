"""The traffic mix: which requests the simulated network sends, and what it expects back.

Each request kind knows its expected field 39 (docs/contract.md, response codes),
so the run reports a mismatch whenever the server answers something else. Kinds whose outcome
depends on earlier traffic keep just enough state here to stay exact:
- reversals only reverse approvals the server already sent (a bounded pool);
- wrong-PIN traffic goes to a reserved set of cards with at most one request in flight per card,
  so the server sees the attempts in the order the expectations assume. Half of those cards get
  three wrong PINs in a row and are then locked (75 afterwards), the other half alternate one
  wrong PIN with a correct one and never lock.

Hot cards (`HotCards`, off unless asked for): a realistic card population is not uniform. A few
cards (`fraction` of the file, at least one) are a merchant's favourite cards and receive `share` of
the purchase-type traffic (`HOT_KINDS`: purchases, cross-currency purchases, advices, refunds); the
rest of that traffic and every other kind go uniformly to the other cards. The hot cards are the
FIRST lines of the cards file, so whoever seeds can fund them: `simulators.network.target.
init_and_seed(hot=...)` seeds their users first with `funding_factor` times the normal balance, so a
hot card has the same headroom relative to its traffic as any other card and its expected codes
(00) hold for the whole run. They never carry wrong-PIN, wrong-CVC2, wrong-expiry or over-balance
traffic, so no counter or lock of theirs changes what a purchase expects.
"""

from __future__ import annotations

import bisect
import collections
import enum
import functools
import math
import random
import time

import attrs
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from simulators.network import cards as cards_module
from simulators.network.cards import SimCard
from simulators.network.clearing import Clearable, ClearingLog, clearable_of
from simulators.network.codec import Message
from simulators.network.pinblock import PIN_BLOCK_SIZE, clear_pin_block

AMOUNT_MINOR_MAX = 999_999_999_999  # 12 digits, field 4
REVERSAL_POOL_MAX = 10_000  # approvals remembered for later reversal
VICTIM_SHARE_DIVISOR = 50  # one card in 50 is reserved for wrong-PIN traffic
VICTIMS_MAX = 1_000
VICTIM_PICK_TRIES_MAX = 8
VICTIM_SPLIT_SEED = 8583  # which cards are PIN victims: fixed, so runs over one cards file agree
WRONG_PINS_TO_LOCK = 3  # docs/contract.md, wire profile: the third wrong PIN in a row locks (75)
CROSS_CURRENCY_RATE_PERCENT = 92  # billing = amount * 0.92, a fixed network-provided rate
STAN_MAX = 999_999
PIN_BLOCKS_MAX = 100_000  # encrypted PIN blocks remembered per (PIN, PAN)
RRN_TAG_DIGITS = 3
RRN_SEQUENCE_MAX = 999_999_999  # 9 digits after the run tag: 12 characters (field 37)
HOT_CARDS_FRACTION_DEFAULT = 0.01  # of the cards in the file (what the command line and the bench use)
HOT_SHARE_DEFAULT = 0.20  # of the purchase-type requests
HOT_CARDS_FRACTION_MAX = 0.5
HOT_SHARE_MAX = 0.9  # below 1: cold cards keep some purchases, and the funding factor stays finite
HOT_COLD_CARDS_MIN = 2  # left cold whatever the fraction: the other kinds (and a PIN victim) need them
HOT_FUNDING_HEADROOM = 2  # a hot balance is funded for twice its traffic relative to a cold balance

MERCHANTS = (  # (field 41 terminal, field 42 merchant, field 43 name/city/country, field 18 MCC)
    ("TERM0001", "MERCHANT0000001", "CORNER GROCERY", "BERLIN", "DE", "5411"),
    ("TERM0002", "MERCHANT0000002", "CAFE CENTRAL", "WIEN", "AT", "5812"),
    ("TERM0003", "MERCHANT0000003", "BOOKS AND MORE", "PARIS", "FR", "5942"),
    ("TERM0004", "MERCHANT0000004", "CITY TAXI", "MADRID", "ES", "4121"),
    ("TERM0005", "MERCHANT0000005", "ONLINE ELECTRONICS", "AMSTERDAM", "NL", "5732"),
)
ATM = ("ATM00001", "ATMOWNER0000001", "BANK ATM MAIN STREET", "WARSZAWA", "PL", "6011")


class Kind(enum.IntEnum):
    """Request kinds; reports use the names. An IntEnum because it keys hot-path tables."""

    purchase = 1
    cross_currency = 2
    atm = 3
    refund = 4
    reversal = 5
    reversal_partial = 6
    advice = 7
    balance_inquiry = 8
    unknown_card = 9
    wrong_cvc2 = 10
    wrong_pin = 11
    wrong_expiry = 12
    over_balance = 13
    pin_retry = 14  # the correct PIN after one wrong one: derived, not weighted
    echo = 15  # 0800 / 301, per connection on a timer: not weighted
    signon = 16  # 0800 / 001, once per connection: not weighted


MANAGEMENT_KINDS = frozenset({Kind.echo, Kind.signon})
# Card-present-at-a-merchant kinds a hot card receives its share of (module docstring).
HOT_KINDS = frozenset({Kind.purchase, Kind.cross_currency, Kind.advice, Kind.refund})

# Field 39 each kind expects when nothing else is known (docs/contract.md, response codes).
EXPECTED_CODES = {
    Kind.purchase: frozenset({"00"}),
    Kind.cross_currency: frozenset({"00"}),
    Kind.atm: frozenset({"00"}),
    Kind.refund: frozenset({"00"}),
    Kind.reversal: frozenset({"00"}),
    Kind.reversal_partial: frozenset({"00"}),
    Kind.advice: frozenset({"00"}),  # an advice cannot be declined
    Kind.balance_inquiry: frozenset({"00"}),
    Kind.unknown_card: frozenset({"14"}),
    Kind.wrong_cvc2: frozenset({"N7"}),
    Kind.wrong_pin: frozenset({"55", "75"}),  # each request narrows this to the one it expects
    Kind.wrong_expiry: frozenset({"54"}),
    Kind.over_balance: frozenset({"51"}),
    Kind.pin_retry: frozenset({"00"}),
    Kind.echo: frozenset({"00"}),
    Kind.signon: frozenset({"00"}),
}
assert set(EXPECTED_CODES) == set(Kind)


def _weight(default: float) -> float:
    return attrs.field(default=default, validator=attrs.validators.ge(0))


@attrs.frozen(kw_only=True)
class MixWeights:
    """Relative weights of the request kinds (the defaults sum to 100)."""

    purchase: float = _weight(59)
    cross_currency: float = _weight(5)
    atm: float = _weight(8)
    refund: float = _weight(3)
    reversal: float = _weight(4)
    reversal_partial: float = _weight(1)
    advice: float = _weight(3)
    balance_inquiry: float = _weight(3)
    unknown_card: float = _weight(3)
    wrong_cvc2: float = _weight(3)
    wrong_pin: float = _weight(3)
    wrong_expiry: float = _weight(2)
    over_balance: float = _weight(3)

    def __attrs_post_init__(self) -> None:
        if sum(attrs.astuple(self)) <= 0:
            raise ValueError("at least one request kind needs a positive weight")

    @classmethod
    def parse(cls, text: str) -> MixWeights:
        """`purchase=50,atm=10` overrides those defaults; unknown names are an error."""
        overrides = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in attrs.fields_dict(cls):
                raise ValueError(f"unknown request kind {name!r}")
            overrides[name] = float(value)
        return cls(**overrides)


def _fraction_max(bound: float):  # noqa: ANN202  (an attrs validator)
    def check(instance: object, attribute: attrs.Attribute, value: float) -> None:
        if not 0 <= value <= bound:
            raise ValueError(f"{attribute.name} must be in 0..{bound}, got {value}")

    return check


@attrs.frozen(kw_only=True)
class HotCards:
    """The hot-card model (module docstring). Both at 0 (the default): every card is picked uniformly."""

    fraction: float = attrs.field(default=0.0, converter=float, validator=_fraction_max(HOT_CARDS_FRACTION_MAX))
    share: float = attrs.field(default=0.0, converter=float, validator=_fraction_max(HOT_SHARE_MAX))

    @classmethod
    def default(cls) -> HotCards:
        return cls(fraction=HOT_CARDS_FRACTION_DEFAULT, share=HOT_SHARE_DEFAULT)

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 and self.share > 0

    def count(self, cards_total: int) -> int:
        """How many of `cards_total` cards are hot: the first ones of the file, at least one when
        enabled, and never so many that fewer than HOT_COLD_CARDS_MIN stay cold (then none)."""
        assert cards_total >= 0
        if not self.enabled or cards_total < HOT_COLD_CARDS_MIN + 1:
            return 0
        return min(cards_total - HOT_COLD_CARDS_MIN, max(1, int(cards_total * self.fraction)))

    def funding_factor(self, cards_total: int) -> int:
        """How many times a normal balance a hot card's balance needs for the same headroom.

        A hot card gets share / hot of the purchase-type requests, a cold one at most (1 - share) /
        cold (plus the other kinds, which only makes the cold card's traffic larger): the factor is
        that ratio, rounded up, times HOT_FUNDING_HEADROOM. Per balance it is the same ratio, since a
        user's cards are all hot or (but for the last hot user) all cold."""
        hot = self.count(cards_total)
        if hot == 0:
            return 1
        cold = cards_total - hot
        ratio = self.share * cold / ((1.0 - self.share) * hot)
        factor = max(1, math.ceil(HOT_FUNDING_HEADROOM * ratio))
        assert factor >= 1
        return factor


@attrs.frozen
class Approved:
    """What a reversal needs to know about an approval it reverses (field 90, docs/contract.md, wire profile)."""

    mti: str
    processing_code: str
    pan: str = attrs.field(repr=False)
    amount_minor: int
    currency_numeric: str
    stan: str
    transmission: str  # field 7
    rrn: str
    merchant: tuple[str, ...]


@attrs.define
class PinVictim:
    card: SimCard
    locks: bool  # True: three wrong PINs in a row, then locked; False: wrong, right, wrong, ...
    wrong_in_row: int = 0
    in_flight: bool = False
    uncertain: bool = False  # a request was lost: the server's count is unknown from here on


@attrs.frozen
class Request:
    kind: Kind
    message: Message = attrs.field(repr=False)
    expected: frozenset[str] | None  # field 39 values accepted; None: no expectation
    response_mti: str
    reversible: Approved | None = None  # pooled for a later reversal once approved
    victim: PinVictim | None = None
    clearable: Clearable | None = None  # goes into the clearing file once approved


@attrs.frozen(kw_only=True)
class Amounts:
    purchase_minor_min: int = 100
    purchase_minor_max: int = 5_000
    atm_minor_choices: tuple[int, ...] = (2_000, 5_000, 10_000)
    # Far above any seeded balance, so the expected code is 51 (insufficient funds).
    over_balance_minor: int = 1_000_000_000

    def __attrs_post_init__(self) -> None:
        assert 0 < self.purchase_minor_min <= self.purchase_minor_max <= AMOUNT_MINOR_MAX
        assert all(0 < amount <= AMOUNT_MINOR_MAX for amount in self.atm_minor_choices)
        assert 0 < self.over_balance_minor <= AMOUNT_MINOR_MAX


def response_mti(mti: str) -> str:
    """0100 -> 0110, 0120 -> 0130, 0400 -> 0410, 0800 -> 0810 (ISO 8583:1987 message function)."""
    return mti[:2] + str(int(mti[2]) + 1) + mti[3]


class _Clock:
    """Fields 7, 12, 13 (UTC), recomputed once a second because strftime is not free."""

    def __init__(self) -> None:
        self._second = -1
        self.transmission = self.local_time = self.local_date = ""

    def refresh(self) -> None:
        second = int(time.time())
        if second != self._second:
            self._second = second
            now = time.gmtime(second)
            self.transmission = time.strftime("%m%d%H%M%S", now)
            self.local_time = time.strftime("%H%M%S", now)
            self.local_date = time.strftime("%m%d", now)


class RequestFactory:
    """Builds one request at a time; keeps the reversal pool and the wrong-PIN card states."""

    def __init__(
        self,
        cards: tuple[SimCard, ...],
        *,
        weights: MixWeights,
        rng: random.Random,
        zpk: bytes,
        amounts: Amounts,
        acquirer_id: str,
        rrn_tag: str,
        clearing: ClearingLog | None = None,
        hot: HotCards = HotCards(),  # noqa: B008  (frozen: one shared default is safe)
        victims_reused: bool = False,
    ) -> None:
        assert cards, "no cards"
        assert len(rrn_tag) == RRN_TAG_DIGITS and rrn_tag.isdigit()
        assert acquirer_id.isdigit() and 1 <= len(acquirer_id) <= 11  # field 32, LL n..11
        self._rng = rng
        self._clearing = clearing
        self._amounts = amounts
        self._acquirer_id = acquirer_id
        self._rrn_tag = rrn_tag
        self._rrn_sequence = 0
        self._clock = _Clock()
        self._known_pans = frozenset(card.pan for card in cards)
        self._pool: collections.deque[Approved] = collections.deque(maxlen=REVERSAL_POOL_MAX)
        # The hot cards are the file's first ones (the seeding funded those); with none, nothing
        # below draws from the rng for them, so a run without hot cards is the uniform run it was.
        hot_count = hot.count(len(cards))
        self._hot = cards[:hot_count]
        self._hot_share = hot.share if hot_count else 0.0
        # The same victims in every run over these cards (not drawn from the run's rng): a card one
        # run locked with wrong PINs must never get another run's normal traffic (00 -> 75).
        self._normal, self._victims = _split_victims(cards[hot_count:], random.Random(VICTIM_SPLIT_SEED),
                                                     weights.wrong_pin > 0, reused=victims_reused)  # fmt: skip
        assert self._normal, "no card left for the normal traffic"
        self._kinds = [Kind[name] for name in attrs.fields_dict(MixWeights)]
        cumulative, total = [], 0.0
        for value in attrs.astuple(weights):
            total += value
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = cumulative[-1] + 0.0
        self._pin_blocks = _PinBlocks(zpk)
        self._builders = {
            Kind.purchase: self._purchase,
            Kind.cross_currency: self._cross_currency,
            Kind.atm: self._atm,
            Kind.refund: self._refund,
            Kind.reversal: self._reversal,
            Kind.reversal_partial: self._reversal,
            Kind.advice: self._advice,
            Kind.balance_inquiry: self._balance_inquiry,
            Kind.unknown_card: self._unknown_card,
            Kind.wrong_cvc2: self._wrong_cvc2,
            Kind.wrong_pin: self._wrong_pin,
            Kind.wrong_expiry: self._wrong_expiry,
            Kind.over_balance: self._over_balance,
        }

    @staticmethod
    def expected_codes(kind: Kind) -> frozenset[str]:
        return EXPECTED_CODES[kind]

    @property
    def hot_cards(self) -> tuple[SimCard, ...]:
        return self._hot

    @property
    def reversal_pool_size(self) -> int:
        return len(self._pool)

    def next_request(self, stan: str) -> Request:
        # What random.choices(kinds, cum_weights=...) does, without its per-call list and checks.
        index = bisect.bisect(self._cumulative, self._rng.random() * self._total, 0, len(self._kinds) - 1)
        kind = self._kinds[index]
        return self.build(kind, stan)

    def build(self, kind: Kind, stan: str) -> Request:
        assert kind in self._builders, kind
        self._clock.refresh()
        return self._builders[kind](kind, stan)

    def management(self, kind: Kind, stan: str) -> Request:
        """0800 sign-on (001) or echo (301): fields 7, 11, 70 (docs/contract.md, wire profile)."""
        assert kind in MANAGEMENT_KINDS
        self._clock.refresh()
        code = "001" if kind is Kind.signon else "301"
        message = {"t": "0800", "7": self._clock.transmission, "11": stan, "70": code}
        return Request(kind, message, EXPECTED_CODES[kind], "0810")

    def on_answer(self, request: Request, code: str, auth_code: str = "") -> None:
        """Learn from a matched response (pool approvals, advance wrong-PIN states, note what clears)."""
        if request.reversible is not None and code == "00":
            self._pool.append(request.reversible)
        if self._clearing is not None and code == "00":
            if request.clearable is not None:
                self._clearing.approved(request.clearable, auth_code)
            elif request.kind in (Kind.reversal, Kind.reversal_partial):
                remaining = request.message.get("95", "")[:12]
                self._clearing.reversed(request.message["37"], int(remaining) if remaining else None)
        victim = request.victim
        if victim is not None:
            victim.in_flight = False
            if request.kind is Kind.pin_retry and code == "00":
                victim.wrong_in_row = 0
            elif request.kind is Kind.wrong_pin and code == "00":
                victim.uncertain = True  # a PVV collision reset the server's count: expect anything after

    def on_lost(self, request: Request) -> None:
        """A request timed out or its connection broke: the server may or may not have seen it."""
        victim = request.victim
        if victim is not None:
            victim.in_flight = False
            victim.uncertain = True

    # -- builders: one per kind ---------------------------------------------------------------

    def _purchase(self, kind: Kind, stan: str) -> Request:
        card = self._spender()
        merchant = self._pick(MERCHANTS)
        message = self._base("0100", "000000", self._purchase_amount(), card.currency_numeric, stan, merchant)
        self._card_fields(message, card.pan, card.expiry, card.cvc2)
        reversible = self._approved(message, card.pan, merchant)
        return Request(kind, message, EXPECTED_CODES[kind], "0110", reversible=reversible,
                       clearable=self._clearable(message, card))

    def _cross_currency(self, kind: Kind, stan: str) -> Request:
        card = self._spender()
        foreign = "978" if card.currency_numeric == "840" else "840"
        amount = self._purchase_amount()
        message = self._base("0100", "000000", amount, foreign, stan, self._merchant())
        self._card_fields(message, card.pan, card.expiry, card.cvc2)
        message["6"] = f"{max(1, amount * CROSS_CURRENCY_RATE_PERCENT // 100):012d}"
        message["51"] = card.currency_numeric
        return Request(kind, message, EXPECTED_CODES[kind], "0110", clearable=self._clearable(message, card))

    def _atm(self, kind: Kind, stan: str, card: SimCard | None = None, pin: str | None = None) -> Request:
        card = card or self._pick(self._normal)
        amount = self._rng.choice(self._amounts.atm_minor_choices)
        message = self._base("0200", "010000", amount, card.currency_numeric, stan, ATM)
        # An ATM reads the chip or stripe: track 2 replaces fields 2 and 14 (docs/contract.md, wire profile).
        message["35"] = f"{card.pan}={card.expiry}2010000000000"
        message["22"] = "051"
        message["52"] = self._pin_blocks.field_52(pin or card.pin, card.pan)
        reversible = self._approved(message, card.pan, ATM) if pin is None else None
        return Request(kind, message, EXPECTED_CODES[kind], "0210", reversible=reversible)

    def _refund(self, kind: Kind, stan: str) -> Request:
        card = self._spender()
        mti = self._rng.choice(("0100", "0200"))
        message = self._base(mti, "200000", self._purchase_amount(), card.currency_numeric, stan, self._merchant())
        self._card_fields(message, card.pan, card.expiry, None)
        return Request(kind, message, EXPECTED_CODES[kind], response_mti(mti))

    def _advice(self, kind: Kind, stan: str) -> Request:
        card = self._spender()
        message = self._base("0120", "000000", self._purchase_amount(), card.currency_numeric, stan, self._merchant())
        self._card_fields(message, card.pan, card.expiry, None)
        # An advice reports a stand-in approval: it cannot be declined (docs/contract.md, wire profile).
        return Request(kind, message, EXPECTED_CODES[kind], "0130", clearable=self._clearable(message, card))

    def _balance_inquiry(self, kind: Kind, stan: str) -> Request:
        card = self._pick(self._normal)
        message = self._base("0100", "300000", 0, card.currency_numeric, stan, self._merchant())
        self._card_fields(message, card.pan, card.expiry, card.cvc2)
        return Request(kind, message, EXPECTED_CODES[kind], "0110")

    def _unknown_card(self, kind: Kind, stan: str) -> Request:
        pan = cards_module.unknown_pan(self._rng, self._known_pans)
        expiry = f"{self._rng.randint(28, 32):02d}{self._rng.randint(1, 12):02d}"
        message = self._base("0100", "000000", self._purchase_amount(), "978", stan, self._merchant())
        self._card_fields(message, pan, expiry, f"{self._rng.randint(0, 999):03d}")
        return Request(kind, message, EXPECTED_CODES[kind], "0110")

    def _wrong_cvc2(self, kind: Kind, stan: str) -> Request:
        card = self._pick(self._normal)
        wrong = f"{(int(card.cvc2) + self._rng.randint(1, 999)) % 1000:03d}"
        message = self._base("0100", "000000", self._purchase_amount(), card.currency_numeric, stan, self._merchant())
        self._card_fields(message, card.pan, card.expiry, wrong)
        return Request(kind, message, EXPECTED_CODES[kind], "0110")

    def _wrong_expiry(self, kind: Kind, stan: str) -> Request:
        card = self._pick(self._normal)
        # A year later than the real expiry: not expired, just not this card's date.
        wrong = f"{(int(card.expiry[:2]) + 1) % 100:02d}{card.expiry[2:]}"
        message = self._base("0100", "000000", self._purchase_amount(), card.currency_numeric, stan, self._merchant())
        self._card_fields(message, card.pan, wrong, card.cvc2)
        return Request(kind, message, EXPECTED_CODES[kind], "0110")

    def _over_balance(self, kind: Kind, stan: str) -> Request:
        card = self._pick(self._normal)
        amount = self._amounts.over_balance_minor
        message = self._base("0100", "000000", amount, card.currency_numeric, stan, self._merchant())
        self._card_fields(message, card.pan, card.expiry, card.cvc2)
        return Request(kind, message, EXPECTED_CODES[kind], "0110")

    def _reversal(self, kind: Kind, stan: str) -> Request:
        if not self._pool:  # nothing approved yet to reverse: send a purchase instead
            return self._purchase(Kind.purchase, stan)
        original = self._pool.popleft()
        message = self._base(
            "0400", original.processing_code, original.amount_minor, original.currency_numeric, stan, original.merchant
        )
        message["2"] = original.pan
        message["37"] = original.rrn  # a reversal carries the original's RRN
        message["90"] = original.mti + original.stan + original.transmission + self._acquirer_id.zfill(11) + "0" * 11
        if kind is Kind.reversal_partial and original.amount_minor >= 2:
            remaining = original.amount_minor // 2
            message["95"] = f"{remaining:012d}" + "0" * 30
        else:
            kind = Kind.reversal
        return Request(kind, message, EXPECTED_CODES[kind], "0410")

    def _wrong_pin(self, kind: Kind, stan: str) -> Request:
        victim = self._pick_victim()
        if victim is None:  # no reserved card is free: keep the rate, send a normal withdrawal
            return self._atm(Kind.atm, stan)
        card = victim.card
        retry = not victim.locks and victim.wrong_in_row >= 1
        if retry:
            request = self._atm(Kind.pin_retry, stan, card, card.pin)
            expected = frozenset({"00"})
        else:
            wrong = f"{(int(card.pin) + self._rng.randint(1, 9)) % 10 ** len(card.pin):0{len(card.pin)}d}"
            request = self._atm(Kind.wrong_pin, stan, card, wrong)
            # Attempts one and two: 55; the third in a row locks the card; 75 ever after. Until the
            # lock, 00 is also right: the Visa PVV keeps 4 digits, so about 1 wrong PIN in 10,000
            # verifies (the simulator cannot know which without the issuer's PVK).
            expected = frozenset({"75"} if victim.wrong_in_row >= WRONG_PINS_TO_LOCK - 1 else {"55"})
            if victim.wrong_in_row < WRONG_PINS_TO_LOCK:
                expected |= {"00"}
            victim.wrong_in_row += 1
        if victim.uncertain:
            expected = frozenset({"00", "55", "75"})
        victim.in_flight = True
        return attrs.evolve(request, expected=expected, victim=victim)

    # -- helpers ------------------------------------------------------------------------------

    def _spender(self) -> SimCard:
        """The card of a purchase-type request: a hot one with probability `share`, else any cold one."""
        if self._hot_share and self._rng.random() < self._hot_share:
            return self._pick(self._hot)
        return self._pick(self._normal)

    def _pick_victim(self) -> PinVictim | None:
        if not self._victims:  # wrong_pin weighted 0 at construction: no cards were reserved
            return None
        for _ in range(VICTIM_PICK_TRIES_MAX):
            victim = self._rng.choice(self._victims)
            if not victim.in_flight:
                return victim
        return None

    def _clearable(self, message: Message, card: SimCard) -> Clearable | None:
        return clearable_of(message, card) if self._clearing is not None else None

    def _purchase_amount(self) -> int:
        return self._rng.randint(self._amounts.purchase_minor_min, self._amounts.purchase_minor_max)

    def _next_rrn(self) -> str:
        self._rrn_sequence += 1
        assert self._rrn_sequence <= RRN_SEQUENCE_MAX, "RRN space of this run exhausted"
        return f"{self._rrn_tag}{self._rrn_sequence:09d}"

    def _merchant(self) -> tuple[str, ...]:
        return self._pick(MERCHANTS)

    def _base(
        self, mti: str, processing_code: str, amount: int, currency: str, stan: str, merchant: tuple[str, ...]
    ) -> Message:
        assert 0 <= amount <= AMOUNT_MINOR_MAX
        terminal, merchant_id, name, city, country, mcc = merchant
        clock = self._clock
        return {
            "t": mti,
            "3": processing_code,
            "4": f"{amount:012d}",
            "7": clock.transmission,
            "11": stan,
            "12": clock.local_time,
            "13": clock.local_date,
            "18": mcc,
            "22": "810",  # e-commerce; the ATM builder overrides it
            "32": self._acquirer_id,
            "37": self._next_rrn(),
            "41": terminal,
            "42": merchant_id,
            "43": _location(name, city, country),
            "49": currency,
        }

    @staticmethod
    def _card_fields(message: Message, pan: str, expiry: str, cvc2: str | None) -> None:
        message["2"] = pan
        message["14"] = expiry
        if cvc2 is not None:
            message["48"] = "92" + "03" + cvc2  # subelement 92, length 03, the CVC2

    def _pick(self, choices: tuple | list):  # noqa: ANN202  (any element type)
        # Like Random.choice, from one random() call: its bias, under len / 2**53, does not show.
        return choices[int(self._rng.random() * len(choices))]

    def _approved(self, message: Message, pan: str, merchant: tuple[str, ...]) -> Approved:
        return Approved(
            mti=message["t"],
            processing_code=message["3"],
            pan=pan,
            amount_minor=int(message["4"]),
            currency_numeric=message["49"],
            stan=message["11"],
            transmission=message["7"],
            rrn=message["37"],
            merchant=merchant,  # the tuple `_base` took: field 43 holds it whole (see _fits_field_43)
        )


@functools.lru_cache(maxsize=64)
def _location(name: str, city: str, country: str) -> str:
    """Field 43: name (25), city (13), country (2), padded; a few merchants, so cached."""
    return f"{name:<25.25}{city:<13.13}{country}"


def _fits_field_43(merchant: tuple[str, ...]) -> bool:
    """A reversal copies `Approved.merchant` back into `_base`: field 43 must not cut it."""
    _, _, name, city, _, _ = merchant
    return len(name) <= 25 and len(city) <= 13 and name == name.rstrip() and city == city.rstrip()


assert all(_fits_field_43(merchant) for merchant in (*MERCHANTS, ATM))


class _PinBlocks:
    """Field 52 per (PIN, PAN) under one ZPK: one 3DES-ECB encryptor for the run (ECB keeps no
    state between blocks) and a bounded memo, since the same card sends the same block."""

    def __init__(self, zpk: bytes) -> None:
        assert len(zpk) in (16, 24), "ZPK must be a double- or triple-length DES key"
        key = zpk + zpk[:8] if len(zpk) == 16 else zpk  # K1 K2 -> K1 K2 K1, as pinblock does
        self._encryptor = Cipher(TripleDES(key), modes.ECB()).encryptor()
        self._memo: dict[tuple[str, str], str] = {}

    def field_52(self, pin: str, pan: str) -> str:
        value = self._memo.get((pin, pan))
        if value is None:
            block = self._encryptor.update(clear_pin_block(pin, pan))
            assert len(block) == PIN_BLOCK_SIZE
            value = block.hex().upper()
            if len(self._memo) < PIN_BLOCKS_MAX:
                self._memo[(pin, pan)] = value
        return value


def _split_victims(
    cards: tuple[SimCard, ...], rng: random.Random, wanted: bool, *, reused: bool = False
) -> tuple[tuple[SimCard, ...], tuple[PinVictim, ...]]:
    """Reserve a few cards for wrong-PIN traffic so no other request changes their PIN counters.
    `reused`: an earlier run against the same server already moved their counters (unknown here)."""
    if not wanted:
        return cards, ()
    if len(cards) < 2:
        raise ValueError("wrong-PIN traffic needs at least 2 cards (one is reserved for it)")
    count = max(1, min(VICTIMS_MAX, len(cards) // VICTIM_SHARE_DIVISOR))
    shuffled = list(cards)
    rng.shuffle(shuffled)
    victims = tuple(PinVictim(card, locks=index % 2 == 0, uncertain=reused) for index, card in enumerate(shuffled[:count]))
    return tuple(shuffled[count:]), victims
