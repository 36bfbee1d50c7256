"""The switch's snapshots, built by replay in a process of their own (ledger.compact).

`authsrv serve` runs `python -m authsrv.compactor SETTINGS LEDGER_DIR SEQ` every
`[ledger] snapshot_interval_records`: this process rebuilds the ledger and the authorization
journal at SEQ from the newest snapshot and the log, exactly as a restart would
(authsrv.app.rebuild_journal), and writes the snapshot for the server to publish. Nothing of the
server's memory is shared, so the server pays nothing while it runs; a forked writer made it copy
every page it wrote for seconds (docs/benchmarks.md, section 6).

SETTINGS is the JSON of the bounds the server runs with (`CompactorSettings`), so the image is
built with them rather than with an authsrv.toml edited since.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import msgspec

from authsrv.config import DuplicatesConfig, HistoryConfig, LedgerConfig


class CompactorSettings(msgspec.Struct, frozen=True):
    """What of the server's config the rebuild depends on (what authsrv.app.new_journal reads)."""

    ledger: LedgerConfig
    duplicates: DuplicatesConfig
    history: HistoryConfig


def command(config) -> tuple[str, ...]:
    """The command prefix for DurableLedger.compactor: the directory and seq are appended."""
    settings = CompactorSettings(ledger=config.ledger, duplicates=config.duplicates, history=config.history)
    return (sys.executable, "-m", "authsrv.compactor", msgspec.json.encode(settings).decode())


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: python -m authsrv.compactor SETTINGS_JSON LEDGER_DIR SEQ", file=sys.stderr)
        return 2
    from ledger.compact import become_compactor, rebuild, summary, write_image

    become_compactor()
    started = time.perf_counter()
    settings = msgspec.json.decode(argv[0], type=CompactorSettings)
    directory, seq = Path(argv[1]), int(argv[2])

    from authsrv.recovery import new_journal, rebuild_journal

    replayed: list[bytes] = []
    ledger, app_snapshot, snapshot_seq = rebuild(directory, seq, on_app=lambda _, data: replayed.append(data))
    journal = new_journal(settings)
    rebuild_journal(journal, ledger, app_snapshot, replayed, settings.ledger)
    write_image(directory, seq, ledger, journal.to_snapshot())
    print(summary(seq, snapshot_seq, started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
