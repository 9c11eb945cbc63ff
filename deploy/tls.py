"""A local certificate authority and server certificates for the secured local broker.

`ensure_ca` keeps one CA in a directory (``ca.pem`` and the 0600 ``ca-key.pem``), generated with
`cryptography` the first time and again whenever it is missing, unreadable or about to expire.
`ensure_server_cert` keeps a server certificate signed by it, for ``127.0.0.1`` and
``localhost`` (both as subject alternative names, so clients verify hostnames), in one 0600 PEM
file holding the unencrypted PKCS#8 key followed by the certificate chain: the layout Kafka
reads with ``ssl.keystore.type=PEM``. No keytool is needed. Keys are ECDSA P-256: generating
one takes a millisecond and both the JVM and OpenSSL accept it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy._proc import LOOPBACK, file_lock

__all__ = [
    "CA_DAYS",
    "SERVER_DAYS",
    "CertAuthority",
    "ensure_ca",
    "ensure_server_cert",
    "new_ca",
    "write_private",
]

CA_DAYS = 3650
"""Validity of a generated CA, in days."""
SERVER_DAYS = 365
"""Validity of a generated server certificate, in days."""
# A certificate this close to its end is replaced rather than reused, so that a broker started
# now never sees it expire while it runs.
_RENEW_BEFORE = dt.timedelta(days=2)


@dataclass(frozen=True)
class CertAuthority:
    """A CA on disk and in memory.

    Attributes:
        cert_file: The CA certificate (PEM): what clients and the broker trust.
        key_file: Its private key (PEM, PKCS#8, unencrypted, mode 0600).
        cert: The parsed certificate.
        key: The private key, to sign server certificates with.
    """

    cert_file: Path
    key_file: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Writes a file readable by its owner only (0600), atomically: no reader sees half of it.

    Args:
        path: The file, replaced if it exists.
        data: Its content.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask and ignored for old files.
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _fresh(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and now + _RENEW_BEFORE < cert.not_valid_after_utc


def new_ca(directory: Path, common_name: str = "saga-engine local CA") -> CertAuthority:
    """Generates a new CA into `directory`, replacing any there.

    Args:
        directory: Receives ``ca.pem`` and ``ca-key.pem`` (created if needed).
        common_name: The CA's subject common name.

    Returns:
        The new CA.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # Tolerates a little clock skew.
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_file = directory / "ca-key.pem"
    cert_file = directory / "ca.pem"
    # The key first: a certificate on disk always has its key beside it.
    write_private(key_file, _key_pem(key))
    write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_file, 0o644)  # Public: every client reads it.
    return CertAuthority(cert_file=cert_file, key_file=key_file, cert=cert, key=key)


def _load_ca(directory: Path) -> CertAuthority | None:
    cert_file = directory / "ca.pem"
    key_file = directory / "ca-key.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return None
    if key.public_key().public_numbers() != public.public_numbers():
        return None
    return CertAuthority(cert_file=cert_file, key_file=key_file, cert=cert, key=key)


def ensure_ca(directory: Path) -> CertAuthority:
    """Returns the CA kept in `directory`, generating it when missing, broken or expiring.

    Args:
        directory: Holds ``ca.pem`` and ``ca-key.pem``; a lock file serialises concurrent calls.
    """
    with file_lock(directory / ".ca.lock"):
        found = _load_ca(directory)
        if found is not None and _fresh(found.cert):
            return found
        return new_ca(directory)


def _signed_by(cert: x509.Certificate, ca: CertAuthority) -> bool:
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _server_cert_ok(path: Path, ca: CertAuthority) -> bool:
    try:
        data = path.read_bytes()
        certs = x509.load_pem_x509_certificates(data)
        serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError):
        return False
    return bool(certs) and _fresh(certs[0]) and _signed_by(certs[0], ca)


def ensure_server_cert(ca: CertAuthority, path: Path, common_name: str = "localhost") -> Path:
    """Keeps a server certificate for 127.0.0.1 and localhost, signed by `ca`, at `path`.

    The file is reused while it is readable, not close to expiry and signed by this very CA
    (a regenerated CA invalidates it); otherwise it is replaced.

    Args:
        ca: The signing CA.
        path: The PEM file: the private key, then the certificate, then the CA certificate.
        common_name: The subject common name (clients check the SANs, not this).

    Returns:
        `path`.
    """
    with file_lock(path.with_name(f".{path.name}.lock")):
        if _server_cert_ok(path, ca):
            return path
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        public = key.public_key()
        ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca.cert.not_valid_after_utc))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # clientAuth too: the broker is also the client of its own controller listener.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(ca.key, hashes.SHA256())
        )
        pem = (
            _key_pem(key)
            + cert.public_bytes(serialization.Encoding.PEM)
            + ca.cert.public_bytes(serialization.Encoding.PEM)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, pem)
        return path
