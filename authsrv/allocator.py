"""glibc malloc settings for the long-running server (docs/benchmarks.md, section 6).

Measured in the soak (`python -m bench.soak --trace-memory DIR`, 1,400/s, every count bound
reached): from 210 s to 420 s pymalloc stayed level (7.0M blocks in use, 516 -> 529 arenas), while
glibc's heap grew from 123 to 190 MiB, 27 MiB of it in use and 39 MiB free (holes), which was the
RSS growth. Python takes every object over 512 bytes from glibc: the tables of the big dicts and
sets (pending holds, remembered ids, the journal's indexes), long lists, bytes. glibc's mmap
threshold is dynamic: once a mapped chunk is freed, the threshold rises to that chunk's size (up to
32 MiB), so the next tables of those dicts come from the heap, which gives memory back only from
its top, and each resize to a new high leaves a hole behind. A fixed threshold (set with mallopt,
which also stops the adjustment) keeps every allocation above it in a mapping of its own, returned
to the system when freed. The number of malloc arenas is capped too: worker threads (clearing,
store commits) would otherwise each get an arena of their own, with its own high-water mark.

Not glibc (or no mallopt): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("authsrv.allocator")

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept fixed
TRIM_THRESHOLD_BYTES = 128 * 1024  # the heap's free top above this goes back to the system
ARENAS_MAX = 2  # the main arena and one for every worker thread together


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "mallinfo2") else None


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds and cap its arenas; True when all three were taken.
    Call once at startup, before worker threads start."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    taken = all(libc.mallopt(option, value) == 1 for option, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_ARENA_MAX, ARENAS_MAX)))
    if not taken:
        log.warning("malloc settings not taken: memory may keep its high-water mark")
    return taken


def heap_figures() -> dict[str, int] | None:
    """glibc's own figures (mallinfo2), in bytes: `heap` (arenas), `heap_in_use`, `heap_free`,
    `mapped` (chunks in mappings of their own). None when not glibc."""
    libc = _libc()
    if libc is None:
        return None
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return {"heap": info.arena, "heap_in_use": info.uordblks, "heap_free": info.fordblks, "mapped": info.hblkhd}
