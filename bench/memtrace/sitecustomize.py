"""Memory tracing for `python -m bench.soak --trace-memory DIR` (docs/benchmarks.md, section 6).

bench.soak puts this directory first on the PYTHONPATH of the `authsrv serve` it starts, so Python
imports this module at startup. In that process only (`serve` in argv and AUTHSRV_TRACEMALLOC_DIR
set) it starts a daemon thread that starts tracemalloc after one AUTHSRV_TRACEMALLOC_SECONDS
(recovery under tracing would outlast the soak's readiness wait; what the server holds by then is
not traced, what it grows afterwards is), then every AUTHSRV_TRACEMALLOC_SECONDS writes
DIR/memtrace-NNNN.txt: VmRSS, the traced total, and the allocation sites that grew the most since
the first snapshot and since the previous one (by line, then by traceback). Comparing VmRSS with
the traced total tells retained Python objects (both grow) from allocator high-water marks and
memory outside Python's allocator (RSS alone grows). Diagnosis only: tracing costs the server
roughly twice the CPU per request, and each snapshot holds the GIL for a second or more.
"""

from __future__ import annotations

import os
import sys
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


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _write(out: Path, started: float, snapshot, first, previous) -> None:
    traced, peak = tracemalloc.get_traced_memory()
    lines = [f"elapsed {time.monotonic() - started:.0f} s  VmRSS {_rss_bytes() / 2**20:.1f} MiB"
             f"  traced {traced / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)"]
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
    out.write_text("\n".join(lines) + "\n")


def _run(directory: Path, interval_s: float) -> None:
    time.sleep(interval_s)
    tracemalloc.start(FRAMES)
    started = time.monotonic()
    first = previous = None
    for number in range(SNAPSHOTS_MAX):  # bounded: at most SNAPSHOTS_MAX files
        time.sleep(interval_s)
        snapshot = tracemalloc.take_snapshot().filter_traces(_IGNORED)
        _write(directory / f"memtrace-{number:04d}.txt", started, snapshot, first, previous)
        first = first or snapshot
        previous = snapshot


def _start() -> None:
    directory = os.environ.get("AUTHSRV_TRACEMALLOC_DIR")
    if not directory or "serve" not in sys.argv:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    interval_s = float(os.environ.get("AUTHSRV_TRACEMALLOC_SECONDS", "60"))
    threading.Thread(target=_run, args=(path, interval_s), name="memtrace", daemon=True).start()


_start()
