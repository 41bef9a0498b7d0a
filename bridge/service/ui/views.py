"""The pages: patient search (``/app/``), the patient page (``/app/Patient/{id}``) and one section of it
(``/app/Patient/{id}/section/{key}``, what htmx swaps in when paging), and the app's static files.

Every page needs a session; without one it redirects to the sign-in. Every read goes through the API
with the session's token (:mod:`bridge.service.ui.api`), so the API's scopes, consent gate and audit
apply to it exactly as to any client. A request from htmx (``HX-Request``) gets the fragment it swaps;
any other request gets the whole page, so everything works without JavaScript.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import orjson
from aiohttp import web
from yarl import URL

from bridge.logging import get_logger
from bridge.service.auth.marks import public
from bridge.service.consent.enforce import BREAK_GLASS_HEADER, MAX_REASON
from bridge.service.context import BACKEND, SETTINGS
from bridge.service.ui.api import ApiAnswer, fhir_get, path_of, public_text
from bridge.service.ui.login import SESSIONS, csrf_refused, current_session, redirect
from bridge.service.ui.session import CSRF_FIELD, Session, csrf_ok
from bridge.service.ui.summary import (
    SECTION_KEYS,
    Filters,
    PatientView,
    build_view,
    human_name,
    identifiers,
    page_of,
    possible_matches,
)
from bridge.stores.mpi import person_id_for

log = get_logger(__name__)
routes = web.RouteTableDef()
STATIC = Path(__file__).parent / "static"
#: the files the app serves, by name (nothing else under static/ is reachable)
STATIC_FILES = {
    "app.css": ("app.css", "text/css"),
    "htmx.min.js": ("vendor/htmx.min.js", "text/javascript"),
    "charts.js": ("charts.js", "text/javascript"),
    "nostore.js": ("nostore.js", "text/javascript"),
}
SEARCH_FIELDS = ("name", "birthdate", "identifier")
SEARCH_COUNT = 20
SECTION_PAGE = 25
#: the $everything page size, and the most entries a patient page reads (docs/ui.md)
EVERYTHING_COUNT = 1000
MAX_ENTRIES = 5000
#: linked records tried as the founder of the patient's MPI person
PERSON_TRIES = 5
#: the results grid's days per page, and the timeline's entries per page
GRID_DAYS = 8
TIMELINE_PAGE = 50
#: per (session id, patient id): when the break-the-glass window this app opened ends (epoch seconds),
#: and the previous visit of the patient page (for "new since my last visit"); in this process's
#: memory like the sessions, at most MAX_REMEMBERED of each, the oldest dropped first
MAX_REMEMBERED = 10_000
_WINDOWS: OrderedDict[tuple[str, str], float] = OrderedDict()
_VISITS: OrderedDict[tuple[str, str], str] = OrderedDict()


def _require_session(request: web.Request) -> Session:
    session = current_session(request)
    if session is None:
        raise web.HTTPSeeOther(f"/app/login?{urlencode({'next': request.path_qs})}")
    return session


def _htmx(request: web.Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def _api_error(request: web.Request, session: Session, answer: ApiAnswer) -> web.StreamResponse:
    """A page for an API refusal; an expired or refused token sends the user to sign in again."""
    if answer.status == 401:
        request.app[SESSIONS].end(session.id)
        raise web.HTTPSeeOther(f"/app/login?{urlencode({'next': request.path_qs})}")
    title = {403: "Not allowed", 404: "Not found"}.get(answer.status, "The service could not answer")
    return aiohttp_jinja2.render_template(
        "message.html",
        request,
        {"title": title, "message": answer.diagnostics(), "session": session, "sign_in": False},
        status=answer.status if answer.status >= 400 else 502,
    )


# -- search ---------------------------------------------------------------------------------------
@routes.get("/app/")
@public  # the session is the app's gate; the API checks the session's token on every read
async def search_page(request: web.Request) -> web.StreamResponse:
    """Patient search by name, birth date and identifier (``GET /Patient?…``)."""
    session = _require_session(request)
    criteria = {f: request.query.get(f, "").strip() for f in SEARCH_FIELDS}
    context: dict[str, Any] = {"session": session, "criteria": criteria, "searched": False, "results": []}
    if any(criteria.values()):
        params = [(k, v) for k, v in criteria.items() if v] + [("_count", str(SEARCH_COUNT))]
        cursor = request.query.get("cursor")
        if cursor:
            params.append(("_cursor", cursor))
        answer = await fhir_get(request, session.access_token, f"/Patient?{urlencode(params)}")
        if answer.status != 200:
            return _api_error(request, session, answer)
        context.update(_results(answer.body, criteria))
    template = "_results.html" if _htmx(request) else "search.html"
    return aiohttp_jinja2.render_template(template, request, context)


def _results(bundle: dict[str, Any], criteria: dict[str, str]) -> dict[str, Any]:
    rows = []
    for item in bundle.get("entry") or []:
        r = item.get("resource") or {}
        if r.get("resourceType") != "Patient":
            continue
        rows.append(
            {
                "id": str(r.get("id") or ""),
                "name": human_name(r.get("name")),
                "birth_date": str(r.get("birthDate") or ""),
                "sex": str(r.get("gender") or ""),
                "identifiers": identifiers(r),
            }
        )
    next_url = None
    for link in bundle.get("link") or []:
        if link.get("relation") == "next":
            cursor = URL(str(link.get("url"))).query.get("_cursor")
            if cursor:
                next_url = "/app/?" + urlencode(
                    [*((k, v) for k, v in criteria.items() if v), ("cursor", cursor)]
                )
    total = bundle.get("total")
    return {
        "searched": True,
        "results": rows,
        "total": total if isinstance(total, int) else None,
        "next_url": next_url,
    }


# -- the patient page -----------------------------------------------------------------------------
async def _view(
    request: web.Request,
    session: Session,
    pid: str,
    filters: Filters | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> PatientView | web.StreamResponse:
    """The patient's merged history, read page by page from ``$everything`` (at most :data:`MAX_ENTRIES`),
    shown through ``filters``; ``headers`` go with the first page's read only (the break-the-glass
    reason opens the window once; the later pages read within it)."""
    pages: list[dict[str, Any]] = []
    path: str | None = f"/Patient/{pid}/$everything?{urlencode({'_count': EVERYTHING_COUNT})}"
    read = 0
    while path is not None and read < MAX_ENTRIES:
        answer = await fhir_get(request, session.access_token, path, headers=headers if not pages else None)
        if answer.status != 200:
            return _api_error(request, session, answer)
        pages.append(answer.body)
        read += len(answer.body.get("entry") or [])
        nxt = next(
            (lk.get("url") for lk in answer.body.get("link") or [] if lk.get("relation") == "next"), None
        )
        path = path_of(str(nxt)) if nxt else None
    view = build_view(pid, pages, truncated=path is not None, filters=filters)
    view.possible_matches = await _possible_matches(request, session, view)
    return view


async def _possible_matches(request: web.Request, session: Session, view: PatientView) -> int:
    """The POSSIBLE_MATCH links of the patient's MPI person (``GET /Person/{id}``, with the session's
    token). A person's id is derived from its oldest record, which is one of the linked records: they
    are tried earliest received first, at most :data:`PERSON_TRIES` of them. 0 when the service has no
    MPI or the token may not read Persons (the banner then says nothing)."""
    if not request.app[BACKEND].has_mpi:  # no /Person routes: nothing to ask
        return 0
    records = sorted(view.records, key=lambda r: (r.first_received or "~", r.id))
    for record in records[:PERSON_TRIES]:
        answer = await fhir_get(request, session.access_token, f"/Person/{person_id_for(record.id)}")
        if answer.status == 200:
            return possible_matches(answer.body)
        if answer.status != 404:
            log.info("ui.person_unavailable", status=answer.status)
            return 0
    return 0


def _page_number(request: web.Request, name: str) -> int:
    raw = request.query.get(name, "1")
    return int(raw) if raw.isdigit() and len(raw) < 7 else 1


def _section_context(view: PatientView, key: str, page: int) -> dict[str, Any]:
    section = view.section(key)
    entries, pages = page_of(section.entries, page, SECTION_PAGE)
    return {"section": section, "entries": entries, "page": min(max(1, page), pages), "pages": pages}


def _remember(store: OrderedDict[tuple[str, str], Any], key: tuple[str, str], value: Any) -> None:
    store.pop(key, None)
    store[key] = value
    while len(store) > MAX_REMEMBERED:
        store.popitem(last=False)


def _now_instant() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _window_left(session: Session, pid: str) -> int:
    """Seconds left of the break-the-glass window this session opened over ``pid`` (0: none open)."""
    ends = _WINDOWS.get((session.id, pid))
    left = int(ends - time.time()) if ends is not None else 0
    if ends is not None and left <= 0:
        _WINDOWS.pop((session.id, pid), None)
    return max(0, left)


async def _checkpoint(request: web.Request) -> dict[str, str] | None:
    """The ledger's latest signed checkpoint, its origin, tree size and root hash (the print footer)."""
    status, text = await public_text(request, "/ledger/checkpoint")
    lines = text.split("\n")
    if status != 200 or len(lines) < 3:
        return None
    return {"origin": lines[0], "size": lines[1], "root": lines[2]}


def _grid(view: PatientView, page: int) -> dict[str, Any]:
    """The results grid's page of days (newest first) and the number of pages."""
    days = view.lab_days
    pages = max(1, -(-len(days) // GRID_DAYS))
    page = min(max(1, page), pages)
    return {"days": days[(page - 1) * GRID_DAYS : page * GRID_DAYS], "page": page, "pages": pages}


@routes.get("/app/Patient/{id:(?!\\.+(?:/|$))[A-Za-z0-9\\-\\.]{1,64}}")
@public  # the session is the app's gate; the API checks the session's token on every read
async def patient_page(request: web.Request) -> web.StreamResponse:
    """The banner, the disagreements, the results grid and trends, the timeline and every section, each
    on its first page (or the page its ``<key>_page`` names), through the filters of the query."""
    session = _require_session(request)
    pid = request.match_info["id"]
    filters = Filters.parse(request.query)
    view = await _view(request, session, pid, filters)
    if not isinstance(view, PatientView):
        return view
    sections = [
        _section_context(view, s.key, _page_number(request, f"{s.key}_page"))
        for s in (*view.sections, view.other)
        if (s.entries or s.key != "other") and (not filters.type or s.key == filters.type)
    ]
    timeline, timeline_pages = page_of(view.timeline, _page_number(request, "timeline_page"), TIMELINE_PAGE)
    visit_key = (session.id, pid)
    last_visit = _VISITS.get(visit_key, "")
    _remember(_VISITS, visit_key, _now_instant())
    return aiohttp_jinja2.render_template(
        "patient.html",
        request,
        {
            "session": session,
            "view": view,
            "sections": sections,
            "pid": pid,
            "max_entries": MAX_ENTRIES,
            "fq": urlencode(filters.query()),
            "grid": _grid(view, _page_number(request, "grid_page")),
            "timeline": timeline,
            "timeline_page": min(max(1, _page_number(request, "timeline_page")), timeline_pages),
            "timeline_pages": timeline_pages,
            "last_visit": last_visit,
            "window_left": _window_left(session, pid),
            "checkpoint": await _checkpoint(request),
            "printed_at": _now_instant(),
            "max_reason": MAX_REASON,
        },
    )


@routes.get("/app/Patient/{id:(?!\\.+(?:/|$))[A-Za-z0-9\\-\\.]{1,64}}/section/{key:[a-z]{1,20}}")
@public  # the session is the app's gate; the API checks the session's token on every read
async def section_fragment(request: web.Request) -> web.StreamResponse:
    """One section on page ``page``: the fragment htmx swaps in (the whole page for a plain request)."""
    session = _require_session(request)
    pid, key = request.match_info["id"], request.match_info["key"]
    if key not in SECTION_KEYS:
        raise web.HTTPNotFound()
    page = _page_number(request, "page")
    filters = Filters.parse(request.query)
    if not _htmx(request):
        query = urlencode([*filters.query(), (f"{key}_page", str(page))])
        raise web.HTTPSeeOther(f"/app/Patient/{pid}?{query}#{key}")
    view = await _view(request, session, pid, filters)
    if not isinstance(view, PatientView):
        return view
    return aiohttp_jinja2.render_template(
        "_section.html",
        request,
        {
            "session": session,
            "view": view,
            "pid": pid,
            "fq": urlencode(filters.query()),
            **_section_context(view, key, page),
        },
    )


@routes.get(
    "/app/Patient/{id:(?!\\.+(?:/|$))[A-Za-z0-9\\-\\.]{1,64}}/raw/{type:[A-Z][A-Za-z]{1,40}}/{rid:(?!\\.+(?:/|$))[A-Za-z0-9\\-\\.]{1,64}}"
)
@public  # the session is the app's gate; the API checks the session's token on every read
async def raw_resource(request: web.Request) -> web.StreamResponse:
    """One resource as the API returns it (``GET /{type}/{id}`` with the session's token), its JSON
    shown as escaped text: what the hospital sent, as stored."""
    session = _require_session(request)
    pid, rtype, rid = request.match_info["id"], request.match_info["type"], request.match_info["rid"]
    answer = await fhir_get(request, session.access_token, f"/{rtype}/{rid}")
    if answer.status != 200:
        return _api_error(request, session, answer)
    return aiohttp_jinja2.render_template(
        "raw.html",
        request,
        {
            "session": session,
            "pid": pid,
            "rtype": rtype,
            "rid": rid,
            "json": orjson.dumps(answer.body, option=orjson.OPT_INDENT_2).decode(),
        },
    )


@routes.post("/app/Patient/{id:(?!\\.+(?:/|$))[A-Za-z0-9\\-\\.]{1,64}}/break-glass")
@public  # the session is the app's gate; the API decides whether this clinician may break the glass
async def break_glass(request: web.Request) -> web.StreamResponse:
    """Repeat the patient's read with ``X-Break-Glass-Reason`` (docs/consent.md): the API opens the
    window (or refuses, and the page says why); then back to the patient page, which shows the time
    left. The form carries the session's CSRF token and the reason, which is required."""
    session = _require_session(request)
    pid = request.match_info["id"]
    form = await request.post()
    if not csrf_ok(session, str(form.get(CSRF_FIELD, ""))):
        return csrf_refused(request)
    reason = " ".join(str(form.get("reason", "")).split())
    if not reason or len(reason) > MAX_REASON or not reason.isprintable():
        return aiohttp_jinja2.render_template(
            "message.html",
            request,
            {
                "title": "A reason is needed",
                "message": f"Say why the glass is broken (printable text, at most {MAX_REASON} characters).",
                "session": session,
                "sign_in": False,
            },
            status=400,
        )
    view = await _view(request, session, pid, headers={BREAK_GLASS_HEADER: reason})
    if not isinstance(view, PatientView):
        log.info("ui.break_glass_refused", status=view.status)  # never the reason nor the patient
        return view
    minutes: int = request.app[SETTINGS].consent.break_glass_minutes
    _remember(_WINDOWS, (session.id, pid), time.time() + minutes * 60)
    log.info("ui.break_glass", minutes=minutes)
    return redirect(f"/app/Patient/{pid}")


# -- static files ---------------------------------------------------------------------------------
@routes.get("/app/static/{name}")
@public
async def static(request: web.Request) -> web.StreamResponse:
    """The app's own CSS and the vendored htmx (docs/ui.md: versions, digests, licences)."""
    found = STATIC_FILES.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    rel, content_type = found
    return web.Response(body=(STATIC / rel).read_bytes(), content_type=content_type, charset="utf-8")
