"""The in-memory card index read by the authorization hot path.

The hot path never touches SQLite per message: at startup `load_index` reads every card, partner
and system ledger account once, and from then on every management change goes through `Store`,
which commits to SQLite and then updates the objects here in place. Reads are plain dict lookups.

Threads: the store may update the index from a worker thread while the trio thread reads it.
Each update is one attribute or dict-item assignment, atomic under the GIL, and a reader sees a
card either before or after a change, never half of one.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from authsrv.store.db import Store

CARDS_MAX = 50_000_000  # memory bound: about 400 bytes per card in the index
PAN_INDEX_LENGTH = 16  # HMAC-SHA256 truncated to 16 bytes (authsrv.cardsec.PanVault.index)
WRONG_PIN_TRIES_MAX = 3  # docs/contract.md, wire profile: the third wrong PIN in a row locks (reason 6)


class CardStatus(enum.IntEnum):
    """Stored as the integer in `cards.status`. Never renumber."""

    inactive = 0  # physical card not yet activated
    active = 1
    locked = 2  # lock_reason says why
    removed = 3


class LockReason(enum.IntEnum):
    """Card lock reasons of the reference documents ("Lock" table). Never renumber."""

    none = 0
    lost = 1
    stolen = 2
    pending_query = 3
    consolidation = 4
    inactive = 5
    pin_tries_exceeded = 6
    suspected_fraud = 7
    replaced = 8


# Reference documents, "Lock": failure action code on POS/ATM (ISO field 44) per reason.
FAILURE_ACTION_CODES: dict[LockReason, str] = {
    LockReason.lost: "2008",
    LockReason.stolen: "2009",
    LockReason.pending_query: "1000",
    LockReason.consolidation: "1016",
    LockReason.inactive: "1018",
    LockReason.pin_tries_exceeded: "1006",
    LockReason.suspected_fraud: "1002",
    LockReason.replaced: "1011",
}
# Reference documents, "Unlock": a lock for these reasons can never be lifted.
IRREVERSIBLE_LOCK_REASONS = frozenset(
    {LockReason.lost, LockReason.stolen, LockReason.inactive, LockReason.replaced}
)
CARD_TYPES = ("virtual", "physical", "digital_first")


@attrs.define(slots=True)
class CardState:
    """One card as the hot path needs it. Mutable: the store updates it in place."""

    card_id: int
    customer_id: int
    balance_id: int
    partner: str
    config_id: str
    card_type: str  # 'virtual' | 'physical' | 'digital_first'
    pan_first6: str
    pan_last4: str
    expiry_yymm: str
    status: CardStatus
    lock_reason: int  # 0 = none, 1..8 = LockReason
    wrong_pin_count: int
    pvv: str  # '' = no PIN set
    currency: str  # the balance's currency
    balance_account_id: int  # the balance's ledger account
    cvv_version: int = 0  # bumped by reset CVV: an input of the CVC2 derivation (cardsec.cvc2)


@attrs.frozen
class PartnerState:
    name: str
    balance_mode: str  # 'internal' | 'external'
    collateral: str  # 'deposit' | 'credit' | 'none'
    collateral_account_ids: dict[str, int]  # currency -> partner_deposit / partner_credit account
    collateral_usage_account_ids: dict[str, int]  # currency -> collateral_usage account
    fee_income_account_ids: dict[str, int]  # currency -> fee_income account


class CardIndex:
    def __init__(self) -> None:
        self._cards_by_pan_index: dict[bytes, CardState] = {}
        self._cards_by_id: dict[int, CardState] = {}
        self._partners: dict[str, PartnerState] = {}
        self._settlement_accounts: dict[str, int] = {}
        self._funding_accounts: dict[str, int] = {}
        # Spend controls (authsrv/hotpath/limits.py Controls), only where a card or user has some.
        self._card_controls: dict[int, object] = {}
        self._user_controls: dict[int, object] = {}

    # Reads: the hot path.

    def card_by_pan_index(self, pan_index: bytes) -> CardState | None:
        return self._cards_by_pan_index.get(pan_index)

    def card_by_id(self, card_id: int) -> CardState | None:
        return self._cards_by_id.get(card_id)

    def partner(self, name: str) -> PartnerState | None:
        return self._partners.get(name)

    def settlement_account(self, currency: str) -> int | None:
        return self._settlement_accounts.get(currency)

    def funding_account(self, currency: str) -> int | None:
        return self._funding_accounts.get(currency)

    def card_controls(self, card_id: int):
        return self._card_controls.get(card_id)

    def user_controls(self, user_id: int):
        return self._user_controls.get(user_id)

    def controls_maps(self) -> tuple[dict[int, object], dict[int, object]]:
        """(card id -> Controls, user id -> Controls), updated in place: the hot path binds them once."""
        return self._card_controls, self._user_controls

    def __len__(self) -> int:
        return len(self._cards_by_id)

    # Writes: only the store (after its SQLite commit) and load_index call these.

    def put_card(self, card: CardState, pan_index: bytes) -> None:
        assert len(pan_index) == PAN_INDEX_LENGTH
        assert card.card_id > 0
        existing = self._cards_by_id.get(card.card_id)
        assert existing is None or self._cards_by_pan_index.get(pan_index) is existing
        if existing is None and len(self._cards_by_id) >= CARDS_MAX:
            raise OverflowError(f"card index holds CARDS_MAX={CARDS_MAX} cards")
        self._cards_by_pan_index[pan_index] = card
        self._cards_by_id[card.card_id] = card

    def put_partner(self, partner: PartnerState) -> None:
        self._partners[partner.name] = partner

    def put_settlement_account(self, currency: str, account_id: int) -> None:
        assert account_id > 0
        self._settlement_accounts[currency] = account_id

    def put_funding_account(self, currency: str, account_id: int) -> None:
        assert account_id > 0
        self._funding_accounts[currency] = account_id

    def put_controls(self, scope: str, owner_id: int, controls) -> None:
        """Spend controls of a card or user (`scope` 'card' | 'user'); None or empty: none."""
        assert owner_id > 0
        table = self._card_controls if scope == "card" else self._user_controls
        assert scope in ("card", "user") and len(table) <= CARDS_MAX
        if controls is None or controls.empty:
            table.pop(owner_id, None)
        else:
            table[owner_id] = controls


def load_index(store: Store) -> CardIndex:
    """Build the index in one pass over SQLite, and attach it to `store` so that every later
    management change through the store updates it too."""
    index = CardIndex()
    with store.locked():  # no change may slip in between reading and attaching
        for pan_index, card in store.card_states():
            index.put_card(card, pan_index)
        for partner in store.partner_states():
            index.put_partner(partner)
        for currency, account_id in store.system_accounts("settlement").items():
            index.put_settlement_account(currency, account_id)
        for currency, account_id in store.system_accounts("funding").items():
            index.put_funding_account(currency, account_id)
        for scope, owner_id, controls in store.spend_controls_all():
            index.put_controls(scope, owner_id, controls)
        store.attach_index(index)
    return index
