"""What holds the event loop: task steps and garbage collections longer than a threshold.

Every authorization waits while one task step runs on the loop, and while any thread collects
garbage (a collection holds the GIL). When p99.9 is long, this says which: opt-in with
`[server] slow_step_ms` (0, the default, is off; on, every step costs ~2 us more, measured: reading
the thread's CPU clock is a system call).

Each step or collection held at least the threshold is observed in
`authsrv_loop_slow_step_seconds{kind}` and written as a warning line, at most one a second (with a
count of those left out): the task's name, wall and CPU milliseconds. A wall far above the CPU means
the thread waited for the GIL or for a CPU meanwhile, not that the step had that much work. Task
names are the code's, never request data.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import trio

from authsrv.ratelog import RateLimitedLog

log = logging.getLogger("authsrv.loopwatch")

LOG_INTERVAL_S = 1.0
# The label values of authsrv_loop_slow_step_seconds: a fixed set, by the task name's module.
KINDS = ("iso", "rest", "ledger", "clearing", "gc", "other")
_KIND_OF_PREFIX = (  # first match wins; clearing runs in the REST request that uploaded the file
    ("authsrv.iso.", "iso"),
    ("authsrv.clearing.", "clearing"),
    ("anycorn.", "rest"),
    ("authsrv.rest.", "rest"),
    ("ledger.", "ledger"),
)


def kind_of(task_name: str) -> str:
    for prefix, kind in _KIND_OF_PREFIX:
        if task_name.startswith(prefix):
            return kind
    return "other"


class LoopWatch(trio.abc.Instrument):
    """The instrument (the trio thread's steps) and the gc callback (any thread's collections)."""

    def __init__(self, threshold_s: float, histogram) -> None:
        assert threshold_s > 0
        self.threshold_s = threshold_s
        self._children = {kind: histogram.labels(kind=kind) for kind in KINDS}  # the one label: kind
        self._lines = RateLimitedLog(log, LOG_INTERVAL_S)
        self._step_wall = self._step_cpu = 0.0
        # One collection at a time in the process (the GIL), whichever thread runs it.
        self._gc_wall = self._gc_cpu = 0.0

    def before_task_step(self, task) -> None:
        self._step_wall = time.perf_counter()
        self._step_cpu = time.thread_time()

    def after_task_step(self, task) -> None:
        if not self._step_wall:  # the step that added the instrument: its start was not seen
            return
        wall = time.perf_counter() - self._step_wall
        if wall >= self.threshold_s:
            cpu = time.thread_time() - self._step_cpu
            self._held(kind_of(task.name), wall, cpu, f"a step of {task.name}")

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_wall = time.perf_counter()
            self._gc_cpu = time.thread_time()
            return
        wall = time.perf_counter() - self._gc_wall
        if wall >= self.threshold_s:
            cpu = time.thread_time() - self._gc_cpu
            self._held("gc", wall, cpu, f"a garbage collection of generation {info.get('generation')} in thread "
                                         f"{threading.current_thread().name}")

    def _held(self, kind: str, wall: float, cpu: float, what: str) -> None:
        self._children[kind].observe(wall)
        self._lines.warning("event loop held %.1f ms by %s (CPU %.1f ms; the rest waiting for the GIL or a CPU)",
                            1000 * wall, what, 1000 * cpu)


async def watch_loop(slow_step_ms: float, histogram) -> None:
    """For the lifetime of the service (until cancelled): the watch on, when slow_step_ms > 0."""
    if slow_step_ms <= 0:
        return
    watch = LoopWatch(slow_step_ms / 1000, histogram)
    trio.lowlevel.add_instrument(watch)
    gc.callbacks.append(watch.on_gc)
    log.info("watching the event loop: steps and collections of %.1f ms or more are logged and counted",
             slow_step_ms)
    try:
        await trio.sleep_forever()
    finally:
        gc.callbacks.remove(watch.on_gc)
        trio.lowlevel.remove_instrument(watch)
