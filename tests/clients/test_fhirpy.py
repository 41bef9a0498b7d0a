"""fhirpy (beda.software's Python FHIR client) pages a date-sorted Observation search while more results
of the same patient are ingested through the real pipeline.

FHIR R4 (http.html#paging) leaves the consistency of paging to the server; fhirbridge pins the
``next`` links of a search to the snapshot of its first page, so a client that walks them sees exactly
what the server held when the first page was answered: nothing new, nothing twice, nothing skipped,
in the requested order, however much arrives meanwhile.

The expected set is the server's own answer to one search with a page large enough for every match,
issued before anything more is ingested, rather than a query of the index database: it is the
service's view through its public API (the index's tables are an internal detail that the search may
filter further, by consent say), and it is checked in turn against the generator's list of result
instants (``labdata.INITIAL``), which is independent of the server.
"""

from __future__ import annotations

import itertools
import threading
from datetime import datetime
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.clients import labdata
from tests.clients.stack import ClientStack

pytestmark = pytest.mark.clients

GLUCOSE = f"{labdata.LOINC}|{labdata.GLUCOSE[0]}"
PAGE = 5


def _instant(resource: Any) -> datetime:
    return datetime.fromisoformat(resource["effectiveDateTime"])


def _next(bundle: dict[str, Any]) -> str | None:
    return next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)


def test_fhirpy_fetch_all_sees_its_first_pages_snapshot_while_ingestion_runs(stack: ClientStack) -> None:
    from fhirpy import SyncFHIRClient

    token = stack.system_token()
    pid = stack.patient_id
    before = stack.get(
        f"/Observation?patient={pid}&code={quote(GLUCOSE)}&_sort=-date&_count=200", token=token
    )
    assert _next(before) is None, f"a _count=200 search of {len(labdata.INITIAL)} matches has a next link"
    expected = [e["resource"] for e in before.get("entry", []) if e.get("search", {}).get("mode") == "match"]
    assert [_instant(r) for r in expected] == sorted(labdata.INITIAL, reverse=True), (
        "before any client runs, the server's sorted search must hold exactly the generated glucose results"
    )

    plain = SyncFHIRClient(stack.base, authorization=f"Bearer {token}", requests_config={"timeout": 60})
    assert plain.resources("Observation").search(patient=pid, code=GLUCOSE).count() == len(labdata.INITIAL)

    first_page, landed = threading.Event(), threading.Event()
    failures: list[BaseException] = []
    pages: list[dict[str, Any]] = []

    def on_response(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        assert response.status_code == 200, (
            f"GET {response.url} -> {response.status_code}: {response.text[:2000]}"
        )
        pages.append({"url": response.url, "next": _next(response.json())})
        if len(pages) == 1:
            first_page.set()  # the ingestion starts now, while page 2 is being fetched
        elif len(pages) == 2 and not landed.wait(150):
            raise AssertionError("the late results did not land in the index within 150 s")

    def ingest_late() -> None:
        try:
            if not first_page.wait(60):
                raise AssertionError("fhirpy fetched no first page within 60 s")
            stack.ingest(
                labdata.PATIENT.hospital.org_id, labdata.lab_messages(labdata.LATE, first_control=1000)
            )
            stack.wait_for_bundles()
        except BaseException as exc:
            failures.append(exc)
        finally:
            landed.set()

    ingestion = threading.Thread(target=ingest_late, name="ingest-late", daemon=True)
    ingestion.start()
    client = SyncFHIRClient(
        stack.base,
        authorization=f"Bearer {token}",
        requests_config={"timeout": 60, "hooks": {"response": [on_response]}},
    )
    found = (
        client.resources("Observation")
        .search(patient=pid, code=GLUCOSE)
        .sort("-date")
        .limit(PAGE)
        .fetch_all()
    )
    ingestion.join(180)
    assert not failures, f"ingesting more results failed: {failures[0]!r}"

    # it paged, following absolute next links, well past the moment the new results were indexed
    assert len(pages) == -(-len(labdata.INITIAL) // PAGE), [p["url"] for p in pages]
    for page in pages[:-1]:
        assert page["next"] and page["next"].startswith(stack.base + "/"), f"next link not absolute: {page}"
    assert pages[-1]["next"] is None

    ids = [r["id"] for r in found]
    assert len(ids) == len(set(ids)), "a resource came twice"
    assert all(r["resourceType"] == "Observation" for r in found)
    assert ids == [r["id"] for r in expected], "not the snapshot of the first page, or not in its order"
    instants = [_instant(r) for r in found]
    assert all(a > b for a, b in itertools.pairwise(instants)), "not strictly descending by date"
    assert all(r["subject"]["reference"] == f"Patient/{pid}" for r in found)

    # the late results are there for a new search: the snapshot, not a slow index, kept them out
    after = plain.resources("Observation").search(patient=pid, code=GLUCOSE)
    assert after.count() == len(labdata.INITIAL) + len(labdata.LATE)
    newest = after.sort("-date").limit(1).fetch()
    assert _instant(newest[0]) == max(labdata.LATE)
