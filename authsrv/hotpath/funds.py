"""Participants that move money: the collateral debit and user hold as one linked ledger batch, and
reversals. Each submits exactly one ledger batch whose `app` bytes carry the journal record, so the
decision and its money movement reach the disk in one write-ahead log record.
"""

from __future__ import annotations

import logging
import time

import msgspec

from authsrv.hotpath.context import ADVICES, CREDITS, INQUIRIES, AuthContext, External, Kind, Vote
from authsrv.hotpath.external import external_release_hold, external_release_transfers
from authsrv.hotpath.fees import FeeCode, largest_payable, refund_share, transaction_fee, transaction_kind
from authsrv.hotpath.journal import AuthJournal, AuthRecord, encode_record
from authsrv.hotpath.outcome import Outcome, is_approval, response_code
from authsrv.hotpath.steps import TransferCode, TransferIds, auth_code_for
from authsrv.iso.currency import alpha_to_numeric
from authsrv.iso.fields import build_field54
from authsrv.ratelog import RateLimitedLog
from ledger.types import Batch, TransferFlags, TransferSpec, TransferStatus

log = logging.getLogger("authsrv.hotpath")
REFUSAL_LOG_INTERVAL_S = 10.0
_refusals = RateLimitedLog(log, REFUSAL_LOG_INTERVAL_S)  # per request otherwise (authsrv/ratelog.py)

PARTIAL_APPROVAL_SUBELEMENT = "61"
_FAILURES_FUNDS = frozenset({TransferStatus.exceeds_credits, TransferStatus.exceeds_debits})
_LINK = TransferFlags.linked
_VOID = TransferFlags.void_pending
# Flags of the debit pair per message class, computed once: IntFlag arithmetic costs ~1.5 µs a call.
_DEBIT_FLAGS = {
    Kind.authorization: TransferFlags.pending,  # 0100 holds
    Kind.financial: TransferFlags.none,  # 0200 posts at once
    Kind.advice_hold: TransferFlags.pending | TransferFlags.forced,  # 0120: the network already approved
    Kind.advice_post: TransferFlags.forced,  # 0220
}
_LINKED = {flags: flags | _LINK for flags in _DEBIT_FLAGS.values()}
# The fee is posted at once; advices force it like their debit (the network already approved).
_FEE_FLAGS = {kind: flags & TransferFlags.forced for kind, flags in _DEBIT_FLAGS.items()}
_HELD = {kind: bool(flags & TransferFlags.pending) for kind, flags in _DEBIT_FLAGS.items()}
# Enum members read per transfer or per request, as module constants: on Python 3.11 an attribute
# of an Enum class costs ~200 ns (EnumType.__getattr__ sends every class attribute lookup the slow way).
_CREATED, _LINKED_FAILED, _EXISTS = TransferStatus.created, TransferStatus.linked_event_failed, TransferStatus.exists
_APPROVED, _APPROVED_PARTIAL = Outcome.approved, Outcome.approved_partial
_PREPARED, _ABORTED = Vote.prepared, Vote.aborted
_PARTIAL_KINDS = frozenset({Kind.authorization, Kind.financial})  # may be approved for less


def journal_record(ctx: AuthContext) -> AuthRecord:
    """The journal record for a decided context (approval or decline)."""
    request = ctx.request
    return AuthRecord(
        key=ctx.key,
        original_key=ctx.original_key,
        timestamp_ns=ctx.now_ns,
        mti=request.mti,
        processing_code=request.processing_code,
        outcome=int(ctx.outcome),
        response_code=response_code(ctx.outcome),
        auth_code=ctx.auth_code,
        field54=ctx.field54,
        field44=ctx.field44,
        card_id=ctx.card.card_id if ctx.card is not None else 0,
        rrn=request.rrn,
        amount=ctx.reversal_amount if ctx.original is not None else ctx.amount,
        currency=ctx.currency,
        user_hold_id=ctx.user_hold_id,
        collateral_hold_id=ctx.collateral_hold_id,
        posted=ctx.posted,
        reverses=ctx.original.key if ctx.original is not None else "",
        cause=ctx.cause,
        stand_in=ctx.stand_in,
        request_amount=request.amount,
        request_currency=request.currency,
        fx_rate=ctx.fx_rate,
        fee=ctx.fee,
        mcc=request.mcc or "",  # history (authsrv/hotpath/activity.py)
        merchant=request.merchant_name_location or "",
        external=int(ctx.external),  # [external] authsrv/hotpath/external.py
        external_key=ctx.external_key,
        external_ms=ctx.external_ms,
    )


class MoveFunds:
    """Collateral debit (partner deposit or credit) and the user-fund hold, linked: both or neither.

    0100 holds, 0200 posts at once, 0120/0220 do the same forced (the network already approved).
    Credits (refund, payment) are posted to the user at once. An inquiry moves nothing.
    A debit's transaction fee (authsrv/hotpath/fees.py) is a posted transfer from the user balance
    to the partner's fee income, last in the same linked chain: the balance must cover amount + fee
    (forced for advices), and a void of the hold comes with the fee's refund (docs/money.md, "Fees").
    """

    name = "funds"

    def __init__(self, ledger, index, journal: AuthJournal, ids: TransferIds, hold_timeout_s, fees=None) -> None:
        self._ledger = ledger  # ledger.durable.DurableLedger
        self._index = index
        self._ids = ids
        self._journal = journal
        self._hold_timeout_s = hold_timeout_s  # callable: MCC -> seconds
        self._fees = fees  # authsrv.hotpath.fees.FeeBook; None: no transaction fees

    def prepare(self, ctx: AuthContext) -> Vote:
        if ctx.partner is not None and ctx.partner.balance_mode == "external":
            return Vote.prepared  # [external] the balance is at the partner: external.py holds and asks
        if ctx.processing in INQUIRIES:
            ctx.outcome = Outcome.approved
            ctx.field54 = self._field54(ctx)
            return Vote.done
        transfers = self._transfers(ctx)
        if transfers is None:
            return Vote.aborted
        ctx.auth_code = auth_code_for(transfers[-1].id)
        result, seq = self._ledger.submit(
            Batch(timestamp_ns=ctx.now_ns, transfers=tuple(transfers)),
            finish=lambda result: self._decide(ctx, transfers, result.transfer_results),
        )
        ctx.seq = seq
        return _PREPARED if is_approval(ctx.outcome) else _ABORTED

    def _decide(self, ctx: AuthContext, transfers, results) -> bytes:
        """Runs right after the ledger applied the batch, before the log record is written."""
        failed = [(spec, status) for spec, status in zip(transfers, results)
                  if status is not _CREATED and status is not _LINKED_FAILED and status is not _EXISTS]
        if not failed:
            ctx.outcome = _APPROVED_PARTIAL if ctx.partial else _APPROVED
            ctx.field54 = self._field54(ctx)
        else:
            spec, status = failed[0]
            collateral = spec.code == TransferCode.collateral
            if status in _FAILURES_FUNDS:
                ctx.outcome = Outcome.insufficient_collateral if collateral else Outcome.insufficient_funds
                ctx.cause = "collateral" if collateral else "user balance"
            else:
                _refusals.error("ledger refused a hot-path transfer: %s", status.name)
                ctx.outcome, ctx.cause = Outcome.internal_error, f"ledger {status.name}"
            ctx.auth_code = ""
            ctx.user_hold_id = ctx.collateral_hold_id = 0
            ctx.fee = ctx.fee_transfer_id = 0
        return self._journaled(ctx)

    def _transfers(self, ctx: AuthContext) -> list[TransferSpec] | None:
        card, partner, amount = ctx.card, ctx.partner, ctx.amount
        settlement = self._index.settlement_account(ctx.currency)
        if settlement is None:
            ctx.decline(Outcome.not_permitted, f"no settlement account in {ctx.currency}")
            return None
        code = TransferCode.purchase if ctx.processing != "01" else TransferCode.cash
        if ctx.processing in CREDITS:
            code = TransferCode.refund if ctx.processing == "20" else TransferCode.payment
            uid = self._ids.next()
            ctx.posted = True
            return [TransferSpec(uid, settlement, card.balance_account_id, amount, code=code,
                                 reference=ctx.request.rrn)]
        flags = _DEBIT_FLAGS[ctx.kind]
        held = _HELD[ctx.kind]  # flags & TransferFlags.pending: IntFlag's & costs microseconds
        timeout_s = self._hold_timeout_s(ctx.request.mcc) if held else 0
        transfers = []
        # Only a deposit is charged per transaction; a credit balance was charged when the user's
        # balance was reloaded (reference documents, "Partner Credit Balance" / "Deposit Balance").
        if partner is not None and partner.collateral == "deposit":
            collateral = partner.collateral_account_ids.get(ctx.currency)
            usage = partner.collateral_usage_account_ids.get(ctx.currency)
            if collateral is None or usage is None:
                if ctx.kind not in ADVICES:
                    ctx.decline(Outcome.collateral_not_found, f"no collateral in {ctx.currency}")
                    return None
            else:
                cid = self._ids.next()
                transfers.append(TransferSpec(cid, collateral, usage, amount, flags=_LINKED[flags],
                                              timeout_s=timeout_s, code=TransferCode.collateral,
                                              reference=ctx.request.rrn))
                ctx.collateral_hold_id = cid if held else 0
        uid = self._ids.next()
        fee_of = self._fee_function(ctx)
        if self._partial_allowed(ctx):
            available = self._ledger.ledger.balance(card.balance_account_id).available
            payable = available if fee_of is None else largest_payable(available, fee_of)
            if 0 < payable < amount:
                amount = ctx.amount = payable
                ctx.partial = True
                transfers = [msgspec.structs.replace(spec, amount=amount) for spec in transfers]
        fee = fee_of(amount) if fee_of is not None else 0
        fee_income = partner.fee_income_account_ids.get(ctx.currency) if fee and partner is not None else None
        if fee and fee_income is None:
            if ctx.kind not in ADVICES:
                ctx.decline(Outcome.not_permitted, f"no fee-income account in {ctx.currency}")
                return None
            fee = 0  # an advice cannot be declined: applied without its fee (the cause says so)
            ctx.cause = f"fee not charged: no fee-income account in {ctx.currency}"
        transfers.append(TransferSpec(uid, card.balance_account_id, settlement, amount,
                                      flags=_LINKED[flags] if fee else flags,
                                      timeout_s=timeout_s, code=code, reference=ctx.request.rrn))
        if fee:
            ctx.fee, ctx.fee_transfer_id = fee, self._ids.next()
            transfers.append(TransferSpec(ctx.fee_transfer_id, card.balance_account_id, fee_income, fee,
                                          flags=_FEE_FLAGS[ctx.kind], code=FeeCode.transaction,
                                          reference=ctx.request.rrn))
        ctx.user_hold_id = uid if held else 0
        ctx.posted = not held
        return transfers

    def _fee_function(self, ctx: AuthContext):
        """amount -> fee for this debit, or None when its program charges no transaction fee."""
        if self._fees is None or not self._fees.charges_transactions(ctx.card.config_id):
            return None
        request = ctx.request
        schedule = self._fees.schedule(ctx.card.config_id)
        kind = transaction_kind(ctx.processing, request.mcc, request.pos_entry_mode)
        # The conversion fee: converted here (fx_rate set), or by the network (fields 6/51).
        converted = bool(ctx.fx_rate) or request.currency != ctx.currency
        return lambda amount: transaction_fee(schedule, kind, amount, converted)

    def abort(self, ctx: AuthContext) -> None:
        """Compensation: void the holds this participant placed (a later step declined, or the
        commit missed the budget) and journal the context's decision in the same log record.
        Idempotent: a second call finds nothing held."""
        holds = [hold_id for hold_id in (ctx.collateral_hold_id, ctx.user_hold_id) if hold_id]
        if not holds:
            return
        ctx.collateral_hold_id = ctx.user_hold_id = 0
        voids = tuple(TransferSpec(self._ids.next(), 0, 0, 0, flags=_VOID, pending_id=hold_id,
                                   code=TransferCode.reversal, reference=ctx.request.rrn) for hold_id in holds)
        if ctx.fee_transfer_id:  # the fee went with the hold: it comes back with the void
            fee_income = self._index.partner(ctx.card.partner).fee_income_account_ids[ctx.currency]
            voids += (TransferSpec(self._ids.next(), fee_income, ctx.card.balance_account_id, ctx.fee,
                                   code=FeeCode.transaction_refund, reference=ctx.request.rrn),)
            ctx.fee = ctx.fee_transfer_id = 0
        _, ctx.seq = self._ledger.submit(Batch(timestamp_ns=time.time_ns(), transfers=voids),
                                         finish=lambda result: self._journaled(ctx))

    def _journaled(self, ctx: AuthContext) -> bytes:
        record = journal_record(ctx)
        self._journal.add(record)
        return encode_record(record)

    @staticmethod
    def _partial_allowed(ctx: AuthContext) -> bool:
        """Field 48 subelement 61, first position 1: the terminal accepts a partial approval
        (Mastercard's POS data extended condition codes). Only for a debit charged in the
        transaction currency, so the approved amount can be returned in field 4 as it is."""
        if ctx.kind not in _PARTIAL_KINDS or ctx.request.billing_amount is not None:
            return False
        return ctx.request.field48.get(PARTIAL_APPROVAL_SUBELEMENT, "")[:1] == "1"

    def _field54(self, ctx: AuthContext) -> str:
        balance = self._ledger.ledger.balance(ctx.card.balance_account_id)
        available = balance.available if balance is not None else 0
        return build_field54(available, alpha_to_numeric(ctx.card.currency))


class FindOriginal:
    """Field 90 names the original; an unknown original is 25 for a 0400 and acknowledged for 0420.

    Field 90 (MTI, STAN, field 7, acquirer) is unique only per acquirer and STAN counter: two
    acquirer systems sharing an acquirer id, or a STAN counter that wrapped within a second, name
    two authorizations. So the original whose RRN equals the reversal's (the usual case) wins, and
    a match on field 90 alone must be the reversal's own card: a reversal never releases another
    card's hold.
    """

    name = "original"

    def __init__(self, journal: AuthJournal, vault, index) -> None:
        self._journal = journal
        self._vault = vault
        self._index = index

    def prepare(self, ctx: AuthContext) -> Vote:
        original_key = "|".join(ctx.request.original.key)
        found = self._journal.get(f"{original_key}|{ctx.request.rrn}")
        if found is None or found.reverses:
            found = self._journal.find_original(original_key)
            if found is not None and found.card_id and found.card_id != self._card_id(ctx):
                found = None
        if found is None:
            if ctx.kind is Kind.reversal_advice:
                ctx.outcome, ctx.cause = Outcome.approved, "reversal advice for an unknown original: ignored"
                return Vote.done
            return ctx.decline(Outcome.original_not_found)
        ctx.original = found
        return Vote.prepared

    def _card_id(self, ctx: AuthContext) -> int:
        card = self._index.card_by_pan_index(self._vault.index(ctx.request.pan))
        return card.card_id if card is not None else 0


class Reverse:
    """Release what is still held (or credit back what was posted), fully or down to field 95."""

    name = "reverse"

    def __init__(self, ledger, index, journal: AuthJournal, ids: TransferIds) -> None:
        self._ledger = ledger
        self._index = index
        self._journal = journal
        self._ids = ids

    def prepare(self, ctx: AuthContext) -> Vote:
        original = ctx.original
        ctx.outcome = Outcome.approved
        ctx.currency = original.currency
        if not is_approval(Outcome(original.outcome)) or original.processing_code[:2] in INQUIRIES:
            ctx.cause = "original was not approved: nothing to release"
            return Vote.done
        release = self._release_amount(ctx)
        if release <= 0:
            ctx.cause = "nothing left to release"
            return Vote.done
        transfers = self._transfers(ctx, release)
        result, seq = self._ledger.submit(
            Batch(timestamp_ns=ctx.now_ns, transfers=tuple(transfers)),
            finish=lambda result: self._record(ctx, release, result.transfer_results),
        )
        ctx.seq = seq
        return Vote.prepared

    def _release_amount(self, ctx: AuthContext) -> int:
        original, request = ctx.original, ctx.request
        outstanding = original.amount - original.reversed_amount
        if request.replacement_amount is None:
            target = 0
        elif original.request_amount and original.request_amount != original.amount:
            # field 95 is in the transaction currency: scale it to what the balance was charged
            target = request.replacement_amount * original.amount // original.request_amount
        else:
            target = request.replacement_amount
        release = outstanding - target
        if original.user_hold_id:
            hold = self._ledger.ledger.hold(original.user_hold_id)
            release = min(release, hold.remaining if hold is not None else 0)
        elif original.external:  # [external] only the collateral is held here
            remaining = external_release_hold(self._ledger, original)
            release = release if remaining is None else min(release, remaining)
        return release

    def _transfers(self, ctx: AuthContext, release: int) -> list[TransferSpec]:
        specs = self._release_transfers(ctx, release)
        refund = self._fee_refund(ctx, release)
        if refund is not None:  # the fee follows the amount back, in the same chain
            specs[-1] = msgspec.structs.replace(specs[-1], flags=specs[-1].flags | _LINK)
            specs.append(refund)
        return specs

    def _fee_refund(self, ctx: AuthContext, release: int) -> TransferSpec | None:
        """The share of the original's transaction fee this release gives back (fees.refund_share)."""
        original = ctx.original
        if not original.fee:
            return None
        before = original.amount - original.reversed_amount
        share = refund_share(original.fee, original.amount, before, max(0, before - release))
        card = self._index.card_by_id(original.card_id)
        partner = self._index.partner(card.partner) if card is not None else None
        fee_income = partner.fee_income_account_ids.get(original.currency) if partner is not None else None
        if share <= 0 or fee_income is None:
            return None
        ctx.fee = share
        return TransferSpec(self._ids.next(), fee_income, card.balance_account_id, share,
                            code=FeeCode.transaction_refund, reference=ctx.request.rrn)

    def _release_transfers(self, ctx: AuthContext, release: int) -> list[TransferSpec]:
        original = ctx.original
        rrn = ctx.request.rrn
        if original.external:  # [external] the partner gets /transactions/reversal from the outbox
            ctx.external = External.deferred
            return external_release_transfers(self._index, self._ids, original, release, rrn)
        if original.user_hold_id:
            specs = []
            if original.collateral_hold_id:
                specs.append(TransferSpec(self._ids.next(), 0, 0, release,
                                          flags=TransferFlags.void_pending | _LINK,
                                          pending_id=original.collateral_hold_id,
                                          code=TransferCode.collateral_release, reference=rrn))
            specs.append(TransferSpec(self._ids.next(), 0, 0, release,
                                      flags=TransferFlags.void_pending, pending_id=original.user_hold_id,
                                      code=TransferCode.reversal, reference=rrn))
            return specs
        # posted at once (0200): move the money back
        card = self._index.card_by_id(original.card_id)
        settlement = self._index.settlement_account(original.currency)
        specs = []
        partner = self._index.partner(card.partner)
        if partner is not None and partner.collateral == "deposit":
            collateral = partner.collateral_account_ids.get(original.currency)
            usage = partner.collateral_usage_account_ids.get(original.currency)
            if collateral is not None and usage is not None:
                specs.append(TransferSpec(self._ids.next(), usage, collateral, release,
                                          flags=_LINK | TransferFlags.forced,
                                          code=TransferCode.collateral_release, reference=rrn))
        specs.append(TransferSpec(self._ids.next(), settlement, card.balance_account_id, release,
                                  flags=TransferFlags.forced, code=TransferCode.reversal, reference=rrn))
        return specs

    def _record(self, ctx: AuthContext, release: int, results) -> bytes:
        if all(status in (TransferStatus.created, TransferStatus.exists) for status in results):
            ctx.reversal_amount = release
        else:
            log.error("reversal refused by the ledger: %s", [status.name for status in results])
            ctx.reversal_amount = ctx.fee = 0
            ctx.cause = "ledger refused the release"
        record = journal_record(ctx)
        self._journal.add(record)
        return encode_record(record)
