"""3DS one-time passwords: challenges in the store, the OTP only as an HMAC, delivery via the outbox.

A challenge and its `/notifications/otp` delivery row are written in one store transaction, so the
OTP reaches the partner exactly when the challenge exists. The delivery body is already the JWE
envelope to the partner's public key: the clear OTP exists only in memory while the challenge is
made, never in the store, a log or the delivery table.

    PENDING --right OTP--> VERIFIED
    PENDING --wrong OTP, failures_max-th--> FAILED
    PENDING --past expires_at--> (answered CHALLENGE_EXPIRED; nothing to write)
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

import attrs

from authsrv.notify.calls import CALL_PATHS, CallKind, PartnerCall, external_balance_id
from authsrv.notify.outbox import OutboxStore, now_ms
from authsrv.store.db import Store, utc_now_iso

OTP_DIGITS = 6
OTP_KEY_FILE = "otp-mac.key"
OTP_KEY_BYTES = 32
MERCHANT_NAME_LENGTH_MAX = 128

PENDING = "PENDING"
VERIFIED = "VERIFIED"
FAILED = "FAILED"


class VerifyResult(enum.IntEnum):
    """Precedence order; never renumber."""

    verified = 0
    challenge_not_found = 1
    challenge_failed = 2
    challenge_expired = 3
    otp_invalid = 4


@attrs.frozen
class Challenge:
    id: int
    partner: str
    user_id: int
    card_id: int
    amount: int
    currency: str
    merchant_name: str
    state: str
    failures: int
    expires_at_ms: int


def load_or_create_mac_key(data_dir: Path) -> bytes:
    path = Path(data_dir) / "keys" / OTP_KEY_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_bytes(OTP_KEY_BYTES))
            file.flush()
            os.fsync(file.fileno())
    key = path.read_bytes()
    assert len(key) == OTP_KEY_BYTES, f"{path}: expected {OTP_KEY_BYTES} bytes"
    return key


def new_otp() -> str:
    return f"{secrets.randbelow(10**OTP_DIGITS):0{OTP_DIGITS}d}"


def otp_mac(key: bytes, challenge_id: int, otp: str) -> str:
    """Bound to the challenge: the same OTP of another challenge has another MAC."""
    return hmac.new(key, f"{challenge_id}:{otp}".encode(), hashlib.sha256).hexdigest()


def otp_plaintext(challenge: Challenge, balance_id: int, otp: str) -> bytes:
    """The body of `POST /notifications/otp` before encryption ("3DS External OTP Notifier")."""
    return json.dumps({
        "storageCustomerId": challenge.user_id, "storageCardId": challenge.card_id,
        "balanceId": external_balance_id(balance_id), "amount": challenge.amount,
        "currency": challenge.currency, "merchantName": challenge.merchant_name, "otp": otp,
    }, separators=(",", ":")).encode()


_COLUMNS = "id, partner, user_id, card_id, amount, currency, merchant_name, state, failures, expires_at_ms"


class OtpStore:
    def __init__(self, store: Store, mac_key: bytes) -> None:
        self._store = store
        self._key = mac_key
        self._outbox = OutboxStore(store)

    def create(self, *, partner: str, user_id: int, card_id: int, balance_id: int, amount: int, currency: str,
               merchant_name: str, ttl_s: int, tries_max: int,
               envelope: Callable[[bytes], bytes]) -> Challenge:
        """A challenge and its OTP delivery, in one transaction. `envelope(plaintext)` encrypts."""
        otp = new_otp()
        with self._store.transaction():
            (last,) = self._store.db.execute("SELECT COALESCE(MAX(id), 0) FROM otp_challenges").fetchone()
            challenge = Challenge(id=int(last) + 1, partner=partner, user_id=user_id, card_id=card_id, amount=amount,
                                  currency=currency, merchant_name=merchant_name, state=PENDING, failures=0,
                                  expires_at_ms=now_ms() + ttl_s * 1000)
            self._store.db.execute(
                f"INSERT INTO otp_challenges ({_COLUMNS}, otp_mac, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*attrs.astuple(challenge), otp_mac(self._key, challenge.id, otp), utc_now_iso()))
            method, path = CALL_PATHS[CallKind.otp]
            call = PartnerCall(partner=partner, kind=CallKind.otp, method=method, path=path,
                               body=envelope(otp_plaintext(challenge, balance_id, otp)),
                               idempotency_key=str(uuid.uuid4()), order_key=f"balance:{balance_id}",
                               source=f"otp:{challenge.id}")
            self._outbox.schedule([call], tries_max=tries_max)
        return challenge

    def get(self, challenge_id: int) -> Challenge | None:
        with self._store.locked():
            found = self._store.db.execute(f"SELECT {_COLUMNS} FROM otp_challenges WHERE id = ?",
                                           (challenge_id,)).fetchone()
        return Challenge(*found) if found else None

    def verify(self, challenge_id: int, partner: str, otp: str, *, failures_max: int) -> tuple[VerifyResult, Challenge | None]:
        with self._store.transaction():
            challenge = self.get(challenge_id)
            if challenge is None or challenge.partner != partner:
                return VerifyResult.challenge_not_found, None
            (stored,) = self._store.db.execute("SELECT otp_mac FROM otp_challenges WHERE id = ?",
                                               (challenge_id,)).fetchone()
            right = hmac.compare_digest(stored, otp_mac(self._key, challenge_id, otp))
            if challenge.state == VERIFIED:
                return (VerifyResult.verified if right else VerifyResult.otp_invalid), challenge
            if challenge.state == FAILED:
                return VerifyResult.challenge_failed, challenge
            if now_ms() >= challenge.expires_at_ms:
                return VerifyResult.challenge_expired, challenge
            if right:
                self._set(challenge_id, VERIFIED, challenge.failures)
                return VerifyResult.verified, attrs.evolve(challenge, state=VERIFIED)
            failures = challenge.failures + 1
            state = FAILED if failures >= failures_max else PENDING
            self._set(challenge_id, state, failures)
            result = VerifyResult.challenge_failed if state == FAILED else VerifyResult.otp_invalid
            return result, attrs.evolve(challenge, state=state, failures=failures)

    def _set(self, challenge_id: int, state: str, failures: int) -> None:
        self._store.db.execute("UPDATE otp_challenges SET state = ?, failures = ? WHERE id = ?",
                               (state, failures, challenge_id))
