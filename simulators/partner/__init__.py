"""The partner simulator: the partner side of the reference documents' "Your APIs for us".

A trio HTTP/1.1 server (anycorn + Starlette) that a `[partners.NAME]` table's `api_url` points at.
It answers, as the documents describe:

    GET    /public-key                          {"publicKey": base64(PEM)} of its RSA key
    POST   /notifications/otp                   {"payload": JWE} (RSA-OAEP-256/RSA-OAEP, A256GCM): 204
    POST   /notifications/verificationInProgress | verificationAccepted | verificationRejected: 204
    POST   /notifications/transaction           204
    POST   /users/{id}/balances                 link {"balanceId", "currency"}: 204
    GET    /users/{id}/balances[/{balanceId}]   {"currency", "amount"} (or a list with "id")
    DELETE /users/{id}/balances/{balanceId}     204 (422 BALANCE_NOT_EMPTY unless the amount is 0)
    POST   /transactions/debit                  204 | 422 INSUFFICIENT_FUNDS | LIMITS_EXCEEDED |
                                                FRAUDS_DETECTED | 404 BALANCE_NOT_FOUND
    POST   /transactions/credit                 204 | 422 FRAUDS_DETECTED | 404 BALANCE_NOT_FOUND
    POST   /transactions/force-debit | force-credit    204 (404 only for an unknown balance)
    POST   /transactions/reversal               204, always (gives back what the original moved)
    PUT    /transactions/{id}                   204 | 404 TRANSACTION_NOT_FOUND (records status, amount)

Errors are `{"title", "detail"}`. Money rules: `state.py`. Bodies are decoded strictly (`wire.py`):
an unknown or misspelt field is 400 INVALID_PAYLOAD.

Idempotency: `X-Idempotency-Key` is required on every POST under /transactions and /notifications
(400 IDEMPOTENCY_KEY_REQUIRED; `--no-key-required` turns that off) and honoured on every call that
changes something. A replay of a known key returns exactly the cached status and body, moves no
money and is not recorded again (it is counted in `replays`); the same key with a different request
(method, path or plaintext body) is 409 IDEMPOTENCY_KEY_REUSED, except a force-debit (force-credit)
carrying the key and the body of an earlier debit (credit): that is the issuer reconciling a
stand-in, and it gets the debit's cached answer (the money moved once). The cache is an LRU of 1,000,000
keys. Only processed calls are cached: a 4xx refused before processing, a 503 of down mode and an
injected 5xx are not, so a retry is processed.

Test knobs (flags at start, `POST /_sim/mode` at run time):
- latency: fixed (`--latency-ms`), or lognormal with a median and a p99 (`--latency-median-ms`,
  `--latency-p99-ms`); every partner call sleeps a draw before it is handled.
- faults, drawn per call after the latency (seeded with `--seed`):
  `--fail-5xx P`: answer 500 INTERNAL_ERROR, change nothing;
  `--timeout-rate P`: apply the call, then answer only after `--timeout-ms` (a late answer);
  `--drop-rate P`: apply the call, then close the connection mid-answer (a network error).
- forced 422s, on debit (and FRAUDS_DETECTED also on credit; never on force-*/reversal):
  by user (`--force-user USER=INSUFFICIENT_FUNDS`, the balance's owner), or by amount ending
  (amount % 100), on unless `--no-amount-codes`: 51 -> INSUFFICIENT_FUNDS, 61 -> LIMITS_EXCEEDED,
  59 -> FRAUDS_DETECTED (the field 39 codes authsrv maps them to).
- down mode: 503 SERVICE_UNAVAILABLE to every call except /_sim.

Control API, plain JSON, loopback clients only (the listener binds 127.0.0.1):
    GET  /_sim/received?kind=K&key=KEY&limit=N   processed calls, oldest first (kind is a prefix:
                                                 "verification" matches the three kinds)
    GET  /_sim/balances?user=U&limit=N
    PUT  /_sim/balances/{user}/{balance}         {"amount": N, "currency"?}: set (link if new)
    GET  /_sim/mode, POST /_sim/mode             {"down", "latencyMs", "latencyMedianMs",
                                                 "latencyP99Ms", "fail5xx", "timeoutRate", "timeoutMs",
                                                 "dropRate", "amountCodes", "forcedUsers": {user: code|null}}
    GET  /_sim/stats                             counts per endpoint kind, replays, cache size
    POST /_sim/reset                             forget received calls and stats (not money, not keys)

Recorded with each call: the X-Idempotency-Key, the raw `X-Authsrv-Signature` and
`X-Authsrv-Timestamp` headers (verifying them is the tests' job), the bytes on the wire, the
plaintext, the answer and the client certificate's subject. At most 100,000 records (oldest go).

TLS: `--tls-cert/--tls-key` serve HTTPS; with `--client-ca` a client certificate signed by that CA
is required (the documents' Security section). Plain HTTP otherwise.

Command line: `python -m simulators.partner --help`. In-process:

    async with trio.open_nursery() as nursery:
        sim = await nursery.start(serve_partner, PartnerSimSettings(latency=Latency.fixed(5)))
        ...  # sim.url, sim.port, sim.state
        sim.stop()
"""

from simulators.partner.app import build_partner_app as build_partner_app
from simulators.partner.jwe import SimKey as SimKey
from simulators.partner.server import PartnerSim as PartnerSim
from simulators.partner.server import PartnerSimSettings as PartnerSimSettings
from simulators.partner.server import running_partner as running_partner
from simulators.partner.server import serve_partner as serve_partner
from simulators.partner.state import AMOUNT_CODES as AMOUNT_CODES
from simulators.partner.state import Latency as Latency
from simulators.partner.state import Mode as Mode
from simulators.partner.state import PartnerState as PartnerState
from simulators.partner.state import Received as Received
from simulators.partner.wire import Kind as Kind
from simulators.partner.wire import Title as Title
