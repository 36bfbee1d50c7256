"""`authsrv seed`: bulk-create funded, KYC-verified users with active virtual cards (offline).

`--partner NAME` seeds another partner's users. For a partner whose `[partners.NAME]` table says
`balance_mode = "external"`, the money lives at the partner, and seeding does not tell the partner
about the balances it makes (the management API links each new balance with `POST
{api_url}/users/{id}/balances`; seeding would need the partner up, and one failed call among
100,000 would leave the two sides apart). So seeding such a partner is refused unless the caller
says it links the balances itself (`--unlinked`; the demo and the benchmark tell the partner
simulator through its `/_sim/balances`, from the cards file's customerId, balanceId and currency).
Then users, balances (with their empty ledger accounts, as the REST API creates them), cards and
the cards file are made here, but no funding transfer is. The partner's collateral deposit is still
funded with users x amount, so every seeded balance can be spent in full.

Built for 100,000 users in well under a minute on two cores:
- the store work is one `BEGIN IMMEDIATE` transaction of `insert_all` bulk inserts, with row ids
  reserved up front (consecutive ranges: no per-row lookups, and the ledger side needs no lists);
- the ledger work is one Batch per LEDGER_BATCH_USERS users (their accounts and funding transfers)
  and a single `flush_sync` at the end;
- key material and cipher contexts are built once (PanVault, cardsec's cached 3DES contexts).

Order: store commit, then ledger, then the cards file is made durable. A crash before the ledger
flush leaves users whose balances the ledger lacks: the server re-creates the accounts at start
(empty), and management transfer ids are never reused, so a re-run cannot collide with anything.

The cards file holds PINs and CVC2s in clear, which is what a test driver needs and nothing a
production system would write: mode 0600, and a re-run appends to it rather than replacing it
(a PIN cannot be recomputed, so losing the file loses the PINs).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs
import msgspec

from authsrv import cardsec
from authsrv.config import ConfigError, load_config
from authsrv.store.partners import sync_partners
from authsrv.store.db import (
    STORE_FILE_NAME,
    DataDirBusy,
    DataDirLock,
    ManagementTransferCode,
    ProgramRow,
    Store,
    StoreError,
    utc_now_iso,
)
from authsrv.store.index import CardStatus
from ledger.types import (
    AMOUNT_MAX,
    AccountFlags,
    AccountKind,
    AccountSpec,
    AccountStatus,
    Batch,
    TransferSpec,
    TransferStatus,
)

SEED_USERS_MAX = 1_000_000  # per run; memory stays flat (chunks), this bounds the run time
SEED_CARDS_PER_USER_MAX = 16
STORE_CHUNK_USERS = 5_000  # rows built and inserted per step of the store transaction
LEDGER_BATCH_USERS = 1_000  # accounts + funding transfers per ledger Batch (~1,000 transfers)
INSERT_BATCH_ROWS = 1_000  # rows per INSERT statement (16 columns: far below SQLite's 32766 variables)
PAN_ATTEMPTS_MAX = 100  # a fresh random PAN collides with probability < 1e-3 per attempt
PIN_LENGTH = 4
PROGRESS_INTERVAL_S = 0.25
DEFAULT_CARDS_FILE = "cards.jsonl"


class SeedError(Exception):
    """Seeding cannot start or failed (server running, bad arguments, unknown partner/program)."""


class CardLine(msgspec.Struct, rename="camel"):
    """One line of the cards file (docs/contract.md, commands: exactly these keys)."""

    pan: str
    expiry: str
    cvc2: str
    pin: str
    card_id: int
    customer_id: int
    balance_id: int
    currency: str


@attrs.frozen
class SeedReport:
    users: int
    cards: int
    amount: int  # per balance, minor units
    currency: str
    partner: str
    collateral_funded: int  # minor units added to the partner's collateral (0 when it has none)
    first_customer_id: int
    last_customer_id: int
    cards_file: Path
    seconds: float
    balance_mode: str = "internal"  # "external": the balances are at the partner, funded there

    def summary(self) -> str:
        rate = self.users / self.seconds if self.seconds > 0 else 0.0
        collateral = (
            f"; {self.partner} collateral funded with {self.collateral_funded}"
            if self.collateral_funded
            else ""
        )
        funding = (
            f"balances held at partner {self.partner} (external: link them there, nothing funded here)"
            if self.balance_mode == "external"
            else f"each balance funded with {self.amount} {self.currency}"
        )
        return (
            f"seeded {self.users} users (customer ids {self.first_customer_id}..{self.last_customer_id})"
            f" with {self.cards} active virtual cards, {funding}{collateral};"
            f" cards appended to {self.cards_file} in {self.seconds:.1f} s ({rate:,.0f} users/s)"
        )


@attrs.frozen
class _Plan:
    """Everything decided before the first write: ids are consecutive ranges."""

    users: int
    cards_per_user: int
    amount: int
    currency: str
    partner: str
    program: ProgramRow
    expiry_yymm: str
    user_ids: range
    balance_ids: range
    account_ids: range
    card_ids: range
    transfer_ids: range  # one per user (internal balances only), plus the last one for the collateral
    funding_account: int
    collateral_account: int | None
    external: bool  # the partner holds the balances: accounts here stay empty, no funding transfers


def seed(
    data_dir: Path,
    *,
    users: int,
    cards_per_user: int = 1,
    amount: int = 100_000,
    currency: str = "EUR",
    out: Path | None = None,
    partner: str = "demo",
    config_id: str = "0019167984",
    progress: bool = True,
    unlinked: bool = False,
) -> SeedReport:
    """`unlinked`: required for a partner with external balances, whose balances the caller
    links at the partner itself (see the module docstring); ignored for internal balances."""
    _check_arguments(users, cards_per_user, amount, currency)
    data_dir = Path(data_dir)
    if not (data_dir / STORE_FILE_NAME).exists():
        raise SeedError(f"{data_dir} is not an authsrv data directory (run `authsrv init` first)")
    started = time.perf_counter()
    try:
        lock = DataDirLock.acquire(data_dir)
    except DataDirBusy as error:
        raise SeedError(str(error)) from None
    cards_file = Path(out) if out is not None else data_dir / DEFAULT_CARDS_FILE
    bar = _Progress(users, enabled=progress)
    with lock, _seeding_state(data_dir) as (store, open_ledger):
        keys = _load_keys(data_dir)
        with _appending(cards_file) as file, store.transaction():
            plan, setup_accounts = _prepare(data_dir, store, users, cards_per_user, amount,
                                            currency, partner, config_id, unlinked)  # fmt: skip
            _write_store(store, plan, keys, file, bar)
        # Committed: the cards exist, so their lines stay even if the ledger step fails.
        with open_ledger() as ledger:
            _write_ledger(ledger, plan, setup_accounts, bar)
        bar.done()
    return SeedReport(
        users=users,
        cards=users * cards_per_user,
        amount=amount,
        currency=currency,
        partner=partner,
        collateral_funded=users * amount if plan.collateral_account is not None else 0,
        first_customer_id=plan.user_ids[0],
        last_customer_id=plan.user_ids[-1],
        cards_file=cards_file,
        seconds=time.perf_counter() - started,
        balance_mode="external" if plan.external else "internal",
    )


def _check_arguments(users: int, cards_per_user: int, amount: int, currency: str) -> None:
    if not 1 <= users <= SEED_USERS_MAX:
        raise SeedError(f"users must be 1 to {SEED_USERS_MAX}, got {users}")
    if not 1 <= cards_per_user <= SEED_CARDS_PER_USER_MAX:
        raise SeedError(f"cards per user must be 1 to {SEED_CARDS_PER_USER_MAX}, got {cards_per_user}")
    # The collateral is funded with users * amount in one transfer: that must fit too.
    if not 1 <= amount <= AMOUNT_MAX // users:
        raise SeedError(f"amount must be 1 to {AMOUNT_MAX // users} minor units, got {amount}")
    if not (len(currency) == 3 and currency.isascii() and currency.isalpha() and currency.isupper()):
        raise SeedError(f"currency must be an ISO 4217 alpha code like EUR, got {currency!r}")


@contextlib.contextmanager
def _seeding_state(data_dir: Path) -> Iterator[tuple[Store, object]]:
    """(store, open_ledger): the local files; on a cluster node the shard's, written through its
    stream (authsrv/cluster/session.py), so every node and any standby joined later has the seed."""
    from authsrv.config import ConfigError, load_config

    try:
        config = load_config(data_dir)
    except ConfigError as error:
        raise SeedError(str(error)) from None
    if config.cluster is None:
        with _open_store(data_dir) as store:
            yield store, functools.partial(_local_ledger, data_dir)
        return
    from authsrv.cluster.session import shard_session

    with shard_session(data_dir, config) as session:
        yield session.store, functools.partial(contextlib.nullcontext, session.ledger)


@contextlib.contextmanager
def _local_ledger(data_dir: Path) -> Iterator[object]:
    from ledger.durable import DurableLedger  # heavy import, offline command only

    ledger = DurableLedger.open(data_dir / "ledger")
    try:
        yield ledger
    finally:
        ledger.close()


@contextlib.contextmanager
def _open_store(data_dir: Path) -> Iterator[Store]:
    try:
        store = Store.open(data_dir / STORE_FILE_NAME)
    except StoreError as error:
        raise SeedError(str(error)) from None
    with store:
        yield store


def _prepare(
    data_dir: Path, store: Store, users: int, cards_per_user: int, amount: int, currency: str,
    partner: str, config_id: str, unlinked: bool = False,
) -> tuple[_Plan, list[AccountSpec]]:  # fmt: skip
    try:
        config = load_config(data_dir)
    except ConfigError as error:
        raise SeedError(str(error)) from None
    if partner not in config.partners or store.get_partner(partner) is None:
        raise SeedError(f"unknown partner {partner!r} (add it with `authsrv partner add`)")
    # authsrv.toml is what operators edit (e.g. balance_mode = "external" after `partner add`); the
    # server makes the store follow it at start, and seeding must see the same modes first.
    sync_partners(store, config)
    partner_row = store.get_partner(partner)
    assert partner_row is not None
    assert partner_row.balance_mode == config.partners[partner].balance_mode
    external = partner_row.balance_mode == "external"
    if external and not unlinked:
        raise SeedError(external_refusal(partner, config.partners[partner].api_url))
    program = store.get_program(config_id)
    if program is None:
        raise SeedError(f"unknown card program (configId) {config_id!r}")
    if program.card_type != "virtual":
        raise SeedError(
            f"card program {config_id} issues {program.card_type} cards; seed issues virtual cards"
        )
    setup_accounts = store.ensure_system_accounts(currency) + store.ensure_partner_accounts(partner, currency)
    kinds = {spec.kind: spec.id for spec in setup_accounts}
    collateral = kinds.get(AccountKind.partner_deposit, kinds.get(AccountKind.partner_credit))
    # Reserved under the write lock of the caller's transaction; _write_store inserts exactly these.
    user_ids = store.next_ids("users", users)
    balance_ids = store.next_ids("balances", users)
    account_ids = store.next_ids("ledger_accounts", users)
    card_ids = store.next_ids("cards", users * cards_per_user)
    transfer_ids = store.allocate_transfer_ids(1 if external else users + 1)
    plan = _Plan(
        users=users,
        cards_per_user=cards_per_user,
        amount=amount,
        currency=currency,
        partner=partner,
        program=program,
        expiry_yymm=expiry_after_years(datetime.date.today(), program.expiry_years),
        user_ids=user_ids,
        balance_ids=balance_ids,
        account_ids=account_ids,
        card_ids=card_ids,
        transfer_ids=transfer_ids,
        funding_account=kinds[AccountKind.funding],
        collateral_account=collateral,
        external=external,
    )
    return plan, setup_accounts


def external_refusal(partner: str, api_url: str) -> str:
    at = f" at {api_url}" if api_url else ""
    return (
        f"partner {partner!r} holds its users' balances itself (balance_mode = \"external\"{at}), and"
        f" seeding does not tell it about the balances it creates: the partner would never hear of them."
        f" Create that partner's balances through the management API (POST .../balances links each one"
        f" at the partner), or pass --unlinked if you link the seeded balances at the partner yourself"
        f" (the cards file lists each card's customerId, balanceId and currency)"
    )


def expiry_after_years(today: datetime.date, years: int) -> str:
    """YYMM `years` after this month (cards are valid to the end of their expiry month)."""
    assert 1 <= years <= 10
    return f"{(today.year + years) % 100:02d}{today.month:02d}"


# -- store -----------------------------------------------------------------------------------------


def _load_keys(data_dir: Path) -> cardsec.CardKeys:
    try:
        return cardsec.CardKeys.load(data_dir / "keys")
    except cardsec.KeyFileError as error:
        raise SeedError(str(error)) from None


def _write_store(
    store: Store, plan: _Plan, keys: cardsec.CardKeys, file: IO[bytes], bar: _Progress
) -> None:
    """Inside the caller's transaction: an error leaves no seeded row at all."""
    vault = cardsec.PanVault(keys)
    taken = store.pan_indexes()
    encoder = msgspec.json.Encoder()
    created_at = utc_now_iso()
    for first in range(0, plan.users, STORE_CHUNK_USERS):
        count = min(STORE_CHUNK_USERS, plan.users - first)
        rows, lines = _build_chunk(plan, first, count, vault, keys, taken, created_at)
        for table in ("users", "ledger_accounts", "balances", "cards"):
            store.insert_rows(table, rows[table], batch_size=INSERT_BATCH_ROWS)
        file.write(encoder.encode_lines(lines))
        bar.update("store", first + count)
    assert store.next_ids("users", 1)[0] == plan.user_ids[-1] + 1
    assert store.next_ids("cards", 1)[0] == plan.card_ids[-1] + 1


def _build_chunk(
    plan: _Plan, first: int, count: int, vault: cardsec.PanVault, keys: cardsec.CardKeys,
    taken: set[bytes], created_at: str,
) -> tuple[dict[str, list[dict]], list[CardLine]]:  # fmt: skip
    """Rows for users first..first+count-1 and their balances, ledger accounts and cards."""
    users, balances, accounts, cards, lines = [], [], [], [], []
    flags = int(AccountFlags.debits_must_not_exceed_credits)
    for position in range(first, first + count):
        user_id = plan.user_ids[position]
        balance_id = plan.balance_ids[position]
        account_id = plan.account_ids[position]
        users.append(_user_row(user_id, plan.partner, created_at))
        accounts.append({"id": account_id, "kind": int(AccountKind.user_balance), "currency": plan.currency,
                         "owner": plan.partner, "flags": flags, "user_data": balance_id})  # fmt: skip
        balances.append({"id": balance_id, "user_id": user_id, "partner": plan.partner,
                         "currency": plan.currency, "ledger_account_id": account_id,
                         "status": "ACTIVE", "created_at": created_at})  # fmt: skip
        for card_number in range(plan.cards_per_user):
            card_id = plan.card_ids[position * plan.cards_per_user + card_number]
            pan, pan_index = _new_pan(plan.program.bin, vault, taken)
            pin = f"{secrets.randbelow(10**PIN_LENGTH):0{PIN_LENGTH}d}"
            cards.append({
                "id": card_id, "user_id": user_id, "balance_id": balance_id, "partner": plan.partner,
                "config_id": plan.program.config_id, "card_type": "virtual", "pan_index": pan_index,
                "pan_enc": vault.encrypt(pan), "pan_first6": pan[:6], "pan_last4": pan[-4:],
                "expiry_yymm": plan.expiry_yymm, "status": int(CardStatus.active), "lock_reason": 0,
                "wrong_pin_count": 0, "pvv": cardsec.pvv(pan, pin, keys.pvk), "created_at": created_at,
            })  # fmt: skip
            cvc2 = cardsec.cvc2(pan, plan.expiry_yymm, keys.cvk)
            lines.append(CardLine(pan, plan.expiry_yymm, cvc2, pin, card_id, user_id, balance_id,
                                  plan.currency))  # fmt: skip
    rows = {"users": users, "ledger_accounts": accounts, "balances": balances, "cards": cards}
    return rows, lines


def _user_row(user_id: int, partner: str, created_at: str) -> dict:
    # Synthetic but well-formed contact data; reserved domain (RFC 2606) and no wallet PIN, so a
    # seeded user cannot log in as a customer until one is set through the API.
    return {
        "id": user_id, "partner": partner, "first_name": "Seed", "last_name": f"User{user_id}",
        "phone": f"4890{user_id:09d}", "email": f"seed{user_id}@example.invalid",
        "birth_date": "1990-01-01", "state": "VERIFIED", "kyc": "SUCCESS", "wpin_hash": "",
        "created_at": created_at,
    }  # fmt: skip


def _new_pan(bin_prefix: str, vault: cardsec.PanVault, taken: set[bytes]) -> tuple[str, bytes]:
    """A random, unused PAN in the BIN. Random account numbers, not consecutive ones, so one
    card number says nothing about its neighbours."""
    account_space = 10 ** (16 - 1 - len(bin_prefix))
    for _ in range(PAN_ATTEMPTS_MAX):
        pan = cardsec.generate_pan(bin_prefix, secrets.randbelow(account_space))
        pan_index = vault.index(pan)
        if pan_index not in taken:
            taken.add(pan_index)
            return pan, pan_index
    raise SeedError(f"BIN {bin_prefix} is too full: no free card number after {PAN_ATTEMPTS_MAX} tries")


# -- ledger ----------------------------------------------------------------------------------------


def _write_ledger(ledger, plan: _Plan, setup_accounts: list[AccountSpec], bar: _Progress) -> None:  # type: ignore[no-untyped-def]
    setup = [_collateral_funding(plan)] if plan.collateral_account is not None else []
    _submit(ledger, Batch(timestamp_ns=time.time_ns(), accounts=tuple(setup_accounts),
                          transfers=tuple(setup)), idempotent_accounts=True)  # fmt: skip
    for first in range(0, plan.users, LEDGER_BATCH_USERS):
        count = min(LEDGER_BATCH_USERS, plan.users - first)
        _submit(ledger, _funding_batch(plan, first, count), idempotent_accounts=False)
        bar.update("ledger", first + count)
    ledger.flush_sync()


def _collateral_funding(plan: _Plan) -> TransferSpec:
    assert plan.collateral_account is not None
    return TransferSpec(
        id=plan.transfer_ids[-1],
        debit_account_id=plan.funding_account,
        credit_account_id=plan.collateral_account,
        amount=plan.users * plan.amount,
        code=ManagementTransferCode.collateral_funding,
        reference=f"seed {plan.users} x {plan.amount}",
    )


def _funding_batch(plan: _Plan, first: int, count: int) -> Batch:
    """The balances' ledger accounts and, for internal balances, their funding transfers."""
    accounts, transfers = [], []
    for position in range(first, first + count):
        account_id = plan.account_ids[position]
        accounts.append(AccountSpec(id=account_id, currency=plan.currency, kind=AccountKind.user_balance,
                                    flags=AccountFlags.debits_must_not_exceed_credits,
                                    user_data=plan.balance_ids[position]))  # fmt: skip
        if plan.external:
            continue  # the money is at the partner: an external balance's account here stays at zero
        transfers.append(TransferSpec(id=plan.transfer_ids[position], debit_account_id=plan.funding_account,
                                      credit_account_id=account_id, amount=plan.amount,
                                      code=ManagementTransferCode.user_funding,
                                      reference=f"seed balance {plan.balance_ids[position]}"))  # fmt: skip
    assert len(transfers) == (0 if plan.external else count)
    return Batch(timestamp_ns=time.time_ns(), accounts=tuple(accounts), transfers=tuple(transfers))


def _submit(ledger, batch: Batch, *, idempotent_accounts: bool) -> None:  # type: ignore[no-untyped-def]
    result, _ = ledger.submit(batch)
    accepted = {AccountStatus.created}
    if idempotent_accounts:  # system and partner accounts may exist from init or an earlier seed
        accepted.add(AccountStatus.exists)
    refused_accounts = {s.name for s in result.account_results if s not in accepted}
    refused_transfers = {s.name for s in result.transfer_results if s != TransferStatus.created}
    if refused_accounts or refused_transfers:
        # Store rows are committed; a restarted server re-creates missing accounts, and nothing
        # here is retried with the same ids, so report and stop.
        raise SeedError(
            f"ledger refused seeding: accounts {sorted(refused_accounts)},"
            f" transfers {sorted(refused_transfers)}"
        )


# -- files and progress ----------------------------------------------------------------------------


@contextlib.contextmanager
def _appending(path: Path) -> Iterator[IO[bytes]]:
    """Append to `path` (created 0600) and fsync on success; on error cut it back to what it
    was before. Exits after the store transaction nested inside it has committed."""
    existed = path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as error:
        raise SeedError(f"cannot write {path}: {error.strerror}") from None
    os.fchmod(fd, 0o600)  # card data: owner only, whatever the umask or an older file said
    size_before = os.fstat(fd).st_size
    with os.fdopen(fd, "ab") as file:
        try:
            yield file
        except BaseException:
            file.flush()
            if existed:
                os.ftruncate(file.fileno(), size_before)
            else:
                os.unlink(path)
            raise
        file.flush()
        os.fsync(file.fileno())


class _Progress:
    """A `\\r`-updated line on stderr: phase, count, rate and ETA."""

    def __init__(self, total: int, *, enabled: bool, stream: IO[str] | None = None) -> None:
        self._total = total
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr  # looked up now, not at import
        self._started = time.monotonic()
        self._last_shown = 0.0

    def update(self, phase: str, done: int) -> None:
        now = time.monotonic()
        if not self._enabled or (now - self._last_shown < PROGRESS_INTERVAL_S and done < self._total):
            return
        self._last_shown = now
        elapsed = max(now - self._started, 1e-9)
        rate = done / elapsed
        eta = (self._total - done) / rate if rate > 0 else 0.0
        line = f"{phase:6} {done:>9,}/{self._total:,} users  {rate:>9,.0f}/s  ETA {eta:5.1f} s "
        self._stream.write("\r" + line)
        self._stream.flush()
        if phase == "store" and done == self._total:
            self._started = time.monotonic()  # the ledger phase gets its own rate

    def done(self) -> None:
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()
