"""bench/wal_commit.py: the log alone, writer thread against inline commits (docs/benchmarks.md, 8)."""

from __future__ import annotations

from pathlib import Path

import trio

from bench.wal_commit import main, run_level
from tests.test_wal import replayed


def test_thread_only_mode_never_writes_inline_and_every_append_is_durable(tmp_path: Path) -> None:
    figures = trio.run(run_level, tmp_path, 4, 0.3, 0.0)
    assert figures["inline"] == 0 and figures["threaded"] > 0
    assert figures["cpu_us_per_group"] > 0 and figures["records_per_group"] >= 1
    assert [seq for seq, _ in replayed(tmp_path)] == list(range(1, figures["appends"] + 1))


def test_the_command_prints_both_modes(tmp_path: Path, capsys) -> None:
    assert main(["--seconds", "0.2", "--tasks", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "writer thread" in out and "inline allowed" in out
