"""Unit tests of ledger.state.Ledger: every result code, the hold lifecycle, chains, forcing,
idempotency, id retention, snapshots and history paging."""

from __future__ import annotations

import pytest

from ledger import (
    AMOUNT_MAX,
    ID_MAX,
    REFERENCE_LENGTH_MAX,
    AccountFlags,
    AccountKind,
    AccountSpec,
    AccountStatus,
    Batch,
    HistoryKind,
    HoldState,
    Ledger,
    LedgerInvariantError,
    Side,
    TransferFlags,
    TransferSpec,
    TransferStatus,
)

S = TransferStatus
F = TransferFlags
HOUR_NS = 3600 * 10**9
DAY_NS = 24 * HOUR_NS

USER, FUNDING, SETTLEMENT, USER_USD, CAPPED, FUNDING_USD, FREE = 1, 2, 3, 4, 5, 6, 7
ACCOUNTS = (
    AccountSpec(USER, "EUR", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits, 77),
    AccountSpec(FUNDING, "EUR", AccountKind.funding),
    AccountSpec(SETTLEMENT, "EUR", AccountKind.settlement),
    AccountSpec(USER_USD, "USD", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits),
    AccountSpec(CAPPED, "EUR", AccountKind.settlement, AccountFlags.credits_must_not_exceed_debits),
    AccountSpec(FUNDING_USD, "USD", AccountKind.funding),
    AccountSpec(FREE, "EUR", AccountKind.user_balance),
)
FUNDED = 1_000


def transfer(id: int, debit: int, credit: int, amount: int, flags: int = 0, **fields) -> TransferSpec:
    return TransferSpec(id, debit, credit, amount, TransferFlags(flags), **fields)


def hold(id: int, amount: int, **fields) -> TransferSpec:
    return transfer(id, USER, SETTLEMENT, amount, F.pending, **fields)


def post(id: int, pending_id: int, amount: int = 0, flags: int = 0, **fields) -> TransferSpec:
    return transfer(id, 0, 0, amount, F.post_pending | flags, pending_id=pending_id, **fields)


def void(id: int, pending_id: int, amount: int = 0, flags: int = 0) -> TransferSpec:
    return transfer(id, 0, 0, amount, F.void_pending | flags, pending_id=pending_id)


def apply(ledger: Ledger, *transfers: TransferSpec, ts: int = 0) -> tuple[TransferStatus, ...]:
    result = ledger.apply(Batch(ts, transfers=transfers))
    ledger.check_invariants()
    return result.transfer_results


def one(ledger: Ledger, spec: TransferSpec, ts: int = 0) -> TransferStatus:
    (status,) = apply(ledger, spec, ts=ts)
    return status


@pytest.fixture
def ledger() -> Ledger:
    ledger = Ledger()
    result = ledger.apply(Batch(1_000, accounts=ACCOUNTS))
    assert result.account_results == (AccountStatus.created,) * len(ACCOUNTS)
    assert one(ledger, transfer(900, FUNDING, USER, FUNDED)) is S.created
    assert one(ledger, transfer(901, FUNDING_USD, USER_USD, FUNDED)) is S.created
    return ledger


def available(ledger: Ledger, account_id: int = USER) -> int:
    balance = ledger.balance(account_id)
    assert balance is not None
    return balance.available


# -- every transfer status ------------------------------------------------------------------

STATUS_CASES = [
    (S.id_must_not_be_zero, [], transfer(0, FUNDING, USER, 1)),
    (S.id_must_not_be_negative, [], transfer(-5, FUNDING, USER, 1)),
    (S.id_must_not_be_too_large, [], transfer(ID_MAX + 1, FUNDING, USER, 1)),
    (S.flags_unknown, [], transfer(10, FUNDING, USER, 1, 1 << 10)),
    (S.flags_are_mutually_exclusive, [], transfer(10, USER, SETTLEMENT, 1, F.pending | F.post_pending, pending_id=1)),
    (S.flags_are_mutually_exclusive, [], transfer(10, 0, 0, 1, F.post_pending | F.void_pending, pending_id=1)),
    (S.flags_are_mutually_exclusive, [], post(10, 1, flags=F.forced)),
    (S.flags_are_mutually_exclusive, [], void(10, 1, flags=F.forced)),
    (S.flags_are_mutually_exclusive, [], transfer(10, FUNDING, USER, 1, F.final)),
    (S.debit_account_not_found, [], transfer(10, 99, USER, 1)),
    (S.credit_account_not_found, [], transfer(10, FUNDING, 99, 1)),
    (S.accounts_must_be_different, [], transfer(10, USER, USER, 1)),
    (S.accounts_must_be_different, [], transfer(10, USER, USER, 1, F.post_pending, pending_id=1)),
    (S.currency_mismatch, [], transfer(10, FUNDING, USER_USD, 1)),
    (S.amount_must_not_be_zero, [], transfer(10, FUNDING, USER, 0)),
    (S.amount_must_not_be_zero, [], hold(10, 0)),
    (S.amount_must_not_be_negative, [], transfer(10, FUNDING, USER, -1)),
    (S.amount_must_not_be_negative, [hold(1, 10)], post(10, 1, -1)),
    (S.amount_too_large, [], transfer(10, FUNDING, USER, AMOUNT_MAX + 1)),
    (S.pending_id_must_not_be_zero, [], post(10, 0)),
    (S.pending_id_must_be_zero, [], transfer(10, FUNDING, USER, 1, pending_id=3)),
    (S.pending_transfer_not_found, [], post(10, 12345)),
    (S.pending_transfer_not_found, [hold(1, 5_000)], post(10, 1)),  # the hold itself failed
    (S.pending_transfer_not_pending, [], post(10, 900)),
    (S.pending_transfer_has_different_accounts, [hold(1, 10)], transfer(10, FREE, 0, 0, F.post_pending, pending_id=1)),
    (S.pending_transfer_has_different_accounts, [hold(1, 10)], transfer(10, 0, CAPPED, 0, F.void_pending, pending_id=1)),
    (S.pending_transfer_already_posted, [hold(1, 10), post(2, 1)], post(10, 1)),
    (S.pending_transfer_already_voided, [hold(1, 10), void(2, 1)], post(10, 1)),
    (S.pending_transfer_already_voided, [hold(1, 10), void(2, 1)], void(10, 1)),
    (S.exceeds_pending_transfer_amount, [hold(1, 10)], post(10, 1, 11)),
    (S.exceeds_pending_transfer_amount, [hold(1, 10), post(2, 1, 4)], void(10, 1, 7)),
    (S.timeout_reserved_for_pending_transfer, [], transfer(10, FUNDING, USER, 1, timeout_s=5)),
    (S.timeout_reserved_for_pending_transfer, [hold(1, 10)], post(10, 1, timeout_s=5)),
    (S.timeout_must_not_be_negative, [], hold(10, 1, timeout_s=-1)),
    (S.reference_too_long, [], transfer(10, FUNDING, USER, 1, reference="x" * (REFERENCE_LENGTH_MAX + 1))),
    (S.exceeds_credits, [], transfer(10, USER, FUNDING, FUNDED + 1)),
    (S.exceeds_credits, [hold(1, 600)], hold(10, 401)),  # a hold counts at once
    (S.exceeds_debits, [], transfer(10, FUNDING, CAPPED, 1)),
    (S.overflows, [transfer(1, FUNDING, FREE, AMOUNT_MAX - FUNDED - 5)], transfer(10, FUNDING, FREE, 6)),
    (S.overflows, [transfer(1, FUNDING, FREE, AMOUNT_MAX - FUNDED - 5)], transfer(10, FUNDING, SETTLEMENT, 6, F.pending)),
    (S.overflows, [], hold(10, 1, timeout_s=2**63 // 10**9 + 1)),
    # pending and posted together: a hold of nearly AMOUNT_MAX, then a plain transfer
    (S.overflows, [transfer(1, FUNDING, FREE, AMOUNT_MAX - FUNDED - 5, F.pending)], transfer(10, FUNDING, SETTLEMENT, 6)),
]


@pytest.mark.parametrize(("expected", "setup", "spec"), STATUS_CASES)
def test_transfer_status(ledger: Ledger, expected: S, setup: list[TransferSpec], spec: TransferSpec) -> None:
    for earlier in setup:
        one(ledger, earlier)
    before = {i: ledger.account(i) for i in range(1, 8)}
    pending_before = ledger.pending_count()
    assert one(ledger, spec) is expected
    assert {i: ledger.account(i) for i in range(1, 8)} == before  # a refusal changes no balance
    assert ledger.pending_count() == pending_before


def test_exceeds_pending_transfer_amount_excess_goes_as_separate_forced_transfer(ledger: Ledger) -> None:
    # A clearing of 120 against a hold of 100: post the hold in full, book the 20 separately.
    assert one(ledger, hold(1, 100)) is S.created
    assert one(ledger, post(2, 1, 120)) is S.exceeds_pending_transfer_amount
    assert apply(ledger, post(3, 1, 100), transfer(4, USER, SETTLEMENT, 20, F.forced)) == (S.created, S.created)
    assert ledger.balance(USER).posted == FUNDED - 120


def test_pending_transfers_full_is_not_remembered() -> None:
    ledger = Ledger(holds_pending_max=2, ids_max=100)
    ledger.apply(Batch(1, accounts=ACCOUNTS))
    one(ledger, transfer(900, FUNDING, USER, FUNDED))
    assert apply(ledger, hold(1, 1), hold(2, 1), hold(3, 1)) == (S.created, S.created, S.pending_transfers_full)
    assert ledger.transfer_status(3) is None  # capacity, not a business answer
    assert one(ledger, void(4, 1)) is S.created
    assert one(ledger, hold(3, 1)) is S.created  # the retry with the same id succeeds


def test_account_statuses() -> None:
    ledger = Ledger(accounts_max=2, ids_max=10, holds_pending_max=5)
    kind = AccountKind.user_balance
    specs = (
        AccountSpec(1, "EUR", kind),
        AccountSpec(1, "EUR", kind),
        AccountSpec(1, "EUR", kind, user_data=5),
        AccountSpec(0, "EUR", kind),
        AccountSpec(-1, "EUR", kind),
        AccountSpec(ID_MAX + 1, "EUR", kind),
        AccountSpec(2, "eur", kind),
        AccountSpec(2, "EURO", kind),
        AccountSpec(2, "E1R", kind),
        AccountSpec(2, "EUR", 99),
        AccountSpec(2, "EUR", kind, 1 << 5),
        AccountSpec(2, "EUR", kind, AccountFlags(3)),
        AccountSpec(2, "USD", kind),
        AccountSpec(3, "USD", kind),
    )
    result = ledger.apply(Batch(1, accounts=specs))
    A = AccountStatus
    assert result.account_results == (
        A.created,
        A.exists,
        A.exists_with_different_fields,
        A.id_must_not_be_zero,
        A.id_must_not_be_negative,
        A.id_must_not_be_too_large,
        A.currency_invalid,
        A.currency_invalid,
        A.currency_invalid,
        A.kind_invalid,
        A.flags_unknown,
        A.flags_are_mutually_exclusive,
        A.created,
        A.accounts_full,
    )
    view = ledger.account(2)
    assert (view.currency, view.kind, view.flags, view.user_data) == ("USD", kind, AccountFlags.none, 0)
    assert ledger.account(3) is None and ledger.balance(3) is None
    ledger.check_invariants()


# -- the hold lifecycle ---------------------------------------------------------------------


def test_hold_counts_against_available_at_once(ledger: Ledger) -> None:
    assert one(ledger, hold(1, 300, code=7, reference="RRN1")) is S.created
    balance = ledger.balance(USER)
    assert (balance.posted, balance.debits_pending, balance.available) == (FUNDED, 300, FUNDED - 300)
    view = ledger.hold(1)
    assert (view.amount, view.remaining, view.state, view.code, view.reference) == (300, 300, HoldState.pending, 7, "RRN1")
    assert ledger.balance(SETTLEMENT).credits_pending == 300
    assert ledger.pending_count() == 1


def test_partial_and_repeated_posts_then_final_post_releases_the_rest(ledger: Ledger) -> None:
    one(ledger, hold(1, 500))
    assert one(ledger, post(2, 1, 100)) is S.created
    assert one(ledger, post(3, 1, 150)) is S.created
    view = ledger.hold(1)
    assert (view.posted, view.remaining, view.state) == (250, 250, HoldState.pending)
    assert ledger.balance(USER).available == FUNDED - 500
    assert one(ledger, post(4, 1, 50, F.final)) is S.created
    view = ledger.hold(1)
    assert (view.posted, view.released, view.remaining, view.state) == (300, 200, 0, HoldState.posted)
    balance = ledger.balance(USER)
    assert (balance.posted, balance.debits_pending, balance.available) == (FUNDED - 300, 0, FUNDED - 300)
    assert ledger.balance(SETTLEMENT).posted == 300 and ledger.pending_count() == 0
    assert one(ledger, post(5, 1, 1)) is S.pending_transfer_already_posted
    assert one(ledger, void(6, 1)) is S.pending_transfer_already_posted
    (last,) = ledger.history(USER, limit=1)
    assert (last.kind, last.amount, last.released, last.pending_id) == (HistoryKind.post, 50, 200, 1)


def test_post_of_zero_posts_all_that_remains(ledger: Ledger) -> None:
    one(ledger, hold(1, 500))
    one(ledger, post(2, 1, 200))
    assert one(ledger, post(3, 1)) is S.created
    view = ledger.hold(1)
    assert (view.posted, view.released, view.state) == (500, 0, HoldState.posted)


def test_posting_exactly_what_remains_resolves_without_final(ledger: Ledger) -> None:
    one(ledger, hold(1, 500))
    one(ledger, post(2, 1, 200))
    one(ledger, post(3, 1, 300))
    assert ledger.hold(1).state is HoldState.posted


def test_post_and_void_may_name_the_holds_accounts(ledger: Ledger) -> None:
    one(ledger, hold(1, 500))
    assert one(ledger, transfer(2, USER, SETTLEMENT, 100, F.post_pending, pending_id=1)) is S.created
    assert one(ledger, transfer(3, USER, 0, 100, F.void_pending, pending_id=1)) is S.created
    assert ledger.hold(1).remaining == 300


def test_partial_void_keeps_the_rest_held(ledger: Ledger) -> None:
    one(ledger, hold(1, 500))
    assert one(ledger, void(2, 1, 200)) is S.created  # partial reversal
    view = ledger.hold(1)
    assert (view.released, view.remaining, view.state) == (200, 300, HoldState.pending)
    assert ledger.balance(USER).available == FUNDED - 300
    assert one(ledger, post(3, 1)) is S.created
    view = ledger.hold(1)
    assert (view.posted, view.released, view.state) == (300, 200, HoldState.posted)


def test_void_of_zero_releases_all_and_final_void_resolves(ledger: Ledger) -> None:
    one(ledger, hold(1, 500))
    one(ledger, hold(2, 400))
    assert one(ledger, void(3, 1)) is S.created
    assert (ledger.hold(1).released, ledger.hold(1).state) == (500, HoldState.voided)
    assert one(ledger, void(4, 2, 100, F.final)) is S.created
    view = ledger.hold(2)
    assert (view.released, view.remaining, view.state) == (400, 0, HoldState.voided)
    assert ledger.balance(USER).available == FUNDED
    assert one(ledger, void(5, 2)) is S.pending_transfer_already_voided


def test_hold_lifecycle_transition_table_refuses_a_second_resolution(ledger: Ledger) -> None:
    from ledger.state import HOLD_TRANSITIONS, _next_state

    assert set(HOLD_TRANSITIONS) == {HoldState.pending}
    with pytest.raises(LedgerInvariantError, match="posted on void"):
        _next_state(HoldState.posted, HistoryKind.void)


# -- expiry ---------------------------------------------------------------------------------


def test_expiry_inside_a_later_batch_releases_in_deadline_order(ledger: Ledger) -> None:
    t0 = ledger.timestamp_ns + 1
    # Holds 3 and 2 share a deadline (ties by id); hold 1 expires first; hold 4 not yet.
    apply(ledger, hold(3, 10, timeout_s=20), hold(2, 20, timeout_s=20), hold(1, 30, timeout_s=10), hold(4, 40, timeout_s=60), ts=t0)
    assert ledger.hold(1).deadline_ns == t0 + 2 + 10 * 10**9
    one(ledger, post(5, 1, 5), ts=t0 + 5 * 10**9)  # partial post before expiry
    result = ledger.apply(
        Batch(t0 + 30 * 10**9, transfers=(post(6, 2), hold(7, 1), post(8, 4, 1)))
    )
    ledger.check_invariants()
    # Hold 3's deadline is t0 + 20 s, hold 2's is t0 + 1 ns + 20 s.
    assert result.expired == (1, 3, 2)
    assert result.transfer_results == (S.pending_transfer_expired, S.created, S.created)
    assert (ledger.hold(1).posted, ledger.hold(1).released, ledger.hold(1).state) == (5, 25, HoldState.expired)
    assert ledger.balance(USER).debits_pending == 40 - 1 + 1
    assert one(ledger, void(9, 1)) is S.pending_transfer_expired
    # Expiries take the first timestamps of the batch, transfers follow: history order is total.
    kinds = [(e.kind, e.transfer_id) for e in ledger.history(USER, limit=6)]
    assert kinds[:5] == [
        (HistoryKind.post, 8),
        (HistoryKind.hold, 7),
        (HistoryKind.expire, 2),
        (HistoryKind.expire, 3),
        (HistoryKind.expire, 1),
    ]


def test_expiry_at_exactly_the_deadline_and_not_before(ledger: Ledger) -> None:
    t0 = ledger.timestamp_ns + 1
    one(ledger, hold(1, 10, timeout_s=1), ts=t0)
    assert ledger.apply(Batch(t0 + 10**9 - 1)).expired == ()
    assert ledger.apply(Batch(t0 + 10**9)).expired == (1,)


def test_a_resolved_hold_does_not_expire(ledger: Ledger) -> None:
    one(ledger, hold(1, 10, timeout_s=1))
    one(ledger, post(2, 1))
    assert ledger.apply(Batch(ledger.timestamp_ns + 10 * 10**9)).expired == ()
    assert ledger.hold(1).state is HoldState.posted


# -- linked chains --------------------------------------------------------------------------


def test_failed_chain_leaves_state_exactly_as_before(ledger: Ledger) -> None:
    one(ledger, hold(1, 100, timeout_s=100))
    one(ledger, hold(2, 50))
    untouched = Ledger.from_snapshot(ledger.to_snapshot())
    clock = ledger.timestamp_ns
    L = F.linked
    chain = (
        transfer(10, USER, SETTLEMENT, 200, F.pending | L, timeout_s=10),  # a new hold
        transfer(11, 0, 0, 50, F.post_pending | L, pending_id=10),  # partial post of it
        transfer(12, 0, 0, 0, F.void_pending | L, pending_id=10),  # void the rest
        transfer(13, 0, 0, 30, F.post_pending | L, pending_id=1),  # partial post of an old hold
        transfer(14, 0, 0, 0, F.post_pending | L, pending_id=2),  # resolves an old hold
        transfer(15, USER, SETTLEMENT, 5, F.forced | L),
        transfer(16, FUNDING, CAPPED, 1),  # fails: exceeds_debits
    )
    results = apply(ledger, *chain)
    assert results == (S.linked_event_failed,) * 6 + (S.exceeds_debits,)
    assert ledger.timestamp_ns == clock + len(chain)  # time moved on, nothing else
    for transfer_id in range(10, 17):
        assert ledger.transfer_status(transfer_id) is None  # nothing of a failed chain is remembered
    assert ledger.hold(2).state is HoldState.pending and ledger.hold(1).remaining == 100
    untouched.apply(Batch(ledger.timestamp_ns))  # same clock, no change
    assert untouched.digest() == ledger.digest()
    # Retrying the corrected chain with the same ids works.
    fixed = chain[:-1] + (transfer(16, FUNDING, SETTLEMENT, 1),)
    assert apply(ledger, *fixed) == (S.created,) * 7
    assert ledger.hold(10).state is HoldState.voided and ledger.hold(2).state is HoldState.posted
    assert ledger.balance(USER).posted == FUNDED - 50 - 30 - 50 - 5


def test_failed_chain_is_undone_precisely() -> None:
    # Same chain against two ledgers, one where it fails at its end: states must be equal after
    # the failing one also applies an empty batch that moves its clock equally.
    def build() -> Ledger:
        ledger = Ledger()
        ledger.apply(Batch(10, accounts=ACCOUNTS))
        one(ledger, transfer(900, FUNDING, USER, FUNDED))
        one(ledger, hold(1, 100, timeout_s=50))
        return ledger

    chain = (
        post(20, 1, 10, F.linked),
        void(21, 1, 10, F.linked),
        post(22, 1, 0, F.linked),
        transfer(23, USER, SETTLEMENT, 1, F.linked | F.forced),
        transfer(24, USER, SETTLEMENT, 10**6),  # exceeds_credits
    )
    failed, untouched = build(), build()
    assert apply(failed, *chain)[-1] is S.exceeds_credits
    untouched.apply(Batch(failed.timestamp_ns))
    assert untouched.timestamp_ns == failed.timestamp_ns
    assert untouched.digest() == failed.digest()
    # And the expiry heap still works for the rolled-back hold.
    assert failed.apply(Batch(failed.timestamp_ns + 60 * 10**9)).expired == (1,)


def test_chain_left_open_fails_whole(ledger: Ledger) -> None:
    results = apply(ledger, transfer(10, FUNDING, USER, 1), transfer(11, FUNDING, USER, 1, F.linked), transfer(12, FUNDING, USER, 1, F.linked))
    assert results == (S.created, S.linked_event_chain_open, S.linked_event_chain_open)
    assert ledger.transfer_status(11) is None and ledger.balance(USER).posted == FUNDED + 1


def test_replay_of_a_created_chain_answers_exists(ledger: Ledger) -> None:
    chain = (transfer(10, USER, SETTLEMENT, 5, F.pending | F.linked), post(11, 10))
    assert apply(ledger, *chain) == (S.created, S.created)
    assert apply(ledger, *chain) == (S.exists, S.exists)
    assert ledger.balance(USER).posted == FUNDED - 5


def test_chain_member_replaying_a_remembered_failure_fails_the_chain(ledger: Ledger) -> None:
    assert one(ledger, transfer(10, USER, SETTLEMENT, 5_000)) is S.exceeds_credits
    results = apply(ledger, transfer(11, FUNDING, USER, 10_000, F.linked), transfer(10, USER, SETTLEMENT, 5_000))
    assert results == (S.linked_event_failed, S.exceeds_credits)


# -- forced transfers -----------------------------------------------------------------------


def test_forced_transfers_ignore_limits_and_are_marked(ledger: Ledger) -> None:
    # An advice the network approved in stand-in: hold past zero.
    assert one(ledger, transfer(10, USER, SETTLEMENT, 1_500, F.pending | F.forced)) is S.created
    assert ledger.balance(USER).available == -500
    assert ledger.hold(10).forced
    assert one(ledger, hold(11, 1)) is S.exceeds_credits  # unforced is still refused
    assert one(ledger, post(12, 10)) is S.created  # a post never needs forcing
    assert ledger.balance(USER).posted == -500
    assert one(ledger, transfer(13, FUNDING, CAPPED, 7, F.forced)) is S.created
    totals = ledger.totals()
    user = totals[("EUR", AccountKind.user_balance)]
    assert (user.forced_count, user.forced_amount) == (1, 1_500)
    assert totals[("EUR", AccountKind.settlement)].forced_count == 2
    assert totals[("EUR", AccountKind.funding)].forced_amount == 7
    (entry,) = [e for e in ledger.history(USER) if e.transfer_id == 10]
    assert entry.forced and entry.kind is HistoryKind.hold
    one(ledger, transfer(14, FUNDING, USER, 600))
    assert one(ledger, hold(15, 100)) is S.created  # back within the limit


def test_invariant_check_catches_a_limit_crossed_without_forcing(ledger: Ledger) -> None:
    ledger._accounts[USER].debits_posted += 5_000  # simulate a bug
    ledger._accounts[SETTLEMENT].credits_posted += 5_000
    ledger._accounts[USER].totals.debits_posted += 5_000
    ledger._accounts[SETTLEMENT].totals.credits_posted += 5_000
    with pytest.raises(LedgerInvariantError, match="limit flag crossed only by forced"):
        ledger.check_invariants()


def test_invariant_check_catches_unbalanced_and_hold_mismatch(ledger: Ledger) -> None:
    one(ledger, hold(1, 10))
    ledger._accounts[USER].debits_pending += 1
    ledger._accounts[USER].totals.debits_pending += 1
    with pytest.raises(LedgerInvariantError, match="debits_pending == credits_pending"):
        ledger.check_invariants()
    ledger._accounts[SETTLEMENT].credits_pending += 1
    ledger._accounts[SETTLEMENT].totals.credits_pending += 1
    with pytest.raises(LedgerInvariantError, match="remainders of the holds"):
        ledger.check_invariants()


# -- idempotency ----------------------------------------------------------------------------


def test_replays_answer_from_memory(ledger: Ledger) -> None:
    spec = hold(10, 100, reference="RRN")
    assert one(ledger, spec) is S.created
    assert one(ledger, spec) is S.exists
    assert one(ledger, hold(10, 100, reference="RRN")) is S.exists  # equal fields, other object
    assert one(ledger, hold(10, 101, reference="RRN")) is S.exists_with_different_fields
    assert one(ledger, hold(10, 100, reference="RRN", code=1)) is S.exists_with_different_fields
    assert ledger.balance(USER).debits_pending == 100
    assert apply(ledger, spec, spec) == (S.exists, S.exists)


def test_a_remembered_failure_is_answered_even_after_state_changed(ledger: Ledger) -> None:
    spec = transfer(10, USER, SETTLEMENT, 1_500)
    assert one(ledger, spec) is S.exceeds_credits
    one(ledger, transfer(11, FUNDING, USER, 1_000))
    assert one(ledger, spec) is S.exceeds_credits  # not created now that funds arrived
    assert ledger.transfer_status(10) is S.exceeds_credits
    assert one(ledger, transfer(10, USER, SETTLEMENT, 1_400)) is S.exists_with_different_fields
    assert one(ledger, post(20, 999)) is S.pending_transfer_not_found
    one(ledger, hold(999, 1))
    assert one(ledger, post(20, 999)) is S.pending_transfer_not_found


def test_spec_failures_are_not_remembered(ledger: Ledger) -> None:
    assert one(ledger, transfer(10, FUNDING, USER, 0)) is S.amount_must_not_be_zero
    assert ledger.transfer_status(10) is None
    assert one(ledger, transfer(10, FUNDING, USER, 5)) is S.created


def test_ids_in_a_batch_are_seen_by_later_transfers_of_the_batch(ledger: Ledger) -> None:
    results = apply(ledger, hold(10, 5), hold(10, 5), hold(10, 6), post(11, 10), post(11, 10))
    assert results == (S.created, S.exists, S.exists_with_different_fields, S.created, S.exists)


# -- id retention ---------------------------------------------------------------------------


def test_ids_age_out_after_24_hours_of_ledger_time(ledger: Ledger) -> None:
    start = ledger.timestamp_ns + 1
    one(ledger, transfer(10, FUNDING, USER, 5), ts=start)
    one(ledger, transfer(11, USER, SETTLEMENT, 10**6), ts=start + 1)  # remembered failure
    one(ledger, hold(12, 5), ts=start + 2)  # stays pending: never aged out
    one(ledger, hold(13, 5), ts=start + 3)
    one(ledger, post(14, 13), ts=start + HOUR_NS)  # resolves hold 13 an hour later
    ledger.apply(Batch(start + DAY_NS - 1))
    assert ledger.transfer_status(10) is S.created and ledger.transfer_status(11) is S.exceeds_credits
    ledger.apply(Batch(start + DAY_NS))
    assert ledger.transfer_status(10) is None
    assert ledger.transfer_status(11) is S.exceeds_credits  # 1 ns younger
    ledger.apply(Batch(start + DAY_NS + 10))
    assert ledger.transfer_status(11) is None
    assert ledger.transfer_status(12) is S.created and ledger.hold(12).state is HoldState.pending
    assert ledger.transfer_status(13) is S.created  # remembered 24 h from its resolution
    ledger.apply(Batch(start + HOUR_NS + DAY_NS))
    assert ledger.transfer_status(13) is None and ledger.hold(13) is None
    assert ledger.transfer_status(14) is None
    ledger.check_invariants()
    assert one(ledger, transfer(10, FUNDING, USER, 5)) is S.created  # the id is free again
    assert one(ledger, post(15, 12)) is S.created  # the old pending hold is still postable
    assert ledger.balance(USER).posted == FUNDED + 10 - 5 - 5


def test_ids_over_the_cap_evict_oldest_and_are_counted() -> None:
    ledger = Ledger(holds_pending_max=2, ids_max=5)
    ledger.apply(Batch(1, accounts=ACCOUNTS))
    apply(ledger, transfer(1, FUNDING, USER, 100), hold(2, 1), hold(3, 1))
    apply(ledger, *(transfer(i, FUNDING, USER, 1) for i in range(4, 9)))
    assert ledger.ids_count() == 5 and ledger.ids_evicted_count == 3
    assert [ledger.transfer_status(i) for i in range(1, 9)] == [None, S.created, S.created, None, None, S.created, S.created, S.created]
    ledger.check_invariants()
    assert Ledger.from_snapshot(ledger.to_snapshot()).ids_evicted_count == 3


# -- snapshots, digest, replay --------------------------------------------------------------


def test_snapshot_round_trip_preserves_digest_and_behaviour(ledger: Ledger) -> None:
    wide = 2**100 + 7
    ledger.apply(Batch(0, accounts=(AccountSpec(wide, "EUR", AccountKind.fee_income, user_data=-(2**70)),)))
    apply(
        ledger,
        hold(wide + 1, 100, timeout_s=30, reference="naïve €", code=2**65),
        transfer(wide + 2, USER, wide, 5, code=-(2**64)),
        transfer(11, 99, 2**90, 1),  # a remembered failure naming wide ids
        hold(12, 50),
        void(13, 12, 20),
        post(14, wide + 1, 30),
    )
    snapshot = ledger.to_snapshot()
    restored = Ledger.from_snapshot(snapshot)
    assert restored.digest() == ledger.digest()
    assert restored.to_snapshot() == snapshot
    assert restored.hold(wide + 1) == ledger.hold(wide + 1)
    assert restored.history(USER) == ledger.history(USER)
    assert restored.totals() == ledger.totals()
    assert restored.account(wide) == ledger.account(wide)
    # Both continue identically, including expiry and a replay of a remembered failure.
    batch = Batch(ledger.timestamp_ns + 31 * 10**9, transfers=(transfer(11, 99, 2**90, 1), post(15, 12), hold(wide + 1, 100)))
    assert restored.apply(batch) == ledger.apply(batch)
    assert restored.digest() == ledger.digest()
    assert one(ledger, transfer(16, FUNDING, USER, 1)) is S.created
    assert restored.digest() != ledger.digest()


def test_snapshot_of_a_fresh_ledger_and_garbage() -> None:
    fresh = Ledger(ids_max=10, holds_pending_max=3)
    restored = Ledger.from_snapshot(fresh.to_snapshot())
    assert restored.digest() == fresh.digest()
    assert restored.digest() != Ledger().digest()  # bounds are part of the state
    with pytest.raises(LedgerInvariantError):
        Ledger.from_snapshot(b"\x93\x01\x02\x03")


def test_replaying_batches_gives_the_same_digest(ledger: Ledger) -> None:
    batches = [
        Batch(5_000, accounts=ACCOUNTS, transfers=(transfer(900, FUNDING, USER, FUNDED),)),
        Batch(6_000, transfers=(hold(1, 100, timeout_s=2), hold(2, 7), post(3, 2, 3))),
        Batch(10**10, transfers=(void(4, 2),)),
        Batch(1, transfers=(transfer(5, USER, SETTLEMENT, 1, F.linked), transfer(6, 1, 1, 1))),
    ]
    first, second = Ledger(), Ledger()
    assert [first.apply(b) for b in batches] == [second.apply(b) for b in batches]
    assert first.digest() == second.digest()


def test_clock_is_monotonic_and_each_event_has_its_own_timestamp(ledger: Ledger) -> None:
    clock = ledger.timestamp_ns
    result = ledger.apply(Batch(5, transfers=(transfer(10, FUNDING, USER, 1), transfer(11, FUNDING, USER, 1))))
    assert result.timestamp_ns == clock + 1
    assert ledger.timestamp_ns == clock + 2
    assert [e.timestamp_ns for e in ledger.history(USER, limit=2)] == [clock + 2, clock + 1]
    assert ledger.apply(Batch(clock + 100)).timestamp_ns == clock + 100


# -- history --------------------------------------------------------------------------------


def test_history_pages_newest_first_and_is_bounded() -> None:
    ledger = Ledger(history_per_account_max=10, ids_max=100, holds_pending_max=5)
    ledger.apply(Batch(1, accounts=ACCOUNTS))
    for i in range(1, 26):
        one(ledger, transfer(i, FUNDING, USER, i, code=i, reference=f"r{i}"))
    page = ledger.history(USER, limit=4)
    assert [e.transfer_id for e in page] == [25, 24, 23, 22]
    assert all(e.side is Side.credit and e.counterparty_account_id == FUNDING for e in page)
    assert (page[0].amount, page[0].code, page[0].reference, page[0].kind) == (25, 25, "r25", HistoryKind.transfer)
    seen = []
    cursor = None
    for _ in range(10):  # bounded paging loop
        page = ledger.history(USER, before_timestamp_ns=cursor, limit=4)
        if not page:
            break
        seen += [e.transfer_id for e in page]
        cursor = page[-1].timestamp_ns
    assert seen == list(range(25, 15, -1))  # only the newest 10 are kept
    assert ledger.history(FUNDING, limit=1)[0].side is Side.debit
    assert ledger.history(99) == []
    with pytest.raises(ValueError):
        ledger.history(USER, limit=0)
    assert len(ledger._accounts[USER].history) <= 20  # trimmed amortized at twice the bound
    restored = Ledger.from_snapshot(ledger.to_snapshot())
    assert restored.history(USER, limit=10) == ledger.history(USER, limit=10)


def test_totals_and_queries(ledger: Ledger) -> None:
    one(ledger, hold(1, 100))
    totals = ledger.totals()
    user = totals[("EUR", AccountKind.user_balance)]
    assert (user.count, user.credits_posted, user.debits_pending) == (2, FUNDED, 100)
    assert totals[("USD", AccountKind.funding)].debits_posted == FUNDED
    assert ledger.account(USER).user_data == 77
    assert ledger.hold(900) is None and ledger.hold(12345) is None
    assert ledger.transfer_status(12345) is None
    assert ledger.account_count() == len(ACCOUNTS)


def test_digest_is_the_same_in_processes_with_different_hash_seeds() -> None:
    # The log is replayed by another process: nothing may depend on hash order.
    import os
    import subprocess
    import sys

    script = (
        "from tests.test_ledger_state import *\n"
        "l = Ledger()\n"
        "l.apply(Batch(1, accounts=ACCOUNTS))\n"
        "l.apply(Batch(2, transfers=(transfer(900, FUNDING, USER, FUNDED), hold(1, 10, reference='a', timeout_s=3),"
        " hold(2, 10, reference='b', timeout_s=3), post(3, 1, 4), transfer(4, 99, USER, 1))))\n"
        "l.apply(Batch(10**10))\n"
        "print(l.digest())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1 and len(digests.pop().strip()) == 64


def test_history_stays_bounded_under_linked_chains_only():
    """The hot path only ever submits linked chains: history must still be trimmed."""
    from ledger.state import HISTORY_PER_ACCOUNT_MAX, Ledger
    from ledger.types import AccountFlags, AccountKind, AccountSpec, Batch, TransferFlags, TransferSpec

    ledger = Ledger()
    ledger.apply(Batch(1, accounts=(
        AccountSpec(1, "EUR", AccountKind.funding),
        AccountSpec(2, "EUR", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits),
        AccountSpec(3, "EUR", AccountKind.settlement))))
    ledger.apply(Batch(2, transfers=(TransferSpec(10, 1, 2, 10**9),)))
    for i in range(HISTORY_PER_ACCOUNT_MAX * 3):
        ledger.apply(Batch(3 + i, transfers=(
            TransferSpec(100 + 2 * i, 2, 3, 1, flags=TransferFlags.pending | TransferFlags.linked),
            TransferSpec(101 + 2 * i, 2, 3, 1, flags=TransferFlags.pending))))
    assert len(ledger.history(2, limit=10**6)) <= HISTORY_PER_ACCOUNT_MAX
    ledger.check_invariants()


def test_flag_combinations_decode_to_the_members_the_enum_already_made() -> None:
    """msgspec decodes a combination through `_missing_`; the ledger's flags answer it from the enum's
    own table (a log replay spent ~10% of its time building them anew), with the same values."""
    import msgspec

    from ledger.types import AccountFlags, TransferFlags

    decoder = msgspec.msgpack.Decoder(list[TransferFlags])
    combination = TransferFlags.pending | TransferFlags.linked
    first, second = decoder.decode(msgspec.msgpack.encode([3, 3]))
    assert first is second is combination and first == 3
    assert TransferFlags(64) == 64 and TransferFlags(64) is TransferFlags(64)  # unknown bits kept
    assert msgspec.msgpack.decode(b"\x03", type=AccountFlags) == 3
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode("3"), type=TransferFlags)
