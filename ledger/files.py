"""File helpers shared by the write-ahead log and the snapshots."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    # Bounded: every pass writes at least one byte or raises.
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write returned 0")
        view = view[written:]


def numbered_files(directory: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    """(number, path) of every file whose name matches `pattern` (group 1: the number), in order."""
    found = []
    for path in Path(directory).iterdir():
        match = pattern.match(path.name)
        if match is not None:
            found.append((int(match.group(1)), path))
    found.sort()
    return found
