"""Shared by the audit tests: an access token's context, the events of an access, a settings object
whose audit and audit-log databases are SQLite files or PostgreSQL databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bridge.config import Settings
from bridge.service.audit.events import audit_events
from bridge.service.auth.scopes import ScopeSet
from bridge.service.auth.tokens import AccessContext

T0 = datetime(2026, 12, 7, 9, 0, 0, tzinfo=UTC)
ISSUER = "https://idp.example/auth"


def access(
    subject: str | None = "dr-house", *, org: str = "st-mary", client: str = "ehr-app", jti: str = "jti-1"
) -> AccessContext:
    return AccessContext(
        issuer=ISSUER,
        organization=org,
        subject=subject,
        client_id=client,
        scopes=ScopeSet.parse("user/*.rs"),
        patient=None,
        fhir_user="Practitioner/7" if subject else None,
        token_id=jti,
        expires_at=None,
    )


def events(
    i: int = 0,
    *,
    patients: tuple[str, ...] = ("pat-a",),
    who: AccessContext | None = None,
    when: datetime | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """The events of access number ``i`` (a $everything by default)."""
    args: dict[str, Any] = {
        "action": "E",
        "interaction": "operation",
        "patients": list(patients),
        "touched": {"Observation": 3 + i, "Condition": 1},
        "query": f"GET /Patient/{patients[0] if patients else 'x'}/$everything?n={i}",
        "outcome": "success",
        "request_id": f"req-{i}",
        "purpose": "TREAT",
        "break_glass_reason": None,
        "recorded": when or T0 + timedelta(milliseconds=i),
    }
    args.update(kw)
    return audit_events(who if who is not None else access(), **args)


def settings_for(tmp_path: Path, audit_url: str | None = None, log_url: str | None = None) -> Settings:
    env = {"FHIRBRIDGE_DATA_DIR": str(tmp_path), "FHIRBRIDGE_CHECKPOINT_INTERVAL_MS": "0"}
    if audit_url:
        env["FHIRBRIDGE_AUDIT_URL"] = audit_url
    if log_url:
        env["FHIRBRIDGE_AUDIT_LOG_URL"] = log_url
    return Settings.from_env(env)


def write_key(settings: Settings, name: str | None = None) -> str:
    """Write a signing key for the audit log (named ``name``, default its origin); its verifier key."""
    from ledger import note

    skey, vkey = note.generate_key(name or settings.audit.origin, note.ALG_ED25519)
    assert settings.audit.key_file is not None
    settings.audit.key_file.write_text(skey + "\n")
    settings.audit.key_file.with_suffix(".pub").write_text(vkey + "\n")
    return vkey
