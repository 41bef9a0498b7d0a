"""The patient page in Chromium (issue 24's browser tests 1, 2, 4 and 5): a person's records at two
hospitals linked by the MPI, the fact both sent shown once, the creatinine whose values disagree shown
under "sources disagree" with both, the filters in the URL surviving a reload, and the potassium trend
drawn by charts.js with the reference band, the H flag as text, and its table toggle holding the same
values. The data is :func:`tests.browser.service.seed_linked_person`'s."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.browser.service import LINKED_RIVERSIDE, LINKED_ST_MARY, BridgeService
from tests.browser.test_app import sign_in_to_app

pytestmark = pytest.mark.browser

PAGE = f"/app/Patient/{LINKED_ST_MARY}"


def _open(page: Any, bridge: BridgeService, csp_errors: list[str]) -> None:
    page.on("console", lambda m: csp_errors.append(m.text) if "Content Security Policy" in m.text else None)
    answer = sign_in_to_app(page, bridge, PAGE)
    assert answer.status == 200


def test_a_linked_patient_lists_both_hospitals_entries_each_with_its_source(
    page: Any, bridge: BridgeService
) -> None:
    _open(page, bridge, [])
    banner = page.locator(".banner").inner_text()
    assert "Linked records: 2 from 2 hospitals" in banner
    assert "st-mary: MRN SM-5005" in banner and "riverside: MRN RS-5005" in banner
    results = page.locator("section#results tbody tr")
    sources = {
        results.nth(i).locator("td.source").inner_text().splitlines()[0] for i in range(results.count())
    }
    assert {"from st-mary", "from riverside"} <= sources
    timeline = page.locator("section#timeline li")
    items = [timeline.nth(i).inner_text() for i in range(timeline.count())]
    assert any("ambulatory visit" in t and "from riverside" in t for t in items)  # riverside's record
    assert any("5.8 mmol/L" in t and "from st-mary" in t for t in items)  # st-mary's
    # the drawer of an entry opens without script and names the delivery
    row = page.locator("section#encounters tbody tr").first
    row.locator("details.prov summary").click()
    drawer = row.locator("details.prov").inner_text()
    assert "riverside" in drawer and "bundle SHA-256" in drawer and "MRN RS-5005" in drawer
    with page.expect_navigation():
        row.locator("details.prov a").click()
    assert page.url == bridge.url(f"/app/Patient/{LINKED_ST_MARY}/raw/Encounter/browser-enc")
    assert '"resourceType": "Encounter"' in page.locator("pre.raw").inner_text()
    assert LINKED_RIVERSIDE in page.locator("pre.raw").inner_text()


def test_the_shared_fact_once_and_the_disputed_value_under_sources_disagree(
    page: Any, bridge: BridgeService
) -> None:
    _open(page, bridge, [])
    problems = page.locator("section#problems tbody tr")
    assert problems.count() == 1
    text = problems.first.inner_text()
    assert "Asthma" in text and "also reported by" in text
    assert re.search(r"from (st-mary|riverside)\s+also reported by (st-mary|riverside)", text)
    disputes = page.locator("section#disputes")
    assert "Sources disagree" in disputes.locator("h2").inner_text()
    dispute = disputes.locator(".dispute", has_text="Creatinine")
    values = dispute.locator(":scope > ul > li")
    assert values.count() == 2
    pairs = {
        (values.nth(i).locator(".value").inner_text(), values.nth(i).locator(".source").inner_text())
        for i in range(2)
    }
    assert pairs == {("1.1 mg/dL", "from st-mary"), ("1.4 mg/dL", "from riverside")}
    assert disputes.locator(".dispute", has_text="Potassium").count() == 0
    # each value is still an entry of the results, pointing to the disagreement
    assert page.locator("section#results a.disputed").count() == 2


def test_filters_change_the_url_and_a_reload_restores_them(page: Any, bridge: BridgeService) -> None:
    _open(page, bridge, [])
    page.select_option("#f-source", "riverside")
    page.select_option("#f-type", "results")
    page.fill("#f-from", "2026-02-01")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    query = parse_qs(urlsplit(page.url).query)
    assert (
        query["source"] == ["riverside"] and query["type"] == ["results"] and query["from"] == ["2026-02-01"]
    )

    def shown() -> list[str]:
        items = page.locator("section#timeline li")
        return [items.nth(i).inner_text() for i in range(items.count())]

    before = shown()
    assert before and all("from riverside" in t or "also riverside" in t for t in before)
    assert not any("Asthma" in t or "ambulatory" in t or "4.2 mmol/L" in t for t in before)
    page.reload()
    page.wait_for_load_state("load")
    assert page.locator("#f-source").input_value() == "riverside"
    assert page.locator("#f-type").input_value() == "results"
    assert page.locator("#f-from").input_value() == "2026-02-01"
    assert shown() == before
    assert page.locator("section#problems").count() == 0  # one type: the others' sections are not shown
    page.click("form.filters a:text('Clear')")
    page.wait_for_url(bridge.url(PAGE))
    assert page.locator("#f-source").input_value() == ""
    assert page.locator("section#problems").count() == 1


def test_the_trend_has_the_reference_band_the_h_flag_and_a_table_of_the_same_values(
    page: Any, bridge: BridgeService
) -> None:
    csp_errors: list[str] = []
    _open(page, bridge, csp_errors)
    figure = page.locator("figure.trend", has=page.locator("figcaption", has_text="Potassium"))
    svg = figure.locator("svg.trend-chart")
    svg.wait_for()
    band = svg.locator("rect.band")
    assert band.count() == 1 and float(band.get_attribute("height") or 0) > 0
    flags = svg.locator("text.flag")
    assert [flags.nth(i).text_content() for i in range(flags.count())] == ["H"]
    # the band lies between the points' heights: 3.5-5.1 contains 4.2 and 4.6, not 5.8
    top, height = float(band.get_attribute("y") or 0), float(band.get_attribute("height") or 0)
    circles = svg.locator("circle.point")
    ys = [float(circles.nth(i).get_attribute("cy") or 0) for i in range(circles.count())]
    inside = [top <= y <= top + height for y in ys]
    assert inside == [True, False, True]
    assert circles.nth(1).get_attribute("class") == "point out"
    # the toggle: closed at first, then the same values the chart plots
    table = figure.locator("details.trend-table table")
    assert not table.is_visible()
    figure.locator("details.trend-table summary").click()
    assert table.is_visible()
    rows = table.locator("tbody tr")
    cells = [
        (rows.nth(i).locator("td").nth(1).inner_text(), rows.nth(i).locator("td").nth(2).inner_text())
        for i in range(rows.count())
    ]
    assert cells == [("4.2 mmol/L", ""), ("5.8 mmol/L", "H"), ("4.6 mmol/L", "")]
    titles = [circles.nth(i).locator("title").text_content() or "" for i in range(circles.count())]
    assert [t.split(": ")[1].split(" (")[0] for t in titles] == [v for v, _ in cells]
    # the grid: the flag as text beside the value, the lab's range, and a sparkline
    grid_row = page.locator("table.grid tbody tr", has_text="Potassium")
    assert "5.8 H" in grid_row.inner_text() and "3.5–5.1 mmol/L" in grid_row.inner_text()
    assert grid_row.locator(".spark svg polyline.line").count() == 1
    assert csp_errors == []
