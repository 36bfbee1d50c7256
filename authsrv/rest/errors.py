"""Every REST error is RFC 9457 `application/problem+json`: `{"title": CODE, "detail": ..., "status": N}`.

Titles are the error codes of the reference documents (docs/contract.md, REST conventions). A business outcome is
returned as a `Problem` value by the handler; only the edges (body limit, unexpected bugs) use
exceptions, and `ProblemMiddleware` turns those into problems too, so a client never sees a stack
trace. Details never carry card data or a wPIN: they name the field or the rule, never the value.
"""

from __future__ import annotations

import enum
import logging

import msgspec
import trio
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("authsrv.rest")

PROBLEM_MEDIA_TYPE = "application/problem+json"
REQUEST_BODY_BYTES_MAX = 64 * 1024  # a wallet body is < 1 KiB; KYC multipart has its own bound
# KYC forms (`.../register`): up to three 4 MiB images plus text fields and multipart framing.
KYC_BODY_BYTES_MAX = 12 * 1024 * 1024 + 64 * 1024
# Clearing files (`POST /admin/clearing`): authsrv.clearing.records.CLEARING_FILE_BYTES_MAX.
CLEARING_BODY_BYTES_MAX = 64 * 1024 * 1024
# The panel's upload form (authsrv/panel/views/clearing.py): the same file in a multipart body.
PANEL_CLEARING_BODY_BYTES_MAX = CLEARING_BODY_BYTES_MAX + 64 * 1024
BODY_BYTES_MAX_BY_PATH_SUFFIX = {"/register": KYC_BODY_BYTES_MAX, "/admin/clearing": CLEARING_BODY_BYTES_MAX,
                                 "/panel/clearing/upload": PANEL_CLEARING_BODY_BYTES_MAX}
BODY_DRAIN_S_MAX = 5.0  # reading the unread rest of a body before an early answer (see _drain)


class Title(enum.StrEnum):
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    FX_RATES_NOT_FOUND = "FX_RATES_NOT_FOUND"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    CUSTOMER_NOT_FOUND = "CUSTOMER_NOT_FOUND"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    ENCRYPTION_REQUIRED = "ENCRYPTION_REQUIRED"
    INVALID_PUBLIC_KEY = "INVALID_PUBLIC_KEY"
    CANT_DECRYPT_PAYLOAD = "CANT_DECRYPT_PAYLOAD"
    KYC_REQUIRED = "KYC_REQUIRED"
    BALANCE_NOT_FOUND = "BALANCE_NOT_FOUND"
    BALANCE_NOT_ACTIVE = "BALANCE_NOT_ACTIVE"
    BALANCE_NOT_EMPTY = "BALANCE_NOT_EMPTY"
    BALANCE_HAS_CARDS = "BALANCE_HAS_CARDS"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    EXTERNAL_BALANCE = "EXTERNAL_BALANCE"
    PARTNER_UNAVAILABLE = "PARTNER_UNAVAILABLE"  # an external-balance partner refused or did not answer
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    PARTNER_BALANCE_NOT_FOUND = "PARTNER_BALANCE_NOT_FOUND"
    PARTNER_BALANCE_EXISTS = "PARTNER_BALANCE_EXISTS"
    PARTNER_NOT_FOUND = "PARTNER_NOT_FOUND"
    TOO_MANY_BALANCES = "TOO_MANY_BALANCES"
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    TOO_MANY_ATTEMPTS = "TOO_MANY_ATTEMPTS"
    CUSTOMER_NOT_ACTIVE = "CUSTOMER_NOT_ACTIVE"
    ISSUER_CODE_REQUIRED = "ISSUER_CODE_REQUIRED"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
    ADMIN_ALREADY_EXISTS = "ADMIN_ALREADY_EXISTS"
    KYC_FORM_NOT_FOUND = "KYC_FORM_NOT_FOUND"
    KYC_ALREADY_VERIFIED = "KYC_ALREADY_VERIFIED"
    KYC_FORM_PENDING = "KYC_FORM_PENDING"
    KYC_FORM_DECIDED = "KYC_FORM_DECIDED"
    CARD_NOT_FOUND = "CARD_NOT_FOUND"
    CONFIG_NOT_FOUND = "CONFIG_NOT_FOUND"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    CARD_LOCKED_IRREVERSIBLY = "CARD_LOCKED_IRREVERSIBLY"
    CARD_NOT_LOCKED = "CARD_NOT_LOCKED"
    CARD_LOCKED = "CARD_LOCKED"
    CARD_TYPE_NOT_SUPPORTED = "CARD_TYPE_NOT_SUPPORTED"
    CARD_NOT_ACTIVATABLE = "CARD_NOT_ACTIVATABLE"
    CVV_RESETS_EXHAUSTED = "CVV_RESETS_EXHAUSTED"
    CARD_NUMBERS_EXHAUSTED = "CARD_NUMBERS_EXHAUSTED"
    CARD_ALREADY_ORDERED = "CARD_ALREADY_ORDERED"
    CARD_QUEUE_FULL = "CARD_QUEUE_FULL"
    DELIVERY_NOT_FOUND = "DELIVERY_NOT_FOUND"
    CHALLENGE_NOT_FOUND = "CHALLENGE_NOT_FOUND"
    OTP_INVALID = "OTP_INVALID"
    CHALLENGE_FAILED = "CHALLENGE_FAILED"
    CHALLENGE_EXPIRED = "CHALLENGE_EXPIRED"
    OTP_NOT_CONFIGURED = "OTP_NOT_CONFIGURED"
    OTP_NOTIFIER_UNAVAILABLE = "OTP_NOTIFIER_UNAVAILABLE"
    LEDGER_UNAVAILABLE = "LEDGER_UNAVAILABLE"  # the write-ahead log cannot be written now (503)
    REPLICATION_UNAVAILABLE = "REPLICATION_UNAVAILABLE"  # the shard's stream did not acknowledge in time (503)
    NOT_PRIMARY = "NOT_PRIMARY"  # this node is (or just became) a standby (503)


class Problem(msgspec.Struct, frozen=True):
    title: str
    detail: str
    status: int


_encoder = msgspec.json.Encoder()


def problem(status: int, title: Title, detail: str) -> Response:
    assert 400 <= status <= 599, status
    body = _encoder.encode(Problem(title=title.value, detail=detail, status=status))
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)


class BodyTooLarge(Exception):
    """The request body grew past REQUEST_BODY_BYTES_MAX while being read."""


_HTTP_TITLES = {404: Title.NOT_FOUND, 405: Title.METHOD_NOT_ALLOWED, 413: Title.PAYLOAD_TOO_LARGE}


async def http_exception_handler(request, exc) -> Response:
    """Starlette's own 404 (no route) and 405 (wrong method), as problems."""
    title = _HTTP_TITLES.get(exc.status_code, Title.INVALID_PAYLOAD)
    return problem(exc.status_code, title, str(exc.detail))


LEDGER_RETRY_AFTER_S = 5  # the log is tried again every second; a client need not come back sooner


async def ledger_not_writable_handler(request, exc) -> Response:
    """authsrv.rest.money.LedgerNotWritable: 503, nothing changed, try again later."""
    response = problem(503, Title.LEDGER_UNAVAILABLE, str(exc))
    response.headers["retry-after"] = str(LEDGER_RETRY_AFTER_S)
    return response


async def replication_timeout_handler(request, exc) -> Response:
    """authsrv.store.db.ReplicationTimeout: committed here, not yet acknowledged by the stream. The
    change goes out when NATS answers; a retry with the same idempotency key is safe."""
    response = problem(503, Title.REPLICATION_UNAVAILABLE, str(exc))
    response.headers["retry-after"] = str(LEDGER_RETRY_AFTER_S)
    return response


async def log_fenced_handler(request, exc) -> Response:
    """ledger.jetstream.LogFencedError: another node is the primary now; nothing was committed."""
    response = problem(503, Title.NOT_PRIMARY, "this node is no longer the primary; send requests to the new one")
    response.headers["retry-after"] = "1"
    return response


class ProblemMiddleware:
    """Outermost layer: the body-size bound, and a 500 problem (logged) for anything unexpected.

    Starlette's ServerErrorMiddleware would re-raise into the server after answering; containing
    it here keeps one bad request from reaching anycorn's error path, as the ISO handler does."""

    def __init__(self, app: ASGIApp, *, body_bytes_max: int = REQUEST_BODY_BYTES_MAX) -> None:
        assert body_bytes_max > 0
        self.app = app
        self.body_bytes_max = body_bytes_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_bytes_max = self._bound(scope.get("path", ""))
        if _declared_length(scope) > body_bytes_max:
            await self._too_large(scope, receive, send, body_bytes_max)
            return
        started = False
        received = 0
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > body_bytes_max:
                    raise BodyTooLarge
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:
                    await _drain(receive, body_bytes_max - received)
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send, body_bytes_max)
        except Exception:
            # The message of an arbitrary exception is not ours to vet: log the type and trace only
            # at the server, answer a generic detail.
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = problem(500, Title.INTERNAL_ERROR, "internal error")
                await response(scope, receive, send)

    def _bound(self, path: str) -> int:
        """The body bound of this path: the default, or a larger one for multipart uploads."""
        for suffix, bound in BODY_BYTES_MAX_BY_PATH_SUFFIX.items():
            if path.endswith(suffix):
                return max(bound, self.body_bytes_max)
        return self.body_bytes_max

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, body_bytes_max: int) -> None:
        detail = f"request body larger than {body_bytes_max} bytes"
        response = problem(413, Title.PAYLOAD_TOO_LARGE, detail)
        response.headers["connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


async def _drain(receive: Receive, bytes_max: int) -> None:
    """Read (and drop) the rest of a request body the app answered without reading (401, 404,
    a multipart error), within the body bound and BODY_DRAIN_S_MAX.

    anycorn closes the connection as soon as an answer ends while the client is still sending;
    closing a socket with unread input makes the kernel send RST, and the client loses the answer
    (httpx: ReadError). With the body read, the connection even stays open for the next request."""
    with trio.move_on_after(BODY_DRAIN_S_MAX):
        drained = 0
        while drained <= bytes_max:  # bounded: each message is a chunk of a bounded body or the end
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # h11 rejects a malformed Content-Length before we see it
    return 0
