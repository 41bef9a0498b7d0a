"""The data steward's desk (``/app/review``) in Chromium (issue 24, browser test 8): the steward signs in,
links the typo pair from the queue with a reason, typed and sent from the keyboard; the history names
the signed-in steward; the patient page then holds the other hospital's record; an unlink, with its
reason, takes it away again."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest

from tests.browser.service import TYPO_RIVERSIDE, TYPO_RIVERSIDE_MRN, TYPO_ST_MARY, BridgeService

pytestmark = pytest.mark.browser

STEWARD = "steward"
PAIR = f"/app/review/{TYPO_ST_MARY}/{TYPO_RIVERSIDE}"


def sign_in(page: Any, bridge: BridgeService, user: str, path: str) -> None:
    """Sign ``user`` in as a data steward (the desk's scope is asked for in a steward's sign-in only),
    landing on ``path``."""
    page.goto(bridge.url(f"/app/login?{urlencode({'role': 'steward', 'next': path})}"))
    assert page.url.startswith(bridge.url("/auth/authorize?")), page.url
    page.fill("#username", user)
    page.fill("#password", bridge.passwords[user])
    page.click("button[type=submit]")
    page.wait_for_url(bridge.url(path))
    page.wait_for_load_state("load")


def patient_page(page: Any, bridge: BridgeService) -> str:
    page.goto(bridge.url(f"/app/Patient/{TYPO_ST_MARY}"))
    page.wait_for_load_state("load")
    html: str = page.content()
    return html


def test_the_steward_links_the_typo_pair_and_unlinks_it(
    page: Any, bridge: BridgeService, dialogs: list[str]
) -> None:
    assert TYPO_RIVERSIDE_MRN not in patient_page_as_steward(page, bridge)

    # the queue: the pair, with each record's resources at stake
    page.goto(bridge.url("/app/review"))
    row = page.locator("table.queue tr", has=page.locator(f'a[href="{PAIR}"]'))
    text = row.inner_text()
    assert "featherstonhaugh · 1975-06-02" in text and text.count("Observation: 1") == 2
    row.locator(f'a[href="{PAIR}"]').click()
    page.wait_for_url(bridge.url(PAIR))

    # the explanation: fields side by side, the waterfall drawn, what a link would merge
    assert page.locator("table.fields tbody tr").count() == 9
    assert page.locator("svg.waterfall rect").count() == 16
    assert page.locator("svg.waterfall").is_visible()
    merge = page.locator("section[aria-labelledby=h-merge]").inner_text()
    assert "riverside" in merge and "Observation: 1" in merge

    # no reason: the browser does not send the form, and nothing changes
    page.click("button[value=link]")
    page.wait_for_timeout(300)
    assert page.url == bridge.url(PAIR) and page.locator("p.notice[role=status]").count() == 0

    # the reason typed, then Tab to the Link button and Enter: all from the keyboard
    page.focus("#reason")
    page.keyboard.type("Same patient: family name mistyped at riverside")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.value") == "link"
    page.keyboard.press("Enter")
    page.wait_for_url(bridge.url(PAIR + "?done=link"))
    assert "Linked." in page.locator("p.notice").inner_text()

    # the history names the signed-in steward, with the reason
    actor = f"{bridge.url('/auth')}|{STEWARD}"
    history = page.locator("table.history").first
    link_row = history.locator("tr", has_text="Same patient: family name mistyped at riverside")
    assert link_row.count() == 1
    assert actor in link_row.inner_text() and "link" in link_row.inner_text()

    # the patient page now holds riverside's record
    assert TYPO_RIVERSIDE_MRN in patient_page(page, bridge)

    # one-click unlink (a form with its reason) restores the patient page
    page.goto(bridge.url(PAIR))
    form = page.locator("form.unlink", has=page.locator(f'input[name=y][value="{TYPO_RIVERSIDE}"]'))
    form.locator("input[name=reason]").fill("Linked in error: a namesake")
    form.locator("button[type=submit]").click()
    page.wait_for_url(bridge.url(PAIR + "?done=unlink"))
    assert "Linked in error: a namesake" in page.locator("table.history").first.inner_text()
    assert TYPO_RIVERSIDE_MRN not in patient_page(page, bridge)
    assert dialogs == []


def patient_page_as_steward(page: Any, bridge: BridgeService) -> str:
    sign_in(page, bridge, STEWARD, f"/app/Patient/{TYPO_ST_MARY}")
    html: str = page.content()
    return html
