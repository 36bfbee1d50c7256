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
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from ledger.types import AMOUNT_MAX

CLEARED_EVENT_KIND = "transaction.cleared"
CLEARED_STATUS = "CLEARED"

Amount = Annotated[int, Meta(ge=0, le=AMOUNT_MAX)]


class ClearedTransaction(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
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


cleared_decoder = msgspec.json.Decoder(ClearedTransaction)


def event_body(cleared: ClearedTransaction) -> dict:
    """The mapping `Store.append_event` stores as JSON."""
    return msgspec.to_builtins(cleared)
