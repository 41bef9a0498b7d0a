"""The patient page in process (issue 24): sources disagreeing shown together, the provenance drawer
and the raw resource, the results grid and trends with the lab's range and flag, the filters in the
URL, "new since", break-the-glass through the API, and the render time of a 1,000-entry history."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.context import Backend
from bridge.service.ui.login import SESSIONS
from bridge.service.ui.session import SESSION_COOKIE, Session
from bridge.stores.index.store import IncomingBundle, IndexStore
from tests.support.auth import token
from tests.support.consent import deny_organization

EVIL = "<script>alert(1)</script>"
SHA_SM = "a1" * 32
SHA_RS = "b2" * 32


def _bundle(sha: str, org: str, resources: list[dict[str, Any]], ts: str) -> IncomingBundle:
    entries = [{"resource": r} for r in resources]
    return IncomingBundle({"resourceType": "Bundle", "entry": entries}, sha, org, f"{org}|1", "t", 0, 0, ts)


def _patient(pid: str, mrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123456789"},
            {"type": {"coding": [{"code": "MR"}]}, "system": f"urn:mrn:{pid}", "value": mrn},
        ],
        "name": [{"family": "DOE", "given": ["Ann"]}],
        "birthDate": "1980-02-14",
    }


def _lab(
    oid: str, pid: str, code: str, text: str, when: str, value: float, unit: str, **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": text},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit},
        **extra,
    }


K_RANGE: dict[str, Any] = {"referenceRange": [{"low": {"value": 3.5}, "high": {"value": 5.1}}]}
HIGH: dict[str, Any] = {"interpretation": [{"coding": [{"code": "H"}]}]}


def _condition(cid: str, pid: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{pid}"},
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": "44054006"}],
            "text": "Diabetes type 2",
        },
        "onsetDateTime": "2020-05-01",
        "note": [{"text": EVIL}],
    }


class Env:
    def __init__(self, client: Any, app: Any, settings: Settings) -> None:
        self.client, self.app, self.settings = client, app, settings

    def sign_in(self, **claims: Any) -> str:
        access = token(self.settings, subject="dr-who", organization="st-mary", **claims)
        session: Session = self.app[SESSIONS].create(access, 4102444800.0, "dr-who", "Practitioner/7")
        self.client.session.cookie_jar.update_cookies({SESSION_COOKIE: session.id})
        return session.csrf

    def add(self, *bundles: IncomingBundle) -> None:
        index = IndexStore.open(self.settings.stores.index_url)
        try:
            index.apply(list(bundles))
        finally:
            index.close()

    async def page(self, path: str = "/app/Patient/pa", **params: str) -> str:
        resp = await self.client.get(path, params=params)
        assert resp.status == 200, await resp.text()
        text: str = await resp.text()
        return text


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings.from_env(
        {"FHIRBRIDGE_DATA_DIR": str(tmp_path), "FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS": "st-mary"}
    )
    app = create_app(settings, Backend(settings))
    async with TestClient(TestServer(app)) as client:
        e = Env(client, app, settings)
        e.add(
            _bundle(
                SHA_SM,
                "st-mary",
                [
                    _patient("pa", "SM-001"),
                    _condition("ca", "pa"),
                    _lab("k1", "pa", "2823-3", "Potassium", "2026-01-05T08:00:00Z", 4.2, "mmol/L", **K_RANGE),
                    _lab(
                        "k2",
                        "pa",
                        "2823-3",
                        "Potassium",
                        "2026-02-05T08:00:00Z",
                        5.8,
                        "mmol/L",
                        **K_RANGE,
                        **HIGH,
                    ),
                    _lab("cr1", "pa", "2160-0", "Creatinine", "2026-02-05T08:00:00Z", 1.1, "mg/dL"),
                ],
                "2026-02-11T00:00:00.000Z",
            ),
            _bundle(
                SHA_RS,
                "riverside",
                [
                    _patient("pb", "RS-777"),
                    _condition("cb", "pb"),  # the same fact: one entry, also reported by riverside
                    _lab("cr2", "pb", "2160-0", "Creatinine", "2026-02-05T08:00:00Z", 1.4, "mg/dL"),
                    _lab("k3", "pb", "2823-3", "Potassium", "2026-03-05T08:00:00Z", 4.6, "mmol/L", **K_RANGE),
                    {
                        "resourceType": "Encounter",
                        "id": "enc1",
                        "status": "finished",
                        "class": {"code": "AMB", "display": "ambulatory"},
                        "subject": {"reference": "Patient/pb"},
                        "period": {"start": "2026-03-05T07:30:00Z"},
                    },
                ],
                "2026-03-11T00:00:00.000Z",
            ),
        )
        yield e


def _between(page: str, start: str, end: str) -> str:
    i = page.index(start)
    return page[i : page.index(end, i)]


async def test_disagreeing_values_are_shown_together_with_their_sources(env: Env) -> None:
    env.sign_in()
    page = await env.page()
    disputes = _between(page, '<section class="disputes" id="disputes"', "</section>")
    assert "Creatinine" in disputes and "2026-02-05T08:00:00Z" in disputes
    assert re.search(r"1\.1 mg/dL</span> <span class=\"source\">from st-mary", disputes)
    assert re.search(r"1\.4 mg/dL</span> <span class=\"source\">from riverside", disputes)
    assert "Potassium" not in disputes  # one source per time: no dispute
    # the shared fact is one entry, also reported by the other hospital
    problems = _between(page, 'id="problems"', "</section>")
    assert problems.count("<td>Diabetes type 2") == 1 and "also reported by riverside" in problems
    # each disputed row in the section points to the disagreement
    results = _between(page, 'id="results"', "</section>")
    assert results.count('href="#disputes">sources disagree') == 2


async def test_the_drawer_lists_every_delivery_and_links_the_raw_resource(env: Env) -> None:
    env.sign_in()
    page = await env.page()
    problems = _between(page, 'id="problems"', "</section>")
    drawer = _between(problems, '<details class="prov">', "</details>")
    assert "Deliveries (2)" in drawer
    assert drawer.index("st-mary") < drawer.index("riverside")  # earliest first
    assert SHA_SM in drawer and SHA_RS in drawer
    assert "2026-02-11T00:00:00.000Z" in drawer and "2026-03-11T00:00:00.000Z" in drawer
    assert (
        "source patient st-mary|1, MRN SM-001" in drawer
        and "source patient riverside|1, MRN RS-777" in drawer
    )
    assert 'href="/app/Patient/pa/raw/Condition/ca"' in drawer
    raw = await env.client.get("/app/Patient/pa/raw/Condition/ca")
    assert raw.status == 200
    body = await raw.text()
    assert EVIL not in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&#34;resourceType&#34;: &#34;Condition&#34;" in body or "&quot;resourceType&quot;" in body
    assert (await env.client.get("/app/Patient/pa/raw/Condition/nothing")).status == 404


async def test_results_grid_and_trend_carry_the_range_and_the_flag_as_text(env: Env) -> None:
    env.sign_in()
    page = await env.page()
    labs = _between(page, '<section class="labs" id="labs"', "</section>")
    grid = _between(labs, '<table class="grid">', "</table>")
    assert [d for d in re.findall(r'<th scope="col">(\d{4}-\d\d-\d\d)</th>', grid)] == [
        "2026-03-05",
        "2026-02-05",
        "2026-01-05",
    ]
    potassium = _between(grid, ">Potassium</a>", "</tr>")
    assert "3.5–5.1 mmol/L" in potassium
    assert '5.8 <abbr class="flag">H</abbr>' in potassium
    assert '<span class="spark" data-series="trend-2">' in potassium
    trend = _between(labs, '<figure class="trend" id="trend-2"', "</figure>")
    assert 'data-unit="mmol/L" data-low="3.5" data-high="5.1"' in trend
    rows = re.findall(r'<tr data-date="([^"]+)" data-value="([^"]+)" data-flag="([^"]*)">', trend)
    assert rows == [
        ("2026-01-05T08:00:00Z", "4.2", ""),
        ("2026-02-05T08:00:00Z", "5.8", "H"),
        ("2026-03-05T08:00:00Z", "4.6", ""),
    ]
    assert "<summary>Show as table</summary>" in trend
    js = await env.client.get("/app/static/charts.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    assert '<script src="/app/static/charts.js" defer></script>' in page


async def test_filters_live_in_the_url_and_paging_keeps_them(env: Env) -> None:
    env.sign_in()
    page = await env.page(source="riverside", type="results", **{"from": "2026-02-01"})
    assert '<option value="riverside" selected>' in page and '<option value="results" selected>' in page
    assert 'name="from" type="date" value="2026-02-01"' in page
    timeline = _between(page, 'id="timeline"', "</section>")
    assert "Creatinine" in timeline and "Potassium" in timeline
    assert "Diabetes" not in timeline and "ambulatory" not in timeline and "1.1 mg/dL" not in timeline
    assert 'id="problems"' not in page  # only the section asked for
    assert "Diabetes type 2" not in _between(page, 'id="results"', "</section>")
    # the non-htmx section link comes back to the page with the filters
    resp = await env.client.get(
        "/app/Patient/pa/section/results", params={"page": "1", "source": "riverside"}, allow_redirects=False
    )
    assert (
        resp.status == 303
        and resp.headers["Location"] == "/app/Patient/pa?source=riverside&results_page=1#results"
    )
    junk = await env.page(type="<b>", source="nobody", to="yesterday")
    assert "No data received from any source within the filters." in junk  # an unknown source matches nothing


async def test_new_since_a_time_and_since_the_last_visit(env: Env) -> None:
    env.sign_in()
    first = await env.page()
    assert "new since my last visit" not in first.lower()
    second = await env.page()
    link = re.search(r'href="/app/Patient/pa\?since=([0-9TZ:-]+)">What is new since my last visit', second)
    assert link is not None
    marked = await env.page(since="2026-03-01")
    timeline = _between(marked, 'id="timeline"', "</section>")
    assert (
        timeline.count('<span class="badge">new</span>') == 3
    )  # riverside's encounter, potassium, creatinine
    assert "3 new since 2026-03-01" in marked
    assert '<span class="badge">new</span>' not in _between(
        marked, 'id="problems"', "</section>"
    )  # first sent in Feb


async def test_break_the_glass_repeats_the_read_with_the_reason_and_shows_the_window(env: Env) -> None:
    env.add(
        _bundle("c1", "riverside", [deny_organization("c1", "pb", "st-mary")], "2026-04-01T00:00:00.000Z")
    )
    csrf = env.sign_in(purpose="ETREAT")
    page = await env.page()
    assert "withheld under the patient's consent" in page and "RS-777" not in page
    form = _between(page, '<form class="break-glass"', "</form>")
    assert 'method="post" action="/app/Patient/pa/break-glass"' in form
    assert f'name="csrf_token" value="{csrf}"' in form and 'name="reason" required' in form
    url = "/app/Patient/pa/break-glass"
    no_csrf = await env.client.post(url, data={"reason": "unconscious"}, allow_redirects=False)
    assert no_csrf.status == 403
    no_reason = await env.client.post(url, data={"csrf_token": csrf, "reason": "  "}, allow_redirects=False)
    assert no_reason.status == 400
    assert "RS-777" not in await env.page()  # nothing opened
    done = await env.client.post(
        url, data={"csrf_token": csrf, "reason": "unconscious in the ED"}, allow_redirects=False
    )
    assert done.status == 303 and done.headers["Location"] == "/app/Patient/pa"
    after = await env.page()
    assert "RS-777" in after and "withheld" not in after
    window = re.search(r"Break-the-glass window open: (\d+) min (\d\d) s left", after)
    assert window is not None and 58 <= int(window.group(1)) <= 59


async def test_the_api_refuses_to_break_the_glass_without_an_emergency_purpose(env: Env) -> None:
    env.add(
        _bundle("c1", "riverside", [deny_organization("c1", "pb", "st-mary")], "2026-04-01T00:00:00.000Z")
    )
    csrf = env.sign_in()  # TREAT
    resp = await env.client.post(
        "/app/Patient/pa/break-glass", data={"csrf_token": csrf, "reason": "curious"}, allow_redirects=False
    )
    assert resp.status == 403
    assert "ETREAT or BTG" in await resp.text()
    page = await env.page()
    assert "RS-777" not in page and "window open" not in page


async def test_a_1000_entry_history_renders_paged_and_fast(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    many = [
        _lab(
            f"g{i:04d}",
            "pa",
            f"{1000 + i % 40}-0",
            f"Test {i % 40}",
            f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T08:00:00Z",
            i % 97,
            "mg/dL",
        )
        for i in range(1000)
    ]
    env.add(_bundle("big", "st-mary", many, "2026-05-01T00:00:00.000Z"))
    env.sign_in()
    await env.page()  # warm: templates compiled, keys loaded
    started = time.perf_counter()
    page = await env.page()
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n1,000+-entry patient page: {elapsed * 1000:.0f} ms, {len(page) // 1024} KiB")
    assert "(1007)" in _between(page, 'id="timeline"', "</h2>")
    assert "page 1 of 21" in _between(page, 'id="timeline"', "</section>")  # 50 a page
    assert "page 1 of 41" in _between(page, 'id="results"', "</section>")  # 25 a page
    assert len(page) < 1_500_000
    assert elapsed < 5.0
