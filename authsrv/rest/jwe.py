"""JWE for card data on the management API, as the reference documents describe it (docs/contract.md,
REST conventions).

Inbound: a request with `Encrypted-Request: true` carries `{"payload": "<compact JWE>"}`, encrypted to
the server's RSA key (`GET /secure/public_key`, `GET /customers/public_key`) with `alg` RSA-OAEP-256
or RSA-OAEP and `enc` A256GCM. Outbound: a client that sends its RSA public key in `Public-Key`
(base64 of a PEM SubjectPublicKeyInfo) gets 2xx bodies, except 204, back as `{"payload": JWE}` with
RSA-OAEP-256 / A256GCM. Errors are never encrypted (reference documents, "Response").

`JweCodec` is pure and synchronous; the few Starlette helpers at the bottom are the glue every
card-data handler uses. No detail of a `JweProblem` echoes a payload, a plaintext or a key.

Why joserfc with explicit registries: its default registry refuses RSA-OAEP-256, and a registry that
names exactly our algorithms is also what rejects everything else (`dir`, `RSA1_5`, A128GCM, `zip`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from authsrv.cardsec import KeyFileError
from ledger.files import write_new_private_file
from authsrv.rest.errors import Title, problem

SERVER_KEY_FILE = "jwe.key"  # DIR/keys/jwe.key, written by `authsrv init`
SERVER_KEY_BITS = 2048
CLIENT_KEY_BITS_MIN = 2048  # RFC 7518 section 4.2/4.3: RSA-OAEP needs a 2048-bit key or larger
CLIENT_KEY_BITS_MAX = 8192
PUBLIC_KEY_HEADER_CHARS_MAX = 4096  # base64 of an 8192-bit SubjectPublicKeyInfo PEM is ~2 KiB
CLIENT_KEYS_CACHED_MAX = 256  # parsed Public-Key header values kept (a parse costs ~50-100 us)
# A card-data body is < 1 KiB of JSON; its JWE is ~1.4x that plus ~400 chars of header and key.
JWE_PAYLOAD_CHARS_MAX = 32 * 1024
SERVER_KEY_FILE_BYTES_MAX = 16 * 1024

ALG_RESPONSE = "RSA-OAEP-256"
ENC = "A256GCM"
ALGS_REQUEST = ("RSA-OAEP-256", "RSA-OAEP")  # reference documents, "JWE configuration"
JSON_MEDIA_TYPE = "application/json"

HEADER_ENCRYPTED_REQUEST = "encrypted-request"
HEADER_PUBLIC_KEY = "public-key"
# docs/contract.md (REST conventions) says Encrypt-Response, the documents' quick start
# Encrypted-Response: accept both.
HEADERS_WANT_ENCRYPTED_RESPONSE = ("encrypted-request", "encrypt-response", "encrypted-response")

_DECRYPT_REGISTRY = jwe.JWERegistry(
    algorithms=[*ALGS_REQUEST, ENC],
    # Unknown protected header names are harmless (crit is still enforced); other JOSE libraries
    # may add their own, and refusing them would only break interop.
    strict_check_header=False,
)
_ENCRYPT_REGISTRY = jwe.JWERegistry(algorithms=[ALG_RESPONSE, ENC])
_RESPONSE_HEADER = {"alg": ALG_RESPONSE, "enc": ENC, "cty": JSON_MEDIA_TYPE}

# What joserfc and cryptography raise on hostile input: JoseError for JOSE rules, ValueError for
# base64/JSON/RSA failures (binascii.Error and JSONDecodeError are ValueErrors), the others for
# structurally wrong headers (e.g. a JSON list where an object belongs).
_DECRYPT_ERRORS = (JoseError, ValueError, TypeError, KeyError, IndexError, AttributeError)


class JweProblem(Exception):
    """A request that cannot be decrypted or a response that cannot be encrypted: a 4xx problem.

    `detail` names the rule that failed, never the payload, the plaintext or the key."""

    def __init__(self, status: int, title: Title, detail: str) -> None:
        assert 400 <= status <= 499, status
        super().__init__(f"{title.value}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


class _Encrypted(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    payload: Annotated[str, msgspec.Meta(min_length=1, max_length=JWE_PAYLOAD_CHARS_MAX)]


_wrapper_decoder = msgspec.json.Decoder(_Encrypted)
_wrapper_encoder = msgspec.json.Encoder()


# --------------------------------------------------------------------------------------------
# The server key


class ServerKey:
    """The server's RSA private key for inbound JWE. The repr never shows key material."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        assert isinstance(private_key, rsa.RSAPrivateKey)
        assert private_key.key_size >= CLIENT_KEY_BITS_MIN
        self._private_key = private_key
        # Built once: joserfc key objects cache their JWK form, and loading a PEM costs ~36 ms.
        self.jose_key = RSAKey.import_key(private_key)
        self.kid: str = self.jose_key.thumbprint()  # RFC 7638
        self.public_pem: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def __repr__(self) -> str:
        return f"ServerKey(kid={self.kid!r})"

    @property
    def public_jwk(self) -> dict:
        """RFC 7517 public JWK (n, e only), with the kid, alg and use clients should encrypt with."""
        jwk = self.jose_key.as_dict(private=False)
        jwk.update(kid=self.kid, alg=ALG_RESPONSE, use="enc")
        assert "d" not in jwk and "p" not in jwk
        return jwk

    @classmethod
    def create(cls, path: Path) -> ServerKey:
        """Generate a key and write it as PKCS#8 PEM (mode 0600). Never overwrites a file."""
        path = Path(path)
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=SERVER_KEY_BITS)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_new_private_file(path, pem)
        loaded = cls.load(path)  # read back what we wrote
        assert loaded.kid == cls(private_key).kid
        return loaded

    @classmethod
    def load(cls, path: Path) -> ServerKey:
        """Read a key written by `create`; KeyFileError names the file, never its content."""
        path = Path(path)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise KeyFileError(f"{path}: JWE key file is missing") from None
        if stat.S_IMODE(mode) & 0o077:
            permissions = stat.S_IMODE(mode)
            raise KeyFileError(f"{path}: JWE key file is open to group or others (mode {permissions:o})")
        try:
            with open(path, "rb") as file:
                pem = file.read(SERVER_KEY_FILE_BYTES_MAX + 1)
        except OSError as error:
            raise KeyFileError(f"{path}: cannot read JWE key file: {type(error).__name__}") from None
        if len(pem) > SERVER_KEY_FILE_BYTES_MAX:
            raise KeyFileError(f"{path}: JWE key file is larger than {SERVER_KEY_FILE_BYTES_MAX} bytes")
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
        if not isinstance(private_key, rsa.RSAPrivateKey) or private_key.key_size < CLIENT_KEY_BITS_MIN:
            raise KeyFileError(f"{path}: JWE key must be RSA of at least {CLIENT_KEY_BITS_MIN} bits")
        return cls(private_key)

    @classmethod
    def load_or_create(cls, path: Path) -> ServerKey:
        """For data directories made before the JWE key existed: create it on first use."""
        try:
            return cls.load(path)
        except KeyFileError:
            if Path(path).exists():
                raise  # a bad key is the operator's to fix, never silently replaced
        try:
            return cls.create(path)
        except FileExistsError:
            return cls.load(path)  # another process created it between our two steps


_write_new_private_file = write_new_private_file  # no key is ever replaced; a crash leaves no half key


# --------------------------------------------------------------------------------------------
# Client keys


class _KeyFault(enum.Enum):
    """Why a Public-Key header was refused (the detail of INVALID_PUBLIC_KEY)."""

    too_long = f"longer than {PUBLIC_KEY_HEADER_CHARS_MAX} characters"
    not_base64 = "not base64"
    not_pem = "not a PEM (or DER) SubjectPublicKeyInfo public key"
    not_rsa = "not an RSA key"
    size = f"RSA key must be {CLIENT_KEY_BITS_MIN} to {CLIENT_KEY_BITS_MAX} bits"
    exponent = "RSA public exponent must be odd and at least 3"


@functools.lru_cache(maxsize=CLIENT_KEYS_CACHED_MAX)
def _parse_client_key(value: str) -> RSAPublicKey | _KeyFault:
    """Cached by the header value: a client sends the same key with every request. Pure."""
    if len(value) > PUBLIC_KEY_HEADER_CHARS_MAX:
        return _KeyFault.too_long
    compact = "".join(value.split()).replace("-", "+").replace("_", "/")  # urlsafe -> standard
    compact += "=" * (-len(compact) % 4)  # padding is optional
    try:
        encoded = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return _KeyFault.not_base64
    try:
        if encoded.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(encoded)
        else:
            # Some clients send the PEM body only, i.e. base64 of the DER: the same key.
            key = serialization.load_der_public_key(encoded)
    except (ValueError, TypeError):
        return _KeyFault.not_pem
    if not isinstance(key, RSAPublicKey):
        return _KeyFault.not_rsa
    if not CLIENT_KEY_BITS_MIN <= key.key_size <= CLIENT_KEY_BITS_MAX:
        return _KeyFault.size
    exponent = key.public_numbers().e
    if exponent < 3 or exponent % 2 == 0:
        return _KeyFault.exponent  # e = 1 would "encrypt" the content key in the clear
    return key


def _is_true(headers: Mapping[str, str], name: str) -> bool:
    return headers.get(name, "").strip().lower() == "true"


# --------------------------------------------------------------------------------------------
# The codec


class JweCodec:
    """Decrypts requests with the server key and encrypts responses to a client key. Pure, sync.

    `headers` is Starlette's case-insensitive `Headers`, or any mapping with lower-case names."""

    def __init__(self, server_key: ServerKey) -> None:
        self.server_key = server_key

    def decrypt_request(self, headers: Mapping[str, str], body: bytes, *, required: bool) -> bytes:
        """The plaintext JSON of an `Encrypted-Request: true` body, else `body` unchanged."""
        if not _is_true(headers, HEADER_ENCRYPTED_REQUEST):
            if required:
                detail = "this request must be sent encrypted (Encrypted-Request: true)"
                raise JweProblem(400, Title.ENCRYPTION_REQUIRED, detail)
            return body
        if not body.strip():
            return b""  # reference documents: an empty POST follows the rules of a GET
        try:
            wrapper = _wrapper_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError):
            # msgspec's message is not echoed: it could quote a field of the body.
            detail = (f'an encrypted request body must be {{"payload": "<compact JWE>"}}'
                      f" of at most {JWE_PAYLOAD_CHARS_MAX} characters")
            raise JweProblem(400, Title.INVALID_PAYLOAD, detail) from None
        try:
            decrypted = jwe.decrypt_compact(
                wrapper.payload, self.server_key.jose_key, registry=_DECRYPT_REGISTRY
            )
        except _DECRYPT_ERRORS:
            detail = (f"payload is not a compact JWE to this server's key (kid {self.server_key.kid})"
                      f" with alg {' or '.join(ALGS_REQUEST)} and enc {ENC}")
            raise JweProblem(400, Title.CANT_DECRYPT_PAYLOAD, detail) from None
        assert decrypted.protected["enc"] == ENC
        assert decrypted.protected["alg"] in ALGS_REQUEST
        plaintext = decrypted.plaintext
        assert isinstance(plaintext, bytes)
        return plaintext

    def client_key(self, headers: Mapping[str, str], *, required: bool) -> RSAPublicKey | None:
        """The client's RSA public key from `Public-Key`; None when absent and not required."""
        value = headers.get(HEADER_PUBLIC_KEY)
        if value is None or not value.strip():
            if required:
                detail = "this response is sent encrypted only: send your RSA public key in Public-Key"
                raise JweProblem(400, Title.ENCRYPTION_REQUIRED, detail)
            return None
        parsed = _parse_client_key(value)
        if isinstance(parsed, _KeyFault):
            detail = f"Public-Key must be base64 of a PEM RSA public key: {parsed.value}"
            raise JweProblem(400, Title.INVALID_PUBLIC_KEY, detail)
        return parsed

    def wants_encrypted_response(self, headers: Mapping[str, str]) -> bool:
        if not headers.get(HEADER_PUBLIC_KEY, "").strip():
            return False
        return any(_is_true(headers, name) for name in HEADERS_WANT_ENCRYPTED_RESPONSE)

    def encrypt_response(self, body: bytes, client_key: RSAPublicKey) -> bytes:
        """`{"payload": "<compact JWE>"}` of `body` to `client_key` (RSA-OAEP-256, A256GCM)."""
        assert isinstance(client_key, RSAPublicKey)
        assert client_key.key_size >= CLIENT_KEY_BITS_MIN
        token = jwe.encrypt_compact(
            _RESPONSE_HEADER, body, RSAKey.import_key(client_key), registry=_ENCRYPT_REGISTRY
        )
        return _wrapper_encoder.encode(_Encrypted(payload=token))


# --------------------------------------------------------------------------------------------
# Starlette glue


async def read_json(request: Request, codec: JweCodec, *, encrypted: bool) -> bytes:
    """The request's JSON bytes, decrypted when sent encrypted; `encrypted`: the body carries card
    data, so it must be. Raises JweProblem. A Public-Key sent for the response is checked here
    too, so a bad key fails the request before the handler acts, not after."""
    body = await request.body()
    plaintext = codec.decrypt_request(request.headers, body, required=encrypted)
    if codec.wants_encrypted_response(request.headers):
        codec.client_key(request.headers, required=False)
    return plaintext


def check_client_key(request: Request, codec: JweCodec, *, encrypted: bool) -> None:
    """Fail early, before any side effect, when `respond(..., encrypted=...)` would fail."""
    if encrypted or codec.wants_encrypted_response(request.headers):
        codec.client_key(request.headers, required=encrypted)


def respond(
    request: Request, codec: JweCodec, body: bytes, *, status: int = 200, encrypted: bool
) -> Response:
    """A 2xx JSON response; `encrypted`: the body carries card data and goes out only as a JWE.

    Otherwise it is encrypted when the client asked for it. 204 has no body and is never encrypted;
    errors go through `problem`/`problem_of` and are never encrypted (reference documents)."""
    assert 200 <= status <= 299, status
    if status == 204:
        assert not body
        return Response(status_code=204)
    try:
        if encrypted or codec.wants_encrypted_response(request.headers):
            client_key = codec.client_key(request.headers, required=encrypted)
            assert client_key is not None
            body = codec.encrypt_response(body, client_key)
    except JweProblem as error:
        return problem_of(error)
    return Response(body, status_code=status, media_type=JSON_MEDIA_TYPE)


def problem_of(error: JweProblem) -> Response:
    return problem(error.status, error.title, error.detail)


def public_key_routes(codec: JweCodec) -> list[Route]:
    """`GET /secure/public_key` and `GET /customers/public_key`: the key to encrypt requests to."""
    key = codec.server_key
    body = msgspec.json.encode({
        "publicKey": base64.b64encode(key.public_pem).decode("ascii"),
        "kid": key.kid,
        "jwk": key.public_jwk,
    })

    async def public_key(request: Request) -> Response:
        return Response(body, media_type=JSON_MEDIA_TYPE)

    return [
        Route("/secure/public_key", public_key, methods=["GET"], name="jwe.secure_public_key"),
        Route("/customers/public_key", public_key, methods=["GET"], name="jwe.customers_public_key"),
    ]
