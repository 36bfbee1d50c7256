"""The hot-card model of the network simulator: a few cards get a large share of the purchases,
are funded for it at seed time, and a real run against `authsrv serve` keeps 0 mismatches."""

from __future__ import annotations

import collections
import functools
import random
from pathlib import Path

import pytest
import trio

from bench.harness import BenchConfig
from simulators.network import HotCards, LoadConfig, MixWeights, run_load, write_synthetic_cards
from simulators.network.__main__ import main as network_main
from simulators.network.cards import load_cards
from simulators.network.mix import HOT_KINDS, Amounts, Kind, RequestFactory
from simulators.network.pinblock import load_zpk
from simulators.network.target import Ports, hot_users, init_and_seed, start_authsrv

ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
CARDS = 1_000
REQUESTS = 20_000
SHARE_TOLERANCE = 0.02  # about 6 standard deviations of the share over ~14,000 purchase-type requests


@pytest.fixture(scope="module")
def cards_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hot") / "cards.jsonl"
    write_synthetic_cards(path, CARDS, seed=11)
    return path


def make_factory(cards_path: Path, hot: HotCards, *, seed: int = 3) -> RequestFactory:
    return RequestFactory(load_cards(cards_path), weights=MixWeights(), rng=random.Random(seed), zpk=ZPK,
                          amounts=Amounts(), acquirer_id="535001", rrn_tag="321", hot=hot)  # fmt: skip


def card_pan(message: dict[str, str]) -> str:
    return message["2"] if "2" in message else message["35"].split("=")[0]


def draw(factory: RequestFactory, count: int) -> list[tuple[Kind, str]]:
    """(kind, PAN) of `count` requests, every approval pooled so reversals have something to name."""
    drawn = []
    for number in range(count):
        request = factory.next_request(f"{number % 999_999 + 1:06d}")
        factory.on_answer(request, "00")
        drawn.append((request.kind, card_pan(request.message)))
    return drawn


def test_hot_cards_get_their_share_of_the_purchases_and_nothing_else(cards_path: Path) -> None:
    hot = HotCards(fraction=0.01, share=0.2)
    factory = make_factory(cards_path, hot)
    hot_pans = {card.pan for card in factory.hot_cards}
    assert [card.pan for card in factory.hot_cards] == [card.pan for card in load_cards(cards_path)[:10]]
    drawn = draw(factory, REQUESTS)
    purchases = [pan for kind, pan in drawn if kind in HOT_KINDS]
    assert len(purchases) > REQUESTS // 2
    share = sum(pan in hot_pans for pan in purchases) / len(purchases)
    assert abs(share - hot.share) < SHARE_TOLERANCE, share
    # Every hot card is used, about evenly; no other kind (wrong PIN/CVC2/expiry, over-balance,
    # ATM, balance inquiry) ever names one, so no counter of theirs moves.
    per_card = collections.Counter(pan for pan in purchases if pan in hot_pans)
    assert set(per_card) == hot_pans
    assert max(per_card.values()) < 2 * min(per_card.values())
    reversals = (Kind.reversal, Kind.reversal_partial)  # name whatever card was approved
    others = [(kind, pan) for kind, pan in drawn if kind not in HOT_KINDS and kind not in reversals]
    assert others and not [kind for kind, pan in others if pan in hot_pans]
    assert not hot_pans & {victim.card.pan for victim in factory._victims}


def test_the_hot_picks_are_deterministic_under_the_seed(cards_path: Path) -> None:
    hot = HotCards(fraction=0.05, share=0.5)
    first = draw(make_factory(cards_path, hot, seed=9), 2_000)
    assert first == draw(make_factory(cards_path, hot, seed=9), 2_000)
    assert first != draw(make_factory(cards_path, hot, seed=10), 2_000)


@pytest.mark.parametrize("off", [HotCards(), HotCards(fraction=0.01, share=0.0), HotCards(fraction=0.0, share=0.2)])
def test_disabled_is_the_uniform_pick(cards_path: Path, off: HotCards) -> None:
    assert not off.enabled and off.count(CARDS) == 0 and off.funding_factor(CARDS) == 1
    factory = make_factory(cards_path, off)
    assert factory.hot_cards == ()
    drawn = draw(factory, REQUESTS)
    # The same requests, draw for draw, as a factory that never heard of hot cards.
    plain = RequestFactory(load_cards(cards_path), weights=MixWeights(), rng=random.Random(3), zpk=ZPK,
                           amounts=Amounts(), acquirer_id="535001", rrn_tag="321")  # fmt: skip
    assert drawn == draw(plain, REQUESTS)
    # Uniform: the first 10 cards of the file (the hot ones, were it on) get about 1% of the purchases.
    first_ten = {card.pan for card in load_cards(cards_path)[:10]}
    purchases = [pan for kind, pan in drawn if kind in HOT_KINDS]
    share = sum(pan in first_ten for pan in purchases) / len(purchases)
    assert share < 0.02, share


def test_count_and_funding_factor() -> None:
    default = HotCards.default()
    assert (default.fraction, default.share) == (0.01, 0.2)
    assert default.count(20_000) == 200
    # share / hot against (1 - share) / cold, twice: 0.2 * 19,800 / (0.8 * 200) = 24.75 -> 49.5 -> 50.
    assert default.funding_factor(20_000) == 50
    assert default.count(50) == 1 and default.count(3) == 1  # at least one
    assert default.count(2) == 0 and default.funding_factor(2) == 1  # too few to leave 2 cold
    assert HotCards(fraction=0.5, share=0.5).count(10) == 5
    assert HotCards(fraction=0.5, share=0.5).count(4) == 2  # two stay cold
    for bad in ({"fraction": -0.1, "share": 0.2}, {"fraction": 0.6, "share": 0.2}, {"fraction": 0.01, "share": 1.0}):
        with pytest.raises(ValueError):
            HotCards(**bad)
    assert hot_users(default, users=20_000, cards_per_user=1) == 200
    assert hot_users(default, users=1_000, cards_per_user=3) == 10  # 30 hot cards: 10 users' cards
    assert hot_users(HotCards(), users=1_000, cards_per_user=3) == 0


def test_options_reach_the_command_line_and_the_bench_config(cards_path: Path) -> None:
    assert network_main(["--cards", str(cards_path), "--port", "1", "--hot-share", "0.95"]) == 2
    assert network_main(["--cards", str(cards_path), "--port", "1", "--hot-cards", "-1"]) == 2
    config = BenchConfig.quick_preset(hot_cards=0.02, hot_share=0.3)
    assert config.hot == HotCards(fraction=0.02, share=0.3)
    assert BenchConfig().hot == HotCards.default()
    with pytest.raises(ValueError):
        BenchConfig(hot_share=1.5)
    from bench.__main__ import _parser

    args = _parser().parse_args(["--hot-cards", "0", "--hot-share", "0.1"])
    assert (args.hot_cards, args.hot_share) == (0.0, 0.1)


def run_against_authsrv(tmp_path: Path, *, seeded_hot: HotCards, load_hot: HotCards) -> tuple:
    """init + seed 40 users (1,000.00 each, the hot ones as `seeded_hot` says), serve, 600 requests."""
    data, log_path = tmp_path / "data", tmp_path / "authsrv.log"
    cards_path = init_and_seed(data, users=40, cards_per_user=1, amount_minor=AMOUNT_MINOR, log_path=log_path,
                               hot=seeded_hot)  # fmt: skip
    cards = load_cards(cards_path)
    ports = Ports.free()
    server = start_authsrv(data, ports, log_path)
    try:
        config = LoadConfig(cards_path=cards_path, port=ports.iso, rate_per_s=250, duration_s=2.4, connections=2,
                            timeout_s=5.0, seed=5, zpk=load_zpk(data / "keys" / "zpk.hex"), hot=load_hot)  # fmt: skip
        report = trio.run(functools.partial(run_load, config, cards=cards))
    finally:
        assert server.stop() == 0
    assert report.answered == report.sent == 600 and report.timeouts == 0
    return cards, report


AMOUNT_MINOR = 100_000  # 1,000.00: enough for a cold card's ~10 debits, not for a hot card's ~100
REAL_HOT = HotCards(fraction=0.05, share=0.5)  # 2 of 40 cards get half of the purchases


def test_a_real_run_with_hot_cards_has_no_mismatches(tmp_path: Path) -> None:
    """`authsrv serve` seeded by init_and_seed(hot=...): the 2 hot cards spend far more than a
    normal balance holds, yet every answer is the expected one, because they were funded for it."""
    assert REAL_HOT.count(40) == 2 and REAL_HOT.funding_factor(40) == 38
    cards, report = run_against_authsrv(tmp_path, seeded_hot=REAL_HOT, load_hot=REAL_HOT)
    assert len(cards) == 40
    assert report.mismatches == 0, report.render()
    assert report.codes.get("51", 0) == report.kinds["over_balance"].answered > 0


def test_unfunded_hot_cards_run_out_and_are_counted_as_mismatches(tmp_path: Path) -> None:
    """The control: the same load on cards seeded without hot funding finds the hot ones empty."""
    _, report = run_against_authsrv(tmp_path, seeded_hot=HotCards(), load_hot=REAL_HOT)
    assert report.mismatches > 0
    assert any("00->51" in detail for detail in report.mismatch_detail.get("purchase", {})), report.render()


def test_every_run_over_one_cards_file_reserves_the_same_pin_victims(cards_path: Path) -> None:
    """A bench ramp runs one load per step against the same server: a card one step locked with
    wrong PINs must never carry another step's normal traffic (it would answer 75 for a purchase)."""
    cards = load_cards(cards_path)

    def factory(seed: int, reused: bool = False) -> RequestFactory:
        return RequestFactory(cards, weights=MixWeights(), rng=random.Random(seed), zpk=ZPK, amounts=Amounts(),
                              acquirer_id="535001", rrn_tag="123", hot=HotCards.default(),
                              victims_reused=reused)  # fmt: skip

    first, second = factory(1), factory(2, reused=True)
    victims = {victim.card.pan for victim in first._victims}
    assert victims and victims == {victim.card.pan for victim in second._victims}
    assert not victims & {card.pan for card in second._normal}
    assert not any(victim.uncertain for victim in first._victims)
    assert all(victim.uncertain for victim in second._victims)  # their counters moved in run 1
