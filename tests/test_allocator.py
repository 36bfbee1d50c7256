"""glibc malloc settings of the server (authsrv/allocator.py): large objects in mappings of their
own, returned when freed, whatever was freed before (the soak's RSS growth, docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from authsrv.allocator import heap_figures

MIB = 2**20
PROBE = """import json, sys
from authsrv.allocator import heap_figures, tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
big = bytes(20 * 2**20)
del big  # a mapped chunk freed: glibc's dynamic threshold rises to its size
kept = [bytes(2 * 2**20) for _ in range(10)]  # 20 MiB in 2 MiB objects: below that threshold
held = heap_figures()
del kept
print(json.dumps({"held": held, "freed": heap_figures()}))
"""

pytestmark = pytest.mark.skipif(heap_figures() is None, reason="glibc only")


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_untuned_glibc_keeps_large_objects_in_its_heap_after_a_large_free():
    """The behaviour the settings remove: after a 20 MiB chunk is freed, 2 MiB objects come from the
    heap, which keeps them as free holes when they are freed below its top."""
    figures = probe("untuned")
    assert figures["held"]["heap_in_use"] >= 20 * MIB and figures["held"]["mapped"] < 2 * MIB


def test_tuned_large_objects_are_mapped_and_returned_when_freed():
    figures = probe("tuned")
    assert figures["held"]["mapped"] >= 20 * MIB and figures["held"]["heap"] < 8 * MIB
    assert figures["freed"]["mapped"] < 2 * MIB  # given back to the system, not kept as a high-water mark
