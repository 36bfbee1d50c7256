"""CPU per commit group of the write-ahead log alone, the writer thread against inline commits.

`python -m bench.wal_commit [--seconds S] [--tasks 1,8,64] [--dir DIR]`

At each level, that many trio tasks loop `append` (90 bytes) + `wait_durable` for S seconds against
a fresh log, once with every group handed to the writer thread (`inline_commit_s_max=0`) and once
with inline commits allowed (the default: on an idle loop with a fast disk). Printed: durable
appends/s, CPU of the whole process (both threads, kernel included) per commit group, records per
group, and how many groups went each way. docs/benchmarks.md, section 8.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import trio

from ledger.wal import INLINE_COMMIT_S_MAX, Wal

PAYLOAD = b"x" * 90  # about a logged hold+post batch
TASKS = (1, 8, 64)
SECONDS = 3.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_level(directory: Path, tasks: int, seconds: float, inline_commit_s_max: float) -> dict[str, float]:
    groups: list[int] = []
    wal = Wal.open(directory, inline_commit_s_max=inline_commit_s_max,
                   on_commit=lambda records, size, elapsed: groups.append(records))  # fmt: skip
    appends = 0

    async def client(deadline: float) -> None:
        nonlocal appends
        while time.perf_counter() < deadline:  # bounded by the deadline
            await wal.wait_durable(wal.append(PAYLOAD))
            appends += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(wal.run_committer)
        cpu_started, wall_started = _cpu_s(), time.perf_counter()
        async with trio.open_nursery() as clients:
            for _ in range(tasks):
                clients.start_soon(client, wall_started + seconds)
        wall, cpu = time.perf_counter() - wall_started, _cpu_s() - cpu_started
        nursery.cancel_scope.cancel()
    wal.close()
    count = max(len(groups), 1)
    return {"appends": appends, "appends_per_s": appends / wall, "cpu_us_per_group": cpu / count * 1e6, "records_per_group": appends / count,
            "inline": wal.groups_inline, "threaded": wal.groups_threaded}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wal_commit", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--tasks", default=",".join(map(str, TASKS)))
    parser.add_argument("--dir", type=Path, default=None, help="where to put the logs (default: a temp dir)")
    args = parser.parse_args(argv)
    levels = [int(part) for part in args.tasks.split(",")]
    print(f"{'mode':<16} {'tasks':>5} {'appends/s':>10} {'CPU us/group':>13} {'records/group':>14} {'inline':>7} {'thread':>7}")
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        for label, inline_max in (("writer thread", 0.0), ("inline allowed", INLINE_COMMIT_S_MAX)):
            for tasks in levels:
                figures = trio.run(run_level, Path(work) / f"{tasks}-{inline_max}", tasks, args.seconds, inline_max)
                print(f"{label:<16} {tasks:>5} {figures['appends_per_s']:>10.0f} {figures['cpu_us_per_group']:>13.1f}"
                      f" {figures['records_per_group']:>14.1f} {figures['inline']:>7} {figures['threaded']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
