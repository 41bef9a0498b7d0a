"""Accessibility in Chromium (issue 24, browser test 10): axe-core finds no serious or critical
WCAG 2.0, 2.1 or 2.2 A/AA violation on the patient summary, the results and their trends, an opened
drawer, the page after Verify, the steward's queue and a pair page.

axe-core is the copy that the ``axe-playwright-python`` wheel bundles (``axe.min.js``, a pinned test
dependency): nothing is fetched at test time. It is injected with ``page.add_script_tag``, which the
app's Content-Security-Policy (``script-src 'self'``, no inline script) refuses, so these pages are
opened in a context with Playwright's ``bypass_csp=True``: this module only, the CSP itself is tested
in test_app.py. The app's own styles are all stylesheets (no inline style), so bypassing the CSP
changes nothing that axe measures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.base import AXE_FILE_PATH

from tests.browser.service import LINKED_ST_MARY, TYPO_RIVERSIDE, TYPO_ST_MARY, BridgeService
from tests.browser.test_app import sign_in_to_app
from tests.browser.test_review import STEWARD
from tests.browser.test_review import sign_in as steward_sign_in
from tests.browser.test_verify import LedgerBridge, open_patient, service, verify

pytestmark = pytest.mark.browser

__all__ = ["service"]  # test_verify's module fixture: a service with a signed, witnessed ledger

AXE_JS: Path = AXE_FILE_PATH
#: WCAG 2.0, 2.1 and 2.2, levels A and AA (axe-core's tags)
WCAG_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22a", "wcag22aa"]
BLOCKING = {"serious", "critical"}
PATIENT = f"/app/Patient/{LINKED_ST_MARY}"
PAIR = f"/app/review/{TYPO_ST_MARY}/{TYPO_RIVERSIDE}"


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A page whose context bypasses the app's CSP, so that axe's script tag may run."""
    context = chromium.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's WCAG A/AA violations on ``page`` as it is now, all impacts."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE_JS))
    options = {"runOnly": {"type": "tag", "values": WCAG_AA}, "resultTypes": ["violations"]}
    results = page.evaluate("(options) => axe.run(document, options)", options)
    violations: list[dict[str, Any]] = results["violations"]
    return violations


def assert_no_serious_violations(page: Any) -> None:
    blocking = [v for v in axe_violations(page) if v["impact"] in BLOCKING]
    report = [
        {
            "id": v["id"],
            "impact": v["impact"],
            "help": v["help"],
            "nodes": [(n["target"], n.get("failureSummary", "")) for n in v["nodes"][:5]],
        }
        for v in blocking
    ]
    assert blocking == [], json.dumps(report, indent=1)


def test_the_patient_summary(page: Any, bridge: BridgeService) -> None:
    sign_in_to_app(page, bridge, PATIENT)
    assert_no_serious_violations(page)


def test_the_results_and_a_trend_with_its_table_open(page: Any, bridge: BridgeService) -> None:
    sign_in_to_app(page, bridge, PATIENT)
    page.goto(bridge.url(PATIENT + "?type=results"))
    figure = page.locator("figure.trend", has=page.locator("figcaption", has_text="Potassium"))
    figure.locator("svg.trend-chart").wait_for()
    figure.locator("details.trend-table summary").click()
    assert figure.locator("details.trend-table table").is_visible()
    assert_no_serious_violations(page)


def test_an_open_drawer(page: Any, bridge: BridgeService) -> None:
    sign_in_to_app(page, bridge, PATIENT)
    drawer = page.locator("section#encounters tbody tr").first.locator("details.prov")
    drawer.locator("summary").click()
    assert drawer.get_attribute("open") is not None
    assert_no_serious_violations(page)


def test_the_page_after_verify(page: Any, service: LedgerBridge) -> None:
    open_patient(page, service)
    assert "verified against checkpoint" in verify(page)
    assert_no_serious_violations(page)


def test_the_stewards_queue(page: Any, bridge: BridgeService) -> None:
    steward_sign_in(page, bridge, STEWARD, "/app/review")
    assert page.locator("table.queue").count() == 1
    assert_no_serious_violations(page)


def test_a_pair_page_with_its_waterfall(page: Any, bridge: BridgeService) -> None:
    steward_sign_in(page, bridge, STEWARD, PAIR)
    assert page.locator("svg.waterfall").is_visible()
    assert_no_serious_violations(page)
