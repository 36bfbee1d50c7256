"""Durable hold+post operations per second with group-committed fsync.

`python -m bench.ledger_durable [--seconds S] [--levels 1,4,16,64,256] [--gc-tuned] [--dir DIR]
[--json FILE]`

One operation is one logged batch holding 1 unit of a user's balance, linked with a post of the
whole hold: `DurableLedger.submit` then `await wait_durable(seq)`, the same promise the
authorization path keeps before it answers. At each concurrency level, that many trio tasks loop
for a fixed time against a fresh directory. Printed per level: durable ops/s, CPU time per
operation (both threads), mean and max group size (records per fsync), operation latency p50/p99
and fsync (write + fdatasync) p50/p99. Then the log alone (append + wait_durable of a 90-byte
record, no ledger) at the highest level, and the cost of each step measured alone, to show where
the CPU goes. `--gc-tuned` freezes the setup objects and raises the generation-0 threshold, as a
server holding a large ledger may want to (the cyclic GC otherwise rescans the ledger's objects).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
import timeit
from pathlib import Path

import attrs
import msgspec
import trio
from hdrh.histogram import HdrHistogram

from ledger.durable import DurableLedger, encode_batch
from ledger.state import Ledger
from ledger.types import (
    AccountFlags,
    AccountKind,
    AccountSpec,
    Batch,
    TransferFlags,
    TransferSpec,
)
from ledger.wal import INLINE_COMMIT_S_MAX, Wal

LEVELS = (1, 4, 16, 64, 256)
SECONDS_PER_LEVEL = 3.0
USERS = 1_000
FUNDING, SETTLEMENT, USER_FIRST = 1, 2, 1_000
FUNDS = 10**12
LATENCY_US_MAX = 10_000_000  # histogram range: 10 s
TARGET_OPS_S = 50_000


@attrs.define
class Level:
    concurrency: int
    ops: int
    seconds: float
    cpu_seconds: float
    groups: int
    group_max: int
    latency_us: HdrHistogram
    fsync_us: HdrHistogram

    @property
    def ops_s(self) -> float:
        return self.ops / self.seconds

    def row(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "ops_per_s": round(self.ops_s),
            "cpu_us_per_op": round(self.cpu_seconds / self.ops * 1e6, 1),
            "group_mean": round(self.ops / max(self.groups, 1), 1),
            "group_max": self.group_max,
            "latency_p50_us": self.latency_us.get_value_at_percentile(50),
            "latency_p99_us": self.latency_us.get_value_at_percentile(99),
            "fsync_p50_us": self.fsync_us.get_value_at_percentile(50),
            "fsync_p99_us": self.fsync_us.get_value_at_percentile(99),
        }


def accounts() -> tuple[AccountSpec, ...]:
    users = tuple(
        AccountSpec(USER_FIRST + i, "EUR", AccountKind.user_balance,
                    AccountFlags.debits_must_not_exceed_credits)
        for i in range(USERS)
    )
    return (AccountSpec(FUNDING, "EUR", AccountKind.funding),
            AccountSpec(SETTLEMENT, "EUR", AccountKind.settlement), *users)


def funding() -> tuple[TransferSpec, ...]:
    return tuple(TransferSpec(10 + i, FUNDING, USER_FIRST + i, FUNDS) for i in range(USERS))


PENDING_LINKED = TransferFlags.pending | TransferFlags.linked  # enum `|` costs ~1 µs: once


def hold_and_post(hold_id: int, user: int) -> tuple[TransferSpec, ...]:
    return (
        TransferSpec(hold_id, user, SETTLEMENT, 1, PENDING_LINKED),
        TransferSpec(hold_id + 1, 0, 0, 0, TransferFlags.post_pending, pending_id=hold_id),
    )


async def run_level(directory: Path, concurrency: int, seconds: float) -> Level:
    fsync_us = HdrHistogram(1, LATENCY_US_MAX, 3)
    latency_us = HdrHistogram(1, LATENCY_US_MAX, 3)
    groups: list[int] = []

    def on_commit(records: int, size: int, elapsed: float) -> None:
        groups.append(records)
        fsync_us.record_value(max(1, int(elapsed * 1e6)))

    durable = DurableLedger.open(directory, on_commit=on_commit)
    durable.submit_now(accounts=accounts())
    durable.submit_now(transfers=funding())
    durable.flush_sync()
    groups.clear()
    fsync_us.reset()
    ops = 0
    next_id = [1_000_000]

    async def client(index: int, deadline: float) -> None:
        nonlocal ops
        user = USER_FIRST + index % USERS
        # Bounded by the deadline.
        while time.perf_counter() < deadline:
            hold_id = next_id[0]
            next_id[0] += 2
            started = time.perf_counter_ns()
            result, seq = durable.submit_now(transfers=hold_and_post(hold_id, user))
            await durable.wait_durable(seq)
            latency_us.record_value(max(1, (time.perf_counter_ns() - started) // 1000))
            assert result.transfer_results == (0, 0), result
            ops += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(durable.run)
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        deadline = wall_started + seconds
        async with trio.open_nursery() as clients:
            for index in range(concurrency):
                clients.start_soon(client, index, deadline)
        wall = time.perf_counter() - wall_started
        cpu = time.process_time() - cpu_started
        nursery.cancel_scope.cancel()
    durable.close()
    return Level(concurrency, ops, wall, cpu, len(groups), max(groups, default=0), latency_us, fsync_us)


async def run_wal_level(directory: Path, concurrency: int, seconds: float) -> tuple[float, float, float]:
    """The log alone: (durable appends/s, CPU µs per append, mean group size), inline commits allowed."""
    from bench.wal_commit import run_level

    figures = await run_level(directory, concurrency, seconds, INLINE_COMMIT_S_MAX)
    per_group = figures["records_per_group"]
    return figures["appends_per_s"], figures["cpu_us_per_group"] / per_group, per_group


def step_costs(directory: Path) -> dict[str, float]:
    """Microseconds per operation of each step alone (no trio, no fsync)."""
    number = 20_000
    ledger = Ledger()
    ledger.apply(Batch(timestamp_ns=1, accounts=accounts(), transfers=funding()))
    batches = [Batch(timestamp_ns=2 + i, transfers=hold_and_post(1_000_000 + 2 * i, USER_FIRST + i % USERS))
               for i in range(number)]
    encoder = msgspec.msgpack.Encoder()
    payloads = [encode_batch(encoder, batch) for batch in batches]
    it = iter(batches)
    apply_us = timeit.timeit(lambda: ledger.apply(next(it)), number=number) / number * 1e6
    it = iter(batches)
    encode_us = timeit.timeit(lambda: encode_batch(encoder, next(it)), number=number) / number * 1e6
    wal = Wal.open(directory / "append-only")
    it = iter(payloads)
    append_us = timeit.timeit(lambda: wal.append(next(it)), number=number) / number * 1e6
    wal.close()
    build_us = timeit.timeit(lambda: Batch(timestamp_ns=time.time_ns(),
                                           transfers=hold_and_post(5, USER_FIRST)),
                             number=number) / number * 1e6
    return {"build batch": build_us, "encode (msgpack)": encode_us, "ledger.apply": apply_us,
            "wal.append (frame + crc32c)": append_us}


def machine() -> str:
    model = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, trio {trio.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_durable", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=SECONDS_PER_LEVEL)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--dir", type=Path, default=None, help="where to put the logs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--gc-tuned", action="store_true", help="gc.freeze() + gen-0 threshold 100k")
    args = parser.parse_args(argv)
    if args.gc_tuned:
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
    levels = [int(part) for part in args.levels.split(",")]
    print(f"machine: {machine()}; gc {'tuned' if args.gc_tuned else 'default'} {gc.get_threshold()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        print(f"log directory: {work} (filesystem of {Path(work).resolve().anchor})")
        rows = []
        header = ("conc", "ops/s", "cpu µs/op", "group mean", "group max", "lat p50 µs", "lat p99 µs",
                  "fsync p50 µs", "fsync p99 µs")
        print(" ".join(f"{h:>12}" for h in header))
        for concurrency in levels:
            level = trio.run(run_level, Path(work) / f"c{concurrency}", concurrency, args.seconds)
            row = level.row()
            rows.append(row)
            print(" ".join(f"{value:>12}" for value in row.values()))
        wal_only = trio.run(run_wal_level, Path(work) / "wal-only", levels[-1], args.seconds)
        costs = step_costs(Path(work))
    print(f"log alone at concurrency {levels[-1]}: {wal_only[0]:.0f} durable appends/s, "
          f"{wal_only[1]:.1f} CPU µs per append, mean group {wal_only[2]:.1f}")
    print("cost of each step alone, µs per hold+post operation:")
    for name, micros in costs.items():
        print(f"  {name:<30} {micros:6.2f}")
    best = max(rows, key=lambda row: row["ops_per_s"])
    print(f"best: {best['ops_per_s']} durable hold+post ops/s at concurrency {best['concurrency']} "
          f"(target {TARGET_OPS_S}); CPU {best['cpu_us_per_op']} µs per op")
    if args.json is not None:
        figures = {"machine": machine(), "gc_tuned": args.gc_tuned, "levels": rows,
                   "wal_only": {"concurrency": levels[-1], "appends_per_s": round(wal_only[0]),
                                "cpu_us_per_append": round(wal_only[1], 1)},
                   "step_costs_us": costs}
        args.json.write_bytes(msgspec.json.encode(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
