"""The partner's books and memory: balances, postings, idempotency cache, received calls, stats.

Pure and synchronous: every method runs to completion without an await, so under trio one request's
check-then-apply can never interleave with another's (that is what makes a replay that races its
original safe). I/O, latency and fault injection live in `app.py`.

Money rules (the reference documents, External Balance API):
- debit: 422 INSUFFICIENT_FUNDS when `amount` > available; otherwise available -= amount.
- credit: available += amount.
- force-debit / force-credit: always applied ("we do not accept transaction rejection"), so a
  force-debit may take a balance below zero.
- reversal: gives back what the referenced transaction moved (found by `referenceTransactionId`,
  else by `transactionId`, on the same balance), at most `amount`, newest posting first; partial
  reversals add up to the original at most. Never refused: an unknown transaction or balance is a
  no-op 204, as the documents require.
- PUT /transactions/{id}: records the status and the cleared amount on the newest posting of that
  id; money does not move (a different final amount arrives as its own force-debit/credit).
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections import OrderedDict, deque
from typing import Callable

import attrs

from simulators.partner.wire import (
    AMOUNT_MINOR_MAX,
    CREDIT_DECLINES,
    DEBIT_DECLINES,
    Kind,
    ModeIn,
    ModeOut,
    Title,
    TransactionIn,
)

BALANCES_MAX = 1_000_000
TRANSACTION_IDS_MAX = 1_000_000  # (balance, transactionId) pairs remembered for reversals
POSTINGS_PER_TRANSACTION_ID_MAX = 8  # transactionId "may not be unique": keep the newest few
IDEMPOTENCY_KEYS_MAX = 1_000_000
RECEIVED_MAX = 100_000
FORCED_USERS_MAX = 10_000
LATENCY_MS_MAX = 60_000.0
Z_P99 = 2.3263478740408408  # standard normal quantile at 0.99

# Amount ending (amount % 100) -> forced 422, when amount codes are on. The endings are the ISO 8583
# field 39 codes authsrv maps each decline to: 51 insufficient funds, 61 exceeds withdrawal limit,
# 59 suspected fraud. A credit can only be refused with FRAUDS_DETECTED, so only 59 applies there.
AMOUNT_CODES = {51: Title.INSUFFICIENT_FUNDS, 61: Title.LIMITS_EXCEEDED, 59: Title.FRAUDS_DETECTED}


class Outcome(enum.IntEnum):
    """What one partner call came to; precedence order, never renumber."""

    applied = 0
    balance_not_found = 1
    forbidden = 2
    currency_mismatch = 3
    frauds_detected = 4
    limits_exceeded = 5
    insufficient_funds = 6
    transaction_not_found = 7
    balance_not_empty = 8
    full = 9


# Outcome -> (HTTP status, error title or None for 204).
OUTCOME_ANSWERS: dict[Outcome, tuple[int, Title | None]] = {
    Outcome.applied: (204, None),
    Outcome.balance_not_found: (404, Title.BALANCE_NOT_FOUND),
    Outcome.forbidden: (403, Title.FORBIDDEN),
    Outcome.currency_mismatch: (422, Title.CURRENCY_MISMATCH),
    Outcome.frauds_detected: (422, Title.FRAUDS_DETECTED),
    Outcome.limits_exceeded: (422, Title.LIMITS_EXCEEDED),
    Outcome.insufficient_funds: (422, Title.INSUFFICIENT_FUNDS),
    Outcome.transaction_not_found: (404, Title.TRANSACTION_NOT_FOUND),
    Outcome.balance_not_empty: (422, Title.BALANCE_NOT_EMPTY),
    Outcome.full: (503, Title.SIMULATOR_FULL),
}
_DECLINE_OUTCOMES = {
    Title.INSUFFICIENT_FUNDS: Outcome.insufficient_funds,
    Title.LIMITS_EXCEEDED: Outcome.limits_exceeded,
    Title.FRAUDS_DETECTED: Outcome.frauds_detected,
}
assert set(OUTCOME_ANSWERS) == set(Outcome)


@attrs.frozen
class Latency:
    """Fixed (`p99_ms` == 0) or lognormal with the given median and 99th percentile, in ms."""

    median_ms: float = 0.0
    p99_ms: float = 0.0

    def __attrs_post_init__(self) -> None:
        assert 0.0 <= self.median_ms <= LATENCY_MS_MAX
        assert self.p99_ms == 0.0 or self.median_ms < self.p99_ms <= LATENCY_MS_MAX

    @classmethod
    def fixed(cls, ms: float) -> Latency:
        return cls(median_ms=ms, p99_ms=0.0)

    @property
    def is_fixed(self) -> bool:
        return self.p99_ms == 0.0

    def sample_ms(self, rng: random.Random) -> float:
        if self.is_fixed or self.median_ms == 0.0:
            return self.median_ms
        sigma = (math.log(self.p99_ms) - math.log(self.median_ms)) / Z_P99
        return min(rng.lognormvariate(math.log(self.median_ms), sigma), LATENCY_MS_MAX)


class Fault(enum.Enum):
    none = "none"
    error_5xx = "5xx"  # answer 500 without touching anything
    timeout = "timeout"  # apply, then answer only after timeout_ms
    drop = "drop"  # apply, then close the connection without an answer


@attrs.define
class Mode:
    """The knobs that can change at run time (`POST /_sim/mode`)."""

    down: bool = False
    latency: Latency = Latency()
    fail_5xx: float = 0.0
    timeout_rate: float = 0.0
    timeout_ms: float = 5_000.0
    drop_rate: float = 0.0
    amount_codes: bool = True
    forced_users: dict[str, Title] = attrs.Factory(dict)

    def check(self) -> None:
        for rate in (self.fail_5xx, self.timeout_rate, self.drop_rate):
            assert 0.0 <= rate <= 1.0
        assert self.fail_5xx + self.timeout_rate + self.drop_rate <= 1.0 + 1e-9
        assert 0.0 <= self.timeout_ms <= LATENCY_MS_MAX
        assert len(self.forced_users) <= FORCED_USERS_MAX
        assert all(code in DEBIT_DECLINES for code in self.forced_users.values())

    def roll(self, rng: random.Random) -> Fault:
        draw = rng.random()
        if draw < self.fail_5xx:
            return Fault.error_5xx
        if draw < self.fail_5xx + self.timeout_rate:
            return Fault.timeout
        if draw < self.fail_5xx + self.timeout_rate + self.drop_rate:
            return Fault.drop
        return Fault.none

    def updated(self, change: ModeIn) -> Mode | str:
        """A new Mode with `change` applied, or why it is refused (the current one stays)."""
        new = attrs.evolve(self, forced_users=dict(self.forced_users))
        if change.down is not None:
            new.down = change.down
        if change.latency_ms is not None:
            new.latency = Latency.fixed(change.latency_ms)
        if (change.latency_median_ms is None) != (change.latency_p99_ms is None):
            return "latencyMedianMs and latencyP99Ms go together"
        if change.latency_median_ms is not None and change.latency_p99_ms is not None:
            if not 0.0 < change.latency_median_ms < change.latency_p99_ms:
                return "need 0 < latencyMedianMs < latencyP99Ms"
            new.latency = Latency(median_ms=change.latency_median_ms, p99_ms=change.latency_p99_ms)
        for name in ("fail_5xx", "timeout_rate", "timeout_ms", "drop_rate", "amount_codes"):
            value = getattr(change, name)
            if value is not None:
                setattr(new, name, value)
        for user_id, code in (change.forced_users or {}).items():
            if code is None:
                new.forced_users.pop(user_id, None)
            elif code not in DEBIT_DECLINES:
                return f"forcedUsers codes must be one of {', '.join(DEBIT_DECLINES)}"
            else:
                new.forced_users[user_id] = code
        if new.fail_5xx + new.timeout_rate + new.drop_rate > 1.0:
            return "fail5xx + timeoutRate + dropRate must be at most 1"
        if len(new.forced_users) > FORCED_USERS_MAX:
            return f"at most {FORCED_USERS_MAX} forced users"
        new.check()
        return new

    def out(self) -> ModeOut:
        return ModeOut(
            down=self.down,
            latency_ms=self.latency.median_ms if self.latency.is_fixed else 0.0,
            latency_median_ms=0.0 if self.latency.is_fixed else self.latency.median_ms,
            latency_p99_ms=self.latency.p99_ms,
            fail_5xx=self.fail_5xx,
            timeout_rate=self.timeout_rate,
            timeout_ms=self.timeout_ms,
            drop_rate=self.drop_rate,
            amount_codes=self.amount_codes,
            forced_users={user: code.value for user, code in self.forced_users.items()},
        )


@attrs.define
class Balance:
    user_id: str
    balance_id: str
    currency: str
    amount_minor: int  # available; below zero only through force-debit or the control API


@attrs.define
class Posting:
    """One applied money movement, kept so a reversal can give it back."""

    kind: Kind
    effect_minor: int  # signed change to the balance: negative for debits
    reversed_minor: int = 0  # absolute amount already given back
    status: str = "AUTHORIZED"
    cleared_amount_minor: int | None = None

    @property
    def remaining_minor(self) -> int:
        assert 0 <= self.reversed_minor <= abs(self.effect_minor)
        return abs(self.effect_minor) - self.reversed_minor


@attrs.frozen
class Answer:
    """An HTTP answer as it is cached and replayed: exactly this status and these bytes."""

    status: int
    body: bytes = b""

    def __attrs_post_init__(self) -> None:
        assert 200 <= self.status <= 599
        assert self.status != 204 or not self.body


@attrs.define
class Received:
    """One processed call (not replays: those bump `replays`)."""

    seq: int
    kind: Kind
    method: str
    path: str
    idempotency_key: str | None
    signature: str | None
    signature_timestamp: str | None
    encrypted: bool
    raw_body: bytes  # as on the wire: what a signature covers
    body: bytes  # plaintext JSON (decrypted when it came as a JWE)
    status: int
    received_at: float  # seconds since 1970
    client_cert_name: str | None
    replays: int = 0


@attrs.frozen
class CacheEntry:
    fingerprint: bytes  # method, path and canonical plaintext: a reused key with another request
    answer: Answer
    received: Received | None


@attrs.define
class EndpointStats:
    requests: int = 0
    processed: int = 0
    replays: int = 0
    injected_5xx: int = 0
    injected_timeouts: int = 0
    injected_drops: int = 0
    unavailable: int = 0  # answered 503 in down mode
    invalid: int = 0  # 4xx before processing: bad body, missing or reused key
    by_status: dict[str, int] = attrs.Factory(dict)  # of processed answers and replays

    def answered(self, status: int) -> None:
        name = str(status)
        self.by_status[name] = self.by_status.get(name, 0) + 1
        assert len(self.by_status) <= 600


class PartnerState:
    """Everything the simulator knows. All containers bounded; see the module docstring for rules."""

    def __init__(self, *, mode: Mode | None = None, initial_amount_minor: int = 0,
                 currency: str = "EUR", seed: int | None = None,
                 idempotency_keys_max: int = IDEMPOTENCY_KEYS_MAX, received_max: int = RECEIVED_MAX,
                 clock: Callable[[], float] = time.time) -> None:
        assert abs(initial_amount_minor) <= AMOUNT_MINOR_MAX
        assert 1 <= idempotency_keys_max <= IDEMPOTENCY_KEYS_MAX and 1 <= received_max <= RECEIVED_MAX
        self.mode = mode if mode is not None else Mode()
        self.mode.check()
        self.initial_amount_minor = initial_amount_minor
        self.currency = currency
        self.rng = random.Random(seed)
        self.clock = clock
        self.idempotency_keys_max = idempotency_keys_max
        self.balances: dict[str, Balance] = {}  # by balanceId: transactions name no user
        self.postings: OrderedDict[tuple[str, str], list[Posting]] = OrderedDict()
        self.cache: OrderedDict[str, CacheEntry] = OrderedDict()
        self.received: deque[Received] = deque(maxlen=received_max)
        self.received_total = 0
        self.stats: dict[Kind, EndpointStats] = {kind: EndpointStats() for kind in Kind}
        self.unmatched_reversals = 0
        self.currency_mismatches_forced = 0

    # -- balances -----------------------------------------------------------------------------

    def link(self, user_id: str, balance_id: str, currency: str) -> Outcome:
        """Any user id is accepted (the simulator has no user list); relinking is idempotent."""
        existing = self.balances.get(balance_id)
        if existing is not None:
            if existing.user_id != user_id:
                return Outcome.forbidden
            return Outcome.applied if existing.currency == currency else Outcome.currency_mismatch
        if len(self.balances) >= BALANCES_MAX:
            return Outcome.full
        self.balances[balance_id] = Balance(user_id, balance_id, currency, self.initial_amount_minor)
        return Outcome.applied

    def owned(self, user_id: str, balance_id: str) -> Balance | Outcome:
        balance = self.balances.get(balance_id)
        if balance is None:
            return Outcome.balance_not_found
        return balance if balance.user_id == user_id else Outcome.forbidden

    def balances_of(self, user_id: str) -> list[Balance]:
        return [balance for balance in self.balances.values() if balance.user_id == user_id]

    def delete(self, user_id: str, balance_id: str) -> Outcome:
        found = self.owned(user_id, balance_id)
        if isinstance(found, Outcome):
            return found
        if found.amount_minor != 0:
            return Outcome.balance_not_empty  # "balance should be deleted only if there is no money on it"
        del self.balances[balance_id]
        return Outcome.applied

    def set_amount(self, user_id: str, balance_id: str, amount_minor: int, currency: str | None) -> Outcome:
        """Control API: set (creating if needed) a balance's available amount."""
        if balance_id not in self.balances:
            outcome = self.link(user_id, balance_id, currency or self.currency)
            if outcome is not Outcome.applied:
                return outcome
        balance = self.owned(user_id, balance_id)
        if isinstance(balance, Outcome):
            return balance
        if currency is not None and currency != balance.currency:
            return Outcome.currency_mismatch
        balance.amount_minor = amount_minor
        return Outcome.applied

    def amount_of(self, balance_id: str) -> int | None:
        balance = self.balances.get(balance_id)
        return None if balance is None else balance.amount_minor

    # -- transactions -------------------------------------------------------------------------

    def transact(self, kind: Kind, tx: TransactionIn) -> Outcome:
        assert kind in (Kind.debit, Kind.credit, Kind.force_debit, Kind.force_credit)
        balance = self.balances.get(tx.balance_id)
        if balance is None:
            return Outcome.balance_not_found
        forcible = kind in (Kind.force_debit, Kind.force_credit)
        if tx.currency != balance.currency:
            if not forcible:
                return Outcome.currency_mismatch
            self.currency_mismatches_forced += 1  # cannot refuse it: apply, and count for tests
        if not forcible:
            declined = self._forced_decline(kind, balance, tx.amount)
            if declined is not None:
                return declined
        if kind is Kind.debit and tx.amount > balance.amount_minor:
            return Outcome.insufficient_funds
        effect = -tx.amount if kind in (Kind.debit, Kind.force_debit) else tx.amount
        balance.amount_minor += effect
        self._remember_posting((tx.balance_id, tx.transaction_id), Posting(kind, effect))
        return Outcome.applied

    def reverse(self, tx: TransactionIn) -> int:
        """Give back up to `tx.amount` of what the referenced transaction moved; the amount given."""
        balance = self.balances.get(tx.balance_id)
        postings = None
        for transaction_id in (tx.reference_transaction_id, tx.transaction_id):
            if transaction_id is not None:
                postings = self.postings.get((tx.balance_id, transaction_id))
                if postings:
                    break
        if balance is None or not postings:
            self.unmatched_reversals += 1
            return 0
        wanted = tx.amount
        given = 0
        for posting in reversed(postings):  # newest first; bounded by POSTINGS_PER_TRANSACTION_ID_MAX
            part = min(wanted - given, posting.remaining_minor)
            if part <= 0:
                continue
            posting.reversed_minor += part
            balance.amount_minor += part if posting.effect_minor < 0 else -part
            given += part
            if posting.remaining_minor == 0:
                posting.status = "REVERSED"
        assert 0 <= given <= wanted
        return given

    def update_status(self, transaction_id: str, tx: TransactionIn) -> Outcome:
        postings = self.postings.get((tx.balance_id, transaction_id))
        if not postings:
            return Outcome.transaction_not_found
        postings[-1].status = tx.status
        postings[-1].cleared_amount_minor = tx.amount
        return Outcome.applied

    def _forced_decline(self, kind: Kind, balance: Balance, amount: int) -> Outcome | None:
        allowed = DEBIT_DECLINES if kind is Kind.debit else CREDIT_DECLINES
        code = self.mode.forced_users.get(balance.user_id)
        if code is None and self.mode.amount_codes:
            code = AMOUNT_CODES.get(amount % 100)
        if code is None or code not in allowed:
            return None
        return _DECLINE_OUTCOMES[code]

    def _remember_posting(self, key: tuple[str, str], posting: Posting) -> None:
        postings = self.postings.get(key)
        if postings is None:
            if len(self.postings) >= TRANSACTION_IDS_MAX:
                self.postings.popitem(last=False)  # the oldest can no longer be reversed
            postings = self.postings[key] = []
        else:
            self.postings.move_to_end(key)
        postings.append(posting)
        if len(postings) > POSTINGS_PER_TRANSACTION_ID_MAX:
            del postings[0]
        assert len(self.postings) <= TRANSACTION_IDS_MAX

    # -- idempotency and records --------------------------------------------------------------

    def cached(self, key: str) -> CacheEntry | None:
        entry = self.cache.get(key)
        if entry is not None:
            self.cache.move_to_end(key)  # LRU
        return entry

    def remember(self, key: str, entry: CacheEntry) -> None:
        assert key not in self.cache, "a key is answered once; replays read the cache"
        self.cache[key] = entry
        if len(self.cache) > self.idempotency_keys_max:
            self.cache.popitem(last=False)
        assert len(self.cache) <= self.idempotency_keys_max

    def record(self, **fields) -> Received:
        self.received_total += 1
        received = Received(seq=self.received_total, received_at=self.clock(), **fields)
        self.received.append(received)  # the deque drops the oldest past received_max
        return received

    def received_of(self, kind_prefix: str = "", key: str | None = None, limit: int = RECEIVED_MAX) -> list[Received]:
        """Records oldest first; `kind_prefix` "verification" matches all three verification kinds."""
        found = [
            received for received in self.received
            if received.kind.value.startswith(kind_prefix) and (key is None or received.idempotency_key == key)
        ]
        return found[-limit:] if limit < len(found) else found

    def reset_records(self) -> None:
        self.received.clear()
        self.stats = {kind: EndpointStats() for kind in Kind}
        self.unmatched_reversals = 0
        self.currency_mismatches_forced = 0
