"""The partner outbox: every call that must reach a partner after a decision, delivered at least once
with a fixed X-Idempotency-Key (docs/contract.md, partner settings; reference documents, "Your APIs for us").

Two durable sources, and no new write on the authorization hot path:
1. the store's `events` table (management events, committed with their change): KYC decisions
   become verification notifications, `partner_balance.low` a partner-balance notification;
2. the write-ahead log's AuthRecords (each decision, committed with its ledger change): transaction
   notifications, and for external-balance partners force-debit/force-credit, reversals.
Plus OTP challenges, whose delivery row is written in the challenge's own store transaction.

`calls.py` turns a source item into `PartnerCall`s (pure), `outbox.py` keeps them in the store's
`deliveries` table (pending / delivered / dead, tries, next attempt, the key, per-source cursors),
`worker.py` schedules and delivers, `partner_http.py` talks HTTP and signs (`signing.py`), `otp.py`
holds 3DS challenges. Admin: `authsrv/rest/outbox_api.py`; 3DS: `authsrv/rest/otp_api.py`.

Crash windows (each safe: at-least-once, the same key every time):
- A record is in the log but its delivery row is not written yet. The journal listener only queues
  it in memory; rows are written after `wait_durable`, with the `log` cursor (newest record time)
  in the same commit. At start, the journal (snapshot + log replay: it holds 24 h of records) is
  scanned from the cursor less a skew margin (records reach the journal up to one ISO budget after
  their timestamp); their keys are derived from the record, so rows already written are ignored
  (INSERT OR IGNORE on the unique key). A snapshot that trims the log does not lose them: the
  snapshot carries the journal.
- An event is committed but not scheduled: the `events` cursor moves in the commit that writes its
  rows, so a restart reads it again; the event's key was fixed when the event was written.
- A try reached the partner but its result was not written: the row is still pending and is sent
  again with the same key and body; the partner answers from its idempotency cache.
- A result batch fails to commit: the rows stay pending and are tried again (same key).
- A record that stays `in_flight` (the hot path was waiting for the partner) is final only after a
  crash: the start-up scan treats it as timed out and declined, so a reversal is sent.
Delivered rows are pruned once no source can schedule their key again (journal retention + 24 h).

Known limits: wall-clock steps backwards larger than the skew margin can hide records from the
start-up scan (the live path is unaffected); a server down for longer than the journal's retention
right after a crash loses the unscheduled records of those few milliseconds.
"""
