"""HTTP to partners for the outbox: one long-lived httpx client per partner, signing, the public key.

HTTP/1.1 keep-alive pools on trio (httpx picks the trio backend through anyio), explicit limits and
timeouts. With an https `api_url` the client trusts the partner's CA (`[partners.NAME] ca_file`, ""
= the dev CA `DIR/pki/ca.crt`) and presents authsrv's own client certificate
(`DIR/pki/authsrv-client.crt`, made on first start), as the documents' Security section asks
("Verestro will authorize itself with each request with a certificate").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import attrs
import httpx
import msgspec

from authsrv import pki
from authsrv.notify import signing

log = logging.getLogger("authsrv.notify")

CLIENT_CERT_STEM = pki.AUTHSRV_CLIENT_STEM
CONNECTIONS_PER_PARTNER_MAX = 16
CONNECT_TIMEOUT_S = 5.0
PUBLIC_KEY_TTL_S = 3600.0  # a partner rotating its key is picked up within the hour
PUBLIC_KEY_CHARS_MAX = 16 * 1024
ANSWER_PEEK_BYTES_MAX = 200  # of an error body, kept on the delivery row (never card data: our own bodies)


def ensure_client_certificate(data_dir: Path) -> tuple[Path, Path]:
    """authsrv's client certificate for calls to partners, issued by the dev CA on first need."""
    return pki.ensure_authsrv_client_certificate(Path(data_dir) / "pki")


def _configured_ca_file(data_dir: Path, name: str) -> str:
    from authsrv.config import load_config

    partner = load_config(data_dir).partners.get(name)
    return partner.ca_file if partner is not None else ""


class _PublicKeyAnswer(msgspec.Struct):
    publicKey: str  # noqa: N815 (the documents' field name)


@attrs.frozen
class Answer:
    status: int  # 0: no answer (connection error, timeout)
    error: str  # '' for 2xx

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class PartnerClient:
    """Calls to one partner. `close()` (await) at shutdown."""

    def __init__(self, name: str, api_url: str, *, data_dir: Path, timeout_s: float,
                 ca_file: str | None = None) -> None:
        """`ca_file`: the partner's `[partners.NAME] ca_file`; None reads it from DIR/authsrv.toml.
        Raises authsrv.pki.PkiError naming the partner when an https partner's CA is unusable."""
        assert api_url
        self.name = name
        self.api_url = api_url.rstrip("/")
        self._secret = signing.load_or_create_secret(data_dir, name)
        verify: object = True
        if self.api_url.startswith("https://"):
            if ca_file is None:
                ca_file = _configured_ca_file(Path(data_dir), name)
            verify = pki.partner_client_ssl_context(Path(data_dir), name, ca_file)
        self._client = httpx.AsyncClient(
            http1=True, http2=False, verify=verify,
            limits=httpx.Limits(max_connections=CONNECTIONS_PER_PARTNER_MAX,
                                max_keepalive_connections=CONNECTIONS_PER_PARTNER_MAX),
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
        )
        self._public_key: tuple[str, float] | None = None

    async def close(self) -> None:
        await self._client.aclose()

    async def send(self, method: str, path: str, body: bytes, idempotency_key: str) -> Answer:
        """One try: the same key and body every time; a fresh signature timestamp."""
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "X-Idempotency-Key": idempotency_key,
                   **signing.signed_headers(self._secret, int(time.time()), body)}
        try:
            response = await self._client.request(method, self.api_url + path, content=body, headers=headers)
        except httpx.HTTPError as error:
            return Answer(0, f"{type(error).__name__}: {error}"[:ANSWER_PEEK_BYTES_MAX])
        if 200 <= response.status_code < 300:
            return Answer(response.status_code, "")
        return Answer(response.status_code, response.content[:ANSWER_PEEK_BYTES_MAX].decode("utf-8", "replace"))

    async def public_key(self) -> str | None:
        """The partner's `GET /public-key` value (base64 of a PEM), cached; None when unavailable."""
        now = time.monotonic()
        if self._public_key is not None and now - self._public_key[1] < PUBLIC_KEY_TTL_S:
            return self._public_key[0]
        try:
            response = await self._client.get(self.api_url + "/public-key", headers={"Accept": "application/json"})
        except httpx.HTTPError as error:
            log.warning("partner %s: GET /public-key failed: %s", self.name, type(error).__name__)
            return None
        if response.status_code != 200 or len(response.content) > PUBLIC_KEY_CHARS_MAX:
            log.warning("partner %s: GET /public-key answered %d", self.name, response.status_code)
            return None
        try:
            value = msgspec.json.decode(response.content, type=_PublicKeyAnswer).publicKey
        except msgspec.DecodeError:
            log.warning("partner %s: GET /public-key answered no publicKey", self.name)
            return None
        self._public_key = (value, now)
        return value

    def forget_public_key(self) -> None:
        self._public_key = None
