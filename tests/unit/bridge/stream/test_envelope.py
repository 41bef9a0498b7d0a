from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bridge.stream import envelope as env
from bridge.stream.envelope import (
    Envelope,
    EnvelopeError,
    OrgSigner,
    SignatureError,
    TrustedKey,
    TrustRegistry,
)

BODY = b'{"resourceType":"Bundle","type":"transaction","entry":[]}'


def _signed(signer: OrgSigner, body: bytes = BODY, produced_at: str = "2026-06-01T10:00:00.000Z") -> Envelope:
    return signer.sign(
        Envelope(
            source_org=signer.org,
            adapter="hl7v2",
            adapter_version="1.0.0",
            bundle_sha256=hashlib.sha256(body).hexdigest(),
            produced_at=produced_at,
            message_id="MSG1",
        )
    )


def _registry(
    *signers: OrgSigner, not_before: str | None = None, not_after: str | None = None
) -> TrustRegistry:
    reg = TrustRegistry()
    for s in signers:
        reg.add(s.org, TrustedKey(s.key_id, s.public_bytes, not_before, not_after))
    return reg


def test_signed_record_round_trips_through_headers() -> None:
    signer = OrgSigner.generate("st-mary")
    parsed = env.parse(_signed(signer).headers(), BODY)
    assert parsed.source_org == "st-mary" and parsed.message_id == "MSG1"
    _registry(signer).verify(parsed)


def test_value_changed_after_signing_is_rejected_by_hash() -> None:
    signer = OrgSigner.generate("st-mary")
    with pytest.raises(EnvelopeError) as exc:
        env.parse(_signed(signer).headers(), BODY + b" ")
    assert exc.value.field == env.H_SHA256


def test_metadata_changed_after_signing_fails_signature() -> None:
    signer = OrgSigner.generate("st-mary")
    headers = [(k, b"PHONY" if k == env.H_MESSAGE_ID else v) for k, v in _signed(signer).headers()]
    with pytest.raises(SignatureError):
        _registry(signer).verify(env.parse(headers, BODY))


def test_forged_signature_by_untrusted_key_of_same_org_is_rejected() -> None:
    trusted, forger = OrgSigner.generate("st-mary"), OrgSigner.generate("st-mary")
    with pytest.raises(SignatureError, match="not trusted"):
        _registry(trusted).verify(env.parse(_signed(forger).headers(), BODY))


def test_forged_key_id_with_wrong_key_does_not_verify() -> None:
    trusted, forger = OrgSigner.generate("st-mary"), OrgSigner.generate("st-mary")
    impostor = OrgSigner("st-mary", trusted.key_id, forger.private_key)
    with pytest.raises(SignatureError, match="does not verify"):
        _registry(trusted).verify(env.parse(_signed(impostor).headers(), BODY))


def test_unsigned_record_is_rejected() -> None:
    signer = OrgSigner.generate("st-mary")
    headers = [(k, v) for k, v in _signed(signer).headers() if k not in (env.H_SIGNATURE, env.H_KEY_ID)]
    with pytest.raises(SignatureError, match="not signed"):
        _registry(signer).verify(env.parse(headers, BODY))


def test_key_rotation_validity_periods() -> None:
    old, new = OrgSigner.generate("st-mary"), OrgSigner.generate("st-mary")
    reg = TrustRegistry()
    reg.add("st-mary", TrustedKey(old.key_id, old.public_bytes, None, "2026-06-01T00:00:00Z"))
    reg.add("st-mary", TrustedKey(new.key_id, new.public_bytes, "2026-05-01T00:00:00Z", None))
    reg.verify(env.parse(_signed(old, produced_at="2026-05-15T00:00:00Z").headers(), BODY))
    reg.verify(env.parse(_signed(new, produced_at="2026-05-15T00:00:00Z").headers(), BODY))
    reg.verify(env.parse(_signed(new, produced_at="2026-07-01T00:00:00Z").headers(), BODY))
    with pytest.raises(SignatureError, match="expired"):
        reg.verify(env.parse(_signed(old, produced_at="2026-07-01T00:00:00Z").headers(), BODY))
    with pytest.raises(SignatureError, match="not valid before"):
        reg.verify(env.parse(_signed(new, produced_at="2026-04-01T00:00:00Z").headers(), BODY))


def test_missing_header_is_named() -> None:
    signer = OrgSigner.generate("st-mary")
    headers = [(k, v) for k, v in _signed(signer).headers() if k != env.H_SOURCE]
    with pytest.raises(EnvelopeError) as exc:
        env.parse(headers, BODY)
    assert exc.value.field == env.H_SOURCE


def test_unknown_schema_and_tombstone_rejected() -> None:
    signer = OrgSigner.generate("st-mary")
    headers = [(k, b"2" if k == env.H_SCHEMA else v) for k, v in _signed(signer).headers()]
    with pytest.raises(EnvelopeError, match="schema"):
        env.parse(headers, BODY)
    with pytest.raises(EnvelopeError, match="tombstone"):
        env.parse(_signed(signer).headers(), None)


def test_keys_and_registry_persist(tmp_path: Path) -> None:
    signer = OrgSigner.generate("riverside")
    signer.save(tmp_path / "k.key")
    assert (tmp_path / "k.key").stat().st_mode & 0o077 == 0
    loaded = OrgSigner.load(tmp_path / "k.key")
    reg = _registry(signer)
    reg.save(tmp_path / "trust.json")
    TrustRegistry.load(tmp_path / "trust.json").verify(env.parse(_signed(loaded).headers(), BODY))


def test_a_replaced_trusted_key_takes_effect_at_once() -> None:
    """The registry keeps each key's public key and validity parsed; replacing the entry (same key id,
    new validity) must apply the new validity to the very next record."""
    signer = OrgSigner.generate("st-mary")
    reg = _registry(signer)
    record = env.parse(_signed(signer, produced_at="2026-06-01T10:00:00.000Z").headers(), BODY)
    reg.verify(record)
    reg.verify(record)  # the prepared key again
    reg.add("st-mary", TrustedKey(signer.key_id, signer.public_bytes, None, "2026-05-01T00:00:00Z"))
    with pytest.raises(SignatureError, match="expired"):
        reg.verify(record)
    reg.add("st-mary", TrustedKey(signer.key_id, b"\x00" * 31, None, None))  # not a valid Ed25519 key
    with pytest.raises(SignatureError, match="does not verify"):
        reg.verify(record)
