"""Bulk Data export (docs/bulk.md): kick-off, polling, the manifest, downloads, cancel, expiry, the
ledger pin, consent, authorization and the audit, against the real application (authorization,
consent and audit on), an index, an MPI and a ledger with a signed checkpoint.

A1 (st-mary) and A2 (riverside) are one person (MATCH); C3 (harbour) has a Consent that denies research
(HRESCH). The bundles of st-mary, riverside and harbour are logged below the checkpoint (size 3); the
harbour bundle with ``obs-late`` is logged after it, and ``org-x``'s is never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jwt
from yarl import URL

from bridge.cli import main
from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.auth.discovery import issuer_url
from bridge.service.auth.keys import signing_keys
from bridge.service.auth.purpose import ACT_REASON, iua_claims
from bridge.service.context import Backend
from bridge.service.fhir.bulk import EXPORTS, parse_export_query, parse_prefer
from bridge.service.http import FhirHTTPError
from bridge.stores.audit import AuditStore
from bridge.stores.exports import ExportStore
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.ledger import open_ledger
from bridge.stores.mpi import PersonIndex
from ledger import checkpoint, merkle, note
from ledger.log import LedgerEntry
from tests.support.consent import CONSENT_SCOPE
from tests.support.mpi_records import patient

SSN = "http://hl7.org/fhir/sid/us-ssn"
ORIGIN = "test.fhirbridge/ledger"


A1 = patient("a1", "123456789", "12 Elm Street", "Metro", "12345", org="st-mary")
A2 = patient("a2", "123456789", "12 Elm St", "Metro", "12345", org="riverside")
C3 = {
    **patient("c3", None, "400 Harbour View", "Portside", "99999", org="harbour"),
    "name": [{"family": "Zed"}],
}
X9 = {**patient("x9", None, "1 Nowhere", "Void", "00000", org="org-x"), "name": [{"family": "Quinn"}]}


def _obs(oid: str, pid: str, org: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"source": f"urn:fhirbridge:{org}"},
        "status": "final",
        "category": [
            {"coding": [{"system": "cat", "code": "laboratory" if code != "8480-6" else "vital-signs"}]}
        ],
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": "2026-01-10T08:00:00Z",
    }


def research_denied(pid: str) -> dict[str, Any]:
    """harbour's Consent on C3: no use for research (HRESCH), everything else permitted."""
    return {
        "resourceType": "Consent",
        "id": f"no-research-{pid}",
        "meta": {"source": "urn:fhirbridge:harbour"},
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": "2026-01-01T00:00:00Z",
        "policyRule": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]
        },
        "provision": {
            "type": "permit",
            "provision": [{"type": "deny", "purpose": [{"system": ACT_REASON, "code": "HRESCH"}]}],
        },
    }


def _sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _bundle(label: str, org: str, *resources: dict[str, Any], at: str) -> IncomingBundle:
    return IncomingBundle(
        {"resourceType": "Bundle", "timestamp": at, "entry": [{"resource": r} for r in resources]},
        _sha(label),
        org,
        "k",
        "t",
        0,
        int(hashlib.sha256(label.encode()).hexdigest()[:6], 16),
        at,
    )


def _entry(label: str, org: str, offset: int) -> LedgerEntry:
    return LedgerEntry(
        bundle_sha256=_sha(label),
        source_org=org,
        adapter="hl7v2",
        adapter_version="1",
        topic="t",
        partition=0,
        offset=offset,
        ingested_at="2026-01-11T00:00:00Z",
        message_id=None,
    )


def _token(
    settings: Settings,
    scope: str = "system/*.rs",
    *,
    client_id: str = "bulk-client",
    purpose: str | None = "HRESCH",
    organization: str | None = "research-lab",
    patient: str | None = None,
) -> dict[str, str]:
    """A backend service's token of the embedded issuer (``sub`` is the client, as the issuer writes it)."""
    base = settings.http.fhir_base()
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer_url(base),
        "aud": base,
        "sub": client_id,
        "client_id": client_id,
        "scope": scope,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    if patient is not None:
        claims["patient"] = patient
    claims.update(iua_claims((purpose,) if purpose else (), organization))
    ring = signing_keys(settings)
    signed = jwt.encode({"alg": "ES256", "kid": ring.kid, "typ": "at+jwt"}, claims, ring.signing_set())
    return {"Authorization": f"Bearer {signed}"}


class Env:
    def __init__(
        self, client: TestClient[Any, Any], settings: Settings, keys: tuple[str, str], ledger_url: str
    ) -> None:
        self.client, self.settings, self.ledger_url = client, settings, ledger_url
        self.skey, self.vkey = keys
        self.headers = _token(settings)

    async def kickoff(
        self, path: str = "/$export", headers: dict[str, str] | None = None, **extra: str
    ) -> str:
        r = await self.client.get(
            path, headers={"Prefer": "respond-async", **(headers or self.headers), **extra}
        )
        body = await r.text()
        assert r.status == 202, body
        return r.headers["Content-Location"]

    async def wait(self, status_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        for _ in range(400):
            r = await self.client.get(URL(status_url).path, headers=headers or self.headers)
            if r.status == 200:
                assert r.content_type == "application/json"
                return dict(await r.json())
            assert r.status == 202, await r.text()
            assert r.headers["Retry-After"] and "X-Progress" in r.headers
            await asyncio.sleep(0.02)
        raise AssertionError("the export did not finish")

    async def download(self, url: str, headers: dict[str, str] | None = None) -> bytes:
        r = await self.client.get(URL(url).path, headers=headers or self.headers)
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "application/fhir+ndjson"
        return await r.read()

    async def export(
        self, path: str = "/$export", **params: str
    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """Kick off, wait, download every output file: (manifest, type -> resources)."""
        url = path + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")
        manifest = await self.wait(await self.kickoff(url))
        out: dict[str, list[dict[str, Any]]] = {}
        for item in manifest["output"]:
            data = await self.download(item["url"])
            out.setdefault(item["type"], []).extend(orjson.loads(line) for line in data.splitlines())
        return manifest, out

    async def errors(self, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        issues = []
        for item in manifest["error"]:
            for line in (await self.download(item["url"])).splitlines():
                issues += orjson.loads(line)["issue"]
        return issues

    def audit_rows(self) -> list[dict[str, Any]]:
        store = AuditStore.open(self.settings.audit.url)
        try:
            return [row.event() for batch in store.iter_all() for row in batch]
        finally:
            store.close()

    def store(self) -> ExportStore:
        return ExportStore.open(self.settings.export.url)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with _environment(tmp_path) as e:
        yield e


@pytest.fixture
async def pg_env(tmp_path: Path, pg_dsn: str) -> AsyncIterator[Env]:
    """The same, with the index and the export store on PostgreSQL."""
    async with _environment(tmp_path, FHIRBRIDGE_INDEX_URL=pg_dsn, FHIRBRIDGE_EXPORT_DB=pg_dsn) as e:
        yield e


@contextlib.asynccontextmanager
async def _environment(tmp_path: Path, **extra: str) -> AsyncIterator[Env]:
    settings = Settings.from_env(
        {
            "FHIRBRIDGE_DATA_DIR": str(tmp_path),
            "FHIRBRIDGE_EXPORT_FILE_LINES": "2",
            "FHIRBRIDGE_EXPORT_PAGE_ROWS": "2",
            **extra,
        }
    )
    index = IndexStore.open(settings.stores.index_url)
    index.apply(
        [
            _bundle(
                "st-mary-1",
                "st-mary",
                A1,
                _obs("obs-a", "a1", "st-mary", "2345-7"),
                at="2026-01-11T00:00:00.000Z",
            ),
            _bundle(
                "riverside-2",
                "riverside",
                A2,
                _obs("obs-a2", "a2", "riverside", "8480-6"),
                _obs("obs-a3", "a2", "riverside", "718-7"),
                at="2026-01-12T00:00:00.000Z",
            ),
            _bundle(
                "harbour-3",
                "harbour",
                C3,
                _obs("obs-c", "c3", "harbour", "718-7"),
                research_denied("c3"),
                at="2026-01-13T00:00:00.000Z",
            ),
            _bundle(
                "harbour-4",
                "harbour",
                _obs("obs-late", "c3", "harbour", "2345-7"),
                at="2026-01-14T00:00:00.000Z",
            ),
            _bundle("org-x-5", "org-x", X9, at="2026-01-15T00:00:00.000Z"),
        ]
    )
    index.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    mpi.upsert_patients([("st-mary", A1), ("riverside", A2), ("harbour", C3), ("org-x", X9)])
    assert mpi.linked_patient_ids("a1") == ["a1", "a2"]
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    skey, vkey = note.generate_key(ORIGIN)
    led = open_ledger(
        ledger_url, origin=ORIGIN, signer_key=skey, checkpoint_every=10**6, checkpoint_interval_ms=10**9
    )
    led.append(
        [
            _entry("st-mary-1", "st-mary", 1),
            _entry("riverside-2", "riverside", 2),
            _entry("harbour-3", "harbour", 3),
        ]
    )
    led.checkpoint_now()
    led.append([_entry("harbour-4", "harbour", 4)])
    led.close()
    backend = Backend(
        settings, mpi_factory=lambda: mpi, ledger_factory=lambda: open_ledger(ledger_url, origin=ORIGIN)
    )
    async with TestClient(TestServer(create_app(settings, backend))) as client:
        yield Env(client, settings, (skey, vkey), ledger_url)
    mpi.close()


def _ids(resources: dict[str, list[dict[str, Any]]]) -> set[str]:
    return {r["id"] for rs in resources.values() for r in rs}


async def test_exports_on_postgresql(pg_env: Env) -> None:
    manifest, out = await pg_env.export()
    assert _ids(out) == {"a1", "a2", "obs-a", "obs-a2", "obs-a3"}
    assert "2 resources were withheld" in orjson.dumps(await pg_env.errors(manifest)).decode()
    _, out = await pg_env.export("/Group/org-st-mary/$export", _type="Observation")
    assert _ids(out) == {"obs-a", "obs-a2", "obs-a3"}
    _, out = await pg_env.export("/Patient/$export", _since="2026-01-12T00:00:00Z")
    assert _ids(out) == {"a2", "obs-a2", "obs-a3"}


async def test_system_export_end_to_end_with_hashes_counts_and_the_pinned_checkpoint(env: Env) -> None:
    manifest, out = await env.export()
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"].endswith("/$export")
    # the research purpose: C3's data is withheld by its Consent; obs-late's bundle is after the
    # checkpoint and x9's is not logged: both pending; the Consent itself is never exported
    assert _ids(out) == {"a1", "a2", "obs-a", "obs-a2", "obs-a3"}
    assert set(out) == {"Patient", "Observation"}
    # split at two lines a file
    assert [i["count"] for i in manifest["output"] if i["type"] == "Observation"] == [2, 1]
    for item in manifest["output"] + manifest["error"]:
        data = await env.download(item["url"])
        assert (
            hashlib.sha256(data).hexdigest()
            == item["extension"]["sha256"]
            == manifest["extension"]["sha256"][item["url"]]
        )
        assert len(data.splitlines()) == item["count"]
    # the checkpoint is signed by the ledger's key, its size is the pin, and every exported resource's
    # bundle is proven in it by its leaves file
    cp = checkpoint.open(manifest["extension"]["ledgerCheckpoint"], [env.vkey])
    assert cp.size == manifest["extension"]["ledgerTreeSize"] == 3
    led = open_ledger(env.ledger_url, origin=ORIGIN)
    try:
        for item in manifest["output"]:
            lines = (await env.download(item["url"])).splitlines()
            side = item["extension"]["ledgerLeaves"]
            leaves = await env.download(side["url"])
            assert hashlib.sha256(leaves).hexdigest() == side["sha256"]
            for line, leaf_line in zip(lines, leaves.splitlines(), strict=True):
                leaf = orjson.loads(leaf_line)
                assert leaf["id"] == orjson.loads(line)["id"]
                entry = led.entry(leaf["ledgerIndex"])
                assert (entry.bundle_sha256, entry.source_org) == (leaf["bundleSha256"], leaf["sourceOrg"])
                proof = led.inclusion_proof(leaf["ledgerIndex"], cp.size)
                merkle.verify_inclusion(
                    merkle.leaf_hash(entry.canonical()), leaf["ledgerIndex"], cp.size, proof, cp.root_hash
                )
    finally:
        led.close()
    issues = await env.errors(manifest)
    text = orjson.dumps(issues).decode()
    assert "2 resources were withheld by patients' consents" in text  # C3 and obs-c
    assert "2 resources were left out" in text and f"_since={manifest['transactionTime']}" in text
    assert "c3" not in text and "Zed" not in text and "obs-late" not in text  # counts only, no PHI
    # the transactionTime is moved back to the earliest pending resource's lastUpdated: _since from it
    # returns them once their bundles are below a later checkpoint
    assert manifest["transactionTime"] == "2026-01-14T00:00:00.000Z"


async def test_since_returns_only_what_changed_after_it(env: Env) -> None:
    first, _ = await env.export()
    # no new checkpoint: nothing has changed below the pin since the transactionTime, and the two
    # resources are still pending (said again)
    manifest, out = await env.export(_since=first["transactionTime"])
    assert _ids(out) == set()
    assert "2 resources were left out" in orjson.dumps(await env.errors(manifest)).decode()
    _, out = await env.export(_since="2026-01-12T00:00:00Z")
    assert _ids(out) == {"a2", "obs-a2", "obs-a3"}


async def test_since_after_a_new_checkpoint_returns_the_resources_that_were_pending(env: Env) -> None:
    env.headers = _token(env.settings, purpose="TREAT")
    first, out = await env.export()
    assert not {"obs-late", "x9"} & _ids(out)
    # the ledger consumer logs org-x's bundle and signs a checkpoint over everything
    led = open_ledger(env.ledger_url, origin=ORIGIN, signer_key=env.skey)
    led.append([_entry("org-x-5", "org-x", 5)])
    led.checkpoint_now()
    led.close()
    manifest, out = await env.export(_since=first["transactionTime"])
    assert _ids(out) == {"obs-late", "x9"}
    assert manifest["extension"]["ledgerTreeSize"] == 5 and manifest["error"] == []


async def test_type_and_patient_and_group_exports(env: Env) -> None:
    _, out = await env.export(_type="Patient")
    assert set(out) == {"Patient"} and _ids(out) == {"a1", "a2"}
    _, out = await env.export("/Patient/$export", _type="Observation,Patient")
    assert _ids(out) == {"a1", "a2", "obs-a", "obs-a2", "obs-a3"}
    # the source organisation's group holds its patients and, through the MPI, their linked records
    _, out = await env.export("/Group/org-st-mary/$export")
    assert _ids(out) == {"a1", "a2", "obs-a", "obs-a2", "obs-a3"}
    store = env.store()
    store.create_group("cohort", "cohort", ["a2"], now=0)
    store.close()
    _, out = await env.export("/Group/cohort/$export", _type="Observation")
    assert _ids(out) == {"obs-a", "obs-a2", "obs-a3"}
    for gid in ("nope", "a%00b", "a%20b"):
        r = await env.client.get(f"/Group/{gid}/$export", headers={"Prefer": "respond-async", **env.headers})
        assert r.status == 404 and (await r.json())["resourceType"] == "OperationOutcome"


async def test_groups_cli_defines_the_groups_an_export_may_name(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(env.settings.data_dir))
    members = tmp_path / "members.txt"
    members.write_text("c3\nPatient/a1\n\n")
    assert (
        main(["groups", "create", "--id", "study-1", "--name", "Study", "--members-file", str(members)]) == 0
    )
    assert main(["groups", "create", "--id", "study-1", "--member", "a1"]) == 1  # taken
    assert main(["groups", "create", "--id", "org-st-mary", "--member", "a1"]) == 1  # an organisation's
    assert main(["groups", "create", "--id", "bad id", "--member", "a1"]) == 1
    assert main(["groups", "create", "--id", "empty"]) == 2
    assert main(["groups", "create", "--id", "nofile", "--members-file", str(tmp_path / "absent")]) == 1
    capsys.readouterr()
    assert main(["groups", "list"]) == 0
    assert capsys.readouterr().out == "study-1\t2\tStudy\n"
    r = await env.client.get("/Group/study-1", headers=env.headers)
    assert [m["entity"]["reference"] for m in (await r.json())["member"]] == ["Patient/a1", "Patient/c3"]
    env.headers = _token(env.settings, purpose="TREAT")
    _, out = await env.export("/Group/study-1/$export", _type="Patient")
    assert _ids(out) == {"a1", "a2", "c3"}  # a1's linked record a2 too
    assert main(["groups", "delete", "--id", "study-1"]) == 0
    assert main(["groups", "delete", "--id", "study-1"]) == 1
    assert (await env.client.get("/Group/study-1", headers=env.headers)).status == 404


async def test_type_filter_selects_within_its_type_only(env: Env) -> None:
    env.headers = _token(env.settings, purpose="TREAT")
    _, out = await env.export(_typeFilter="Observation%3Fcode%3Dhttp://loinc.org%7C718-7")
    assert {r["id"] for r in out["Observation"]} == {"obs-a3", "obs-c"}
    assert {r["id"] for r in out["Patient"]} == {"a1", "a2", "c3"}  # types without a filter: all
    # two queries for one type: either may match (comma-separated, the inner comma of an OR kept)
    _, out = await env.export(
        _type="Observation",
        _typeFilter="Observation%3Fcode%3D2345-7,Observation%3Fcode%3D718-7%2C8480-6",
    )
    assert {r["id"] for r in out["Observation"]} == {"obs-a", "obs-a2", "obs-a3", "obs-c"}
    _, out = await env.export(
        _type="Observation", _typeFilter="Observation%3Fsubject%3DPatient/a2%26code%3D718-7"
    )
    assert {r["id"] for r in out["Observation"]} == {"obs-a3"}


async def test_groups_are_listed_and_read(env: Env) -> None:
    store = env.store()
    store.create_group("cohort", "my cohort", ["a1", "c3"], now=0)
    store.close()
    r = await env.client.get("/Group", headers=env.headers)
    bundle = await r.json()
    assert r.status == 200
    assert {e["resource"]["id"] for e in bundle["entry"]} == {
        "org-st-mary",
        "org-riverside",
        "org-harbour",
        "org-org-x",
        "cohort",
    }
    r = await env.client.get("/Group/cohort", headers=env.headers)
    group = await r.json()
    assert [m["entity"]["reference"] for m in group["member"]] == ["Patient/a1", "Patient/c3"]
    r = await env.client.get("/Group/org-harbour", headers=env.headers)
    assert (await r.json())["quantity"] == 1
    assert (await env.client.get("/Group/org-unknown", headers=env.headers)).status == 404


async def test_a_treatment_export_of_the_consenting_organisation_sees_everything_logged(env: Env) -> None:
    env.headers = _token(env.settings, purpose="TREAT")
    manifest, out = await env.export()
    assert {"c3", "obs-c"} <= _ids(out)  # the Consent denies research only
    assert "withheld" not in orjson.dumps(await env.errors(manifest)).decode()


async def test_narrowed_scopes_and_per_type_scopes(env: Env) -> None:
    env.headers = _token(
        env.settings, "system/Patient.rs system/Observation.rs?category=cat|laboratory", purpose="TREAT"
    )
    manifest, out = await env.export()
    assert _ids(out) == {"a1", "a2", "c3", "obs-a", "obs-a3", "obs-c"}  # obs-a2 is a vital sign
    assert "narrowing" in orjson.dumps(await env.errors(manifest)).decode()
    r = await env.client.get("/$export?_type=Condition", headers={"Prefer": "respond-async", **env.headers})
    assert r.status == 403 and "Condition" in (await r.json())["issue"][0]["diagnostics"]
    # a narrowing on every type: a type the query cannot be read on (Patient has no category) matches nothing
    env.headers = _token(env.settings, "system/*.rs?category=cat|laboratory", purpose="TREAT")
    _, out = await env.export()
    assert _ids(out) == {"obs-a", "obs-a3", "obs-c"}


@pytest.mark.parametrize(
    ("scope", "patient"),
    [("user/*.rs", None), ("patient/*.rs", "a1"), ("user/*.rs system/Patient.s", None)],
)
async def test_patient_and_user_tokens_are_refused(env: Env, scope: str, patient: str | None) -> None:
    headers = _token(env.settings, scope, patient=patient, purpose="TREAT")
    for path in ("/$export", "/Patient/$export", "/Group/org-st-mary/$export"):
        r = await env.client.get(path, headers={"Prefer": "respond-async", **headers})
        assert r.status == 403, (path, await r.text())
        assert (await r.json())["resourceType"] == "OperationOutcome"
    assert env.audit_rows()[-1]["outcome"] == "4"


async def test_a_system_token_without_purpose_is_refused(env: Env) -> None:
    r = await env.client.get(
        "/$export", headers={"Prefer": "respond-async", **_token(env.settings, purpose=None)}
    )
    assert r.status == 403 and "purpose of use" in (await r.json())["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    ("query", "prefer", "expected"),
    [
        ("", None, "Prefer: respond-async"),
        ("?_outputFormat=text/csv", "respond-async", "_outputFormat"),
        ("?_since=yesterday", "respond-async", "_since"),
        ("?_since=2026-13-01", "respond-async", "_since"),
        ("?_type=observation", "respond-async", "_type"),
        ("?_type=Consent", "respond-async", "_type"),
        ("?_type=,", "respond-async", "_type"),
        ("?_since=2026&_since=2025", "respond-async", "_since"),
        ("?_elements=id", "respond-async", "_elements"),
        ("?_typeFilter=Observation%3Fnope%3D1", "respond-async", "_typeFilter (Observation)"),
        ("?_typeFilter=Observation%3Fdate%3Dsoon", "respond-async", "_typeFilter (Observation)"),
        ("?_typeFilter=Observation%3F_count%3D1", "respond-async", "_typeFilter"),
        ("?_type=Patient&_typeFilter=Observation%3Fcode%3D1", "respond-async", "_typeFilter"),
        ("?_typeFilter=nonsense", "respond-async", "_typeFilter"),
        ("?_type=Patient%00", "respond-async", "NUL"),
    ],
)
async def test_bad_parameters_are_located_400s(
    env: Env, query: str, prefer: str | None, expected: str
) -> None:
    headers = {**env.headers, **({"Prefer": prefer} if prefer else {})}
    r = await env.client.get(f"/$export{query}", headers=headers)
    body = await r.json()
    assert r.status == 400, body
    assert body["resourceType"] == "OperationOutcome" and expected in body["issue"][0]["diagnostics"]
    assert "Traceback" not in orjson.dumps(body).decode()


async def test_lenient_handling_ignores_unknown_parameters_and_says_so(env: Env) -> None:
    r = await env.client.get(
        "/$export?_elements=id&_type=Patient",
        headers={**env.headers, "Prefer": "respond-async, handling=lenient"},
    )
    assert r.status == 202
    manifest = await env.wait(r.headers["Content-Location"])
    assert (
        "parameter _elements is not supported and was ignored"
        in orjson.dumps(await env.errors(manifest)).decode()
    )


async def test_only_the_requesting_client_may_poll_download_or_cancel(env: Env) -> None:
    status_url = await env.kickoff()
    manifest = await env.wait(status_url)
    other = _token(env.settings, client_id="someone-else")
    assert (await env.client.get(URL(status_url).path, headers=other)).status == 404
    assert (await env.client.get(URL(manifest["output"][0]["url"]).path, headers=other)).status == 404
    assert (await env.client.delete(URL(status_url).path, headers=other)).status == 404
    assert (await env.client.get(URL(manifest["output"][0]["url"]).path)).status == 401  # no token
    await env.download(manifest["output"][0]["url"])  # still there for its owner


async def test_cancel_deletes_the_files_and_the_job(env: Env) -> None:
    status_url = await env.kickoff()
    manifest = await env.wait(status_url)
    job = URL(status_url).path.rsplit("/", 1)[1]
    directory = env.settings.export.directory / job
    assert any(directory.iterdir())
    r = await env.client.delete(URL(status_url).path, headers=env.headers)
    assert r.status == 202
    assert not directory.exists()
    assert (await env.client.get(URL(status_url).path, headers=env.headers)).status == 404
    assert (await env.client.get(URL(manifest["output"][0]["url"]).path, headers=env.headers)).status == 404


async def test_cancel_while_running_stops_the_job(env: Env) -> None:
    status_url = await env.kickoff()
    r = await env.client.delete(URL(status_url).path, headers=env.headers)  # most likely still running
    assert r.status == 202
    job = URL(status_url).path.rsplit("/", 1)[1]
    assert not (env.settings.export.directory / job).exists()
    assert env.client.app[EXPORTS].tasks == {}
    assert (await env.client.get(URL(status_url).path, headers=env.headers)).status == 404


async def test_expired_jobs_are_404_and_swept(env: Env) -> None:
    status_url = await env.kickoff()
    manifest = await env.wait(status_url)
    job = URL(status_url).path.rsplit("/", 1)[1]
    store = env.store()
    store.db.execute("UPDATE export_jobs SET expires_at = ? WHERE id = ?", [int(time.time()) - 1, job])
    store.close()
    assert (await env.client.get(URL(status_url).path, headers=env.headers)).status == 404
    assert (await env.client.get(URL(manifest["output"][0]["url"]).path, headers=env.headers)).status == 404
    assert await env.client.app[EXPORTS].sweep(env.client.app) == 1
    assert not (env.settings.export.directory / job).exists()
    store = env.store()
    assert store.job(job) is None
    store.close()


async def test_manifest_expires_after_the_configured_time(env: Env) -> None:
    status_url = await env.kickoff()
    await env.wait(status_url)
    job = env.store().job(URL(status_url).path.rsplit("/", 1)[1])
    assert job is not None
    assert abs(job.expires_at - (time.time() + env.settings.export.expiry_minutes * 60)) < 30


async def test_a_failing_job_answers_500_with_an_operation_outcome(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.service.fhir import export_job

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export_job, "resource_page", broken)
    status_url = await env.kickoff()
    for _ in range(200):
        r = await env.client.get(URL(status_url).path, headers=env.headers)
        if r.status != 202:
            break
        await asyncio.sleep(0.02)
    body = await r.json()
    assert r.status == 500 and body["resourceType"] == "OperationOutcome"
    assert (
        "RuntimeError" in body["issue"][0]["diagnostics"]
        and "disk on fire" not in orjson.dumps(body).decode()
    )
    job = URL(status_url).path.rsplit("/", 1)[1]
    assert not (env.settings.export.directory / job).exists()


async def test_a_kickoff_beyond_the_running_exports_allowed_is_429(env: Env) -> None:
    store = env.store()
    for k in range(env.settings.export.max_running):
        store.create_job(
            f"{k:032x}",
            owner="x",
            kind="system",
            group_id=None,
            request="r",
            params={},
            now=0,
            expires_at=2**40,
        )
    store.close()
    r = await env.client.get("/$export", headers={"Prefer": "respond-async", **env.headers})
    assert r.status == 429 and r.headers["Retry-After"]
    assert "exports are running" in (await r.json())["issue"][0]["diagnostics"]


async def test_jobs_interrupted_by_a_restart_are_marked_failed(env: Env) -> None:
    store = env.store()
    store.create_job(
        "f" * 32, owner="x", kind="system", group_id=None, request="r", params={}, now=0, expires_at=2**40
    )
    store.close()
    manager = env.client.app[EXPORTS]
    manager.recovered = False
    await manager.recover(env.client.app)
    status_url = await env.kickoff()  # a job of this process is not touched by a second recovery
    manager.recovered = False
    await manager.recover(env.client.app)
    await env.wait(status_url)
    store = env.store()
    job = store.job("f" * 32)
    store.close()
    assert job is not None and job.status == "failed" and "restart" in (job.error or "")


async def test_kickoff_and_each_download_are_audited_with_the_patients_of_the_file(env: Env) -> None:
    before = len(env.audit_rows())
    status_url = await env.kickoff("/$export?_type=Patient")
    kickoff = env.audit_rows()[before:]
    assert len(kickoff) == 1 and kickoff[0]["outcome"] == "0"
    assert any(e.get("description") == "GET /$export?_type=Patient" for e in kickoff[0]["entity"])
    manifest = await env.wait(status_url)
    item = manifest["output"][0]
    before = len(env.audit_rows())
    data = await env.download(item["url"])
    rows = env.audit_rows()[before:]
    in_file = {orjson.loads(line)["id"] for line in data.splitlines()}
    assert len(in_file) == 2
    assert {e["entity"][0]["what"]["reference"] for e in rows} == {f"Patient/{p}" for p in in_file}
    assert all(e["action"] == "R" and e["outcome"] == "0" for e in rows)
    counts = [
        d["valueString"]
        for e in rows
        for ent in e["entity"]
        if ent["type"]["code"] == "Patient"
        for d in ent.get("detail", [])
    ]
    assert counts == ["1", "1"]


async def test_a_ledger_without_a_signed_checkpoint_refuses_to_pin(tmp_path: Path) -> None:
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    IndexStore.open(settings.stores.index_url).close()
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    open_ledger(ledger_url, origin=ORIGIN).close()
    backend = Backend(settings, ledger_factory=lambda: open_ledger(ledger_url, origin=ORIGIN))
    async with TestClient(TestServer(create_app(settings, backend))) as client:
        r = await client.get("/$export", headers={"Prefer": "respond-async", **_token(settings)})
        assert r.status == 503 and r.headers["Retry-After"]


# -- parsing (hypothesis) ------------------------------------------------------------------------
@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=40)), max_size=6), st.booleans())
def test_parse_export_query_answers_a_query_or_a_located_400(
    pairs: list[tuple[str, str]], lenient: bool
) -> None:
    try:
        q = parse_export_query(pairs, lenient=lenient)
    except FhirHTTPError as exc:
        assert exc.status == 400 and ("parameter" in exc.diagnostics or "NUL" in exc.diagnostics)
        return
    names = {n for n, _ in pairs}
    assert lenient or names <= {"_type", "_since", "_outputFormat", "_typeFilter"}
    assert set(q.ignored) == names - {"_type", "_since", "_outputFormat", "_typeFilter"}
    for t in q.types or ():
        assert t[0].isupper() and t != "Consent"


@given(
    st.lists(st.sampled_from(["Patient", "Observation", "Encounter", "Condition"]), min_size=1, max_size=5)
)
def test_parse_export_query_keeps_the_types_in_order_once(types: list[str]) -> None:
    q = parse_export_query([("_type", ",".join(types))])
    assert q.types == tuple(dict.fromkeys(types))


@given(st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.just(UTC)))
def test_since_is_normalised_to_the_stored_instant_form(dt: datetime) -> None:
    q = parse_export_query([("_since", dt.isoformat().replace("+00:00", "Z"))])
    assert q.since is not None and q.since.endswith("Z") and len(q.since) == 24
    since = datetime.fromisoformat(q.since.replace("Z", "+00:00"))
    # the first instant it denotes, rounded up to the stored millisecond: never before it, never a ms after
    assert timedelta(0) <= since - dt < timedelta(milliseconds=1)


@given(st.text(alphabet=st.characters(blacklist_characters=",;"), max_size=40))
def test_parse_prefer_finds_respond_async_among_other_preferences(other: str) -> None:
    prefs = parse_prefer(f"{other}, Respond-Async ; wait=10")
    assert "respond-async" in prefs
    assert all(p == p.lower() and "," not in p and ";" not in p for p in prefs)
    assert parse_prefer(None) == frozenset() and "respond-async" not in parse_prefer(other)


def test_output_formats() -> None:
    for fmt in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        assert parse_export_query([("_outputFormat", fmt)]).types is None
    with pytest.raises(FhirHTTPError):
        parse_export_query([("_outputFormat", "application/fhir+json")])


async def test_the_openapi_document_lists_the_export_routes(env: Env) -> None:
    spec = await (await env.client.get("/openapi.json")).json()
    for path, method in [
        ("/$export", "get"),
        ("/Patient/$export", "get"),
        ("/Group/{id}/$export", "get"),
        ("/_bulk/{job}", "get"),
        ("/_bulk/{job}", "delete"),
        ("/_bulk/{job}/{file}", "get"),
        ("/Group", "get"),
        ("/Group/{id}", "get"),
    ]:
        assert spec["paths"][path][method]["summary"], (path, method)


async def test_the_recipients_check_of_docs_bulk_md_over_the_ledger_routes(env: Env) -> None:
    """docs/bulk.md's verification, step by step, with the public ledger routes only."""
    manifest, out = await env.export(_type="Patient,Observation")
    note_text = manifest["extension"]["ledgerCheckpoint"]
    cp = checkpoint.open(note_text, [env.vkey])
    assert await (await env.client.get(f"/ledger/checkpoint?size={cp.size}")).text() == note_text
    checked = set()
    for item in manifest["output"]:
        lines = (await env.download(item["url"])).splitlines()
        leaves = (await env.download(item["extension"]["ledgerLeaves"]["url"])).splitlines()
        for line, leaf_line in zip(lines, leaves, strict=True):
            leaf = orjson.loads(leaf_line)
            index = leaf["ledgerIndex"]
            got = await (await env.client.get(f"/ledger/proof/inclusion?index={index}&size={cp.size}")).json()
            entry = (await (await env.client.get(f"/ledger/entries/{index}")).json())["entry"]
            assert (entry["bundle_sha256"], entry["source_org"]) == (leaf["bundleSha256"], leaf["sourceOrg"])
            proof = [base64.b64decode(h) for h in got["proof"]]
            merkle.verify_inclusion(
                merkle.leaf_hash(LedgerEntry(**entry).canonical()), index, cp.size, proof, cp.root_hash
            )
            checked.add(orjson.loads(line)["id"])
    assert checked == _ids(out)
