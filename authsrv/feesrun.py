"""Fees outside the authorization: monthly fees (`authsrv fees run`), creation fees, owed fees.

`authsrv fees run --data DIR --date YYYY-MM-DD` charges the monthly per-card and per-account fees
of the month of DATE, once per (program, kind, month, card or balance): the `fee_periods` table
says what was charged, so a second run of the same month changes nothing and says so. It runs
offline, with the data directory's lock held (like `authsrv clearing ingest` without a server):
ledger and journal are rebuilt from snapshot + log, the fees applied, the log flushed, a
snapshot written. While the server runs, it refuses (exit 2) and says so.

Rules (docs/money.md, "Fees"):
- The program of a card is its `configId`; the program of a balance is that of its oldest card
  that is not removed, or the `[fees]` defaults (configId '') when it has none.
- Conditional fee (reference documents: "if users do 1000 eur transaction monthly we do not charge
  monthly fee"): when `monthly_waiver_spend` > 0 and the balance spent more than that in the month,
  its monthly fees (card and account) are waived, and the waiver is recorded. Spending comes from
  the balance's ledger history (purchases and cash, held or posted in the month, less what was
  released or reversed); the history keeps the last `[ledger] history_per_account_max` events per
  account (1,000 by default): a month with more events than that is under-counted.
- A fee never takes a balance below zero: a balance short of it is charged what it has and the
  rest is recorded as owed; every run first collects owed fees from balances that have funds.

Ids: management transfer ids from the store's allocator; rows with their exact transfers are
committed before the ledger sees them (state 'planned'), then marked 'applied' after the flush.
A run after a crash resubmits the planned transfers it cannot find in the ledger.
"""

from __future__ import annotations

import calendar
import datetime
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import attrs
import msgspec

from authsrv.config import FeesConfig
from authsrv.hotpath.fees import FEE_CODE_OF_KIND, FeeBook, FeeCode, FeeKind
from authsrv.hotpath.steps import TransferCode
from authsrv.store.db import Store, utc_now_iso
from authsrv.store.index import CardStatus
from ledger.state import HistoryKind, Side
from ledger.types import AccountSpec, Batch, TransferSpec, TransferStatus

EXIT_OK = 0
EXIT_REFUSED = 2
PERIOD_ONCE = "once"  # creation fees
PLANNED = "planned"
APPLIED = "applied"
TRANSFERS_PER_BATCH = 4_096  # below the ledger's TRANSFERS_PER_BATCH_MAX (8,192)
SUBJECTS_MAX = 50_000_000  # cards (CARDS_MAX) or balances charged in one run
# Debits that count as spending for the conditional fee (hot path and clearing codes).
SPENDING_CODES = frozenset({TransferCode.purchase, TransferCode.cash, TransferCode.completion,
                            202, 203})  # authsrv.clearing.plan.ClearingCode.excess / .forced
SERVER_RUNNING_MESSAGE = ("the server is running on {dir}: stop it first (monthly fees are charged offline,"
                          " with the data directory's lock held)")


class FeesRunError(Exception):
    """The run could not start (bad date, not a data directory, server running)."""


@attrs.frozen
class FeeRow:
    config_id: str
    kind: str
    period: str
    subject: int  # card id or balance id
    balance_id: int
    partner: str
    currency: str
    amount: int  # the fee (0 when waived)
    charged: int
    owed: int
    waived: bool
    state: str
    transfers: tuple[TransferSpec, ...]

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.config_id, self.kind, self.period, self.subject)


@attrs.define
class RunSummary:
    period: str
    charged_count: int = 0
    owed_count: int = 0
    waived_count: int = 0
    already_count: int = 0  # charged by an earlier run of this period
    resumed_count: int = 0  # planned by an interrupted run, finished now
    collected_count: int = 0  # owed fees of earlier periods collected now
    totals: dict[str, dict[str, int]] = attrs.field(factory=dict)  # currency -> {charged, owed, collected}

    def add(self, currency: str, what: str, amount: int) -> None:
        bucket = self.totals.setdefault(currency, {"charged": 0, "owed": 0, "collected": 0})
        bucket[what] += amount

    def render(self) -> str:
        if not (self.charged_count or self.owed_count or self.waived_count or self.collected_count
                or self.resumed_count):
            if self.already_count:
                return (f"fees for {self.period} were already charged ({self.already_count} charges):"
                        " nothing to do")
            return f"fees for {self.period}: nothing to charge"
        lines = [f"fees for {self.period}: {self.charged_count} charged, {self.owed_count} partly or wholly owed,"
                 f" {self.waived_count} waived, {self.already_count} already charged before,"
                 f" {self.collected_count} owed fees collected, {self.resumed_count} resumed"]
        for currency, bucket in sorted(self.totals.items()):
            lines.append(f"  {currency}: charged {bucket['charged']}, owed {bucket['owed']},"
                         f" collected {bucket['collected']}")
        return "\n".join(lines)


_transfers_encoder = msgspec.msgpack.Encoder()
_transfers_decoder = msgspec.msgpack.Decoder(tuple[TransferSpec, ...])
_ROW_COLUMNS = ("config_id, kind, period, subject, balance_id, partner, currency, amount, charged, owed, waived,"
                " state, transfers")


def _row(found: tuple) -> FeeRow:
    return FeeRow(*found[:10], bool(found[10]), found[11], _transfers_decoder.decode(found[12]))


class FeeStore:
    """The `fee_periods` rows (authsrv/store/db.py ADDED_SCHEMA)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, key: tuple[str, str, str, int]) -> FeeRow | None:
        with self._store.locked():
            found = self._store.db.execute(
                f"SELECT {_ROW_COLUMNS} FROM fee_periods WHERE config_id = ? AND kind = ? AND period = ?"
                " AND subject = ?", key).fetchone()
        return _row(found) if found else None

    def keys_of_period(self, period: str) -> set[tuple[str, str, str, int]]:
        with self._store.locked():
            rows = self._store.db.execute(
                "SELECT config_id, kind, period, subject FROM fee_periods WHERE period = ?", (period,)).fetchall()
        return {tuple(row) for row in rows}

    def rows(self, where: str, args: tuple = ()) -> list[FeeRow]:
        with self._store.locked():
            found = self._store.db.execute(f"SELECT {_ROW_COLUMNS} FROM fee_periods WHERE {where}", args).fetchall()
        return [_row(row) for row in found]

    def put(self, rows: Iterable[FeeRow]) -> None:
        """Insert or replace, in one transaction (the caller is inside `store.transaction()` or not)."""
        now = utc_now_iso()
        with self._store.transaction():
            self._store.db.conn.executemany(
                f"INSERT INTO fee_periods ({_ROW_COLUMNS}, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (config_id, kind, period, subject) DO UPDATE SET charged = excluded.charged,"
                " owed = excluded.owed, state = excluded.state, transfers = excluded.transfers,"
                " updated_at = excluded.updated_at",
                [(*row.key, row.balance_id, row.partner, row.currency, row.amount, row.charged, row.owed,
                  int(row.waived), row.state, _transfers_encoder.encode(row.transfers), now, now) for row in rows],
            )

    def set_state(self, keys: Iterable[tuple[str, str, str, int]], state: str) -> None:
        with self._store.transaction():
            self._store.db.conn.executemany(
                "UPDATE fee_periods SET state = ?, updated_at = ? WHERE config_id = ? AND kind = ? AND period = ?"
                " AND subject = ?", [(state, utc_now_iso(), *key) for key in keys])


# -- creation fees (called by the REST modules) -------------------------------------------------


def creation_fee_transfers(ctx, program, kind: FeeKind, balance, card_id: int = 0) -> list[TransferSpec]:
    """The account-creation or card-creation fee of `program` for `balance` (a store BalanceRow),
    as transfers to submit in the caller's ledger batch; what the balance cannot pay now is recorded
    as owed and collected by `authsrv fees run`. Charged once per balance (account) or per card
    (`card_id`); a second call returns []. Writes the store (call it through `ctx.in_thread`).

    A crash between this call and the caller's submit leaves the fee recorded and not charged:
    the error is on the cardholder's side of the books, never a double charge."""
    assert kind in (FeeKind.account_creation, FeeKind.card_creation)
    assert kind is FeeKind.account_creation or card_id > 0, "a card creation fee names its card"
    schedule = FeeBook(ctx.config.fees if ctx.config is not None else FeesConfig(),
                       lambda _: program.fees_json).schedule(program.config_id)
    fee = getattr(schedule, kind.value)
    subject = card_id if kind is FeeKind.card_creation else balance.id
    key = (program.config_id, kind.value, PERIOD_ONCE, subject)
    fee_store = FeeStore(ctx.store)
    if fee <= 0 or fee_store.get(key) is not None:
        return []
    partner = ctx.index.partner(balance.partner) if ctx.index is not None else None
    fee_income = partner.fee_income_account_ids.get(balance.currency) if partner is not None else None
    view = ctx.ledger.ledger.balance(balance.ledger_account_id) if ctx.ledger is not None else None
    payable = min(fee, max(0, view.available)) if view is not None and fee_income is not None else 0
    transfers: tuple[TransferSpec, ...] = ()
    if payable:
        (transfer_id,) = ctx.store.allocate_transfer_ids(1)
        transfers = (TransferSpec(transfer_id, balance.ledger_account_id, fee_income, payable,
                                  code=FEE_CODE_OF_KIND[kind], reference=f"fee:{kind.value}:{subject}"),)
    fee_store.put([FeeRow(*key, balance.id, balance.partner, balance.currency, fee, payable, fee - payable,
                          False, APPLIED, transfers)])
    return list(transfers)


# -- the monthly run ------------------------------------------------------------------------------


def month_of(date_text: str) -> tuple[str, int, int]:
    """'YYYY-MM-DD' -> ('YYYY-MM', month start ns, next month start ns), UTC."""
    try:
        day = datetime.date.fromisoformat(date_text)
    except ValueError:
        raise FeesRunError(f"--date {date_text[:32]!r} is not a YYYY-MM-DD date") from None
    start = datetime.datetime(day.year, day.month, 1, tzinfo=datetime.timezone.utc)
    days = calendar.monthrange(day.year, day.month)[1]
    end = start + datetime.timedelta(days=days)
    return f"{day.year:04d}-{day.month:02d}", int(start.timestamp()) * 10**9, int(end.timestamp()) * 10**9


def month_spend(ledger, account_id: int, start_ns: int, end_ns: int) -> int:
    """Purchases and cash of the month on this balance: holds and posted debits, less what was
    released (void, expiry, the rest of a final post) or reversed back, from the ledger history."""
    spend = 0
    # All the history there is: the ledger's configured bound (ledger.history clamps to it).
    for entry in ledger.history(account_id, limit=ledger.history_per_account_max):  # newest first
        if entry.timestamp_ns >= end_ns:
            continue
        if entry.timestamp_ns < start_ns:
            break
        if entry.side is Side.debit:
            if entry.kind in (HistoryKind.hold, HistoryKind.transfer) and entry.code in SPENDING_CODES:
                spend += entry.amount
            elif entry.kind in (HistoryKind.void, HistoryKind.expire):
                spend -= entry.amount + entry.released
            elif entry.kind is HistoryKind.post:
                spend -= entry.released
        elif entry.kind is HistoryKind.transfer and entry.code == TransferCode.reversal:
            spend += -entry.amount
    return max(0, spend)


@attrs.frozen
class Subject:
    kind: FeeKind
    subject: int
    config_id: str
    balance_id: int
    partner: str
    currency: str
    account_id: int


def _subjects(store: Store, end_iso: str) -> list[Subject]:
    """Every card not removed and every active balance that existed before the month ended."""
    with store.locked():
        cards = store.db.execute(
            "SELECT c.id, c.config_id, c.balance_id, b.partner, b.currency, b.ledger_account_id FROM cards c"
            " JOIN balances b ON b.id = c.balance_id WHERE c.status != ? AND c.created_at < ? ORDER BY c.id LIMIT ?",
            (int(CardStatus.removed), end_iso, SUBJECTS_MAX)).fetchall()
        balances = store.db.execute(
            "SELECT b.id, COALESCE((SELECT c.config_id FROM cards c WHERE c.balance_id = b.id AND c.status != ?"
            " ORDER BY c.id LIMIT 1), ''), b.partner, b.currency, b.ledger_account_id FROM balances b"
            " WHERE b.status = 'ACTIVE' AND b.created_at < ? ORDER BY b.id LIMIT ?",
            (int(CardStatus.removed), end_iso, SUBJECTS_MAX)).fetchall()
    found = [Subject(FeeKind.monthly_per_card, card_id, config_id, balance_id, partner, currency, account_id)
             for card_id, config_id, balance_id, partner, currency, account_id in cards]
    found += [Subject(FeeKind.monthly_per_account, balance_id, config_id, balance_id, partner, currency, account_id)
              for balance_id, config_id, partner, currency, account_id in balances]
    return found


class FeesRun:
    """One run over an open ledger (offline) and store; `run(date)` returns the summary."""

    def __init__(self, *, ledger, store: Store, index, defaults: FeesConfig) -> None:
        self._ledger = ledger  # ledger.durable.DurableLedger
        self._store = store
        self._index = index
        self._fees = FeeStore(store)
        self._book = FeeBook.of_store(store, defaults)
        self._available: dict[int, int] = {}  # account -> available left during this run

    def run(self, date_text: str) -> RunSummary:
        period, start_ns, end_ns = month_of(date_text)
        summary = RunSummary(period)
        self._resume(summary)
        self._collect_owed(summary)
        end_iso = datetime.datetime.fromtimestamp(end_ns // 10**9, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        done = self._fees.keys_of_period(period)
        rows: list[FeeRow] = []
        spend_cache: dict[int, int] = {}
        for subject in _subjects(self._store, end_iso):
            key = (subject.config_id, subject.kind.value, period, subject.subject)
            if key in done:
                summary.already_count += 1
                continue
            schedule = self._book.schedule(subject.config_id)
            fee = getattr(schedule, subject.kind.value)
            if fee <= 0:
                continue
            waiver = schedule.monthly_waiver_spend
            if waiver and subject.account_id not in spend_cache:
                spend_cache[subject.account_id] = month_spend(self._ledger.ledger, subject.account_id, start_ns, end_ns)
            if waiver and spend_cache[subject.account_id] > waiver:
                rows.append(FeeRow(*key, subject.balance_id, subject.partner, subject.currency, 0, 0, 0, True,
                                   APPLIED, ()))
                summary.waived_count += 1
                continue
            rows.append(self._charge(key, subject, fee, FEE_CODE_OF_KIND[subject.kind], summary))
        self._apply(rows)
        return summary

    def _charge(self, key, subject: Subject, fee: int, code: int, summary: RunSummary) -> FeeRow:
        fee_income = self._fee_income(subject.partner, subject.currency)
        payable = min(fee, self._take_available(subject.account_id, fee))
        transfers: tuple[TransferSpec, ...] = ()
        if payable:
            (transfer_id,) = self._store.allocate_transfer_ids(1)
            transfers = (TransferSpec(transfer_id, subject.account_id, fee_income, payable, code=code,
                                      reference=f"fee:{key[1]}:{key[2]}:{key[3]}"),)
        summary.charged_count += payable == fee
        summary.owed_count += payable < fee
        summary.add(subject.currency, "charged", payable)
        summary.add(subject.currency, "owed", fee - payable)
        return FeeRow(*key, subject.balance_id, subject.partner, subject.currency, fee, payable, fee - payable,
                      False, PLANNED, transfers)

    def _take_available(self, account_id: int, wanted: int) -> int:
        if account_id not in self._available:
            view = self._ledger.ledger.balance(account_id)
            self._available[account_id] = max(0, view.available) if view is not None else 0
        taken = min(wanted, self._available[account_id])
        self._available[account_id] -= taken
        return taken

    def _fee_income(self, partner: str, currency: str) -> int:
        """The partner's fee-income account in `currency`, allocated (and created) on first use."""
        state = self._index.partner(partner)
        account_id = state.fee_income_account_ids.get(currency) if state is not None else None
        if account_id is None:
            specs: list[AccountSpec] = self._store.ensure_partner_accounts(partner, currency)
            self._ledger.submit(Batch(timestamp_ns=time.time_ns(), accounts=tuple(specs)))
            account_id = self._index.partner(partner).fee_income_account_ids[currency]
        return account_id

    def _collect_owed(self, summary: RunSummary) -> None:
        """Owed fees of earlier runs or creations, oldest first, from balances that have funds now."""
        rows = self._fees.rows("owed > 0 AND state = ? ORDER BY created_at, rowid", (APPLIED,))
        updated = []
        for row in rows:
            balance = self._store.get_balance(row.balance_id)
            if balance is None:
                continue
            taken = self._take_available(balance.ledger_account_id, row.owed)
            if not taken:
                continue
            (transfer_id,) = self._store.allocate_transfer_ids(1)
            transfer = TransferSpec(transfer_id, balance.ledger_account_id, self._fee_income(row.partner, row.currency),
                                    taken, code=FeeCode.owed, reference=f"fee:{row.kind}:{row.period}:{row.subject}")
            updated.append(attrs.evolve(row, charged=row.charged + taken, owed=row.owed - taken, state=PLANNED,
                                        transfers=(*row.transfers, transfer)))
            summary.collected_count += 1
            summary.add(row.currency, "collected", taken)
        self._apply(updated)

    def _resume(self, summary: RunSummary) -> None:
        """Rows an interrupted run planned: resubmit the transfers the ledger does not have."""
        rows = self._fees.rows("state = ?", (PLANNED,))
        if rows:
            self._apply(rows, resumed=True)
            summary.resumed_count = len(rows)

    def _apply(self, rows: list[FeeRow], *, resumed: bool = False) -> None:
        if not rows:
            return
        if not resumed:
            self._fees.put(rows)  # on disk, with their transfers, before the ledger sees them
        pending = [transfer for row in rows for transfer in row.transfers if not self._applied(transfer)]
        for start in range(0, len(pending), TRANSFERS_PER_BATCH):
            chunk = tuple(pending[start:start + TRANSFERS_PER_BATCH])
            result, _ = self._ledger.submit(Batch(timestamp_ns=time.time_ns(), transfers=chunk))
            refused = [(spec.id, status.name) for spec, status in zip(chunk, result.transfer_results)
                       if status not in (TransferStatus.created, TransferStatus.exists)]
            # Offline, nothing else moves money, and each charge is within what was available.
            assert not refused, f"the ledger refused fee transfers: {refused[:5]}"
        self._ledger.flush_sync()
        self._fees.set_state([row.key for row in rows], APPLIED)

    def _applied(self, transfer: TransferSpec) -> bool:
        status = self._ledger.ledger.transfer_status(transfer.id)
        if status is not None:
            return status in (TransferStatus.created, TransferStatus.exists)
        # Older than the ledger's id retention: look for it in the balance's history.
        return any(entry.transfer_id == transfer.id
                   for entry in self._ledger.ledger.history(transfer.debit_account_id,
                                                            limit=self._ledger.ledger.history_per_account_max))


# -- the command ------------------------------------------------------------------------------------


def run_offline(data_dir: Path, date_text: str) -> RunSummary:
    """With the data directory's lock held by the caller: the server is not running."""
    from authsrv.app import offline_state

    month_of(date_text)  # a bad date is refused before anything is opened
    with offline_state(data_dir) as state:
        return FeesRun(ledger=state.ledger, store=state.store, index=state.index,
                       defaults=state.config.fees).run(date_text)


def fees_run_main(data_dir: Path, date_text: str) -> int:
    from authsrv.store.db import DataDirBusy, DataDirLock

    data_dir = Path(data_dir)
    try:
        month_of(date_text)
        if not (data_dir / "authsrv.toml").exists():
            raise FeesRunError(f"{data_dir} is not a data directory")
        try:
            lock = DataDirLock.acquire(data_dir)
        except DataDirBusy:
            raise FeesRunError(SERVER_RUNNING_MESSAGE.format(dir=data_dir)) from None
        with lock:
            summary = run_offline(data_dir, date_text)
    except FeesRunError as error:
        print(f"authsrv fees run: {error}", file=sys.stderr)
        return EXIT_REFUSED
    print(summary.render())
    return EXIT_OK
