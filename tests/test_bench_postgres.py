"""The PostgreSQL baseline (issue 7): its pure parts here; anything that starts PostgreSQL is slow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import postgres
from bench.harness import (
    TARGETS,
    BenchResults,
    Machine,
    Ratios,
    TargetResult,
    compute_baseline_ratios,
    compute_ratios,
    stronger_baseline,
    summary,
)
from bench.pg_baseline import (
    RESPONSE_CODES,
    Action,
    Auth,
    FunctionPool,
    Outcome,
    Result,
    authorize,
    build_response,
    cvc2_of,
    function_params,
    parse_request,
    pin_of,
)
from simulators.network.cards import load_cards, write_synthetic_cards
from simulators.network.pinblock import encrypt_pin_block

REPO = Path(__file__).resolve().parent.parent
PAN = "5355220000000018"
ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
POSTGRES_MISSING = postgres.unavailable_reason()


def purchase(**fields: str) -> dict[str, str]:
    request = {"t": "0100", "2": PAN, "3": "000000", "4": "000000001234", "7": "1122020000", "11": "000001",
               "14": "2812", "32": "123456", "37": "001000000001", "41": "TERM0001", "49": "978",
               "48": "9203123"}  # fmt: skip
    request.update(fields)
    return request


def test_field48_subelement_92_is_the_cvc2() -> None:
    assert cvc2_of("9203123") == "123"
    assert cvc2_of("1102AB9203987") == "987"  # after another subelement
    assert cvc2_of("1102AB") is None
    assert cvc2_of("") is None


def test_requests_map_to_actions_and_amounts() -> None:
    auth = parse_request(purchase())
    assert isinstance(auth, Auth)
    assert (auth.action, auth.amount_minor, auth.cvc2, auth.expiry, auth.rrn) == (
        Action.debit, 1234, "123", "2812", "001000000001")  # fmt: skip
    assert PAN not in repr(auth) and "123" not in repr(auth).replace("1234", "")
    assert parse_request(purchase(**{"6": "000000000999", "51": "840"})).amount_minor == 999  # billing amount
    assert parse_request(purchase(**{"3": "200000"})).action is Action.credit
    assert parse_request(purchase(**{"3": "300000"})).action is Action.inquiry
    assert parse_request(purchase(t="0120")).action is Action.force
    reversal = parse_request(purchase(t="0400", **{"95": "000000000600" + "0" * 30}))
    assert reversal.action is Action.reversal and reversal.remaining_minor == 600
    track2 = purchase(**{"35": f"{PAN}=29012010000000000", "t": "0200", "3": "010000"})
    del track2["2"], track2["14"]
    atm = parse_request(track2)
    assert (atm.action, atm.pan, atm.expiry) == (Action.debit, PAN, "2901")
    assert parse_request(purchase(**{"3": "400000"})) is Result.unsupported
    assert parse_request(purchase(**{"2": "12ab"})) is Result.format_error


def test_pin_blocks_decrypt_to_the_pin_and_garbage_to_none() -> None:
    assert pin_of(encrypt_pin_block("4321", PAN, ZPK), PAN, ZPK) == "4321"
    assert pin_of(encrypt_pin_block("123456789012", PAN, ZPK), PAN, ZPK) == "123456789012"
    other_key = bytes(reversed(ZPK))
    assert pin_of(encrypt_pin_block("4321", PAN, ZPK), PAN, other_key) != "4321"


def test_responses_carry_the_contract_codes_and_the_balance() -> None:
    assert RESPONSE_CODES[Result.approved] == "00" and RESPONSE_CODES[Result.wrong_cvc2] == "N7"
    approved = build_response(purchase(), Outcome(Result.approved, 5000))
    assert (approved["t"], approved["39"], approved["38"], approved["2"]) == ("0110", "00", "PGBASE", PAN)
    assert approved["54"] == "0002978C000000005000"
    declined = build_response(purchase(), Outcome(Result.insufficient_funds))
    assert declined["39"] == "51" and "38" not in declined and "54" not in declined
    echo = build_response({"t": "0800", "7": "1122020000", "11": "000001", "70": "301"}, Outcome(Result.approved))
    assert echo == {"t": "0810", "7": "1122020000", "11": "000001", "70": "301", "39": "00"}


def test_cards_file_becomes_copy_rows_without_clear_pans(tmp_path: Path) -> None:
    cards_path = tmp_path / "cards.jsonl"
    write_synthetic_cards(cards_path, 50, seed=3)
    cards, balances = postgres.balance_rows(cards_path, 7_000)
    assert len(cards) == 50 and len(balances) == 50 and {amount for _, amount in balances} == {7_000}
    first = load_cards(cards_path)[0]
    assert cards[0][0] == postgres.pan_index(first.pan) and len(cards[0][0]) == 32
    assert first.pan not in repr(cards) and cards[0][1].startswith(first.pan[:6])


def test_harness_knows_the_postgres_target_and_prints_its_ratio() -> None:
    assert "postgres" in TARGETS
    reason = postgres.unavailable_reason()
    assert reason is None or "postgres" in reason.lower() or "initdb" in reason or "psycopg" in reason
    from tests.test_bench_harness import make_step

    targets = {
        "authsrv": TargetResult(name="authsrv", steps=[make_step(1000, cpu=0.4)], sustained_rate_per_s=1000.0,
                                stop_reason="all rates offered"),
        "postgres": TargetResult(name="postgres", steps=[make_step(1000, p99_ms=8.0, cpu=2.0)],
                                 sustained_rate_per_s=250.0, stop_reason="p99"),
    }  # fmt: skip
    ratios = compute_ratios(targets, "authsrv", "postgres")
    assert isinstance(ratios, Ratios) and ratios.sustained_rate == 4.0 and ratios.per_rate[0].cpu_s_per_1000 == 0.2
    results = BenchResults(created_utc="2026-01-01T00:00:00+00:00",
                           machine=Machine(cpu_model="x", cores=2, python="3.11", platform="linux"), settings={},
                           targets=targets, ratios=ratios)  # fmt: skip
    assert results.baseline == "postgres"
    assert "authsrv / postgres (baseline) sustained rate: 4.0" in summary(results)


def test_function_variant_sends_the_checks_inputs_and_never_a_pin_block() -> None:
    right = parse_request(purchase(**{"52": encrypt_pin_block("4321", PAN, ZPK).hex(), "4": "000000000500"}))
    assert isinstance(right, Auth)
    params = function_params(right, ZPK, "2601")
    assert params[0] == postgres.pan_index(PAN) and params[1:] == [
        b"1", b"2812", b"123", b"4321", b"500", b"001000000001", None, b"2601"]  # fmt: skip
    assert function_params(right, None, "2601")[4] == b""  # no key: a PIN that never matches, not "no PIN"
    reversal = parse_request(purchase(t="0400", **{"95": "000000000600" + "0" * 30}))
    assert function_params(reversal, ZPK, "2601")[1:8] == [b"5", b"2812", b"123", None, b"1234", b"001000000001", b"600"]


def test_the_stronger_postgres_variant_is_the_baseline() -> None:
    from tests.test_bench_harness import make_step

    def target(name: str, sustained: float | None, rates: int) -> TargetResult:
        return TargetResult(name=name, steps=[make_step(1000 * (i + 1), cpu=2.0) for i in range(rates)],
                            sustained_rate_per_s=sustained, stop_reason="p99")  # fmt: skip

    ours = TargetResult(name="authsrv", steps=[make_step(1000, cpu=0.4)], sustained_rate_per_s=2000.0,
                        stop_reason="all rates offered")  # fmt: skip
    assert "postgres-fn" in TARGETS
    assert stronger_baseline({"authsrv": ours}) == "postgres"
    assert stronger_baseline({"postgres": target("postgres", 250.0, 2), "postgres-fn": target("postgres-fn", 1000.0, 1)}) == "postgres-fn"
    assert stronger_baseline({"postgres": target("postgres", 500.0, 3), "postgres-fn": target("postgres-fn", 500.0, 2)}) == "postgres"
    assert stronger_baseline({"postgres": target("postgres", None, 1), "postgres-fn": target("postgres-fn", None, 2)}) == "postgres-fn"
    targets = {"authsrv": ours, "postgres": target("postgres", 250.0, 1), "postgres-fn": target("postgres-fn", 1000.0, 1)}
    both = compute_baseline_ratios(targets)
    assert set(both) == {"postgres", "postgres-fn"} and both["postgres-fn"].sustained_rate == 2.0
    results = BenchResults(created_utc="2026-01-01T00:00:00+00:00",
                           machine=Machine(cpu_model="x", cores=2, python="3.11", platform="linux"), settings={},
                           targets=targets, ratios=both["postgres-fn"], baseline="postgres-fn",
                           baseline_ratios=both)  # fmt: skip
    text = summary(results)
    assert "authsrv / postgres-fn (baseline) sustained rate: 2.0" in text
    assert "authsrv / postgres (the weaker baseline) sustained rate: 8.0" in text


# -- against a real throwaway PostgreSQL ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(POSTGRES_MISSING is not None, reason=f"PostgreSQL baseline unavailable: {POSTGRES_MISSING}")
def test_transactions_debit_release_and_lock_durably(tmp_path: Path) -> None:
    import psycopg

    cards_path = tmp_path / "cards.jsonl"
    write_synthetic_cards(cards_path, 10, seed=5)
    card = load_cards(cards_path)[0]
    today = time.strftime("%y%m", time.gmtime())
    with postgres.running_postgres(cards_path, amount_minor=10_000) as database:
        directory = database.directory
        assert database.cpu_s() > 0
        with psycopg.connect(database.conninfo) as connection:
            assert connection.execute("SHOW synchronous_commit").fetchone() == ("on",)

            def run(**fields: str) -> Outcome:
                request = purchase(**{"2": card.pan, "14": card.expiry, "48": "9203" + card.cvc2, **fields})
                auth = parse_request(request)
                assert isinstance(auth, Auth)
                return authorize(connection, auth, ZPK, today)

            assert run(**{"4": "000000003000"}) == Outcome(Result.approved, 7_000, changed=True)
            assert run(**{"4": "000000008000"}).result is Result.insufficient_funds
            assert run(**{"48": "9203" + f"{(int(card.cvc2) + 1) % 1000:03d}"}).result is Result.wrong_cvc2
            assert run(**{"14": "0101"}).result is Result.expired
            assert run(**{"2": "5355229999999999"}).result is Result.unknown_card
            partial = run(t="0400", **{"4": "000000003000", "95": "000000001000" + "0" * 30})
            assert partial == Outcome(Result.approved, 9_000, changed=True)  # 2,000 released, 1,000 still held
            assert run(t="0400", **{"4": "000000003000"}).available_minor == 10_000
            wrong = {"52": encrypt_pin_block(f"{(int(card.pin) + 1) % 10_000:04d}", card.pan, ZPK).hex()}
            assert [run(**wrong).result for _ in range(3)] == [Result.wrong_pin, Result.wrong_pin, Result.pin_locked]
            right = {"52": encrypt_pin_block(card.pin, card.pan, ZPK).hex()}
            assert run(**right).result is Result.pin_locked
            assert connection.execute("SELECT count(*) FROM holds").fetchone() == (0,)
    assert not directory.exists()


@pytest.mark.slow
@pytest.mark.skipif(POSTGRES_MISSING is not None, reason=f"PostgreSQL baseline unavailable: {POSTGRES_MISSING}")
@pytest.mark.parametrize("name", ["postgres", "postgres-fn"])
def test_quick_bench_of_the_postgres_target_answers_the_mix_like_authsrv(tmp_path: Path, name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--rates", "100,200", "--targets", name,
         "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    target = json.loads((tmp_path / "latest.json").read_text())["targets"][name]
    assert target["error"] is None and target["server_exit_code"] == 0
    assert [step["offered_rate_per_s"] for step in target["steps"]] == [100.0, 200.0]
    codes: set[str] = set()
    for step in target["steps"]:
        assert step["answered"] == step["sent"] and step["timeouts"] == 0 and step["mismatches"] == 0
        assert step["cpu_s_per_1000"] > 0  # the postmaster's processes are counted
        codes |= set(step["code_mix"])
    assert {"00", "51", "N7", "14", "54", "55"} <= codes


@pytest.mark.slow
@pytest.mark.skipif(POSTGRES_MISSING is not None, reason=f"PostgreSQL baseline unavailable: {POSTGRES_MISSING}")
def test_function_variant_answers_like_the_transactions_in_one_round_trip(tmp_path: Path) -> None:
    """The same requests, two databases: the PL/pgSQL function over the trio-driven nonblocking
    connection gives the transactions' results and balances, and writes the same rows."""
    import psycopg
    import trio

    cards_path = tmp_path / "cards.jsonl"
    write_synthetic_cards(cards_path, 10, seed=5)
    card, other = load_cards(cards_path)[:2]
    today = time.strftime("%y%m", time.gmtime())
    wrong_pin = {"52": encrypt_pin_block(f"{(int(card.pin) + 1) % 10_000:04d}", card.pan, ZPK).hex()}
    script = [
        {"4": "000000003000"},
        {"4": "000000008000"},  # over the balance: 51, and nothing written
        {"48": "9203" + f"{(int(card.cvc2) + 1) % 1000:03d}"},
        {"14": "0101"},
        {"2": "5355229999999999"},
        {"t": "0120", "4": "000000009000"},  # an advice: forced past the balance
        {"t": "0400", "4": "000000003000", "95": "000000001000" + "0" * 30},
        {"t": "0400", "4": "000000003000"},
        {"3": "200000", "4": "000000000500"},  # refund
        {"3": "300000"},  # balance inquiry
        {"t": "0400", "37": "999999999999"},  # an unknown original: acknowledged
        wrong_pin, wrong_pin,
        {"52": encrypt_pin_block(card.pin, card.pan, ZPK).hex()},  # right: the tries start again
        wrong_pin, wrong_pin, wrong_pin,
        {"52": encrypt_pin_block(card.pin, card.pan, ZPK).hex()},  # locked
        {"2": other.pan, "14": other.expiry, "48": "9203" + other.cvc2, "4": "000000000100"},
    ]

    def requests() -> list[Auth]:
        parsed = []
        for fields in script:
            request = purchase(**{"2": card.pan, "14": card.expiry, "48": "9203" + card.cvc2, **fields})
            auth = parse_request(request)
            assert isinstance(auth, Auth)
            parsed.append(auth)
        return parsed

    def state(conninfo: str) -> list:
        with psycopg.connect(conninfo) as connection:
            return [connection.execute("SELECT id, available FROM balances ORDER BY id").fetchall(),
                    connection.execute("SELECT balance_id, amount, rrn FROM holds ORDER BY id").fetchall(),
                    connection.execute("SELECT pan_index, status, pin_tries FROM cards ORDER BY pan_index").fetchall()]

    with postgres.running_postgres(cards_path, amount_minor=10_000) as database:
        with psycopg.connect(database.conninfo) as connection:
            expected = [authorize(connection, auth, ZPK, today) for auth in requests()]
        expected_state = state(database.conninfo)
    assert [outcome.result for outcome in expected].count(Result.approved) >= 8  # the script does what it says
    assert Result.pin_locked in [outcome.result for outcome in expected]

    with postgres.running_postgres(cards_path, amount_minor=10_000) as database:
        pool = FunctionPool(database.conninfo, 2)

        async def run_all() -> list[Outcome]:
            return [await pool.run(auth, ZPK) for auth in requests()]

        try:
            got = trio.run(run_all)
            assert pool.errors == 0
            assert state(database.conninfo) == expected_state
            # A call cancelled while PostgreSQL holds it (its balance row locked elsewhere): that
            # connection is dropped with its token, and the pool goes on with the other one.
            with psycopg.connect(database.conninfo) as blocker:
                blocker.execute("SELECT 1 FROM balances FOR UPDATE")

                async def cancelled_then_another() -> Outcome:
                    with trio.move_on_after(0.3) as scope:
                        await pool.run(requests()[-1], ZPK)  # the other card: not locked
                    assert scope.cancelled_caught
                    blocker.rollback()
                    return await pool.run(requests()[-1], ZPK)

                assert trio.run(cancelled_then_another).result is Result.approved
            assert pool.errors == 1 and len(pool.idle) == 1
        finally:
            pool.close()
    assert [(o.result, o.available_minor) for o in got] == [(o.result, o.available_minor) for o in expected]
