"""The switch's snapshots, built by replay in a process of their own (ledger.compact).

`authsrv serve` runs `python -m authsrv.compactor SETTINGS LEDGER_DIR SEQ BOUNDS` every
`[ledger] snapshot_interval_records`: this process rebuilds the ledger and the authorization
journal at SEQ from the newest snapshot and the log, exactly as a restart would
(authsrv.app.rebuild_journal), and writes the snapshot for the server to publish. Nothing of the
server's memory is shared, so the server pays nothing while it runs; a forked writer made it copy
every page it wrote for seconds (docs/benchmarks.md, section 6).

SETTINGS is the JSON of the journal's bounds the server runs with (`CompactorSettings`), and BOUNDS
the ledger's (ledger.compact.LedgerBounds), so the image is built with them rather than with an
authsrv.toml edited since.
"""

from __future__ import annotations

import sys

import msgspec

from authsrv.config import DuplicatesConfig, HistoryConfig

USAGE = "python -m authsrv.compactor SETTINGS_JSON LEDGER_DIR SEQ|follow BOUNDS_JSON"


class CompactorSettings(msgspec.Struct, frozen=True):
    """What of the server's config the journal's rebuild depends on (what recovery.new_journal reads)."""

    duplicates: DuplicatesConfig
    history: HistoryConfig


def command(config) -> tuple[str, ...]:
    """The command prefix for DurableLedger.compactor, which appends the directory, the seq and the
    ledger's bounds."""
    settings = CompactorSettings(duplicates=config.duplicates, history=config.history)
    return (sys.executable, "-m", "authsrv.compactor", msgspec.json.encode(settings).decode())


def main(argv: list[str]) -> int:
    from ledger.compact import (Follower, Phases, become_compactor, follow_image, parse_arguments, rebuild, serve,
                                summary, write_image)

    try:
        settings = msgspec.json.decode(argv[0], type=CompactorSettings) if argv else None
    except msgspec.DecodeError as error:
        print(f"settings: {error}\nusage: {USAGE}", file=sys.stderr)
        return 2
    parsed = parse_arguments(argv[1:], USAGE)
    if settings is None or parsed is None:
        return 2
    directory, seq, bounds = parsed
    become_compactor()

    from authsrv.recovery import new_journal, rebuild_journal

    replayed: list[bytes] = []
    if seq is None:  # follow the log: the journal is rebuilt at each image from the last one's
        follower = Follower(directory, bounds, on_app=lambda _, data: replayed.append(data))

        def journal_image() -> bytes:
            journal = new_journal(settings)
            rebuild_journal(journal, follower.ledger, follower.app, replayed, bounds)  # empties `replayed`
            return journal.to_snapshot()

        return serve(follower, lambda upto: follow_image(follower, upto, journal_image))
    phases = Phases()
    ledger, app_snapshot, snapshot_seq = rebuild(directory, seq, bounds, on_app=lambda _, data: replayed.append(data),
                                                 phases=phases)
    journal = new_journal(settings)
    rebuild_journal(journal, ledger, app_snapshot, replayed, bounds)
    phases.replay_s += phases.lap()  # the journal's rebuild is replay too
    write_image(directory, seq, ledger, journal.to_snapshot())
    phases.write_s = phases.lap()
    print(summary(seq, snapshot_seq, phases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
