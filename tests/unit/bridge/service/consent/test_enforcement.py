"""Consent enforced on every read, break-the-glass, and the audit of each access (issue 22).

A (st-mary) and A' (riverside) are one person (MPI MATCH); riverside's active Consent on A' denies
st-mary. C is only a POSSIBLE_MATCH of them. The service runs with its real authorization, consent and
audit; tokens are the embedded issuer's (tests/support/auth.py), with the IHE IUA organisation and
purpose claims the embedded issuer writes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.cli import main
from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.context import Backend
from bridge.stores.audit import AuditInputError, AuditStore
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.mpi import PersonIndex
from ledger import checkpoint, merkle
from tests.support.auth import bearer
from tests.support.consent import deny_organization
from tests.support.mpi_records import patient

SSN = "http://hl7.org/fhir/sid/us-ssn"
DCM_BTG = "110127"


A = patient("a1", "123456789", "12 Elm Street", "Metro", "12345", org="st-mary")
A2 = patient("a2", "123456789", "12 Elm St", "Metro", "12345", org="riverside")
C = {
    k: v
    for k, v in patient("c3", None, "400 Harbour View", "Portside", "99999", org="harbour").items()
    if k != "gender"
}


def _obs(oid: str, pid: str, org: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"source": f"urn:fhirbridge:{org}"},
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": "2026-01-10T08:00:00Z",
    }


def consent(status: str = "active", *, cid: str = "riverside-deny", pid: str = "a2") -> dict[str, Any]:
    """riverside's Consent on its record of the patient: st-mary may not see it."""
    return {**deny_organization(cid, pid, "st-mary", status), "meta": {"source": "urn:fhirbridge:riverside"}}


def _bundle(
    org: str, offset: int, *resources: dict[str, Any], at: str = "2026-01-11T00:00:00.000Z"
) -> IncomingBundle:
    return IncomingBundle(
        {"resourceType": "Bundle", "timestamp": at, "entry": [{"resource": r} for r in resources]},
        f"sha-{org}-{offset}",
        org,
        "k",
        "t",
        0,
        offset,
        at,
    )


class Env:
    def __init__(self, client: TestClient, settings: Settings, tmp: Path) -> None:
        self.client, self.settings, self.tmp = client, settings, tmp

    def headers(self, org: str = "st-mary", purpose: str | None = None, **kw: Any) -> dict[str, str]:
        return bearer(
            self.settings,
            "user/*.rs",
            organization=org,
            purpose=purpose,
            fhir_user=f"Practitioner/dr-{org}",
            subject=f"dr-{org}",
            **kw,
        )

    def apply(self, *bundles: IncomingBundle) -> None:
        store = IndexStore.open(self.settings.stores.index_url)
        store.apply(list(bundles))
        store.close()

    def audit_rows(self) -> list[dict[str, Any]]:
        store = AuditStore.open(self.settings.audit.url)
        try:
            return [row.event() for batch in store.iter_all() for row in batch]
        finally:
            store.close()

    async def everything(self, pid: str = "a1", **headers: str) -> tuple[int, dict[str, Any]]:
        r = await self.client.get(f"/Patient/{pid}/$everything", headers=headers)
        return r.status, await r.json()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings.from_env(
        {"FHIRBRIDGE_DATA_DIR": str(tmp_path), "FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS": "st-mary"}
    )
    store = IndexStore.open(settings.stores.index_url)
    store.apply(
        [
            _bundle("st-mary", 1, A, _obs("obs-a", "a1", "st-mary", "2345-7")),
            _bundle("riverside", 2, A2, _obs("obs-a2", "a2", "riverside", "8480-6"), consent()),
            _bundle("harbour", 3, C, _obs("obs-c", "c3", "harbour", "718-7")),
        ]
    )
    store.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    mpi.upsert_patients([("st-mary", A), ("riverside", A2), ("harbour", C)])
    assert mpi.linked_patient_ids("a1") == ["a1", "a2"]
    assert "c3" in mpi.linked_patient_ids("a1", include_possible=True)  # a POSSIBLE_MATCH only
    backend = Backend(settings, mpi_factory=lambda: mpi)
    async with TestClient(TestServer(create_app(settings, backend))) as client:
        yield Env(client, settings, tmp_path)
    mpi.close()


def _matches(bundle: dict[str, Any]) -> set[str]:
    return {
        e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"
    }


def _outcomes(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        issue
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == "outcome"
        for issue in e["resource"]["issue"]
    ]


def _suppressed(bundle: dict[str, Any]) -> bool:
    return any(
        i["code"] == "suppressed" and i["details"]["coding"][0]["code"] == "BTG" for i in _outcomes(bundle)
    )


async def test_denied_organisation_sees_only_its_own_entries_and_the_suppressed_issue(env: Env) -> None:
    status, bundle = await env.everything(**env.headers("st-mary"))
    assert status == 200
    assert _matches(bundle) == {"a1", "obs-a"}
    assert bundle["total"] == 2  # withheld entries are not counted
    assert _suppressed(bundle)
    text = str(_outcomes(bundle))
    assert "riverside" not in text and "a2" not in text  # says nothing of what was withheld
    # the organisation the Consent does not name sees the whole person, and no suppressed issue
    status, bundle = await env.everything(**env.headers("riverside"))
    assert _matches(bundle) == {"a1", "obs-a", "a2", "obs-a2"} and not _suppressed(bundle)


async def test_possible_match_never_exposes_data(env: Env) -> None:
    for org in ("st-mary", "riverside", "harbour"):
        _, bundle = await env.everything(**env.headers(org))
        assert not {"c3", "obs-c"} & _matches(bundle)


async def test_break_the_glass_shows_everything_and_is_audited(env: Env) -> None:
    reason = {"X-Break-Glass-Reason": "unconscious in the ED, allergies unknown"}
    status, bundle = await env.everything(**env.headers("st-mary", "ETREAT"), **reason)
    assert status == 200, bundle
    assert _matches(bundle) == {"a1", "obs-a", "a2", "obs-a2"} and not _suppressed(bundle)
    events = env.audit_rows()
    started = [e for e in events if any(s["code"] == DCM_BTG for s in e["subtype"])]
    assert {e["entity"][0]["what"]["reference"] for e in started} == {"Patient/a1", "Patient/a2"}
    assert all(
        any(p["coding"][0]["code"] == "BTG" and "allergies" in p.get("text", "") for p in e["purposeOfEvent"])
        for e in started
    )
    # within the window, the same clinician's emergency reads see everything without a new reason;
    # they carry the purpose and the break-the-glass flag, but do not start an override again
    status, bundle = await env.everything(**env.headers("st-mary", "ETREAT"))
    assert _matches(bundle) == {"a1", "obs-a", "a2", "obs-a2"}
    later = env.audit_rows()[len(events) :]
    assert later and not any(s["code"] == DCM_BTG for e in later for s in e["subtype"])
    assert all(any(p["coding"][0]["code"] == "BTG" for p in e["purposeOfEvent"]) for e in later)
    # a read for treatment is still under the Consent
    _, bundle = await env.everything(**env.headers("st-mary"))
    assert _matches(bundle) == {"a1", "obs-a"}


@pytest.mark.parametrize(
    ("org", "purpose", "why"),
    [("st-mary", "TREAT", "ETREAT or BTG"), ("riverside", "ETREAT", "may not break the glass")],
)
async def test_break_the_glass_is_refused_without_emergency_purpose_or_allowed_organisation(
    env: Env, org: str, purpose: str, why: str
) -> None:
    status, body = await env.everything(**env.headers(org, purpose), **{"X-Break-Glass-Reason": "emergency"})
    assert status == 403 and why in body["issue"][0]["diagnostics"]
    assert env.audit_rows()[-1]["outcome"] == "4"  # the refusal is audited too


async def test_revoking_the_consent_applies_to_the_next_request(env: Env) -> None:
    _, bundle = await env.everything(**env.headers("st-mary"))
    assert _matches(bundle) == {"a1", "obs-a"}
    env.apply(_bundle("riverside", 4, consent("inactive"), at="2026-02-01T00:00:00.000Z"))
    _, bundle = await env.everything(**env.headers("st-mary"))
    assert _matches(bundle) == {"a1", "obs-a", "a2", "obs-a2"} and not _suppressed(bundle)


async def test_a_consent_on_one_record_covers_the_persons_data_from_every_source(env: Env) -> None:
    """harbour is named by no Consent; a Consent of A' denying harbour covers A's st-mary data too."""
    deny_harbour = consent(cid="deny-harbour")
    deny_harbour["provision"]["actor"][0]["reference"]["identifier"]["value"] = "harbour"
    env.apply(_bundle("riverside", 5, deny_harbour))
    _, bundle = await env.everything(**env.headers("harbour"))
    assert _matches(bundle) == set() and _suppressed(bundle)


async def test_reads_and_searches_are_under_the_consent(env: Env) -> None:
    r = await env.client.get("/Observation/obs-a2", headers=env.headers("st-mary"))
    body = await r.json()
    assert r.status == 403 and body["issue"][0]["code"] == "suppressed"
    assert (await env.client.get("/Observation/obs-a", headers=env.headers("st-mary"))).status == 200
    assert (await env.client.get("/Observation/obs-a2", headers=env.headers("riverside"))).status == 200
    r = await env.client.get("/Patient?name=andersen", headers=env.headers("st-mary"))
    bundle = await r.json()
    assert _matches(bundle) == {"a1", "c3"} and bundle["total"] == 2 and _suppressed(bundle)


async def test_the_patient_reads_their_own_record_whatever_their_consents(env: Env) -> None:
    headers = bearer(env.settings, "patient/*.rs", patient="a1")
    _, bundle = await env.everything(**headers)
    assert _matches(bundle) == {"a1", "obs-a", "a2", "obs-a2"}


async def test_a_system_token_must_state_its_purpose(env: Env) -> None:
    status, body = await env.everything(**bearer(env.settings, "system/*.rs", organization="st-mary"))
    assert status == 403 and "purpose of use" in body["issue"][0]["diagnostics"]
    status, bundle = await env.everything(**bearer(env.settings, "system/*.rs", purpose="PUBHLTH"))
    assert status == 200 and "a1" in _matches(bundle)


async def test_every_access_is_audited_one_event_per_patient(env: Env) -> None:
    await env.everything(**env.headers("riverside"))
    events = env.audit_rows()
    assert [e["entity"][0]["what"]["reference"] for e in events] == ["Patient/a1", "Patient/a2"]
    assert all(e["outcome"] == "0" and e["subtype"][0]["code"] == "operation" for e in events)
    user = events[0]["agent"][0]
    assert (
        user["who"]["identifier"]["value"] == "dr-riverside"
        and user["who"]["reference"] == "Practitioner/dr-riverside"
    )
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"  # a user/ token's default
    # refused: no token at all, and a patient token outside its compartment
    assert (await env.client.get("/Patient/a1/$everything")).status == 401
    headers = bearer(env.settings, "patient/*.rs", patient="c3")
    assert (await env.client.get("/Patient/a1/$everything", headers=headers)).status == 403
    refused = env.audit_rows()[2:]
    assert [(e["outcome"], e["entity"][0]["what"]["reference"]) for e in refused] == [
        ("4", "Patient/a1"),
        ("4", "Patient/a1"),
    ]


async def test_when_the_audit_store_is_down_requests_get_503_and_no_data(tmp_path: Path) -> None:
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    settings = replace(
        settings, audit=replace(settings.audit, url="postgresql://fhirbridge@127.0.0.1:9/none")
    )
    store = IndexStore.open(settings.stores.index_url)
    store.apply([_bundle("st-mary", 1, A, _obs("obs-a", "a1", "st-mary", "2345-7"))])
    store.close()
    async with TestClient(TestServer(create_app(settings, Backend(settings)))) as client:
        r = await client.get("/Patient/a1/$everything", headers=bearer(settings, "user/*.rs"))
        body = await r.text()
        assert r.status == 503 and "audited" in body
        assert "Andersen" not in body and "obs-a" not in body
        r = await client.get("/Observation/obs-a", headers=bearer(settings, "user/*.rs"))
        assert r.status == 503 and "2345-7" not in await r.text()


async def test_consent_decision_explains_which_consent_and_provision(env: Env) -> None:
    steward = bearer(env.settings, "user/Consent.rs")
    r = await env.client.get("/Patient/a1/$consent-decision?actor=st-mary&purpose=TREAT", headers=steward)
    params = {p["name"]: p for p in (await r.json())["parameter"]}
    assert r.status == 200
    assert params["decision"]["valueCode"] == "deny"
    assert params["consent"]["valueReference"]["reference"] == "Consent/riverside-deny"
    assert params["provision"]["valueString"] == "provision"
    r = await env.client.get("/Patient/a1/$consent-decision?actor=riverside", headers=steward)
    params = {p["name"]: p for p in (await r.json())["parameter"]}
    assert params["decision"]["valueCode"] == "permit" and "consent" not in params
    # the patient asks about their own record; another patient may not
    own = bearer(env.settings, "patient/Consent.rs", patient="a1")
    assert (await env.client.get("/Patient/a1/$consent-decision?actor=st-mary", headers=own)).status == 200
    other = bearer(env.settings, "patient/Consent.rs", patient="c3")
    assert (await env.client.get("/Patient/a1/$consent-decision?actor=st-mary", headers=other)).status == 403


async def test_every_access_is_in_the_patients_access_log_with_a_valid_inclusion_proof(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.everything(**env.headers("st-mary"))  # allowed, A' withheld
    await env.everything(**env.headers("st-mary", "ETREAT"), **{"X-Break-Glass-Reason": "cardiac arrest"})
    await env.everything(**env.headers("riverside", "ETREAT"), **{"X-Break-Glass-Reason": "not allowed"})
    await env.client.get("/Observation/obs-a2", headers=env.headers("st-mary"))  # withheld read: 403
    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(env.tmp))
    assert main(["audit", "keygen"]) == 0
    assert main(["audit", "run", "--exit-when-idle", "0.3"]) == 0
    own = bearer(env.settings, "patient/*.rs", patient="a1")
    r = await env.client.get("/Patient/a1/$access-log", headers=own)
    assert r.status == 200
    bundle = await r.json()
    note = bundle["meta"]["extension"][0]["valueString"]
    vkey = env.settings.audit.key_file.with_suffix(".pub").read_text().strip()  # type: ignore[union-attr]
    cp = checkpoint.open(note, [vkey])
    events = [e["resource"] for e in bundle["entry"]]
    for entry in bundle["entry"]:
        proof = {x["url"]: x for x in entry["extension"][0]["extension"]}
        hashes = [
            base64.b64decode(x["valueBase64Binary"])
            for x in entry["extension"][0]["extension"]
            if x["url"] == "proofHash"
        ]
        leaf = base64.b64decode(proof["leafHash"]["valueBase64Binary"])
        merkle.verify_inclusion(leaf, proof["leafIndex"]["valueInteger"], cp.size, hashes, cp.root_hash)
    outcomes = [(e["outcome"], e["entity"][0]["what"]["reference"]) for e in events]
    # newest first, over the person (A and A'): the withheld read of A''s Observation, the refused
    # break-the-glass, the break-the-glass over both records (110127 each), st-mary's first read (A only:
    # nothing of A' was in its answer)
    assert outcomes == [
        ("4", "Patient/a2"),
        ("4", "Patient/a1"),
        ("0", "Patient/a2"),
        ("0", "Patient/a1"),
        ("0", "Patient/a1"),
    ]
    started = [e for e in events if any(s["code"] == DCM_BTG for s in e["subtype"])]
    assert len(started) == 2 and all(
        "cardiac arrest" in p.get("text", "")
        for e in started
        for p in e["purposeOfEvent"]
        if p["coding"][0]["code"] == "BTG"
    )
    # a patient never sees another patient's log; nor does a token without AuditEvent
    other = bearer(env.settings, "patient/*.rs", patient="c3")
    assert (await env.client.get("/Patient/a1/$access-log", headers=other)).status == 403
    obs_only = bearer(env.settings, "patient/Observation.rs", patient="a1")
    assert (await env.client.get("/Patient/a1/$access-log", headers=obs_only)).status == 403
    # the same events by search, for a steward
    steward = bearer(env.settings, "user/AuditEvent.rs")
    r = await env.client.get(
        "/AuditEvent?agent=" + events[-1]["agent"][0]["who"]["identifier"]["system"] + "|dr-st-mary",
        headers=steward,
    )
    by_agent = await r.json()
    assert r.status == 200 and by_agent["entry"]
    assert all(
        e["resource"]["agent"][0]["who"]["identifier"]["value"] == "dr-st-mary" for e in by_agent["entry"]
    )


async def test_an_event_the_audit_store_refuses_is_a_503_too(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: AuditStore, events: Any) -> None:
        raise AuditInputError("not a storable AuditEvent", index=0)

    monkeypatch.setattr(AuditStore, "record", refuse)
    r = await env.client.get("/Patient/a1/$everything", headers=env.headers("riverside"))
    body = await r.text()
    assert r.status == 503 and "Andersen" not in body and "obs-a" not in body


async def test_a_break_the_glass_whose_start_is_not_audited_opens_no_window(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = AuditStore.record
    fail = [True]

    def flaky(self: AuditStore, events: Any) -> None:
        if fail.pop() if fail else False:
            raise AuditInputError("not a storable AuditEvent", index=0)
        real(self, events)

    monkeypatch.setattr(AuditStore, "record", flaky)
    reason = {"X-Break-Glass-Reason": "unconscious in the ED"}
    status, _ = await env.everything(**env.headers("st-mary", "ETREAT"), **reason)
    assert status == 503
    # no override without its record: the next emergency read is under the Consent again
    status, bundle = await env.everything(**env.headers("st-mary", "ETREAT"))
    assert status == 200 and _matches(bundle) == {"a1", "obs-a"} and _suppressed(bundle)


async def test_a_consent_that_cannot_be_published_is_not_kept(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No broker answers: the answer is 503 and the Consent is neither in the index nor enforced."""
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    registrar = bearer(env.settings, "user/Consent.cru", organization="riverside")
    revoked = {k: v for k, v in consent("inactive").items() if k != "meta"}
    r = await env.client.put(
        "/Consent/riverside-deny",
        data=json.dumps(revoked),
        headers={**registrar, "Content-Type": "application/fhir+json"},
    )
    assert r.status == 503 and "not kept" in (await r.json())["issue"][0]["diagnostics"]
    _, bundle = await env.everything(**env.headers("st-mary"))
    assert _suppressed(bundle)  # the active version still decides


async def test_a_search_never_breaks_the_glass(env: Env) -> None:
    """A reason on a search opens no window: the glass is broken for one person at a time."""
    headers = {**env.headers("st-mary", "ETREAT"), "X-Break-Glass-Reason": "looking for someone"}
    r = await env.client.get("/Patient?name=andersen", headers=headers)
    assert r.status == 200 and _matches(await r.json()) == {"a1", "c3"}
    _, bundle = await env.everything(**env.headers("st-mary", "ETREAT"))
    assert _matches(bundle) == {"a1", "obs-a"}  # no window was opened by the search
