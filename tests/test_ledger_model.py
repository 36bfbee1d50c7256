"""Model-based test: hypothesis drives ledger.state.Ledger with random batches and checks every
result, balance, hold, remembered id, history entry and total against a simple model written here
with plain dicts (no code shared with ledger/state.py; chains are undone by copying the model
instead of an undo log).

The model is a second reading of the semantics in ledger/state.py's module docstring: check
order, remembered failures, one timestamp per event (expiries first), holds' ids queued for
age-out when they resolve, chains all-or-nothing.
"""

from __future__ import annotations

import copy

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from ledger import (
    AMOUNT_MAX,
    ID_MAX,
    AccountFlags,
    AccountKind,
    AccountSpec,
    Batch,
    Ledger,
    TransferFlags,
    TransferSpec,
)

SECOND_NS = 10**9
RETENTION_NS = 60 * SECOND_NS  # short, so ids age out within a run
IDS_MAX = 20
HOLDS_PENDING_MAX = 6
BOUNDS = dict(ids_retention_ns=RETENTION_NS, ids_max=IDS_MAX, holds_pending_max=HOLDS_PENDING_MAX)
ACCOUNT_IDS = range(1, 7)
TRANSFER_IDS = range(1, 70)

LINKED, PENDING, POST, VOID, FORCED, FINAL = 1, 2, 4, 8, 16, 32
LIMIT_DEBITS, LIMIT_CREDITS = 1, 2

# Status numbers as the contract fixes them (types.py); spelled out so the model does not lean on
# the implementation's own tables.
CODES = {
    "created": 0, "linked_event_failed": 1, "linked_event_chain_open": 2, "exists": 3,
    "id_must_not_be_zero": 4, "id_must_not_be_too_large": 5, "flags_are_mutually_exclusive": 6,
    "debit_account_not_found": 7, "credit_account_not_found": 8, "accounts_must_be_different": 9,
    "currency_mismatch": 10, "amount_must_not_be_zero": 11, "amount_must_not_be_negative": 12,
    "amount_too_large": 13, "pending_id_must_not_be_zero": 14, "pending_id_must_be_zero": 15,
    "pending_transfer_not_found": 16, "pending_transfer_not_pending": 17,
    "pending_transfer_has_different_accounts": 18, "pending_transfer_already_posted": 19,
    "pending_transfer_already_voided": 20, "pending_transfer_expired": 21,
    "exceeds_pending_transfer_amount": 22, "timeout_reserved_for_pending_transfer": 23,
    "exists_with_different_fields": 24, "exceeds_credits": 25, "exceeds_debits": 26, "overflows": 27,
    "pending_transfers_full": 30, "flags_unknown": 31, "timeout_must_not_be_negative": 32,
    "reference_too_long": 33, "id_must_not_be_negative": 34,
}  # fmt: skip
REMEMBERED = {
    "debit_account_not_found", "credit_account_not_found", "currency_mismatch",
    "pending_transfer_not_found", "pending_transfer_not_pending",
    "pending_transfer_has_different_accounts", "pending_transfer_already_posted",
    "pending_transfer_already_voided", "pending_transfer_expired",
    "exceeds_pending_transfer_amount", "exceeds_credits", "exceeds_debits", "overflows",
}  # fmt: skip
ACCOUNT_CODES = {
    "created": 0, "exists": 1, "exists_with_different_fields": 2, "id_must_not_be_zero": 3,
    "currency_invalid": 4, "flags_are_mutually_exclusive": 5, "accounts_full": 6,
}  # fmt: skip
HISTORY_KINDS = {"hold": 1, "post": 2, "void": 3, "expire": 4, "transfer": 5}
HOLD_STATES = {"pending": 1, "posted": 2, "voided": 3, "expired": 4}


class Model:
    """The ledger as plain dicts."""

    def __init__(self) -> None:
        self.clock = 0
        self.accounts: dict[int, dict] = {}
        self.holds: dict[int, dict] = {}
        self.ids: dict[int, dict] = {}  # id -> {fields, status, since (None while a pending hold), seq}
        self.seq = 0
        self.evicted = 0
        self.history: dict[int, list] = {}

    # -- batch ----------------------------------------------------------------------------

    def apply(self, batch: Batch) -> tuple:
        ts = max(batch.timestamp_ns, self.clock + 1)
        due = sorted((h["deadline"], i) for i, h in self.holds.items() if h["state"] == "pending" and 0 < h["deadline"] <= ts)
        for k, (_, hold_id) in enumerate(due):
            hold = self.holds[hold_id]
            remaining = hold["amount"] - hold["posted"] - hold["released"]
            self.settle(hold_id, "expire", remaining, True, ts + k, hold_id, hold["code"], hold["reference"])
        for i in [i for i, r in self.ids.items() if r["since"] is not None and r["since"] <= ts - RETENTION_NS]:
            self.forget(i)
        account_results = tuple(self.create_account(a) for a in batch.accounts)
        first = ts + len(due)
        results = self.create_transfers(list(batch.transfers), first)
        n = len(batch.transfers)
        self.clock = first + n - 1 if n else max(ts, first - 1)
        while len(self.ids) > IDS_MAX:
            queued = [(r["seq"], i) for i, r in self.ids.items() if r["since"] is not None]
            if not queued:
                break
            self.forget(min(queued)[1])
            self.evicted += 1
        return ts, account_results, tuple(CODES[r] for r in results), tuple(i for _, i in due)

    def forget(self, transfer_id: int) -> None:
        del self.ids[transfer_id]
        self.holds.pop(transfer_id, None)

    def create_account(self, spec: AccountSpec) -> int:
        if spec.id == 0:
            return ACCOUNT_CODES["id_must_not_be_zero"]
        if spec.id in self.accounts:
            same = self.accounts[spec.id]["spec"] == msgspec.structs.astuple(spec)
            return ACCOUNT_CODES["exists" if same else "exists_with_different_fields"]
        if spec.currency not in ("EUR", "USD"):
            return ACCOUNT_CODES["currency_invalid"]
        if spec.flags == LIMIT_DEBITS | LIMIT_CREDITS:
            return ACCOUNT_CODES["flags_are_mutually_exclusive"]
        self.accounts[spec.id] = {
            "spec": msgspec.structs.astuple(spec), "currency": spec.currency, "kind": int(spec.kind),
            "flags": int(spec.flags), "dp": 0, "dpo": 0, "cp": 0, "cpo": 0, "forced_count": 0, "forced_amount": 0,
        }  # fmt: skip
        self.history[spec.id] = []
        return ACCOUNT_CODES["created"]

    def create_transfers(self, transfers: list[TransferSpec], first: int) -> list[str]:
        results: list[str] = []
        i = 0
        while i < len(transfers):
            j = i
            while j < len(transfers) and transfers[j].flags & LINKED:
                j += 1
            if j == len(transfers) and j > i:  # open chain
                return results + ["linked_event_chain_open"] * (j - i)
            if j == i:
                results.append(self.create_transfer(transfers[i], first + i, remember=True))
            else:
                results += self.create_chain(transfers, i, j + 1, first)
            i = j + 1
        return results

    def create_chain(self, transfers: list[TransferSpec], start: int, end: int, first: int) -> list[str]:
        saved = copy.deepcopy((self.accounts, self.holds, self.ids, self.seq, self.history))
        results = []
        for k in range(start, end):
            status = self.create_transfer(transfers[k], first + k, remember=False)
            if status not in ("created", "exists"):
                self.accounts, self.holds, self.ids, self.seq, self.history = saved
                out = ["linked_event_failed"] * (end - start)
                out[k - start] = status
                return out
            results.append(status)
        return results

    # -- one transfer -----------------------------------------------------------------------

    def create_transfer(self, t: TransferSpec, now: int, remember: bool) -> str:
        if t.id == 0:
            return "id_must_not_be_zero"
        if t.id < 0:
            return "id_must_not_be_negative"
        if t.id > ID_MAX:
            return "id_must_not_be_too_large"
        fields = msgspec.structs.astuple(t)
        if t.id in self.ids:
            record = self.ids[t.id]
            if record["fields"] != fields:
                return "exists_with_different_fields"
            return "exists" if record["status"] == "created" else record["status"]
        status = self.check_flags(t.flags)
        if status is None:
            if t.flags & (POST | VOID):
                status = self.post_or_void(t, now)
            else:
                status = self.plain_or_hold(t, now)
        if status in REMEMBERED and remember:
            self.enqueue(t.id, fields, status, now)
        return status

    @staticmethod
    def check_flags(flags: int) -> str | None:
        if flags & ~63:
            return "flags_unknown"
        if [bool(flags & PENDING), bool(flags & POST), bool(flags & VOID)].count(True) > 1:
            return "flags_are_mutually_exclusive"
        if flags & FORCED and flags & (POST | VOID):
            return "flags_are_mutually_exclusive"
        if flags & FINAL and not flags & (POST | VOID):
            return "flags_are_mutually_exclusive"
        return None

    def plain_or_hold(self, t: TransferSpec, now: int) -> str:
        is_hold = bool(t.flags & PENDING)
        if t.debit_account_id == t.credit_account_id:
            return "accounts_must_be_different"
        if t.amount == 0:
            return "amount_must_not_be_zero"
        if t.amount < 0:
            return "amount_must_not_be_negative"
        if t.amount > AMOUNT_MAX:
            return "amount_too_large"
        if t.pending_id != 0:
            return "pending_id_must_be_zero"
        if t.timeout_s != 0 and not is_hold:
            return "timeout_reserved_for_pending_transfer"
        if t.timeout_s < 0:
            return "timeout_must_not_be_negative"
        if len(t.reference) > 64:
            return "reference_too_long"
        debit = self.accounts.get(t.debit_account_id)
        credit = self.accounts.get(t.credit_account_id)
        if debit is None:
            return "debit_account_not_found"
        if credit is None:
            return "credit_account_not_found"
        if debit["currency"] != credit["currency"]:
            return "currency_mismatch"
        forced = bool(t.flags & FORCED)
        if not forced and debit["flags"] & LIMIT_DEBITS and debit["dp"] + debit["dpo"] + t.amount > debit["cpo"]:
            return "exceeds_credits"
        if not forced and credit["flags"] & LIMIT_CREDITS and credit["cp"] + credit["cpo"] + t.amount > credit["dpo"]:
            return "exceeds_debits"
        if debit["dp"] + debit["dpo"] + t.amount > AMOUNT_MAX or credit["cp"] + credit["cpo"] + t.amount > AMOUNT_MAX:
            return "overflows"
        deadline = now + t.timeout_s * SECOND_NS if t.timeout_s else 0
        if deadline > 2**63 - 1:
            return "overflows"
        pending_count = sum(1 for h in self.holds.values() if h["state"] == "pending")
        if is_hold and pending_count >= HOLDS_PENDING_MAX:
            return "pending_transfers_full"
        fields = msgspec.structs.astuple(t)
        if is_hold:
            debit["dp"] += t.amount
            credit["cp"] += t.amount
            self.holds[t.id] = {
                "debit": t.debit_account_id, "credit": t.credit_account_id, "amount": t.amount, "posted": 0,
                "released": 0, "state": "pending", "deadline": deadline, "forced": forced, "code": t.code,
                "reference": t.reference, "timestamp": now,
            }  # fmt: skip
            self.ids[t.id] = {"fields": fields, "status": "created", "since": None, "seq": None}
        else:
            debit["dpo"] += t.amount
            credit["cpo"] += t.amount
            self.enqueue(t.id, fields, "created", now)
        if forced:
            for account in (debit, credit):
                account["forced_count"] += 1
                account["forced_amount"] += t.amount
        kind = "hold" if is_hold else "transfer"
        self.record(now, t.id, 0, t.amount, 0, kind, forced, t.code, t.reference, t.debit_account_id, t.credit_account_id)
        return "created"

    def post_or_void(self, t: TransferSpec, now: int) -> str:
        if t.debit_account_id != 0 and t.debit_account_id == t.credit_account_id:
            return "accounts_must_be_different"
        if t.amount < 0:
            return "amount_must_not_be_negative"
        if t.amount > AMOUNT_MAX:
            return "amount_too_large"
        if t.pending_id == 0:
            return "pending_id_must_not_be_zero"
        if t.timeout_s != 0:
            return "timeout_reserved_for_pending_transfer"
        if len(t.reference) > 64:
            return "reference_too_long"
        record = self.ids.get(t.pending_id)
        if record is None or record["status"] != "created":
            return "pending_transfer_not_found"
        hold = self.holds.get(t.pending_id)
        if hold is None:
            return "pending_transfer_not_pending"
        if t.debit_account_id not in (0, hold["debit"]) or t.credit_account_id not in (0, hold["credit"]):
            return "pending_transfer_has_different_accounts"
        if hold["state"] != "pending":
            return {
                "posted": "pending_transfer_already_posted",
                "voided": "pending_transfer_already_voided",
                "expired": "pending_transfer_expired",
            }[hold["state"]]
        remaining = hold["amount"] - hold["posted"] - hold["released"]
        if t.amount > remaining:
            return "exceeds_pending_transfer_amount"
        amount = t.amount if t.amount else remaining
        resolve = amount == remaining or bool(t.flags & FINAL)
        self.enqueue(t.id, msgspec.structs.astuple(t), "created", now)
        kind = "post" if t.flags & POST else "void"
        self.settle(t.pending_id, kind, amount, resolve, now, t.id, t.code, t.reference)
        return "created"

    def settle(self, hold_id: int, kind: str, amount: int, resolve: bool, now: int, transfer_id: int, code: int, reference: str) -> None:
        hold = self.holds[hold_id]
        remaining = hold["amount"] - hold["posted"] - hold["released"]
        rest = remaining - amount if resolve else 0
        debit, credit = self.accounts[hold["debit"]], self.accounts[hold["credit"]]
        debit["dp"] -= amount + rest
        credit["cp"] -= amount + rest
        if kind == "post":
            hold["posted"] += amount
            debit["dpo"] += amount
            credit["cpo"] += amount
        else:
            hold["released"] += amount
        hold["released"] += rest
        if resolve:
            hold["state"] = {"post": "posted", "void": "voided", "expire": "expired"}[kind]
            self.ids[hold_id]["since"] = now
            self.ids[hold_id]["seq"] = self.next_seq()
        self.record(now, transfer_id, hold_id, amount, rest, kind, False, code, reference, hold["debit"], hold["credit"])

    def enqueue(self, transfer_id: int, fields: tuple, status: str, now: int) -> None:
        self.ids[transfer_id] = {"fields": fields, "status": status, "since": now, "seq": self.next_seq()}

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def record(self, now: int, transfer_id: int, pending_id: int, amount: int, released: int, kind: str, forced: bool, code: int, reference: str, debit: int, credit: int) -> None:
        for account_id, side, other in ((debit, 1, credit), (credit, 2, debit)):
            entry = (now, transfer_id, pending_id, amount, released, side, HISTORY_KINDS[kind], forced, code, reference, other)
            self.history[account_id].append(entry)


# -- generation -----------------------------------------------------------------------------

def rarely(strategy: st.SearchStrategy, common: st.SearchStrategy, one_in: int = 12) -> st.SearchStrategy:
    """`strategy` about one time in `one_in`, else `common`."""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda rare: strategy if rare else common)


# Accounts every run starts with: two currencies, with and without limit flags.
USER_EUR, FUNDING_EUR, SETTLEMENT_EUR, USER_USD, FUNDING_USD, CAPPED_EUR = ACCOUNT_IDS
INITIAL_ACCOUNTS = (
    AccountSpec(USER_EUR, "EUR", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits),
    AccountSpec(FUNDING_EUR, "EUR", AccountKind.funding),
    AccountSpec(SETTLEMENT_EUR, "EUR", AccountKind.settlement),
    AccountSpec(USER_USD, "USD", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits),
    AccountSpec(FUNDING_USD, "USD", AccountKind.funding),
    AccountSpec(CAPPED_EUR, "EUR", AccountKind.partner_deposit, AccountFlags.credits_must_not_exceed_debits),
)
# Mostly sensible pairs, some cross-currency, same-account or unknown-account ones.
PAIRS = rarely(
    st.tuples(st.sampled_from([*ACCOUNT_IDS, 9]), st.sampled_from([*ACCOUNT_IDS, 9])),
    st.sampled_from(
        [
            (USER_EUR, SETTLEMENT_EUR), (USER_EUR, SETTLEMENT_EUR), (USER_USD, FUNDING_USD),
            (FUNDING_EUR, USER_EUR), (FUNDING_EUR, CAPPED_EUR), (CAPPED_EUR, SETTLEMENT_EUR),
            (SETTLEMENT_EUR, FUNDING_EUR), (USER_EUR, CAPPED_EUR), (USER_EUR, FUNDING_USD),
        ]
    ),
)  # fmt: skip
AMOUNTS = rarely(st.sampled_from([0, -1, 600, AMOUNT_MAX // 2, AMOUNT_MAX, AMOUNT_MAX + 1]), st.integers(1, 120), 6)
TIMEOUTS = rarely(st.sampled_from([-1, 2**40]), st.sampled_from([0, 0, 2, 5, 10, 20, 40]))
ODD_IDS = st.sampled_from([0, -3, ID_MAX + 1, 2**100])


@st.composite
def transfer_specs(draw: st.DrawFn, hold_ids: list[int]) -> TransferSpec:
    kind = draw(rarely(st.just("odd"), st.sampled_from(["plain", "hold", "hold", "post", "post", "void"])))
    flags = LINKED if draw(st.sampled_from([True] + [False] * 7)) else 0
    debit, credit = draw(PAIRS)
    amount = draw(AMOUNTS)
    pending_id, timeout = 0, 0
    if kind in ("plain", "hold"):
        flags |= PENDING if kind == "hold" else 0
        flags |= FORCED if draw(st.sampled_from([True] + [False] * 5)) else 0
        timeout = draw(TIMEOUTS) if kind == "hold" else 0
    elif kind in ("post", "void"):
        flags |= POST if kind == "post" else VOID
        flags |= FINAL if draw(st.sampled_from([True, False, False])) else 0
        others = st.sampled_from([*TRANSFER_IDS[:10], 0])  # plain transfers, unknown ids, zero
        pending_id = draw(rarely(others, st.sampled_from(hold_ids), 5)) if hold_ids else draw(others)
        debit, credit = draw(rarely(st.just((debit, credit)), st.just((0, 0))))
        amount = draw(st.sampled_from([0, 0, 1, 5, 20, 50, 130]))
    else:  # anything, to reach the validation codes
        flags |= draw(st.sampled_from([PENDING | POST, FINAL, FORCED | VOID, 1 << 9, PENDING, 0]))
        pending_id = draw(st.sampled_from([0, 1, 2]))
        timeout = draw(TIMEOUTS)
    return TransferSpec(
        draw(rarely(ODD_IDS, st.sampled_from(TRANSFER_IDS), 10)),
        debit,
        credit,
        amount,
        TransferFlags(flags),
        pending_id,
        timeout,
        draw(st.integers(0, 2)),
        draw(rarely(st.just("€" * 65), st.sampled_from(["", "RRN1"]))),
    )


ACCOUNT_SPECS = st.builds(
    AccountSpec,
    st.sampled_from([*ACCOUNT_IDS, 7, 0]),
    st.sampled_from(["EUR", "EUR", "USD", "eu"]),
    st.sampled_from([AccountKind.user_balance, AccountKind.settlement, AccountKind.funding]),
    st.sampled_from([AccountFlags.none, AccountFlags.none, AccountFlags(1), AccountFlags(2), AccountFlags(3)]),
    st.integers(0, 1),
)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(**BOUNDS)
        self.model = Model()
        self.batches: list[Batch] = []
        self.results: list = []
        self.sent: list[TransferSpec] = []
        self.wall_ns = 1_000

    def submit(self, batch: Batch) -> None:
        result = self.ledger.apply(batch)
        expected = self.model.apply(batch)
        got = (result.timestamp_ns, tuple(result.account_results), tuple(result.transfer_results), result.expired)
        assert got == expected, (batch, got, expected)
        self.batches.append(batch)
        self.results.append(result)
        self.sent += [t for t in batch.transfers if t.id in TRANSFER_IDS]

    @initialize()
    def open_accounts(self) -> None:
        self.submit(Batch(self.wall_ns, accounts=INITIAL_ACCOUNTS))

    def tick(self, data: st.DataObject) -> int:
        self.wall_ns += data.draw(st.sampled_from([0, 1, 1_000, SECOND_NS, 3 * SECOND_NS, -5_000]))
        return max(0, self.wall_ns)

    @rule(data=st.data(), accounts=st.lists(ACCOUNT_SPECS, min_size=1, max_size=4))
    def create_accounts(self, data: st.DataObject, accounts: list[AccountSpec]) -> None:
        self.submit(Batch(self.tick(data), accounts=tuple(accounts)))

    @rule(data=st.data())
    def fund(self, data: st.DataObject) -> None:
        # Give limited accounts something to spend, through an unlimited counterparty.
        debit, credit = data.draw(st.sampled_from([(FUNDING_EUR, USER_EUR), (FUNDING_USD, USER_USD), (CAPPED_EUR, FUNDING_EUR)]))
        spec = TransferSpec(data.draw(st.sampled_from(TRANSFER_IDS)), debit, credit, data.draw(st.integers(1, 1_000)))
        self.submit(Batch(self.tick(data), transfers=(spec,)))

    @rule(data=st.data())
    def transfers(self, data: st.DataObject) -> None:
        holds = sorted(self.model.holds)
        specs = data.draw(st.lists(transfer_specs(holds), min_size=1, max_size=6))
        self.submit(Batch(self.tick(data), transfers=tuple(specs)))

    @rule(data=st.data(), count=st.integers(2, 8))
    def many_holds(self, data: st.DataObject, count: int) -> None:
        # Unlimited accounts, so the pending table fills up (HOLDS_PENDING_MAX) now and then.
        ids = data.draw(st.lists(st.sampled_from(TRANSFER_IDS), min_size=count, max_size=count))
        specs = tuple(
            TransferSpec(i, SETTLEMENT_EUR, FUNDING_EUR, 10, TransferFlags.pending, timeout_s=data.draw(TIMEOUTS))
            for i in ids
        )
        self.submit(Batch(self.tick(data), transfers=specs))

    @rule(data=st.data(), delta=st.sampled_from([-1, 0, 1]), pending=st.booleans())
    def spend_available(self, data: st.DataObject, delta: int, pending: bool) -> None:
        # The limit's edge: exactly what is available, one less, one more.
        user = self.model.accounts[USER_EUR]
        amount = user["cpo"] - user["dpo"] - user["dp"] + delta
        flags = TransferFlags.pending if pending else TransferFlags.none
        spec = TransferSpec(data.draw(st.sampled_from(TRANSFER_IDS)), USER_EUR, SETTLEMENT_EUR, amount, flags)
        self.submit(Batch(self.tick(data), transfers=(spec,)))

    @rule(data=st.data(), delta=st.sampled_from([-1, 0]))
    def to_the_edge(self, data: st.DataObject, delta: int) -> None:
        # Jump to 1 ns before or exactly at a hold's deadline or an id's retention end.
        edges = [h["deadline"] for h in self.model.holds.values() if h["state"] == "pending" and h["deadline"]]
        edges += [r["since"] + RETENTION_NS for r in self.model.ids.values() if r["since"] is not None]
        edges = sorted(e + delta for e in edges if e + delta > self.model.clock)
        if edges:
            self.wall_ns = data.draw(st.sampled_from(edges))
            self.submit(Batch(self.wall_ns))

    @rule(data=st.data())
    def replay_earlier(self, data: st.DataObject) -> None:
        if not self.sent:
            return
        spec = data.draw(st.sampled_from(self.sent))
        if data.draw(st.booleans()):
            change = data.draw(st.sampled_from(["amount", "code", "reference", "timeout_s"]))
            value = getattr(spec, change)
            spec = msgspec.structs.replace(spec, **{change: value + 1 if change != "reference" else value + "x"})
        self.submit(Batch(self.tick(data), transfers=(spec,)))

    @rule(seconds=st.sampled_from([5, 15, 30, 61, 200]))
    def advance_time(self, seconds: int) -> None:
        self.wall_ns = max(self.wall_ns, self.ledger.timestamp_ns) + seconds * SECOND_NS
        self.submit(Batch(self.wall_ns))

    @rule()
    def restart(self) -> None:
        restored = Ledger.from_snapshot(self.ledger.to_snapshot())
        assert restored.digest() == self.ledger.digest()
        self.ledger = restored

    @rule()
    def replay(self) -> None:
        fresh = Ledger(**BOUNDS)
        assert [fresh.apply(b) for b in self.batches] == self.results
        assert fresh.digest() == self.ledger.digest()

    @invariant()
    def ledger_matches_model(self) -> None:
        ledger, model = self.ledger, self.model
        ledger.check_invariants()
        assert ledger.timestamp_ns == model.clock
        for account_id in [*ACCOUNT_IDS, 7, 0, 9]:
            self.check_account(account_id)
        assert ledger.pending_count() == sum(1 for h in model.holds.values() if h["state"] == "pending")
        for transfer_id in TRANSFER_IDS:
            record = model.ids.get(transfer_id)
            status = ledger.transfer_status(transfer_id)
            assert (None if status is None else int(status)) == (None if record is None else CODES[record["status"]])
            self.check_hold(transfer_id)
        assert ledger.ids_count() == len(model.ids)
        assert ledger.ids_evicted_count == model.evicted
        self.check_totals()

    def check_account(self, account_id: int) -> None:
        view, expected = self.ledger.account(account_id), self.model.accounts.get(account_id)
        if expected is None:
            assert view is None
            return
        got = (view.debits_pending, view.debits_posted, view.credits_pending, view.credits_posted)
        assert got == (expected["dp"], expected["dpo"], expected["cp"], expected["cpo"])
        assert (view.currency, int(view.kind), int(view.flags)) == (expected["currency"], expected["kind"], expected["flags"])
        history = [
            (e.timestamp_ns, e.transfer_id, e.pending_id, e.amount, e.released, int(e.side), int(e.kind), e.forced, e.code, e.reference, e.counterparty_account_id)
            for e in self.ledger.history(account_id, limit=1_000)
        ]
        assert history == self.model.history[account_id][::-1][:1_000]

    def check_hold(self, transfer_id: int) -> None:
        view = self.ledger.hold(transfer_id)
        record = self.model.ids.get(transfer_id)
        expected = self.model.holds.get(transfer_id) if record is not None and record["status"] == "created" else None
        if expected is None:
            assert view is None
            return
        got = (view.debit_account_id, view.credit_account_id, view.amount, view.posted, view.released, int(view.state), view.deadline_ns, view.forced)
        want = (expected["debit"], expected["credit"], expected["amount"], expected["posted"], expected["released"], HOLD_STATES[expected["state"]], expected["deadline"], expected["forced"])
        assert got == want
        assert view.remaining == expected["amount"] - expected["posted"] - expected["released"]

    def check_totals(self) -> None:
        expected: dict = {}
        for account in self.model.accounts.values():
            row = expected.setdefault((account["currency"], account["kind"]), [0] * 7)
            values = [account["dp"], account["dpo"], account["cp"], account["cpo"], 1, account["forced_count"], account["forced_amount"]]
            for i, value in enumerate(values):
                row[i] += value
        got = {
            (currency, int(kind)): [t.debits_pending, t.debits_posted, t.credits_pending, t.credits_posted, t.count, t.forced_count, t.forced_amount]
            for (currency, kind), t in self.ledger.totals().items()
        }
        assert got == expected


LedgerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerModel = LedgerMachine.TestCase


@pytest.mark.slow
def test_ledger_model_long() -> None:
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=1_000,
            stateful_step_count=100,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
