"""Spend controls: the `[limits]` hot-path step and the day/month window accounting behind it.

Controls exist per card and per user (`ControlsSpec`, set over REST by authsrv/rest/limits_api.py,
stored in SQLite, compiled into `Controls` and kept in the card index). Both apply: a debit must
pass the card's controls and then its user's, so the stricter one decides.

What is checked, in this order (the first rule that fails decides; docs/contract.md, response codes):

    57  blocked MCC (field 18; listed, or in a blocked MCC group), blocked country (field 43, last
        2 characters), a switched-off channel (below)
    61  per-transaction maximum, then the daily and the monthly amount limit
    65  daily and monthly count limits

Only debits of 0100/0200 are checked (processing codes 00, 01, 09). Credits (refunds, payments) and
balance inquiries are never limited, and advices (0120/0220) are never declined: the network
already approved them, so they only count. Amounts are what the balance is charged (`ctx.amount`,
in the balance's currency). A user's windows are kept per currency: amounts of different
currencies do not add up, so a user's limit applies to the user's spending in each currency.

Channels. ATM: processing code 01 (cash) or MCC 6011. The others come from field 22, POS entry mode
(ISO 8583:1987, 3 digits: PAN entry mode in the first two, PIN capability in the third):

    ecommerce    01 (manual key entry: mail/phone order), 10 (credential on file), 81 (e-commerce)
    contactless  07 (contactless chip), 91 (contactless magnetic stripe)
    magstripe    02 (magnetic stripe, unaltered content not guaranteed), 80 (chip fallback to
                 stripe), 90 (full magnetic stripe)
    (none)       05 chip, 00 unknown, and a missing field 22: no channel switch applies

Windows are UTC calendar days and months of the request's receipt time (`ctx.now_ns`). Usage is
counted from journal records (`SpendWindows.on_add`, called by AuthJournal.add for live records
and replayed ones alike): an approved debit that moved money (a hold or a posting) adds its amount
and one to the windows of its day and month (for an external-balance partner, the partner's
approval); a reversal gives back the amount it released to the
windows the original was counted in (if they are still current), and the count once the original
is fully reversed; a decline that replaces an approval (stand-in) takes the approval back. Clearing
and expiry do not change usage. The monthly windows outlive the journal's 24 h, so the card windows
are part of the journal snapshot (JournalImage.spend_windows); user windows are their sums per
(user, currency) and are rebuilt from the card windows when the switch starts (`attach`).
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import attrs
import msgspec

from authsrv.hotpath.context import DEBITS, AuthContext, Vote
from authsrv.hotpath.outcome import Outcome, is_approval

if TYPE_CHECKING:
    from authsrv.hotpath.journal import AuthRecord

NS_PER_DAY = 86_400 * 10**9
AMOUNT_LIMIT_MAX = 999_999_999_999  # field 4 holds 12 digits
COUNT_LIMIT_MAX = 1_000_000
BLOCKED_MCCS_MAX = 500
BLOCKED_COUNTRIES_MAX = 250  # ISO 3166-1 has 249 codes
WINDOWS_MAX = 50_000_000  # one per card at most (authsrv.store.index.CARDS_MAX), plus user windows
UNLIMITED = AMOUNT_LIMIT_MAX + 1  # larger than any amount or count, so checks need no None test
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()

# Named MCC groups (ISO 18245 / the card schemes' MCC lists). Small on purpose: a group is a
# convenience over `blockedMccs`, which can list any code.
MCC_GROUPS: dict[str, frozenset[str]] = {
    "gambling": frozenset({"7800", "7801", "7802", "7995", "9406"}),  # lotteries, betting, casinos
    "adult": frozenset({"5967", "7273"}),  # adult content (inbound teleservices), dating/escort
    "crypto": frozenset({"6051"}),  # quasi-cash: cryptocurrency, money orders, foreign currency
    "money_transfer": frozenset({"4829", "6540"}),  # wire transfers / money orders, stored-value loads
    "alcohol_tobacco": frozenset({"5921", "5993"}),  # package stores (beer, wine, liquor), tobacco
}
MccGroup = enum.StrEnum("MccGroup", {name: name for name in MCC_GROUPS})  # type: ignore[misc]


class Channel(enum.StrEnum):
    ecommerce = "ecommerce"
    atm = "atm"
    contactless = "contactless"
    magstripe = "magstripe"


# Field 22, first two digits -> channel (module docstring). ATM is decided by field 3 / field 18.
ENTRY_MODE_CHANNELS: dict[str, Channel] = {
    "01": Channel.ecommerce,
    "10": Channel.ecommerce,
    "81": Channel.ecommerce,
    "07": Channel.contactless,
    "91": Channel.contactless,
    "02": Channel.magstripe,
    "80": Channel.magstripe,
    "90": Channel.magstripe,
}
ATM_MCC = "6011"
CASH_PROCESSING = "01"

# -- the stored / REST format --------------------------------------------------------------------

AmountLimit = Annotated[int, msgspec.Meta(ge=0, le=AMOUNT_LIMIT_MAX, description="minor units")]
CountLimit = Annotated[int, msgspec.Meta(ge=0, le=COUNT_LIMIT_MAX)]
Mcc = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}$")]
Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")]


class WindowLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    amount: AmountLimit | None = None  # null: no limit
    count: CountLimit | None = None


class ChannelSwitches(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """true: allowed (the default), false: switched off."""

    ecommerce: bool = True
    atm: bool = True
    contactless: bool = True
    magstripe: bool = True


class ControlsSpec(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True, kw_only=True):
    """Spend controls of a card or a user, as PUT and stored (a missing field: no control)."""

    per_transaction: AmountLimit | None = None
    daily: WindowLimits = WindowLimits()
    monthly: WindowLimits = WindowLimits()
    blocked_mccs: Annotated[list[Mcc], msgspec.Meta(max_length=BLOCKED_MCCS_MAX)] = []
    blocked_mcc_groups: Annotated[list[MccGroup], msgspec.Meta(max_length=len(MCC_GROUPS))] = []
    blocked_countries: Annotated[list[Country], msgspec.Meta(max_length=BLOCKED_COUNTRIES_MAX)] = []
    channels: ChannelSwitches = ChannelSwitches()


_spec_decoder = msgspec.json.Decoder(ControlsSpec)
_spec_encoder = msgspec.json.Encoder()


def decode_spec(data: bytes | str) -> ControlsSpec:
    """A stored or received spec; msgspec.ValidationError/DecodeError names the bad field."""
    return _spec_decoder.decode(data)


def encode_spec(spec: ControlsSpec) -> str:
    return _spec_encoder.encode(spec).decode()


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value


@attrs.frozen
class Controls:
    """A spec compiled for the hot path: plain ints and frozensets, no None tests, groups expanded."""

    per_transaction: int
    daily_amount: int
    daily_count: int
    monthly_amount: int
    monthly_count: int
    blocked_mccs: frozenset[str]
    blocked_countries: frozenset[str]
    blocked_entry_modes: frozenset[str]  # field 22 first two digits of switched-off channels
    atm_blocked: bool
    spec: ControlsSpec  # what GET answers

    @classmethod
    def from_spec(cls, spec: ControlsSpec) -> Controls:
        mccs = set(spec.blocked_mccs)
        for group in spec.blocked_mcc_groups:
            mccs |= MCC_GROUPS[str(group)]
        off = {channel for channel in Channel if not getattr(spec.channels, channel.value)}
        return cls(
            per_transaction=_limit(spec.per_transaction),
            daily_amount=_limit(spec.daily.amount), daily_count=_limit(spec.daily.count),
            monthly_amount=_limit(spec.monthly.amount), monthly_count=_limit(spec.monthly.count),
            blocked_mccs=frozenset(mccs), blocked_countries=frozenset(spec.blocked_countries),
            blocked_entry_modes=frozenset(mode for mode, channel in ENTRY_MODE_CHANNELS.items() if channel in off),
            atm_blocked=Channel.atm in off, spec=spec,
        )  # fmt: skip

    @property
    def empty(self) -> bool:
        return self.spec == ControlsSpec()


# -- windows -------------------------------------------------------------------------------------


class Window:
    """Usage in one UTC day and one UTC month (the latest ones charged). Days count from 1970-01-01;
    months are year * 12 + month - 1."""

    __slots__ = ("day", "day_amount", "day_count", "month", "month_amount", "month_count")

    def __init__(self, day: int = -1, day_amount: int = 0, day_count: int = 0, month: int = -1,
                 month_amount: int = 0, month_count: int = 0) -> None:
        self.day, self.day_amount, self.day_count = day, day_amount, day_count
        self.month, self.month_amount, self.month_count = month, month_amount, month_count

    def charge(self, day: int, month: int, amount: int, count: int) -> None:
        """Add (or, negative, give back) usage of `day`/`month`. A window already past that day or
        month keeps its own: a give-back to a closed window changes nothing, and neither does a late
        record of an earlier day (the clock stepped back). Usage never goes below zero."""
        if day == self.day:
            self.day_amount += amount
            self.day_count += count
            if self.day_amount < 0 or self.day_count < 0:  # plain tests: max() costs ~80 ns a call
                self.day_amount, self.day_count = max(0, self.day_amount), max(0, self.day_count)
        elif day > self.day and amount > 0:
            self.day, self.day_amount, self.day_count = day, amount, count
        if month == self.month:
            self.month_amount += amount
            self.month_count += count
            if self.month_amount < 0 or self.month_count < 0:
                self.month_amount, self.month_count = max(0, self.month_amount), max(0, self.month_count)
        elif month > self.month and amount > 0:
            self.month, self.month_amount, self.month_count = month, amount, count

    def merge(self, other: Window) -> None:
        """Add another window's usage (user windows are the sums of their cards')."""
        if other.day == self.day:
            self.day_amount += other.day_amount
            self.day_count += other.day_count
        elif other.day > self.day:
            self.day, self.day_amount, self.day_count = other.day, other.day_amount, other.day_count
        if other.month == self.month:
            self.month_amount += other.month_amount
            self.month_count += other.month_count
        elif other.month > self.month:
            self.month, self.month_amount, self.month_count = other.month, other.month_amount, other.month_count

    def used(self, day: int, month: int) -> tuple[int, int, int, int]:
        """(day amount, day count, month amount, month count) as of `day`/`month`."""
        in_day = day == self.day
        in_month = month == self.month
        return (self.day_amount if in_day else 0, self.day_count if in_day else 0,
                self.month_amount if in_month else 0, self.month_count if in_month else 0)

    def row(self, key: int) -> tuple[int, int, int, int, int, int, int]:
        return (key, self.day, self.day_amount, self.day_count, self.month, self.month_amount, self.month_count)


_last_day, _last_month = -1, -1


def month_of_day(day: int) -> int:
    """UTC calendar month index of a day number; one-entry cache (the hot path asks for today)."""
    global _last_day, _last_month
    if day == _last_day:
        return _last_month
    date = datetime.date.fromordinal(day + _EPOCH_ORDINAL)
    month = date.year * 12 + date.month - 1
    _last_day, _last_month = day, month
    return month


_APPROVALS = frozenset(int(outcome) for outcome in Outcome if is_approval(outcome))
WindowRow = tuple[int, int, int, int, int, int, int]


def counts(record: AuthRecord) -> bool:
    """An approved debit that moved money (a hold, a posting, or the partner's external balance): what
    the windows count."""
    return (record.outcome in _APPROVALS and (record.user_hold_id != 0 or record.posted or record.external != 0)
            and not record.reverses and record.card_id != 0 and record.processing_code[:2] in DEBITS)


class SpendWindows:
    """Usage per card and per (user, currency), fed by every journal record (module docstring)."""

    def __init__(self) -> None:
        self._cards: dict[int, Window] = {}
        self._users: dict[tuple[int, str], Window] = {}
        self._owner: Callable[[int], tuple[int, str] | None] | None = None  # card id -> (user, currency)
        # card id -> its user's window: a card never changes owner or currency, so one lookup per
        # approval instead of an index read and a tuple key.
        self._user_by_card: dict[int, Window] = {}

    def __len__(self) -> int:
        return len(self._cards)

    def attach(self, owner: Callable[[int], tuple[int, str] | None]) -> None:
        """From now on keep user windows too; rebuild them from the card windows."""
        self._owner = owner
        self._users.clear()
        self._user_by_card.clear()
        for card_id, window in self._cards.items():
            user = self._user_window(card_id)
            if user is not None:
                user.merge(window)

    def card(self, card_id: int) -> Window | None:
        return self._cards.get(card_id)

    def user(self, user_id: int, currency: str) -> Window | None:
        return self._users.get((user_id, currency))

    def user_of_card(self, card_id: int) -> Window | None:
        """The window of the card's user in the card's currency (the hot path's read)."""
        found = self._user_by_card.get(card_id)
        return found if found is not None else self._user_window(card_id)

    def _user_window(self, card_id: int) -> Window | None:
        key = self._owner(card_id) if self._owner is not None else None
        if key is None:
            return None
        window = self._users.get(key)
        if window is None:
            assert len(self._users) < WINDOWS_MAX
            window = self._users[key] = Window()
        self._user_by_card[card_id] = window
        return window

    def on_add(self, record: AuthRecord, previous: AuthRecord | None, original: AuthRecord | None) -> None:
        """`record` is about to be journaled; `previous` is the record it replaces (same key) and
        `original` the record a reversal names, both as they were before this record."""
        if previous is not None and counts(previous):
            outstanding = previous.amount - previous.reversed_amount
            if outstanding > 0:
                self._charge(previous.card_id, previous.timestamp_ns, -outstanding, -1)
        if record.reverses:
            if original is not None and counts(original) and record.amount > 0 and record.outcome in _APPROVALS:
                fully = original.reversed_amount + record.amount >= original.amount
                self._charge(original.card_id, original.timestamp_ns, -record.amount, -1 if fully else 0)
        elif counts(record):
            self._charge(record.card_id, record.timestamp_ns, record.amount, 1)

    def _charge(self, card_id: int, timestamp_ns: int, amount: int, count: int) -> None:
        day = timestamp_ns // NS_PER_DAY
        month = month_of_day(day)
        window = self._cards.get(card_id)
        if window is None:
            if amount <= 0:
                return
            assert len(self._cards) < WINDOWS_MAX, "more card windows than cards"
            window = self._cards[card_id] = Window()
        window.charge(day, month, amount, count)
        if self._owner is not None:
            user = self._user_by_card.get(card_id) or self._user_window(card_id)
            if user is not None:
                user.charge(day, month, amount, count)

    def to_image(self, now_ns: int) -> list[WindowRow]:
        """Card windows of the current month (older ones are dropped here: they can never matter)."""
        month = month_of_day(now_ns // NS_PER_DAY)
        stale = [card_id for card_id, window in self._cards.items() if window.month < month]
        for card_id in stale:
            del self._cards[card_id]
        return [window.row(card_id) for card_id, window in self._cards.items()]

    def load_image(self, rows: list[WindowRow]) -> None:
        assert not self._cards, "load into empty windows only"
        for card_id, day, day_amount, day_count, month, month_amount, month_count in rows:
            assert card_id > 0 and day_amount >= 0 and month_amount >= 0 and day_count >= 0 and month_count >= 0
            self._cards[card_id] = Window(day, day_amount, day_count, month, month_amount, month_count)


# -- the hot-path participant --------------------------------------------------------------------


class CheckSpendControls:
    """The `[limits]` slot: card controls, then user controls (module docstring)."""

    name = "limits"

    def __init__(self, index, windows: SpendWindows) -> None:
        self._index = index  # authsrv.store.index.CardIndex: controls, kept current by the store
        # The index's controls maps are updated in place, never replaced: bind their lookups once.
        card_controls, user_controls = index.controls_maps()
        self._card_controls, self._user_controls = card_controls.get, user_controls.get
        self._windows = windows
        windows.attach(self._owner)

    def _owner(self, card_id: int) -> tuple[int, str] | None:
        card = self._index.card_by_id(card_id)
        return None if card is None else (card.customer_id, card.currency)

    def prepare(self, ctx: AuthContext) -> Vote:
        if ctx.processing not in DEBITS:
            return Vote.prepared
        card = ctx.card
        card_controls = self._card_controls(card.card_id)
        user_controls = self._user_controls(card.customer_id)
        if card_controls is None and user_controls is None:
            return Vote.prepared
        day = ctx.now_ns // NS_PER_DAY
        month = month_of_day(day)
        if card_controls is not None:
            refused = _check(card_controls, self._windows.card(card.card_id), ctx, day, month, "card")
            if refused is not None:
                return refused
        if user_controls is not None:
            refused = _check(user_controls, self._windows.user_of_card(card.card_id), ctx, day, month, "user")
            if refused is not None:
                return refused
        return Vote.prepared


def _check(controls: Controls, window: Window | None, ctx: AuthContext, day: int, month: int,
           scope: str) -> Vote | None:
    request = ctx.request
    if controls.blocked_mccs and request.mcc in controls.blocked_mccs:
        return ctx.decline(Outcome.not_permitted, f"{scope} blocks MCC {request.mcc}")
    if controls.blocked_countries and request.country in controls.blocked_countries:
        return ctx.decline(Outcome.not_permitted, f"{scope} blocks country {request.country}")
    if controls.blocked_entry_modes:
        entry = request.pos_entry_mode
        if entry is not None and entry[:2] in controls.blocked_entry_modes:
            return ctx.decline(Outcome.not_permitted, f"{scope} channel {ENTRY_MODE_CHANNELS[entry[:2]]} is off")
    if controls.atm_blocked and (ctx.processing == CASH_PROCESSING or request.mcc == ATM_MCC):
        return ctx.decline(Outcome.not_permitted, f"{scope} channel atm is off")
    amount = ctx.amount
    if amount > controls.per_transaction:
        return ctx.decline(Outcome.amount_limit_exceeded,
                           f"{scope} per-transaction limit {controls.per_transaction}: {amount}")
    if window is None:
        day_amount = day_count = month_amount = month_count = 0
    else:  # Window.used, inlined: this runs on every debit of a card with controls
        day_amount, day_count = (window.day_amount, window.day_count) if window.day == day else (0, 0)
        month_amount, month_count = (window.month_amount, window.month_count) if window.month == month else (0, 0)
    if day_amount + amount > controls.daily_amount:
        return ctx.decline(Outcome.amount_limit_exceeded,
                           f"{scope} daily amount limit {controls.daily_amount}: used {day_amount} + {amount}")
    if month_amount + amount > controls.monthly_amount:
        return ctx.decline(Outcome.amount_limit_exceeded,
                           f"{scope} monthly amount limit {controls.monthly_amount}: used {month_amount} + {amount}")
    if day_count >= controls.daily_count:
        return ctx.decline(Outcome.count_limit_exceeded, f"{scope} daily count limit {controls.daily_count}")
    if month_count >= controls.monthly_count:
        return ctx.decline(Outcome.count_limit_exceeded, f"{scope} monthly count limit {controls.monthly_count}")
    return None
