"""A throw-away PKI for TLS tests: a CA, and server and client certificates it issues.

``Pki.create(directory)`` writes ``ca.pem`` (the CA certificate), ``server.pem``/``server.key`` (for
``localhost``, ``127.0.0.1`` and ``::1``) and ``client.pem``/``client.key`` (a client certificate whose
subject CN and URI SAN name an interface engine). :meth:`Pki.issue` makes more: an expired
certificate, one about to expire, another CA's, a client certificate without a SAN. Keys are P-256
(fast to generate), written unencrypted with mode 0600, as the service requires.

Client helpers: :meth:`Pki.client_context` trusts the CA and, when asked, presents the client
certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_CN = "interface-engine.st-mary.example"
CLIENT_URI = "urn:fhirbridge:client:st-mary-engine"


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as files."""

    cert_file: Path
    key_file: Path
    cert: x509.Certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)


class Pki:
    """A CA in ``directory`` that issues certificates (see the module docstring)."""

    def __init__(self, directory: Path, ca_cn: str = "fhirbridge test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(ca_cn))
            .issuer_name(_name(ca_cn))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        stem = ca_cn.replace(" ", "-")
        self.ca_file = directory / f"{stem}.pem"
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def create(cls, directory: Path) -> Pki:
        """A CA with ``self.server`` and ``self.client`` issued (the common case)."""
        pki = cls(directory)
        pki.server = pki.issue("server", "localhost", dns=("localhost",), ips=("127.0.0.1", "::1"))
        pki.client = pki.issue("client", CLIENT_CN, uris=(CLIENT_URI,), client=True)
        return pki

    server: Issued
    client: Issued

    def issue(
        self,
        stem: str,
        cn: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        client: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        """A certificate for ``cn`` signed by this CA, written to ``<stem>.pem`` and ``<stem>.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(days=1))
            .not_valid_after(not_after or now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False
            )
        )
        alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        alt += [x509.UniformResourceIdentifier(u) for u in uris]
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file = self.directory / f"{stem}.pem"
        key_file = self.directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_file, key)
        return Issued(cert_file, key_file, cert)

    def client_context(self, *, cert: Issued | None = None) -> ssl.SSLContext:
        """A client context that trusts this CA and checks the host name; presents ``cert`` if given."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            ctx.load_cert_chain(cert.cert_file, cert.key_file)
        return ctx
