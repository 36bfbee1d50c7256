"""Bearer session tokens for the customer (mobile) and admin channels.

Sessions live in memory only: they are short (10 minutes by default), and a restart logging every
app out is the safe failure. The table stores a SHA-256 of each token, never the token, so a
memory dump does not hand out sessions. It is bounded: past SESSIONS_MAX the oldest is dropped.
Time is `time.monotonic` (injectable for tests): a wall-clock step never extends a session.
"""

from __future__ import annotations

import collections
import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import attrs

SESSIONS_MAX = 100_000
TOKEN_BYTES = 32

Subject = TypeVar("Subject")


@attrs.frozen
class Session(Generic[Subject]):
    subject: Subject
    expires_at: float  # monotonic seconds


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class SessionTable(Generic[Subject]):
    """token -> subject until `ttl_s` has passed. Subjects are small frozen values."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sessions_max: int = SESSIONS_MAX) -> None:
        assert ttl_s > 0 and sessions_max > 0
        self.ttl_s = ttl_s
        self.clock = clock
        self.sessions_max = sessions_max
        self._sessions: collections.OrderedDict[bytes, Session[Subject]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def issue(self, subject: Subject) -> str:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self._expire()
        while len(self._sessions) >= self.sessions_max:
            self._sessions.popitem(last=False)
        self._sessions[_digest(token)] = Session(subject, self.clock() + self.ttl_s)
        return token

    def lookup(self, token: str) -> Subject | None:
        """The subject of a live session, None for an unknown or expired token."""
        if not token or len(token) > 2 * TOKEN_BYTES:
            return None
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires_at <= self.clock():
            del self._sessions[key]
            return None
        return session.subject

    def revoke(self, token: str) -> bool:
        """Drop one session (logout); False when the token was unknown or already gone."""
        if not token or len(token) > 2 * TOKEN_BYTES:
            return False
        return self._sessions.pop(_digest(token), None) is not None

    def revoke_where(self, predicate: Callable[[Subject], bool]) -> int:
        """Drop every session whose subject matches (e.g. a device re-paired, a user's wPIN changed)."""
        doomed = [key for key, session in self._sessions.items() if predicate(session.subject)]
        for key in doomed:
            del self._sessions[key]
        return len(doomed)

    def _expire(self) -> None:
        # Insertion order is expiry order (one ttl for the table), so expired sessions are at the front.
        now = self.clock()
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if session.expires_at > now:
                break
            del self._sessions[key]
