"""The record format on ``fhir.bundles`` (schema version 1; documented in docs/envelope.md).

* value: the bundle's canonical JSON bytes (sorted keys, compact UTF-8);
* key: the routing key, the source patient (``<mrn system>|<mrn>``), so one patient's bundles stay ordered;
* headers (all UTF-8):

  ==========================  ============================================================
  ``content-type``            ``application/fhir+json; fhirVersion=4.0``
  ``fb-schema``               ``1``
  ``fb-source-org``           sending organisation id
  ``fb-adapter``              adapter name
  ``fb-adapter-version``      adapter version
  ``fb-message-id``           the record's id at the source (MSH-10, document id, ...); may be empty
  ``fb-bundle-sha256``        hex SHA-256 of the value
  ``fb-produced-at``          RFC 3339 UTC time the producer signed the record
  ``fb-key-id``               id of the org key that signed (8 hex digits)
  ``fb-signature``            base64 Ed25519 signature over :func:`signing_payload`
  ==========================  ============================================================

The signature binds the bundle hash to its metadata, so a consumer that verifies it against the
trust registry knows which organisation vouched for exactly these bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bridge.errors import ConfigError, FhirbridgeError

SCHEMA_VERSION = "1"
CONTENT_TYPE = "application/fhir+json; fhirVersion=4.0"
SIGNATURE_CONTEXT = b"fhirbridge-envelope-v1\n"

H_CONTENT_TYPE = "content-type"
H_SCHEMA = "fb-schema"
H_SOURCE = "fb-source-org"
H_ADAPTER = "fb-adapter"
H_ADAPTER_VERSION = "fb-adapter-version"
H_MESSAGE_ID = "fb-message-id"
H_SHA256 = "fb-bundle-sha256"
H_PRODUCED_AT = "fb-produced-at"
H_KEY_ID = "fb-key-id"
H_SIGNATURE = "fb-signature"

REQUIRED = (H_SCHEMA, H_SOURCE, H_ADAPTER, H_ADAPTER_VERSION, H_SHA256, H_PRODUCED_AT)


class EnvelopeError(FhirbridgeError):
    """A record does not follow the envelope format. ``field`` names the offending header."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SignatureError(EnvelopeError):
    """The signature is missing, made with an unknown or expired key, or does not verify."""


@dataclass(frozen=True, slots=True)
class Envelope:
    source_org: str
    adapter: str
    adapter_version: str
    bundle_sha256: str
    produced_at: str
    message_id: str = ""
    key_id: str = ""
    signature: bytes = b""
    schema: str = SCHEMA_VERSION
    content_type: str = CONTENT_TYPE

    def signing_payload(self) -> bytes:
        return signing_payload(self)

    def headers(self) -> list[tuple[str, bytes]]:
        hs = [
            (H_CONTENT_TYPE, self.content_type),
            (H_SCHEMA, self.schema),
            (H_SOURCE, self.source_org),
            (H_ADAPTER, self.adapter),
            (H_ADAPTER_VERSION, self.adapter_version),
            (H_MESSAGE_ID, self.message_id),
            (H_SHA256, self.bundle_sha256),
            (H_PRODUCED_AT, self.produced_at),
        ]
        if self.signature:
            hs += [(H_KEY_ID, self.key_id), (H_SIGNATURE, base64.b64encode(self.signature).decode())]
        return [(k, v.encode()) for k, v in hs]


def signing_payload(env: Envelope) -> bytes:
    """Domain-separated canonical bytes the org key signs."""
    fields = {
        "adapter": env.adapter,
        "adapter_version": env.adapter_version,
        "bundle_sha256": env.bundle_sha256,
        "content_type": env.content_type,
        "key_id": env.key_id,
        "message_id": env.message_id,
        "produced_at": env.produced_at,
        "schema": env.schema,
        "source_org": env.source_org,
    }
    return SIGNATURE_CONTEXT + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def headers_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers or ():
        try:
            out[k] = (v or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError(f"header {k} is not UTF-8", field=k) from None
    return out


def parse(headers: list[tuple[str, bytes]] | None, value: bytes | None) -> Envelope:
    """Parse and integrity-check a record: headers present, schema known, value hash matches."""
    h = headers_dict(headers)
    for name in REQUIRED:
        if not h.get(name):
            raise EnvelopeError(f"missing header {name}", field=name)
    if h[H_SCHEMA] != SCHEMA_VERSION:
        raise EnvelopeError(f"unsupported envelope schema {h[H_SCHEMA]!r}", field=H_SCHEMA)
    if value is None:
        raise EnvelopeError("record has no value (tombstone)", field="value")
    actual = hashlib.sha256(value).hexdigest()
    if actual != h[H_SHA256]:
        raise EnvelopeError(f"value SHA-256 {actual} does not match header {h[H_SHA256]}", field=H_SHA256)
    sig = b""
    if h.get(H_SIGNATURE):
        try:
            sig = base64.b64decode(h[H_SIGNATURE], validate=True)
        except ValueError:
            raise SignatureError("signature is not valid base64", field=H_SIGNATURE) from None
    return Envelope(
        source_org=h[H_SOURCE],
        adapter=h[H_ADAPTER],
        adapter_version=h[H_ADAPTER_VERSION],
        bundle_sha256=h[H_SHA256],
        produced_at=h[H_PRODUCED_AT],
        message_id=h.get(H_MESSAGE_ID, ""),
        key_id=h.get(H_KEY_ID, ""),
        signature=sig,
        content_type=h.get(H_CONTENT_TYPE, CONTENT_TYPE),
    )


def utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _parse_time(s: str, what: str) -> datetime:
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise EnvelopeError(f"{what} is not an RFC 3339 time: {s!r}", field=what) from None
    if dt.tzinfo is None:
        raise EnvelopeError(f"{what} has no UTC offset: {s!r}", field=what)
    return dt


def key_id_for(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:8]


# -- keys ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrgSigner:
    """An organisation's Ed25519 signing key (file: JSON with org, key_id, private_key base64)."""

    org: str
    key_id: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, org: str) -> OrgSigner:
        key = Ed25519PrivateKey.generate()
        return cls(org, key_id_for(key.public_key().public_bytes_raw()), key)

    @classmethod
    def load(cls, path: Path) -> OrgSigner:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            raw = base64.b64decode(data["private_key"], validate=True)
            return cls(data["org"], data["key_id"], Ed25519PrivateKey.from_private_bytes(raw))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot read signing key {path}: {exc}") from exc

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = self.private_key.private_bytes_raw()
        data = {"org": self.org, "key_id": self.key_id, "private_key": base64.b64encode(raw).decode()}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    def sign(self, env: Envelope) -> Envelope:
        unsigned = replace(env, key_id=self.key_id, signature=b"")
        return replace(unsigned, signature=self.private_key.sign(signing_payload(unsigned)))


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key_id: str
    public_key: bytes
    not_before: str | None = None
    not_after: str | None = None


@dataclass
class TrustRegistry:
    """Which org keys are trusted, and when. File format (JSON)::

        {"orgs": {"st-mary": [{"key_id": "1a2b3c4d", "public_key": "<base64>",
                               "not_before": "2026-01-01T00:00:00Z", "not_after": null}]}}

    Several keys per org allow rotation: a record is accepted when the key named by ``fb-key-id`` is
    listed for its org and ``fb-produced-at`` falls inside that key's validity period.
    """

    orgs: dict[str, list[TrustedKey]] = field(default_factory=dict)
    # per trusted key: its public key object and parsed validity bounds, made once (a TrustedKey is
    # immutable, so an entry can never go stale; a key removed from ``orgs`` is simply not found)
    _ready: dict[TrustedKey, tuple[Ed25519PublicKey, datetime | None, datetime | None]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def load(cls, path: Path) -> TrustRegistry:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            orgs = {
                org: [
                    TrustedKey(
                        k["key_id"],
                        base64.b64decode(k["public_key"], validate=True),
                        k.get("not_before"),
                        k.get("not_after"),
                    )
                    for k in keys
                ]
                for org, keys in data.get("orgs", {}).items()
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read trust registry {path}: {exc}") from exc
        return cls(orgs)

    def save(self, path: Path) -> None:
        data = {
            "orgs": {
                org: [
                    {
                        "key_id": k.key_id,
                        "public_key": base64.b64encode(k.public_key).decode(),
                        "not_before": k.not_before,
                        "not_after": k.not_after,
                    }
                    for k in keys
                ]
                for org, keys in sorted(self.orgs.items())
            }
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def add(self, org: str, key: TrustedKey) -> None:
        keys = [k for k in self.orgs.get(org, []) if k.key_id != key.key_id]
        self.orgs[org] = [*keys, key]

    def verify(self, env: Envelope) -> None:
        """Raise :class:`SignatureError` unless ``env`` carries a valid signature by a trusted key."""
        if not env.signature or not env.key_id:
            raise SignatureError(f"record from {env.source_org!r} is not signed", field=H_SIGNATURE)
        key = next((k for k in self.orgs.get(env.source_org, []) if k.key_id == env.key_id), None)
        if key is None:
            raise SignatureError(
                f"key {env.key_id} is not trusted for org {env.source_org!r}", field=H_KEY_ID
            )
        produced = _parse_time(env.produced_at, H_PRODUCED_AT)
        ready = self._ready.get(key)
        if ready is None:
            try:
                public = Ed25519PublicKey.from_public_bytes(key.public_key)
            except ValueError:
                raise SignatureError(
                    f"signature by key {env.key_id} does not verify", field=H_SIGNATURE
                ) from None
            ready = (
                public,
                _parse_time(key.not_before, "not_before") if key.not_before else None,
                _parse_time(key.not_after, "not_after") if key.not_after else None,
            )
            self._ready[key] = ready
        public, not_before, not_after = ready
        if not_before is not None and produced < not_before:
            raise SignatureError(f"key {env.key_id} not valid before {key.not_before}", field=H_KEY_ID)
        if not_after is not None and produced >= not_after:
            raise SignatureError(f"key {env.key_id} expired at {key.not_after}", field=H_KEY_ID)
        try:
            public.verify(env.signature, env.signing_payload())
        except (InvalidSignature, ValueError):
            raise SignatureError(
                f"signature by key {env.key_id} does not verify", field=H_SIGNATURE
            ) from None


def create_org_key(
    key_path: Path,
    registry_path: Path,
    org: str,
    *,
    not_before: str | None = None,
    not_after: str | None = None,
) -> OrgSigner:
    """A new signing key for ``org`` at ``key_path`` (an existing one is kept, renamed ``.<time>.retired``),
    trusted in the registry at ``registry_path`` from ``not_before`` (default: now)."""
    signer = OrgSigner.generate(org)
    if key_path.exists():
        key_path.rename(key_path.with_suffix(f".{int(time.time())}.retired"))
    signer.save(key_path)
    registry = TrustRegistry.load(registry_path) if registry_path.is_file() else TrustRegistry()
    registry.add(org, TrustedKey(signer.key_id, signer.public_bytes, not_before or utc_now(), not_after))
    registry.save(registry_path)
    return signer
