"""The data steward's desk (``/app/review``, docs/ui.md "Steward desk"): the MPI's review queue, one
possible match explained field by field with the weights as a waterfall, what a link would merge, the
pair's and the persons' link history, and the decisions (link, not a match, skip, unlink), each with a
required reason.

* Only a session whose token may read and update Persons in a user context (``user/Person.rs`` and
  ``.u``, what ``$mpi-review-queue`` and ``$mpi-link`` need) gets the desk; others get a 403 page. The
  scopes are read from the token's claims without verifying it: that only decides what the app shows;
  the API verifies the token on every call and refuses what it does not cover.
* Every datum is read, and every decision written, through the service's own API with the session's
  token (:mod:`bridge.service.ui.api`): the API names the actor of a decision from the token (its
  issuer and subject), audits each read, and applies the Consents to the resource counts.
* The resources at stake are counted from ``Patient/{id}/$everything`` (pages of 1,000, at most
  :data:`MAX_COUNTED` entries): one request per record per 1,000 entries, against one
  ``_summary=count`` search per resource type; and it is the person's merged record, what a link
  would add to the other person.
* Every form is a plain POST (CSRF-checked); the buttons carry access keys. Nothing needs JavaScript.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import math
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp_jinja2
import orjson
from aiohttp import web

from bridge.errors import FhirbridgeError
from bridge.logging import get_logger
from bridge.service.auth.marks import public
from bridge.service.auth.scopes import ScopeSet
from bridge.service.ui.api import HTTP_CLIENT, ApiAnswer, api_base, fhir_get, path_of
from bridge.service.ui.login import SESSIONS, csrf_refused, current_session
from bridge.service.ui.session import CSRF_FIELD, Session, csrf_ok
from bridge.stores.mpi.config import MpiConfig

log = get_logger(__name__)
routes = web.RouteTableDef()
STYLESHEET = Path(__file__).parent / "static" / "review.css"
_ID = r"{%s:(?!\.+(?:/|$))[A-Za-z0-9\-\.]{1,64}}"  # an id, never . or .. (no path escapes)
PAIR = "/app/review/" + _ID % "a" + "/" + _ID % "b"

#: the queue entries read (one $mpi-review-queue request), and the pairs shown per page
QUEUE_READ = 500
QUEUE_PAGE = 10
#: the most entries of one record's $everything counted, and the $everything page size
MAX_COUNTED = 5000
EVERYTHING_COUNT = 1000
#: concurrent API reads of one page
CONCURRENCY = 4
#: the longest reason accepted (the MPI stores it; the history shows it)
MAX_REASON = 500
#: the service opens its index with the default configuration (bridge.service.app.default_backend); the
#: queue orders by distance to this threshold, the pair page shows the thresholds its explanation used
MATCH_THRESHOLD = MpiConfig().match_threshold
#: pairs a session skipped (its reason kept with them), per session, in this process's memory
SKIPPED = web.AppKey("ui_review_skipped", OrderedDict)
MAX_SKIP_SESSIONS = 1000
ACTIONS = {
    "link": "Link",
    "distinct": "Not a match",
    "skip": "Skip",
    "unlink": "Unlink",
}


# -- who may use the desk -------------------------------------------------------------------------
def token_scopes(access_token: str) -> ScopeSet:
    """The scopes of an access token's claims (unverified: see the module docstring); none when the
    token is not a readable JWT."""
    try:
        payload = access_token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return ScopeSet()
    return ScopeSet.from_claims(claims) if isinstance(claims, dict) else ScopeSet()


def can_review(session: Session | None) -> bool:
    """Whether ``session``'s token may use the MPI's steward operations (queue, explain and history:
    Person ``rs``; link and unlink: Person ``u``; all in a user context)."""
    return session is not None and token_scopes(session.access_token).allows("user", "Person", "rsu")


def _steward(request: web.Request) -> Session:
    """The signed-in steward; a redirect to the sign-in without a session, a 403 page without the scopes."""
    session = current_session(request)
    steward_sign_in = f"/app/login?{urlencode({'role': 'steward', 'next': request.path_qs})}"
    if session is None:
        raise web.HTTPSeeOther(steward_sign_in)
    if not can_review(session):
        log.info("ui.review_refused")
        raise _page_error(
            request,
            session,
            "Not allowed",
            "The data steward's desk needs a sign-in whose access may read and update the master "
            "patient index (user/Person.rs and user/Person.u). Yours may not: a data steward signs in "
            "for the desk.",
            403,
            link=(steward_sign_in, "Sign in as a data steward"),
        )
    return session


def _page_error(
    request: web.Request,
    session: Session,
    title: str,
    message: str,
    status: int,
    *,
    link: tuple[str, str] | None = None,
) -> Stop:
    """A message page, to raise (:class:`Stop`); ``link``: (href, text) of a way on."""
    response = aiohttp_jinja2.render_template(
        "message.html",
        request,
        {"title": title, "message": message, "session": session, "sign_in": False, "link": link},
        status=status,
    )
    return Stop(response)


class Stop(FhirbridgeError):
    """Leave a handler with ``response`` (a page), from a helper. Not an ``HTTPException``: the service's
    error middleware turns those into OperationOutcomes."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def pages(handler: Handler) -> Handler:
    """The handler's :class:`Stop` becomes its answer."""

    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Stop as stop:
            return stop.response

    return run


def _api_refused(request: web.Request, session: Session, answer: ApiAnswer) -> Exception:
    """An API refusal as a page; a 401 ends the session (the token expired or was refused)."""
    if answer.status == 401:
        request.app[SESSIONS].end(session.id)
        return web.HTTPSeeOther(f"/app/login?{urlencode({'next': request.path_qs})}")
    title = {403: "Not allowed", 404: "Not found", 409: "Refused"}.get(
        answer.status, "The service could not answer"
    )
    return _page_error(
        request, session, title, answer.diagnostics(), answer.status if answer.status >= 400 else 502
    )


async def _get(request: web.Request, session: Session, path_qs: str) -> dict[str, Any]:
    answer = await fhir_get(request, session.access_token, path_qs)
    if answer.status != 200:
        raise _api_refused(request, session, answer)
    return answer.body


async def fhir_post(request: web.Request, token: str, path: str, body: dict[str, Any]) -> ApiAnswer:
    """``POST <api base><path>`` with a JSON ``body`` and ``token`` as the bearer token."""
    url = api_base(request) + path
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/fhir+json",
        "Content-Type": "application/fhir+json",
        "Host": request.host,
    }
    # over TLS our own socket's certificate is not verified (bridge.service.ui.api's docstring)
    async with request.app[HTTP_CLIENT].post(
        url, data=orjson.dumps(body), headers=headers, ssl=not url.startswith("https:"), allow_redirects=False
    ) as resp:
        raw = await resp.read()
    try:
        parsed = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        parsed = {}
    return ApiAnswer(resp.status, parsed if isinstance(parsed, dict) else {})


# -- reading FHIR Parameters ----------------------------------------------------------------------
def _value(p: dict[str, Any]) -> Any:
    for key, v in p.items():
        if key.startswith("value"):
            if key == "valueReference" and isinstance(v, dict):
                return str(v.get("reference") or "").split("/", 1)[-1]
            return v
    return None


class Parts(dict[str, Any]):
    """A parameter's parts by name; a part that is absent reads as None (the templates test them)."""

    def __missing__(self, key: str) -> None:
        return None


def _parts(p: dict[str, Any]) -> Parts:
    """A parameter's parts by name (the first of a repeated name)."""
    out = Parts()
    for part in p.get("part") or []:
        name = str(part.get("name"))
        if name not in out:
            out[name] = _value(part)
    return out


def _params(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [p for p in body.get("parameter") or [] if p.get("name") == name]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


# -- resources at stake ---------------------------------------------------------------------------
@dataclass
class Stake:
    """A record's person's merged record as the token may read it: entries by type, their sources,
    whether the API withheld any, whether more than :data:`MAX_COUNTED` were there."""

    counts: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    withheld: bool = False
    truncated: bool = False
    refused: int | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def stake_of(request: web.Request, session: Session, pid: str) -> Stake:
    """Counts of ``Patient/{pid}/$everything``'s entries by type (module docstring)."""
    counts: Counter[str] = Counter()
    sources: set[str] = set()
    stake = Stake()
    path: str | None = f"/Patient/{quote(pid)}/$everything?{urlencode({'_count': EVERYTHING_COUNT})}"
    read = 0
    while path is not None and read < MAX_COUNTED:
        answer = await fhir_get(request, session.access_token, path)
        if answer.status != 200:
            if answer.status == 401:
                raise _api_refused(request, session, answer)
            stake.refused = answer.status
            return stake
        for item in answer.body.get("entry") or []:
            r = item.get("resource") or {}
            rtype = str(r.get("resourceType") or "")
            if rtype == "OperationOutcome":
                stake.withheld |= any(i.get("code") == "suppressed" for i in r.get("issue") or [])
                continue
            read += 1
            counts[rtype] += 1
            for ext in item.get("extension") or []:
                for part in ext.get("extension") or []:
                    if part.get("url") == "sourceOrg" and part.get("valueString"):
                        sources.add(str(part["valueString"]))
        nxt = next(
            (lk.get("url") for lk in answer.body.get("link") or [] if lk.get("relation") == "next"), None
        )
        path = path_of(str(nxt)) if nxt else None
    stake.truncated = path is not None
    stake.counts = dict(sorted(counts.items(), key=lambda kv: (kv[0] != "Patient", kv[0])))
    stake.sources = sorted(sources)
    return stake


async def _gather(coros: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(c: Any) -> Any:
        async with gate:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


# -- the queue ------------------------------------------------------------------------------------
def queue_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The pairs of a ``$mpi-review-queue`` answer."""
    items = []
    for p in _params(body, "link"):
        parts = _parts(p)
        items.append(
            {
                "a": str(parts.get("patientA") or ""),
                "b": str(parts.get("patientB") or ""),
                "score": _num(parts.get("score")),
                "source_a": str(parts.get("sourceA") or ""),
                "source_b": str(parts.get("sourceB") or ""),
                "updated": str(parts.get("updated") or ""),
                "name_a": " ".join(str(parts.get(k) or "") for k in ("givenA", "familyA")).strip(),
                "name_b": " ".join(str(parts.get(k) or "") for k in ("givenB", "familyB")).strip(),
                "birth_a": fhir_date(str(parts.get("birth_dateA") or "")),
                "birth_b": fhir_date(str(parts.get("birth_dateB") or "")),
            }
        )
    return items


def fhir_date(value: str) -> str:
    """A birth date as the matcher keeps it (``YYYYMMDD``, ``YYYYMM`` or ``YYYY``) as a FHIR date."""
    if value.isdigit() and len(value) in (4, 6, 8):
        return "-".join(value[i : i + n] for i, n in ((0, 4), (4, 2), (6, 2)) if len(value) > i)
    return value


def closest_first(
    items: list[dict[str, Any]], threshold: float, skipped: dict[tuple[str, str], str]
) -> list[dict[str, Any]]:
    """The pairs by distance of their score to ``threshold`` (closest first), the skipped ones last."""
    return sorted(
        items,
        key=lambda it: ((it["a"], it["b"]) in skipped, abs(it["score"] - threshold), it["a"], it["b"]),
    )


def _skipped(request: web.Request, session: Session) -> dict[tuple[str, str], str]:
    store: OrderedDict[str, dict[tuple[str, str], str]] = request.app[SKIPPED]
    return store.get(session.id, {})


def _skip(request: web.Request, session: Session, pair: tuple[str, str], reason: str) -> None:
    store: OrderedDict[str, dict[tuple[str, str], str]] = request.app[SKIPPED]
    store.setdefault(session.id, {})[pair] = reason
    store.move_to_end(session.id)
    while len(store) > MAX_SKIP_SESSIONS:
        store.popitem(last=False)


@routes.get("/app/review")
@public  # the session is the app's gate; the API checks the session's token on every read
@pages
async def queue_page(request: web.Request) -> web.StreamResponse:
    """The open possible matches, closest to the match threshold first, with each record's resources."""
    session = _steward(request)
    body = await _get(request, session, f"/Person/$mpi-review-queue?{urlencode({'_count': QUEUE_READ})}")
    more = bool(_params(body, "next"))
    skipped = _skipped(request, session)
    items = closest_first(queue_items(body), MATCH_THRESHOLD, skipped)
    raw = request.query.get("page", "1")
    pages = max(1, math.ceil(len(items) / QUEUE_PAGE))
    page = min(max(1, int(raw) if raw.isdigit() and len(raw) < 6 else 1), pages)
    shown = items[(page - 1) * QUEUE_PAGE : page * QUEUE_PAGE]
    stakes = await _gather([stake_of(request, session, pid) for it in shown for pid in (it["a"], it["b"])])
    for i, it in enumerate(shown):
        it["stake_a"], it["stake_b"] = stakes[2 * i], stakes[2 * i + 1]
        it["skipped"] = skipped.get((it["a"], it["b"]))
    return aiohttp_jinja2.render_template(
        "review_queue.html",
        request,
        {
            "session": session,
            "items": shown,
            "total": len(items),
            "more": more,
            "page": page,
            "pages": pages,
            "threshold": MATCH_THRESHOLD,
            "queue_read": QUEUE_READ,
            "notice": _notice(request),
        },
    )


# -- one pair -------------------------------------------------------------------------------------
@dataclass
class Bar:
    """One bar of the waterfall: a term's bits, the running sum before and after, and its geometry."""

    name: str
    bits: float
    start: float
    end: float
    kind: str
    x: float = 0.0
    width: float = 0.0
    y: float = 0.0


@dataclass
class Waterfall:
    bars: list[Bar]
    weight: float
    width: int
    height: int
    zero_x: float
    match_x: float | None
    possible_x: float | None
    label_width: int


def waterfall(
    prior: float, terms: list[tuple[str, float, float]], weight: float, thresholds: tuple[float, float]
) -> Waterfall:
    """The waterfall of a weight: the prior, then each term from the running sum before it to the one
    after (the API's ``cumulative``, so the last bar ends exactly at ``weight``), then the total; x in
    SVG units over the range of every running sum, 0 and the thresholds' weights."""
    bars = [Bar("prior", prior, 0.0, prior, "prior")]
    running = prior
    for name, bits, cumulative in terms:
        bars.append(
            Bar(name, bits, running, cumulative, "pos" if bits > 0 else "neg" if bits < 0 else "zero")
        )
        running = cumulative
    bars.append(Bar("weight", weight, 0.0, weight, "total"))
    logits = [math.log2(p / (1 - p)) for p in thresholds if 0 < p < 1]
    points = [0.0, *logits, *(v for b in bars for v in (b.start, b.end))]
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    label, plot, row = 150, 420, 20

    def x(v: float) -> float:
        return round(label + (v - lo) / span * plot, 2)

    for i, b in enumerate(bars):
        left, right = sorted((x(b.start), x(b.end)))
        b.x, b.width, b.y = left, max(round(right - left, 2), 1.0), i * row + 4
    match_x = x(logits[0]) if len(logits) > 0 else None
    possible_x = x(logits[1]) if len(logits) > 1 else None
    return Waterfall(bars, weight, label + plot + 90, len(bars) * row + 8, x(0.0), match_x, possible_x, label)


@dataclass
class Explained:
    records: dict[str, Parts]
    fields: list[Parts]
    chart: Waterfall
    values: Parts
    link: Parts
    same_person: bool


def explained(body: dict[str, Any]) -> Explained:
    """The parts of a ``$mpi-explain`` answer the pair page shows."""
    top = Parts((str(p.get("name")), _value(p)) for p in body.get("parameter") or [] if "part" not in p)
    records = {}
    for side in ("A", "B"):
        found = _params(body, f"record{side}")
        records[side] = _parts(found[0]) if found else Parts()
    fields = [_parts(p) for p in _params(body, "field")]
    terms = [
        (str(t.get("name")), _num(t.get("weight")), _num(t.get("cumulative")))
        for t in (_parts(p) for p in _params(body, "term"))
    ]
    thresholds = (_num(top.get("matchThreshold")), _num(top.get("possibleThreshold")))
    chart = waterfall(_num(top.get("priorWeight")), terms, _num(top.get("weight")), thresholds)
    links = _params(body, "link")
    link = _parts(links[0]) if links else Parts()
    return Explained(records, fields, chart, top, link, bool(top.get("samePerson")))


def history_entries(body: dict[str, Any]) -> list[Parts]:
    """The events of a ``$mpi-history`` answer, newest first."""
    out = [_parts(p) for p in _params(body, "entry")]
    return sorted(out, key=lambda e: -int(_num(e.get("seq"))))


def person_links(body: dict[str, Any]) -> list[Parts]:
    """The MATCH pairs inside a Person (its ``mpi-pair`` extensions): the links an unlink can cut."""
    out = []
    for ext in body.get("extension") or []:
        if not str(ext.get("url", "")).endswith("/mpi-pair"):
            continue
        parts = Parts()
        for e in ext.get("extension") or []:
            parts[str(e.get("url"))] = _value(e)
        if parts.get("state") == "MATCH":
            out.append(parts)
    return out


def conflicts(
    a: str, b: str, link: Parts, histories: list[list[Parts]], members: tuple[set[str], set[str]]
) -> list[dict[str, Any]]:
    """The manual unlinks a link of ``a`` and ``b`` would go against: the pair's own (its stored state
    NO_MATCH, origin manual), and any between a record of ``a``'s person and one of ``b``'s whose
    latest manual decision in the history is an unlink."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    if link.get("state") == "NO_MATCH":
        found[(min(a, b), max(a, b))] = {
            "a": a,
            "b": b,
            "actor": link.get("actor"),
            "reason": link.get("reason"),
            "at": link.get("updated"),
        }
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for events in histories:
        for event in sorted(events, key=lambda e: int(_num(e.get("seq")))):
            if (
                event.get("action") in ("link", "unlink")
                and event.get("patient_a")
                and event.get("patient_b")
            ):
                x, y = sorted((str(event["patient_a"]), str(event["patient_b"])))
                latest[(x, y)] = event
    left, right = members
    for (x, y), last in latest.items():
        across = (x in left and y in right) or (x in right and y in left)
        if last.get("action") == "unlink" and across and (x, y) not in found:
            found[(x, y)] = {
                "a": x,
                "b": y,
                "actor": last.get("actor"),
                "reason": last.get("reason"),
                "at": last.get("at"),
            }
    return list(found.values())


def _notice(request: web.Request) -> str | None:
    return {
        "link": "Linked. The records are one person now.",
        "distinct": "Marked as not a match. The records stay apart.",
        "unlink": "Unlinked.",
        "skip": "Skipped for this session.",
    }.get(request.query.get("done", ""))


async def _pair_context(request: web.Request, session: Session, a: str, b: str) -> dict[str, Any]:
    q = urlencode({"a": a, "b": b})
    body = await _get(request, session, f"/Person/$mpi-explain?{q}")
    ex = explained(body)
    person_a = str(ex.records["A"].get("person") or "")
    person_b = str(ex.records["B"].get("person") or "")
    persons = [person_a] if person_a == person_b else [person_a, person_b]
    reads: list[Any] = [
        _get(request, session, f"/Person/$mpi-history?{urlencode({'id': p})}") for p in persons
    ]
    reads += [_get(request, session, f"/Person/{quote(p)}") for p in persons]
    reads += [stake_of(request, session, a), stake_of(request, session, b)]
    answers = await _gather(reads)
    n = len(persons)
    histories = [history_entries(h) for h in answers[:n]]
    person_bodies = answers[n : 2 * n]
    stake_a, stake_b = answers[2 * n], answers[2 * n + 1]
    members = [
        {
            str(lk.get("target", {}).get("reference", "")).split("/", 1)[-1]
            for lk in pb.get("link") or []
            if any(e.get("valueCode") == "MATCH" for e in lk.get("extension") or [])
        }
        for pb in person_bodies
    ]
    members_a, members_b = members[0], members[-1]
    pair_history = [
        e
        for e in histories[0] + (histories[1] if n > 1 else [])
        if {e.get("patient_a"), e.get("patient_b")} == {a, b}
    ]
    pair_history = list({int(_num(e.get("seq"))): e for e in pair_history}.values())
    pair_history.sort(key=lambda e: -int(_num(e.get("seq"))))
    person_views = [
        {"id": p, "history": h, "links": person_links(pb), "members": sorted(m)}
        for p, h, pb, m in zip(persons, histories, person_bodies, members, strict=True)
    ]
    return {
        "session": session,
        "a": a,
        "b": b,
        "ex": ex,
        "stake_a": stake_a,
        "stake_b": stake_b,
        "persons": person_views,
        "pair_history": pair_history,
        "conflicts": conflicts(a, b, ex.link, histories, (members_a, members_b)),
        "actions": ACTIONS,
        "max_reason": MAX_REASON,
        "notice": _notice(request),
        "error": None,
        "error_for": None,
        "reason": "",
    }


@routes.get(PAIR)
@public  # the session is the app's gate; the API checks the session's token on every read
@pages
async def pair_page(request: web.Request) -> web.StreamResponse:
    """One pair: fields side by side, the waterfall, the merge preview, conflicts, history, decisions."""
    session = _steward(request)
    a, b = request.match_info["a"], request.match_info["b"]
    if a == b:
        raise _page_error(request, session, "Not found", "A record is not a pair with itself.", 404)
    context = await _pair_context(request, session, a, b)
    return aiohttp_jinja2.render_template("review_pair.html", request, context)


@routes.post(PAIR)
@public  # the session is the app's gate; the API checks the session's token on the decision
@pages
async def decide(request: web.Request) -> web.StreamResponse:
    """A decision on the pair (link, not a match, skip) or an unlink of a link of either person
    (``x``, ``y``), with its required reason; the form again with an error when the reason is empty."""
    session = _steward(request)
    a, b = request.match_info["a"], request.match_info["b"]
    form = await request.post()
    if not csrf_ok(session, str(form.get(CSRF_FIELD, ""))):
        return csrf_refused(request)
    action = str(form.get("action", ""))
    if action not in ACTIONS or a == b:
        raise _page_error(
            request, session, "Form refused", "This form's decision is not one of the desk's.", 400
        )
    reason = " ".join(str(form.get("reason", "")).split())
    x, y = (str(form.get("x", "")), str(form.get("y", ""))) if action == "unlink" else (a, b)
    problem = None
    if not reason:
        problem = "A reason is required."
    elif len(reason) > MAX_REASON:
        problem = f"The reason is longer than {MAX_REASON} characters."
    if problem is None:
        if action == "skip":
            _skip(request, session, (a, b), reason)
            raise web.HTTPSeeOther("/app/review?done=skip")
        op = "$mpi-link" if action == "link" else "$mpi-unlink"
        answer = await fhir_post(
            request, session.access_token, f"/Person/{op}", {"patientA": x, "patientB": y, "reason": reason}
        )
        if answer.status == 200:
            log.info("ui.review_decision", action=action)
            raise web.HTTPSeeOther(f"/app/review/{a}/{b}?done={action}")
        if answer.status in (401, 403):
            raise _api_refused(request, session, answer)
        problem = f"The service refused: {answer.diagnostics()}"
    context = await _pair_context(request, session, a, b)
    context.update({"error": problem, "error_for": f"{action}:{x}:{y}", "reason": reason, "notice": None})
    return aiohttp_jinja2.render_template("review_pair.html", request, context, status=400)


@routes.get("/app/static/review.css")
@public
async def stylesheet(request: web.Request) -> web.StreamResponse:
    """The desk's own styles (the waterfall's colours among them)."""
    return web.Response(body=STYLESHEET.read_bytes(), content_type="text/css", charset="utf-8")


def install(app: web.Application) -> None:
    """The desk's routes, its memory of skipped pairs, and ``can_review`` for the templates' nav link."""
    app[SKIPPED] = OrderedDict()
    aiohttp_jinja2.get_env(app).globals["can_review"] = can_review
    app.add_routes(routes)
