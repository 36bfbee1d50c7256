"""Child process for tests/test_ledger_crash.py: load the durable ledger until SIGKILLed.

Run as `python -m tests.crash_child --dir DIR --round R ...`. It opens the DurableLedger in DIR,
runs the group committer, and drives numbered operations from many concurrent trio tasks. Each
operation is one batch; an operation is printed as acknowledged (`ACK ...`, flushed) only AFTER
`wait_durable` returned for its seq: exactly the promise the server makes before answering.

Operation k of round R has op id (R + 1) * ROUND_OPS_MAX + k and touches transfer ids 2*op and
2*op+1 (never the setup's ids).
Its kind is fixed by k, so the parent can rebuild the expected balances from the ids it finds:
  k % 5 in (0, 1, 2)  "pp":   hold 1 unit USER -> SETTLEMENT, linked with a post of all of it
  k % 5 == 3          "hold": hold 1 unit, never resolved
  k % 5 == 4          "fail": hold far more than USER has, linked with a post: the chain fails
Before the load it re-submits the operations named by --resubmit (acknowledged in earlier rounds)
with the same fields and with a different amount, and prints what the ledger answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

from ledger.durable import DurableLedger
from ledger.wal import SEGMENT_SIZE_MAX
from ledger.types import (
    AccountFlags,
    AccountKind,
    AccountSpec,
    Batch,
    TransferFlags,
    TransferSpec,
)

FUNDING, USER, SETTLEMENT = 1, 2, 3
FUNDING_TRANSFER_ID = 5
FUNDS = 10**9  # USER's credit; "fail" operations ask for more than this
FAIL_AMOUNT = 10**12
ROUND_OPS_MAX = 1_000_000  # ops per round (ids of round R are (R + 1) * ROUND_OPS_MAX + k)
RUN_S_MAX = 30.0  # the child stops by itself if nobody kills it

SETUP = Batch(
    timestamp_ns=0,
    accounts=(
        AccountSpec(FUNDING, "EUR", AccountKind.funding),
        AccountSpec(USER, "EUR", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits),
        AccountSpec(SETTLEMENT, "EUR", AccountKind.settlement),
    ),
    transfers=(TransferSpec(FUNDING_TRANSFER_ID, FUNDING, USER, FUNDS),),
)


def kind_of(k: int) -> str:
    return ("pp", "pp", "pp", "hold", "fail")[k % 5]


def op_id(round_: int, k: int) -> int:
    assert 0 < k < ROUND_OPS_MAX
    return (round_ + 1) * ROUND_OPS_MAX + k


def transfers_of(op: int, amount: int = 1) -> tuple[TransferSpec, ...]:
    kind = kind_of(op % ROUND_OPS_MAX)
    hold_id, post_id = 2 * op, 2 * op + 1
    if kind == "hold":
        return (TransferSpec(hold_id, USER, SETTLEMENT, amount, TransferFlags.pending),)
    held = FAIL_AMOUNT if kind == "fail" else amount
    return (
        TransferSpec(hold_id, USER, SETTLEMENT, held, TransferFlags.pending | TransferFlags.linked),
        TransferSpec(post_id, 0, 0, 0, TransferFlags.post_pending, pending_id=hold_id),
    )


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def statuses(result) -> str:
    return ",".join(str(int(status)) for status in result.transfer_results)


async def main(args: argparse.Namespace) -> None:
    durable = DurableLedger.open(Path(args.dir), segment_size_max=args.segment_size_max)
    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        result, seq = durable.submit(SETUP)
        await durable.wait_durable(seq)
        emit(f"SETUP {statuses(result)}")
        for op in args.resubmit:
            same, seq_same = durable.submit_now(transfers=transfers_of(op))
            different, seq_different = durable.submit_now(transfers=transfers_of(op, amount=2))
            await durable.wait_durable(seq_different)
            emit(f"RESUB {op} {statuses(same)} {statuses(different)}")
        emit("READY")
        with trio.move_on_after(RUN_S_MAX):
            async with trio.open_nursery() as workers:
                counter = iter(range(1, args.ops_max + 1))
                for _ in range(args.concurrency):
                    workers.start_soon(worker, durable, args.round, counter)
                if args.snapshot_after_s is not None:
                    workers.start_soon(snapshotter, durable, args)
        nursery.cancel_scope.cancel()
    durable.close()
    emit("DONE")


async def worker(durable: DurableLedger, round_: int, counter) -> None:
    # Bounded: the shared counter yields at most ops_max operations.
    for k in counter:
        op = op_id(round_, k)
        result, seq = durable.submit_now(transfers=transfers_of(op))
        await durable.wait_durable(seq)
        emit(f"ACK {op} {statuses(result)}")


async def snapshotter(durable: DurableLedger, args: argparse.Namespace) -> None:
    """Snapshots while the workers run: synchronous in the trio thread (as the server does), or
    the async variant that writes the file from a worker thread."""
    # Bounded by RUN_S_MAX (the enclosing move_on_after) and snapshots_max.
    for index in range(args.snapshots_max):
        await trio.sleep(args.snapshot_after_s)
        started = time.perf_counter()
        if args.snapshot_mode == "sync" or (args.snapshot_mode == "mixed" and index % 2 == 0):
            seq = durable.snapshot(b"snapshot %d" % index)
        else:
            seq = await durable.snapshot_async(b"snapshot %d" % index)
        emit(f"SNAP {seq} {time.perf_counter() - started:.4f}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ops-max", type=int, default=ROUND_OPS_MAX - 1)
    parser.add_argument("--resubmit", type=json.loads, default=[])
    parser.add_argument("--snapshot-after-s", type=float, default=None)
    parser.add_argument("--snapshots-max", type=int, default=1)
    parser.add_argument("--snapshot-mode", choices=["sync", "async", "mixed"], default="sync")
    parser.add_argument("--segment-size-max", type=int, default=SEGMENT_SIZE_MAX)
    args = parser.parse_args(argv)
    assert 0 < args.ops_max < ROUND_OPS_MAX and 0 < args.concurrency <= 4096
    return args


if __name__ == "__main__":
    trio.run(main, parse_args(sys.argv[1:]))
