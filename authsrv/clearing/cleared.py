"""The `transaction.cleared` store event: what clearing tells the partner about a cleared authorization.

Issue 6 produces it, issue 5's outbox delivers it (authsrv/notify/calls.py `calls_of_event`): for an
external-balance partner as the documents' status update, `PUT {api_url}/transactions/{id}` with
status CLEARED ("Update transaction status": "if client mark transaction as cleared it means that
transaction will not be corrected by any other transaction request and requested amount is final");
for a partner subscribed to transaction notifications as `POST /notifications/transaction` whose
transaction object has status CLEARED (the notifier's allowed values are AUTHORIZED, CLEARED).

Because CLEARED means final, one event is written per authorization, by the record that resolves
its hold (exact, over, or the last record under the hold), carrying the total cleared over every
record that posted it; a `split` record (more follow in the file) writes none. The event is written
in the store transaction that marks the record `applied` (engine.py), so it exists exactly when the
record's ledger posting is durable, and a re-run, finding the record applied, writes nothing.

The `transaction.forced` event: a clearing record posted on an EXTERNAL-balance partner's card with
no open authorization to post (unmatched, or late: the hold had expired, was voided or posted in
full), or a refund record on such a card. The user's money lives at the partner, so nothing can
be taken from (or given to) a local user balance: the deposit collateral is force-posted here
(plan.py) and the partner is told with the documents' force calls, which it may not refuse:
`POST {api_url}/transactions/force-debit` (force-credit for a refund) carrying the event's
idempotency key. Its `transactionId` is new (no authorization named it) and derived from the
clearing record's identity, so the same record always names the same transaction. Written like
the cleared event, when the record's row becomes `applied`: once. A late record whose
authorization's hold had expired first reverses what the partner's own debit of that
authorization still holds (`reverse_first`): the expiry was never reported to the partner, so
without it the force-debit would charge the user twice. A hold voided (the partner got the
reversal) or posted (it got CLEARED) needs no such reversal.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from authsrv.uuids import uuid5_text
from ledger.types import AMOUNT_MAX

CLEARED_EVENT_KIND = "transaction.cleared"
CLEARED_STATUS = "CLEARED"
FORCED_EVENT_KIND = "transaction.forced"
# Fixed forever: a clearing record's forced transaction must keep its id across runs and restarts.
FORCED_NAMESPACE = uuid.UUID("3b0d5f62-8a41-4c7e-b2d9-6e15a0c4f873")

Amount = Annotated[int, Meta(ge=0, le=AMOUNT_MAX)]


class ClearedTransaction(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True, gc=False):
    """The event body (also kept in the record's plan row, so a resumed run writes the same)."""

    partner: str
    transaction_id: str  # the partner's transactionId: authsrv.hotpath.external.transaction_id(auth key)
    balance_id: int
    card_id: int
    amount: Amount  # cleared in total on the authorization, in `currency` (the billing currency)
    currency: str
    authorized_amount: Amount  # what the authorization held (billing currency)
    original_amount: Amount  # this record's amount in the transaction currency (clearing `amount`)
    original_currency: str
    status: str = CLEARED_STATUS
    record_id: str  # the clearing record that resolved the authorization
    outcome: str  # exact | over | partial (authsrv.clearing.plan.ClearingOutcome)
    processing_code: str  # the authorization's field 3 (the partner's transaction `type`)
    authorized_at_ns: int  # the authorization's journal timestamp: the transaction's `date`
    rrn: str
    mcc: str
    merchant_name: str
    pan_last4: str


class ForcedTransaction(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True, gc=False):
    """The `transaction.forced` event body (kept in the record's plan row like the cleared one)."""

    partner: str
    transaction_id: str  # forced_transaction_id(record identity): fresh, stable
    reference_transaction_id: str = ""  # a late record: the authorization it would have cleared
    direction: Literal["debit", "credit"]  # force-debit (purchase) or force-credit (refund)
    # A late record whose external authorization EXPIRED here: what the partner's own debit of it
    # still holds, reversed first (as for a stand-in approval: reversal, then force-debit).
    reverse_first: Amount = 0
    balance_id: int
    card_id: int
    amount: Amount  # the record's billing amount (balance currency)
    currency: str
    original_amount: Amount  # the record's amount in the transaction currency
    original_currency: str
    status: str = CLEARED_STATUS  # final, like a clearing: no later message changes it
    record_id: str
    outcome: str  # forced | late | refund (authsrv.clearing.plan.ClearingOutcome)
    # The timestamp the clearing batch was planned for: the transaction's `date`. On the running server
    # the batch applies at it or milliseconds later (planned in a worker, then applied: engine.py).
    posted_at_ns: int
    rrn: str
    mcc: str
    merchant_name: str
    pan_last4: str


cleared_decoder = msgspec.json.Decoder(ClearedTransaction)
forced_decoder = msgspec.json.Decoder(ForcedTransaction)


def forced_transaction_id(identity: str) -> str:
    """`transactionId` of a forced clearing posting: from the record's identity (records.py)."""
    assert identity
    return uuid5_text(FORCED_NAMESPACE, identity)


def event_kind(event: ClearedTransaction | ForcedTransaction) -> str:
    return CLEARED_EVENT_KIND if isinstance(event, ClearedTransaction) else FORCED_EVENT_KIND
