"""In-memory ledger throughput: holds placed and then posted, per second.

Run: `python -m bench.ledger_memory [--holds N]`. 10,000 funded user accounts (limit-flagged, as
cardholder balances are) against one settlement account; each hold is an authorization (pending,
with a 7-day timeout and an RRN reference), each post a clearing of the whole hold. Batches of 1
are the one-authorization-per-log-record case, batches of 64 the group-commit case. Also prints
the apply latency distribution for batches of 1 and the memory cost of accounts, pending holds and
remembered ids (tracemalloc), which the bounds in ledger/state.py are sized from.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
import tracemalloc

from ledger import (
    AccountFlags,
    AccountKind,
    AccountSpec,
    AccountStatus,
    Batch,
    BatchResult,
    Ledger,
    TransferFlags,
    TransferSpec,
    TransferStatus,
)

ACCOUNTS = 10_000
SETTLEMENT_ID = 10**9 + 1  # above any user account id
FUNDING_ID = 10**9 + 2
HOLD_TIMEOUT_S = 7 * 24 * 3600
BATCH_SIZES = (1, 64)
CHUNK = 4_096  # accounts or transfers per setup batch (below TRANSFERS_PER_BATCH_MAX)
FREEZE_EVERY = 10_000


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def all_created(result: BatchResult) -> None:
    assert set(result.account_results) <= {AccountStatus.created}, result.account_results
    assert set(result.transfer_results) <= {TransferStatus.created}, result.transfer_results


def funded_ledger(accounts: int = ACCOUNTS) -> Ledger:
    ledger = Ledger()
    specs = [
        AccountSpec(i, "EUR", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits)
        for i in range(1, accounts + 1)
    ]
    specs += [AccountSpec(SETTLEMENT_ID, "EUR", AccountKind.settlement), AccountSpec(FUNDING_ID, "EUR", AccountKind.funding)]
    for start in range(0, len(specs), CHUNK):
        all_created(ledger.apply(Batch(0, accounts=tuple(specs[start : start + CHUNK]))))
    funding = [TransferSpec(10**12 + i, FUNDING_ID, i, 10**12) for i in range(1, accounts + 1)]
    for start in range(0, len(funding), CHUNK):
        all_created(ledger.apply(Batch(0, transfers=tuple(funding[start : start + CHUNK]))))
    return ledger


def hold_and_post(k: int, accounts: int = ACCOUNTS) -> tuple[TransferSpec, TransferSpec]:
    hold = TransferSpec(
        2 * k + 1,
        1 + k % accounts,
        SETTLEMENT_ID,
        1_000 + k % 5_000,
        TransferFlags.pending,
        timeout_s=HOLD_TIMEOUT_S,
        reference=f"{k:012d}",
    )
    post = TransferSpec(2 * k + 2, 0, 0, 0, TransferFlags.post_pending, pending_id=2 * k + 1)
    return hold, post


def run_throughput(holds: int, batch_size: int, freeze_every: int = 0) -> dict[str, float]:
    """`freeze_every` > 0: gc.freeze() after that many applies, so full collections only scan
    what is new since (the ledger's objects form no cycles; the collector's work on them is waste)."""
    gc.collect()
    gc.unfreeze()
    ledger = funded_ledger()
    pairs = [hold_and_post(k) for k in range(holds)]
    batches = []
    for start in range(0, holds, batch_size):
        chunk = pairs[start : start + batch_size]
        batches.append(Batch(0, transfers=tuple(h for h, _ in chunk)))
        batches.append(Batch(0, transfers=tuple(p for _, p in chunk)))
    latencies_ns: list[int] = []
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for count, batch in enumerate(batches, 1):
        before = clock()
        ledger.apply(batch)
        latencies_ns.append(clock() - before)
        if freeze_every and count % freeze_every == 0:
            gc.freeze()
    elapsed = time.perf_counter() - started
    gc.unfreeze()
    assert ledger.pending_count() == 0 and ledger.balance(SETTLEMENT_ID).posted == sum(h.amount for h, _ in pairs)
    ledger.check_invariants()
    latencies_ns.sort()
    return {
        "holds_per_s": holds / elapsed,
        "us_per_hold_and_post": elapsed / holds * 1e6,
        "apply_p50_us": latencies_ns[len(latencies_ns) // 2] / 1e3,
        "apply_p99_us": latencies_ns[len(latencies_ns) * 99 // 100] / 1e3,
        "apply_max_us": latencies_ns[-1] / 1e3,
    }


def measure_memory(count: int) -> dict[str, float]:
    """Bytes per account, per pending hold, per remembered (posted) transfer, with history."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ledger = funded_ledger(count)
    per_account = (tracemalloc.get_traced_memory()[0] - base) / count
    pairs = [hold_and_post(k, count) for k in range(count)]
    mark = tracemalloc.get_traced_memory()[0]
    for start in range(0, count, CHUNK):
        all_created(ledger.apply(Batch(0, transfers=tuple(h for h, _ in pairs[start : start + CHUNK]))))
    per_hold = (tracemalloc.get_traced_memory()[0] - mark) / count
    mark = tracemalloc.get_traced_memory()[0]
    for start in range(0, count, CHUNK):
        all_created(ledger.apply(Batch(0, transfers=tuple(p for _, p in pairs[start : start + CHUNK]))))
    per_post = (tracemalloc.get_traced_memory()[0] - mark) / count
    tracemalloc.stop()
    # The specs themselves are built by the caller (decoded from the wire or the log) and kept
    # by reference; they are counted in the per-hold / per-post figures only if allocated above.
    return {"bytes_per_account_funded": per_account, "bytes_per_pending_hold": per_hold, "bytes_per_post": per_post}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holds", type=int, default=100_000, help="holds per run (default 100000)")
    parser.add_argument("--memory-count", type=int, default=50_000, help="objects for the memory figures")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}; python {platform.python_version()}; {os.cpu_count()} cpus; {cpu_model()}")
    print(f"ledger: {ACCOUNTS} funded accounts, {args.holds} holds each placed then posted in full")
    runs = [(size, 0) for size in BATCH_SIZES] + [(1, FREEZE_EVERY)]
    for batch_size, freeze_every in runs:
        r = run_throughput(args.holds, batch_size, freeze_every)
        gc_note = f", gc.freeze() every {freeze_every} applies" if freeze_every else ", default gc"
        print(
            f"batch of {batch_size:>2}{gc_note}: {r['holds_per_s']:>9,.0f} holds placed+posted/s, "
            f"{r['us_per_hold_and_post']:.2f} us per hold+post; apply p50 {r['apply_p50_us']:.1f} us, "
            f"p99 {r['apply_p99_us']:.1f} us, max {r['apply_max_us']:.0f} us"
        )
    m = measure_memory(args.memory_count)
    print(
        f"memory: {m['bytes_per_account_funded']:.0f} B per funded account, "
        f"{m['bytes_per_pending_hold']:.0f} B per pending hold, {m['bytes_per_post']:.0f} B per post "
        "(remembered id + history; the spec objects come from the caller)"
    )


if __name__ == "__main__":
    main()
