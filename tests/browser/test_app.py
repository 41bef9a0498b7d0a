"""The clinician web app (``/app``, bridge/service/ui) in Chromium: signing in through it, a patient page
whose name is markup, its headers, and going from one patient to another.

The clinician signs in with the app's own client (its redirect URI ``<base>/app/callback``): the app
starts the code flow, the embedded server's form takes the password, the app's callback exchanges
the code, and the browser lands on the page it first asked for.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.service import (
    MARKUP_NAME,
    PATIENT_A,
    PATIENT_A_FAMILY,
    PATIENT_B,
    BridgeService,
)

pytestmark = pytest.mark.browser

CLINICIAN = "clinician"


def sign_in_to_app(page: Any, bridge: BridgeService, path: str = "/app/") -> Any:
    """Open ``path`` without a session, sign in as the clinician on the form it leads to; the answer of
    the page it lands on (``path`` again)."""
    page.goto(bridge.url(path))
    assert page.url.startswith(bridge.url("/auth/authorize?")), page.url
    page.fill("#username", CLINICIAN)
    page.fill("#password", bridge.passwords[CLINICIAN])
    with page.expect_response(lambda r: r.url == bridge.url(path)) as landed:
        page.click("button[type=submit]")
    page.wait_for_load_state("load")
    assert page.url == bridge.url(path)
    return landed.value


def test_sign_in_through_the_app_lands_on_the_search(page: Any, bridge: BridgeService) -> None:
    answer = sign_in_to_app(page, bridge)
    assert answer.status == 200
    assert page.locator("h1").inner_text() == "Patient search"
    assert CLINICIAN in page.locator("header").inner_text()
    # the session cookie is out of a script's reach, and the token never reaches the browser
    assert page.evaluate("document.cookie") == ""
    assert all("." not in c["value"] for c in page.context.cookies())  # no JWT in any cookie


def test_markup_in_a_patient_name_renders_as_text(
    page: Any, bridge: BridgeService, dialogs: list[str]
) -> None:
    answer = sign_in_to_app(page, bridge, f"/app/Patient/{PATIENT_B}")
    assert answer.status == 200
    headers = answer.headers
    assert headers["cache-control"] == "no-store"
    csp = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split(";") if d.strip()}
    assert csp["script-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]

    heading = page.locator("h1")
    assert MARKUP_NAME in heading.inner_text()
    assert heading.is_visible()
    assert page.locator("img[src=x], main img").count() == 0
    page.wait_for_timeout(300)  # an injected image's error handler would run by now
    assert dialogs == []
    assert page.evaluate("window.__xss") is None


def test_moving_from_one_patient_to_another_leaves_nothing_of_the_first(
    page: Any, bridge: BridgeService
) -> None:
    sign_in_to_app(page, bridge, f"/app/Patient/{PATIENT_A}")
    assert PATIENT_A_FAMILY in page.locator("h1").inner_text()
    assert "900000001" in page.content()  # A's identifier, the MRN line of the banner

    # to B the way a clinician goes: search by B's identifier, follow the result
    page.goto(bridge.url("/app/"))
    page.fill("#identifier", "900000002")
    page.click("form[role=search] button[type=submit]")
    link = page.locator(f'#results a[href="/app/Patient/{PATIENT_B}"]')
    link.wait_for()
    link.click()
    page.wait_for_url(bridge.url(f"/app/Patient/{PATIENT_B}"))
    page.wait_for_load_state("load")

    assert MARKUP_NAME in page.locator("h1").inner_text()
    # nothing of A in the page, nor in what it keeps for later (htmx's history snapshots are off)
    html = page.content()
    stored = page.evaluate("JSON.stringify([{...localStorage}, {...sessionStorage}])")
    for trace in (PATIENT_A, PATIENT_A_FAMILY, "Adelheid", "900000001", "browser-oa"):
        assert trace not in html, trace
        assert trace not in stored, (trace, stored)
