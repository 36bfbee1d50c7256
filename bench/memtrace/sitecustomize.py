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
- always: DIR/stalls.txt, one line per event-loop stall (at most STALL_LINES_MAX lines): a task
  that waited more than STALL_DELAY_S between being woken and running, with the tasks that ran
  meanwhile and their time; a collection (`gc` callback) over STALL_GC_S; a return from the I/O
  wait more than STALL_IO_S past its timeout (the GIL held by another thread); and for a single
  task step that runs past STALL_STEP_S, the event loop thread's stack as a watchdog thread saw it
  then (where the time goes). A trio Instrument added by wrapping `trio.run`; it costs about a
  microsecond per task step.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

STALL_DELAY_S = 0.010
STALL_GC_S = 0.003
STALL_IO_S = 0.003
STALL_LINES_MAX = 100_000
STALL_RECENT_STEPS = 400  # task steps kept to say what ran during a delay
STALL_STEP_S = 0.008  # a step still running after this gets its stack logged (once per step)
STALL_WATCH_S = 0.002  # how often the watchdog looks
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


class _StallLog:
    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)
        self._lines = 0

    def write(self, text: str) -> None:
        if self._lines < STALL_LINES_MAX:
            self._lines += 1
            self._file.write(f"{time.time():.3f} {text}\n")


def _stall_instrument(stalls: _StallLog):
    import trio

    class StallFinder(trio.abc.Instrument):
        def __init__(self) -> None:
            self._woken: dict[int, float] = {}
            self._recent: collections.deque[tuple[float, float, str]] = collections.deque(maxlen=STALL_RECENT_STEPS)
            self._step_s = self._io_s = 0.0

        def task_scheduled(self, task) -> None:
            self._woken[id(task)] = time.perf_counter()

        def task_exited(self, task) -> None:
            self._woken.pop(id(task), None)

        def before_task_step(self, task) -> None:
            now = self._step_s = time.perf_counter()
            watch.step(now, task.name)
            woken = self._woken.pop(id(task), None)
            if woken is not None and now - woken > STALL_DELAY_S:
                ran: collections.Counter[str] = collections.Counter()
                for ended, held, name in self._recent:
                    if ended >= woken:
                        ran[name.rsplit(".", 1)[-1]] += held
                top = ", ".join(f"{name} {held * 1000:.1f} ms" for name, held in ran.most_common(4))
                stalls.write(f"delay {(now - woken) * 1000:.1f} ms before {task.name.rsplit('.', 1)[-1]}; ran: {top}")

        def after_task_step(self, task) -> None:
            watch.step(0.0, "")
            now = time.perf_counter()
            self._recent.append((now, now - self._step_s, task.name))

        def before_io_wait(self, timeout: float) -> None:
            self._io_s = time.perf_counter()

        def after_io_wait(self, timeout: float) -> None:
            over = time.perf_counter() - self._io_s - timeout
            if over > STALL_IO_S:
                stalls.write(f"io wait returned {over * 1000:.1f} ms late")

    watch = _StepWatch(stalls, threading.get_ident())
    threading.Thread(target=watch.run, name="stall-watch", daemon=True).start()
    return StallFinder()


class _StepWatch:
    """A daemon thread that logs the loop thread's stack when one task step runs long."""

    def __init__(self, stalls: _StallLog, loop_thread: int) -> None:
        self._stalls, self._loop_thread = stalls, loop_thread
        self._started, self._task, self._seen = 0.0, "", 0.0

    def step(self, started: float, task: str) -> None:
        self._started, self._task = started, task

    def run(self) -> None:
        import traceback

        while True:  # a daemon thread: ends with the process
            time.sleep(STALL_WATCH_S)
            started, task = self._started, self._task
            if not started or started == self._seen or time.perf_counter() - started < STALL_STEP_S:
                continue
            self._seen = started
            frame = sys._current_frames().get(self._loop_thread)
            if frame is None:
                continue
            stack = " <- ".join(f"{entry.filename.rsplit('/', 2)[-2:][-1]}:{entry.lineno} {entry.name}"
                                for entry in reversed(traceback.extract_stack(frame)[-12:]))
            self._stalls.write(f"long step {(time.perf_counter() - started) * 1000:.1f} ms so far in"
                               f" {task.rsplit('.', 1)[-1]}: {stack}")


def _trace_stalls(path: Path) -> None:
    import trio

    stalls = _StallLog(path)
    started: dict[int, float] = {}

    def collected(phase: str, info: dict) -> None:
        if phase == "start":
            started[info["generation"]] = time.perf_counter()
            return
        held = time.perf_counter() - started.pop(info["generation"], time.perf_counter())
        if held > STALL_GC_S:
            stalls.write(f"gc generation {info['generation']} {held * 1000:.1f} ms, collected {info['collected']}"
                         f" ({threading.current_thread().name})")

    gc.callbacks.append(collected)
    run = trio.run

    def traced_run(*args, **kwargs):
        kwargs["instruments"] = [*kwargs.get("instruments", ()), _stall_instrument(stalls)]
        return run(*args, **kwargs)

    trio.run = traced_run


def _start() -> None:
    directory = os.environ.get("AUTHSRV_MEMTRACE_DIR")
    if not directory or "serve" not in sys.argv:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    interval_s = float(os.environ.get("AUTHSRV_MEMTRACE_SECONDS", "60"))
    trace = os.environ.get("AUTHSRV_MEMTRACE_TRACEMALLOC") == "1"
    _trace_stalls(path / "stalls.txt")
    threading.Thread(target=_run, args=(path, interval_s, trace), name="memtrace", daemon=True).start()


_start()
