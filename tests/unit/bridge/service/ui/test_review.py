"""The data steward's desk (``/app/review``) in process over a real MPI: who may use it, the queue with
the resources at stake, the pair page (fields, a waterfall that adds up to the weight, the merge
preview, conflicts, history), and the decisions with their required reason, CSRF and actor."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.auth.discovery import issuer_url
from bridge.service.context import Backend
from bridge.service.ui.login import SESSIONS
from bridge.service.ui.review import Parts, closest_first, conflicts, fhir_date, waterfall
from bridge.service.ui.security import CONTENT_SECURITY_POLICY
from bridge.service.ui.session import SESSION_COOKIE
from bridge.stores.index.store import IndexStore
from bridge.stores.mpi import PersonIndex
from tests.support.auth import token
from tests.support.mpi_records import A, B, C, bundle, condition

STEWARD_SCOPE = "user/*.rs user/Person.u"


class Env:
    def __init__(self, client: Any, app: Any, settings: Settings, mpi: PersonIndex) -> None:
        self.client, self.app, self.settings, self.mpi = client, app, settings, mpi

    def sign_in(self, scope: str = STEWARD_SCOPE, subject: str = "steward-7") -> str:
        session = self.app[SESSIONS].create(
            token(self.settings, scope, subject=subject), 4102444800.0, subject, None
        )
        self.client.session.cookie_jar.update_cookies({SESSION_COOKIE: session.id})
        return str(session.csrf)

    @property
    def actor(self) -> str:
        return issuer_url(self.settings.http.fhir_base()) + "|steward-7"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    index = IndexStore.open(settings.stores.index_url)
    index.apply(
        [
            bundle("h1", "org-a", [A, condition("cond-a", "a1", "Asthma")]),
            bundle("h2", "org-b", [B, condition("cond-b", "b1", "Gout")]),
            bundle(
                "h3",
                "org-c",
                [C, condition("cond-c", "c2", "Psoriasis"), condition("cond-d", "c2", "Eczema")],
            ),
        ]
    )
    index.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    mpi.upsert_patients([("org-a", A), ("org-b", B), ("org-c", C)])
    assert mpi.linked_patient_ids("a1") == ["a1", "b1"]
    queue = mpi.review_queue()
    assert [(q["patient_a"], q["patient_b"]) for q in queue] == [("a1", "c2"), ("b1", "c2")]
    app = create_app(settings, Backend(settings, mpi_factory=lambda: mpi))
    async with TestClient(TestServer(app)) as client:
        yield Env(client, app, settings, mpi)
    mpi.close()


def _pair(env: Env) -> tuple[str, str]:
    item = env.mpi.review_queue()[0]
    return item["patient_a"], item["patient_b"]


# -- who may use it -------------------------------------------------------------------------------
async def test_without_a_session_the_desk_asks_to_sign_in(env: Env) -> None:
    for path in ("/app/review", "/app/review/a1/c2"):
        resp = await env.client.get(path, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"].startswith("/app/login?role=steward&next=")


async def test_a_token_without_the_steward_scopes_gets_a_403_page(env: Env) -> None:
    csrf = env.sign_in("user/*.rs")  # a clinician: reads Persons, may not link
    for path in ("/app/review", "/app/review/a1/c2"):
        resp = await env.client.get(path, allow_redirects=False)
        assert resp.status == 403, path
        page = await resp.text()
        assert (
            "Not allowed" in page
            and "role=steward" in page
            and "user/Person.u" in page
            and "Andersen" not in page.lower().title()
        )
        assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    post = await env.client.post(
        "/app/review/a1/c2", data={"csrf_token": csrf, "action": "link", "reason": "x"}
    )
    assert post.status == 403
    assert "c2" not in env.mpi.linked_patient_ids("a1")
    home = await (await env.client.get("/app/")).text()
    assert "/app/review" not in home  # no nav link either


async def test_the_nav_link_shows_for_a_steward(env: Env) -> None:
    env.sign_in()
    assert 'href="/app/review">Steward desk</a>' in await (await env.client.get("/app/")).text()


# -- the queue ------------------------------------------------------------------------------------
async def test_the_queue_lists_the_pair_with_the_resources_at_stake(env: Env) -> None:
    env.sign_in()
    resp = await env.client.get("/app/review")
    assert resp.status == 200
    page = await resp.text()
    a, b = _pair(env)
    assert f'href="/app/review/{a}/{b}"' in page
    assert "org-c" in page and "1980-04-12" in page
    # c2's record: 2 Conditions and its Patient; the other side's person: a1 and b1, 2 Conditions
    c_side = page[page.index("Patient/c2") :]
    assert "Condition: 2" in c_side[: c_side.index("</td>")]
    other = "a1" if "a1" in (a, b) else "b1"
    o_side = page[page.index(f"Patient/{other}") :]
    assert (
        "Patient: 2" in o_side[: o_side.index("</td>")] and "Condition: 2" in o_side[: o_side.index("</td>")]
    )


def test_birth_dates_read_as_fhir_dates() -> None:
    assert [fhir_date(v) for v in ("19800412", "198004", "1980", "")] == ["1980-04-12", "1980-04", "1980", ""]


def test_closest_to_the_threshold_first_and_skipped_last() -> None:
    items = [{"a": n, "b": "z", "score": s} for n, s in (("p", 0.40), ("q", 0.93), ("r", 0.97), ("s", 0.60))]
    assert [i["a"] for i in closest_first(items, 0.95, {})] == ["q", "r", "s", "p"]
    assert [i["a"] for i in closest_first(items, 0.95, {("q", "z"): "later"})] == ["r", "s", "p", "q"]


# -- the pair page --------------------------------------------------------------------------------
def test_the_waterfall_ends_at_the_weight_and_its_bars_join() -> None:
    terms, running = [], -4.25
    for name, bits in (("given", 3.5), ("family", 2.0), ("birth", -1.5), ("sex", 0.0), ("ident", 6.0)):
        running += bits
        terms.append((name, bits, running))
    chart = waterfall(-4.25, terms, running, (0.95, 0.30))
    assert [b.name for b in chart.bars] == ["prior", "given", "family", "birth", "sex", "ident", "weight"]
    for before, after in zip(chart.bars[:-2], chart.bars[1:-1], strict=True):
        assert after.start == before.end  # each bar starts where the last ended
    assert chart.bars[-2].end == chart.bars[-1].end == running
    # positions: a positive term's bar goes right by its share of the plot, a negative one left
    birth = chart.bars[3]
    assert birth.kind == "neg" and birth.x == pytest.approx(
        chart.bars[2].x + chart.bars[2].width - birth.width, abs=0.02
    )
    assert chart.match_x is not None and chart.possible_x is not None and chart.possible_x < chart.match_x


async def test_the_pair_page_explains_field_by_field(env: Env) -> None:
    env.sign_in()
    a, b = _pair(env)
    resp = await env.client.get(f"/app/review/{a}/{b}")
    assert resp.status == 200, await resp.text()
    page = await resp.text()
    for name in ("given", "family", "birth", "sex", "address", "city", "postal", "phone", "ident"):
        assert f'<th scope="row">{name}</th>' in page, name
    assert "harbour view" in page.lower() and "elm" in page.lower()
    explained = env.mpi.explain(a, b)
    assert f"{explained.scoring.weight:+.4f}" in page  # the running total of the last term and the total
    rects = re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', page)
    assert len(rects) == 16  # the prior, 14 terms, the total
    assert "POSSIBLE_MATCH" in page and "different persons" in page
    # what a link would merge: the other side's person and its sources
    assert "would appear on" in page
    # the strict CSP: no inline script or style
    assert "style=" not in page and "<style" not in page and not re.search(r"<script(?![^>]*\bsrc=)", page)
    assert 'accesskey="l"' in page and 'accesskey="n"' in page and 'accesskey="s"' in page


def test_conflicts_are_the_latest_manual_unlinks_across_the_two_persons() -> None:
    def event(seq: int, action: str, x: str, y: str) -> Parts:
        return Parts(seq=seq, action=action, patient_a=x, patient_b=y, actor="st", reason=f"{action} {seq}")

    history = [
        event(1, "unlink", "a", "y"),  # a in A's person, y in B's: a conflict
        event(2, "unlink", "x", "b"),
        event(3, "link", "x", "b"),  # ... later linked again: no conflict
        event(4, "unlink", "a", "q"),  # q in neither person
        event(5, "auto-match", "a", "y"),
    ]
    found = conflicts("a", "b", Parts(state="POSSIBLE_MATCH"), [history], ({"a", "x"}, {"b", "y"}))
    assert [(c["a"], c["b"], c["reason"]) for c in found] == [("a", "y", "unlink 1")]
    own = conflicts("a", "b", Parts(state="NO_MATCH", actor="st", reason="twins"), [], ({"a"}, {"b"}))
    assert [(c["a"], c["b"], c["reason"]) for c in own] == [("a", "b", "twins")]


# -- decisions ------------------------------------------------------------------------------------
async def test_a_decision_without_a_reason_is_the_form_again(env: Env) -> None:
    csrf = env.sign_in()
    a, b = _pair(env)
    for reason in ("", "   "):
        resp = await env.client.post(
            f"/app/review/{a}/{b}", data={"csrf_token": csrf, "action": "link", "reason": reason}
        )
        assert resp.status == 400
        page = await resp.text()
        assert "A reason is required." in page and 'aria-invalid="true"' in page
    assert "c2" not in env.mpi.linked_patient_ids("a1")
    assert env.mpi.history("c2")[-1]["action"] == "possible-match"


async def test_a_decision_needs_the_csrf_token(env: Env) -> None:
    csrf = env.sign_in()
    a, b = _pair(env)
    for data in (
        {"action": "link", "reason": "same person"},
        {"csrf_token": "x" + csrf[1:], "action": "link", "reason": "r"},
    ):
        resp = await env.client.post(f"/app/review/{a}/{b}", data=data)
        assert resp.status == 403
    assert "c2" not in env.mpi.linked_patient_ids("a1")


async def test_link_then_unlink_with_reasons_names_the_steward(env: Env) -> None:
    csrf = env.sign_in()
    a, b = _pair(env)
    resp = await env.client.post(
        f"/app/review/{a}/{b}",
        data={
            "csrf_token": csrf,
            "action": "link",
            "reason": "same person, moved house",
            "actor": "someone-else",
        },
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"] == f"/app/review/{a}/{b}?done=link"
    assert sorted(env.mpi.linked_patient_ids("a1")) == ["a1", "b1", "c2"]
    event = next(e for e in reversed(env.mpi.history("c2")) if e["action"] == "link")
    assert (
        event["patient_b"] == "c2"
        and event["actor"] == env.actor
        and event["reason"] == "same person, moved house"
    )
    page = await (await env.client.get(f"/app/review/{a}/{b}?done=link")).text()
    assert "Linked." in page and "one person now" in page
    assert env.actor in page and "same person, moved house" in page  # the pair's history
    assert "Psoriasis" not in page  # counts, never the entries' content
    assert (await env.client.get("/app/review")).status == 200
    assert f"/app/review/{a}/{b}" not in await (await env.client.get("/app/review")).text()
    # one-click unlink of the link from the person's links, with its reason
    missing = await env.client.post(
        f"/app/review/{a}/{b}",
        data={"csrf_token": csrf, "action": "unlink", "x": min(a, b), "y": max(a, b), "reason": ""},
    )
    assert missing.status == 400 and "A reason is required." in await missing.text()
    assert "c2" in env.mpi.linked_patient_ids("a1")
    done = await env.client.post(
        f"/app/review/{a}/{b}",
        data={
            "csrf_token": csrf,
            "action": "unlink",
            "x": min(a, b),
            "y": max(a, b),
            "reason": "linked in error",
        },
        allow_redirects=False,
    )
    assert done.status == 303
    assert "c2" not in env.mpi.linked_patient_ids("a1")
    assert next(e for e in reversed(env.mpi.history("c2")) if e["action"] == "unlink")["actor"] == env.actor
    # the manual unlink is now a conflict that the pair page shows before any new link
    page = await (await env.client.get(f"/app/review/{a}/{b}")).text()
    conflicts = page[page.index('id="h-conflicts"') :]
    assert "linked in error" in conflicts[: conflicts.index("</section>")]
    assert "overrides that decision" in conflicts


async def test_not_a_match_keeps_them_apart_and_leaves_the_queue(env: Env) -> None:
    csrf = env.sign_in()
    a, b = _pair(env)
    resp = await env.client.post(
        f"/app/review/{a}/{b}",
        data={"csrf_token": csrf, "action": "distinct", "reason": "twins"},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert [(q["patient_a"], q["patient_b"]) for q in env.mpi.review_queue()] == [("b1", "c2")]
    link = env.mpi.explain(a, b).link
    assert (
        link is not None and link.state == "NO_MATCH" and link.actor == env.actor and link.reason == "twins"
    )
    page = await (await env.client.get("/app/review")).text()
    assert f'href="/app/review/{a}/{b}"' not in page and 'href="/app/review/b1/c2"' in page


async def test_skip_keeps_the_pair_for_later_with_its_reason(env: Env) -> None:
    csrf = env.sign_in()
    a, b = _pair(env)
    resp = await env.client.post(
        f"/app/review/{a}/{b}",
        data={"csrf_token": csrf, "action": "skip", "reason": "ask the registrar"},
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"] == "/app/review?done=skip"
    page = await (await env.client.get("/app/review?done=skip")).text()
    assert "skipped: ask the registrar" in page and 'class="skipped"' in page
    assert len(env.mpi.review_queue()) == 2  # nothing changed in the index
    assert page.index('href="/app/review/b1/c2"') < page.index(f'href="/app/review/{a}/{b}"')  # skipped last


async def test_an_unknown_record_is_a_404_page(env: Env) -> None:
    env.sign_in()
    resp = await env.client.get("/app/review/a1/nobody")
    assert resp.status == 404 and "Not found" in await resp.text()


async def test_the_stylesheet_is_served(env: Env) -> None:
    resp = await env.client.get("/app/static/review.css")
    assert resp.status == 200 and resp.content_type == "text/css"
    assert "svg.waterfall" in await resp.text()
    assert (await env.client.get("/app/static/app.css")).status == 200
