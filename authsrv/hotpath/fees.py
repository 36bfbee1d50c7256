"""Fee schedules per card program, and the fee of one transaction (issue 6, "Fees").

The reference documents' list (seeds 003, "Fee management"): account creation, card creation,
monthly per card and per account, POS (fixed + percentage), e-commerce, ATM and currency
conversion fees. Defaults come from `[fees]` in authsrv.toml (authsrv.config.FeesConfig); a
program's `fees_json` (per `configId`) overrides any key. The demo program has `{}` and the
defaults are all 0: no fees (docs/contract.md, commands).

Transaction fees are posted at authorization from the user balance to the partner's fee-income
account, in the same linked ledger chain as the hold (authsrv/hotpath/funds.py), so the balance
check covers amount + fee; a reversal, a clearing for less (authsrv/clearing/plan.py) and an
expiry (authsrv/clearing/expiry.py) give the fee back in proportion (docs/money.md, "Fees").
Account and card creation fees and the monthly fees are charged by authsrv/feesrun.py.

Everything here is pure: the hot path calls `FeeBook.schedule` (a dict lookup after the first
message of a program) and `transaction_fee`.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable

import msgspec

from authsrv.config import FEE_AMOUNT_MAX, FEE_BP_MAX, FeesConfig

log = logging.getLogger("authsrv.fees")

BP_PER_UNIT = 10_000  # basis points in 100 %
PROGRAMS_CACHED_MAX = 10_000  # card programs are few; a bound all the same
ATM_MCC = "6011"  # automated cash disbursements
# Field 22 positions 1-2: PAN entered for e-commerce (Mastercard 81, Visa 09) or on file (10).
ECOMMERCE_ENTRY_MODES = frozenset({"81", "09", "10"})
CASH_PROCESSING = "01"


class FeeKind(enum.StrEnum):
    """The documents' fee kinds; the value is what `fee_periods.kind` stores. Never rename."""

    account_creation = "account_creation"
    card_creation = "card_creation"
    monthly_per_card = "monthly_per_card"
    monthly_per_account = "monthly_per_account"
    pos = "pos"
    ecommerce = "ecommerce"
    atm = "atm"
    fx = "fx"


class FeeCode:
    """Ledger transfer `code` of fees. Hot path 1..99 (authsrv.hotpath.steps.TransferCode uses
    1..8), management 101..199 (authsrv.store.db.ManagementTransferCode uses 101..103), clearing
    201... Kept apart from both sequences. Never renumber."""

    transaction = 41  # user balance -> fee income, with the authorization (POS, e-commerce, ATM + FX)
    transaction_refund = 42  # fee income -> user balance: reversal, compensation, expiry, clearing under
    account_creation = 141
    card_creation = 142
    monthly_per_card = 143
    monthly_per_account = 144
    owed = 145  # an earlier fee the balance could not pay in full, collected later


FEE_CODE_OF_KIND = {
    FeeKind.account_creation: FeeCode.account_creation,
    FeeKind.card_creation: FeeCode.card_creation,
    FeeKind.monthly_per_card: FeeCode.monthly_per_card,
    FeeKind.monthly_per_account: FeeCode.monthly_per_account,
}


class FeesError(ValueError):
    """A program's fees_json is not a valid fee schedule."""


def schedule_of(fees_json: str, defaults: FeesConfig) -> FeesConfig:
    """The program's schedule: `defaults` with the keys of `fees_json` replaced (validated)."""
    try:
        overrides = json.loads(fees_json or "{}")
    except ValueError as error:
        raise FeesError(f"fees_json is not JSON: {error}") from None
    if not isinstance(overrides, dict):
        raise FeesError("fees_json must be a JSON object")
    merged = {**msgspec.structs.asdict(defaults), **overrides}
    try:
        return msgspec.convert(merged, FeesConfig)
    except msgspec.ValidationError as error:
        raise FeesError(f"fees_json: {error}") from None


def charges_transactions(schedule: FeesConfig) -> bool:
    """Does any transaction fee apply? (Most programs: no, and the hot path skips the fee work.)"""
    return any((schedule.pos_fixed, schedule.pos_bp, schedule.ecommerce_fixed, schedule.ecommerce_bp,
                schedule.atm_fixed, schedule.atm_bp, schedule.fx_bp))


class FeeBook:
    """configId -> schedule, for the hot path. Programs are read from the store once each (at the
    first authorization of a program) and kept: a program's fees change only with a restart or
    `forget()`. A program whose fees_json is invalid charges the defaults, logged once."""

    def __init__(self, defaults: FeesConfig, program_fees_json: Callable[[str], str | None]) -> None:
        self.defaults = defaults
        self._fees_json = program_fees_json  # configId -> fees_json, None for an unknown program
        self._schedules: dict[str, tuple[FeesConfig, bool]] = {}

    @classmethod
    def of_store(cls, store, defaults: FeesConfig) -> FeeBook:
        def fees_json(config_id: str) -> str | None:
            program = store.get_program(config_id)
            return None if program is None else program.fees_json

        return cls(defaults, fees_json)

    def schedule(self, config_id: str) -> FeesConfig:
        return self._entry(config_id)[0]

    def charges_transactions(self, config_id: str) -> bool:
        return self._entry(config_id)[1]

    def forget(self) -> None:
        self._schedules.clear()

    def _entry(self, config_id: str) -> tuple[FeesConfig, bool]:
        found = self._schedules.get(config_id)
        if found is not None:
            return found
        fees_json = self._fees_json(config_id)
        try:
            schedule = schedule_of(fees_json or "{}", self.defaults)
        except FeesError as error:
            log.error("program %s: %s; charging the default fees", config_id, error)
            schedule = self.defaults
        found = (schedule, charges_transactions(schedule))
        if len(self._schedules) < PROGRAMS_CACHED_MAX:
            self._schedules[config_id] = found
        return found


def bp_of(amount: int, bp: int) -> int:
    """`bp` basis points of `amount`, rounded half-up (amounts are never negative)."""
    assert amount >= 0 and 0 <= bp <= FEE_BP_MAX
    return (amount * bp * 2 + BP_PER_UNIT) // (BP_PER_UNIT * 2)


def transaction_kind(processing: str, mcc: str | None, pos_entry_mode: str | None) -> FeeKind:
    """ATM (cash, or the ATM MCC), e-commerce (field 22), or card-present POS."""
    if processing == CASH_PROCESSING or mcc == ATM_MCC:
        return FeeKind.atm
    if pos_entry_mode is not None and pos_entry_mode[:2] in ECOMMERCE_ENTRY_MODES:
        return FeeKind.ecommerce
    return FeeKind.pos


def transaction_fee(schedule: FeesConfig, kind: FeeKind, amount: int, converted: bool) -> int:
    """The fee on a debit of `amount` (balance currency): the kind's fixed + bp part, plus the
    conversion fee when the transaction currency was not the balance's."""
    if kind is FeeKind.atm:
        fee = schedule.atm_fixed + bp_of(amount, schedule.atm_bp)
    elif kind is FeeKind.ecommerce:
        fee = schedule.ecommerce_fixed + bp_of(amount, schedule.ecommerce_bp)
    else:
        assert kind is FeeKind.pos, kind
        fee = schedule.pos_fixed + bp_of(amount, schedule.pos_bp)
    if converted:
        fee += bp_of(amount, schedule.fx_bp)
    assert 0 <= fee <= 2 * FEE_AMOUNT_MAX + 2 * amount
    return fee


def largest_payable(available: int, fee_of: Callable[[int], int]) -> int:
    """The largest amount a > 0 with a + fee_of(a) <= available (0 if none): a partial approval
    must leave room for its own fee. fee_of grows with a, at most a + FEE_AMOUNT_MAX * 2."""
    if available <= 0:
        return 0
    low, high = 0, available  # invariant: low is payable (or 0), high + 1 is not
    while low < high:  # bounded: about log2(available) <= 63 rounds
        middle = (low + high + 1) // 2
        if middle + fee_of(middle) <= available:
            low = middle
        else:
            high = middle - 1
    return low


def refund_share(fee: int, amount: int, outstanding_before: int, outstanding_after: int) -> int:
    """What a reversal gives back of a transaction fee: the fee follows what is still charged,
    in proportion (floor), and all of it comes back when nothing is left outstanding."""
    assert 0 <= outstanding_after <= outstanding_before <= amount and fee >= 0 and amount > 0

    def kept(outstanding: int) -> int:
        return fee * outstanding // amount

    return kept(outstanding_before) - kept(outstanding_after)


# Transfer ids of expiry fee refunds (authsrv/clearing/expiry.py): derived from the hold id, so a
# re-run after a crash names the same transfer and the ledger answers `exists`. Hot-path ids (hold
# ids among them) are nanosecond clocks below 2**62 until 2116; management ids are 2**63 + n with n
# a counter far below 2**62 (authsrv/store/db.py). This range, 2**63 + 2**62 + hold id, meets
# neither and stays below 2**64 (a plain msgpack int in the log).
EXPIRY_FEE_REFUND_ID_BASE = 2**63 + 2**62
HOLD_ID_DERIVABLE_MAX = 2**62 - 1


def expiry_fee_refund_id(hold_id: int) -> int:
    """The one transfer id that refunds the fee of the authorization whose user hold expired."""
    assert 0 < hold_id <= HOLD_ID_DERIVABLE_MAX, hold_id
    transfer_id = EXPIRY_FEE_REFUND_ID_BASE + hold_id
    assert EXPIRY_FEE_REFUND_ID_BASE < transfer_id < 2**64
    return transfer_id
