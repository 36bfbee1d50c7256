"""Management money movements (reloads, partner funding, withdrawals) on the running ledger.

REST handlers run on the same trio thread as the authorization hot path, so they submit to the
same `DurableLedger` directly (no lock: one thread) and answer only once the batch is on disk,
exactly like an approval. The store allocates accounts and transfer ids first (see store/db.py:
accounts the store knows and the ledger lacks are re-created at startup; ids come from a counter,
so a retried request after a crash never reuses one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import attrs
import trio

from ledger.types import AccountSpec, Batch, BatchResult, TransferSpec, TransferStatus
from ledger.wal import WalFullError

log = logging.getLogger("authsrv.rest")

WAL_FULL_RETRIES_MAX = 50
WAL_FULL_BACKOFF_S = 0.01


@attrs.frozen
class BalanceAmounts:
    booked: int  # posted: what has settled
    available: int  # booked minus holds: what a card can spend now


class LedgerUnavailable(Exception):
    """The server has no ledger attached (a REST app built without one, e.g. in unit tests)."""


class LedgerNotWritable(Exception):
    """The ledger cannot record a change now: its write-ahead log cannot be written (full disk, I/O
    error) or its buffer stayed full. Answered 503 LEDGER_UNAVAILABLE with Retry-After; nothing was
    changed (docs/operations.md, "Full disk and I/O errors")."""


def check_writable(ledger) -> None:
    """Raise LedgerNotWritable while the log cannot be written, before anything is changed."""
    reason = getattr(getattr(ledger, "wal", None), "unwritable_reason", None)
    if reason is not None:
        raise LedgerNotWritable(f"the ledger cannot record changes now (write-ahead log: {reason}); try again later")


async def submit(ledger, *, accounts: Iterable[AccountSpec] = (),
                 transfers: Iterable[TransferSpec] = ()) -> BatchResult:
    """Apply and make durable; the caller answers only after this returns."""
    if ledger is None:
        raise LedgerUnavailable("no ledger")
    check_writable(ledger)
    batch = Batch(timestamp_ns=time.time_ns(), accounts=tuple(accounts), transfers=tuple(transfers))
    for _ in range(WAL_FULL_RETRIES_MAX):
        try:
            result, seq = ledger.submit(batch)
            break
        except WalFullError:
            await trio.sleep(WAL_FULL_BACKOFF_S)  # the committer is draining a full buffer
    else:
        raise LedgerNotWritable("the ledger's write-ahead log is behind (its buffer stayed full); try again later")
    await ledger.wait_durable(seq)
    return result


def transfer_ok(status: TransferStatus) -> bool:
    return status in (TransferStatus.created, TransferStatus.exists)


def amounts(ledger, account_id: int) -> BalanceAmounts:
    """Booked and available amounts of one ledger account (zero if the ledger lacks it yet)."""
    if ledger is None:
        raise LedgerUnavailable("no ledger")
    view = ledger.ledger.balance(account_id)
    if view is None:
        return BalanceAmounts(0, 0)
    return BalanceAmounts(booked=view.posted, available=view.available)


async def charge_creation_fee(ctx, kind_name: str, *, program, balance, card_id: int = 0) -> None:
    """The program's account- or card-creation fee, right after the creation (docs/money.md).

    What the balance cannot pay now is recorded as owed and collected by `authsrv fees run`."""
    from authsrv.feesrun import creation_fee_transfers
    from authsrv.hotpath.fees import FeeKind

    if ctx.ledger is None or program is None or balance is None:
        return
    kind = FeeKind.card_creation if kind_name == "card" else FeeKind.account_creation
    transfers = await ctx.in_thread(creation_fee_transfers, ctx, program, kind, balance, card_id)
    if transfers:
        result = await submit(ctx.ledger, transfers=transfers)
        log.info("%s creation fee on balance %d: %s", kind_name, balance.id,
                 [status.name for status in result.transfer_results])


async def charge_card_fee(ctx, card) -> None:
    """The card program's card-creation fee (none for the demo program)."""
    program = await ctx.in_thread(ctx.store.get_program, card.config_id)
    balance = await ctx.in_thread(ctx.store.get_balance, card.balance_id)
    await charge_creation_fee(ctx, "card", program=program, balance=balance, card_id=card.id)
