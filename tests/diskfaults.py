"""Fault injection for the write-ahead log's disk calls (tests only).

`DiskFaults(monkeypatch, directory)` wraps os.write, os.pwritev, os.fdatasync, os.fsync and
os.ftruncate and the log's `_fallocate` hook; a call on a descriptor of a file under `directory`
fails with the armed errno while armed, every other call goes to the real function. Nothing else
is mocked. A `pwritev(..., RWF_DSYNC)` (the log's durable write) is what it does: a write, then a
sync of it, each recorded and failed as `write` and `fdatasync`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ledger import wal as wal_module

CALLS = ("write", "fdatasync", "fsync", "fallocate", "ftruncate")


class DiskFaults:
    def __init__(self, monkeypatch, directory: Path) -> None:
        self.directory = str(Path(directory).resolve())
        self.armed: dict[str, int] = {}  # call -> errno to fail with
        self.partial_write = False  # a failing write first writes half of what it was given
        self.failures: dict[str, int] = dict.fromkeys(CALLS, 0)
        self.calls: list[tuple[str, int]] = []  # (call, size or offset) on the log's files, in order
        self._real = {"write": os.write, "fdatasync": os.fdatasync, "fsync": os.fsync,
                      "ftruncate": os.ftruncate, "fallocate": wal_module._fallocate}
        monkeypatch.setattr(wal_module.os, "write", self._write)
        if hasattr(os, "pwritev"):
            monkeypatch.setattr(wal_module.os, "pwritev", self._pwritev)
        monkeypatch.setattr(wal_module.os, "fdatasync", self._wrap("fdatasync"))
        monkeypatch.setattr(wal_module.os, "fsync", self._wrap("fsync"))
        monkeypatch.setattr(wal_module.os, "ftruncate", self._ftruncate)
        monkeypatch.setattr(wal_module, "_fallocate", self._fallocate)

    def arm(self, code: int = errno.ENOSPC, *calls: str) -> None:
        for call in calls or ("write", "fallocate"):
            assert call in CALLS, call
            self.armed[call] = code

    def disarm(self) -> None:
        self.armed.clear()

    def _ours(self, fd: int) -> bool:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        return target.startswith(self.directory)

    def _fail(self, call: str, fd: int) -> None:
        code = self.armed.get(call)
        if code is not None and self._ours(fd):
            self.failures[call] += 1
            raise OSError(code, f"{os.strerror(code)} (injected into {call})")

    def _write(self, fd: int, data) -> int:
        ours = self._ours(fd)
        if ours:
            self.calls.append(("write", len(data)))
        if ours and "write" in self.armed and self.partial_write and len(data) > 1:
            self._real["write"](fd, bytes(data[: len(data) // 2]))
            self.failures["write"] += 1
            code = self.armed["write"]
            raise OSError(code, f"{os.strerror(code)} (injected after a partial write)")
        self._fail("write", fd)
        return self._real["write"](fd, data)

    def _pwritev(self, fd: int, buffers, offset: int, flags: int = 0) -> int:
        # The log's segments are opened O_APPEND, where Linux appends whatever `offset` says: the
        # write part is this layer's write (recorded, failed and torn as a write is).
        written = self._write(fd, b"".join(bytes(buffer) for buffer in buffers))
        if flags & getattr(os, "RWF_DSYNC", 0):  # then the sync: a failing one leaves the bytes cached
            self._wrap("fdatasync")(fd)
        return written

    def _wrap(self, call: str):
        def wrapped(fd: int) -> None:
            if self._ours(fd):
                self.calls.append((call, 0))
            self._fail(call, fd)
            self._real[call](fd)

        return wrapped

    def _ftruncate(self, fd: int, length: int) -> None:
        if self._ours(fd):
            self.calls.append(("ftruncate", length))
        self._fail("ftruncate", fd)
        self._real["ftruncate"](fd, length)

    def _fallocate(self, fd: int, offset: int, length: int) -> None:
        self.calls.append(("fallocate", offset + length))
        self._fail("fallocate", fd)
        self._real["fallocate"](fd, offset, length)


def before_each_sync(monkeypatch, hook) -> None:
    """Call hook(fd) before every data sync the log makes, whichever call makes it: fdatasync, or
    the durable write pwritev(..., RWF_DSYNC) (fault injection: a slow or a held disk)."""
    real_fdatasync, real_pwritev = os.fdatasync, getattr(os, "pwritev", None)

    def fdatasync(fd: int) -> None:
        hook(fd)
        real_fdatasync(fd)

    def pwritev(fd: int, buffers, offset: int, flags: int = 0) -> int:
        if flags & getattr(os, "RWF_DSYNC", 0):
            hook(fd)
        return real_pwritev(fd, buffers, offset, flags)

    monkeypatch.setattr(wal_module.os, "fdatasync", fdatasync)
    if real_pwritev is not None:
        monkeypatch.setattr(wal_module.os, "pwritev", pwritev)
