"""`authsrv init`, `authsrv partner add` and `authsrv seed` against real files, keys and ledger."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography import x509

from authsrv import cardsec, pki
from authsrv.config import Config, PartnerConfig, load_config
from authsrv.store.db import DataDirLock, Store
from authsrv.store.index import CardStatus, load_index
from authsrv.store.init import InitError, init_data_dir
from authsrv.store.partners import PartnerError, add_partner
from authsrv.store.seed import SeedError, seed
from ledger.durable import DurableLedger
from ledger.types import AccountFlags, AccountKind

CARD_LINE_KEYS = ["pan", "expiry", "cvc2", "pin", "cardId", "customerId", "balanceId", "currency"]
REPO = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("template") / "data"
    init_data_dir(directory)
    return directory


@pytest.fixture
def data_dir(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of an initialised directory (init itself is tested once, below)."""
    directory = tmp_path / "data"
    shutil.copytree(template, directory)  # copy2 keeps the modes
    return directory


def _ledger_balances(data_dir: Path, account_ids: list[int]) -> dict[int, int]:
    ledger = DurableLedger.open(data_dir / "ledger")
    try:
        return {account_id: ledger.ledger.balance(account_id).posted for account_id in account_ids}
    finally:
        ledger.close()


# -- init ------------------------------------------------------------------------------------------


def test_init_creates_the_whole_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "data"
    init_data_dir(directory)
    printed = capsys.readouterr().out
    password = (directory / "admin-password").read_text().strip()
    assert password not in printed and "admin-password" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging directory left over

    assert _mode(directory) == 0o700
    assert _mode(directory / "admin-password") == 0o600 and len(password) >= 24
    assert _mode(directory / "keys") == 0o700
    for name in ("pan.key", "index.key", "cvk.hex", "pvk.hex", "zpk.hex"):
        assert _mode(directory / "keys" / name) == 0o600
    zpk = (directory / "keys" / "zpk.hex").read_text()
    assert len(zpk) == 33 and zpk.endswith("\n") and int(zpk, 16) >= 0
    cardsec.CardKeys.load(directory / "keys")
    for stem in ("ca", "server", "partner"):
        assert (directory / "pki" / f"{stem}.crt").exists() and _mode(directory / "pki" / f"{stem}.key") == 0o600
    partner_cert = x509.load_pem_x509_certificate((directory / "pki" / "partner.crt").read_bytes())
    assert pki.certificate_common_name(partner_cert) == "demo"
    assert _mode(directory / "store.db") == 0o600

    config = load_config(directory)
    assert config == Config(partners={"demo": PartnerConfig(collateral="deposit")})  # all defaults
    with Store.open(directory / "store.db") as store:
        demo = store.get_partner("demo")
        assert (demo.balance_mode, demo.collateral) == ("internal", "deposit")
        program = store.get_program("0019167984")
        assert (program.card_type, program.currency, program.bin, program.expiry_years) == ("virtual", "EUR", "535522", 3)
        assert (json.loads(program.fees_json), json.loads(program.limits_json)) == ({}, {})
        assert store.check_admin_password("admin", password).role == "Admin"
        assert store.check_admin_password("admin", password + "x") is None
        accounts = store.all_ledger_accounts()
    kinds = sorted(a.kind for a in accounts)
    assert kinds == sorted([AccountKind.settlement, AccountKind.funding, AccountKind.partner_deposit,
                            AccountKind.collateral_usage, AccountKind.fee_income])  # fmt: skip
    assert {a.currency for a in accounts} == {"EUR"}
    ledger = DurableLedger.open(directory / "ledger")
    try:
        for spec in accounts:
            view = ledger.ledger.account(spec.id)
            assert (view.kind, view.flags, view.currency) == (spec.kind, spec.flags, spec.currency)
        deposit = next(a for a in accounts if a.kind == AccountKind.partner_deposit)
        assert deposit.flags == AccountFlags.debits_must_not_exceed_credits
    finally:
        ledger.close()


def test_init_accepts_an_empty_directory(tmp_path: Path) -> None:
    directory = tmp_path / "empty"
    directory.mkdir()
    init_data_dir(directory)
    assert (directory / "authsrv.toml").exists() and (directory / "store.db").exists()


def test_init_refuses_a_non_empty_directory_or_a_file(tmp_path: Path) -> None:
    directory = tmp_path / "used"
    directory.mkdir()
    (directory / "precious.txt").write_text("keep me")
    with pytest.raises(InitError, match="not empty"):
        init_data_dir(directory)
    assert [p.name for p in directory.iterdir()] == ["precious.txt"]
    assert (directory / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InitError, match="not a directory"):
        init_data_dir(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "used"]


def test_cli_init_refuses_an_existing_directory(template: Path) -> None:
    before = sorted(p.name for p in template.iterdir())
    completed = subprocess.run(
        [sys.executable, "-m", "authsrv", "init", "--data", str(template)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "not empty" in completed.stderr
    assert sorted(p.name for p in template.iterdir()) == before


# -- partner add -----------------------------------------------------------------------------------


def test_partner_add(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_partner(data_dir, "acme-pay_2")
    assert "acme-pay_2" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((data_dir / "pki" / "acme-pay_2.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((data_dir / "pki" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert pki.certificate_common_name(cert) == "acme-pay_2"
    assert _mode(data_dir / "pki" / "acme-pay_2.key") == 0o600
    assert load_config(data_dir).partners["acme-pay_2"] == PartnerConfig()
    with Store.open(data_dir) as store:
        row = store.get_partner("acme-pay_2")
        assert (row.balance_mode, row.collateral) == ("internal", "deposit")


@pytest.mark.parametrize(
    ("name", "message"),
    [("demo", "already exists"), ("Acme", "must be"), ("a" * 33, "must be"), ("", "must be"),
     ("../x", "must be"), ("a b", "must be"), ("ca", "reserved"), ("server", "reserved"),
     ("partner", "reserved")],
)  # fmt: skip
def test_partner_add_refuses(data_dir: Path, name: str, message: str) -> None:
    config_before = (data_dir / "authsrv.toml").read_text()
    pki_before = sorted(p.name for p in (data_dir / "pki").iterdir())
    with pytest.raises(PartnerError, match=message):
        add_partner(data_dir, name)
    assert (data_dir / "authsrv.toml").read_text() == config_before
    assert sorted(p.name for p in (data_dir / "pki").iterdir()) == pki_before


def test_partner_add_twice_is_refused(data_dir: Path) -> None:
    add_partner(data_dir, "acme")
    with pytest.raises(PartnerError, match="already exists"):
        add_partner(data_dir, "acme")


# -- seed ------------------------------------------------------------------------------------------


def test_seed_users_with_cards(data_dir: Path) -> None:
    report = seed(data_dir, users=200, cards_per_user=2, amount=12_345, progress=False)
    assert (report.users, report.cards, report.collateral_funded) == (200, 400, 200 * 12_345)
    assert report.first_customer_id == 1 and report.last_customer_id == 200
    assert "200 users" in report.summary()
    cards_file = data_dir / "cards.jsonl"
    assert _mode(cards_file) == 0o600
    lines = [json.loads(line) for line in cards_file.read_text().splitlines()]
    assert len(lines) == 400
    keys = cardsec.CardKeys.load(data_dir / "keys")
    vault = cardsec.PanVault(keys)
    today = datetime.date.today()
    expected_expiry = f"{(today.year + 3) % 100:02d}{today.month:02d}"
    assert len({line["pan"] for line in lines}) == 400
    assert Counter(line["customerId"] for line in lines) == {i: 2 for i in range(1, 201)}
    with Store.open(data_dir) as store:
        index = load_index(store)
        false_accepts = 0
        for line in lines:
            assert list(line) == CARD_LINE_KEYS
            pan = line["pan"]
            assert pan.startswith("535522") and len(pan) == 16 and cardsec.luhn_valid(pan)
            assert line["expiry"] == expected_expiry and line["currency"] == "EUR"
            assert len(line["pin"]) == 4 and line["pin"].isdigit()
            assert line["cvc2"] == cardsec.cvc2(pan, line["expiry"], keys.cvk)
            card = store.card_by_pan_index(vault.index(pan))
            assert card.id == line["cardId"] and vault.decrypt(card.pan_enc) == pan
            assert (card.user_id, card.balance_id) == (line["customerId"], line["balanceId"])
            assert (card.status, card.card_type, card.config_id) == (CardStatus.active, "virtual", "0019167984")
            assert cardsec.verify_pin(pan, line["pin"], card.pvv, keys.pvk)
            # A 4-digit PVV accepts about 1 wrong PIN in 10,000: count, do not forbid.
            false_accepts += cardsec.verify_pin(pan, f"{(int(line['pin']) + 1) % 10000:04d}", card.pvv, keys.pvk)
            state = index.card_by_pan_index(vault.index(pan))
            assert state.card_id == card.id and state.status is CardStatus.active and state.currency == "EUR"
        assert false_accepts <= 3  # 400 tries at ~1e-4 each: more would mean a broken PVV
        user = store.get_user(lines[0]["customerId"])
        assert (user.kyc, user.partner) == ("SUCCESS", "demo")
        balance_accounts = {store.get_balance(line["balanceId"]).ledger_account_id for line in lines}
        collateral = index.partner("demo").collateral_account_ids["EUR"]
    assert len(balance_accounts) == 200
    balances = _ledger_balances(data_dir, [*balance_accounts, collateral])
    assert all(balances[account] == 12_345 for account in balance_accounts)
    assert balances[collateral] == 200 * 12_345  # the collateral covers every seeded balance


def test_seed_again_adds_users_and_appends(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cards.jsonl"
    first = seed(data_dir, users=30, out=out, progress=False)
    second = seed(data_dir, users=20, cards_per_user=3, amount=500, out=out, progress=False)
    assert (second.first_customer_id, second.last_customer_id) == (31, 50)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 30 + 60
    assert len({line["pan"] for line in lines}) == len({line["cardId"] for line in lines}) == 90
    assert not (data_dir / "cards.jsonl").exists()
    with Store.open(data_dir) as store:
        collateral = load_index(store).partner("demo").collateral_account_ids["EUR"]
        last_balance = store.get_balance(lines[-1]["balanceId"]).ledger_account_id
    balances = _ledger_balances(data_dir, [collateral, last_balance])
    assert balances == {collateral: first.collateral_funded + second.collateral_funded, last_balance: 500}


def test_seed_refuses_while_the_server_holds_the_lock(data_dir: Path) -> None:
    store_before = (data_dir / "store.db").read_bytes()
    with DataDirLock.acquire(data_dir):
        with pytest.raises(SeedError, match="the server is running; stop it or use the admin API"):
            seed(data_dir, users=5, progress=False)
    assert not (data_dir / "cards.jsonl").exists()
    assert (data_dir / "store.db").read_bytes() == store_before
    seed(data_dir, users=5, progress=False)  # free again


def test_seed_for_an_added_partner(data_dir: Path) -> None:
    add_partner(data_dir, "acme")
    report = seed(data_dir, users=3, partner="acme", currency="USD", amount=700, progress=False)
    assert report.collateral_funded == 2100
    with Store.open(data_dir) as store:
        index = load_index(store)
        acme = index.partner("acme")
        assert set(acme.collateral_account_ids) == {"USD"}
        assert index.settlement_account("USD") is not None
        card = index.card_by_id(1)
        assert (card.partner, card.currency) == ("acme", "USD")
    balances = _ledger_balances(data_dir, [acme.collateral_account_ids["USD"], card.balance_account_id])
    assert balances == {acme.collateral_account_ids["USD"]: 2100, card.balance_account_id: 700}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"users": 0}, "users must be"), ({"users": 1, "cards_per_user": 0}, "cards per user"),
     ({"users": 1, "amount": 0}, "amount must be"), ({"users": 2, "amount": 2**62}, "amount must be"),
     ({"users": 1, "currency": "eur"}, "currency"), ({"users": 1, "partner": "nobody"}, "unknown partner"),
     ({"users": 1, "config_id": "0000000000"}, "unknown card program")],
)  # fmt: skip
def test_seed_refuses_bad_arguments(data_dir: Path, arguments: dict, message: str) -> None:
    with pytest.raises(SeedError, match=message):
        seed(data_dir, progress=False, **arguments)
    assert not (data_dir / "cards.jsonl").exists()
    with Store.open(data_dir) as store:
        assert store.get_user(1) is None


def test_seed_refuses_a_directory_that_is_not_initialised(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="authsrv init"):
        seed(tmp_path, users=1, progress=False)


def test_seed_progress_bar(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(data_dir, users=10, progress=True)
    err = capsys.readouterr().err
    assert "\r" in err and "10/10" in err and "ETA" in err
    assert "535522" not in err


@pytest.mark.slow
def test_seed_100k_users_under_a_minute(data_dir: Path) -> None:
    started = time.perf_counter()
    report = seed(data_dir, users=100_000, progress=False)
    elapsed = time.perf_counter() - started
    print(f"seeded 100,000 users in {elapsed:.1f} s")
    assert elapsed < 60
    assert sum(1 for _ in (data_dir / "cards.jsonl").open()) == 100_000 == report.cards
    with Store.open(data_dir) as store:
        started = time.perf_counter()
        index = load_index(store)
        loaded_s = time.perf_counter() - started
    print(f"index of 100,000 cards loaded in {loaded_s:.2f} s")
    assert len(index) == 100_000 and loaded_s < 5
    assert os.path.getsize(data_dir / "cards.jsonl") > 100_000 * 100


# -- seed for an external-balance partner (issue 5) -----------------------------------------------


def _make_external(data_dir: Path, name: str) -> None:
    """What an operator does after `authsrv partner add`: its table says external, with an api_url."""
    from authsrv.config import render_partner_table

    path = data_dir / "authsrv.toml"
    head, found, _ = path.read_text().partition(f"[partners.{name}]")
    assert found  # `partner add` appends the table last, so everything after it is the table
    settings = PartnerConfig(balance_mode="external", api_url="http://127.0.0.1:9/partner")
    path.write_text(head + render_partner_table(name, settings))


def test_seed_for_an_external_partner_funds_only_the_collateral(data_dir: Path, tmp_path: Path) -> None:
    add_partner(data_dir, "ext")
    _make_external(data_dir, "ext")
    with Store.open(data_dir) as store:
        assert store.get_partner("ext").balance_mode == "internal"  # the store follows at seed/serve
    out = tmp_path / "ext-cards.jsonl"
    report = seed(data_dir, users=20, cards_per_user=2, amount=3_000, partner="ext", out=out, progress=False,
                  unlinked=True)  # fmt: skip
    assert (report.users, report.cards, report.balance_mode) == (20, 40, "external")
    assert report.collateral_funded == 20 * 3_000  # every seeded balance can be spent in full
    assert "held at partner ext" in report.summary() and "funded with 3000 EUR" not in report.summary()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 40 and all(list(line) == CARD_LINE_KEYS for line in lines)
    assert _mode(out) == 0o600
    keys = cardsec.CardKeys.load(data_dir / "keys")
    vault = cardsec.PanVault(keys)
    with Store.open(data_dir) as store:
        assert store.get_partner("ext").balance_mode == "external"
        index = load_index(store)
        ext = index.partner("ext")
        assert ext.balance_mode == "external"
        accounts = set()
        for line in lines:
            card = store.card_by_pan_index(vault.index(line["pan"]))
            assert (card.partner, card.status, card.balance_id) == ("ext", CardStatus.active, line["balanceId"])
            assert cardsec.verify_pin(line["pan"], line["pin"], card.pvv, keys.pvk)
            balance = store.get_balance(line["balanceId"])
            assert (balance.partner, balance.user_id, balance.currency) == ("ext", line["customerId"], "EUR")
            user = store.get_user(line["customerId"])
            assert (user.partner, user.kyc) == ("ext", "SUCCESS")
            accounts.add(balance.ledger_account_id)
            assert index.card_by_pan_index(vault.index(line["pan"])).status is CardStatus.active
        funding = index.funding_account("EUR")
        collateral = ext.collateral_account_ids["EUR"]
        demo_collateral = index.partner("demo").collateral_account_ids["EUR"]
    assert len(accounts) == 20
    balances = _ledger_balances(data_dir, [*accounts, collateral, funding, demo_collateral])
    assert all(balances[account] == 0 for account in accounts)  # created, never funded here
    assert balances[collateral] == 60_000 and balances[demo_collateral] == 0
    assert balances[funding] == -60_000  # the collateral transfer is the only money seeding moved


def test_seed_internal_and_external_partners_into_one_data_directory(data_dir: Path) -> None:
    add_partner(data_dir, "ext")
    _make_external(data_dir, "ext")
    internal = seed(data_dir, users=5, amount=1_000, progress=False)
    external = seed(data_dir, users=7, amount=2_000, partner="ext", progress=False, unlinked=True)
    assert (internal.balance_mode, external.balance_mode) == ("internal", "external")
    assert (external.first_customer_id, external.last_customer_id) == (6, 12)
    lines = [json.loads(line) for line in (data_dir / "cards.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    with Store.open(data_dir) as store:
        index = load_index(store)
        accounts = {line["customerId"]: store.get_balance(line["balanceId"]).ledger_account_id for line in lines}
        funding = index.funding_account("EUR")
    balances = _ledger_balances(data_dir, [*accounts.values(), funding])
    assert [balances[accounts[user]] for user in range(1, 13)] == [1_000] * 5 + [0] * 7
    # demo: 5 balances and its collateral; ext: only its collateral
    assert balances[funding] == -(5 * 1_000 + 5 * 1_000 + 7 * 2_000)


def test_cli_seed_external_partner(data_dir: Path, tmp_path: Path) -> None:
    add_partner(data_dir, "ext")
    _make_external(data_dir, "ext")
    out = tmp_path / "cards.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "authsrv", "seed", "--data", str(data_dir), "--partner", "ext", "--users", "3",
         "--out", str(out), "--quiet", "--unlinked"], capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "held at partner ext" in done.stdout and len(out.read_text().splitlines()) == 3


def test_seed_refuses_an_external_partner_unless_told_the_balances_are_linked_elsewhere(
    data_dir: Path, tmp_path: Path
) -> None:
    """Seeded balances are never told to the partner: without --unlinked, `authsrv seed` says so and
    exits 2, having created nothing (no user, no cards file, the store's partner row unchanged)."""
    add_partner(data_dir, "ext")
    _make_external(data_dir, "ext")
    out = tmp_path / "cards.jsonl"
    with Store.open(data_dir) as store:
        users_before = store.db["users"].count
    done = subprocess.run(
        [sys.executable, "-m", "authsrv", "seed", "--data", str(data_dir), "--partner", "ext", "--users", "3",
         "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "authsrv seed: partner 'ext'" in done.stderr and 'balance_mode = "external"' in done.stderr
    assert "--unlinked" in done.stderr and "http://127.0.0.1:9/partner" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not out.exists()
    with pytest.raises(SeedError, match="never hear of them"):
        seed(data_dir, users=3, partner="ext", out=out, progress=False)
    assert not out.exists()
    with Store.open(data_dir) as store:
        assert store.db["users"].count == users_before  # nothing was created
        assert store.get_partner("ext").balance_mode == "internal"  # the sync rolled back with the rest
    # The internal partner needs no such flag, and accepts it (it changes nothing there).
    assert seed(data_dir, users=2, out=out, progress=False, unlinked=True).balance_mode == "internal"
