"""The simulator's own RSA key: published by `GET /public-key`, used to decrypt OTP notifications.

Independent of authsrv's JWE code on purpose: the simulator is the other side of the wire, so a
mistake shared by both sides would not show. joserfc with an explicit registry, since its default
one refuses RSA-OAEP-256; the registry names exactly the documents' algorithms.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

KEY_BITS = 2048
KEY_FILE_BYTES_MAX = 16 * 1024
ALGS = ("RSA-OAEP-256", "RSA-OAEP")  # "Allowed algorithms for key encryption" (reference documents)
ENC = "A256GCM"

_REGISTRY = jwe.JWERegistry(algorithms=[*ALGS, ENC], strict_check_header=False)
# What joserfc and cryptography raise on hostile input (as authsrv.rest.jwe lists them).
DECRYPT_ERRORS = (JoseError, ValueError, TypeError, KeyError, IndexError, AttributeError)


class SimKey:
    """An RSA private key. The repr never shows key material."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        assert isinstance(private_key, rsa.RSAPrivateKey)
        assert private_key.key_size >= KEY_BITS
        self._jose_key = RSAKey.import_key(private_key)  # built once: loading costs ~36 ms
        self.public_pem: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_b64: str = base64.b64encode(self.public_pem).decode("ascii")

    def __repr__(self) -> str:
        return f"SimKey({self._jose_key.thumbprint()!r})"

    @classmethod
    def generate(cls) -> SimKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS))

    @classmethod
    def load(cls, path: Path) -> SimKey:
        """An unencrypted PEM RSA private key (PKCS#8 or PKCS#1), e.g. one `write` made."""
        data = Path(path).read_bytes()
        assert len(data) <= KEY_FILE_BYTES_MAX, f"{path}: larger than {KEY_FILE_BYTES_MAX} bytes"
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < KEY_BITS:
            raise ValueError(f"{path}: need an RSA private key of at least {KEY_BITS} bits")
        return cls(key)

    def decrypt(self, token: str) -> bytes:
        """The plaintext of a compact JWE to this key; raises one of DECRYPT_ERRORS."""
        decrypted = jwe.decrypt_compact(token, self._jose_key, registry=_REGISTRY)
        assert decrypted.protected["alg"] in ALGS and decrypted.protected["enc"] == ENC
        plaintext = decrypted.plaintext
        assert isinstance(plaintext, bytes)
        return plaintext
