"""The panel's sessions, CSRF tokens and response headers.

A panel session is a random token in a cookie (`HttpOnly; Secure; SameSite=Strict; Path=/panel`)
that names an operator in memory, like the admin API's bearer tokens. It ends after
IDLE_TIMEOUT_S without a request, after LIFETIME_S in any case, at logout, and when an Admin
disables the account. Each session has its own CSRF token: every state-changing form carries it
in the hidden field `csrf_token`, and a POST without the session's token is refused with 403
(synchronizer token; SameSite=Strict is the second wall).

The login form has no session yet: its token is the value of a short-lived pre-session cookie
(double submit), and a POST that a browser marks cross-site (`Origin` of another host,
`Sec-Fetch-Site: cross-site`) is refused, so another site cannot log a browser in.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

import attrs
from starlette.requests import Request
from starlette.responses import Response

from authsrv.store.db import Role

COOKIE = "authsrv_panel"
LOGIN_COOKIE = "authsrv_panel_login"
COOKIE_PATH = "/panel"
CSRF_FIELD = "csrf_token"
IDLE_TIMEOUT_S = 15 * 60
LIFETIME_S = 8 * 60 * 60
LOGIN_COOKIE_S = 30 * 60
SESSIONS_MAX = 10_000
TOKEN_BYTES = 32

# No inline script or style, nothing from another origin, no framing, forms post only here.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "cache-control": "no-store",
    "pragma": "no-cache",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


@attrs.frozen
class Operator:
    """Who is using the panel in this request."""

    username: str
    role: Role
    csrf_token: str


@attrs.define
class _Session:
    operator: Operator
    last_seen: float
    born: float
    flash: str = ""  # one message for the next page (post-redirect-get)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class PanelSessions:
    """token -> operator, bounded (the least recently used is dropped first)."""

    def __init__(self, *, idle_s: float = IDLE_TIMEOUT_S, lifetime_s: float = LIFETIME_S,
                 clock: Callable[[], float] = time.monotonic, sessions_max: int = SESSIONS_MAX) -> None:
        assert 0 < idle_s <= lifetime_s and sessions_max > 0
        self.idle_s = idle_s
        self.lifetime_s = lifetime_s
        self.clock = clock
        self.sessions_max = sessions_max
        self._sessions: collections.OrderedDict[bytes, _Session] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, username: str, role: Role) -> str:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.clock()
        while len(self._sessions) >= self.sessions_max:
            self._sessions.popitem(last=False)
        operator = Operator(username=username, role=role, csrf_token=secrets.token_urlsafe(TOKEN_BYTES))
        self._sessions[_digest(token)] = _Session(operator, now, now)
        return token

    def _live(self, token: str | None) -> tuple[bytes, _Session] | None:
        if not token or len(token) > 2 * TOKEN_BYTES:
            return None
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen >= self.idle_s or now - session.born >= self.lifetime_s:
            del self._sessions[key]
            return None
        return key, session

    def lookup(self, token: str | None) -> Operator | None:
        """The operator of a live session (and the session's idle clock restarts), else None."""
        live = self._live(token)
        if live is None:
            return None
        key, session = live
        session.last_seen = self.clock()
        self._sessions.move_to_end(key)
        return session.operator

    def close(self, token: str | None) -> bool:
        live = self._live(token)
        if live is None:
            return False
        del self._sessions[live[0]]
        return True

    def close_where(self, predicate: Callable[[Operator], bool]) -> int:
        doomed = [key for key, session in self._sessions.items() if predicate(session.operator)]
        for key in doomed:
            del self._sessions[key]
        return len(doomed)

    def set_flash(self, token: str | None, message: str) -> None:
        live = self._live(token)
        if live is not None:
            live[1].flash = message[:500]

    def take_flash(self, token: str | None) -> str:
        live = self._live(token)
        if live is None:
            return ""
        message, live[1].flash = live[1].flash, ""
        return message


def session_token(request: Request) -> str | None:
    return request.cookies.get(COOKIE)


def _cookie_header(name: str, value: str, *, max_age: int | None) -> bytes:
    # Written by hand: Starlette spells the attribute `SameSite=strict`; browsers accept either, but
    # the header is what operators and scanners read.
    assert value.replace("-", "").replace("_", "").isalnum() or value == ""
    parts = [f"{name}={value}", f"Path={COOKIE_PATH}", "Secure", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts).encode("latin-1")


def set_cookie(response: Response, name: str, value: str, *, max_age: int | None = None) -> None:
    response.raw_headers.append((b"set-cookie", _cookie_header(name, value, max_age=max_age)))


def set_session_cookie(response: Response, token: str) -> None:
    set_cookie(response, COOKIE, token)


def clear_session_cookie(response: Response) -> None:
    set_cookie(response, COOKIE, "", max_age=0)


def tokens_match(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())


def cross_site(request: Request) -> bool:
    """True when the browser says this request comes from another site."""
    site = request.headers.get("sec-fetch-site", "")
    if site == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        # Chromium sends `Origin: null` for a same-origin form POST from a page served with
        # `Referrer-Policy: no-referrer` (as panel pages are); `Sec-Fetch-Site` then says it is ours.
        return origin == "null" and site != "same-origin"
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] != host


def new_login_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)
