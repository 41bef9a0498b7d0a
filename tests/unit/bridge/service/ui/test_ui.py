"""The clinician web app end to end, in process: sign-in through the embedded authorization server
(PKCE, state, code exchange), sessions and CSRF, the security headers, the patient page's sections and
sources, escaping, and the audit of what the app read (the clinician as the actor)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.auth.discovery import issuer_url
from bridge.service.context import Backend
from bridge.service.ui.login import SESSIONS
from bridge.service.ui.security import CONTENT_SECURITY_POLICY
from bridge.service.ui.session import SESSION_COOKIE
from bridge.stores.audit import AuditStore
from bridge.stores.auth import AuthClient, AuthStore, AuthUser
from bridge.stores.index.store import IncomingBundle, IndexStore
from tests.support.auth import token
from tests.support.consent import deny_organization

PASSWORD = "correct horse battery"
EVIL = "<img src=x onerror=alert(1)>"


def _bundle(sha: str, org: str, resources: list[dict[str, Any]], ts: str) -> IncomingBundle:
    return IncomingBundle(
        {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]},
        sha,
        org,
        f"{org}|1",
        "t",
        0,
        0,
        ts,
    )


def _patient(pid: str, mrn: str, given: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123456789"},
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
                },
                "system": f"urn:mrn:{pid}",
                "value": mrn,
            },
        ],
        "name": [{"family": "DOE", "given": [given]}],
        "birthDate": "1980-02-14",
        "gender": "female",
    }


def _condition(cid: str, pid: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{pid}"},
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes type 2"}]
        },
        "onsetDateTime": "2020-05-01",
    }


def _allergy(aid: str, pid: str, code: str, text: str, criticality: str) -> dict[str, Any]:
    return {
        "resourceType": "AllergyIntolerance",
        "id": aid,
        "patient": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}], "text": text},
        "criticality": criticality,
        "recordedDate": "2021-01-01",
    }


def _observation(
    oid: str, pid: str, category: str, code: str, text: str, value: float, unit: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}
                ]
            }
        ],
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": text},
        "effectiveDateTime": "2026-01-10T08:00:00Z",
        "valueQuantity": {"value": value, "unit": unit},
    }


class Env:
    def __init__(self, client: Any, app: web.Application, settings: Settings) -> None:
        self.client, self.app, self.settings = client, app, settings
        self.base = settings.http.fhir_base()

    def sign_in_directly(self, subject: str = "dr-who", **claims: Any) -> str:
        """A session holding a token of the embedded issuer (the exchange is tested on its own)."""
        access: str = token(self.settings, subject=subject, organization="st-mary", **claims)
        store = self.app[SESSIONS]
        session = store.create(access, 4102444800.0, subject, "Practitioner/7")
        self.client.session.cookie_jar.update_cookies({SESSION_COOKIE: session.id})
        return session.csrf

    def audit_agents(self) -> list[tuple[str | None, str | None, str]]:
        store = AuditStore.open(self.settings.audit.url)
        try:
            return [(r.agent, r.patient_id, r.outcome) for batch in store.iter_all() for r in batch]
        finally:
            store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    index = IndexStore.open(settings.stores.index_url)
    index.apply(
        [
            _bundle(
                "h1",
                "st-mary",
                [
                    _patient("pa", "SM-001", EVIL),
                    _condition("ca", "pa"),
                    _allergy("al1", "pa", "227493005", "Cashew nuts", "low"),
                    _allergy("al2", "pa", "91936005", "Penicillin", "high"),
                    _observation("vs1", "pa", "vital-signs", "8867-4", "Heart rate", 72, "/min"),
                ],
                "2026-02-11T00:00:00.000Z",
            ),
            _bundle(
                "h2",
                "riverside",
                [
                    _patient("pb", "RS-777", "JANE"),
                    _condition("cb", "pb"),  # the same fact as ca: one entry, also reported by riverside
                    _observation("lab1", "pb", "laboratory", "2345-7", "Glucose", 98, "mg/dL"),
                ],
                "2026-03-11T00:00:00.000Z",
            ),
        ]
    )
    index.close()
    auth = AuthStore.open(settings.auth.url)
    auth.add_client(
        AuthClient(
            settings.ui.client_id,
            "public",
            ("openid", "fhirUser", "user/*.rs"),
            (f"{settings.http.fhir_base()}/app/callback",),
        )
    )
    auth.add_user(AuthUser("dr-who", "clinician", "st-mary", "Practitioner/7"), PASSWORD)
    auth.close()
    app = create_app(settings, Backend(settings))
    async with TestClient(TestServer(app)) as client:
        yield Env(client, app, settings)


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.action = a.get("action") or ""
        elif tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields[str(a["name"])] = a.get("value") or ""


def _form(page: str) -> _Form:
    form = _Form()
    form.feed(page)
    return form


def _query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


# -- signing in -----------------------------------------------------------------------------------
async def test_no_page_without_a_session(env: Env) -> None:
    for path in ("/app/", "/app/Patient/pa", "/app/Patient/pa/section/problems"):
        resp = await env.client.get(path, allow_redirects=False)
        assert resp.status == 303, path
        assert resp.headers["Location"].startswith("/app/login?next=")
    assert env.audit_agents() == []  # nothing was read


async def test_login_redirects_with_pkce_s256_and_state(env: Env) -> None:
    resp = await env.client.get("/app/login", allow_redirects=False)
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith(f"{issuer_url(env.base)}/authorize?")
    q = _query(location)
    assert q["response_type"] == "code" and q["client_id"] == "fhirbridge-ui"
    assert q["redirect_uri"] == f"{env.base}/app/callback"
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert len(q["state"]) >= 32 and q["aud"] == env.base
    cookie = resp.cookies["fhirbridge_ui_login"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/app"
    again = _query((await env.client.get("/app/login", allow_redirects=False)).headers["Location"])
    assert again["state"] != q["state"] and again["code_challenge"] != q["code_challenge"]


async def test_sign_in_end_to_end_through_the_embedded_server(env: Env) -> None:
    c = env.client
    start = await c.get("/app/login?next=/app/Patient/pa", allow_redirects=False)
    authorize = urlsplit(start.headers["Location"])
    form_page = await c.get(f"{authorize.path}?{authorize.query}")
    assert form_page.status == 200, await form_page.text()
    form = _form(await form_page.text())
    answer = await c.post(
        urlsplit(form.action).path,
        data={**form.fields, "username": "dr-who", "password": PASSWORD},
        allow_redirects=False,
    )
    assert answer.status == 302, await answer.text()
    back = urlsplit(answer.headers["Location"])
    assert f"{back.scheme}://{back.netloc}{back.path}" == f"{env.base}/app/callback"
    done = await c.get(f"{back.path}?{back.query}", allow_redirects=False)
    assert done.status == 303, await done.text()
    assert done.headers["Location"] == "/app/Patient/pa"
    session = done.cookies[SESSION_COOKIE]
    assert session["httponly"] and session["samesite"] == "Lax" and session["path"] == "/app"
    assert not session["secure"]  # plain http on loopback; https below
    assert 0 < int(session["max-age"]) <= env.settings.auth.token_lifetime  # the session ends with the token
    page = await c.get("/app/Patient/pa")
    assert page.status == 200
    assert "Signed in as dr-who" in await page.text()
    assert (issuer_url(env.base) + "|dr-who", "pa", "success") in env.audit_agents()
    # the code was spent: the same callback again is refused (its sign-in in flight is gone too)
    replay = await c.get(f"{back.path}?{back.query}", allow_redirects=False)
    assert replay.status == 400


async def test_cookies_are_secure_behind_an_https_public_url(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"FHIRBRIDGE_DATA_DIR": str(tmp_path), "FHIRBRIDGE_PUBLIC_URL": "https://ehr.example.org/"}
    )
    async with TestClient(TestServer(create_app(settings, Backend(settings)))) as client:
        resp = await client.get("/app/login", allow_redirects=False)
        assert resp.headers["Location"].startswith("https://ehr.example.org/auth/authorize?")
        assert _query(resp.headers["Location"])["redirect_uri"] == "https://ehr.example.org/app/callback"
        assert resp.cookies["fhirbridge_ui_login"]["secure"]


async def test_callback_refuses_a_state_it_did_not_send(env: Env) -> None:
    await env.client.get("/app/login", allow_redirects=False)
    resp = await env.client.get("/app/callback?code=abc&state=forged", allow_redirects=False)
    assert resp.status == 400
    assert SESSION_COOKIE not in resp.cookies
    # and without the sign-in cookie (another browser's code): refused as well
    env.client.session.cookie_jar.clear()
    start = await env.client.get("/app/login", allow_redirects=False)
    state = _query(start.headers["Location"])["state"]
    env.client.session.cookie_jar.clear()
    resp = await env.client.get(f"/app/callback?code=abc&state={state}", allow_redirects=False)
    assert resp.status == 400


async def test_login_never_returns_to_another_site(env: Env) -> None:
    for target in ("https://evil.example/", "//evil.example/app/", "/app/\\evil"):
        start = await env.client.get("/app/login", params={"next": target}, allow_redirects=False)
        store = env.app[SESSIONS]
        key = start.cookies["fhirbridge_ui_login"].value
        pending = store.take_login(key)
        assert pending is not None and pending.next_path == "/app/"


async def test_logout_needs_the_csrf_token(env: Env) -> None:
    csrf = env.sign_in_directly()
    refused = await env.client.post("/app/logout", data={}, allow_redirects=False)
    assert refused.status == 403
    wrong = await env.client.post("/app/logout", data={"csrf_token": "x" + csrf[1:]}, allow_redirects=False)
    assert wrong.status == 403
    assert (await env.client.get("/app/", allow_redirects=False)).status == 200  # still signed in
    ok = await env.client.post("/app/logout", data={"csrf_token": csrf}, allow_redirects=False)
    assert ok.status == 303 and ok.headers["Location"] == "/app/signed-out"
    assert (await env.client.get("/app/", allow_redirects=False)).status == 303


async def test_an_expired_session_is_no_session(env: Env) -> None:
    store = env.app[SESSIONS]
    session = store.create(token(env.settings, subject="dr-who"), 1.0, "dr-who", None)
    env.client.session.cookie_jar.update_cookies({SESSION_COOKIE: session.id})
    resp = await env.client.get("/app/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/app/login")


async def test_a_token_the_api_refuses_ends_the_session(env: Env) -> None:
    env.sign_in_directly(lifetime=-100)  # the API refuses it (expired) though the session thinks it live
    resp = await env.client.get("/app/Patient/pa", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/app/login")
    assert (await env.client.get("/app/", allow_redirects=False)).status == 303


# -- headers --------------------------------------------------------------------------------------
async def test_security_headers_on_every_app_response(env: Env) -> None:
    anonymous = ["/app", "/app/", "/app/login", "/app/signed-out", "/app/static/app.css", "/app/static/nope",
                 "/app/callback?state=x"]  # fmt: skip
    seen = []
    for path in anonymous:
        seen.append((path, await env.client.get(path, allow_redirects=False)))
    csrf = env.sign_in_directly()
    for path in (
        "/app/",
        "/app/?name=doe",
        "/app/Patient/pa",
        "/app/Patient/nobody",
        "/app/static/htmx.min.js",
    ):
        seen.append((path, await env.client.get(path, allow_redirects=False)))
    seen.append(("POST logout refused", await env.client.post("/app/logout", data={}, allow_redirects=False)))
    seen.append(
        (
            "POST logout",
            await env.client.post("/app/logout", data={"csrf_token": csrf}, allow_redirects=False),
        )
    )
    statuses = {r.status for _, r in seen}
    assert {200, 302, 303, 400, 403, 404} <= statuses
    for path, resp in seen:
        assert resp.headers["Cache-Control"] == "no-store", path
        assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
        assert resp.headers["X-Frame-Options"] == "DENY", path
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert resp.headers["Referrer-Policy"] == "no-referrer", path
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "'unsafe-eval'" not in CONTENT_SECURITY_POLICY
    assert (
        "default-src 'self'" in CONTENT_SECURITY_POLICY
        and "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    )
    # the API's own answers are not the app's: their headers are unchanged
    api = await env.client.get("/metadata")
    assert "Content-Security-Policy" not in api.headers


async def test_pages_have_no_inline_script_and_htmx_keeps_no_history(env: Env) -> None:
    env.sign_in_directly()
    page = await (await env.client.get("/app/Patient/pa")).text()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S)
    assert scripts and all(body == "" for body in scripts)  # scripts by src only, no inline body
    srcs = re.findall(r"<script\b([^>]*)>", page)
    assert all(re.fullmatch(r' src="/app/static/[a-z.]+\.js" defer', attrs) for attrs in srcs), srcs
    assert '<script src="/app/static/htmx.min.js" defer></script>' in page
    assert not re.search(r"<[a-z][^>]*\son[a-z]+\s*=", page)  # no event-handler attribute in any tag
    assert "style=" not in page and "<style" not in page
    assert '"historyCacheSize":0' in page and 'hx-history="false"' in page
    assert "localStorage" not in page


async def test_vendored_htmx_is_the_recorded_file(env: Env) -> None:
    resp = await env.client.get("/app/static/htmx.min.js")
    assert resp.status == 200 and resp.content_type == "text/javascript"
    digest = hashlib.sha256(await resp.read()).hexdigest()
    docs = (Path(__file__).resolve().parents[5] / "docs" / "ui.md").read_text()
    assert digest in docs


# -- pages ----------------------------------------------------------------------------------------
async def test_search_finds_records_and_links_to_the_patient_page(env: Env) -> None:
    env.sign_in_directly()
    resp = await env.client.get("/app/", params={"birthdate": "1980-02-14"})
    assert resp.status == 200
    page = await resp.text()
    assert 'href="/app/Patient/pa"' in page and 'href="/app/Patient/pb"' in page
    assert "2 patient records found" in page
    fragment = await (
        await env.client.get("/app/", params={"identifier": "RS-777"}, headers={"HX-Request": "true"})
    ).text()
    assert (
        "<html" not in fragment and 'href="/app/Patient/pb"' in fragment and "/app/Patient/pa" not in fragment
    )
    none = await (await env.client.get("/app/", params={"name": "nobody"})).text()
    assert "No patient record matches this search." in none


async def test_patient_page_sections_sources_and_also_reported_by(env: Env) -> None:
    env.sign_in_directly()
    resp = await env.client.get("/app/Patient/pa")
    assert resp.status == 200
    page = await resp.text()
    assert "Linked records: 2 from 2 hospitals" in page
    assert "under review" not in page  # no MPI here, so no possible match (test_possible_matches.py)
    assert "st-mary: MRN SM-001" in page and "riverside: MRN RS-777" in page
    problems = _section(page, "problems")
    assert problems.count("Diabetes type 2") == 1  # ca and cb merged
    assert "from st-mary" in problems and "also reported by riverside" in problems
    assert "(1)" in problems
    assert "Glucose" in _section(page, "results") and "from riverside" in _section(page, "results")
    assert "Heart rate" in _section(page, "vitals") and "Glucose" not in _section(page, "vitals")
    # IPS order
    order = [page.index(f'id="{k}"') for k in ("problems", "medications", "allergies", "results", "vitals",
                                               "immunizations", "procedures", "encounters", "documents")]  # fmt: skip
    assert order == sorted(order)
    # the banner's allergies: the severe one first
    banner = page[page.index('class="banner"') : page.index("</div>\n</div>")]
    assert banner.index("Penicillin") < banner.index("Cashew nuts")
    assert 'class="severe">Penicillin (severe)' in banner


async def test_an_empty_section_says_no_data_received(env: Env) -> None:
    env.sign_in_directly()
    page = await (await env.client.get("/app/Patient/pa")).text()
    for key in ("medications", "immunizations", "procedures", "encounters", "documents"):
        section = _section(page, key)
        assert "No data received from any source." in section, key
        assert "(0)" in section
        assert "none" not in section.lower()


async def test_markup_in_data_is_escaped(env: Env) -> None:
    env.sign_in_directly()
    page = await (await env.client.get("/app/Patient/pa")).text()
    assert EVIL not in page
    assert "&lt;img src=x onerror=alert(1)&gt; DOE" in page
    search = await (await env.client.get("/app/", params={"name": EVIL})).text()
    assert EVIL not in search and "&lt;img src=x onerror=alert(1)&gt;" in search


async def test_the_audit_names_the_clinician(env: Env) -> None:
    env.sign_in_directly("dr-who")
    assert (await env.client.get("/app/Patient/pa")).status == 200
    rows = env.audit_agents()
    agent = issuer_url(env.base) + "|dr-who"
    assert {(agent, "pa", "success"), (agent, "pb", "success")} <= set(rows)
    assert all(a == agent for a, _, _ in rows)
    assert {p for _, p, _ in rows} == {"pa", "pb"}  # no other read (no MPI here: no Person look-up)


async def test_what_the_token_may_not_read_the_app_does_not_show(env: Env) -> None:
    env.sign_in_directly(scope="user/Observation.rs")  # the API narrows $everything to Observations
    resp = await env.client.get("/app/Patient/pa")
    assert resp.status == 200
    page = await resp.text()
    assert "Glucose" in page and "Heart rate" in page
    assert "Diabetes" not in page and "SM-001" not in page and "Penicillin" not in page


async def test_withheld_data_is_announced_and_not_shown(env: Env) -> None:
    index = IndexStore.open(env.settings.stores.index_url)
    index.apply(
        [_bundle("h4", "riverside", [deny_organization("c1", "pb", "st-mary")], "2026-04-01T00:00:00.000Z")]
    )
    index.close()
    env.sign_in_directly()  # a st-mary clinician: riverside's record is withheld from st-mary
    page = await (await env.client.get("/app/Patient/pa")).text()
    assert "Some of this patient's data is withheld under the patient's consent." in page
    assert "/app/login?purpose=ETREAT&amp;next=/app/Patient/" in page  # how to break the glass
    assert "Glucose" not in page and "RS-777" not in page and "riverside" not in page
    assert "Diabetes type 2" in _section(page, "problems")  # st-mary's own copy
    assert "Some data is withheld (see above)." in _section(page, "results")


async def test_an_api_refusal_is_a_refusal_page(env: Env) -> None:
    env.sign_in_directly(scope="user/Consent.cru")  # no read of patient data at all
    resp = await env.client.get("/app/Patient/pa")
    assert resp.status == 403
    page = await resp.text()
    assert "Not allowed" in page and "Diabetes" not in page and "SM-001" not in page
    assert (issuer_url(env.base) + "|dr-who", "pa", "denied") in env.audit_agents()


async def test_section_paging_as_fragment_and_as_page(env: Env) -> None:
    extra = [
        _observation(f"lab{i:02d}", "pa", "laboratory", f"99{i:02d}-0", f"Test {i:02d}", i, "mg/dL")
        for i in range(30)
    ]
    index = IndexStore.open(env.settings.stores.index_url)
    index.apply([_bundle("h3", "st-mary", extra, "2026-04-01T00:00:00.000Z")])
    index.close()
    env.sign_in_directly()
    page = await (await env.client.get("/app/Patient/pa")).text()
    results = _section(page, "results")
    assert "(31)" in results and "page 1 of 2" in results
    assert 'hx-get="/app/Patient/pa/section/results?page=2"' in results
    assert 'href="/app/Patient/pa?results_page=2#results"' in results
    fragment = await (
        await env.client.get("/app/Patient/pa/section/results?page=2", headers={"HX-Request": "true"})
    ).text()
    assert fragment.startswith('<section class="ips" id="results"') and "page 2 of 2" in fragment
    assert fragment.count("<tr>") + fragment.count("<tr ") == 1 + 6  # the header row and the last 6 of 31
    plain = await env.client.get("/app/Patient/pa/section/results?page=2", allow_redirects=False)
    assert plain.status == 303 and plain.headers["Location"] == "/app/Patient/pa?results_page=2#results"
    second = await (await env.client.get("/app/Patient/pa?results_page=2")).text()
    assert "page 2 of 2" in _section(second, "results")


def _section(page: str, key: str) -> str:
    start = page.index(f'<section class="ips" id="{key}"')
    return page[start : page.index("</section>", start)]


def test_code_challenge_is_rfc7636_s256() -> None:
    from bridge.service.ui.login import code_challenge

    # RFC 7636 appendix B
    assert (
        code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    assert base64.urlsafe_b64decode(code_challenge("x") + "=")  # no padding left in the value


async def test_a_steward_or_emergency_sign_in_asks_for_it(env: Env) -> None:
    q = _query((await env.client.get("/app/login?role=steward", allow_redirects=False)).headers["Location"])
    assert q["scope"].split() == [*env.settings.ui.scope.split(), "user/Person.u"]
    q = _query((await env.client.get("/app/login?purpose=ETREAT", allow_redirects=False)).headers["Location"])
    assert "user/Person.u" not in q["scope"]
    for bad in ("role=admin", "purpose=HMARKT"):
        assert (await env.client.get(f"/app/login?{bad}", allow_redirects=False)).status == 400, bad


async def test_an_emergency_sign_in_gets_a_token_that_states_etreat(env: Env) -> None:
    """The embedded issuer reads the purpose of use from the token request: the callback states it."""
    c = env.client
    start = await c.get("/app/login?purpose=ETREAT&next=/app/Patient/pa", allow_redirects=False)
    authorize = urlsplit(start.headers["Location"])
    form = _form(await (await c.get(f"{authorize.path}?{authorize.query}")).text())
    answer = await c.post(
        urlsplit(form.action).path,
        data={**form.fields, "username": "dr-who", "password": PASSWORD},
        allow_redirects=False,
    )
    back = urlsplit(answer.headers["Location"])
    done = await c.get(f"{back.path}?{back.query}", allow_redirects=False)
    assert done.status == 303, await done.text()
    session = env.app[SESSIONS].get(done.cookies[SESSION_COOKIE].value)
    assert session is not None
    claims = json.loads(base64.urlsafe_b64decode(session.access_token.split(".")[1] + "=="))
    assert "ETREAT" in json.dumps(claims)


def test_next_stays_a_path_of_the_app() -> None:
    from bridge.service.ui.login import safe_next

    for ok in ("/app/", "/app/Patient/pa", "/app/Patient/pa?since=2026-01-01"):
        assert safe_next(ok) == ok
    for bad in (
        "/app/../metrics",
        "/app/..//evil.com",
        "/app/./x",
        "//evil.com/app/",
        "https://evil/app/",
        "/app/\x07",
    ):
        assert safe_next(bad) == "/app/", bad


async def test_dot_ids_never_reach_the_api(env: Env) -> None:
    env.sign_in_directly()
    for path in (
        "/app/Patient/%2E%2E/raw/Patient/pa",
        "/app/Patient/pa/raw/Patient/%2E%2E",
    ):
        resp = await env.client.get(path, allow_redirects=False)
        assert resp.status == 404, path
