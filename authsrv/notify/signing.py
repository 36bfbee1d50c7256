"""Signatures on calls to partners (beyond the reference documents, the way Lithic signs webhooks).

    X-Authsrv-Timestamp: <unix seconds>
    X-Authsrv-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>

`secret` is the ASCII text of `DIR/keys/notify-NAME.key` (64 hex digits, 0600, made on first use):
the partner is given the same text and uses it as the HMAC key as is. The timestamp is taken at each
try, so a retry hours later still verifies within the 5-minute tolerance; the body is the exact
bytes on the wire (for the OTP notification, the `{"payload": JWE}` envelope).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

SECRET_BYTES = 32
SIGNATURE_VERSION = "v1"
TOLERANCE_S = 300  # what docs/partners.md tells partners to accept
TIMESTAMP_HEADER = "X-Authsrv-Timestamp"
SIGNATURE_HEADER = "X-Authsrv-Signature"
_SECRET_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def secret_path(data_dir: Path, partner: str) -> Path:
    return Path(data_dir) / "keys" / f"notify-{partner}.key"


def load_or_create_secret(data_dir: Path, partner: str) -> bytes:
    """The partner's signing secret (ASCII hex), created 0600 with O_EXCL if missing."""
    path = secret_path(data_dir, partner)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_hex(SECRET_BYTES).encode() + b"\n")
            file.flush()
            os.fsync(file.fileno())
    secret = path.read_bytes().strip()
    if not _SECRET_PATTERN.match(secret.decode("ascii", "replace")):
        raise ValueError(f"{path}: expected {SECRET_BYTES * 2} lowercase hex digits")
    return secret


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    assert secret and timestamp > 0
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={mac}"


def signed_headers(secret: bytes, timestamp: int, body: bytes) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(secret: bytes, timestamp_header: str, signature_header: str, body: bytes, *, now: int,
           tolerance_s: int = TOLERANCE_S) -> bool:
    """What a partner does (docs/partners.md has the same in ten lines)."""
    if not timestamp_header.isdigit() or abs(now - int(timestamp_header)) > tolerance_s:
        return False
    expected = signature(secret, int(timestamp_header), body)
    return hmac.compare_digest(expected, signature_header)
