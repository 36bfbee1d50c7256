"""Every REST error is RFC 9457 `application/problem+json`: `{"title": CODE, "detail": ..., "status": N}`.

Titles are the error codes of the reference documents (CONTRACT section 5). A business outcome is
returned as a `Problem` value by the handler; only the edges (body limit, unexpected bugs) use
exceptions, and `ProblemMiddleware` turns those into problems too, so a client never sees a stack
trace. Details never carry card data or a wPIN: they name the field or the rule, never the value.
"""

from __future__ import annotations

import enum
import logging

import msgspec
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("authsrv.rest")

PROBLEM_MEDIA_TYPE = "application/problem+json"
REQUEST_BODY_BYTES_MAX = 64 * 1024  # a wallet body is < 1 KiB; KYC multipart will need its own bound


class Title(enum.StrEnum):
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
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
        if _declared_length(scope) > self.body_bytes_max:
            await self._too_large(scope, receive, send)
            return
        started = False
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.body_bytes_max:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)
        except Exception:
            # The message of an arbitrary exception is not ours to vet: log the type and trace only
            # at the server, answer a generic detail.
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = problem(500, Title.INTERNAL_ERROR, "internal error")
                await response(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body larger than {self.body_bytes_max} bytes"
        response = problem(413, Title.PAYLOAD_TOO_LARGE, detail)
        response.headers["connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # h11 rejects a malformed Content-Length before we see it
    return 0
