"""`authsrv ledger verify`: rebuild the ledger from snapshot and log, check it, summarize it.

Opens the directory the way the server does (no committer runs; nothing is modified except the
torn-tail truncation that recovery always performs), checks every invariant, and, where the log
allows, rebuilds the state a second way (from an older snapshot, or from the first record) and
compares digests, which catches a snapshot that does not match the log it claims to cover.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from ledger.durable import DurableLedger, decode_snapshot, replay_into
from ledger.snapshot import SnapshotError, list_snapshots, read_snapshot
from ledger.state import Ledger, LedgerInvariantError
from ledger.types import AccountKind
from ledger.wal import WalError

TOTALS_FIELDS = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")


class VerifyReport(msgspec.Struct, kw_only=True):
    ok: bool
    problems: list[str]
    directory: str
    last_seq: int = 0
    snapshot_seq: int = 0
    log_first_seq: int = 0
    digest: str = ""
    cross_check: str = ""  # how the state was rebuilt a second time, and whether it matched
    pending_holds: int = 0
    # {"EUR": {"user_balance": {"debits_posted": .., "credits_posted": .., "debits_pending": ..,
    #  "credits_pending": .., "balance": ..}}}; balance = credits_posted - debits_posted, so
    # debit-normal kinds (settlement, funding) show a negative balance.
    totals: dict[str, dict[str, dict[str, int]]] = {}

    def to_json(self) -> str:
        return msgspec.json.format(msgspec.json.encode(self), indent=2).decode()


def verify(directory: Path) -> VerifyReport:
    """Rebuild and check the ledger in `directory`; ok only when every check passes."""
    directory = Path(directory)
    if not directory.is_dir():
        return VerifyReport(ok=False, problems=[f"{directory}: no ledger directory"],
                            directory=str(directory))
    try:
        durable = DurableLedger.open(directory, check_invariants=False)
    except (WalError, SnapshotError, LedgerInvariantError, OSError) as error:
        return VerifyReport(ok=False, problems=[f"recovery failed: {error}"],
                            directory=str(directory))
    try:
        return _report(directory, durable)
    finally:
        durable.close()


def _report(directory: Path, durable: DurableLedger) -> VerifyReport:
    ledger = durable.ledger
    problems: list[str] = []
    try:
        ledger.check_invariants()
    except LedgerInvariantError as error:
        problems.append(f"invariant broken: {error}")
    digest = ledger.digest()
    cross_check = _cross_check(durable, digest, problems)
    return VerifyReport(
        ok=not problems,
        problems=problems,
        directory=str(directory),
        last_seq=durable.last_seq,
        snapshot_seq=durable.snapshot_seq,
        log_first_seq=durable.wal.first_seq,
        digest=digest,
        cross_check=cross_check,
        pending_holds=ledger.pending_count(),
        totals=totals_json(ledger),
    )


def _cross_check(durable: DurableLedger, digest: str, problems: list[str]) -> str:
    """Rebuild once more from the oldest base the log allows; the digests must agree."""
    if durable.snapshot_seq == 0:
        return "not needed: state was rebuilt from the log alone"
    log_first_seq = durable.wal.first_seq
    bases = [seq for seq, _ in list_snapshots(durable.directory) if seq < durable.snapshot_seq]
    bases = [seq for seq in bases if seq + 1 >= log_first_seq]
    try:
        # With the bounds the state was built under: the operator's bounds are set at open.
        if log_first_seq == 1:
            base_seq, ledger = 0, durable.ledger.empty_like()
        elif bases:
            base_seq = bases[0]
            ledger, _ = decode_snapshot(read_snapshot(_snapshot_file(durable, base_seq))[1])
            _take_bounds(ledger, durable.ledger)
        else:
            return "not possible: the log does not reach back before the snapshot"
        replay_into(ledger, durable.wal, base_seq + 1, None)
    except (WalError, SnapshotError) as error:
        problems.append(f"second rebuild failed: {error}")
        return f"second rebuild failed: {error}"
    how = "the first record" if base_seq == 0 else f"the snapshot at seq {base_seq}"
    if _align_histories(durable.ledger, ledger):
        digest = durable.ledger.digest()  # the reported digest stays the one computed before
    if ledger.digest() != digest:
        problems.append(f"digest differs when rebuilt from {how}: the snapshot does not match "
                        "the log")
        return f"rebuilt from {how}: digest MISMATCH"
    return f"rebuilt from {how}: digest matches"


def _take_bounds(ledger: Ledger, like: Ledger) -> None:
    """Give a ledger rebuilt from an older snapshot the count bounds `like` was opened with (the
    operator may have changed them since; they are part of the digest)."""
    ledger.set_bounds(ids_max=like.ids_max, holds_pending_max=like.holds_pending_max,
                      history_per_account_max=like.history_per_account_max)


def _align_histories(live: Ledger, rebuilt: Ledger) -> bool:
    """Cut each account's history in both ledgers to the events both still show; True if any was cut.

    The history bound is not in the log, so two rebuilds can keep different depths of the same
    history: a state that once ran under a smaller `history_per_account_max` (and was snapshotted)
    shows fewer events than a rebuild from the first record, or from a snapshot taken before. Both
    are suffixes of the one true sequence, so the digests are compared over the common suffix: a
    real divergence in the events both show still differs. Mutates both: run after every other use."""
    assert live.history_per_account_max == rebuilt.history_per_account_max
    kept = live.history_per_account_max
    cut = False
    for account_id, account in live._accounts.items():  # noqa: SLF001 (the ledger package's own check)
        other = rebuilt._accounts.get(account_id)  # noqa: SLF001
        if other is None:
            continue  # a missing account differs in the digest anyway
        shown = min(len(account.history), len(other.history), kept)
        for history in (account.history, other.history):
            if len(history) > shown:
                cut = cut or min(len(history), kept) > shown  # the digest shows at most `kept`
                del history[: len(history) - shown]
    return cut


def _snapshot_file(durable: DurableLedger, seq: int) -> Path:
    [path] = [path for found, path in list_snapshots(durable.directory) if found == seq]
    return path


def totals_json(ledger: Ledger) -> dict[str, dict[str, dict[str, int]]]:
    """Ledger totals per currency and account kind, as plain JSON-friendly dicts."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for (currency, kind), totals in sorted(ledger.totals().items()):
        fields = _fields(totals)
        row = {name: int(fields[name]) for name in TOTALS_FIELDS}
        row["balance"] = row["credits_posted"] - row["debits_posted"]
        for name, value in fields.items():  # extra counters the ledger keeps (count, forced...)
            if name not in row and isinstance(value, int) and not isinstance(value, bool):
                row[name] = int(value)
        kind_name = AccountKind(kind).name
        out.setdefault(str(currency), {})[kind_name] = row
    return out


def _fields(value: object) -> dict[str, object]:
    if isinstance(value, msgspec.Struct):
        return msgspec.structs.asdict(value)
    if hasattr(value, "__attrs_attrs__"):
        return {a.name: getattr(value, a.name) for a in value.__attrs_attrs__}
    if hasattr(value, "_asdict"):
        return value._asdict()
    if isinstance(value, dict):
        return value
    slots = getattr(type(value), "__slots__", ())
    if slots:
        return {name: getattr(value, name) for name in slots}
    return dict(vars(value))

