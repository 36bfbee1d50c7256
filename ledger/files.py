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


# pwritev2's RWF_DSYNC (Linux 4.7+): a write that returns once its data is on disk, as write +
# fdatasync would. Python names the flag where the platform has it.
HAVE_DSYNC_WRITE = hasattr(os, "pwritev") and hasattr(os, "RWF_DSYNC")


def write_all_dsync(fd: int, data: bytes | bytearray, offset: int) -> None:
    """write_all(fd, data) + fdatasync(fd) as one system call per piece: a writer thread takes the
    GIL back once per group, not twice. For a file opened with O_APPEND, where Linux appends
    whatever `offset` says (it is the file's size, for a short write's rest). Raises OSError as
    write or fdatasync would; EINVAL or EOPNOTSUPP where the kernel or file system lacks the flag."""
    view = memoryview(data)
    # Bounded: every pass writes at least one byte or raises.
    while view:
        written = os.pwritev(fd, [view], offset, os.RWF_DSYNC)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev returned 0")
        view = view[written:]
        offset += written


def numbered_files(directory: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    """(number, path) of every file whose name matches `pattern` (group 1: the number), in order."""
    found = []
    for path in Path(directory).iterdir():
        match = pattern.match(path.name)
        if match is not None:
            found.append((int(match.group(1)), path))
    found.sort()
    return found


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a new, renamed or linked file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_private_file(path: Path, data: bytes) -> None:
    """Create `path` (mode 0600) holding `data`, durably and whole, never replacing a file.

    A temporary file is written and fsync'd, then hard-linked into place: link() fails when the
    target exists (FileExistsError), so an existing secret is never replaced and a crash never
    leaves half a file under the real name."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask or an interrupted earlier run
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    finally:
        os.unlink(temporary)
    fsync_directory(path.parent)
