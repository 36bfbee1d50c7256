"""Spend controls (authsrv/hotpath/limits.py): every control kind on the participant directly, with
injected receipt times (window rollover at midnight and month end), the window accounting fed by
journal records (reversals, stand-in replacements, snapshots), and the whole path on real loopback
sockets: REST PUT, then ISO 8583 declines 57 / 61 / 65 on the very next message."""

from __future__ import annotations

import calendar
import itertools
import time

import httpx
import msgspec
import pytest
import trio

from authsrv.hotpath.context import AuthContext, Kind, Vote
from authsrv.hotpath.journal import AuthJournal, AuthRecord
from authsrv.hotpath.limits import (
    MCC_GROUPS,
    CheckSpendControls,
    Controls,
    ControlsSpec,
    SpendWindows,
    Window,
    decode_spec,
    month_of_day,
)
from authsrv.hotpath.outcome import Outcome
from authsrv.iso.request import parse_request
from authsrv.store.index import CardIndex, CardState, CardStatus
from tests.conftest import start_in_process
from tests.isoclient import IsoClient, auth, reversal_of
from tests.restclient import admin_login, assert_problem, bearer, create_customer, customer_login, https

CARD_ID, OTHER_CARD_ID, USER_ID = 7, 8, 70
_keys = itertools.count(1)


def utc_ns(text: str) -> int:
    """'2025-01-31 23:59:59' (UTC) -> ns since 1970."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S")) * 10**9


def card_state(card_id: int = CARD_ID, user_id: int = USER_ID, currency: str = "EUR") -> CardState:
    return CardState(card_id, user_id, 1, "demo", "cfg", "virtual", "535522", "0001", "2912", CardStatus.active,
                     0, 0, "", currency, 100 + card_id)


class Harness:
    """A card index, a journal (whose windows the participant reads) and the participant."""

    def __init__(self) -> None:
        self.index = CardIndex()
        self.cards = {card_id: card_state(card_id) for card_id in (CARD_ID, OTHER_CARD_ID)}
        for card_id, state in self.cards.items():
            self.index.put_card(state, bytes([card_id]) * 16)
        self.journal = AuthJournal(retention_ns=40 * 86_400 * 10**9)
        self.step = CheckSpendControls(self.index, self.journal.windows)

    def controls(self, scope: str = "card", owner_id: int = CARD_ID, **spec) -> None:
        self.index.put_controls(scope, owner_id, Controls.from_spec(msgspec.convert(spec, ControlsSpec)))

    def context(self, at: str, amount: int = 1000, *, card_id: int = CARD_ID, processing: str = "000000",
                kind: Kind = Kind.authorization, **fields) -> AuthContext:
        request = parse_request(auth({"pan": "5355220000000001", "expiry": "2912"}, processing=processing,
                                     amount=amount, **fields))
        return AuthContext(request=request, kind=kind, received_ns=0, deadline_ns=10**18, now_ns=utc_ns(at),
                           key=f"k{next(_keys)}", original_key="o", processing=processing[:2],
                           card=self.cards[card_id], amount=amount, currency="EUR")

    def check(self, at: str, amount: int = 1000, **fields) -> Outcome | None:
        ctx = self.context(at, amount, **fields)
        vote = self.step.prepare(ctx)
        assert (vote is Vote.aborted) == (ctx.outcome is not None), (vote, ctx.outcome)
        assert vote in (Vote.prepared, Vote.aborted)
        return ctx.outcome

    def approve(self, at: str, amount: int, *, card_id: int = CARD_ID, processing: str = "000000",
                hold: bool = True, mti: str = "0100") -> AuthRecord:
        key = f"a{next(_keys)}"
        record = AuthRecord(key=key, original_key=f"o{key}", timestamp_ns=utc_ns(at), mti=mti,
                            processing_code=processing, outcome=int(Outcome.approved), response_code="00",
                            card_id=card_id, amount=amount, currency="EUR", user_hold_id=next(_keys) if hold else 0,
                            posted=not hold, request_amount=amount, request_currency="EUR")
        self.journal.add(record)
        return record

    def reverse(self, original: AuthRecord, at: str, released: int) -> None:
        self.journal.add(AuthRecord(key=f"r{next(_keys)}", original_key="x", timestamp_ns=utc_ns(at), mti="0400",
                                    processing_code=original.processing_code, outcome=int(Outcome.approved),
                                    response_code="00", amount=released, currency="EUR", reverses=original.key))

    def used(self, at: str, card_id: int = CARD_ID) -> tuple[int, int, int, int]:
        window = self.journal.windows.card(card_id)
        day = utc_ns(at) // (86_400 * 10**9)
        return window.used(day, month_of_day(day)) if window else (0, 0, 0, 0)


NOON = "2025-03-14 12:00:00"


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- every control kind ---------------------------------------------------------------------------


def test_no_controls_passes_and_costs_nothing(h):
    assert h.check(NOON, 10**9) is None


def test_per_transaction_maximum(h):
    h.controls(perTransaction=5000)
    assert h.check(NOON, 5000) is None
    assert h.check(NOON, 5001) is Outcome.amount_limit_exceeded  # 61


def test_daily_amount_limit(h):
    h.controls(daily={"amount": 10_000})
    h.approve("2025-03-14 08:00:00", 6000)
    assert h.check(NOON, 4000) is None
    assert h.check(NOON, 4001) is Outcome.amount_limit_exceeded
    assert h.check("2025-03-15 00:00:00", 10_000) is None  # the next UTC day starts at zero


def test_monthly_amount_limit(h):
    h.controls(monthly={"amount": 20_000})
    h.approve("2025-03-01 00:00:00", 15_000)
    h.approve("2025-02-28 23:59:59", 15_000)  # the previous month: not counted in March
    assert h.check("2025-03-31 23:59:59", 5000) is None
    assert h.check("2025-03-31 23:59:59", 5001) is Outcome.amount_limit_exceeded
    assert h.check("2025-04-01 00:00:00", 20_000) is None


def test_daily_count_limit(h):
    h.controls(daily={"count": 2})
    h.approve("2025-03-14 01:00:00", 1)
    assert h.check(NOON) is None
    h.approve("2025-03-14 02:00:00", 1)
    assert h.check(NOON) is Outcome.count_limit_exceeded  # 65


def test_monthly_count_limit(h):
    h.controls(monthly={"count": 3})
    for day in (1, 5, 9):
        h.approve(f"2025-03-{day:02d} 10:00:00", 100)
    assert h.check(NOON) is Outcome.count_limit_exceeded
    assert h.check("2025-04-01 00:00:01") is None


def test_zero_limit_blocks_every_debit(h):
    h.controls(daily={"amount": 0})
    assert h.check(NOON, 1) is Outcome.amount_limit_exceeded


def test_amount_is_checked_before_count(h):
    h.controls(daily={"amount": 100, "count": 0})
    assert h.check(NOON, 101) is Outcome.amount_limit_exceeded
    assert h.check(NOON, 100) is Outcome.count_limit_exceeded


def test_blocked_mcc(h):
    h.controls(blockedMccs=["5411"])
    assert h.check(NOON, mcc="5411") is Outcome.not_permitted  # 57
    assert h.check(NOON, mcc="5412") is None


@pytest.mark.parametrize("group", sorted(MCC_GROUPS))
def test_blocked_mcc_group(h, group):
    h.controls(blockedMccGroups=[group])
    for mcc in MCC_GROUPS[group]:
        assert h.check(NOON, mcc=mcc) is Outcome.not_permitted, mcc
    assert h.check(NOON, mcc="5411") is None


def test_gambling_group_is_the_documented_table():
    assert {"7800", "7801", "7802", "7995"} <= MCC_GROUPS["gambling"]
    assert "5967" in MCC_GROUPS["adult"] and "6051" in MCC_GROUPS["crypto"]


def test_blocked_country_from_field_43(h):
    h.controls(blockedCountries=["RU"])
    assert h.check(NOON, **{"43": "SOME SHOP                MOSCOW       RU"}) is Outcome.not_permitted
    assert h.check(NOON, **{"43": "FROGSHOP LUBLIN                       PL"}) is None


@pytest.mark.parametrize("channel, entry_modes, others", [
    ("ecommerce", ("810", "012", "100"), ("051", "071", "901")),
    ("contactless", ("071", "911"), ("051", "810", "021")),
    ("magstripe", ("021", "901", "801"), ("051", "071", "810")),
])
def test_channel_switch_by_pos_entry_mode(h, channel, entry_modes, others):
    h.controls(channels={channel: False})
    for mode in entry_modes:
        assert h.check(NOON, **{"22": mode}) is Outcome.not_permitted, mode
    for mode in others:
        assert h.check(NOON, **{"22": mode}) is None, mode


def test_atm_switch_by_processing_code_and_mcc(h):
    h.controls(channels={"atm": False})
    assert h.check(NOON, processing="010000", mcc="6011") is Outcome.not_permitted
    assert h.check(NOON, processing="010000", mcc="6010") is Outcome.not_permitted  # cash at a bank counter
    assert h.check(NOON, mcc="6011") is Outcome.not_permitted
    assert h.check(NOON, mcc="5411") is None


def test_credits_and_inquiries_are_never_limited(h):
    h.controls(perTransaction=1, blockedMccs=["5411"], channels={"ecommerce": False})
    assert h.check(NOON, 10**6, processing="200000", **{"22": "810"}) is None  # refund
    assert h.check(NOON, 10**6, processing="280000") is None  # payment
    assert h.check(NOON, 0, processing="300000") is None  # balance inquiry


def test_cause_is_recorded_without_card_data(h):
    h.controls(daily={"amount": 100})
    ctx = h.context(NOON, 500)
    assert h.step.prepare(ctx) is Vote.aborted
    assert ctx.cause == "card daily amount limit 100: used 0 + 500"
    assert "5355220000000001" not in ctx.cause


# -- windows ----------------------------------------------------------------------------------------


def test_day_rollover_at_midnight_utc(h):
    h.controls(daily={"amount": 1000, "count": 1})
    h.approve("2025-03-14 23:59:59", 1000)
    assert h.check("2025-03-14 23:59:59", 1) is Outcome.amount_limit_exceeded
    assert h.check("2025-03-15 00:00:01", 1000) is None
    assert h.used("2025-03-15 00:00:01") == (0, 0, 1000, 1)  # same month


def test_month_end_rollover(h):
    h.controls(monthly={"amount": 1000})
    h.approve("2025-01-31 23:59:59", 1000)
    assert h.check("2025-01-31 23:59:59", 1) is Outcome.amount_limit_exceeded
    assert h.check("2025-02-01 00:00:01", 1000) is None
    assert h.used("2025-02-01 00:00:01") == (0, 0, 0, 0)
    h.approve("2024-02-29 23:59:59", 1)  # leap day, a year earlier: ignored by the newer window
    assert h.used("2025-01-31 23:59:59") == (1000, 1, 1000, 1)
    h.approve("2024-12-31 23:59:59", 5)  # late record of an earlier month: ignored too
    assert h.used("2025-01-31 23:59:59")[2] == 1000


def test_year_end_rollover(h):
    h.controls(monthly={"count": 1}, daily={"count": 1})
    h.approve("2025-12-31 23:59:59", 1)
    assert h.check("2025-12-31 23:59:59") is Outcome.count_limit_exceeded
    assert h.check("2026-01-01 00:00:01") is None


def test_partial_reversal_gives_back_amount_full_gives_back_count(h):
    h.controls(daily={"amount": 10_000, "count": 1})
    original = h.approve("2025-03-14 09:00:00", 8000)
    h.reverse(original, "2025-03-14 09:05:00", 3000)
    assert h.used(NOON) == (5000, 1, 5000, 1)
    assert h.check(NOON, 5000) is Outcome.count_limit_exceeded  # still one transaction today
    h.reverse(original, "2025-03-14 09:10:00", 5000)
    assert h.used(NOON) == (0, 0, 0, 0)
    assert h.check(NOON, 10_000) is None


def test_reversal_next_day_gives_back_only_the_month(h):
    original = h.approve("2025-03-14 23:00:00", 700)
    h.approve("2025-03-15 08:00:00", 100)
    h.reverse(original, "2025-03-15 09:00:00", 700)
    assert h.used("2025-03-15 10:00:00") == (100, 1, 100, 1)


def test_posted_debits_and_advices_count(h):
    h.approve("2025-03-14 08:00:00", 300, hold=False, mti="0200")
    h.approve("2025-03-14 08:01:00", 200, mti="0120")
    h.approve("2025-03-14 08:02:00", 50, hold=False, mti="0220")
    assert h.used(NOON) == (550, 3, 550, 3)


def test_declines_credits_and_no_effect_approvals_do_not_count(h):
    base = dict(original_key="o", timestamp_ns=utc_ns("2025-03-14 08:00:00"), mti="0100", card_id=CARD_ID,
                amount=500, currency="EUR")
    h.journal.add(AuthRecord(key="d1", processing_code="000000", outcome=int(Outcome.insufficient_funds),
                             response_code="51", **base))
    h.journal.add(AuthRecord(key="c1", processing_code="200000", outcome=0, response_code="00", posted=True, **base))
    # an advice acknowledged without effect (no hold, not posted)
    h.journal.add(AuthRecord(key="n1", processing_code="000000", outcome=0, response_code="00", **base))
    assert h.used(NOON) == (0, 0, 0, 0)


def test_stand_in_decline_takes_the_approval_back(h):
    approval = h.approve("2025-03-14 08:00:00", 900)
    h.journal.add(msgspec.structs.replace(approval, outcome=int(Outcome.partner_unavailable), response_code="91",
                                          user_hold_id=0))
    assert h.used(NOON) == (0, 0, 0, 0)


def test_user_and_card_controls_both_apply_the_stricter_wins(h):
    h.controls("card", CARD_ID, daily={"amount": 10_000}, perTransaction=800)
    h.controls("user", USER_ID, daily={"amount": 1500})
    assert h.check(NOON, 801) is Outcome.amount_limit_exceeded  # card's per-transaction
    h.approve("2025-03-14 08:00:00", 800, card_id=OTHER_CARD_ID)  # the user's other card
    h.approve("2025-03-14 08:10:00", 600, card_id=CARD_ID)
    ctx = h.context(NOON, 200)
    assert h.step.prepare(ctx) is Vote.aborted and ctx.outcome is Outcome.amount_limit_exceeded
    assert ctx.cause.startswith("user daily amount limit 1500: used 1400")
    assert h.check(NOON, 100) is None
    assert h.check(NOON, 101, card_id=OTHER_CARD_ID) is Outcome.amount_limit_exceeded


def test_user_windows_are_per_currency():
    index = CardIndex()
    eur, usd = card_state(1, currency="EUR"), card_state(2, currency="USD")
    index.put_card(eur, b"\x01" * 16)
    index.put_card(usd, b"\x02" * 16)
    windows = SpendWindows()
    CheckSpendControls(index, windows)
    for card_id in (1, 2):
        windows.on_add(AuthRecord(key=f"k{card_id}", original_key="o", timestamp_ns=utc_ns(NOON), mti="0100",
                                  processing_code="000000", outcome=0, response_code="00", card_id=card_id,
                                  amount=100 * card_id, user_hold_id=card_id), None, None)
    day = utc_ns(NOON) // (86_400 * 10**9)
    assert windows.user(USER_ID, "EUR").used(day, month_of_day(day)) == (100, 1, 100, 1)
    assert windows.user(USER_ID, "USD").used(day, month_of_day(day)) == (200, 1, 200, 1)


def test_user_windows_rebuilt_from_card_windows_on_attach(h):
    h.approve("2025-03-13 08:00:00", 50, card_id=OTHER_CARD_ID)  # yesterday
    h.approve("2025-03-14 08:00:00", 100, card_id=OTHER_CARD_ID)
    h.approve("2025-03-14 09:00:00", 200, card_id=CARD_ID)
    h.approve("2025-03-01 09:00:00", 400, card_id=CARD_ID)  # earlier this month (late record)
    live = h.journal.windows.user(USER_ID, "EUR").used(utc_ns(NOON) // 86_400_000_000_000, 2025 * 12 + 2)
    fresh = SpendWindows()
    fresh.load_image([window.row(card_id) for card_id, window in h.journal.windows._cards.items()])
    CheckSpendControls(h.index, fresh)
    rebuilt = fresh.user(USER_ID, "EUR").used(utc_ns(NOON) // 86_400_000_000_000, 2025 * 12 + 2)
    assert rebuilt == live == (300, 2, 750, 4)


def test_windows_and_activity_survive_a_snapshot(h):
    original = h.approve("2025-03-14 08:00:00", 800)
    h.approve("2025-03-14 08:30:00", 100, card_id=OTHER_CARD_ID)
    h.reverse(original, "2025-03-14 08:40:00", 300)
    h.approve("2025-02-27 08:00:00", 999, card_id=99)  # a window of an earlier month: dropped
    image = h.journal.to_snapshot()
    restored = AuthJournal(retention_ns=40 * 86_400 * 10**9)
    restored.load_snapshot(image)
    assert restored.windows.card(99) is None
    for card_id in (CARD_ID, OTHER_CARD_ID):
        assert restored.windows.card(card_id).row(card_id) == h.journal.windows.card(card_id).row(card_id)
        assert restored.activity.of_card(card_id) == h.journal.activity.of_card(card_id)
    assert restored.activity.of_card(CARD_ID)[0].reversed_amount == 300


def test_old_snapshot_without_windows_loads():
    journal = AuthJournal()
    journal.load_snapshot(msgspec.msgpack.encode({"version": 2, "records": []}))
    assert len(journal.windows) == 0 and len(journal.activity) == 0


def test_window_never_goes_negative():
    window = Window()
    window.charge(10, 3, 100, 1)
    window.charge(10, 3, -500, -3)
    assert window.used(10, 3) == (0, 0, 0, 0)


# -- validation of the stored / REST format -----------------------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"perTransaction": -1}',
    b'{"daily": {"amount": -5}}',
    b'{"monthly": {"count": -1}}',
    b'{"blockedMccGroups": ["casinos"]}',
    b'{"blockedMccs": ["79"]}',
    b'{"blockedCountries": ["ru"]}',
    b'{"channels": {"teleport": false}}',
    b'{"limits": 1}',
    b'{"perTransaction": 1000000000000}',
])
def test_spec_rejects_bad_input(body):
    with pytest.raises(msgspec.ValidationError):
        decode_spec(body)


def test_empty_spec_removes_controls_from_the_index(h):
    h.controls(perTransaction=1)
    assert h.index.card_controls(CARD_ID) is not None
    h.controls()
    assert h.index.card_controls(CARD_ID) is None


# -- the whole path: REST on HTTPS, ISO 8583 on loopback ------------------------------------------------



class Live:
    def __init__(self, server, data_dir, partner: httpx.AsyncClient, iso: IsoClient) -> None:
        self.server, self.data_dir, self.partner, self.iso = server, data_dir, partner, iso

    async def call(self, card: dict, **fields) -> dict:
        request = auth(card, **fields)
        response = await self.iso.call(request)
        response["request"] = request
        return response

    async def put(self, path: str, body: dict) -> dict:
        reply = await self.partner.put(path, json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def record(self, response: dict) -> AuthRecord:
        request = response["request"]
        return self.server.journal.get("|".join(parse_request(request).duplicate_key))


@pytest.fixture
async def live(data_dir):
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        iso = await IsoClient.connect(server.iso_port)
        async with https(data_dir, server.rest_port, "partner") as partner:
            yield Live(server, data_dir, partner, iso)
        await iso.aclose()
        server.stop.set()


def card_path(card: dict) -> str:
    return f"/secure/customers/{card['customerId']}/cards/{card['cardId']}/limits"


@pytest.mark.timeout(60)
async def test_a_locked_down_channel_declines_the_very_next_message(live, cards):
    card = cards[0]
    assert (await live.call(card, **{"22": "810"}))["39"] == "00"
    await live.put(card_path(card), {"channels": {"ecommerce": False}})
    declined = await live.call(card, **{"22": "810"})
    assert declined["39"] == "57" and "38" not in declined
    assert live.record(declined).cause == "card channel ecommerce is off"
    assert (await live.call(card, **{"22": "051"}))["39"] == "00"  # chip still works
    assert (await live.call(cards[1], **{"22": "810"}))["39"] == "00"  # the user's other card is not affected
    events = [event for event in live.server.store.events(limit=1000) if event.kind == "card.limits_set"]
    assert len(events) == 1 and events[0].subject == f"card:{card['cardId']}"
    assert '"ecommerce":false' in events[0].body and card["pan"] not in events[0].body


@pytest.mark.timeout(60)
async def test_amount_count_mcc_country_over_the_wire(live, cards):
    card = cards[2]
    path = card_path(card)
    await live.put(path, {"perTransaction": 5000, "daily": {"amount": 7000, "count": 3},
                          "blockedMccGroups": ["gambling"], "blockedMccs": ["5999"], "blockedCountries": ["RU"]})
    assert (await live.call(card, amount=5001))["39"] == "61"
    assert (await live.call(card, amount=4000))["39"] == "00"
    assert (await live.call(card, amount=3001))["39"] == "61"  # daily amount: 4000 + 3001 > 7000
    assert (await live.call(card, mcc="7995", amount=10))["39"] == "57"
    assert (await live.call(card, mcc="5999", amount=10))["39"] == "57"
    assert (await live.call(card, amount=10, **{"43": "SOME SHOP                MOSCOW       RU"}))["39"] == "57"
    assert (await live.call(card, amount=10))["39"] == "00"
    assert (await live.call(card, amount=10))["39"] == "00"
    assert (await live.call(card, amount=10))["39"] == "65"  # the fourth approval today
    view = (await live.partner.get(path)).json()
    assert view["dailyUsed"] == {"amount": 4020, "count": 3} and view["monthlyUsed"]["count"] >= 3
    assert view["blockedMccGroups"] == ["gambling"] and view["perTransaction"] == 5000
    assert view["usage"][0]["currency"] == "EUR"


@pytest.mark.timeout(60)
async def test_reversal_gives_back_the_window(live, cards):
    card = cards[4]
    await live.put(card_path(card), {"daily": {"amount": 1000, "count": 1}})
    first = await live.call(card, amount=800)
    assert first["39"] == "00"
    assert (await live.call(card, amount=100))["39"] == "65"
    reversed_ = await live.iso.call(reversal_of(first["request"]))
    assert reversed_["39"] == "00"
    assert (await live.call(card, amount=1000))["39"] == "00"
    view = (await live.partner.get(card_path(card))).json()
    assert view["dailyUsed"] == {"amount": 1000, "count": 1}


@pytest.mark.timeout(60)
async def test_advices_count_but_are_never_declined(live, cards):
    card = cards[6]
    await live.put(card_path(card), {"perTransaction": 1, "channels": {"ecommerce": False}})
    assert (await live.call(card, mti="0120", amount=500, expiry=None, **{"22": "810"}))["39"] == "00"
    assert (await live.call(card, mti="0220", amount=300, expiry=None))["39"] == "00"
    view = (await live.partner.get(card_path(card))).json()
    assert view["dailyUsed"] == {"amount": 800, "count": 2}


@pytest.mark.timeout(60)
async def test_user_level_controls_apply_to_every_card_and_stricter_wins(live, cards):
    first, second = cards[8], cards[9]
    assert first["customerId"] == second["customerId"]
    user_path = f"/secure/customers/{first['customerId']}/limits"
    view = await live.put(user_path, {"daily": {"amount": 1500}, "blockedMccGroups": ["crypto"]})
    assert view["dailyUsed"] == {"amount": 0, "count": 0}
    await live.put(card_path(first), {"perTransaction": 700})
    assert (await live.call(second, mcc="6051"))["39"] == "57"
    assert (await live.call(first, amount=701))["39"] == "61"  # the card's stricter per-transaction
    assert (await live.call(first, amount=700))["39"] == "00"
    assert (await live.call(second, amount=800))["39"] == "00"
    declined = await live.call(second, amount=1)  # the user's daily 1500 across both cards
    assert declined["39"] == "61" and live.record(declined).cause.startswith("user daily amount limit 1500")
    view = (await live.partner.get(user_path)).json()
    assert view["dailyUsed"] == {"amount": 1500, "count": 2} and view["daily"] == {"amount": 1500, "count": None}
    events = [event.kind for event in live.server.store.events(limit=1000)]
    assert "user.limits_set" in events and "card.limits_set" in events


@pytest.mark.timeout(60)
async def test_rest_validation_and_visibility(live, cards):
    card = cards[10]
    path = card_path(card)
    for body, where in (({"perTransaction": -1}, "$.perTransaction"), ({"daily": {"amount": -5}}, "$.daily.amount"),
                        ({"blockedMccGroups": ["casinos"]}, "$.blockedMccGroups"),
                        ({"channels": {"teleport": False}}, "$.channels"), ({"blockedCountries": ["Russia"]}, None)):
        problem = assert_problem(await live.partner.put(path, json=body), 400, "INVALID_PAYLOAD")
        assert where is None or where in problem["detail"], problem
    assert_problem(await live.partner.put(path, content=b"not json"), 400, "INVALID_PAYLOAD")
    other_users_card = f"/secure/customers/{card['customerId']}/cards/{cards[12]['cardId']}/limits"
    assert_problem(await live.partner.get(other_users_card), 404, "CARD_NOT_FOUND")
    assert_problem(await live.partner.get(f"/secure/customers/{card['customerId']}/cards/999999/limits"), 404,
                   "CARD_NOT_FOUND")
    assert_problem(await live.partner.get(f"/secure/customers/{card['customerId']}/cards/x/limits"), 404,
                   "CARD_NOT_FOUND")
    assert_problem(await live.partner.get("/secure/customers/999999/limits"), 404, "CUSTOMER_NOT_FOUND")
    view = (await live.partner.get(path)).json()  # never set: no controls, zero usage
    assert view["perTransaction"] is None and view["channels"]["atm"] is True and view["blockedMccs"] == []
    assert live.server.store.get_spend_controls("card", card["cardId"]) is None
    spec = (await live.partner.get("/openapi.json")).json()
    assert "/secure/customers/{customerId}/cards/{cardId}/limits" in spec["paths"]


@pytest.mark.timeout(60)
async def test_customer_and_admin_channels(live, cards):
    customer = await create_customer(live.partner)
    async with https(live.data_dir, live.server.rest_port) as anonymous:
        token = await customer_login(anonymous, customer)
        password = (live.data_dir / "admin-password").read_text().strip()
        admin_token = await admin_login(anonymous, "admin", password)
    async with https(live.data_dir, live.server.rest_port, headers=bearer(token)) as me, \
            https(live.data_dir, live.server.rest_port, headers=bearer(admin_token)) as admin:  # fmt: skip
        reply = await me.put("/customers/me/limits", json={"monthly": {"count": 40}})
        assert reply.status_code == 200 and reply.json()["monthly"] == {"amount": None, "count": 40}
        assert (await me.get("/customers/me/limits")).json()["monthly"]["count"] == 40
        assert_problem(await me.get(f"/customers/me/cards/{cards[0]['cardId']}/limits"), 404, "CARD_NOT_FOUND")
        reply = await admin.post("/admin/users", json={"username": "emp1", "password": "secret-pass-1",
                                                       "role": "Employee"})
        assert reply.status_code in (200, 201), reply.text
        card = cards[14]
        admin_path = f"/admin/customers/{card['customerId']}/cards/{card['cardId']}/limits"
        reply = await admin.put(admin_path, json={"channels": {"atm": False}})
        assert reply.status_code == 200, reply.text
    async with https(live.data_dir, live.server.rest_port) as anonymous:
        employee_token = await admin_login(anonymous, "emp1", "secret-pass-1")
    async with https(live.data_dir, live.server.rest_port, headers=bearer(employee_token)) as employee:
        assert (await employee.get(admin_path)).json()["channels"]["atm"] is False
        assert_problem(await employee.put(admin_path, json={}), 403, "FORBIDDEN")
    assert (await live.call(card, processing="010000", mcc="6011"))["39"] == "57"


@pytest.mark.timeout(60)
async def test_windows_and_controls_survive_a_restart(data_dir, cards):
    card = cards[16]
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        iso = await IsoClient.connect(server.iso_port)
        async with https(data_dir, server.rest_port, "partner") as partner:
            assert (await partner.put(card_path(card), json={"monthly": {"amount": 1000}})).status_code == 200
            assert (await iso.call(auth(card, amount=600)))["39"] == "00"
        await iso.aclose()
        server.stop.set()
    async with trio.open_nursery() as nursery:
        server = await start_in_process(nursery, data_dir)
        iso = await IsoClient.connect(server.iso_port)
        assert (await iso.call(auth(card, amount=401)))["39"] == "61"
        assert (await iso.call(auth(card, amount=400)))["39"] == "00"
        async with https(data_dir, server.rest_port, "partner") as partner:
            assert (await partner.get(card_path(card))).json()["monthlyUsed"] == {"amount": 1000, "count": 2}
        await iso.aclose()
        server.stop.set()


def test_external_balance_approvals_count(h):
    """An external-balance partner's approval holds no user money here; the partner's answer counts."""
    record = h.approve("2025-03-14 08:00:00", 400)
    h.journal.add(msgspec.structs.replace(record, key="ext1", user_hold_id=0, external=1))
    assert h.used(NOON) == (800, 2, 800, 2)
