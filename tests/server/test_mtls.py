"""Mutual TLS: uvicorn serves HTTPS and requires a client certificate of the configured CA; the
certificate's common name is the caller's principal, recorded as who asked."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from saga.server import Authenticator, SagaService, create_app
from saga.server.run import TlsFiles, open_server
from tests.server.app import sagas
from tests.server.conftest import Stack

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.timeout(120)]


def _issue(
    name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _certificates(d: Path) -> None:
    ca, ca_key = _issue("test ca", None, ca=True)
    _write(d / "ca", ca, ca_key)
    for name in ("server", "alice"):
        cert, key = _issue(name, (ca.subject, ca_key))
        _write(d / name, cert, key)
    other, other_key = _issue("other ca", None, ca=True)
    mallory, mallory_key = _issue("mallory", (other.subject, other_key))
    _write(d / "mallory", mallory, mallory_key)


def _client_context(d: Path, who: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(d / "ca.crt"))
    if who is not None:
        context.load_cert_chain(str(d / f"{who}.crt"), str(d / f"{who}.key"))
    return context


async def test_the_client_certificate_names_the_caller(stack: Stack, tmp_path: Path) -> None:
    _certificates(tmp_path)
    service = SagaService(stack.transport, stack.index, prefix=stack.prefix, definitions=sagas)
    app = create_app(service, Authenticator(certificates=True))
    tls = TlsFiles(tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca.crt")
    saga_id = f"mtls-{uuid.uuid4().hex[:6]}"
    async with open_server(app, tls=tls) as server:
        assert server.url.startswith("https://127.0.0.1:")
        context = _client_context(tmp_path, "alice")
        async with httpx.AsyncClient(base_url=server.url, verify=context, timeout=20) as http:
            r = await http.post(
                "/api/v1/sagas",
                json={
                    "name": "shop_order",
                    "saga_id": saga_id,
                    "input": {"customer": "a", "total": 1},
                },
            )
            assert r.status_code == 202, r.text
            assert r.json()["by"] == "alice"
            await stack.wait_for(saga_id, "completed")
            history = (await http.get(f"/api/v1/sagas/{saga_id}/history")).json()
        assert history["events"][0]["by"].startswith("alice")

        for who in (None, "mallory"):  # no certificate; one of another CA
            context = _client_context(tmp_path, who)
            async with httpx.AsyncClient(base_url=server.url, verify=context, timeout=20) as http:
                with pytest.raises(httpx.HTTPError):
                    await http.get("/api/v1/counts")
