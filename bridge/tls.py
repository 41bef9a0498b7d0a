"""Transport security of the listeners: the HTTP service (``fhirbridge serve``) and MLLP (``fhirbridge mllp``).

:func:`server_context` turns a :class:`~bridge.config.TlsSettings` into a server ``ssl.SSLContext``:
TLS 1.2 or newer only, forward-secret AEAD ciphers for TLS 1.2 (TLS 1.3's own suites all are), no
renegotiation; with a client CA, mutual TLS (``CERT_REQUIRED``: a client without a certificate that
chains to that CA is refused during the handshake). Every problem an operator can cause is a
:class:`~bridge.errors.ConfigError` naming the file and the setting, found before the port opens: a
missing or unreadable file, a key readable by group or others, an encrypted key (a service cannot type
its passphrase), a key that does not belong to the certificate, a certificate that has expired or is
not valid yet. A certificate that expires within :data:`EXPIRY_WARNING_DAYS` is a warning
(``tls.cert_expires_soon``).

:func:`client_identity` reads the verified client certificate of a connection (the ``peercert`` of an
asyncio transport: aiohttp's ``request.transport``, or an asyncio ``StreamWriter``) as a
:class:`ClientIdentity`: subject, common name and subject alternative names.

:func:`warn_if_plaintext` logs ``<area>.plaintext_bind`` when a listener without TLS binds an address
other than loopback.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from bridge.config import TlsSettings
from bridge.errors import ConfigError
from bridge.logging import get_logger

log = get_logger(__name__)

#: a certificate that expires within this many days is logged (``tls.cert_expires_soon``) at start
EXPIRY_WARNING_DAYS = 30
#: TLS 1.2 suites: ECDHE key exchange (forward secrecy) and AEAD only, as Mozilla's "intermediate"
#: profile; TLS 1.3 suites are OpenSSL's (all AEAD, all forward-secret)
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who a mutual-TLS client is, from its verified certificate.

    ``subject`` is the subject's distinguished name (``CN=…,O=…``), ``common_name`` its CN (or
    ``None``), ``alt_names`` the subject alternative names as ``TYPE:value`` (``DNS:engine.example``,
    ``URI:urn:…``, ``IP Address:10.0.0.5``), ``issuer`` the issuer's distinguished name and ``serial``
    the certificate's serial number (hex), for an audit trail.
    """

    subject: str
    common_name: str | None
    alt_names: tuple[str, ...]
    issuer: str
    serial: str

    def log_fields(self) -> dict[str, Any]:
        """The keys a log event carries about the client: its subject and alternative names only."""
        return {"client_subject": self.subject, "client_san": list(self.alt_names)}


def _where(prefix: str, kind: str) -> str:
    option = {"CERT": "--tls-cert", "KEY": "--tls-key", "CLIENT_CA": "--tls-client-ca"}[kind]
    return f"{prefix}_{kind}_FILE or {option}"


def server_context(tls: TlsSettings, *, env_prefix: str = "FHIRBRIDGE_TLS") -> ssl.SSLContext:
    """A server context for ``tls`` (see the module docstring); ``env_prefix`` names the variables in
    error messages (``FHIRBRIDGE_TLS`` for the HTTP service, ``FHIRBRIDGE_MLLP_TLS`` for MLLP).

    Raises :class:`~bridge.errors.ConfigError` for anything that would keep the listener from serving
    TLS as configured; never returns a context weaker than asked for.
    """
    if tls.cert_file is None:
        given = "a key" if tls.key_file is not None else "a client CA (mutual TLS needs TLS)"
        raise ConfigError(f"TLS: {given} is configured but no certificate; set {_where(env_prefix, 'CERT')}")
    if tls.key_file is None:
        raise ConfigError(f"TLS: a certificate is configured but no key; set {_where(env_prefix, 'KEY')}")
    cert_where = f"TLS certificate {tls.cert_file} ({_where(env_prefix, 'CERT')})"
    key_where = f"TLS key {tls.key_file} ({_where(env_prefix, 'KEY')})"
    chain = _certificates(_read(tls.cert_file, cert_where), cert_where)
    leaf = chain[0]
    _check_validity(leaf, cert_where)
    _check_key_permissions(tls.key_file, key_where)
    key = _private_key(_read(tls.key_file, key_where), key_where)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ConfigError(
            f"{key_where} does not belong to the certificate {tls.cert_file}: their public keys differ "
            "(the first certificate in the file must be the one issued for this key)"
        )

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    try:
        # the callable answers a passphrase prompt (there is none: encrypted keys were refused above)
        # so that OpenSSL never asks on the terminal of a service
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert_where} with {key_where}: OpenSSL refused them ({exc.reason})") from None
    if tls.client_ca_file is not None:
        ca_where = f"TLS client CA {tls.client_ca_file} ({_where(env_prefix, 'CLIENT_CA')})"
        cas = _certificates(_read(tls.client_ca_file, ca_where), ca_where)
        now = dt.datetime.now(dt.UTC)
        if all(ca.not_valid_after_utc < now for ca in cas):
            raise ConfigError(f"{ca_where}: every certificate in it has expired, so no client could connect")
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(f"{ca_where}: OpenSSL refused it ({exc.reason})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror})") from None


def _certificates(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{where}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return certs


def _check_validity(cert: x509.Certificate, where: str) -> None:
    now = dt.datetime.now(dt.UTC)
    not_after = cert.not_valid_after_utc
    if not_after < now:
        raise ConfigError(f"{where}: expired on {not_after:%Y-%m-%d %H:%M} UTC; renew it")
    if cert.not_valid_before_utc > now:
        raise ConfigError(
            f"{where}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(is this machine's clock right?)"
        )
    days = (not_after - now).days
    if days < EXPIRY_WARNING_DAYS:
        log.warning(
            "tls.cert_expires_soon",
            certificate=str(where),
            not_after=not_after.isoformat(),
            days_left=days,
        )


def _check_key_permissions(path: Path, where: str) -> None:
    """Refuse a private key that users other than its owner may read or replace (POSIX only)."""
    if os.name != "posix":
        return
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror})") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{where}: readable or writable by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"restrict it to its owner: chmod 600 {path}"
        )


def _private_key(data: bytes, where: str) -> Any:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise ConfigError(
            f"{where}: is encrypted; a service cannot type a passphrase, so give it an unencrypted key "
            "readable by its own user only (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{where}: holds no PEM private key (-----BEGIN PRIVATE KEY-----)") from None


def client_identity(transport: Any) -> ClientIdentity | None:
    """The verified client certificate of a connection as a :class:`ClientIdentity`; ``None`` without
    TLS, without mutual TLS, or once the connection is gone.

    ``transport`` is anything with asyncio's ``get_extra_info``: an aiohttp handler passes
    ``request.transport``, the MLLP listener its ``StreamWriter``.
    """
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    subject = _rdns(cert.get("subject", ()))
    common_name = next((v for k, v in subject if k == "commonName"), None)
    return ClientIdentity(
        subject=_dn(subject),
        common_name=common_name,
        alt_names=tuple(f"{kind}:{value}" for kind, value in cert.get("subjectAltName", ())),
        issuer=_dn(_rdns(cert.get("issuer", ()))),
        serial=str(cert.get("serialNumber", "")),
    )


#: attribute names of ``SSLSocket.getpeercert()`` -> their RFC 4514 short names
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "userId": "UID",
}


def _rdns(value: Any) -> list[tuple[str, str]]:
    return [(k, v) for rdn in value for k, v in rdn]


def _dn(pairs: list[tuple[str, str]]) -> str:
    """``CN=engine,O=St Mary`` (most specific first, as RFC 4514 writes it); ``,`` ``+`` ``=`` escaped."""

    def esc(v: str) -> str:
        return "".join("\\" + c if c in ',+"\\<>;=' else c for c in v)

    return ",".join(f"{_SHORT.get(k, k)}={esc(v)}" for k, v in reversed(pairs))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``); ``""``, ``0.0.0.0`` and ``::`` are not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def warn_if_plaintext(event: str, host: str, port: int, *, tls: bool) -> bool:
    """Log ``event`` (``http.plaintext_bind``, ``mllp.plaintext_bind``) when a listener without TLS binds
    ``host``, which is not loopback; whether it did."""
    if tls or is_loopback(host):
        return False
    log.warning(
        event,
        host=host,
        port=port,
        hint="no TLS on an address other hosts can reach: PHI would cross the network in clear text; "
        "configure a certificate and key (README, TLS)",
    )
    return True
