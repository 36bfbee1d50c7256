"""The reconciliation summary of one clearing run (printed, written as JSON, returned by the API).

No card data: exceptions carry the masked PAN (first 6, last 4) at most.
"""

from __future__ import annotations

import msgspec

EXCEPTIONS_LISTED_MAX = 1_000  # the count is exact; the list stops here


class ClearingException(msgspec.Struct, rename="camel"):
    record_id: str
    line: int
    reason: str
    masked_pan: str
    posted: bool  # True: force-posted anyway (unmatched, late); False: nothing posted


class CurrencyTotals(msgspec.Struct, rename="camel"):
    records: int = 0
    cleared: int = 0  # charged to cardholders (hold posts, excess and forced posts)
    released: int = 0  # held amounts released by final posts below the hold
    refunded: int = 0  # credited to cardholders
    fee_refunded: int = 0  # transaction fees given back with the released rest (under-clearing)


class ClearingSummary(msgspec.Struct, rename="camel"):
    file_sha256: str
    name: str = ""
    duplicate_file: bool = False  # the same file was applied before: nothing changed now
    lines: int = 0  # records read (valid or not)
    applied: int = 0  # records whose ledger transfers are durable (this run or a resumed one)
    matched: int = 0  # exact + partial + split + over
    exact: int = 0
    partial: int = 0  # under the hold, last record: the rest released
    split: int = 0  # under the hold, more records followed: the rest stays held
    over: int = 0  # above the hold: the excess force-posted
    forced: int = 0  # no authorization matched: force-posted (also listed as exceptions)
    late: int = 0  # the authorization's hold had closed (expired, voided, posted): force-posted
    refunds: int = 0
    refunds_referenced: int = 0  # refunds that matched a purchase
    duplicates: int = 0  # records applied by an earlier file: skipped
    exceptions_count: int = 0  # refused records plus forced and late posts
    exceptions: list[ClearingException] = []
    totals: dict[str, CurrencyTotals] = {}
    ledger_seq: int = 0  # last ledger log record of the run
    cleared_events: int = 0  # `transaction.cleared` events written for the partners' outbox (cleared.py)
    forced_events: int = 0  # `transaction.forced` events: external cards' forced posts and refunds

    def add_exception(self, entry: ClearingException) -> None:
        self.exceptions_count += 1
        if len(self.exceptions) < EXCEPTIONS_LISTED_MAX:
            self.exceptions.append(entry)

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=2)

    def render(self) -> str:
        """Human lines for the terminal."""
        head = "clearing: DUPLICATE FILE, already applied; nothing changed" if self.duplicate_file else "clearing:"
        lines = [
            f"{head} {self.name} (sha256 {self.file_sha256[:16]}...)",
            f"  records {self.lines}: applied {self.applied}, duplicates {self.duplicates},"
            f" exceptions {self.exceptions_count}",
            f"  matched {self.matched} (exact {self.exact}, partial {self.partial}, split {self.split},"
            f" over {self.over}); forced {self.forced}; late {self.late};"
            f" refunds {self.refunds} ({self.refunds_referenced} referencing a purchase)",
        ]
        for currency, totals in sorted(self.totals.items()):
            lines.append(f"  {currency}: {totals.records} records, cleared {totals.cleared}, released"
                         f" {totals.released}, refunded {totals.refunded}, fees refunded {totals.fee_refunded}"
                         " (minor units)")
        for entry in self.exceptions[:20]:
            what = "force-posted" if entry.posted else "not posted"
            lines.append(f"  exception line {entry.line} record {entry.record_id or '?'} {entry.masked_pan}:"
                         f" {entry.reason} ({what})")
        if self.exceptions_count > 20:
            lines.append(f"  ... {self.exceptions_count - 20} more exceptions in the JSON summary")
        return "\n".join(lines)


summary_decoder = msgspec.json.Decoder(ClearingSummary)
