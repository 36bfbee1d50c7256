"""The network simulator: codec, mix, and open-loop measurement against in-process test servers."""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import stat
import string
from pathlib import Path

import attrs
import iso8583
import iso8583.specs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.floor_server import answer, build_response, serve_floor
from simulators.network import LoadConfig, LoadError, MixWeights, run_load, write_synthetic_cards
from simulators.network.cards import load_cards, luhn_valid, mask_pan, unknown_pan
from simulators.network.clearing import Clearable, ClearingLog
from simulators.network.codec import (
    Codec,
    DecodeError,
    EncodeError,
    FrameReader,
    FramingError,
    decode,
    decode_fast,
    decode_reply,
    encode,
    encode_checked,
    encode_fast,
    frame,
    reply_of,
)
from simulators.network.mix import Amounts, Kind, RequestFactory
from simulators.network.pinblock import clear_pin_block, decrypt_pin_block, encrypt_pin_block, parse_zpk_hex

SPEC = iso8583.specs.default
ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
NEGATIVE_KINDS = ("unknown_card", "wrong_cvc2", "wrong_pin", "wrong_expiry", "over_balance")


@pytest.fixture(scope="module")
def cards_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("network") / "cards.jsonl"
    write_synthetic_cards(path, 200, seed=7)
    return path


def make_factory(cards_path: Path, *, seed: int = 1, weights: MixWeights | None = None) -> RequestFactory:
    return RequestFactory(
        load_cards(cards_path),
        weights=weights or MixWeights(),
        rng=random.Random(seed),
        zpk=ZPK,
        amounts=Amounts(),
        acquirer_id="535001",
        rrn_tag="123",
    )


# -- codec -------------------------------------------------------------------------------------


def test_every_kind_encodes_identically_to_pyiso8583(cards_path: Path) -> None:
    factory = make_factory(cards_path)
    built = collections.Counter()
    for number in range(3000):
        request = factory.next_request(f"{number % 999_999 + 1:06d}")
        factory.on_answer(request, "00")  # fills the reversal pool
        raw = encode_fast(request.message)
        assert raw == encode(request.message, Codec.pyiso8583), request.kind
        assert decode_fast(raw) == decode(raw, Codec.pyiso8583)
        response = encode_fast(build_response(decode_fast(raw)))
        assert decode_fast(response) == decode(response, Codec.pyiso8583)
        built[request.kind] += 1
    for kind in (Kind.signon, Kind.echo):
        raw = encode_fast(factory.management(kind, "000001").message)
        assert raw == encode(factory.management(kind, "000001").message, Codec.pyiso8583)
    assert set(built) >= set(Kind) - {Kind.signon, Kind.echo}, "every weighted kind was drawn"


FIELD_VALUES = {
    "2": st.text(string.digits, min_size=1, max_size=19),
    "3": st.text(string.digits, min_size=6, max_size=6),
    "4": st.text(string.digits, min_size=12, max_size=12),
    "35": st.text(string.digits + "=", min_size=1, max_size=37),
    "39": st.text(string.ascii_uppercase + string.digits, min_size=2, max_size=2),
    "44": st.text(string.printable, max_size=25),
    "48": st.text(string.printable, max_size=999),
    "52": st.binary(min_size=8, max_size=8).map(lambda data: data.hex().upper()),
    "70": st.text(string.digits, min_size=3, max_size=3),
    "95": st.text(string.digits, min_size=42, max_size=42),
    "102": st.text(string.digits, max_size=28),
}


@settings(max_examples=300, deadline=None)
@given(
    mti=st.text(string.digits, min_size=4, max_size=4),
    fields=st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.none(), min_size=1).flatmap(
        lambda keys: st.fixed_dictionaries({key: FIELD_VALUES[key] for key in keys})
    ),
)
def test_fast_codec_matches_pyiso8583_on_random_messages(mti: str, fields: dict[str, str]) -> None:
    message = {"t": mti, **fields}
    raw = encode_fast(message)
    assert raw == bytes(iso8583.encode(dict(message), SPEC)[0])
    assert decode_fast(raw) == iso8583.decode(raw, SPEC)[0]
    for cut in range(len(raw)):  # every truncation is rejected, never misread
        with pytest.raises(DecodeError):
            decode_fast(raw[:cut])


REPLY_VALUES = {
    **FIELD_VALUES,
    "11": st.text(string.digits, min_size=6, max_size=6),
    "37": st.text(string.ascii_uppercase + string.digits, min_size=12, max_size=12),
    "38": st.text(string.ascii_uppercase + string.digits, min_size=6, max_size=6),
    "39": st.text(string.ascii_uppercase + string.digits, min_size=2, max_size=2),
}


def _reply_or_error(payload: bytes, decoder) -> object:  # noqa: ANN001
    try:
        return decoder(payload)
    except DecodeError:
        return DecodeError


@settings(max_examples=300, deadline=None)
@given(
    mti=st.text(string.digits, min_size=4, max_size=4),
    fields=st.dictionaries(st.sampled_from(sorted(REPLY_VALUES)), st.none(), min_size=1).flatmap(
        lambda keys: st.fixed_dictionaries({key: REPLY_VALUES[key] for key in keys})
    ),
    damage=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
)
def test_decode_reply_accepts_exactly_what_the_full_decoder_accepts(
    mti: str, fields: dict[str, str], damage: list[tuple[int, int]]
) -> None:
    raw = bytearray(encode_fast({"t": mti, **fields}))
    for position, value in damage:  # any byte, bitmaps and length prefixes included
        raw[position % len(raw)] = value
    payload = bytes(raw)
    for data in (payload, payload[:1], payload[: len(payload) // 2], payload[:-1]):  # damaged, then cut
        full = _reply_or_error(data, lambda frame_bytes: reply_of(decode_fast(frame_bytes)))
        assert _reply_or_error(data, decode_reply) == full
    if not damage:  # intact: the full decoder agrees with pyiso8583 itself, and so the reply does
        assert decode_reply(payload) == reply_of(iso8583.decode(payload, SPEC)[0])


def test_fast_encoder_and_checked_encoder_agree_on_every_kind(cards_path: Path) -> None:
    factory = make_factory(cards_path, seed=9)
    for number in range(2000):
        request = factory.next_request(f"{number % 999_999 + 1:06d}")
        factory.on_answer(request, "00")
        assert encode_fast(request.message) == encode_checked(request.message), request.kind
    broken = dict(factory.build(Kind.atm, "000001").message, **{"52": "XYZ"})
    with pytest.raises(EncodeError):
        encode_fast(broken)  # a bad binary field falls through to the checked encoder


def test_factory_pin_blocks_decrypt_to_the_cards_pin(cards_path: Path) -> None:
    factory = make_factory(cards_path)
    cards = {card.pan: card for card in load_cards(cards_path)}
    for number in range(2):  # the second round comes from the memo
        for _ in range(50):
            request = factory.build(Kind.atm, f"{number + 1:06d}")
            pan = request.message["35"].split("=")[0]
            block = bytes.fromhex(request.message["52"])
            assert decrypt_pin_block(block, ZPK) == clear_pin_block(cards[pan].pin, pan)
            assert block == encrypt_pin_block(cards[pan].pin, pan, ZPK)


def test_fast_codec_rejects_what_the_profile_forbids() -> None:
    with pytest.raises(EncodeError):
        encode_fast({"t": "0100", "3": "00000"})  # fixed field one digit short
    with pytest.raises(EncodeError):
        encode_fast({"t": "0100", "2": "1" * 20})  # LL field over its maximum
    with pytest.raises(EncodeError):
        encode_fast({"t": "01X0", "3": "000000"})
    with pytest.raises(EncodeError):
        encode_fast({"t": "0100", "200": "x"})
    good = encode_fast({"t": "0110", "11": "000001", "39": "00"})
    with pytest.raises(DecodeError):
        decode_fast(good + b"0")  # trailing garbage
    with pytest.raises(DecodeError):
        decode_fast(good.replace(b"0110", b"01\xff0", 1))


def test_frame_reader_reassembles_any_chunking_and_rejects_bad_lengths() -> None:
    payloads = [bytes([65 + index]) * (index * 37 + 1) for index in range(20)]
    stream = b"".join(frame(payload) for payload in payloads)
    rng = random.Random(5)
    reader, received, offset = FrameReader(), [], 0
    while offset < len(stream):
        step = rng.randint(1, 50)
        received += reader.feed(stream[offset : offset + step])
        offset += step
    assert received == payloads
    with pytest.raises(FramingError):
        FrameReader().feed(b"\x00\x00")
    with pytest.raises(FramingError):
        FrameReader(frame_size_max=100).feed(b"\x00\x65" + b"x" * 101)


# -- cards, PIN blocks --------------------------------------------------------------------------


def test_pin_block_format_0_known_vector_and_round_trip() -> None:
    # ISO 9564-1 format 0, worked by hand: PIN field 041234FFFFFFFFFF XOR PAN field 0000111111111111
    # (the 12 rightmost PAN digits without the check digit).
    pan = "4111111111111111"
    assert clear_pin_block("1234", pan).hex().upper() == "041225EEEEEEEEEE"
    block = encrypt_pin_block("1234", pan, ZPK)
    assert len(block) == 8 and block != clear_pin_block("1234", pan)
    assert decrypt_pin_block(block, ZPK) == clear_pin_block("1234", pan)
    with pytest.raises(ValueError):
        parse_zpk_hex("00" * 15)
    with pytest.raises(ValueError):
        parse_zpk_hex("zz" * 16)


def test_pin_block_agrees_with_the_servers_implementation() -> None:
    cardsec = pytest.importorskip("authsrv.cardsec")
    for pin, pan in (("1234", "5355220000000001"), ("98765432", "5355221234567897"), ("0000", "4111111111111111")):
        assert encrypt_pin_block(pin, pan, ZPK) == cardsec.encrypt_pin_block(pin, pan, ZPK)
        assert cardsec.decrypt_pin_block(encrypt_pin_block(pin, pan, ZPK), pan, ZPK) == pin


def test_cards_file_luhn_and_masking(cards_path: Path, tmp_path: Path) -> None:
    cards = load_cards(cards_path)
    assert len(cards) == 200 and all(luhn_valid(card.pan) for card in cards)
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert cards[0].pan not in repr(cards[0]) and cards[0].pin not in repr(cards[0]).split("card_id")[0]
    assert mask_pan("5355221234567897") == "535522******7897"
    known = frozenset(card.pan for card in cards)
    for _ in range(100):
        pan = unknown_pan(random.Random(_), known)
        assert luhn_valid(pan) and pan.startswith("535522") and pan not in known
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"pan": "12", "expiry": "2812", "cvc2": "123", "pin": "1234", "cardId": "c", '
                   '"customerId": "u", "balanceId": "b", "currency": "EUR"}\n')  # fmt: skip
    with pytest.raises(ValueError, match="pan is not"):
        load_cards(bad)


def test_clearing_file_is_written_owner_only(cards_path: Path, tmp_path: Path) -> None:
    """The clearing file carries full PANs: 0600 like the cards file, even over an older 0644 file."""
    cards = load_cards(cards_path)
    log = ClearingLog()
    for number, card in enumerate(cards[:5]):
        clearable = Clearable(pan=card.pan, rrn=f"{number:012d}", amount=1_000, currency="EUR", billing_amount=1_000,
                              billing_currency=card.currency, mcc="5411", merchant_name="SHOP")  # fmt: skip
        log.approved(clearable, auth_code=f"A{number:05d}")
    fresh, older = tmp_path / "fresh.jsonl", tmp_path / "older.jsonl"
    older.write_text("stale\n")
    older.chmod(0o644)
    previous_umask = os.umask(0o022)
    try:
        for path in (fresh, older):
            counts = log.write(path, rng=random.Random(1), force_post_card=cards[0])
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            records = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(records) == counts.records >= 5 and records[0]["pan"] == cards[0].pan
    finally:
        os.umask(previous_umask)


# -- the mix -------------------------------------------------------------------------------------


def test_wrong_pin_cards_lock_on_the_third_attempt_and_others_alternate(cards_path: Path) -> None:
    factory = make_factory(cards_path, weights=MixWeights(purchase=0, **{name: 0 for name in (
        "cross_currency", "atm", "refund", "reversal", "reversal_partial", "advice", "balance_inquiry",
        "unknown_card", "wrong_cvc2", "wrong_expiry", "over_balance")}, wrong_pin=1))  # fmt: skip
    seen: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for number in range(400):
        request = factory.build(Kind.wrong_pin, f"{number + 1:06d}")
        assert request.kind in (Kind.wrong_pin, Kind.pin_retry)
        codes = set(request.expected)
        if request.kind is Kind.wrong_pin and codes != {"75"}:
            assert "00" in codes  # a PVV collision (~1 in 10,000 wrong PINs) must not be a mismatch
            codes.discard("00")
        (expected,) = codes
        seen[request.victim.card.card_id].append((request.kind.name, expected))
        factory.on_answer(request, expected)  # a server that behaves as the contract says
    lockers = {v.card.card_id for v in factory._victims if v.locks}
    for card_id, attempts in seen.items():
        if card_id in lockers:
            assert [code for _, code in attempts[:4]] == ["55", "55", "75", "75"][: len(attempts)]
        else:
            assert attempts[:4] == [("wrong_pin", "55"), ("pin_retry", "00"), ("wrong_pin", "55"),
                                    ("pin_retry", "00")][: len(attempts)]  # fmt: skip


def test_reversal_references_an_approved_original(cards_path: Path) -> None:
    factory = make_factory(cards_path)
    assert factory.build(Kind.reversal, "000001").kind is Kind.purchase  # nothing approved yet
    original = factory.build(Kind.purchase, "000002")
    factory.on_answer(original, "00")
    partial = factory.build(Kind.reversal_partial, "000003")
    message, source = partial.message, original.message
    assert partial.kind is Kind.reversal_partial and message["t"] == "0400" and partial.response_mti == "0410"
    assert message["37"] == source["37"] and message["4"] == source["4"] and message["2"] == source["2"]
    assert message["90"] == "0100" + source["11"] + source["7"] + "00000535001" + "0" * 11
    assert message["95"] == f"{int(source['4']) // 2:012d}" + "0" * 30
    declined = factory.build(Kind.purchase, "000004")
    factory.on_answer(declined, "51")
    assert factory.build(Kind.reversal, "000005").kind is Kind.purchase  # declines are never reversed


def test_mix_follows_the_weights_and_rrns_are_unique(cards_path: Path) -> None:
    factory = make_factory(cards_path, seed=3)
    kinds, rrns = collections.Counter(), set()
    for number in range(20_000):
        request = factory.next_request(f"{number % 999_999 + 1:06d}")
        factory.on_answer(request, "00")
        kinds[request.kind] += 1
        if request.kind not in (Kind.reversal, Kind.reversal_partial):
            assert request.message["37"] not in rrns
            rrns.add(request.message["37"])
    assert 0.55 <= kinds[Kind.purchase] / 20_000 <= 0.63
    assert 0.02 <= kinds[Kind.unknown_card] / 20_000 <= 0.04
    assert 0.03 <= (kinds[Kind.reversal] + kinds[Kind.reversal_partial]) / 20_000 <= 0.07


# -- open-loop runs against test servers ----------------------------------------------------------


async def start_server(nursery: trio.Nursery, handler=None) -> int:
    kwargs = {"handler": handler} if handler else {}
    return await nursery.start(functools.partial(serve_floor, 0, **kwargs))


def quiet_config(cards_path: Path, port: int, **overrides: object) -> LoadConfig:
    settings = {"cards_path": cards_path, "port": port, "rate_per_s": 300.0, "duration_s": 2.0,
                "connections": 2, "timeout_s": 2.0, "echo_interval_s": 0.5, "zpk": ZPK, "rrn_tag": "001"}  # fmt: skip
    settings.update(overrides)
    return LoadConfig(**settings)


async def test_load_against_the_floor_counts_add_up(cards_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery)
        report = await run_load(quiet_config(cards_path, port))
        nursery.cancel_scope.cancel()
    assert report.planned == 600 and report.sent == 600 and report.answered == 600
    assert report.timeouts == report.lost == report.unsent == report.unmatched_responses == 0
    assert report.codes == {"00": 600}
    management = report.kinds["signon"].answered + report.kinds["echo"].answered
    assert report.kinds["signon"].answered == 2 and report.kinds["echo"].answered >= 4
    assert sum(kind.sent for kind in report.kinds.values()) == 600 + management
    assert report.latency.count == report.service_time.count == 600
    assert 0 < report.latency.p50_ms <= report.latency.p99_ms <= report.latency.p999_ms <= report.latency.max_ms
    assert 240 <= report.achieved_rate_per_s <= 301  # 300/s offered; a loaded machine answers late
    # The floor approves everything, so exactly the negative kinds are mismatches, except
    # wrong PINs: a 4-digit PVV lets ~1 in 10,000 through, so the simulator accepts a 00 for them.
    negatives = sum(report.kinds[name].answered for name in NEGATIVE_KINDS if name in report.kinds
                    and name != "wrong_pin")
    assert negatives > 0 and report.mismatches == negatives
    assert "wrong_cvc2" in report.render() and b'"p999_ms"' in report.to_json()


def delaying_handler(delayed: list[int], delay_s: float = 0.03):
    """Answers every third request `delay_s` late, so responses overtake each other."""

    async def handler(stream: trio.SocketStream) -> None:
        reader, lock, count = FrameReader(), trio.Lock(), 0

        async def respond(payload: bytes, delay_s: float) -> None:
            await trio.sleep(delay_s)
            async with lock:
                await stream.send_all(frame(answer(payload)))

        try:
            async with trio.open_nursery() as nursery:
                while data := await stream.receive_some(65536):
                    for payload in reader.feed(data):
                        count += 1
                        late = count % 3 == 0
                        delayed[0] += late
                        nursery.start_soon(respond, payload, delay_s if late else 0.0)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    return handler


async def test_responses_out_of_order_are_matched_on_fields_11_and_37(cards_path: Path) -> None:
    delayed = [0]
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, delaying_handler(delayed))
        report = await run_load(quiet_config(cards_path, port, duration_s=1.5))
        nursery.cancel_scope.cancel()
    assert delayed[0] >= 100
    assert report.answered == report.sent == 450
    assert report.unmatched_responses == report.timeouts == 0
    assert report.service_time.p99_ms >= 25  # the delayed third really was late


async def test_a_response_after_its_timeout_is_counted_late_not_answered(cards_path: Path) -> None:
    delayed = [0]
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, delaying_handler(delayed, delay_s=0.45))
        report = await run_load(quiet_config(cards_path, port, count=60, duration_s=None, rate_per_s=200.0,
                                             timeout_s=0.3, connections=1, echo_interval_s=30.0))  # fmt: skip
        nursery.cancel_scope.cancel()
    # The sign-on is frame 1, so requests 2, 5, 8, ... (every third frame) were held back.
    assert delayed[0] == 20 and report.sent == 60
    assert report.timeouts == 20 and report.answered == 40 and report.unmatched_responses == 0
    # Answers 0.45 s late, timeouts at 0.3 s, the last deadline at ~0.6 s: the first ~10 held-back
    # answers arrive after their timeout but before the drain ends.
    assert 1 <= report.late_responses <= 20


def rrn_mangling_handler():
    """Echoes field 11 but not the request's field 37: nothing may match."""

    async def handler(stream: trio.SocketStream) -> None:
        reader = FrameReader()
        try:
            while data := await stream.receive_some(65536):
                for payload in reader.feed(data):
                    request, _ = iso8583.decode(payload, SPEC)
                    response = build_response(request)
                    if "37" in response:
                        response["37"] = "999999999999"
                    await stream.send_all(frame(bytes(iso8583.encode(response, SPEC)[0])))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    return handler


async def test_a_response_with_the_wrong_rrn_is_not_matched(cards_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, rrn_mangling_handler())
        report = await run_load(quiet_config(cards_path, port, count=40, duration_s=None, rate_per_s=200.0,
                                             timeout_s=0.3, connections=1))  # fmt: skip
        nursery.cancel_scope.cancel()
    assert report.sent == 40 and report.answered == 0
    assert report.unmatched_responses == 40 and report.timeouts == 40
    assert report.latency.count == 40 and report.latency.p50_ms >= 290  # timeouts charged at 0.3 s


def stalling_handler(stall_after: int, stall_s: float):
    """Answers at once, except that it stops reading for `stall_s` once, at request `stall_after`."""
    count = [0]

    async def handler(stream: trio.SocketStream) -> None:
        reader = FrameReader()
        try:
            while data := await stream.receive_some(65536):
                responses = []
                for payload in reader.feed(data):
                    count[0] += 1
                    if count[0] == stall_after:
                        await trio.sleep(stall_s)
                    responses.append(frame(answer(payload)))
                await stream.send_all(b"".join(responses))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    return handler


async def test_a_single_stall_is_charged_to_every_request_it_delayed(cards_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, stalling_handler(stall_after=300, stall_s=0.2))
        config = quiet_config(cards_path, port, rate_per_s=500.0, connections=1, outstanding_per_connection_max=4,
                              echo_interval_s=30.0)  # fmt: skip
        report = await run_load(config)
        nursery.cancel_scope.cancel()
    assert report.answered == 1000 and report.timeouts == 0
    # About 100 requests were due during the 200 ms stall while at most 4 were in flight: measured
    # from their intended send times, about 5% of all requests waited over 100 ms ...
    assert report.latency.p99_ms >= 100 and report.latency.p999_ms >= 100
    # ... which a closed-loop view (from the actual send) hides: it sees only the 4 in flight.
    assert report.service_time.p99_ms < 100
    assert report.send_lag.max_ms >= 150  # the sender really was held back by the bound


async def test_a_connection_closed_by_the_server_is_accounted_for(cards_path: Path) -> None:
    async def closing_handler(stream: trio.SocketStream) -> None:
        reader, count = FrameReader(), 0
        async with stream:
            while data := await stream.receive_some(65536):
                for payload in reader.feed(data):
                    count += 1
                    if count > 50:  # sign-on + 49 requests, then hang up with requests in flight
                        return
                    await stream.send_all(frame(answer(payload)))

    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, closing_handler)
        report = await run_load(quiet_config(cards_path, port, duration_s=1.0, connections=2))
        nursery.cancel_scope.cancel()
    assert len(report.connection_errors) == 2
    assert report.answered == 98
    assert report.sent + report.unsent == report.planned == 300
    assert report.answered + report.timeouts + report.lost == report.sent


async def test_nothing_listening_is_a_load_error(cards_path: Path) -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(LoadError, match="connection 0"):
            await run_load(quiet_config(cards_path, port, connect_timeout_s=1.0))


def test_command_line_prints_the_table_and_writes_json(cards_path: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from simulators.network.target import free_port, start_floor

    port = free_port()
    server = start_floor(port, tmp_path / "floor.log")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "simulators.network", "--cards", str(cards_path), "--port", str(port),
             "--rate", "200", "--duration", "1", "--connections", "2", "--progress", "0.5",
             "--json", str(tmp_path / "report.json")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        assert server.stop() == 0
    assert done.returncode == 1, done.stderr  # the floor approves wrong CVC2s: mismatches
    assert "t=" in done.stdout and "wrong_cvc2" in done.stdout and "p99.9" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sent"] == report["answered"] == 200 and report["mismatches"] > 0
    for card in load_cards(cards_path)[:20]:  # no card data on the screen or in the report
        assert card.pan not in done.stdout and card.pan not in json.dumps(report)


def test_config_rejects_unbounded_or_empty_runs(cards_path: Path) -> None:
    with pytest.raises(ValueError):
        LoadConfig(cards_path=cards_path, port=1, duration_s=None, count=None)
    with pytest.raises(ValueError):
        LoadConfig(cards_path=cards_path, port=1, rate_per_s=0)
    with pytest.raises(ValueError):
        LoadConfig(cards_path=cards_path, port=1, connections=1000)
    with pytest.raises(ValueError):
        MixWeights.parse("purchase=1,teleport=2")
    assert LoadConfig(cards_path=cards_path, port=1, rate_per_s=100, duration_s=2, count=50).planned == 50
    assert attrs.evolve(MixWeights.parse("atm=20"), purchase=0).atm == 20


# -- make demo -------------------------------------------------------------------------------------


def test_demo_only_ever_removes_a_previous_data_directory(tmp_path: Path) -> None:
    from simulators.demo import fresh_data_dir
    from simulators.network.target import TargetError

    fresh_data_dir(tmp_path / "missing")  # nothing there: nothing to do
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(TargetError, match="not removing"):
        fresh_data_dir(foreign)
    assert (foreign / "thesis.tex").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(TargetError, match="not a directory"):
        fresh_data_dir(tmp_path / "a-file")
    previous = tmp_path / "demo-data"
    (previous / "ledger").mkdir(parents=True)
    (previous / "authsrv.toml").write_text("# settings")
    fresh_data_dir(previous)
    assert not previous.exists()


def test_demo_prints_the_ledger_verdict_and_totals_compactly() -> None:
    from simulators.demo import verify_lines

    output = (
        '{"ok": true, "problems": [], "pending_holds": 3, "last_seq": 42, "totals": {"EUR": {'
        '"user_balance": {"balance": 200000000, "count": 200}, "funding": {"balance": -400000000}}}}'
    )
    lines = verify_lines(output)
    assert lines[:3] == ["ok: True", "pending_holds: 3", "last_seq: 42"]
    assert "  EUR: user_balance 200,000,000, funding -400,000,000" in lines
    broken = verify_lines('{"ok": false, "problems": ["hold 7 applied twice"], "totals": {}}')
    assert "problems (1):" in broken and "  hold 7 applied twice" in broken
    raw = "Traceback (most recent call last):\n  boom"
    assert verify_lines(raw) == raw.splitlines()


@pytest.mark.slow
def test_demo_end_to_end_against_authsrv(tmp_path: Path) -> None:
    """`make demo` in miniature: the real server, 5 s of the mix, clean stop, ledger verify."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "simulators.demo", "--seconds", "5", "--users", "200", "--rate", "200",
         "--data", str(tmp_path / "demo-data")],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "RESULT: PASS" in done.stdout and "ledger verify: PASS" in done.stdout


def test_load_config_leaves_hot_cards_off_unless_asked(cards_path: Path) -> None:
    """Library callers that seeded every balance alike keep the uniform pick (tests/test_hot_cards.py
    covers the model itself); the command line too, unless --hot-cards is given (the bench gives it)."""
    from simulators.network import HotCards
    from simulators.network.__main__ import _parser

    assert not LoadConfig(cards_path=cards_path, port=1).hot.enabled
    args = _parser().parse_args(["--cards", str(cards_path)])
    assert not HotCards(fraction=args.hot_cards, share=args.hot_share).enabled
    args = _parser().parse_args(["--cards", str(cards_path), "--hot-cards", "0.01"])
    assert HotCards(fraction=args.hot_cards, share=args.hot_share) == HotCards.default()
    hot = LoadConfig(cards_path=cards_path, port=1, hot=HotCards.default()).hot
    factory = RequestFactory(load_cards(cards_path), weights=MixWeights(), rng=random.Random(1), zpk=ZPK,
                             amounts=Amounts(), acquirer_id="535001", rrn_tag="123", hot=hot)  # fmt: skip
    assert factory.hot_cards == load_cards(cards_path)[:2]  # 1% of 200


async def test_the_pump_keeps_its_survivors_frozen_and_hands_them_back_at_the_end(cards_path: Path) -> None:
    # A full collection in the generator pauses its sends (up to 166 ms in a 30-minute soak): the
    # pump freezes what survived every GC_FREEZE_INTERVAL_S, and unfreezes all of it when it ends.
    import gc

    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery)
        report = await run_load(quiet_config(cards_path, port, duration_s=1.6, connections=2),
                                progress=lambda _: seen.append(gc.get_freeze_count()), progress_interval_s=0.5)
        nursery.cancel_scope.cancel()
    assert report.answered == report.sent > 0
    assert seen and min(seen) > 0  # frozen while the pump ran
    assert gc.get_freeze_count() == 0  # and handed back to the collector
