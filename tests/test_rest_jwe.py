"""JWE on the management API: interop with an independent JOSE implementation (jwcrypto), every
error title of the reference documents, the Starlette glue, and the server key file."""

from __future__ import annotations

import base64
import json
import os
import stat
import warnings

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk
from starlette import exceptions as starlette_exceptions
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Route

# Starlette 1.10 deprecates its test client over httpx (for httpx2, which nothing else here uses);
# it still works.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", getattr(starlette_exceptions, "StarletteDeprecationWarning", DeprecationWarning))
    from starlette.testclient import TestClient

from authsrv.cardsec import KeyFileError
from authsrv.rest import jwe
from authsrv.rest.errors import Title

PAN = "5555444455554444"
CVV = "123"
CARD_REQUEST = json.dumps({"cardNo": PAN, "cvv": CVV}).encode()


@pytest.fixture(scope="module")
def server_key(tmp_path_factory) -> jwe.ServerKey:
    return jwe.ServerKey.create(tmp_path_factory.mktemp("jwe") / "keys" / jwe.SERVER_KEY_FILE)


@pytest.fixture(scope="module")
def codec(server_key) -> jwe.JweCodec:
    return jwe.JweCodec(server_key)


@pytest.fixture(scope="module")
def client_jwk() -> jwcrypto_jwk.JWK:
    """The client's own key pair, made by the other implementation."""
    return jwcrypto_jwk.JWK.generate(kty="RSA", size=2048)


@pytest.fixture(scope="module")
def client_header(client_jwk) -> str:
    return base64.b64encode(client_jwk.export_to_pem()).decode("ascii")


@pytest.fixture(scope="module")
def app(codec) -> Starlette:
    """A tiny app that uses the glue the way a card-data handler does."""

    async def card_echo(request: Request):  # request and response carry card data
        try:
            body = await jwe.read_json(request, codec, encrypted=True)
        except jwe.JweProblem as error:
            return jwe.problem_of(error)
        return jwe.respond(request, codec, body, encrypted=True)

    async def plain(request: Request):  # no card data: encrypted only on request
        return jwe.respond(request, codec, b'{"id": 7}', status=201, encrypted=False)

    async def empty(request: Request):
        return jwe.respond(request, codec, b"", status=204, encrypted=True)

    routes = [
        *jwe.public_key_routes(codec),
        Route("/echo", card_echo, methods=["POST"]),
        Route("/plain", plain, methods=["GET"]),
        Route("/empty", empty, methods=["POST"]),
    ]
    return Starlette(routes=routes)


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def server_jwk_from_endpoint(http) -> jwcrypto_jwk.JWK:
    response = http.get("/secure/public_key")
    assert response.status_code == 200
    return jwcrypto_jwk.JWK.from_pem(base64.b64decode(response.json()["publicKey"]))


def encrypt_for(key: jwcrypto_jwk.JWK, plaintext: bytes, alg: str = "RSA-OAEP-256", enc: str = "A256GCM",
                **extra) -> str:
    header = json.dumps({"alg": alg, "enc": enc, **extra})
    allowed = [alg, enc]  # jwcrypto refuses e.g. RSA1_5 unless told: we want the server to see it
    return jwcrypto_jwe.JWE(plaintext, header, recipient=key, algs=allowed).serialize(compact=True)


def decrypt_with(key: jwcrypto_jwk.JWK, wrapper: bytes) -> tuple[bytes, dict]:
    document = json.loads(wrapper)
    assert list(document) == ["payload"]
    token = jwcrypto_jwe.JWE()
    token.deserialize(document["payload"], key=key)
    return token.payload, token.jose_header


def wrap(token: str) -> bytes:
    return json.dumps({"payload": token}).encode()


def encrypted_headers(**more: str) -> Headers:
    return Headers(headers={"Encrypted-Request": "true", **more})


def assert_problem(error: jwe.JweProblem, status: int, title: Title, *secrets: str) -> None:
    assert (error.status, error.title) == (status, title)
    for secret in (PAN, CVV + '"', *secrets):
        assert secret not in error.detail
        assert secret not in str(error)


# --------------------------------------------------------------------------------------------
# Interop with jwcrypto


def test_public_key_endpoints_serve_the_server_key(http, server_key):
    bodies = [http.get(path) for path in ("/secure/public_key", "/customers/public_key")]
    for response in bodies:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == bodies[0].json()
    body = bodies[0].json()
    assert base64.b64decode(body["publicKey"], validate=True) == server_key.public_pem
    assert body["publicKey"].isascii() and "\n" not in body["publicKey"]
    public = jwcrypto_jwk.JWK(**body["jwk"])
    assert not public.has_private
    assert set(body["jwk"]) == {"kty", "n", "e", "kid", "alg", "use"}
    assert (body["jwk"]["alg"], body["jwk"]["use"]) == ("RSA-OAEP-256", "enc")
    assert body["kid"] == body["jwk"]["kid"] == server_key.kid == public.thumbprint()  # RFC 7638
    assert public.thumbprint() == server_jwk_from_endpoint(http).thumbprint()


@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA-OAEP"])
def test_codec_decrypts_a_jwcrypto_request(http, codec, alg):
    token = encrypt_for(server_jwk_from_endpoint(http), CARD_REQUEST, alg=alg, kid=codec.server_key.kid)
    assert codec.decrypt_request(encrypted_headers(), wrap(token), required=True) == CARD_REQUEST
    # The header value is case-insensitive, and an unencrypted body passes through when allowed.
    headers = Headers(headers={"encrypted-request": " True "})
    assert codec.decrypt_request(headers, wrap(token), required=False) == CARD_REQUEST
    assert codec.decrypt_request(Headers(), b'{"id": 1}', required=False) == b'{"id": 1}'


def test_jwcrypto_decrypts_a_codec_response(codec, client_jwk, client_header):
    client_key = codec.client_key(Headers(headers={"Public-Key": client_header}), required=True)
    response = b'{"cardNo": "5555444455554444", "cvv": "123", "exp": "2026-01-31"}'
    wrapper = codec.encrypt_response(response, client_key)
    assert PAN.encode() not in wrapper
    plaintext, header = decrypt_with(client_jwk, wrapper)
    assert plaintext == response
    assert (header["alg"], header["enc"]) == ("RSA-OAEP-256", "A256GCM")
    # Each response has a fresh content key and IV.
    assert codec.encrypt_response(response, client_key) != wrapper


def test_round_trip_through_starlette(http, client_jwk, client_header):
    token = encrypt_for(server_jwk_from_endpoint(http), CARD_REQUEST)
    response = http.post("/echo", content=wrap(token),
                         headers={"Encrypted-Request": "true", "Public-Key": client_header})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert PAN not in response.text
    assert decrypt_with(client_jwk, response.content)[0] == CARD_REQUEST


@pytest.mark.parametrize("flag", ["Encrypted-Request", "Encrypt-Response", "Encrypted-Response"])
def test_any_flag_with_a_public_key_encrypts_a_plain_response(http, client_jwk, client_header, flag):
    response = http.get("/plain", headers={flag: "true", "Public-Key": client_header})
    assert response.status_code == 201
    assert decrypt_with(client_jwk, response.content)[0] == b'{"id": 7}'


@pytest.mark.parametrize("headers", [{}, {"Encrypt-Response": "true"}, {"Encrypt-Response": "false"},
                                     {"Public-Key": "any"}, {"Public-Key": "", "Encrypted-Response": "true"}])
def test_plain_response_unless_asked_with_a_key(http, headers):
    response = http.get("/plain", headers=headers)
    assert (response.status_code, response.content) == (201, b'{"id": 7}')


def test_204_is_never_encrypted(http, client_header):
    response = http.post("/empty", headers={"Encrypted-Request": "true", "Public-Key": client_header})
    assert (response.status_code, response.content) == (204, b"")


def test_errors_are_plain_problems(http, client_header):
    response = http.post("/echo", content=CARD_REQUEST, headers={"Public-Key": client_header})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "ENCRYPTION_REQUIRED"
    assert PAN not in response.text


def test_a_card_response_needs_the_client_key(http):
    token = encrypt_for(server_jwk_from_endpoint(http), CARD_REQUEST)
    response = http.post("/echo", content=wrap(token), headers={"Encrypted-Request": "true"})
    assert response.status_code == 400
    assert response.json()["title"] == "ENCRYPTION_REQUIRED"
    assert PAN not in response.text


def test_read_json_refuses_a_bad_public_key_before_the_handler_acts(http):
    token = encrypt_for(server_jwk_from_endpoint(http), CARD_REQUEST)
    response = http.post("/echo", content=wrap(token),
                         headers={"Encrypted-Request": "true", "Public-Key": "bm90IGEga2V5"})
    assert (response.status_code, response.json()["title"]) == (400, "INVALID_PUBLIC_KEY")


# --------------------------------------------------------------------------------------------
# Request errors


@pytest.mark.parametrize("headers", [{}, {"Encrypted-Request": "false"}, {"Encrypted-Request": "yes"}])
def test_encryption_required(codec, headers):
    with pytest.raises(jwe.JweProblem) as caught:
        codec.decrypt_request(Headers(headers=headers), CARD_REQUEST, required=True)
    assert_problem(caught.value, 400, Title.ENCRYPTION_REQUIRED)


@pytest.mark.parametrize("body", [
    CARD_REQUEST,  # plaintext sent with the flag set
    b"{}",
    b'{"payload": ""}',
    b'{"payload": 5555444455554444}',
    b'{"payload": "a.b.c.d.e", "cardNo": "5555444455554444"}',  # clear data beside the JWE
    b'["5555444455554444"]',
    b"not json 5555444455554444",
    b'{"payload": "' + b"a" * (jwe.JWE_PAYLOAD_CHARS_MAX + 1) + b'"}',
])
def test_invalid_payload(codec, body):
    with pytest.raises(jwe.JweProblem) as caught:
        codec.decrypt_request(encrypted_headers(), body, required=False)
    assert_problem(caught.value, 400, Title.INVALID_PAYLOAD)


def test_empty_encrypted_post_is_like_a_get(codec):
    assert codec.decrypt_request(encrypted_headers(), b"", required=True) == b""


def _tamper(token: str) -> str:
    parts = token.split(".")
    tag = base64.urlsafe_b64decode(parts[4] + "==")
    parts[4] = base64.urlsafe_b64encode(bytes([tag[0] ^ 1]) + tag[1:]).rstrip(b"=").decode()
    return ".".join(parts)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _cant_decrypt_cases(server_jwk: jwcrypto_jwk.JWK) -> dict[str, str]:
    other = jwcrypto_jwk.JWK.generate(kty="RSA", size=2048)
    valid = encrypt_for(server_jwk, CARD_REQUEST)
    header, key, iv, ciphertext, tag = valid.split(".")
    return {
        "garbage": "garbage",
        "five empty parts": "....",
        "random parts": "a.b.c.d.e",
        "header not an object": ".".join([_b64(b'["RSA-OAEP-256"]'), key, iv, ciphertext, tag]),
        "header without alg": ".".join([_b64(b'{"enc": "A256GCM"}'), key, iv, ciphertext, tag]),
        "other key": encrypt_for(other, CARD_REQUEST),
        "A128GCM": encrypt_for(server_jwk, CARD_REQUEST, enc="A128GCM"),
        "A256CBC-HS512": encrypt_for(server_jwk, CARD_REQUEST, enc="A256CBC-HS512"),
        "RSA1_5": encrypt_for(server_jwk, CARD_REQUEST, alg="RSA1_5"),
        "zip": encrypt_for(server_jwk, CARD_REQUEST, zip="DEF"),
        "unknown crit": encrypt_for(server_jwk, CARD_REQUEST, crit=["exp"], exp=1),
        "tampered tag": _tamper(valid),
        "JWE JSON serialization": json.dumps({"protected": header, "ciphertext": ciphertext}),
    }


def test_cant_decrypt_payload(http, codec):
    cases = _cant_decrypt_cases(server_jwk_from_endpoint(http))
    for name, token in cases.items():
        with pytest.raises(jwe.JweProblem) as caught:
            codec.decrypt_request(encrypted_headers(), wrap(token), required=True)
        assert_problem(caught.value, 400, Title.CANT_DECRYPT_PAYLOAD, token[:40])
        assert name  # the case name shows in the assertion's traceback locals


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["alg", "enc", "zip", "crit", "kid"]), inner, max_size=4),
    max_leaves=8,
)
_SEGMENTS = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=300).map(_b64),
    st.just(_b64(b'{"alg": "RSA-OAEP", "enc": "A256GCM"}')),
    _JSON_VALUES.map(lambda value: _b64(json.dumps(value).encode())),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(_SEGMENTS, min_size=1, max_size=6))
def test_hostile_tokens_only_ever_give_cant_decrypt(codec, segments):
    with pytest.raises(jwe.JweProblem) as caught:
        codec.decrypt_request(encrypted_headers(), wrap(".".join(segments)), required=True)
    assert caught.value.title in (Title.CANT_DECRYPT_PAYLOAD, Title.INVALID_PAYLOAD)


# --------------------------------------------------------------------------------------------
# Client public keys


def _pem(key) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def bad_keys() -> dict[str, str]:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {
        "not base64": "not base64 !!",
        "not PEM": base64.b64encode(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").decode(),
        "text": base64.b64encode(b"hello").decode(),
        "raw PEM": _pem(ec_key).decode().replace("\n", "\\n"),
        "EC key": base64.b64encode(_pem(ec_key)).decode(),
        "1024-bit RSA": base64.b64encode(_pem(small)).decode(),
        "too long": "A" * (jwe.PUBLIC_KEY_HEADER_CHARS_MAX + 4),
    }


def test_invalid_public_key(codec, bad_keys):
    for name, value in bad_keys.items():
        with pytest.raises(jwe.JweProblem) as caught:
            codec.client_key(Headers(headers={"Public-Key": value}), required=False)
        assert_problem(caught.value, 400, Title.INVALID_PUBLIC_KEY, value[:30])
        assert name


@pytest.mark.parametrize("headers", [{}, {"Public-Key": ""}, {"Public-Key": "  "}])
def test_absent_public_key(codec, headers):
    assert codec.client_key(Headers(headers=headers), required=False) is None
    with pytest.raises(jwe.JweProblem) as caught:
        codec.client_key(Headers(headers=headers), required=True)
    assert_problem(caught.value, 400, Title.ENCRYPTION_REQUIRED)


def test_public_key_spellings(codec, client_jwk, client_header):
    """Standard base64, urlsafe, missing padding, wrapped lines, base64 of DER: the same key."""
    pem = client_jwk.export_to_pem()
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    urlsafe = base64.urlsafe_b64encode(der).decode()  # base64 of PEM text rarely has +/ to replace
    assert "-" in urlsafe or "_" in urlsafe  # 294 random-looking bytes: fails about once in 10**5
    spellings = [client_header, base64.encodebytes(pem).decode().strip(), base64.b64encode(der).decode(),
                 urlsafe, urlsafe.rstrip("=")]
    numbers = {codec.client_key(Headers(headers={"Public-Key": s}), required=True).public_numbers()
               for s in spellings}
    assert len(numbers) == 1


def test_client_keys_are_parsed_once_and_the_cache_is_bounded(codec, client_header):
    headers = Headers(headers={"Public-Key": client_header})
    assert codec.client_key(headers, required=True) is codec.client_key(headers, required=True)
    assert jwe._parse_client_key.cache_info().maxsize == jwe.CLIENT_KEYS_CACHED_MAX


# --------------------------------------------------------------------------------------------
# The server key file


def test_server_key_file(tmp_path, server_key):
    path = tmp_path / "keys" / jwe.SERVER_KEY_FILE
    created = jwe.ServerKey.create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert [p.name for p in path.parent.iterdir()] == [jwe.SERVER_KEY_FILE]  # no temporary left
    assert jwe.ServerKey.load(path).kid == created.kid != server_key.kid
    assert jwe.ServerKey.load_or_create(path).kid == created.kid
    assert created.kid in repr(created) and "PRIVATE" not in repr(created)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        jwe.ServerKey.create(path)
    assert path.read_bytes() == before


def test_load_or_create_makes_a_missing_key(tmp_path):
    path = tmp_path / "keys" / jwe.SERVER_KEY_FILE
    created = jwe.ServerKey.load_or_create(path)
    assert jwe.ServerKey.load(path).kid == created.kid


def test_server_key_file_refusals(tmp_path):
    path = tmp_path / jwe.SERVER_KEY_FILE
    with pytest.raises(KeyFileError, match="missing"):
        jwe.ServerKey.load(path)
    jwe.ServerKey.create(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="group or others"):
        jwe.ServerKey.load(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM") as caught:
        jwe.ServerKey.load(path)
    assert "garbage" not in str(caught.value)
    with pytest.raises(KeyFileError):
        jwe.ServerKey.load_or_create(path)  # a bad key is never silently replaced
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(ec_pem)
    with pytest.raises(KeyFileError, match="must be RSA"):
        jwe.ServerKey.load(path)


def test_init_writes_the_jwe_key(tmp_path):
    from authsrv.store.init import init_data_dir

    init_data_dir(tmp_path / "data")
    path = tmp_path / "data" / "keys" / jwe.SERVER_KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    codec = jwe.JweCodec(jwe.ServerKey.load(path))
    token = encrypt_for(jwcrypto_jwk.JWK.from_pem(codec.server_key.public_pem), CARD_REQUEST)
    assert codec.decrypt_request(encrypted_headers(), wrap(token), required=True) == CARD_REQUEST
