"""Break-the-glass and what stays at the origin, in Chromium (issue 24's browser tests 9 and 11).

9. A Consent filed at riverside withholds the person's riverside record from st-mary, the clinician's
   organisation (allowed to break the glass, ``FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS``): the patient page
   says data is withheld; the form refuses to break the glass without a reason (and the API refuses a
   sign-in for treatment); after the emergency sign-in (``/app/login?purpose=ETREAT``) the form with a
   reason shows the withheld entries and the window's time left, and the patient's own
   ``$access-log`` lists the access that opened it (DICOM 110127, v3-ActReason BTG with the reason).
   The data is :func:`tests.browser.service.seed_withheld_person`'s.
11. Over the summary, the results (search results and the results section), the drawer and its raw
    resource, Verify and the steward desk: every request the browser makes goes to the service's
    origin, every HTML answer says ``Cache-Control: no-store``, and the browser's storage holds no
    patient data (at most verify.js's ledger checkpoint note).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any
from urllib.parse import urlencode

import pytest

from bridge.service.auth.client import sign_in
from tests.browser.callback import CallbackListener
from tests.browser.service import (
    APP,
    GLASS_PATIENT_USER,
    GLASS_RIVERSIDE,
    GLASS_RIVERSIDE_MRN,
    GLASS_ST_MARY,
    LINKED_RIVERSIDE,
    LINKED_ST_MARY,
    BridgeService,
    get_json,
)
from tests.browser.test_app import CLINICIAN, sign_in_to_app

pytestmark = pytest.mark.browser

GLASS_PAGE = f"/app/Patient/{GLASS_ST_MARY}"
REASON = "unconscious in the ED, allergies unknown"
WITHHELD = "withheld under the patient's consent"
WINDOW = re.compile(r"Break-the-glass window open: (\d+) min (\d\d) s left")
EMERGENCY_OVERRIDE = "110127"
#: verify.js's only key in the browser's storage (tests/browser/test_verify.py)
STORE_PREFIX = "fhirbridge.ledger.checkpoint:"


def _break_glass(page: Any, reason: str) -> None:
    page.fill("#btg-reason", reason)
    with page.expect_navigation():
        page.click("form.break-glass button[type=submit]")
    page.wait_for_load_state("load")


def access_log(bridge: BridgeService, callback: CallbackListener) -> list[dict[str, Any]]:
    """The person's access log, read with the patient's own token (a patient/ token of the public app)."""
    answer = sign_in(
        bridge.base,
        APP,
        callback.redirect_uri,
        GLASS_PATIENT_USER,
        bridge.passwords[GLASS_PATIENT_USER],
        "openid fhirUser launch/patient patient/*.rs",
    )
    bundle = get_json(bridge.url(f"/Patient/{GLASS_ST_MARY}/$access-log?_count=500"), answer["access_token"])
    assert bundle["resourceType"] == "Bundle"
    return [e["resource"] for e in bundle.get("entry", [])]


def _codes(concepts: list[dict[str, Any]]) -> set[str]:
    """The codes of a list of CodeableConcepts (``purposeOfEvent``; ``subtype`` is a list of Codings)."""
    return {c.get("code", "") for concept in concepts for c in concept.get("coding", [])}


def test_withheld_data_is_announced_and_breaking_the_glass_shows_it_and_is_in_the_access_log(
    page: Any, bridge: BridgeService, callback: CallbackListener
) -> None:
    answer = sign_in_to_app(page, bridge, GLASS_PAGE)
    assert answer.status == 200
    html = page.content()
    assert WITHHELD in page.locator("main").inner_text()
    assert GLASS_RIVERSIDE_MRN not in html and "163 mg/dL" not in html and "101 mg/dL" in html
    assert not WINDOW.search(html)

    # a sign-in for treatment (the app's default): the form is there, the API refuses, nothing opens
    _break_glass(page, "curious")
    assert GLASS_RIVERSIDE_MRN not in page.content()
    page.goto(bridge.url(GLASS_PAGE))
    assert WITHHELD in page.content() and GLASS_RIVERSIDE_MRN not in page.content()

    # the emergency sign-in, from the link beside the form
    link = page.locator("a", has_text="sign in again for an emergency")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link.get_attribute("href") or "").query)
    assert query == {"purpose": ["ETREAT"], "next": [GLASS_PAGE]}
    link.click()
    page.wait_for_url(re.compile(re.escape(bridge.url("/auth/authorize?")) + ".*purpose_of_use=ETREAT"))
    page.fill("#username", CLINICIAN)
    page.fill("#password", bridge.passwords[CLINICIAN])
    page.click("button[type=submit]")
    page.wait_for_url(bridge.url(GLASS_PAGE))
    page.wait_for_load_state("load")
    assert WITHHELD in page.content()  # an emergency sign-in alone opens nothing

    # the reason is required: the browser does not send the form without it
    reason = page.locator("#btg-reason")
    assert reason.get_attribute("required") is not None
    page.click("form.break-glass button[type=submit]")
    assert reason.evaluate("el => el.validity.valueMissing") is True
    assert page.url == bridge.url(GLASS_PAGE) and WITHHELD in page.content()

    _break_glass(page, REASON)
    assert page.url == bridge.url(GLASS_PAGE), page.locator("main").inner_text()  # the POST's 303
    text = page.locator("main").inner_text()
    assert WITHHELD not in text
    assert GLASS_RIVERSIDE_MRN in text and "163 mg/dL" in text and "101 mg/dL" in text
    assert "from riverside" in text  # the withheld record's entries, with their source
    window = WINDOW.search(text)
    assert window is not None, text[:2000]
    assert 58 <= int(window.group(1)) <= 59  # FHIRBRIDGE_BREAK_GLASS_MINUTES' default, 60

    # the patient's own access log: the access that broke the glass, with the reason, by this clinician
    opened = overrides(access_log(bridge, callback), REASON)
    # the refused attempt for treatment opened nothing: no override names its reason
    assert not any(p.get("text") == "curious" for e in opened for p in e.get("purposeOfEvent", []))


def overrides(events: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    """The events of ``events`` that opened a break-the-glass window (DICOM 110127), checked: each
    succeeded, states BTG with ``reason`` as its text, names the person and the clinician."""
    opened = [e for e in events if EMERGENCY_OVERRIDE in {c.get("code") for c in e.get("subtype", [])}]
    assert len(opened) >= 1, json.dumps(events)[:3000]
    for event in opened:
        purposes = event.get("purposeOfEvent", [])
        assert "BTG" in _codes(purposes) and any(p.get("text") == reason for p in purposes)
        assert event.get("outcome") == "0"
        whats = {e.get("what", {}).get("reference") for e in event.get("entity", [])}
        assert {f"Patient/{GLASS_ST_MARY}", f"Patient/{GLASS_RIVERSIDE}"} & whats
        assert any(a.get("who", {}).get("reference") == "Practitioner/demo-clinician" for a in event["agent"])
    return opened


def _storage(page: Any) -> dict[str, dict[str, str]]:
    return {
        kind: dict(page.evaluate(f"() => Object.fromEntries(Object.entries({kind}))"))
        for kind in ("localStorage", "sessionStorage")
    }


def test_no_request_leaves_the_origin_html_is_no_store_and_storage_holds_no_patient_data(
    page: Any, bridge: BridgeService
) -> None:
    origin = bridge.base + "/"
    requests: list[str] = []
    html: list[tuple[str, int, str | None]] = []
    page.on("request", lambda r: requests.append(r.url))

    def on_response(r: Any) -> None:
        if "text/html" in (r.headers.get("content-type") or ""):
            html.append((r.url, r.status, r.headers.get("cache-control")))

    page.on("response", on_response)
    storages: list[dict[str, dict[str, str]]] = []
    summary = f"/app/Patient/{LINKED_ST_MARY}"

    # the summary
    sign_in_to_app(page, bridge, summary)
    assert "Linked records: 2" in page.locator(".banner").inner_text()
    page.locator("svg.trend-chart").first.wait_for()  # charts.js ran
    storages.append(_storage(page))
    # results: the search's, and the patient's results section
    page.goto(bridge.url("/app/?" + urlencode({"identifier": "900000005"})))
    page.wait_for_load_state("load")
    assert page.locator(f"a[href='/app/Patient/{LINKED_ST_MARY}']").count() >= 1
    page.goto(bridge.url(f"{summary}?type=results"))
    page.wait_for_load_state("load")
    assert page.locator("section#results tbody tr").count() >= 1
    storages.append(_storage(page))
    # the drawer, and the raw resource it links
    page.goto(bridge.url(summary))
    page.wait_for_load_state("load")
    assert page.locator("section#encounters").count() == 1, (
        page.url + page.locator("main").inner_text()[:3000]
    )
    row = page.locator("section#encounters tbody tr").first
    row.locator("details.prov summary").click()
    assert "bundle SHA-256" in row.locator("details.prov").inner_text()
    with page.expect_navigation():
        row.locator("details.prov a").click()
    assert LINKED_RIVERSIDE in page.locator("pre.raw").inner_text()
    # verify (this service has no ledger: whatever it concludes, it asks this origin only)
    page.goto(bridge.url(summary))
    page.click("#verify-button")
    page.wait_for_function(
        "() => { const s = document.getElementById('verify-status');"
        " return s && s.dataset.verifyState && s.dataset.verifyState !== 'running'; }"
    )
    storages.append(_storage(page))
    # the steward desk (a steward's sign-in)
    page.goto(bridge.url(f"/app/login?{urlencode({'role': 'steward', 'next': '/app/review'})}"))
    page.fill("#username", "steward")
    page.fill("#password", bridge.passwords["steward"])
    page.click("button[type=submit]")
    page.wait_for_url(bridge.url("/app/review"))
    page.wait_for_load_state("load")
    assert page.locator("h1").count() == 1
    pair = page.locator("a[href^='/app/review/']").first
    if pair.count():
        with page.expect_navigation():
            pair.click()
        page.wait_for_load_state("load")
    storages.append(_storage(page))

    assert len(requests) > 20, requests
    assert [u for u in requests if not u.startswith(origin)] == []
    assert {u.split("?")[0] for u in requests} >= {
        bridge.url(summary),
        bridge.url("/app/review"),
        bridge.url(f"/app/Patient/{LINKED_ST_MARY}/proofs"),
    }
    assert len(html) >= 8, html
    assert [(u, s, cc) for u, s, cc in html if cc != "no-store"] == []

    patient_words = ("Linkwater", "Dorothea", "900000005", "SM-5005", "RS-5005", LINKED_ST_MARY, "Potassium")
    for seen in storages:
        assert seen["sessionStorage"] == {}
        local = seen["localStorage"]
        assert all(k.startswith(STORE_PREFIX) for k in local), local
        assert not [w for w in patient_words for k, v in local.items() if w in k or w in v], local
    state = page.context.storage_state()
    for entry in state.get("origins", []):
        assert entry["origin"] + "/" == origin
        assert all(i["name"].startswith(STORE_PREFIX) for i in entry.get("localStorage", []))
