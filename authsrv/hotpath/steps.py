"""Hot-path participants, jPOS style: each does one job, votes, and compensates where it must.

A participant keeps only its collaborators; per-request data lives in AuthContext. `prepare`
returns a Vote; `abort` (where present) undoes the participant's effect and must tolerate being
called twice. The order they run in is in authsrv/hotpath/pipeline.py.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

from authsrv import cardsec
from authsrv.hotpath.context import ADVICES, CREDITS, DEBITS, INQUIRIES, AuthContext, Vote
from authsrv.hotpath.journal import AuthJournal
from authsrv.hotpath.outcome import LOCK_REASON_PIN_TRIES_EXCEEDED, LOCK_REASONS, PIN_TRIES_MAX, Outcome
from authsrv.store.index import CardStatus

log = logging.getLogger("authsrv.hotpath")

TRANSFER_ID_MAX = 2**63 - 1  # hot-path ids; management transfers use 2**63 + n (authsrv/store/db.py)
ID_FLOOR_MARGIN_NS = 10**9  # after a restart, start past the newest journal record by this much
AUTH_CODE_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Enum members every request reads, as module constants: on Python 3.11 an attribute of an Enum
# class costs ~200 ns (EnumType.__getattr__ sends every class attribute lookup the slow way).
_PREPARED = Vote.prepared
_ACTIVE = CardStatus.active


class TransferCode:
    """Ledger transfer `code` values written by the hot path. Never renumber."""

    purchase = 1
    cash = 2
    refund = 3
    payment = 4
    collateral = 5
    reversal = 6
    collateral_release = 7
    completion = 8


class TransferIds:
    """Hot-path transfer ids: the wall clock in nanoseconds, strictly increasing.

    Unique by construction (no hashing, no collisions), below 2**63 until 2262, and past every id
    used before a restart even if the clock stepped back: the floor is the newest journal record.
    A retried request does not need the same id: its duplicate is caught by the journal first.
    """

    def __init__(self, floor_ns: int = 0) -> None:
        self._last = floor_ns + ID_FLOOR_MARGIN_NS if floor_ns else 0

    def next(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        assert 0 < self._last <= TRANSFER_ID_MAX
        return self._last


def auth_code_for(transfer_id: int) -> str:
    """Six base-36 characters, scrambled so consecutive authorizations do not get consecutive codes."""
    scrambled = int.from_bytes(hashlib.blake2b(transfer_id.to_bytes(8, "big"), digest_size=8).digest(), "big")
    # The six lowest base-36 digits, least significant first; 36**6 fits well in an int64, so
    # the remainder and the 6 divisions below stay on small ints.
    low = scrambled % _AUTH_CODE_SPACE
    alphabet = AUTH_CODE_ALPHABET
    return (alphabet[low % 36] + alphabet[low // 36 % 36] + alphabet[low // 1296 % 36]
            + alphabet[low // 46656 % 36] + alphabet[low // 1679616 % 36] + alphabet[low // 60466176])


_AUTH_CODE_SPACE = 36**6
NS_PER_HOUR = 3600 * 10**9
# (hour number, YYMM) of the last call: months change on UTC hour boundaries, so the YYMM of one
# hour is computed once (time.gmtime and the formatting cost ~2 us a request otherwise).
_yymm_of_hour: list[tuple[int, str]] = [(-1, "")]


def current_yymm(now_ns: int) -> str:
    hour = now_ns // NS_PER_HOUR
    cached_hour, yymm = _yymm_of_hour[0]
    if hour != cached_hour:
        tm = time.gmtime(now_ns // 10**9)
        yymm = f"{tm.tm_year % 100:02d}{tm.tm_mon:02d}"
        _yymm_of_hour[0] = (hour, yymm)
    return yymm


class DetectDuplicate:
    """Same MTI class, field 32, 11, 7 and 37: answer as before, with no second effect."""

    name = "duplicate"

    def __init__(self, journal: AuthJournal) -> None:
        self._journal = journal

    def prepare(self, ctx: AuthContext) -> Vote:
        original = self._journal.get(ctx.key)
        if original is None:
            return _PREPARED
        ctx.duplicate_of = original
        return Vote.done


class LookupCard:
    name = "card"

    def __init__(self, vault: cardsec.PanVault, index) -> None:
        self._vault = vault
        self._index = index

    def prepare(self, ctx: AuthContext) -> Vote:
        card = self._index.card_by_pan_index(self._vault.index(ctx.request.pan))
        if card is None:
            if ctx.kind in ADVICES:
                ctx.outcome, ctx.cause = Outcome.approved, "advice for an unknown card: no effect"
                return Vote.done
            return ctx.decline(Outcome.card_not_found)
        ctx.card = card
        ctx.partner = self._index.partner(card.partner)
        return _PREPARED


class CheckCardStatus:
    """Removed, locked (8 reasons, field 44 action code), or a physical card not yet activated."""

    name = "status"

    def prepare(self, ctx: AuthContext) -> Vote:
        card = ctx.card
        if card.status is _ACTIVE or ctx.kind in ADVICES:
            return _PREPARED
        if card.status is CardStatus.removed:
            return ctx.decline(Outcome.card_removed)
        if card.status is CardStatus.locked:
            outcome, action_code, _ = LOCK_REASONS[card.lock_reason]
            ctx.field44 = action_code
            return ctx.decline(outcome, f"lock reason {card.lock_reason}")
        return ctx.decline(Outcome.card_not_activated)


class CheckExpiry:
    name = "expiry"

    def prepare(self, ctx: AuthContext) -> Vote:
        if ctx.kind in ADVICES:
            return _PREPARED
        sent = ctx.request.expiry_yymm
        if sent is not None and sent != ctx.card.expiry_yymm:
            return ctx.decline(Outcome.card_expired, "expiry does not match the card")
        if ctx.card.expiry_yymm < current_yymm(ctx.now_ns):
            return ctx.decline(Outcome.card_expired)
        return _PREPARED


class CheckCvc2:
    """Field 48 subelement 92 against the CVC2 derived under the CVK; the CVC2 is never stored."""

    name = "cvc2"

    def __init__(self, keys: cardsec.CardKeys) -> None:
        self._cvk = keys.cvk

    def prepare(self, ctx: AuthContext) -> Vote:
        sent = ctx.request.cvc2
        if sent is None or ctx.kind in ADVICES:
            return _PREPARED
        expected = cardsec.cvc2(ctx.request.pan, ctx.card.expiry_yymm, self._cvk, ctx.card.cvv_version)
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            return ctx.decline(Outcome.wrong_cvc2)
        return _PREPARED


class CheckPin:
    """Field 52 (ISO 9564 format 0 under the ZPK) against the stored PIN verification value.

    The third wrong PIN in a row locks the card with reason 6 and answers 75.
    """

    name = "pin"

    def __init__(self, keys: cardsec.CardKeys, cards) -> None:
        self._zpk = keys.zpk
        self._pvk = keys.pvk
        self._cards = cards  # authsrv.hotpath.cardstate.CardStateWriter

    def prepare(self, ctx: AuthContext) -> Vote:
        block = ctx.request.pin_block
        if block is None or ctx.kind in ADVICES:
            return _PREPARED
        card, pan = ctx.card, ctx.request.pan
        pin = cardsec.decrypt_pin_block(block, pan, self._zpk)
        if pin is not None and card.pvv and cardsec.verify_pin(pan, pin, card.pvv, self._pvk):
            if card.wrong_pin_count:
                self._cards.right_pin(card)
            return _PREPARED
        if self._cards.wrong_pin(card) >= PIN_TRIES_MAX:
            self._cards.lock(card, LOCK_REASON_PIN_TRIES_EXCEEDED)
            ctx.field44 = LOCK_REASONS[LOCK_REASON_PIN_TRIES_EXCEEDED][1]
            return ctx.decline(Outcome.card_pin_tries_exceeded, "third wrong PIN: card locked")
        return ctx.decline(Outcome.wrong_pin)


class ResolveAmount:
    """Processing code, amount and currency: the billing amount (fields 6/51) when present, else
    field 4 converted to the balance currency with the rates table when the currencies differ
    (authsrv/hotpath/fx.py; no rate for the pair: 57)."""

    name = "amount"

    def __init__(self, fx=None) -> None:
        self._fx = fx  # authsrv.hotpath.fx.RatesFile; None: no conversion, a foreign currency is 57

    def prepare(self, ctx: AuthContext) -> Vote:
        request = ctx.request
        if ctx.processing not in DEBITS and ctx.processing not in CREDITS and ctx.processing not in INQUIRIES:
            return ctx.decline(Outcome.unsupported_transaction, f"processing code {ctx.processing}")
        if request.billing_amount is not None and request.billing_currency is not None:
            ctx.amount, ctx.currency = request.billing_amount, request.billing_currency
        else:
            ctx.amount, ctx.currency = request.amount, request.currency
        if ctx.processing in INQUIRIES:
            return _PREPARED
        if ctx.amount <= 0:
            return self._refuse(ctx, Outcome.invalid_amount, "amount must be positive")
        if ctx.currency != ctx.card.currency:
            refused = "billed in another currency" if request.billing_amount is not None else self._convert(ctx)
            if refused:
                return self._refuse(ctx, Outcome.currency_mismatch,
                                    f"{ctx.currency} on a {ctx.card.currency} balance: {refused}")
        return _PREPARED

    def _convert(self, ctx: AuthContext) -> str:
        """Field 4 into the balance currency; why not ("" when converted)."""
        if self._fx is None:
            return "no FX rates"
        conversion = self._fx.table().convert(ctx.amount, ctx.currency, ctx.card.currency)
        if conversion is None or conversion.amount <= 0:  # no rate, or less than a minor unit
            if ctx.kind in ADVICES:
                self._fx.advices_without_rate += 1
            else:
                self._fx.declines_without_rate += 1
            return "no FX rate" if conversion is None else "converts to less than a minor unit"
        self._fx.conversions += 1
        ctx.amount, ctx.currency, ctx.fx_rate = conversion.amount, ctx.card.currency, conversion.rate
        return ""

    @staticmethod
    def _refuse(ctx: AuthContext, outcome: Outcome, cause: str) -> Vote:
        if ctx.kind in ADVICES:  # an advice cannot be declined: acknowledge, record, move nothing
            ctx.outcome, ctx.cause = Outcome.approved, f"advice not applied: {cause}"
            return Vote.done
        return ctx.decline(outcome, cause)
