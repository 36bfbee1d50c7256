"""The partner's HTTP API (Starlette): every partner-facing call of the documents, plus `/_sim`.

Each partner call goes through one pipeline (`_call`):
    down mode?  -> 503, nothing else happens
    read body (at most BODY_BYTES_MAX), check X-Idempotency-Key, decrypt (OTP), decode strictly
                -> 4xx, nothing recorded, nothing cached
    sleep the sampled latency
    roll a fault: 5xx -> 500, nothing applied (a retry may still succeed)
    apply, or replay from the idempotency cache (no await between lookup and store)
    fault timeout -> sleep `timeout_ms`, then answer (the change IS applied: a late answer)
    fault drop    -> close the connection without an answer (the change IS applied)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import msgspec
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulators.partner.jwe import DECRYPT_ERRORS, SimKey
from simulators.partner.state import (
    OUTCOME_ANSWERS,
    RECEIVED_MAX,
    Answer,
    CacheEntry,
    Fault,
    Outcome,
    PartnerState,
)
from simulators.partner.wire import (
    IDEMPOTENCY_KEY_CHARS_MAX,
    KINDS_READ_ONLY,
    BalanceItemOut,
    BalanceOut,
    EncryptedIn,
    EndpointStatsOut,
    Kind,
    LinkBalanceIn,
    ModeIn,
    OtpIn,
    Problem,
    PublicKeyOut,
    ReceivedOut,
    SetBalanceIn,
    SimBalanceOut,
    StatsOut,
    Title,
    TransactionIn,
    TransactionNotificationIn,
    VerificationIn,
)

log = logging.getLogger("simulators.partner")

BODY_BYTES_MAX = 64 * 1024
SIM_LIST_MAX = 100_000
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1"})
HEADER_IDEMPOTENCY_KEY = "x-idempotency-key"
HEADER_SIGNATURE = "x-authsrv-signature"
HEADER_TIMESTAMP = "x-authsrv-timestamp"
JSON = "application/json"

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {
    struct: msgspec.json.Decoder(struct)
    for struct in (LinkBalanceIn, TransactionIn, OtpIn, VerificationIn, TransactionNotificationIn,
                   EncryptedIn, ModeIn, SetBalanceIn)
}


@attrs.frozen
class SimOptions:
    """Fixed at start (the run-time knobs are `PartnerState.mode`)."""

    idempotency_key_required: bool = True  # on POST /transactions/* and /notifications/*
    otp_encryption_required: bool = True


@attrs.frozen
class Endpoint:
    kind: Kind
    body_type: type | None  # None: the call has no body
    apply: Callable[[PartnerState, Any, Mapping[str, str]], Answer]
    key_required: bool
    check: Callable[[Any], str | None] | None = None  # a rule beyond the type: why it fails, or None


@attrs.frozen
class Call:
    """One decoded partner call, ready to apply."""

    method: str
    path: str
    params: Mapping[str, str]
    key: str | None
    raw_body: bytes
    plaintext: bytes
    value: Any
    encrypted: bool
    signature: str | None
    signature_timestamp: str | None
    client_cert_name: str | None

    @property
    def fingerprint(self) -> bytes:
        return self._fingerprint(self.path)

    @property
    def reconciling_fingerprint(self) -> bytes | None:
        """A force-debit (force-credit) sent with the key of an earlier debit (credit) is the issuer
        reconciling a stand-in: if that debit was applied, even late, it is the same operation."""
        for forced, original in (("/transactions/force-debit", "/transactions/debit"),
                                 ("/transactions/force-credit", "/transactions/credit")):
            if self.path == forced:
                return self._fingerprint(original)
        return None

    def _fingerprint(self, path: str) -> bytes:
        canonical = _encoder.encode(self.value) if self.value is not None else b""
        return hashlib.sha256(b"\0".join((self.method.encode(), path.encode(), canonical))).digest()


class _Refused(Exception):
    """A call refused before processing; carries its 4xx answer. Never escapes this module."""

    def __init__(self, status: int, title: Title, detail: str) -> None:
        super().__init__(detail)
        self.answer = problem_answer(status, title, detail)


def problem_answer(status: int, title: Title, detail: str) -> Answer:
    return Answer(status, _encoder.encode(Problem(title=title.value, detail=detail)))


def outcome_answer(outcome: Outcome, detail: str) -> Answer:
    status, title = OUTCOME_ANSWERS[outcome]
    if title is None:
        return Answer(status)
    return problem_answer(status, title, detail)


def _response(answer: Answer) -> Response:
    if answer.status == 204:
        return Response(status_code=204)
    return Response(answer.body, status_code=answer.status, media_type=JSON)


class DropConnection:
    """An ASGI response that starts an answer and never finishes it: anycorn then closes the
    connection, so the client sees the peer go away mid-answer (a network error after the partner
    already applied the call, the case idempotency keys exist for)."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"1024"), (b"content-type", JSON.encode())]})
        # Returning without the body: anycorn sees an unfinished response and closes the stream.


# -- the partner's endpoints --------------------------------------------------------------------


def _link(state: PartnerState, value: LinkBalanceIn, params: Mapping[str, str]) -> Answer:
    outcome = state.link(params["id"], value.balance_id, value.currency)
    return outcome_answer(outcome, f"balance {value.balance_id} of user {params['id']}: {outcome.name}")


def _get_balance(state: PartnerState, value: None, params: Mapping[str, str]) -> Answer:
    found = state.owned(params["id"], params["balanceId"])
    if isinstance(found, Outcome):
        return outcome_answer(found, f"balance {params['balanceId']} of user {params['id']}: {found.name}")
    return Answer(200, _encoder.encode(BalanceOut(currency=found.currency, amount=found.amount_minor)))


def _list_balances(state: PartnerState, value: None, params: Mapping[str, str]) -> Answer:
    items = [BalanceItemOut(id=balance.balance_id, currency=balance.currency, amount=balance.amount_minor)
             for balance in state.balances_of(params["id"])]
    return Answer(200, _encoder.encode(items))


def _delete_balance(state: PartnerState, value: None, params: Mapping[str, str]) -> Answer:
    outcome = state.delete(params["id"], params["balanceId"])
    return outcome_answer(outcome, f"balance {params['balanceId']} of user {params['id']}: {outcome.name}")


def _transact(kind: Kind) -> Callable[[PartnerState, TransactionIn, Mapping[str, str]], Answer]:
    def apply(state: PartnerState, tx: TransactionIn, params: Mapping[str, str]) -> Answer:
        outcome = state.transact(kind, tx)
        return outcome_answer(outcome, f"{kind.value} {tx.amount} {tx.currency} on balance {tx.balance_id}")
    return apply


def _reversal(state: PartnerState, tx: TransactionIn, params: Mapping[str, str]) -> Answer:
    state.reverse(tx)  # "for this method, we do not accept any error": always 204
    return Answer(204)


def _status_update(state: PartnerState, tx: TransactionIn, params: Mapping[str, str]) -> Answer:
    outcome = state.update_status(params["id"], tx)
    return outcome_answer(outcome, f"cannot find requested transaction {params['id']} on balance {tx.balance_id}")


def _notification(state: PartnerState, value: Any, params: Mapping[str, str]) -> Answer:
    return Answer(204)  # recording is the pipeline's job


def _status_is(expected: str) -> Callable[[VerificationIn], str | None]:
    def check(value: VerificationIn) -> str | None:
        if value.status != expected:
            return f"status must be {expected} on this endpoint, not {value.status}"
        if (value.reason is None) != (expected != "REJECTED"):
            return "reason is null unless the status is REJECTED, and then it is required"
        return None
    return check


def _public_key_answer(key: SimKey) -> Callable[[PartnerState, None, Mapping[str, str]], Answer]:
    body = _encoder.encode(PublicKeyOut(public_key=key.public_key_b64))
    return lambda state, value, params: Answer(200, body)


# -- the pipeline -------------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > BODY_BYTES_MAX:
        raise _Refused(413, Title.PAYLOAD_TOO_LARGE, f"body larger than {BODY_BYTES_MAX} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():  # bounded: stops at BODY_BYTES_MAX
        size += len(chunk)
        if size > BODY_BYTES_MAX:
            raise _Refused(413, Title.PAYLOAD_TOO_LARGE, f"body larger than {BODY_BYTES_MAX} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _idempotency_key(request: Request, required: bool) -> str | None:
    key = request.headers.get(HEADER_IDEMPOTENCY_KEY)
    if key is None or not key.strip():
        if required:
            raise _Refused(400, Title.IDEMPOTENCY_KEY_REQUIRED, "send X-Idempotency-Key with this call")
        return None
    key = key.strip()
    if len(key) > IDEMPOTENCY_KEY_CHARS_MAX or not key.isascii() or not key.isprintable():
        raise _Refused(400, Title.INVALID_PAYLOAD,
                       f"X-Idempotency-Key must be printable ASCII, at most {IDEMPOTENCY_KEY_CHARS_MAX} characters")
    return key


def _decode(body_type: type, plaintext: bytes) -> Any:
    try:
        return _decoders[body_type].decode(plaintext)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        # msgspec names the rule and the path ("Expected `int`, got `str` - at `$.amount`"), never a value.
        raise _Refused(400, Title.INVALID_PAYLOAD, str(error)) from None


def _decrypt_otp(key: SimKey, raw_body: bytes, required: bool) -> tuple[bytes, bool]:
    """(plaintext, was encrypted) of an OTP notification body."""
    try:
        wrapper = _decoders[EncryptedIn].decode(raw_body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        if required:
            raise _Refused(400, Title.ENCRYPTION_REQUIRED,
                           'the OTP must arrive as {"payload": "<compact JWE>"} to GET /public-key') from None
        return raw_body, False
    try:
        return key.decrypt(wrapper.payload), True
    except DECRYPT_ERRORS:
        detail = "payload is not a compact JWE to this partner's key (RSA-OAEP-256 or RSA-OAEP, A256GCM)"
        raise _Refused(400, Title.CANT_DECRYPT_PAYLOAD, detail) from None


def _client_cert_name(request: Request) -> str | None:
    tls = request.scope.get("extensions", {}).get("tls") or {}
    name = tls.get("client_cert_name")
    return name if isinstance(name, str) else None


async def _prepare(request: Request, endpoint: Endpoint, key: SimKey, options: SimOptions) -> Call:
    raw_body = await _read_body(request)
    idempotency_key = _idempotency_key(request, endpoint.key_required)
    plaintext, encrypted = raw_body, False
    if endpoint.kind is Kind.otp:
        plaintext, encrypted = _decrypt_otp(key, raw_body, options.otp_encryption_required)
    value = _decode(endpoint.body_type, plaintext) if endpoint.body_type is not None else None
    if endpoint.body_type is None and raw_body.strip():
        raise _Refused(400, Title.INVALID_PAYLOAD, "this call takes no body")
    fault = endpoint.check(value) if endpoint.check is not None else None
    if fault is not None:
        raise _Refused(400, Title.INVALID_PAYLOAD, fault)
    return Call(
        method=request.method, path=request.url.path, params=dict(request.path_params),
        key=idempotency_key, raw_body=raw_body, plaintext=plaintext, value=value, encrypted=encrypted,
        signature=request.headers.get(HEADER_SIGNATURE),
        signature_timestamp=request.headers.get(HEADER_TIMESTAMP),
        client_cert_name=_client_cert_name(request),
    )


def _apply_once(state: PartnerState, endpoint: Endpoint, call: Call) -> Answer:
    """Apply the call, or answer a replay from the cache. Synchronous: nothing can interleave."""
    stats = state.stats[endpoint.kind]
    cacheable = call.key is not None and endpoint.kind not in KINDS_READ_ONLY
    if cacheable:
        entry = state.cached(call.key)
        if entry is not None:
            if entry.fingerprint not in (call.fingerprint, call.reconciling_fingerprint):
                stats.invalid += 1
                return problem_answer(409, Title.IDEMPOTENCY_KEY_REUSED,
                                      "this X-Idempotency-Key was used for another request")
            stats.replays += 1
            stats.answered(entry.answer.status)
            if entry.received is not None:
                entry.received.replays += 1
            return entry.answer
    answer = endpoint.apply(state, call.value, call.params)
    stats.processed += 1
    stats.answered(answer.status)
    received = None
    if endpoint.kind not in KINDS_READ_ONLY:
        received = state.record(
            kind=endpoint.kind, method=call.method, path=call.path, idempotency_key=call.key,
            signature=call.signature, signature_timestamp=call.signature_timestamp,
            encrypted=call.encrypted, raw_body=call.raw_body, body=call.plaintext,
            status=answer.status, client_cert_name=call.client_cert_name,
        )
    if cacheable:
        state.remember(call.key, CacheEntry(call.fingerprint, answer, received))
    log.debug("%s %s -> %d", endpoint.kind.value, call.path, answer.status)
    return answer


async def _call(request: Request, endpoint: Endpoint, state: PartnerState, key: SimKey,
                options: SimOptions) -> Response | DropConnection:
    stats = state.stats[endpoint.kind]
    stats.requests += 1
    if state.mode.down:
        stats.unavailable += 1
        return _response(problem_answer(503, Title.SERVICE_UNAVAILABLE, "the partner is down (simulated)"))
    try:
        call = await _prepare(request, endpoint, key, options)
    except _Refused as refused:
        stats.invalid += 1
        log.info("%s %s refused: %d", endpoint.kind.value, request.url.path, refused.answer.status)
        return _response(refused.answer)
    latency_ms = state.mode.latency.sample_ms(state.rng)
    if latency_ms > 0.0:  # trio.sleep(0) would still cost a pass of the scheduler
        await trio.sleep(latency_ms / 1000.0)
    fault = state.mode.roll(state.rng)
    if fault is Fault.error_5xx:
        stats.injected_5xx += 1
        return _response(problem_answer(500, Title.INTERNAL_ERROR, "injected failure (simulated)"))
    answer = _apply_once(state, endpoint, call)
    if fault is Fault.timeout:
        stats.injected_timeouts += 1
        await trio.sleep(state.mode.timeout_ms / 1000.0)
    elif fault is Fault.drop:
        stats.injected_drops += 1
        return DropConnection()
    return _response(answer)


def _endpoints(key: SimKey, options: SimOptions) -> list[tuple[str, str, Endpoint]]:
    required = options.idempotency_key_required
    tx = TransactionIn
    return [
        ("/public-key", "GET", Endpoint(Kind.public_key, None, _public_key_answer(key), False)),
        ("/users/{id}/balances", "POST", Endpoint(Kind.link_balance, LinkBalanceIn, _link, False)),
        ("/users/{id}/balances", "GET", Endpoint(Kind.list_balances, None, _list_balances, False)),
        ("/users/{id}/balances/{balanceId}", "GET", Endpoint(Kind.get_balance, None, _get_balance, False)),
        ("/users/{id}/balances/{balanceId}", "DELETE",
         Endpoint(Kind.delete_balance, None, _delete_balance, False)),
        ("/transactions/debit", "POST", Endpoint(Kind.debit, tx, _transact(Kind.debit), required)),
        ("/transactions/credit", "POST", Endpoint(Kind.credit, tx, _transact(Kind.credit), required)),
        ("/transactions/force-debit", "POST",
         Endpoint(Kind.force_debit, tx, _transact(Kind.force_debit), required)),
        ("/transactions/force-credit", "POST",
         Endpoint(Kind.force_credit, tx, _transact(Kind.force_credit), required)),
        ("/transactions/reversal", "POST", Endpoint(Kind.reversal, tx, _reversal, required)),
        ("/transactions/{id}", "PUT", Endpoint(Kind.status_update, tx, _status_update, False)),
        ("/notifications/otp", "POST", Endpoint(Kind.otp, OtpIn, _notification, required)),
        ("/notifications/verificationInProgress", "POST",
         Endpoint(Kind.verification_in_progress, VerificationIn, _notification, required, _status_is("IN_PROGRESS"))),
        ("/notifications/verificationAccepted", "POST",
         Endpoint(Kind.verification_accepted, VerificationIn, _notification, required, _status_is("ACCEPTED"))),
        ("/notifications/verificationRejected", "POST",
         Endpoint(Kind.verification_rejected, VerificationIn, _notification, required, _status_is("REJECTED"))),
        ("/notifications/transaction", "POST",
         Endpoint(Kind.transaction, TransactionNotificationIn, _notification, required)),
    ]


# -- /_sim: the control API ---------------------------------------------------------------------


def _json(value: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status_code=status, media_type=JSON)


def _sim_problem(status: int, title: Title, detail: str) -> Response:
    return _response(problem_answer(status, title, detail))


def _limit(request: Request, default: int) -> int | None:
    raw = request.query_params.get("limit", str(default))
    return int(raw) if raw.isdigit() and 1 <= int(raw) <= SIM_LIST_MAX else None


def received_out(received) -> ReceivedOut:
    return ReceivedOut(
        seq=received.seq, kind=received.kind.value, method=received.method, path=received.path,
        idempotency_key=received.idempotency_key, signature=received.signature,
        signature_timestamp=received.signature_timestamp, encrypted=received.encrypted,
        status=received.status, replays=received.replays, received_at=received.received_at,
        client_cert_name=received.client_cert_name,
        body=msgspec.Raw(received.body if received.body.strip() else b"null"),
        raw_body=received.raw_body.decode("utf-8", "replace"),
    )


def stats_out(state: PartnerState) -> StatsOut:
    every = state.stats.values()
    return StatsOut(
        endpoints={kind.value: EndpointStatsOut(**attrs.asdict(stats)) for kind, stats in state.stats.items()},
        requests=sum(stats.requests for stats in every),
        processed=sum(stats.processed for stats in every),
        replays=sum(stats.replays for stats in every),
        received_total=state.received_total,
        idempotency_keys=len(state.cache),
        balances=len(state.balances),
        unmatched_reversals=state.unmatched_reversals,
        currency_mismatches_forced=state.currency_mismatches_forced,
    )


def _sim_routes(state: PartnerState) -> list[Route]:
    async def received(request: Request) -> Response:
        limit = _limit(request, RECEIVED_MAX)
        if limit is None:
            return _sim_problem(400, Title.INVALID_PAYLOAD, f"limit must be 1 to {SIM_LIST_MAX}")
        found = state.received_of(request.query_params.get("kind", ""), request.query_params.get("key"), limit)
        return _json({"received": [received_out(one) for one in found], "total": state.received_total})

    async def balances(request: Request) -> Response:
        limit = _limit(request, 1_000)
        if limit is None:
            return _sim_problem(400, Title.INVALID_PAYLOAD, f"limit must be 1 to {SIM_LIST_MAX}")
        user = request.query_params.get("user")
        found = []
        for balance in state.balances.values():  # bounded by BALANCES_MAX, and stops at limit
            if user is None or balance.user_id == user:
                found.append(SimBalanceOut(user_id=balance.user_id, balance_id=balance.balance_id,
                                           currency=balance.currency, amount=balance.amount_minor))
                if len(found) >= limit:
                    break
        return _json({"balances": found})

    async def set_balance(request: Request) -> Response:
        try:
            change = _decode(SetBalanceIn, await _read_body(request))
        except _Refused as refused:
            return _response(refused.answer)
        user, balance_id = request.path_params["user"], request.path_params["balance"]
        outcome = state.set_amount(user, balance_id, change.amount, change.currency)
        if outcome is not Outcome.applied:
            return _response(outcome_answer(outcome, f"balance {balance_id} of user {user}: {outcome.name}"))
        found = state.balances[balance_id]
        return _json(SimBalanceOut(user_id=user, balance_id=balance_id, currency=found.currency,
                                   amount=found.amount_minor))

    async def mode(request: Request) -> Response:
        if request.method == "POST":
            try:
                change = _decode(ModeIn, await _read_body(request))
            except _Refused as refused:
                return _response(refused.answer)
            updated = state.mode.updated(change)
            if isinstance(updated, str):
                return _sim_problem(400, Title.INVALID_PAYLOAD, updated)
            state.mode = updated
            log.info("mode now %s", updated.out())
        return _json(state.mode.out())

    async def stats(request: Request) -> Response:
        return _json(stats_out(state))

    async def reset(request: Request) -> Response:
        state.reset_records()
        return Response(status_code=204)

    handlers = [
        ("/_sim/received", received, ["GET"]), ("/_sim/balances", balances, ["GET"]),
        ("/_sim/balances/{user}/{balance}", set_balance, ["PUT"]), ("/_sim/mode", mode, ["GET", "POST"]),
        ("/_sim/stats", stats, ["GET"]), ("/_sim/reset", reset, ["POST"]),
    ]
    return [Route(path, _loopback_only(handler), methods=methods) for path, handler, methods in handlers]


def _loopback_only(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def guarded(request: Request) -> Response:
        client = request.client
        if client is None or client.host not in LOOPBACK_HOSTS:
            return _sim_problem(403, Title.FORBIDDEN, "/_sim answers loopback clients only")
        return await handler(request)
    return guarded


def build_partner_app(state: PartnerState, key: SimKey, options: SimOptions = SimOptions()) -> Starlette:
    def route(path: str, method: str, endpoint: Endpoint) -> Route:
        async def handler(request: Request):
            return await _call(request, endpoint, state, key, options)
        return Route(path, handler, methods=[method], name=f"{endpoint.kind.value}.{method.lower()}")

    partner_routes = [route(path, method, endpoint) for path, method, endpoint in _endpoints(key, options)]
    return Starlette(routes=[*_sim_routes(state), *partner_routes])
