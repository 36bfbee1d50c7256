"""The authorization switch: decode, run the participants for the message class, answer.

The whole hot path, in order (jPOS TransactionManager style; each participant does one job):

    0100/0200  duplicate -> card -> status -> expiry -> cvc2 -> pin -> amount -> [limits] -> funds -> [external]
    0120/0220  duplicate -> card -> amount -> funds                      (forced: cannot be declined)
    0400/0420  duplicate -> original -> reverse                          (0420: always acknowledged)
    0800       sign-on / sign-off / echo

`[limits]` (spend controls) and `[external]` (the partner's external balance) are the slots later
work fills. Everything here is synchronous for cards of internal-balance partners: the only await
of such an authorization is the write-ahead log's group commit, which the connection's writer does
for a whole group of responses at once. For a card whose partner holds the balance (`external`),
`handle` returns a deferred Outgoing (`pending` set); the connection awaits `complete()` in its own
nursery (bounded by its in-flight limit), which asks the partner within the budget and answers.
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from authsrv import cardsec
from authsrv.hotpath.context import AuthContext, Kind, KIND_BY_MTI, Vote
from authsrv.hotpath.external import ExternalBalance
from authsrv.hotpath.funds import FindOriginal, MoveFunds, Reverse, journal_record
from authsrv.hotpath.journal import AuthJournal, AuthRecord, app_only_batch
from authsrv.hotpath.limits import CheckSpendControls
from authsrv.hotpath.outcome import Outcome, is_approval
from authsrv.hotpath.steps import (
    TransferIds,
    CheckCardStatus,
    CheckCvc2,
    CheckExpiry,
    CheckPin,
    DetectDuplicate,
    LookupCard,
    ResolveAmount,
)
from authsrv.iso import codec
from authsrv.iso.fields import mti_class, normalise_acquirer_id
from authsrv.iso.framing import frame
from authsrv.iso.request import FormatError, NetworkRequest, parse_request, response_doc
from ledger.durable import LedgerFailedError
from ledger.wal import RECORD_SIZE_MAX, WalFatalError, WalFullError

log = logging.getLogger("authsrv.hotpath")

NETWORK_CODES = {"001": "sign-on", "002": "sign-off", "301": "echo"}
STEP_TIMING_SAMPLE_MASK = 15  # time each step on 1 request in 16: the timer calls cost more than some steps
# Module constants: an Enum attribute lookup costs ~150 ns, and these are read per step.
_PREPARED, _DEFERRED = Vote.prepared, Vote.deferred
_APPROVED, _APPROVED_PARTIAL, _AUTHORIZATION = Outcome.approved, Outcome.approved_partial, Kind.authorization
_APPROVALS = (_APPROVED, _APPROVED_PARTIAL)  # is_approval(), for ints and Outcomes


@attrs.define(slots=True)
class Outgoing:
    """A response waiting for its log record to be durable (seq 0: nothing to wait for)."""

    data: bytes
    seq: int
    received_ns: int
    deadline_ns: int
    mti: str
    code: str
    ctx: AuthContext | None = None  # kept for approvals: compensated if the commit misses the budget
    pending: Deferred | None = None  # not decided yet: await Switch.complete(this) for the answer


@attrs.define(slots=True)
class Deferred:
    """A decision that needs an await: the partner's answer, or (for a duplicate) the original's."""

    ctx: AuthContext
    prepared: list  # participants to compensate if the partner declines
    waits_for: trio.Event | None = None  # a duplicate: the original is still at the partner


class Switch:
    def __init__(self, *, ledger, index, cards, keys, journal: AuthJournal, metrics, budget_ms: int,
                 hold_timeout_s, fx=None, fees=None, partners=None, pki_dir=None) -> None:
        self._ledger = ledger
        self._wal = ledger.wal  # `accepting`: can it take a record now (docs/operations.md, "Full disk")
        self._journal = journal
        self._metrics = metrics
        self._budget_ns = budget_ms * 1_000_000
        vault = cardsec.PanVault(keys)
        duplicate = DetectDuplicate(journal)
        card = LookupCard(vault, index)
        amount = ResolveAmount(fx)  # fx: authsrv.hotpath.fx.RatesFile (None: no conversion)
        limits = CheckSpendControls(index, journal.windows)  # spend controls
        self._ids = ids = TransferIds(journal.timestamp_ns_max)
        self._funds = funds = MoveFunds(ledger, index, journal, ids, hold_timeout_s, fees)
        checks = (CheckCardStatus(), CheckExpiry(), CheckCvc2(keys), CheckPin(keys, cards))
        reversal = (duplicate, FindOriginal(journal, vault, index), Reverse(ledger, index, journal, ids))
        # Always present: `funds` leaves external partners' cards to it, and without a configured
        # api_url it declines them (91) rather than approve with nothing asked.
        self._external = external = ExternalBalance(
            ledger=ledger, journal=journal, ids=ids, hold_timeout_s=hold_timeout_s, partners=partners or {},
            pki_dir=pki_dir, metrics=metrics)
        if any(config.stand_in == "approve" for config in (partners or {}).values()):
            external.window.rebuild(journal.records(), time.time_ns())  # today's stand-in approvals
        self._pipelines = {
            Kind.authorization: (duplicate, card, *checks, amount, limits, funds, external),
            Kind.financial: (duplicate, card, *checks, amount, limits, funds, external),
            Kind.advice_hold: (duplicate, card, amount, funds, external),
            Kind.advice_post: (duplicate, card, amount, funds, external),
            Kind.reversal: reversal,
            Kind.reversal_advice: reversal,
        }
        self._requests = 0

    # entry point: one frame in, at most one response out
    def handle(self, payload: bytes, received_ns: int) -> Outgoing | None:
        try:
            return self._handle(payload, received_ns)
        except (LedgerFailedError, WalFatalError):
            raise  # the ledger cannot go on: stop the process rather than answer from stale memory
        except WalFullError:  # refused before anything was applied: the stand-in decline
            self._metrics.stand_in.inc()
            return self._internal_error(payload, received_ns, "91")
        except Exception:  # one bad message must not take the connection or the server down
            self._metrics.internal_errors.inc()
            log.exception("internal error while handling a message")
            return self._internal_error(payload, received_ns)

    def _internal_error(self, payload: bytes, received_ns: int, code: str = "96") -> Outgoing | None:
        try:
            doc = codec.decode(payload)
            return self._plain(doc, doc["t"], code, received_ns)
        except Exception:
            return None

    def _handle(self, payload: bytes, received_ns: int) -> Outgoing | None:
        try:
            doc = codec.decode(payload)
        except codec.IsoDecodeError as error:
            self._metrics.decode_errors.inc()
            log.warning("undecodable ISO 8583 message: %s", error)  # IsoDecodeError never carries card data
            partial = error.partial
            if "11" in partial and "37" in partial and str(partial.get("t", "")).isdigit():
                return self._plain(partial, partial["t"], "30", received_ns)  # the client can match a 30
            return None
        mti = doc.get("t", "")
        try:
            request = parse_request(doc)
        except FormatError as error:
            code = "12" if error.field == 0 else "30"
            log.info("refused %s: field %s: %s", mti, error.field, error.reason)
            return self._plain(doc, mti, code, received_ns)
        if isinstance(request, NetworkRequest):
            return self._plain(doc, mti, "00" if request.network_code in NETWORK_CODES else "12", received_ns)
        kind = KIND_BY_MTI.get(mti)
        if kind is None:
            return self._plain(doc, mti, "12", received_ns)
        if not getattr(self._wal, "accepting", True):  # the log cannot take a record now (full disk, I/O error): 91
            self._metrics.stand_in.inc()
            return self._plain(doc, mti, "91", received_ns)
        ctx = self._context(request, kind, received_ns)
        if self._external.in_flight:
            waits_for = self._external.waiting_for(ctx.key)
            if waits_for is not None:  # a duplicate while the original is at the partner: answer as it
                ctx.duplicate_of = self._journal.get(ctx.key)
                return self._deferred(ctx, Deferred(ctx, [], waits_for))
        prepared = self._run(self._pipelines[kind], ctx)
        if prepared is not None:
            return self._deferred(ctx, Deferred(ctx, prepared))
        return self._answer(ctx)

    def _context(self, request, kind: Kind, received_ns: int) -> AuthContext:
        # "|".join(request.original_key) and of request.duplicate_key (original key + RRN), built
        # once here: the two properties would each compute the MTI class and field 32 again.
        acquirer = normalise_acquirer_id(request.acquirer_id)
        original_key = f"{mti_class(request.mti)}|{acquirer}|{request.stan}|{request.transmission_datetime}"
        return AuthContext(
            request=request,
            kind=kind,
            received_ns=received_ns,
            deadline_ns=received_ns + self._budget_ns,
            now_ns=time.time_ns(),
            key=f"{original_key}|{request.rrn}",
            original_key=original_key,
            processing=request.processing_code[:2],
        )

    def _run(self, participants, ctx: AuthContext) -> list | None:
        """Run until a participant decides; a deferred vote returns the participants prepared so far."""
        self._requests += 1
        timed = (self._requests & STEP_TIMING_SAMPLE_MASK) == 0
        clock_ns, deadline_ns = time.perf_counter_ns, ctx.deadline_ns
        prepared = []
        for participant in participants:
            started = clock_ns()
            if started > deadline_ns:
                ctx.stand_in = True
                self._metrics.stand_in.inc()
                ctx.decline(Outcome.partner_unavailable, f"budget exceeded before {participant.name}")
                break
            vote = participant.prepare(ctx)
            if timed:
                self._metrics.step_seconds[participant.name].observe((clock_ns() - started) / 1e9)
            prepared.append(participant)
            if vote is not _PREPARED:
                if vote is _DEFERRED:
                    return prepared
                break
        else:
            ctx.outcome = ctx.outcome or _APPROVED
        if ctx.outcome not in _APPROVALS:
            for participant in reversed(prepared):
                abort = getattr(participant, "abort", None)
                if abort is not None:
                    abort(ctx)
        return None

    def _deferred(self, ctx: AuthContext, deferred: Deferred) -> Outgoing:
        return Outgoing(b"", 0, ctx.received_ns, ctx.deadline_ns, ctx.request.mti, "", pending=deferred)

    async def complete(self, outgoing: Outgoing) -> Outgoing:
        """The answer to a deferred request: ask the partner (or wait for the original), settle,
        answer. Never raises for one message's trouble (like `handle`)."""
        deferred = outgoing.pending
        assert deferred is not None and not outgoing.data
        ctx = deferred.ctx
        try:
            if deferred.waits_for is not None:
                with trio.move_on_after(self._budget_ns / 1e9 + 1):  # the original is bounded by the budget
                    await deferred.waits_for.wait()
                record = self._journal.get(ctx.key)
                if record is None:  # the original left no record (cannot happen once decided)
                    return self._plain(ctx.request.raw, ctx.request.mti, "91", ctx.received_ns)
                ctx.duplicate_of = record
                return self._answer(ctx)
            await self._external.decide(ctx)
            if not is_approval(ctx.outcome):
                for participant in reversed(deferred.prepared):
                    abort = getattr(participant, "abort", None)
                    if abort is not None:
                        abort(ctx)
            return self._answer(ctx)
        except (LedgerFailedError, WalFatalError):
            raise
        except Exception:
            self._metrics.internal_errors.inc()
            log.exception("internal error while completing an external decision")
            return self._plain(ctx.request.raw, ctx.request.mti, "96", ctx.received_ns)

    async def aclose(self) -> None:
        """Close the partners' HTTP pools (at shutdown, after the connections drained)."""
        await self._external.aclose()

    def _answer(self, ctx: AuthContext) -> Outgoing:
        request = ctx.request
        if ctx.duplicate_of is not None:
            self._metrics.duplicates.inc()
            record, seq = ctx.duplicate_of, self._ledger.last_seq  # the original may still be committing
        elif ctx.seq:
            record, seq = self._journal.get(ctx.key), ctx.seq
        else:
            # decided without moving money: journal it (not awaited: a decline needs no durability)
            record = journal_record(ctx)
            self._journal.add(record)
            _, seq = self._ledger.submit(app_only_batch(ctx.now_ns, record))
            seq = seq if is_approval(ctx.outcome) else 0
        data = frame(codec.encode(_response(request.raw, request.response_mti, record)))
        # Only a hold can be compensated by a void; other approvals wait for the commit however long.
        keep = ctx if ctx.seq and ctx.kind is _AUTHORIZATION and ctx.user_hold_id else None
        return Outgoing(data, seq, ctx.received_ns, ctx.deadline_ns, request.mti, record.response_code, keep)

    def _plain(self, doc: dict, mti: str, code: str, received_ns: int) -> Outgoing:
        response_mti = _response_mti(mti) if len(mti) == 4 and mti.isdigit() else "0810"
        data = frame(codec.encode(response_doc(doc, response_mti, code)))
        return Outgoing(data, 0, received_ns, received_ns + self._budget_ns, mti, code)

    def refuse(self, outgoing: Outgoing) -> Outgoing:
        """The log refuses every record (a deposed cluster primary, which restores from the stream):
        answer 91 without touching the ledger; a duplicate still waiting sends nothing."""
        ctx = outgoing.ctx
        if ctx is None:
            return Outgoing(b"", 0, outgoing.received_ns, outgoing.deadline_ns, outgoing.mti, outgoing.code)
        self._metrics.stand_in.inc()
        return self._plain(ctx.request.raw, ctx.request.mti, "91", ctx.received_ns)

    def stand_in(self, outgoing: Outgoing) -> Outgoing:
        """The commit missed the budget: release the hold and answer 91 instead of the approval.

        With no room in the log for the void (a full buffer: the disk has been refusing for long),
        the approval is returned as it is, to be sent once durable."""
        ctx = outgoing.ctx
        assert ctx is not None and outgoing.seq and ctx.user_hold_id
        try:
            self._wal.ensure_room(RECORD_SIZE_MAX)  # what abort's submit checks, before it changes ctx
        except WalFullError:
            return outgoing
        ctx.outcome, ctx.cause, ctx.stand_in = Outcome.partner_unavailable, "commit missed the budget", True
        ctx.auth_code = ctx.field54 = ""
        self._funds.abort(ctx)  # voids the holds and journals this decision in one log record
        record = self._journal.get(ctx.key)
        data = frame(codec.encode(_response(ctx.request.raw, ctx.request.response_mti, record)))
        self._metrics.stand_in.inc()
        return Outgoing(data, 0, outgoing.received_ns, outgoing.deadline_ns, outgoing.mti, record.response_code)


def _response_mti(mti: str) -> str:
    """Any 4-digit MTI, including ones outside the contract's table (answered 12): 0300 -> 0310."""
    function = mti[2]
    if function in "02468":
        function = str(int(function) + 1)
    return f"{mti[:2]}{function}0"


def _response(raw: dict, response_mti: str, record: AuthRecord) -> dict:
    doc = response_doc(raw, response_mti, record.response_code)
    if record.auth_code and record.outcome in _APPROVALS:  # an int: no Outcome(...) call needed
        doc["38"] = record.auth_code
    if record.field54:
        doc["54"] = record.field54
    if record.field44:
        doc["44"] = record.field44
    if record.outcome == _APPROVED_PARTIAL:
        doc["4"] = f"{record.amount:012d}"  # the approved amount (partial only without billing fields)
    return doc
