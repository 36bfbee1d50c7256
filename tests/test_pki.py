"""The development PKI, checked with real TLS handshakes on loopback: the server requires a client
certificate from our CA, sees the partner name as CN, and refuses certificates from another CA."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from authsrv import pki

HANDSHAKE_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("data") / "pki"
    pki.create_ca(directory)
    pki.issue_server_cert(directory)
    pki.issue_client_cert(directory, "demo", "partner")
    pki.issue_client_cert(directory, "acme", "acme")
    return directory


@pytest.fixture(scope="module")
def foreign_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("foreign") / "pki"
    pki.create_ca(directory)
    pki.issue_client_cert(directory, "demo", "partner")  # same name, wrong CA
    return directory


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_and_modes(pki_dir: Path) -> None:
    for stem in ("ca", "server", "partner", "acme"):
        assert stat.S_IMODE((pki_dir / f"{stem}.key").stat().st_mode) == 0o600
        assert (pki_dir / f"{stem}.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        assert b"PRIVATE KEY" in (pki_dir / f"{stem}.key").read_bytes()
    assert stat.S_IMODE(pki_dir.stat().st_mode) == 0o700


def test_certificate_contents(pki_dir: Path) -> None:
    ca = _certificate(pki_dir / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _certificate(pki_dir / "server.crt")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    client = _certificate(pki_dir / "partner.crt")
    assert pki.certificate_common_name(client) == "demo"
    assert pki.certificate_common_name(_certificate(pki_dir / "acme.crt")) == "acme"
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert not client.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert client.issuer == ca.subject
    lifetime = client.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=824) < lifetime <= datetime.timedelta(days=pki.CERT_VALIDITY_DAYS)


def test_never_overwrites(pki_dir: Path) -> None:
    before = (pki_dir / "acme.crt").read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.issue_client_cert(pki_dir, "acme", "acme")
    assert (pki_dir / "acme.crt").read_bytes() == before
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.create_ca(pki_dir)


def test_issuing_without_a_ca_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="development CA not found"):
        pki.issue_server_cert(tmp_path)


def _handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str) -> dict:
    """One TLS connection on loopback; returns what each side saw."""
    outcome: dict = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(HANDSHAKE_TIMEOUT_S)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                connection.settimeout(HANDSHAKE_TIMEOUT_S)
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    outcome["server_peer_cert"] = tls.getpeercert()
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as error:
                outcome["server_error"] = error

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S) as raw:
                with client_context.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    # TLS 1.3 reports a refused client certificate only on the next read.
                    outcome["client_read"] = tls.recv(2)
        except (ssl.SSLError, OSError) as error:
            outcome["client_error"] = error
        thread.join(HANDSHAKE_TIMEOUT_S)
        assert not thread.is_alive()
    return outcome


def _strict(context: ssl.SSLContext) -> ssl.SSLContext:
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_mutual_tls_handshake(pki_dir: Path, hostname: str) -> None:
    server = _strict(pki.server_ssl_context(pki_dir, client_cert_required=True))
    client = _strict(pki.client_ssl_context(pki_dir, "partner"))
    outcome = _handshake(server, client, hostname)
    assert outcome.get("client_read") == b"ok", outcome
    subject = dict(item for rdn in outcome["server_peer_cert"]["subject"] for item in rdn)
    assert subject["commonName"] == "demo"


def test_client_cert_from_another_ca_is_refused(pki_dir: Path, foreign_pki_dir: Path) -> None:
    server = pki.server_ssl_context(pki_dir, client_cert_required=True)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki_dir / "ca.crt"))
    client.load_cert_chain(foreign_pki_dir / "partner.crt", foreign_pki_dir / "partner.key")
    outcome = _handshake(server, client, "localhost")
    assert isinstance(outcome.get("server_error"), ssl.SSLError), outcome
    assert "certificate verify failed" in str(outcome["server_error"])
    assert "client_read" not in outcome or outcome["client_read"] == b""
    assert "server_peer_cert" not in outcome


def test_missing_client_cert_is_refused_when_required(pki_dir: Path) -> None:
    server = pki.server_ssl_context(pki_dir, client_cert_required=True)
    client = pki.client_ssl_context(pki_dir)  # trusts the server, presents nothing
    outcome = _handshake(server, client, "localhost")
    assert isinstance(outcome.get("server_error"), ssl.SSLError), outcome
    assert "server_peer_cert" not in outcome


def test_client_cert_optional_mode_accepts_anonymous(pki_dir: Path) -> None:
    server = pki.server_ssl_context(pki_dir, client_cert_required=False)
    outcome = _handshake(server, pki.client_ssl_context(pki_dir), "localhost")
    assert outcome.get("client_read") == b"ok", outcome
    assert not outcome["server_peer_cert"]  # None: no certificate presented


def test_server_cert_from_another_ca_is_refused_by_the_client(pki_dir: Path, foreign_pki_dir: Path) -> None:
    server = pki.server_ssl_context(pki_dir, client_cert_required=False)
    client = pki.client_ssl_context(foreign_pki_dir)  # trusts only the foreign CA
    outcome = _handshake(server, client, "localhost")
    assert isinstance(outcome.get("client_error"), ssl.SSLCertVerificationError), outcome


def test_server_cert_does_not_cover_other_names(pki_dir: Path) -> None:
    server = pki.server_ssl_context(pki_dir, client_cert_required=False)
    outcome = _handshake(server, pki.client_ssl_context(pki_dir), "example.com")
    assert isinstance(outcome.get("client_error"), ssl.SSLCertVerificationError), outcome
