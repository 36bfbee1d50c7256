"""The partner's external balance in the hot path (reference documents, "External Balance API";
docs/contract.md, partner settings and wire profile: `balance_mode = "external"`, the latency
budget and the stand-in policy).

For a card whose partner holds the user balances, the decision needs the partner:

    0100/0200 debit   hold the partner's DEPOSIT collateral here (one log record, marked in flight),
                      then POST {api_url}/transactions/debit within what is left of the budget
                      (minus COMMIT_MARGIN_MS for our own commit); at most one fast retry on a
                      connection error while time remains.
                        204 -> approve (0100 keeps the hold; 0200 posts it)
                        422 INSUFFICIENT_FUNDS 51, LIMITS_EXCEEDED 61, FRAUDS_DETECTED 59,
                        404 BALANCE_NOT_FOUND 14 -> void the hold and record, in one log record
                        no answer in time, 5xx, no connection -> the stand-in policy
    credits 20/28     POST {api_url}/transactions/credit (nothing is held here)
    inquiry 30        GET {api_url}/users/{id}/balances/{balanceId} within the budget, else 91
    advices 0120/0220 never call: hold/post the collateral forced, record `external = deferred`
                      (the outbox sends force-debit / force-credit)

Stand-in (`[partners.NAME] stand_in`): "decline" answers 91 and voids the hold; the record says
`external = timed_out|failed` so the outbox reverses a debit the partner may have applied late.
"approve" approves up to `stand_in_max_amount` per transaction and `stand_in_daily_max` per card
and UTC day, keeps the hold and marks the record `stand_in` (the outbox sends the force-debit).

The switch (pipeline.py) runs `prepare` synchronously like every participant; a prepare that needs
the partner returns `Vote.deferred`, and the connection (iso/server.py) awaits `decide` in its own
nursery, then the switch answers. Ledger work stays on the trio thread, between awaits.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs
import httpx
import msgspec
import trio
from prometheus_client import Counter, Histogram

from authsrv.hotpath.context import ADVICES, CREDITS, DEBITS, INQUIRIES, AuthContext, External, Kind, Vote
from authsrv.hotpath.journal import AuthJournal, AuthRecord, encode_record
from authsrv.hotpath.outcome import Outcome, is_approval
from authsrv.hotpath.steps import TransferCode, TransferIds, auth_code_for
from authsrv.iso.currency import alpha_to_numeric
from authsrv.iso.fields import build_field54
from authsrv.metrics import bounded
from authsrv.uuids import uuid5_text
from ledger.types import Batch, TransferFlags, TransferSpec, TransferStatus

log = logging.getLogger("authsrv.external")

PARTNER_CONNECTIONS_MAX = 64  # per partner: keep-alive pool; more calls wait for a free connection
KEEPALIVE_EXPIRY_S = 20.0  # below the partner simulator's 30 s keep-alive: we close first
COMMIT_MARGIN_MS = 20  # kept from the budget for the durable commit after the partner answers
RETRY_TIME_MIN_MS = 5  # a retry after a connection error needs at least this much time left
LINK_TIMEOUT_S = 3.0  # linking a balance (REST, not the hot path)
ERROR_BODY_BYTES_MAX = 4096
STAND_IN_CARDS_MAX = 1_000_000  # cards with a stand-in approval today; past it stand-in declines
DESCRIPTION_CHARS_MAX = 64
DAY_NS = 86_400 * 10**9
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Fixed forever: idempotency keys and transaction ids must be the same after a restart.
KEY_NAMESPACE = uuid.UUID("0d7c6c1e-5f0a-4c59-9a3e-4c1b8e2f6a10")
TRANSACTION_NAMESPACE = uuid.UUID("6a2f9b7e-1c3d-4e8f-a0b1-2c3d4e5f6071")

_FAILURES_FUNDS = frozenset({TransferStatus.exceeds_credits, TransferStatus.exceeds_debits})
_HOLD = TransferFlags.pending
_VOID = TransferFlags.void_pending
_POST = TransferFlags.post_pending
_ADVICE_FLAGS = {Kind.advice_hold: TransferFlags.pending | TransferFlags.forced, Kind.advice_post: TransferFlags.forced}
# Partner error title -> our outcome (reference documents, "Debit transaction" / "Credit transaction").
DECLINES = {
    (422, "INSUFFICIENT_FUNDS"): Outcome.insufficient_funds,  # 51
    (422, "LIMITS_EXCEEDED"): Outcome.amount_limit_exceeded,  # 61
    (422, "FRAUDS_DETECTED"): Outcome.card_suspected_fraud,  # 59
    (404, "BALANCE_NOT_FOUND"): Outcome.card_not_found,  # 14
}
# POS entry mode (field 22, first two digits) -> the documents' captureMode.
CAPTURE_MODES = {"01": "manual", "02": "magstripe", "05": "emv", "07": "nfc", "81": "ecommerce", "90": "magstripe",
                 "91": "nfc", "10": "ecommerce"}


def idempotency_key(duplicate_key: str) -> str:
    """X-Idempotency-Key of the hot-path call for a request: the same for every retry and restart."""
    return uuid5_text(KEY_NAMESPACE, duplicate_key)


def transaction_id(duplicate_key: str) -> str:
    """`transactionId` of the transaction object (a reversal names the original's as its reference)."""
    return uuid5_text(TRANSACTION_NAMESPACE, duplicate_key)


def is_external(ctx: AuthContext) -> bool:
    partner = ctx.partner
    return partner is not None and partner.balance_mode == "external"


# -- the wire: the documents' transaction object ----------------------------------------------------


class TransactionData(msgspec.Struct, rename="camel", omit_defaults=True, frozen=True, kw_only=True):
    mcc: str | None = None
    merchant_identifier: str | None = None
    merchant_name: str | None = None
    capture_mode: str | None = None
    last_four_digits: str | None = None
    acquirer_country: str | None = None


class PartnerTransaction(msgspec.Struct, rename="camel", omit_defaults=True, frozen=True, kw_only=True):
    """The "Transaction object" (reference documents, External Balance)."""

    balance_id: str
    resource_id: str
    resource: str
    transaction_id: str
    reference_transaction_id: str | None = None
    type: str
    amount: int
    currency: str
    original_amount: int | None = None
    original_currency: str | None = None
    status: str
    description: str
    date: str
    transaction_data: TransactionData | None = None


class PartnerProblem(msgspec.Struct, frozen=True):
    title: str = ""
    detail: str = ""


class PartnerBalance(msgspec.Struct, frozen=True):
    currency: str
    amount: int


_encoder = msgspec.json.Encoder()
_problem_decoder = msgspec.json.Decoder(PartnerProblem)
_balance_decoder = msgspec.json.Decoder(PartnerBalance)


def transaction_type(processing: str) -> str:
    """Processing code -> the documents' `type` (their list of allowed values)."""
    return {"01": "ATM", "09": "Cashback at POS", "28": "payment"}.get(processing, "POS")


def utc_iso(now_ns: int) -> str:
    return datetime.datetime.fromtimestamp(now_ns / 1e9, datetime.UTC).isoformat(timespec="seconds")


def transaction_body(ctx: AuthContext) -> bytes:
    request, card = ctx.request, ctx.card
    name = (request.merchant_name_location or "")[:-2].strip() or "card transaction"
    data = TransactionData(
        mcc=request.mcc, merchant_identifier=(request.merchant_id or "").strip() or None,
        merchant_name=name[:DESCRIPTION_CHARS_MAX],
        capture_mode=CAPTURE_MODES.get((request.pos_entry_mode or "")[:2]),
        last_four_digits=card.pan_last4, acquirer_country=request.country or None,
    )
    converted = request.currency != ctx.currency or request.amount != ctx.amount
    body = PartnerTransaction(
        balance_id=str(card.balance_id), resource_id=str(card.card_id), resource="card",
        transaction_id=transaction_id(ctx.key), type=transaction_type(ctx.processing), amount=ctx.amount,
        currency=ctx.currency, original_amount=request.amount if converted else None,
        original_currency=request.currency if converted else None, status="AUTHORIZED",
        description=name[:DESCRIPTION_CHARS_MAX], date=utc_iso(ctx.now_ns), transaction_data=data,
    )
    return _encoder.encode(body)


# -- HTTP: one long-lived pool per partner -----------------------------------------------------------


class CallResult(msgspec.Struct, frozen=True):
    """One hot-path call: the state it leaves (approved, declined, timed_out, failed), the
    HTTP status and error title when there was an answer, the body of a 200, and the tries."""

    state: External
    status: int = 0
    title: str = ""
    body: bytes = b""
    tries: int = 0


def partner_ssl(name: str, partner, data_dir: Path | None) -> ssl.SSLContext | bool:
    """https partners: trust the partner's CA (`ca_file`, "" = the development CA) and present
    authsrv's client certificate (`DIR/pki/authsrv-client.crt`, created here when missing).
    Raises authsrv.pki.PkiError naming the partner when its CA file cannot be used."""
    if not partner.api_url.startswith("https:"):
        return True
    if data_dir is None:
        return True  # no data directory (a bare Switch in a test): the system's trust store
    from authsrv import pki

    return pki.partner_client_ssl_context(data_dir, name, partner.ca_file)


def new_client(api_url: str, verify: ssl.SSLContext | bool) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=PARTNER_CONNECTIONS_MAX, max_keepalive_connections=PARTNER_CONNECTIONS_MAX,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    # The budget is enforced with trio cancel scopes around each call; httpx's own timeout only
    # bounds a call made outside one. A call cut off at its deadline closes its connection (httpcore
    # cannot reuse one whose answer was not read). Reading late answers in a background nursery
    # instead was measured (issue 5 follow-up): no gain on plain HTTP, so not done; see the report.
    return httpx.AsyncClient(base_url=api_url.rstrip("/"), http2=False, limits=limits, verify=verify,
                             timeout=httpx.Timeout(LINK_TIMEOUT_S), trust_env=False)


_CONNECTION_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


async def call_partner(client: httpx.AsyncClient, method: str, path: str, body: bytes | None, key: str | None,
                       deadline_ns: int) -> CallResult:
    """One call, cut short at `deadline_ns` (perf_counter_ns); one retry after a connection error
    (the peer went away, or never answered) while at least RETRY_TIME_MIN_MS remain."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if key is not None:
        headers["X-Idempotency-Key"] = key
    tries = 0
    while tries < 2:
        tries += 1
        left_s = (deadline_ns - time.perf_counter_ns()) / 1e9
        if left_s <= 0:
            return CallResult(External.timed_out, tries=tries - 1)
        with trio.move_on_after(left_s):
            try:
                reply = await client.request(method, path, content=body, headers=headers)
            except _CONNECTION_ERRORS as error:
                log.info("partner %s %s: %s (try %d)", method, path, type(error).__name__, tries)
                if (deadline_ns - time.perf_counter_ns()) / 1e6 >= RETRY_TIME_MIN_MS:
                    continue
                return CallResult(External.failed, tries=tries)
            except httpx.HTTPError as error:
                log.warning("partner %s %s failed: %s", method, path, type(error).__name__)
                return CallResult(External.failed, tries=tries)
            return _result(reply, tries)
        return CallResult(External.timed_out, tries=tries)
    return CallResult(External.failed, tries=tries)


def _result(reply: httpx.Response, tries: int) -> CallResult:
    status = reply.status_code
    if 200 <= status < 300:
        return CallResult(External.approved, status=status, body=reply.content[:ERROR_BODY_BYTES_MAX], tries=tries)
    if status >= 500:
        return CallResult(External.failed, status=status, tries=tries)
    try:
        title = _problem_decoder.decode(reply.content[:ERROR_BODY_BYTES_MAX]).title
    except msgspec.DecodeError:
        title = ""
    return CallResult(External.declined, status=status, title=title, tries=tries)


class LinkResult(msgspec.Struct, frozen=True):
    ok: bool
    reason: str = ""  # why not, without card data


def link_balance(partner, pki_dir: Path | None, user_id: int, balance_id: int, currency: str) -> LinkResult:
    """`POST {api_url}/users/{id}/balances` (documents, "Link balance"); synchronous: the REST
    balance creation calls it from its store thread inside the transaction that creates the
    balance, so a refused or failed link leaves nothing created."""
    if not partner.api_url:
        return LinkResult(False, "the partner has no api_url")
    verify = partner_ssl(partner.api_url, partner, pki_dir.parent if pki_dir is not None else None)
    body = _encoder.encode({"balanceId": str(balance_id), "currency": currency})
    try:
        with httpx.Client(base_url=partner.api_url.rstrip("/"), verify=verify, timeout=LINK_TIMEOUT_S,
                          trust_env=False) as client:
            reply = client.post(f"/users/{user_id}/balances", content=body,
                                headers={"Content-Type": "application/json", "Accept": "application/json"})
    except httpx.HTTPError as error:
        return LinkResult(False, f"{type(error).__name__} calling the partner")
    if reply.status_code == 204 or 200 <= reply.status_code < 300:
        return LinkResult(True)
    try:
        title = _problem_decoder.decode(reply.content[:ERROR_BODY_BYTES_MAX]).title
    except msgspec.DecodeError:
        title = ""
    return LinkResult(False, f"partner answered {reply.status_code} {title}".strip())


# -- stand-in ---------------------------------------------------------------------------------------


class StandInWindow:
    """Stand-in approvals per card in the current UTC day (in memory; rebuilt from the journal)."""

    def __init__(self, cards_max: int = STAND_IN_CARDS_MAX) -> None:
        assert cards_max > 0
        self._cards_max = cards_max
        self._day = -1
        self._used: dict[int, int] = {}

    def used(self, card_id: int, now_ns: int) -> int:
        self._roll(now_ns)
        return self._used.get(card_id, 0)

    def allows(self, card_id: int, amount: int, now_ns: int, amount_max: int, daily_max: int) -> bool:
        self._roll(now_ns)
        if amount > amount_max or self._used.get(card_id, 0) + amount > daily_max:
            return False
        return card_id in self._used or len(self._used) < self._cards_max

    def add(self, card_id: int, amount: int, now_ns: int) -> None:
        self._roll(now_ns)
        assert amount > 0 and (card_id in self._used or len(self._used) < self._cards_max)
        self._used[card_id] = self._used.get(card_id, 0) + amount

    def rebuild(self, records: Iterable[AuthRecord], now_ns: int) -> int:
        """Count today's stand-in approvals of external debits again (after a restart)."""
        self._roll(now_ns)
        counted = 0
        for record in records:
            if not record.stand_in or record.external not in (External.timed_out, External.failed):
                continue
            if record.timestamp_ns // DAY_NS != self._day or not is_approval(Outcome(record.outcome)):
                continue
            if record.processing_code[:2] not in DEBITS or record.reverses or record.amount <= 0:
                continue
            if record.card_id in self._used or len(self._used) < self._cards_max:
                self._used[record.card_id] = self._used.get(record.card_id, 0) + record.amount
                counted += 1
        return counted

    def _roll(self, now_ns: int) -> None:
        day = now_ns // DAY_NS
        if day != self._day:
            self._day = day
            self._used.clear()


# -- metrics ----------------------------------------------------------------------------------------


_EXTERNAL_METRICS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # registry -> ExternalMetrics


class ExternalMetrics:
    """Label values: `partner` is one of the configured partners (else OTHER), `result` an External
    state name, `decision` approve or decline: fixed sets, whatever a partner answers."""

    @classmethod
    def of(cls, registry, partners: Iterable[str] = ()) -> ExternalMetrics:
        """The one of `registry`: a cluster node that becomes primary again in the same process builds
        a new Switch, and the registry refuses a second registration of these families."""
        found = _EXTERNAL_METRICS.get(registry)
        if found is None:
            found = _EXTERNAL_METRICS[registry] = cls(registry, partners)
        elif found._partners != frozenset(partners):
            found._partners = frozenset(partners)
            found._children.clear()
        return found

    def __init__(self, registry, partners: Iterable[str] = ()) -> None:
        self._partners = frozenset(partners)
        self.seconds = Histogram("authsrv_external_call_seconds", "Hot-path calls to a partner's external balance",
                                 ["partner"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.calls = Counter("authsrv_external_calls", "Hot-path partner calls by result", ["partner", "result"],
                             registry=registry)
        self.stand_in = Counter("authsrv_stand_in", "Stand-in decisions for external balances",
                                ["partner", "decision"], registry=registry)
        self._children: dict[tuple, object] = {}  # partners x results: small; labels() takes a lock

    def child(self, metric, partner: str, *labels: str):
        """`metric.labels(partner, *labels)`, looked up once per label set instead of once per call."""
        key = (id(metric), partner, *labels)
        found = self._children.get(key)
        if found is None:
            key = (id(metric), bounded(partner, self._partners), *labels)  # cached by label values only
            found = self._children.get(key)
            if found is None:
                found = self._children[key] = metric.labels(*key[1:])
        return found


# -- the participant --------------------------------------------------------------------------------


@attrs.define(slots=True)
class Pending:
    """Calls under way, by duplicate key: a duplicate waits for the original's answer."""

    done: trio.Event = attrs.Factory(trio.Event)


class ExternalBalance:
    """The `external` participant (after `funds`, which leaves external partners' cards alone)."""

    name = "external"

    def __init__(self, *, ledger, journal: AuthJournal, ids: TransferIds, hold_timeout_s, partners: Mapping,
                 pki_dir: Path | None, metrics, in_flight_max: int = 1_000_000) -> None:
        self._ledger = ledger
        self._journal = journal
        self._ids = ids
        self._hold_timeout_s = hold_timeout_s
        self._partners = dict(partners)  # name -> authsrv.config.PartnerConfig
        self._metrics = metrics  # authsrv.metrics.Metrics (its registry gets ExternalMetrics)
        self._own = ExternalMetrics.of(metrics.registry, self._partners)
        self._in_flight_max = in_flight_max
        self.in_flight: dict[str, Pending] = {}
        self.window = StandInWindow()
        data_dir = pki_dir.parent if pki_dir is not None else None
        # Every https partner's CA is checked here, also for partners only the outbox calls: this
        # runs before the ISO listener opens, so a bad `ca_file` stops the start (PkiError).
        verify = {name: partner_ssl(name, config, data_dir) for name, config in self._partners.items()}
        self._clients = {name: new_client(config.api_url, verify[name]) for name, config in self._partners.items()
                         if config.balance_mode == "external" and config.api_url}

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    # synchronous part ------------------------------------------------------------------------------

    def prepare(self, ctx: AuthContext) -> Vote:
        if not is_external(ctx):
            return Vote.prepared
        ctx.external_key = idempotency_key(ctx.key)
        if ctx.kind in ADVICES:
            return self._advice(ctx)
        if ctx.partner.name not in self._clients:
            return ctx.decline(Outcome.partner_unavailable, "external balance partner without api_url")
        if len(self.in_flight) >= self._in_flight_max:
            return ctx.decline(Outcome.partner_unavailable, "too many external calls in flight")
        if ctx.processing in DEBITS and not self._hold_collateral(ctx):
            return Vote.aborted
        self.in_flight[ctx.key] = Pending()
        return Vote.deferred

    def abort(self, ctx: AuthContext) -> None:
        """A decline decided after the hold (nothing here: `decide` settles its own hold)."""

    def waiting_for(self, key: str) -> trio.Event | None:
        pending = self.in_flight.get(key) if self.in_flight else None
        return pending.done if pending is not None else None

    def _hold_collateral(self, ctx: AuthContext) -> bool:
        """The partner's deposit collateral, held (also for 0200: posted only once approved), in one
        log record with the in-flight mark. False: declined (and journaled) here."""
        partner = ctx.partner
        if partner.collateral != "deposit":
            return True  # nothing held here: the partner's own balance is the only check
        collateral = partner.collateral_account_ids.get(ctx.currency)
        usage = partner.collateral_usage_account_ids.get(ctx.currency)
        if collateral is None or usage is None:
            ctx.decline(Outcome.collateral_not_found, f"no collateral in {ctx.currency}")
            return False
        hold_id = self._ids.next()
        spec = TransferSpec(hold_id, collateral, usage, ctx.amount, flags=_HOLD,
                            timeout_s=self._hold_timeout_s(ctx.request.mcc), code=TransferCode.collateral,
                            reference=ctx.request.rrn)
        ctx.collateral_hold_id = hold_id
        ctx.outcome, ctx.cause, ctx.external = Outcome.partner_unavailable, "external call in flight", External.in_flight

        def decided(result) -> bytes:
            status = result.transfer_results[0]
            if status is not TransferStatus.created:
                ctx.collateral_hold_id = 0
                ctx.external = External.none
                if status in _FAILURES_FUNDS:
                    ctx.outcome, ctx.cause = Outcome.insufficient_collateral, "collateral"
                else:
                    log.error("ledger refused an external collateral hold: %s", status.name)
                    ctx.outcome, ctx.cause = Outcome.internal_error, f"ledger {status.name}"
            return self._journaled(ctx)

        _, ctx.seq = self._ledger.submit(Batch(timestamp_ns=ctx.now_ns, transfers=(spec,)), finish=decided)
        return ctx.external is External.in_flight

    def _advice(self, ctx: AuthContext) -> Vote:
        """0120/0220: the network already approved; hold/post the collateral forced, no call."""
        ctx.outcome, ctx.external = Outcome.approved, External.deferred
        partner, transfers = ctx.partner, ()
        collateral = partner.collateral_account_ids.get(ctx.currency)
        usage = partner.collateral_usage_account_ids.get(ctx.currency)
        if ctx.processing in DEBITS and partner.collateral == "deposit" and collateral and usage:
            flags = _ADVICE_FLAGS[ctx.kind]
            held = bool(flags & TransferFlags.pending)
            spec_id = self._ids.next()
            transfers = (TransferSpec(spec_id, collateral, usage, ctx.amount, flags=flags,
                                      timeout_s=self._hold_timeout_s(ctx.request.mcc) if held else 0,
                                      code=TransferCode.collateral, reference=ctx.request.rrn),)
            ctx.collateral_hold_id = spec_id if held else 0
            ctx.posted = not held
            ctx.auth_code = auth_code_for(spec_id)
        _, ctx.seq = self._ledger.submit(Batch(timestamp_ns=ctx.now_ns, transfers=transfers),
                                         finish=lambda result: self._journaled(ctx))
        return Vote.done

    def _journaled(self, ctx: AuthContext) -> bytes:
        from authsrv.hotpath.funds import journal_record

        record = journal_record(ctx)
        self._journal.add(record)
        return encode_record(record)

    # the await -------------------------------------------------------------------------------------

    async def decide(self, ctx: AuthContext) -> None:
        """Ask the partner, then settle here: approve, decline or stand in. Always settles (the
        call is shielded from the connection's cancellation and bounded by the budget)."""
        pending = self.in_flight.get(ctx.key)
        try:
            with trio.CancelScope(shield=True):
                result = await self._ask(ctx)
            self._settle(ctx, result)
        finally:
            if pending is not None:
                self.in_flight.pop(ctx.key, None)
                pending.done.set()

    async def _ask(self, ctx: AuthContext) -> CallResult:
        client = self._clients[ctx.partner.name]
        deadline_ns = ctx.deadline_ns - COMMIT_MARGIN_MS * 1_000_000
        started = time.perf_counter_ns()
        if ctx.processing in INQUIRIES:
            path = f"/users/{ctx.card.customer_id}/balances/{ctx.card.balance_id}"
            result = await call_partner(client, "GET", path, None, None, deadline_ns)
        else:
            path = "/transactions/credit" if ctx.processing in CREDITS else "/transactions/debit"
            result = await call_partner(client, "POST", path, transaction_body(ctx), ctx.external_key, deadline_ns)
        elapsed_ns = time.perf_counter_ns() - started
        ctx.external_ms = elapsed_ns // 1_000_000
        own = self._own
        own.child(own.seconds, ctx.partner.name).observe(elapsed_ns / 1e9)
        own.child(own.calls, ctx.partner.name, result.state.name).inc()
        return result

    def _settle(self, ctx: AuthContext, result: CallResult) -> None:
        ctx.external = result.state
        ctx.cause = ""
        if result.state is External.approved:
            self._approve(ctx, result)
        elif result.state is External.declined:
            outcome = DECLINES.get((result.status, result.title))
            if outcome is None:  # an answer outside the documents (400, 403, 409...): our bug or theirs
                log.error("partner %s answered %d %s", ctx.partner.name, result.status, result.title)
                outcome = Outcome.internal_error
            if ctx.processing in INQUIRIES and outcome is not Outcome.card_not_found:
                outcome = Outcome.partner_unavailable
            self._decline(ctx, outcome, f"partner {result.status} {result.title}".strip())
        else:
            self._stand_in(ctx, result)

    def _approve(self, ctx: AuthContext, result: CallResult) -> None:
        ctx.outcome = Outcome.approved
        transfers: tuple[TransferSpec, ...] = ()
        if ctx.processing in INQUIRIES:
            try:
                balance = _balance_decoder.decode(result.body)
                ctx.field54 = build_field54(balance.amount, alpha_to_numeric(ctx.card.currency))
            except (msgspec.DecodeError, KeyError, ValueError):
                ctx.external = External.failed
                self._decline(ctx, Outcome.partner_unavailable, "partner balance answer not understood")
                return
        else:
            ctx.auth_code = auth_code_for(ctx.collateral_hold_id or self._ids.next())
            ctx.posted = ctx.processing in CREDITS or ctx.kind is Kind.financial
            if ctx.kind is Kind.financial and ctx.collateral_hold_id:
                # 0200 posts at once: the collateral hold placed before the call becomes a posting.
                transfers = (TransferSpec(self._ids.next(), 0, 0, 0, flags=_POST, pending_id=ctx.collateral_hold_id,
                                          code=TransferCode.collateral, reference=ctx.request.rrn),)
        self._submit(ctx, transfers)

    def _decline(self, ctx: AuthContext, outcome: Outcome, cause: str) -> None:
        ctx.outcome, ctx.cause = outcome, cause
        ctx.auth_code = ctx.field54 = ""
        self._submit(ctx, self._voids(ctx))

    def _stand_in(self, ctx: AuthContext, result: CallResult) -> None:
        config = self._partners[ctx.partner.name]
        ctx.stand_in = True
        self._metrics.stand_in.inc()
        why = "timed out" if result.state is External.timed_out else f"failed ({result.status or 'no connection'})"
        card_id = ctx.card.card_id
        debit = ctx.processing in DEBITS
        approve = config.stand_in == "approve" and ctx.processing not in INQUIRIES and (
            not debit or self.window.allows(card_id, ctx.amount, ctx.now_ns, config.stand_in_max_amount,
                                            config.stand_in_daily_max))
        self._own.child(self._own.stand_in, ctx.partner.name, "approve" if approve else "decline").inc()
        if not approve:
            self._decline(ctx, Outcome.partner_unavailable, f"stand-in decline: partner {why}")
            return
        if debit:
            self.window.add(card_id, ctx.amount, ctx.now_ns)
        ctx.cause = f"stand-in approval: partner {why}"  # external stays timed_out / failed
        self._approve(ctx, result)

    def _voids(self, ctx: AuthContext) -> tuple[TransferSpec, ...]:
        hold_id, ctx.collateral_hold_id = ctx.collateral_hold_id, 0
        if not hold_id:
            return ()
        return (TransferSpec(self._ids.next(), 0, 0, 0, flags=_VOID, pending_id=hold_id,
                             code=TransferCode.reversal, reference=ctx.request.rrn),)

    def _submit(self, ctx: AuthContext, transfers: tuple[TransferSpec, ...]) -> None:
        """The decision and its ledger change in one log record (the journal replaces the
        in-flight record of the same key)."""
        def decided(result) -> bytes:
            bad = [status for status in result.transfer_results if status is not TransferStatus.created]
            if bad:  # the hold expired or vanished under us: nothing can be approved on it
                log.error("ledger refused settling an external decision: %s", [s.name for s in bad])
                if is_approval(ctx.outcome):
                    ctx.outcome, ctx.cause, ctx.auth_code = Outcome.internal_error, "collateral hold lost", ""
            return self._journaled(ctx)

        _, ctx.seq = self._ledger.submit(Batch(timestamp_ns=time.time_ns(), transfers=transfers), finish=decided)


# -- reversals (called from funds.Reverse for an original with `external` set) -----------------------


def external_release_hold(ledger, original: AuthRecord) -> int | None:
    """What is left of an external original's collateral hold (None: nothing held, e.g. 0200)."""
    if not original.collateral_hold_id or original.posted:
        return None
    hold = ledger.ledger.hold(original.collateral_hold_id)
    return hold.remaining if hold is not None else 0


def external_release_transfers(index, ids: TransferIds, original: AuthRecord, release: int,
                               rrn: str) -> list[TransferSpec]:
    """Only the partner's collateral comes back here; the user's money is at the partner (the
    outbox sends /transactions/reversal). A hold is voided down; a posting (0200) is moved back."""
    assert original.external and release > 0
    if original.collateral_hold_id and not original.posted:
        return [TransferSpec(ids.next(), 0, 0, release, flags=_VOID, pending_id=original.collateral_hold_id,
                             code=TransferCode.collateral_release, reference=rrn)]
    if not original.collateral_hold_id or original.processing_code[:2] not in DEBITS:
        return []  # credits and partners without a deposit: nothing was moved here
    card = index.card_by_id(original.card_id)
    partner = index.partner(card.partner) if card is not None else None
    if partner is None:
        return []
    collateral = partner.collateral_account_ids.get(original.currency)
    usage = partner.collateral_usage_account_ids.get(original.currency)
    if collateral is None or usage is None:
        return []
    return [TransferSpec(ids.next(), usage, collateral, release, flags=TransferFlags.forced,
                         code=TransferCode.collateral_release, reference=rrn)]
