"""The card lifecycle, without HTTP: issue, order, link, activate, print, lock, unlock, remove,
reset CVV, set PIN. Synchronous; the REST layer calls it in a worker thread (`ctx.in_thread`).

Each change runs in one store transaction with its event (the outbox), re-reading the card inside
it, so two requests on the same card cannot interleave. The store refreshes the switch's in-memory
index when the transaction commits, so the next authorization sees the change.

Business refusals are `CardResult` values, not exceptions. Card data is handled here only in clear
while it is needed: a PAN is stored encrypted (`PanVault`), a CVC2 is derived (never stored), a PIN
is stored only as its PVV. Nothing here logs or returns card data in an error.
"""

from __future__ import annotations

import calendar
import datetime
import enum
import json
import logging
import secrets
from typing import Any

import attrs

from authsrv import cardsec
from authsrv.store.db import (
    CARD_ORDER_LINKED,
    CARD_ORDER_ORDERED,
    BalanceRow,
    CardRow,
    NewCard,
    ProgramRow,
    Store,
    StoreConflict,
    UserRow,
    card_visible,
    utc_now_iso,
)
from authsrv.store.index import IRREVERSIBLE_LOCK_REASONS, CardStatus
from authsrv.store.seed import expiry_after_years

log = logging.getLogger("authsrv.rest")

PAN_LENGTH = 16
PAN_ATTEMPTS_MAX = 100  # a random PAN in a 6-digit BIN collides with probability < 1e-3 per try
KYC_SUCCESS = "SUCCESS"
BALANCE_ACTIVE = "ACTIVE"
STATUS_NAMES = {
    CardStatus.inactive: "INACTIVE", CardStatus.active: "ACTIVE",
    CardStatus.locked: "LOCKED", CardStatus.removed: "REMOVED",
}  # fmt: skip
PIN_CARD_TYPES = frozenset({"physical", "digital_first"})  # reference documents, "Set PIN"
CVV_RESET_CARD_TYPES = frozenset({"virtual", "digital_first"})  # reference documents, "Reset CVV"


class CardResult(enum.IntEnum):
    """Outcome of a card action, in precedence order. Never renumber."""

    ok = 0
    card_not_found = 1  # unknown, another user's, removed, or a physical card not yet linked
    kyc_required = 2
    balance_not_found = 3  # unknown, another user's, or not ACTIVE
    config_not_found = 4  # unknown program or another partner's
    currency_mismatch = 5  # balance and program currencies differ
    card_locked_irreversibly = 6  # unlock of reasons 1, 2, 5, 8
    card_not_locked = 7
    card_locked = 8  # activation or printing of a locked card
    card_type_not_supported = 9  # e.g. a PIN for a virtual card, a CVV reset for a physical card
    card_not_activatable = 10  # not a physical card, or already active
    cvv_resets_exhausted = 11
    card_numbers_exhausted = 12  # no free PAN in the BIN after PAN_ATTEMPTS_MAX tries
    card_already_ordered = 13  # print of a card already printed


@attrs.frozen
class Issued:
    """A new card and its clear PAN, which the caller sends once (JWE) and then forgets."""

    card: CardRow
    pan: str


def masked_pan(card: CardRow) -> str:
    return card.pan_first6 + "*" * (PAN_LENGTH - 10) + card.pan_last4


def expiry_date(expiry_yymm: str) -> str:
    """YYMM -> the last day of that month, ISO 8601 (cards are valid to the end of the month)."""
    year, month = 2000 + int(expiry_yymm[:2]), int(expiry_yymm[2:])
    assert 1 <= month <= 12
    return datetime.date(year, month, calendar.monthrange(year, month)[1]).isoformat()


def event_body(card: CardRow, **extra: Any) -> dict[str, Any]:
    """What a card event says: ids, type, state and the masked PAN; never the PAN, CVV or PIN."""
    body = {"cardId": card.id, "customerId": card.user_id, "balanceId": card.balance_id,
            "type": card.card_type, "status": STATUS_NAMES[card.status], "maskedPan": masked_pan(card)}
    body.update(extra)
    return body


def order_details(card: CardRow) -> dict[str, Any]:
    return json.loads(card.order_json) if card.order_json else {}


class CardService:
    def __init__(self, store: Store, keys: cardsec.CardKeys) -> None:
        self.store = store
        self.keys = keys
        self.vault = cardsec.PanVault(keys)

    # -- reading ---------------------------------------------------------------------------------

    def own_card(self, user: UserRow, card_id: int) -> CardRow | None:
        """The user's card if the user may see it (a foreign card is as unknown as a missing one)."""
        card = self.store.get_card(card_id)
        if card is None or card.user_id != user.id or card.partner != user.partner:
            return None
        return card if card_visible(card) else None

    def cards(self, user: UserRow) -> list[CardRow]:
        return self.store.visible_cards_of_user(user.id)

    def pan_of(self, card: CardRow) -> str:
        pan = self.vault.decrypt(card.pan_enc)
        assert pan.startswith(card.pan_first6) and pan.endswith(card.pan_last4)
        return pan

    def cvc2_of(self, card: CardRow, pan: str) -> str:
        return cardsec.cvc2(pan, card.expiry_yymm, self.keys.cvk, card.cvv_version)

    # -- issuing ---------------------------------------------------------------------------------

    def check_issue(self, user_id: int, balance_id: int, config_id: str) -> tuple[CardResult, BalanceRow | None,
                                                                                   ProgramRow | None]:
        """The rules every new card obeys: KYC passed, an active balance of the user, a program of
        the user's partner in the balance's currency."""
        user = self.store.get_user(user_id)
        if user is None:
            return CardResult.card_not_found, None, None  # the user went away: nothing to issue to
        if user.kyc != KYC_SUCCESS:
            return CardResult.kyc_required, None, None
        balance = self.store.get_balance(balance_id)
        if balance is None or balance.user_id != user.id or balance.status != BALANCE_ACTIVE:
            return CardResult.balance_not_found, None, None
        program = self.store.get_program(config_id)
        if program is None or program.partner != user.partner:
            return CardResult.config_not_found, None, None
        if program.currency != balance.currency:
            return CardResult.currency_mismatch, None, None
        return CardResult.ok, balance, program

    def issue(self, user_id: int, balance_id: int, config_id: str, *, card_type: str,
              order: dict[str, Any] | None = None, request_id: int = 0) -> tuple[CardResult, Issued | None]:
        """A new virtual card (active) or physical card (inactive, ORDERED at the bureau)."""
        assert card_type in ("virtual", "physical")
        assert (card_type == "physical") == (order is not None)
        with self.store.transaction():
            result, balance, program = self.check_issue(user_id, balance_id, config_id)
            if result is not CardResult.ok:
                return result, None
            assert balance is not None and program is not None
            for _ in range(PAN_ATTEMPTS_MAX):
                pan = cardsec.generate_pan(program.bin, secrets.randbelow(10 ** (PAN_LENGTH - 1 - len(program.bin))))
                try:
                    card = self.store.add_card(self._new_card(pan, balance, program, card_type, order))
                    break
                except StoreConflict:
                    continue  # that PAN is taken: draw another
            else:
                return CardResult.card_numbers_exhausted, None
            extra = {"requestId": request_id} if request_id else {}
            kind = "card.ordered" if card_type == "physical" else "card.created"
            self.store.append_event(card.partner, kind, f"card:{card.id}", event_body(card, **extra))
        assert card.user_id == user_id and card.balance_id == balance_id
        return CardResult.ok, Issued(card, pan)

    def _new_card(self, pan: str, balance: BalanceRow, program: ProgramRow, card_type: str,
                  order: dict[str, Any] | None) -> NewCard:
        assert cardsec.luhn_valid(pan) and len(pan) == PAN_LENGTH
        return NewCard(
            user_id=balance.user_id, balance_id=balance.id, config_id=program.config_id, card_type=card_type,
            pan_index=self.vault.index(pan), pan_enc=self.vault.encrypt(pan), pan_first6=pan[:6],
            pan_last4=pan[-4:], expiry_yymm=expiry_after_years(datetime.date.today(), program.expiry_years),
            status=CardStatus.inactive if card_type == "physical" else CardStatus.active,
            order_state=CARD_ORDER_ORDERED if order is not None else "",
            order_json=json.dumps({**order, "orderedAt": utc_now_iso()}) if order is not None else "",
        )  # fmt: skip

    def print_virtual(self, user: UserRow, card_id: int) -> tuple[CardResult, CardRow | None]:
        """Digital first: the same card (same PAN, still active) gets a blank plastic copy."""
        with self.store.transaction():
            card = self.own_card(user, card_id)
            if card is None:
                return CardResult.card_not_found, None
            if card.card_type == "digital_first":
                return CardResult.card_already_ordered, None
            if card.card_type != "virtual":
                return CardResult.card_type_not_supported, None
            if card.status == CardStatus.locked:
                return CardResult.card_locked, None
            details = json.dumps({"orderedAt": utc_now_iso(), "printed": True})
            self.store.set_card_order(card.id, order_state=CARD_ORDER_ORDERED, order_json=details,
                                      card_type="digital_first")
            card = self._reread(card.id)
            self.store.append_event(card.partner, "card.printed", f"card:{card.id}", event_body(card))
        return CardResult.ok, card

    # -- bureau ----------------------------------------------------------------------------------

    def mark_sent(self, card_id: int, bureau_order_id: str) -> None:
        with self.store.transaction():
            card = self.store.get_card(card_id)
            assert card is not None
            details = {**order_details(card), "bureauOrderId": bureau_order_id, "sentAt": utc_now_iso()}
            self.store.set_card_order(card.id, order_state=card.order_state, order_json=json.dumps(details))

    def link(self, card_id: int, tracking_number: str) -> CardRow | None:
        """The bureau produced the card: link it (visible from now on). Idempotent; None when the
        card is unknown or was removed meanwhile (the bureau order is acknowledged either way)."""
        with self.store.transaction():
            card = self.store.get_card(card_id)
            if card is None or card.status == CardStatus.removed or card.order_state != CARD_ORDER_ORDERED:
                return card if card is not None and card.order_state == CARD_ORDER_LINKED else None
            details = {**order_details(card), "trackingNumber": tracking_number, "linkedAt": utc_now_iso()}
            self.store.set_card_order(card.id, order_state=CARD_ORDER_LINKED, order_json=json.dumps(details))
            card = self._reread(card.id)
            self.store.append_event(card.partner, "card.linked", f"card:{card.id}",
                                    event_body(card, trackingNumber=tracking_number))
        return card

    # -- state changes ---------------------------------------------------------------------------

    def activate(self, user: UserRow, card_id: int) -> tuple[CardResult, CardRow | None]:
        with self.store.transaction():
            card = self.own_card(user, card_id)
            if card is None:
                return CardResult.card_not_found, None
            if card.status == CardStatus.locked:
                return CardResult.card_locked, None
            if card.card_type != "physical" or card.status != CardStatus.inactive:
                return CardResult.card_not_activatable, None
            details = {**order_details(card), "activatedAt": utc_now_iso()}
            self.store.set_card_order(card.id, order_state=card.order_state, order_json=json.dumps(details))
            self.store.set_card_status(card.id, CardStatus.active)
            card = self._reread(card.id)
            self.store.append_event(card.partner, "card.activated", f"card:{card.id}", event_body(card))
        return CardResult.ok, card

    def lock(self, user: UserRow, card_id: int, reason: int) -> tuple[CardResult, CardRow | None]:
        """Lock with `reason`; a card locked for an irreversible reason keeps that reason."""
        with self.store.transaction():
            card = self.own_card(user, card_id)
            if card is None:
                return CardResult.card_not_found, None
            self.store.lock_card(card.id, reason)
            card = self._reread(card.id)
            self.store.append_event(card.partner, "card.locked", f"card:{card.id}",
                                    event_body(card, reason=card.lock_reason))
        return CardResult.ok, card

    def unlock(self, user: UserRow, card_id: int) -> tuple[CardResult, CardRow | None]:
        with self.store.transaction():
            card = self.own_card(user, card_id)
            if card is None:
                return CardResult.card_not_found, None
            if card.status != CardStatus.locked:
                return CardResult.card_not_locked, None
            if card.lock_reason in IRREVERSIBLE_LOCK_REASONS:
                return CardResult.card_locked_irreversibly, None
            # A physical card locked before its activation goes back to waiting for it.
            activated = card.card_type != "physical" or "activatedAt" in order_details(card)
            self.store.set_card_status(card.id, CardStatus.active if activated else CardStatus.inactive)
            if card.lock_reason == 6:
                self.store.reset_wrong_pin(card.id)  # PIN tries exceeded: a fresh run of tries
            card = self._reread(card.id)
            self.store.append_event(card.partner, "card.unlocked", f"card:{card.id}", event_body(card))
        return CardResult.ok, card

    def remove(self, user: UserRow, card_id: int) -> tuple[CardResult, CardRow | None]:
        """Irreversible: the card declines (14) and disappears from every view."""
        with self.store.transaction():
            card = self.own_card(user, card_id)
            if card is None:
                return CardResult.card_not_found, None
            self.store.set_card_status(card.id, CardStatus.removed)
            card = self._reread(card.id)
            self.store.append_event(card.partner, "card.removed", f"card:{card.id}", event_body(card))
        return CardResult.ok, card

    def reset_cvv(self, card: CardRow, *, by: str) -> tuple[CardResult, CardRow | None]:
        """A new CVC2 (the CVV version moves on); the old one declines from the next message."""
        with self.store.transaction():
            fresh = self.store.get_card(card.id)
            if fresh is None or not card_visible(fresh):
                return CardResult.card_not_found, None
            if fresh.card_type not in CVV_RESET_CARD_TYPES:
                return CardResult.card_type_not_supported, None
            if self.store.bump_cvv_version(fresh.id) == 0:
                return CardResult.cvv_resets_exhausted, None
            fresh = self._reread(fresh.id)
            self.store.append_event(fresh.partner, "card.cvv_reset", f"card:{fresh.id}",
                                    event_body(fresh, by=by))
        return CardResult.ok, fresh

    def set_pin(self, user: UserRow, card_id: int, pin: str) -> tuple[CardResult, CardRow | None]:
        with self.store.transaction():
            card = self.own_card(user, card_id)
            if card is None:
                return CardResult.card_not_found, None
            if card.card_type not in PIN_CARD_TYPES:
                return CardResult.card_type_not_supported, None
            self.store.set_pvv(card.id, cardsec.pvv(self.pan_of(card), pin, self.keys.pvk))
            card = self._reread(card.id)
            self.store.append_event(card.partner, "card.pin_set", f"card:{card.id}", event_body(card))
        return CardResult.ok, card

    def _reread(self, card_id: int) -> CardRow:
        card = self.store.get_card(card_id)
        assert card is not None, f"card {card_id} vanished inside its transaction"
        return card
