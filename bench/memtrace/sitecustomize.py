"""Memory tracing for `python -m bench.soak --trace-memory DIR` (docs/benchmarks.md, section 6).

bench.soak puts this directory first on the PYTHONPATH of the `authsrv serve` it starts, so Python
imports this module at startup. In that process only (`serve` in argv and AUTHSRV_MEMTRACE_DIR set)
a daemon thread writes DIR/memtrace-NNNN.txt every AUTHSRV_MEMTRACE_SECONDS:

- always (cheap: O(arenas), the GIL held a few milliseconds): VmRSS; Python's allocator (pymalloc:
  blocks in use, arenas in use, their high-water mark, bytes in used and in free blocks, from
  `sys._debugmallocstats`); glibc's heap (`mallinfo2`: bytes in use and free in its arenas, bytes
  in mmapped chunks). Growth of RSS with the blocks in use flat is the allocators keeping a
  high-water mark, not retained objects.
- with AUTHSRV_MEMTRACE_TRACEMALLOC=1: tracemalloc, started one interval after startup (recovery
  under tracing would outlast the soak's readiness wait), and the allocation sites that grew the
  most since the first snapshot and the previous one. Costly: a snapshot of a soak-sized server
  holds the GIL for tens of seconds (measured at 700/s: clearing uploads then time out), so only
  for small runs. Its hooks wrap pymalloc, whose arena figures are then not printed.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 8
TOP_LINES = 30
TOP_TRACEBACKS = 8
SNAPSHOTS_MAX = 1_000
_IGNORED = (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"), tracemalloc.Filter(False, "<unknown>"))
# sys._debugmallocstats' summary lines worth keeping (the per-size-class table is left out)
_PYMALLOC_LINES = re.compile(r"^# arenas|^# bytes in|^\d+ unused pools")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _glibc() -> list[str]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return ["glibc: mallinfo2 not available"]
    mib = 2**20
    return [f"glibc: arenas {info.arena / mib:.1f} MiB (in use {info.uordblks / mib:.1f}, free {info.fordblks / mib:.1f},"
            f" top releasable {info.keepcost / mib:.1f}), mmapped {info.hblkhd / mib:.1f} MiB in {info.hblks} chunks"]


def _pymalloc() -> list[str]:
    """sys._debugmallocstats writes to the C stderr: caught in a file for the call (the GIL is held,
    so no Python thread writes to stderr meanwhile)."""
    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(caught.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode(errors="replace")
    kept = [" ".join(line.split()) for line in text.splitlines() if _PYMALLOC_LINES.match(line.strip())]
    return [f"pymalloc: blocks in use {sys.getallocatedblocks():,}"] + ["pymalloc: " + line for line in kept]


def _traced(snapshot, first, previous) -> list[str]:
    traced, peak = tracemalloc.get_traced_memory()
    lines = [f"traced {traced / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)"]
    for title, base, key, top in (("since the first snapshot, by line", first, "lineno", TOP_LINES),
                                  ("since the previous snapshot, by line", previous, "lineno", TOP_LINES),
                                  ("since the first snapshot, by traceback", first, "traceback", TOP_TRACEBACKS)):
        if base is None:
            continue
        lines.append(f"\n-- {title}")
        for stat in snapshot.compare_to(base, key)[:top]:
            lines.append(str(stat))
            if key == "traceback":
                lines.extend("    " + frame for frame in stat.traceback.format())
    return lines


def _run(directory: Path, interval_s: float, trace: bool) -> None:
    started = time.monotonic()
    first = previous = None
    for number in range(SNAPSHOTS_MAX):  # bounded: at most SNAPSHOTS_MAX files
        time.sleep(interval_s)
        if trace and not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
            continue
        lines = [f"elapsed {time.monotonic() - started:.0f} s  VmRSS {_rss_bytes() / 2**20:.1f} MiB"]
        lines += _pymalloc() + _glibc()
        if trace:
            snapshot = tracemalloc.take_snapshot().filter_traces(_IGNORED)
            lines += _traced(snapshot, first, previous)
            first = first or snapshot
            previous = snapshot
        (directory / f"memtrace-{number:04d}.txt").write_text("\n".join(lines) + "\n")


def _start() -> None:
    directory = os.environ.get("AUTHSRV_MEMTRACE_DIR")
    if not directory or "serve" not in sys.argv:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    interval_s = float(os.environ.get("AUTHSRV_MEMTRACE_SECONDS", "60"))
    trace = os.environ.get("AUTHSRV_MEMTRACE_TRACEMALLOC") == "1"
    threading.Thread(target=_run, args=(path, interval_s, trace), name="memtrace", daemon=True).start()


_start()
