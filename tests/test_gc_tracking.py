"""What the server's periodic `gc.collect()` + `gc.freeze()` walks (authsrv/app.py,
`_collect_young`): only objects made since the last freeze. These tests pin the choices that keep that set small
(docs/benchmarks.md, section 6, "Fewer objects for the collector"): the big long-lived indexes stay
frozen however they change, and the ledger's per-transfer objects are never tracked at all."""

from __future__ import annotations

import contextlib
import gc

from authsrv.hotpath.journal import AuthJournal, AuthRecord
from ledger import AccountFlags, AccountKind, AccountSpec, Batch, Ledger, TransferFlags, TransferSpec
from ledger.tracked import TrackedDict

USER, FUNDING, SETTLEMENT = 1, 2, 3


@contextlib.contextmanager
def frozen():
    """What `_collect_young` does every GC_FREEZE_INTERVAL_S, undone afterwards (frozen objects are never collected)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def young() -> set[int]:
    """Ids of the objects the next collection would walk."""
    return {id(found) for found in gc.get_objects()}


def approval(n: int) -> AuthRecord:
    return AuthRecord(key=f"0100|k{n}", original_key=f"0100|o{n}", timestamp_ns=n, mti="0100",
                      processing_code="000000", outcome=0, response_code="00", auth_code=f"A{n:05d}", card_id=1,
                      rrn=f"R{n}", amount=100, currency="EUR", user_hold_id=10_000 + n)


def test_a_plain_dict_of_atomic_values_comes_back_young_at_the_next_insert():
    """The CPython behaviour TrackedDict exists for: without it each insert of a new tuple makes the
    whole index young again, so every periodic collection walked all of it."""
    plain = {f"R{n}": (n,) for n in range(1_000)}
    pinned = TrackedDict(plain)
    with frozen():
        assert not gc.is_tracked(plain)  # untracked by the collection: only strs and int tuples inside
        assert gc.is_tracked(pinned)
        fresh = (len(plain),) + (1,)  # made at run time, as `_bucket_add` does: tracked until a collection
        assert gc.is_tracked(fresh)
        plain["R-new"] = pinned["R-new"] = fresh
        walked = young()
        assert id(plain) in walked
        assert id(pinned) not in walked


def test_the_journals_rrn_indexes_stay_frozen_as_approvals_arrive():
    journal = AuthJournal(hold_open=lambda hold_id: True)
    for n in range(2_000):
        journal.add(approval(n))
    with frozen():
        journal.add(approval(5_000))
        journal.close_holds([10_000 + 1])
        walked = young()
    assert journal.open_authorizations("R5000") and journal.closed_authorizations("R1")
    assert id(journal._open_by_rrn) not in walked
    assert id(journal._closed_by_rrn) not in walked


def test_ledger_records_holds_and_specs_are_never_tracked():
    ledger = Ledger()
    ledger.apply(Batch(1_000, accounts=(
        AccountSpec(USER, "EUR", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits),
        AccountSpec(FUNDING, "EUR", AccountKind.funding), AccountSpec(SETTLEMENT, "EUR", AccountKind.settlement))))
    ledger.apply(Batch(2_000, transfers=(TransferSpec(1, FUNDING, USER, 10_000),)))
    ledger.apply(Batch(3_000, transfers=(TransferSpec(2, USER, SETTLEMENT, 100, TransferFlags.pending, timeout_s=60),)))
    hold = ledger._pending[2]
    record = ledger._ids[1]
    for found in (hold, record, hold.spec, record.spec, ledger.hold(2), ledger.balance(USER)):
        assert not gc.is_tracked(found), type(found).__name__
    assert hold.debit.id == USER and hold.state.name == "pending"  # still the live, mutable hold
    hold_before = hold.released
    ledger.apply(Batch(4_000, transfers=(TransferSpec(3, 0, 0, 0, TransferFlags.void_pending, pending_id=2),)))
    assert hold.released == hold_before + 100
    ledger.check_invariants()


def test_the_deadline_index_holds_only_pending_holds_and_never_needs_a_compaction():
    """A heap with stale entries needed an O(heap) compaction on the loop: 150 ms at 300k pending
    holds, every ~100 s while clearing posted them. Resolved holds leave the index at once."""
    ledger = Ledger()
    ledger.apply(Batch(1_000, accounts=(
        AccountSpec(USER, "EUR", AccountKind.user_balance, AccountFlags.debits_must_not_exceed_credits),
        AccountSpec(FUNDING, "EUR", AccountKind.funding), AccountSpec(SETTLEMENT, "EUR", AccountKind.settlement))))
    ledger.apply(Batch(2_000, transfers=(TransferSpec(1, FUNDING, USER, 10**9),)))
    holds = tuple(TransferSpec(100 + n, USER, SETTLEMENT, 10, TransferFlags.pending, timeout_s=60 + n % 7)
                  for n in range(300))
    ledger.apply(Batch(3_000, transfers=holds))
    assert len(ledger._deadlines) == 300
    voids = tuple(TransferSpec(1_000 + n, 0, 0, 0, TransferFlags.void_pending, pending_id=100 + n)
                  for n in range(0, 300, 2))
    ledger.apply(Batch(4_000, transfers=voids))
    assert list(ledger._deadlines) == sorted((ledger._pending[i].deadline_ns, i) for i in ledger._pending)
    assert len(ledger._deadlines) == 150
    ledger.check_invariants()
    # expiry takes them in deadline order, ties by id
    expired = ledger.apply(Batch(3_000 + 10**12, transfers=())).expired
    assert list(expired) == [i for _, i in sorted((h.spec.timeout_s, h.spec.id) for h in
                                                  (ledger._ids[i] for i in range(101, 400, 2)))]
    assert len(expired) == 150 and ledger.pending_count() == 0 and len(ledger._deadlines) == 0
