"""The management store and the in-memory card index built from it."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from authsrv import cardsec
from authsrv.store.db import (
    MANAGEMENT_TRANSFER_ID_BASE,
    SCHEMA_VERSION,
    DataDirBusy,
    DataDirLock,
    NewCard,
    PartnerBalanceType,
    ProgramRow,
    Role,
    Store,
    StoreConflict,
    StoreError,
    hash_secret,
    verify_secret,
)
from authsrv.store.index import CardStatus, LockReason, load_index
from ledger.types import AccountFlags, AccountKind

BIN = "535522"
PAN = cardsec.generate_pan(BIN, 730_519_864)


@pytest.fixture(scope="module")
def keys() -> cardsec.CardKeys:
    return cardsec.CardKeys.generate()


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "store.db", create=True) as opened:
        opened.add_partner("demo", balance_mode="internal", collateral="deposit")
        opened.add_program(ProgramRow("0019167984", "demo", BIN, "virtual", "EUR", 3))
        yield opened


def _user(store: Store, phone: str = "48123456789") -> int:
    return store.create_user(
        partner="demo", first_name="Ada", last_name="Lovelace", phone=phone, email=f"{phone}@example.invalid",
        birth_date="1990-01-01", state="VERIFIED", kyc="SUCCESS",
    ).id  # fmt: skip


def _card(store: Store, keys: cardsec.CardKeys, pan: str = PAN, *, pin: str = "1234") -> tuple[int, bytes]:
    vault = cardsec.PanVault(keys)
    user_id = _user(store)
    balance, _ = store.create_balance(user_id, "EUR")
    row = store.add_card(
        NewCard(
            user_id=user_id, balance_id=balance.id, config_id="0019167984", card_type="virtual",
            pan_index=vault.index(pan), pan_enc=vault.encrypt(pan), pan_first6=pan[:6],
            pan_last4=pan[-4:], expiry_yymm="2912", status=CardStatus.active,
            pvv=cardsec.pvv(pan, pin, keys.pvk),
        )
    )  # fmt: skip
    return row.id, vault.index(pan)


def test_open_requires_schema_and_checks_version(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not found"):
        Store.open(tmp_path / "store.db")
    Store.open(tmp_path / "store.db", create=True).close()
    with Store.open(tmp_path) as by_directory:  # DIR or DIR/store.db
        assert by_directory.db["meta"].get("schema_version")["value"] == str(SCHEMA_VERSION)
        assert by_directory.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        by_directory.db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 999"):
        Store.open(tmp_path / "store.db")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="no schema"):
        Store.open(tmp_path / "other.db")


def test_partners_and_programs(store: Store) -> None:
    assert store.get_partner("demo").collateral == "deposit"
    with pytest.raises(StoreConflict):
        store.add_partner("demo", balance_mode="internal", collateral="none")
    store.add_partner("acme", balance_mode="external", collateral="none")
    assert [p.name for p in store.list_partners()] == ["acme", "demo"]
    assert store.get_program("0019167984").bin == BIN
    assert store.get_program("nope") is None
    with pytest.raises(StoreConflict):
        store.add_program(ProgramRow("0019167984", "demo", BIN, "virtual", "EUR", 3))


def test_system_and_partner_accounts_are_allocated_once(store: Store) -> None:
    system = store.ensure_system_accounts("EUR")
    assert [a.kind for a in system] == [AccountKind.settlement, AccountKind.funding]
    assert store.ensure_system_accounts("EUR") == system
    partner = store.ensure_partner_accounts("demo", "EUR")
    assert [a.kind for a in partner] == [AccountKind.partner_deposit, AccountKind.collateral_usage, AccountKind.fee_income]
    assert partner[0].flags == AccountFlags.debits_must_not_exceed_credits
    assert partner[1].flags == partner[2].flags == AccountFlags.none
    assert store.ensure_partner_accounts("demo", "EUR") == partner
    usd = store.ensure_partner_accounts("demo", "USD")
    assert {a.id for a in usd}.isdisjoint(a.id for a in partner)
    (deposit,) = [b for b in store.partner_balances("demo") if b.currency == "EUR"]
    assert (deposit.type, deposit.ledger_account_id) == (PartnerBalanceType.deposit, partner[0].id)
    store.add_partner("nocoll", balance_mode="internal", collateral="none")
    assert [a.kind for a in store.ensure_partner_accounts("nocoll", "EUR")] == [AccountKind.collateral_usage, AccountKind.fee_income]
    store.add_partner("lender", balance_mode="internal", collateral="credit")
    credit = store.ensure_partner_accounts("lender", "EUR")[0]
    assert credit.kind == AccountKind.partner_credit
    ids = [a.id for a in store.all_ledger_accounts()]
    assert ids == sorted(set(ids)) and len(ids) == 2 + 3 + 3 + 2 + 3


def test_transfer_ids_are_management_range_and_never_reused(tmp_path: Path, store: Store) -> None:
    first = store.allocate_transfer_ids(10)
    second = store.allocate_transfer_ids(1)
    assert first[0] == MANAGEMENT_TRANSFER_ID_BASE + 1 and len(first) == 10
    assert second[0] == first[-1] + 1
    store.close()
    with Store.open(tmp_path / "store.db") as reopened:
        assert reopened.allocate_transfer_ids(1)[0] == second[0] + 1


def test_admin_password_hash(store: Store) -> None:
    store.add_admin("admin", Role.admin, "correct horse")
    admin = store.get_admin("admin")
    assert admin.role is Role.admin
    assert admin.password_hash.startswith("scrypt$16384$8$1$")
    assert "correct horse" not in admin.password_hash
    assert store.check_admin_password("admin", "correct horse") == admin
    assert store.check_admin_password("admin", "wrong") is None
    assert store.check_admin_password("nobody", "correct horse") is None
    with pytest.raises(StoreConflict):
        store.add_admin("admin", Role.employee, "x")


def test_secret_hash_rejects_malformed() -> None:
    stored = hash_secret("1234")
    assert verify_secret(stored, "1234") and not verify_secret(stored, "1235")
    assert hash_secret("1234") != stored  # salted
    for bad in ("", "plain", "scrypt$1$8$1$AA==$AA==", "scrypt$1048577$8$1$AA==$AA==", stored.replace("$", "$x", 1)):
        assert not verify_secret(bad, "1234")


def test_users_balances_and_cards(store: Store, keys: cardsec.CardKeys) -> None:
    card_id, pan_index = _card(store, keys)
    card = store.get_card(card_id)
    user = store.get_user(card.user_id)
    assert (user.kyc, user.partner) == ("SUCCESS", "demo")
    balance = store.get_balance(card.balance_id)
    (account,) = [a for a in store.all_ledger_accounts() if a.id == balance.ledger_account_id]
    assert account.kind == AccountKind.user_balance and account.user_data == balance.id
    assert account.flags == AccountFlags.debits_must_not_exceed_credits
    assert store.card_by_pan_index(pan_index) == card
    assert cardsec.PanVault(keys).decrypt(card.pan_enc) == PAN
    assert store.cards_of_balance(balance.id) == [card] == store.cards_of_user(user.id)
    assert store.balances_of_user(user.id) == [balance]
    assert store.update_user(user.id, kyc="REJECTED").kyc == "REJECTED"
    assert store.find_user("demo", phone=user.phone).id == user.id
    assert store.find_user("demo", email=user.email).id == user.id
    with pytest.raises(AssertionError):
        store.update_user(user.id, partner="other")
    with pytest.raises(StoreConflict):  # the same PAN twice
        _card(store, keys)


def test_no_clear_pan_pin_or_cvv_on_disk(tmp_path: Path, store: Store, keys: cardsec.CardKeys) -> None:
    _card(store, keys, pin="9876")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("store.db"))
    assert PAN.encode() not in data and PAN[6:12].encode() not in data
    columns = {column.name for table in store.db.tables for column in table.columns}
    assert not {"pan", "cvv", "cvc2", "pin", "wpin"} & columns
    assert {"pan_enc", "pan_index", "pvv", "wpin_hash"} <= columns


def test_index_finds_cards_and_follows_changes(store: Store, keys: cardsec.CardKeys) -> None:
    store.ensure_system_accounts("EUR")
    store.ensure_partner_accounts("demo", "EUR")
    card_id, pan_index = _card(store, keys)
    index = load_index(store)
    state = index.card_by_pan_index(pan_index)
    assert state is index.card_by_id(card_id)
    assert index.card_by_pan_index(b"\0" * 16) is None and index.card_by_id(999) is None
    balance = store.get_balance(state.balance_id)
    assert (state.status, state.currency, state.balance_account_id) == (CardStatus.active, "EUR", balance.ledger_account_id)
    assert (state.pan_first6, state.pan_last4, state.partner, state.card_type) == (PAN[:6], PAN[-4:], "demo", "virtual")
    assert cardsec.verify_pin(PAN, "1234", state.pvv, keys.pvk)
    demo = index.partner("demo")
    assert demo.collateral_account_ids["EUR"] == store.ledger_account(AccountKind.partner_deposit, "EUR", "demo").id
    assert set(demo.collateral_usage_account_ids) == set(demo.fee_income_account_ids) == {"EUR"}
    assert index.settlement_account("EUR") == store.ledger_account(AccountKind.settlement, "EUR", "").id
    assert index.funding_account("EUR") == store.ledger_account(AccountKind.funding, "EUR", "").id
    assert index.settlement_account("USD") is None and index.partner("nobody") is None

    # Hot-path state changes: SQLite and the very same index object, in place.
    assert [store.record_wrong_pin(card_id) for _ in range(3)] == [1, 2, 3]
    assert state.wrong_pin_count == 3 and store.get_card(card_id).wrong_pin_count == 3
    store.reset_wrong_pin(card_id)
    assert state.wrong_pin_count == 0 == store.get_card(card_id).wrong_pin_count
    store.lock_card(card_id, LockReason.pin_tries_exceeded)
    assert (state.status, state.lock_reason) == (CardStatus.locked, 6)
    assert index.card_by_pan_index(pan_index) is state
    store.lock_card(card_id, LockReason.stolen)
    store.lock_card(card_id, LockReason.suspected_fraud)  # stolen is irreversible: it stays
    assert (state.status, state.lock_reason) == (CardStatus.locked, LockReason.stolen)
    assert (store.get_card(card_id).status, store.get_card(card_id).lock_reason) == (CardStatus.locked, 2)

    # New cards, partners and currencies reach the index too.
    other_pan = cardsec.generate_pan(BIN, 42)
    other_id, other_index = _card(store, keys, other_pan)
    assert index.card_by_pan_index(other_index).card_id == other_id
    store.ensure_system_accounts("USD")
    store.ensure_partner_accounts("demo", "USD")
    assert index.settlement_account("USD") is not None
    assert set(index.partner("demo").collateral_account_ids) == {"EUR", "USD"}
    assert len(load_index(store)) == len(index) == 2


def test_index_changes_wait_for_commit(store: Store, keys: cardsec.CardKeys) -> None:
    card_id, pan_index = _card(store, keys)
    index = load_index(store)
    state = index.card_by_id(card_id)
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.record_wrong_pin(card_id)
            store.set_card_status(card_id, CardStatus.removed)
            assert state.wrong_pin_count == 0 and state.status == CardStatus.active  # not yet
            raise RuntimeError("roll back")
    assert state.wrong_pin_count == 0 and state.status == CardStatus.active
    assert store.get_card(card_id).wrong_pin_count == 0
    with store.transaction():
        store.record_wrong_pin(card_id)
        store.set_card_status(card_id, CardStatus.removed)
    assert (state.wrong_pin_count, state.status) == (1, CardStatus.removed)


def test_wrong_pin_counter_from_many_threads(store: Store, keys: cardsec.CardKeys) -> None:
    card_id, _ = _card(store, keys)
    index = load_index(store)
    counts: list[int] = []

    def work() -> None:
        for _ in range(25):
            counts.append(store.record_wrong_pin(card_id))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(counts) == list(range(1, 101))
    assert index.card_by_id(card_id).wrong_pin_count == 100 == store.get_card(card_id).wrong_pin_count


def test_data_dir_lock(tmp_path: Path) -> None:
    with DataDirLock.acquire(tmp_path) as held:
        assert held.path == tmp_path / ".lock"
        with pytest.raises(DataDirBusy, match="the server is running; stop it or use the admin API"):
            DataDirLock.acquire(tmp_path)
    DataDirLock.acquire(tmp_path).release()  # free again
    assert stat.S_IMODE((tmp_path / ".lock").stat().st_mode) == 0o600
