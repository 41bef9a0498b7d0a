"""A Bulk Data Access 2.0 client flow written from the specification (hl7.org/fhir/uv/bulkdata/export.html)
with nothing but urllib, as a population-health back end would run it with a SMART Backend Services
token (``system/*.rs``, purpose TREAT):

1. kick-off ``GET /$export`` with ``Accept: application/fhir+json`` and ``Prefer: respond-async``:
   ``202 Accepted`` and an absolute ``Content-Location``;
2. poll the status URL, sleeping as long as each ``202``'s ``Retry-After`` says, until ``200`` and the
   complete-status manifest (``transactionTime``, ``request``, ``requiresAccessToken``, ``output``,
   ``error``);
3. download every file with the token (``Accept: application/fhir+ndjson``), check its SHA-256 against
   the manifest and its line count against ``count``, and each type's count against the server's own
   search total;
4. check the manifest's ledger checkpoint: a signed note that verifies with the ledger's key and is the
   note ``/ledger/checkpoint?size=n`` serves for its tree size;
5. ``DELETE`` the status URL: ``202``, and then the job and its files are gone (``404``).
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from tests.clients import labdata
from tests.clients.stack import ClientStack

pytestmark = pytest.mark.clients

#: the longest the flow may take from kick-off to the manifest
EXPORT_TIMEOUT_S = 90


def _request(url: str, token: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def _retry_after(value: str | None) -> float:
    """Seconds to wait: Retry-After is delay-seconds or an HTTP-date (RFC 9110 section 10.2.3)."""
    assert value, "a 202 status answer carries no Retry-After"
    if value.strip().isdigit():
        return float(value)
    return max(
        0.0,
        (parsedate_to_datetime(value) - datetime.now(parsedate_to_datetime(value).tzinfo)).total_seconds(),
    )


def _wait_for_checkpoint(stack: ClientStack) -> int:
    """The tree size of a signed checkpoint that covers every bundle ingested so far."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{stack.base}/ledger/checkpoint", timeout=10) as resp:
            size = int(resp.read().decode().split("\n")[1])
        if size >= stack.messages:
            return size
        assert time.monotonic() < deadline, f"no checkpoint covers {stack.messages} bundles (latest: {size})"
        time.sleep(0.3)


def _manifest(stack: ClientStack, token: str, kickoff: str) -> tuple[str, dict[str, Any], int]:
    status, headers, body = _request(kickoff, token, Accept="application/fhir+json", Prefer="respond-async")
    assert status == 202, f"kick-off {kickoff} -> {status}: {body[:2000]!r}"
    status_url = headers.get("Content-Location", "")
    assert status_url.startswith(stack.base + "/"), f"Content-Location {status_url!r} is not an absolute URL"
    polls = 0
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        status, headers, body = _request(status_url, token, Accept="application/json")
        if status != 202:
            break
        polls += 1
        wait = _retry_after(headers.get("Retry-After"))
        assert time.monotonic() + wait < deadline, f"the export did not complete in {EXPORT_TIMEOUT_S} s"
        time.sleep(wait)
    assert status == 200, f"status {status_url} -> {status}: {body[:2000]!r}"
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    return status_url, json.loads(body), polls


def _download(
    stack: ClientStack, token: str, kickoff: str, manifest: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Check the complete-status manifest of Bulk Data 2.0, download every file it names with ``token``,
    check each one's SHA-256 and line count; returns the exported resources per type."""
    datetime.fromisoformat(manifest["transactionTime"])
    assert manifest["request"] == kickoff
    assert manifest["requiresAccessToken"] is True
    assert isinstance(manifest["output"], list) and manifest["output"], manifest
    assert isinstance(manifest["error"], list)
    digests: dict[str, str] = manifest.get("extension", {}).get("sha256", {})
    exported: dict[str, list[dict[str, Any]]] = {}
    files = [*manifest["output"], *manifest["error"]]
    listed = {f["url"] for f in files}
    assert listed <= set(digests), f"files without a SHA-256 in the manifest: {sorted(listed - set(digests))}"
    bodies: dict[str, bytes] = {}
    for url, digest in digests.items():
        status, headers, body = _request(url, token, Accept="application/fhir+ndjson")
        assert status == 200, f"GET {url} -> {status}: {body[:500]!r}"
        assert hashlib.sha256(body).hexdigest() == digest, f"{url}: SHA-256 differs from the manifest"
        if url in listed:
            assert headers.get("Content-Type", "").startswith("application/fhir+ndjson"), (url, headers)
        bodies[url] = body
    for item in files:
        assert item["extension"]["sha256"] == digests[item["url"]]
        lines = [json.loads(line) for line in bodies[item["url"]].decode().splitlines() if line.strip()]
        assert len(lines) == item["count"], (
            f"{item['url']}: {len(lines)} lines, the manifest says {item['count']}"
        )
        if item in manifest["output"]:
            assert {r["resourceType"] for r in lines} == {item["type"]}, item["url"]
            exported.setdefault(item["type"], []).extend(lines)
    assert not manifest["error"], f"the export reported errors: {manifest['error']}"
    for rtype, resources in exported.items():
        assert len({r["id"] for r in resources}) == len(resources), f"{rtype}: an id exported twice"
    return exported


def _delete(status_url: str, token: str, manifest: dict[str, Any]) -> None:
    """DELETE the job: 202, and then the job and its files are gone."""
    status, _, body = _request(status_url, token, method="DELETE")
    assert status == 202, f"DELETE {status_url} -> {status}: {body[:1000]!r}"
    assert _request(status_url, token)[0] == 404
    assert _request(manifest["output"][0]["url"], token, Accept="application/fhir+ndjson")[0] == 404


def test_system_export_kickoff_poll_download_verify_delete(stack: ClientStack) -> None:
    from ledger import checkpoint

    _wait_for_checkpoint(stack)
    token = stack.system_token()
    kickoff = f"{stack.base}/$export"
    status_url, manifest, _ = _manifest(stack, token, kickoff)
    exported = _download(stack, token, kickoff, manifest)

    counts = Counter({t: len(rs) for t, rs in exported.items()})
    assert {"Patient", "Observation", "Encounter", "DiagnosticReport"} <= set(counts), counts
    for rtype in exported:
        if rtype == "Provenance":  # not searchable here by design; one per bundle (README, Architecture)
            assert counts[rtype] == stack.index_bundles(), "not one Provenance per bundle"
            continue
        total = stack.get(f"/{rtype}?_summary=count", token=token)["total"]
        assert counts[rtype] == total, f"{rtype}: {counts[rtype]} exported, a search counts {total}"
    lab = {
        r["id"] for r in exported["Observation"] if r["subject"]["reference"] == f"Patient/{stack.patient_id}"
    }
    searched = stack.get(f"/Observation?patient={stack.patient_id}&_count=500", token=token)
    assert not [link for link in searched.get("link", []) if link["relation"] == "next"]
    assert lab == {e["resource"]["id"] for e in searched["entry"] if e["search"]["mode"] == "match"}

    # the ledger checkpoint the export is pinned to: signed by the ledger, and served by it
    note = manifest["extension"]["ledgerCheckpoint"]
    size = manifest["extension"]["ledgerTreeSize"]
    verifier = stack.settings.ledger.verifier_key()
    assert verifier, "the ledger's verifier key is missing"
    opened = checkpoint.open(note, [verifier])
    assert opened.size == size
    assert size >= stack.messages, "the export is pinned to a checkpoint older than its kick-off"
    with urllib.request.urlopen(f"{stack.base}/ledger/checkpoint?size={size}", timeout=10) as resp:
        assert resp.read().decode() == note

    _delete(status_url, token, manifest)


def test_group_export_holds_the_groups_patients_and_their_observations(stack: ClientStack) -> None:
    """``/Group/{id}/$export`` of one hospital's group (found with ``GET /Group``): every Patient record
    that hospital sent (as many as the Group's ``quantity``), the lab patient among them with all its
    Observations, and the records of other hospitals only when they are the same person (fhirbridge
    exports a member's MATCH-linked records too; here the generator gives the same person the same SSN)."""
    _wait_for_checkpoint(stack)
    token = stack.system_token()
    org = labdata.PATIENT.hospital.org_id
    groups = stack.get("/Group", token=token)
    (group,) = [
        e["resource"]
        for e in groups.get("entry", [])
        if any(
            c.get("valueReference", {}).get("identifier", {}).get("value") == org
            for c in e["resource"].get("characteristic", [])
        )
    ] or [None]
    assert group is not None, f"no Group for {org} in GET /Group: {groups}"
    kickoff = f"{stack.base}/Group/{group['id']}/$export?_type=Patient,Observation"
    status_url, manifest, _ = _manifest(stack, token, kickoff)
    exported = _download(stack, token, kickoff, manifest)
    assert set(exported) == {"Patient", "Observation"}, sorted(exported)
    patients = exported["Patient"]
    own = [p for p in patients if p["meta"].get("source") == f"urn:fhirbridge:{org}"]
    assert len(own) == group["quantity"], f"{len(own)} of {org}'s Patient records exported"
    assert stack.patient_id in {p["id"] for p in own}

    def ssn(p: dict[str, Any]) -> str:
        (value,) = {i["value"] for i in p.get("identifier", []) if i.get("system") == labdata.SSN_SYSTEM}
        return str(value)

    own_ssns = {ssn(p) for p in own}
    others = [p for p in patients if p not in own]
    assert all(ssn(p) in own_ssns for p in others), "a record of another hospital's patient was exported"
    members = {f"Patient/{p['id']}" for p in patients}
    assert {o["subject"]["reference"] for o in exported["Observation"]} <= members
    lab = [o for o in exported["Observation"] if o["subject"]["reference"] == f"Patient/{stack.patient_id}"]
    total = stack.get(f"/Observation?patient={stack.patient_id}&_summary=count", token=token)["total"]
    assert len(lab) == total
    _delete(status_url, token, manifest)
