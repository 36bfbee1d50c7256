"""`python -m authsrv.rest.jwetool`: the client side of the API's JWE, for curl users and docs/api.md.

    keygen FILE             write a new RSA-2048 private key (PEM, mode 0600)
    public-header FILE      print the `Public-Key` header value (base64 of the public PEM)
    decrypt FILE            read `{"payload": JWE}` on stdin, print the plaintext JSON
    encrypt SERVER_KEY_B64  read JSON on stdin, print `{"payload": JWE}` for `Encrypted-Request: true`
                            (SERVER_KEY_B64: `publicKey` of GET /customers/public_key)

RSA-OAEP-256 and A256GCM, as the reference documents ask. Errors go to stderr with exit status 1.
"""

from __future__ import annotations

import base64
import json
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

_REGISTRY = jwe.JWERegistry(algorithms=["RSA-OAEP-256", "A256GCM"])
USAGE = __doc__.split("\n\n")[1]
INPUT_BYTES_MAX = 1024 * 1024


def _keygen(path: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _private(path: str) -> RSAKey:
    with open(path, "rb") as handle:
        return RSAKey.import_key(handle.read())


def _public_header(path: str) -> str:
    private = serialization.load_pem_private_key(open(path, "rb").read(), password=None)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(pem).decode("ascii")


def _stdin_json() -> object:
    return json.loads(sys.stdin.buffer.read(INPUT_BYTES_MAX))


def _decrypt(path: str) -> str:
    wrapper = _stdin_json()
    if not isinstance(wrapper, dict) or not isinstance(wrapper.get("payload"), str):
        raise ValueError(f"expected {{\"payload\": JWE}}, got: {json.dumps(wrapper)[:300]}")
    token = jwe.decrypt_compact(wrapper["payload"], _private(path), registry=_REGISTRY)
    return token.plaintext.decode("utf-8")


def _encrypt(server_key_b64: str) -> str:
    key = RSAKey.import_key(base64.b64decode(server_key_b64))
    plaintext = json.dumps(_stdin_json(), separators=(",", ":")).encode()
    token = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM"}, plaintext, key, registry=_REGISTRY)
    return json.dumps({"payload": token})


def main(argv: list[str]) -> int:
    commands = {"keygen": _keygen, "public-header": _public_header, "decrypt": _decrypt, "encrypt": _encrypt}
    if len(argv) != 2 or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        output = commands[argv[0]](argv[1])
    except (OSError, ValueError, JoseError) as error:
        print(f"jwetool {argv[0]}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if output is not None:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
