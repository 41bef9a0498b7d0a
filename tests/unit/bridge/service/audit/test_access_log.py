"""'Who has seen my record': a patient's accesses with who, when, why and what, each with an RFC 9162
inclusion proof that verifies against the audit log's signed checkpoint."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.consumers.audit_log import AuditAppender
from bridge.service.audit.access_log import AccessLogEntry, access_log, agent_log
from bridge.stores.audit import AuditStore, canonical, open_audit_log
from ledger import checkpoint, merkle
from ledger.errors import VerificationError
from ledger.log import Ledger
from ledger.note import generate_key
from tests.unit.bridge.service.audit.audit_helpers import ISSUER, access, events, settings_for


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path)


@pytest.fixture
def keys(settings: Settings) -> tuple[str, str]:
    return generate_key(settings.audit.origin)


@pytest.fixture
def store(settings: Settings) -> Iterator[AuditStore]:
    s = AuditStore.open(settings.audit.url)
    yield s
    s.close()


@pytest.fixture
def log(settings: Settings, keys: tuple[str, str]) -> Iterator[Ledger]:
    led = open_audit_log(settings, signer_key=keys[0])
    yield led
    led.close()


def _verify(entry: AccessLogEntry, note: str, vkey: str) -> None:
    """What a patient's app does: the checkpoint's signature, then the leaf, then the proof."""
    cp = checkpoint.open(note, [vkey])
    leaf = base64.b64decode(entry.leaf_hash)
    assert entry.proof is not None and entry.leaf_index is not None
    merkle.verify_inclusion(
        leaf, entry.leaf_index, cp.size, [base64.b64decode(h) for h in entry.proof], cp.root_hash
    )


def test_every_access_is_listed_with_a_proof_against_the_signed_checkpoint(
    store: AuditStore, log: Ledger, keys: tuple[str, str]
) -> None:
    store.record(events(0, patients=("pat-a", "pat-b")))
    store.record(events(1, patients=("pat-c",)))
    store.record(
        events(
            2,
            patients=("pat-a",),
            who=access("dr-wilson", org="plainsboro"),
            break_glass_reason="unconscious",
        )
    )
    store.record(
        events(
            3,
            patients=("pat-a",),
            interaction="read",
            action="R",
            query=None,
            touched={"Patient": 1},
            outcome="denied",
        )
    )
    AuditAppender(store, log).catch_up()
    page = access_log(store, log, "pat-a")
    assert page.checkpoint is not None and page.size == log.size() == 5
    assert [e.outcome for e in page.entries] == ["denied", "success", "success"]  # newest first
    denied, glass, first = page.entries
    assert (first.agent, first.organization, first.fhir_user, first.client_id) == (
        f"{ISSUER}|dr-house",
        "st-mary",
        "Practitioner/7",
        "ehr-app",
    )
    assert first.purpose == ("TREAT",) and not first.break_glass
    assert first.touched == {"Condition": 1, "Observation": 3} and first.interaction == "operation"
    assert first.query == "GET /Patient/pat-a/$everything?n=0"
    assert (glass.organization, glass.break_glass, glass.break_glass_reason) == (
        "plainsboro",
        True,
        "unconscious",
    )
    assert denied.interaction == "read" and denied.touched == {"Patient": 1}
    for entry in page.entries:
        assert not entry.pending
        _verify(entry, page.checkpoint, keys[1])
        # the leaf commits to this very AuditEvent: its canonical JSON hashes to the leaf's bundle_sha256
        row = store.get(entry.event_id)
        assert row is not None
        assert (
            hashlib.sha256(canonical(row.event())).hexdigest() == entry.entry["bundle_sha256"] == entry.sha256
        )
    as_json = page.to_dict()
    assert (
        as_json["patient"] == "pat-a" and as_json["entries"][1]["why"]["break_glass_reason"] == "unconscious"
    )
    assert as_json["entries"][2]["who"]["agent"] == f"{ISSUER}|dr-house"


def test_a_proof_fails_for_another_event_or_a_forged_checkpoint(
    store: AuditStore, log: Ledger, keys: tuple[str, str]
) -> None:
    for i in range(5):
        store.record(events(i, patients=("pat-a",)))
    AuditAppender(store, log).catch_up()
    page = access_log(store, log, "pat-a")
    assert page.checkpoint is not None
    one, other = page.entries[0], page.entries[1]
    with pytest.raises(VerificationError):
        _verify(AccessLogEntry(**{**_fields(one), "leaf_hash": other.leaf_hash}), page.checkpoint, keys[1])
    _, stranger = generate_key(log.origin)
    with pytest.raises(VerificationError):
        _verify(one, page.checkpoint, stranger)


def _fields(entry: AccessLogEntry) -> dict[str, object]:
    return {name: getattr(entry, name) for name in AccessLogEntry.__slots__}


def test_an_access_after_the_latest_checkpoint_is_pending(
    settings: Settings, store: AuditStore, keys: tuple[str, str]
) -> None:
    led = open_audit_log(settings, signer_key=None)  # appends without signing
    store.record(events(0, patients=("pat-a",)))
    AuditAppender(store, led).catch_up()
    page = access_log(store, led, "pat-a")
    assert page.checkpoint is None and page.size is None and page.entries[0].pending
    assert page.entries[0].leaf_index == 0
    led.close()
    signed = open_audit_log(settings, signer_key=keys[0])
    signed.checkpoint_now()
    store.record(events(1, patients=("pat-a",)))  # recorded, not appended yet
    page = access_log(store, signed, "pat-a")
    newest, older = page.entries
    assert newest.pending and newest.leaf_index is None
    assert not older.pending and page.checkpoint is not None
    _verify(older, page.checkpoint, keys[1])
    signed.close()


def test_pages_and_the_agent_view(store: AuditStore, log: Ledger) -> None:
    for i in range(5):
        store.record(events(i, patients=("pat-a",), who=access("dr-house" if i < 3 else "dr-chase")))
    AuditAppender(store, log).catch_up()
    first = access_log(store, log, "pat-a", limit=2)
    second = access_log(store, log, "pat-a", limit=2, after=first.next_after)
    third = access_log(store, log, "pat-a", limit=2, after=second.next_after)
    seqs = [e.seq for p in (first, second, third) for e in p.entries]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == 5
    assert third.next_after is None
    oldest = access_log(store, log, "pat-a", limit=10, newest_first=False)
    assert [e.seq for e in oldest.entries] == sorted(seqs)
    chase = agent_log(store, log, f"{ISSUER}|dr-chase")
    assert len(chase.entries) == 2 and chase.patient_id is None
    assert all(not e.pending for e in chase.entries)
