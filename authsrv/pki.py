"""Development PKI under `DIR/pki/`: a private CA, the server's certificate, partner client certs.

A partner authenticates on `/secure` and `/lifecycle` with a client certificate signed by this CA;
its subject CN is the partner name (docs/contract.md, commands: `DIR/pki/NAME.crt`). EC P-256 keys: as
strong as RSA-3072 for TLS and generated in milliseconds, which keeps `authsrv init` and the test
suite fast. (The JWE key must be RSA and lives elsewhere.)

The extensions follow RFC 5280 as OpenSSL's strict verification checks them (CA basic constraints
critical, key identifiers on both sides, EKU on leaves), so the chain verifies under
`ssl.VERIFY_X509_STRICT` too.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_VALIDITY_DAYS = 825  # the CA/Browser Forum ceiling that clients still accept without question
CA_VALIDITY_DAYS = 3650
CLOCK_SKEW_ALLOWANCE = datetime.timedelta(hours=1)  # a peer whose clock is slightly behind still accepts
CA_COMMON_NAME = "authsrv development CA"
SERVER_COMMON_NAME = "localhost"
CA_STEM = "ca"
SERVER_STEM = "server"


class PkiError(Exception):
    """The PKI directory is missing a file, or a file that must be created already exists."""


def create_ca(pki_dir: Path) -> None:
    """Create `ca.key` (0600) and the self-signed `ca.crt` in `pki_dir` (made 0700 if missing)."""
    pki_dir = Path(pki_dir)
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        # path_length 0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(pki_dir, CA_STEM, key, certificate)


def issue_server_cert(pki_dir: Path) -> None:
    """`server.crt/.key` for the REST listener: SAN IP 127.0.0.1 and DNS localhost, serverAuth."""
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    _issue_leaf(Path(pki_dir), SERVER_STEM, SERVER_COMMON_NAME, ExtendedKeyUsageOID.SERVER_AUTH, san)


def issue_client_cert(pki_dir: Path, name: str, file_stem: str) -> None:
    """`FILE_STEM.crt/.key` for partner `name`: subject CN = name, clientAuth."""
    assert name and file_stem
    assert file_stem not in (CA_STEM, SERVER_STEM), "would overwrite the CA or server pair"
    _issue_leaf(Path(pki_dir), file_stem, name, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def certificate_common_name(certificate: x509.Certificate) -> str | None:
    """The subject CN, i.e. the partner name of a client certificate (None when absent)."""
    attributes = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attributes) != 1:
        return None
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode()


def server_ssl_context(pki_dir: Path, *, client_cert_required: bool) -> ssl.SSLContext:
    """TLS server context: our certificate; client certificates from our CA requested or required."""
    pki_dir = Path(pki_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki_dir / "ca.crt"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pki_dir / "server.crt", pki_dir / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED if client_cert_required else ssl.CERT_OPTIONAL
    return context


def client_ssl_context(pki_dir: Path, file_stem: str | None = None) -> ssl.SSLContext:
    """TLS client context trusting our CA, presenting `FILE_STEM.crt/.key` when given."""
    pki_dir = Path(pki_dir)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki_dir / "ca.crt"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if file_stem is not None:
        context.load_cert_chain(pki_dir / f"{file_stem}.crt", pki_dir / f"{file_stem}.key")
    return context


def _issue_leaf(
    pki_dir: Path,
    file_stem: str,
    common_name: str,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> None:
    ca_key, ca_certificate = _load_ca(pki_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    _write_pair(pki_dir, file_stem, key, builder.sign(ca_key, hashes.SHA256()))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_ca(pki_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key_pem = (pki_dir / "ca.key").read_bytes()
        certificate_pem = (pki_dir / "ca.crt").read_bytes()
    except FileNotFoundError as error:
        raise PkiError(f"development CA not found: {error.filename}") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate(certificate_pem)


def _write_pair(
    pki_dir: Path, file_stem: str, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first, with O_EXCL: never overwrite an existing identity, never a world-readable key.
    _write_new(pki_dir / f"{file_stem}.key", key_pem, 0o600)
    _write_new(pki_dir / f"{file_stem}.crt", certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists") from None
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(path, mode)  # the umask may have removed bits we asked for; never added any


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


AUTHSRV_CLIENT_STEM = "authsrv-client"  # DIR/pki/authsrv-client.crt: authsrv's identity towards partners
AUTHSRV_CLIENT_NAME = "authsrv"


def ensure_authsrv_client_certificate(pki_dir: Path) -> tuple[Path, Path]:
    """authsrv's own client certificate for calls to partners, issued by the dev CA on first need.

    Several parts of the server (the hot path's partner client, the outbox) may ask at once: the
    loser of the race finds the files made and uses them."""
    pki_dir = Path(pki_dir)
    cert, key = pki_dir / f"{AUTHSRV_CLIENT_STEM}.crt", pki_dir / f"{AUTHSRV_CLIENT_STEM}.key"
    if not cert.exists():
        try:
            issue_client_cert(pki_dir, AUTHSRV_CLIENT_NAME, AUTHSRV_CLIENT_STEM)
        except PkiError:
            if not cert.exists():
                raise
    assert cert.exists() and key.exists()
    return cert, key


def partner_ca_path(data_dir: Path, ca_file: str) -> Path:
    """The CA certificate that verifies a partner's https server (`[partners.NAME] ca_file`): an
    absolute path, or one relative to the data directory; "" is the development CA `pki/ca.crt`."""
    if not ca_file:
        return Path(data_dir) / "pki" / f"{CA_STEM}.crt"
    path = Path(ca_file)
    return path if path.is_absolute() else Path(data_dir) / path


def partner_client_ssl_context(data_dir: Path, partner: str, ca_file: str) -> ssl.SSLContext:
    """TLS client context for calls to `partner`: trusts only its CA (`partner_ca_path`) and presents
    authsrv's own client certificate (issued by the development CA on first need, whoever the
    partner's CA is). PkiError naming the partner and the file when the CA cannot be used."""
    ca_path = partner_ca_path(data_dir, ca_file)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_path))
    except FileNotFoundError:
        raise PkiError(f"partner {partner!r}: CA file {ca_path} (ca_file) not found") from None
    except (OSError, ssl.SSLError) as error:  # unreadable, or not a PEM certificate
        raise PkiError(f"partner {partner!r}: CA file {ca_path} (ca_file) unusable: {error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    pki_dir = Path(data_dir) / "pki"
    cert, key = ensure_authsrv_client_certificate(pki_dir)
    context.load_cert_chain(cert, key)
    return context
