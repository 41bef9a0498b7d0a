"""HTTP endpoints of the master patient index (aiohttp, FHIR JSON).

* ``GET  /Person/{id}``                   the person as a FHIR ``Person``: one ``link`` per member record
  (and per open possible match), each with ``assurance`` and extensions for state, score, origin and
  source organisation; the pairwise link set is in ``mpi-pair`` extensions.
* ``GET  /Person/$mpi-review-queue``      open POSSIBLE_MATCH pairs (``_count``, ``_offset``), as Parameters
* ``POST /Person/$mpi-link``              manual link   (Parameters or JSON: patientA, patientB, actor, reason)
* ``POST /Person/$mpi-unlink``            manual unlink (same body)
* ``GET  /Person/$mpi-history?id=``       link history of a person or a record, as Parameters
* ``GET  /Person/$mpi-explain?a=&b=``     why two records match or not: per field the compared values,
  the agreement level and its weight, the weight's terms in the matcher's order, the thresholds, the
  decision and the pair's stored link state, as Parameters

The actor of a manual decision is the access token's issuer and subject (``issuer|subject``); a body
``actor`` is ignored. Only with authorization off (benchmarks) does it come from the body or the
``X-Fhirbridge-Actor`` header.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from bridge.service.audit.middleware import note
from bridge.service.auth.marks import needs
from bridge.service.auth.middleware import access_of
from bridge.service.context import Backend, run_db
from bridge.service.http import fhir_response, int_param
from bridge.stores.mpi.config import MpiInputError
from bridge.stores.mpi.explain import ExplainedRecord, Explanation
from bridge.stores.mpi.store import PersonIndex

routes = web.RouteTableDef()

EXT = "https://fhirbridge.dev/fhir/StructureDefinition/"
EXT_STATE = EXT + "mpi-match-state"
EXT_SCORE = EXT + "mpi-match-score"
EXT_ORIGIN = EXT + "mpi-link-origin"
EXT_SOURCE = EXT + "mpi-source-org"
EXT_PAIR = EXT + "mpi-pair"
EXT_OTHER_PERSON = EXT + "mpi-other-person"
_ID = r"[A-Za-z0-9\-\.]{1,64}"
_PATIENT_ID = re.compile(_ID)
_MAX_COUNT = 1000


def _ref(kind: str, ident: str) -> dict[str, str]:
    return {"reference": f"{kind}/{ident}"}


def person_resource(p: dict[str, Any]) -> dict[str, Any]:
    """Render :meth:`PersonIndex.person` output as a FHIR R4 Person."""
    members = {m["patient_id"]: m for m in p["patients"]}
    best: dict[str, dict[str, Any]] = {}
    pair_exts = []
    for lk in p["links"]:
        parts = [
            {"url": "patientA", "valueReference": _ref("Patient", lk["patient_a"])},
            {"url": "patientB", "valueReference": _ref("Patient", lk["patient_b"])},
            {"url": "state", "valueCode": lk["state"]},
            {"url": "origin", "valueCode": lk["origin"]},
        ]
        if lk.get("score") is not None:
            parts.append({"url": "score", "valueDecimal": lk["score"]})
        if lk.get("actor"):
            parts.append({"url": "actor", "valueString": lk["actor"]})
        if lk.get("reason"):
            parts.append({"url": "reason", "valueString": lk["reason"]})
        pair_exts.append({"url": EXT_PAIR, "extension": parts})
        for pid in (lk["patient_a"], lk["patient_b"]):
            if lk["state"] == "NO_MATCH":
                continue
            current = best.get(pid)
            rank = (lk["state"] == "MATCH", lk["origin"] == "manual", lk.get("score") or 0.0)
            if current is None or rank > current["rank"]:
                best[pid] = {"rank": rank, **lk}
    links = []
    for pid, m in members.items():
        b = best.get(pid)
        if b is not None and b["state"] == "MATCH":
            state, origin, score = "MATCH", b["origin"], b.get("score")
        else:
            state, origin, score = "MATCH", "founding", None
        assurance = "level4" if origin in ("manual", "founding") else "level3"
        ext = [
            {"url": EXT_STATE, "valueCode": state},
            {"url": EXT_ORIGIN, "valueCode": origin},
            {"url": EXT_SOURCE, "valueString": m["source_org"]},
        ]
        if score is not None:
            ext.append({"url": EXT_SCORE, "valueDecimal": score})
        links.append({"extension": ext, "target": _ref("Patient", pid), "assurance": assurance})
    for lk in p["links"]:
        if lk["state"] != "POSSIBLE_MATCH" or "other_person_id" not in lk:
            continue
        other = lk["patient_b"] if lk["patient_a"] in members else lk["patient_a"]
        ext = [
            {"url": EXT_STATE, "valueCode": "POSSIBLE_MATCH"},
            {"url": EXT_ORIGIN, "valueCode": lk["origin"]},
            {"url": EXT_OTHER_PERSON, "valueReference": _ref("Person", lk["other_person_id"])},
        ]
        if lk.get("score") is not None:
            ext.append({"url": EXT_SCORE, "valueDecimal": lk["score"]})
        links.append({"extension": ext, "target": _ref("Patient", other), "assurance": "level2"})
    updated = max([m["updated_at"] for m in p["patients"]] + [lk["updated_at"] for lk in p["links"]])
    resource: dict[str, Any] = {
        "resourceType": "Person",
        "id": p["id"],
        "meta": {"lastUpdated": updated},
        "active": True,
    }
    if pair_exts:
        resource["extension"] = pair_exts
    resource["link"] = links
    return resource


def _parameters(items: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": n, **v} for n, v in items]}


def _part(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"name": name, "valueBoolean": value}
    if isinstance(value, int):
        return {"name": name, "valueInteger": value}
    if isinstance(value, float):
        return {"name": name, "valueDecimal": value}
    if isinstance(value, dict) and "reference" in value:
        return {"name": name, "valueReference": value}
    return {"name": name, "valueString": str(value)}


async def _read_body(request: web.Request) -> dict[str, Any]:
    """patientA/patientB/actor/reason from a FHIR Parameters body or a flat JSON object."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise MpiInputError(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MpiInputError("request body must be a JSON object")
    out: dict[str, Any] = {}
    if body.get("resourceType") == "Parameters":
        parameters = body.get("parameter") or []
        if not isinstance(parameters, list):  # iterating a number would fail as a 500
            raise MpiInputError("Parameters.parameter must be an array")
        for p in parameters:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise MpiInputError("every Parameters.parameter needs a name")
            value = p.get("valueString", p.get("valueId", p.get("valueCode")))
            ref = p.get("valueReference")
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                value = ref["reference"]
            out[p["name"]] = value
    else:
        out = {
            "patientA": body.get("patientA", body.get("patient_a")),
            "patientB": body.get("patientB", body.get("patient_b")),
            "actor": body.get("actor"),
            "reason": body.get("reason"),
        }
    for key in ("patientA", "patientB"):
        v = out.get(key)
        if not isinstance(v, str) or not v:
            raise MpiInputError(f"missing {key} (a Patient id or 'Patient/<id>' reference)")
        out[key] = v.split("/", 1)[1] if v.startswith("Patient/") else v
    access = access_of(request)
    if access is not None:
        # the decision is the token's: its issuer and subject, whatever the body says
        out["actor"] = f"{access.context.issuer}|{access.context.subject}"
    else:
        actor = out.get("actor") or request.headers.get("X-Fhirbridge-Actor")
        if not isinstance(actor, str) or not actor.strip():
            raise MpiInputError("missing actor (body 'actor' or header X-Fhirbridge-Actor)")
        out["actor"] = actor.strip()
    reason = out.get("reason")
    out["reason"] = reason if isinstance(reason, str) and reason else None
    for key in ("patientA", "patientB", "actor", "reason"):
        _no_nul(out[key], key)
    return out


def _no_nul(value: str | None, name: str) -> None:
    """Refuse a value holding U+0000 (PostgreSQL cannot store it in text): a 400, not a 500."""
    if value is not None and "\x00" in value:
        raise MpiInputError(f"{name} contains a NUL character")


def _mpi(backend: Backend) -> PersonIndex:
    return backend.mpi()  # type: ignore[no-any-return]


@routes.get("/Person/{id:" + _ID + "}")
@needs("Person", "r", contexts=("user", "system"))
async def get_person(request: web.Request) -> web.Response:
    """A linked person: member patients with link states and scores (FHIR Person)."""
    pid = request.match_info["id"]
    person = await run_db(request, lambda backend: _mpi(backend).person(pid))
    members = [m["patient_id"] for m in person["patients"]]
    note(request, "read", "R", patients=members, touched={"Person": 1})
    headers = {"Content-Location": f"Person/{person['id']}"} if person["id"] != pid else None
    return fhir_response(person_resource(person), headers=headers)


@routes.get("/Person/$mpi-review-queue")
@needs("Person", "rs", contexts=("user", "system"))
async def review_queue(request: web.Request) -> web.Response:
    """MPI review queue: open POSSIBLE_MATCH pairs, best first (_count, _offset)."""
    count = int_param(request, "_count", 100, 0, _MAX_COUNT)
    offset = int_param(request, "_offset", 0, 0, 10**9)
    items = await run_db(request, lambda backend: _mpi(backend).review_queue(limit=count + 1, offset=offset))
    more = count > 0 and len(items) > count  # _count=0: no items, and no next page of none
    shown = [p for it in items[:count] for p in (it["patient_a"], it["patient_b"])]
    note(request, "operation", "E", patients=shown, touched={"Patient": len(shown)})
    params: list[tuple[str, dict[str, Any]]] = []
    for it in items[:count]:
        parts = [
            _part("patientA", _ref("Patient", it["patient_a"])),
            _part("patientB", _ref("Patient", it["patient_b"])),
            {"name": "matchResult", "valueCode": "POSSIBLE_MATCH"},
            _part("score", it["score"]),
            _part("personA", _ref("Person", it["person_a"])),
            _part("personB", _ref("Person", it["person_b"])),
            _part("sourceA", it["source_a"]),
            _part("sourceB", it["source_b"]),
            _part("updated", it["updated_at"]),
        ]
        for side in ("a", "b"):
            for k, v in it[f"demographics_{side}"].items():
                if k != "identifiers":
                    parts.append(_part(f"{k}{side.upper()}", v))
        params.append(("link", {"part": parts}))
    if more:
        nxt = request.url.update_query({"_count": str(count), "_offset": str(offset + count)})
        params.append(("next", {"valueUri": str(nxt)}))
    return fhir_response(_parameters(params))


@routes.post("/Person/$mpi-link")
@needs("Person", "u", contexts=("user",))
async def manual_link(request: web.Request) -> web.Response:
    """MPI manual link of two patient records (Parameters: patientA, patientB, actor, reason)."""
    body = await _read_body(request)
    note(request, "operation", "E", patients=[body["patientA"], body["patientB"]])

    def op(m: PersonIndex) -> dict[str, Any]:
        m.link(body["patientA"], body["patientB"], actor=body["actor"], reason=body["reason"])
        return m.person(m.person_id(body["patientA"]) or "")

    person = await run_db(request, lambda backend: op(_mpi(backend)))
    return fhir_response(person_resource(person))


@routes.post("/Person/$mpi-unlink")
@needs("Person", "u", contexts=("user",))
async def manual_unlink(request: web.Request) -> web.Response:
    """MPI manual unlink of two patient records (Parameters: patientA, patientB, actor, reason)."""
    body = await _read_body(request)
    note(request, "operation", "E", patients=[body["patientA"], body["patientB"]])

    def op(m: PersonIndex) -> tuple[str | None, str | None]:
        m.unlink(body["patientA"], body["patientB"], actor=body["actor"], reason=body["reason"])
        return m.person_id(body["patientA"]), m.person_id(body["patientB"])

    pa, pb = await run_db(request, lambda backend: op(_mpi(backend)))
    return fhir_response(
        _parameters(
            [
                ("personA", {"valueReference": _ref("Person", pa or "")}),
                ("personB", {"valueReference": _ref("Person", pb or "")}),
            ]
        )
    )


@routes.get("/Person/$mpi-history")
@needs("Person", "rs", contexts=("user", "system"))
async def history(request: web.Request) -> web.Response:
    """MPI link history of a person or patient record (?id=)."""
    ident = request.query.get("id")
    if not ident:
        raise MpiInputError("parameter id (a Person or Patient id) is required")
    ident = ident.split("/", 1)[1] if ident.startswith(("Patient/", "Person/")) else ident
    _no_nul(ident, "id")
    entries = await run_db(request, lambda backend: _mpi(backend).history(ident))
    named = [e[k] for e in entries for k in ("patient_a", "patient_b") if k in e]
    note(request, "operation", "E", patients=named)
    params = []
    for e in entries:
        parts = [
            _part("seq", e["seq"]),
            _part("at", e["at"]),
            {"name": "action", "valueCode": e["action"]},
        ]
        for k in ("patient_a", "patient_b"):
            if k in e:
                parts.append(_part(k, _ref("Patient", e[k])))
        for k in ("person_id", "other_person_id"):
            if k in e:
                parts.append(_part(k, _ref("Person", e[k])))
        for k in ("actor", "reason", "score"):
            if k in e:
                parts.append(_part(k, e[k]))
        if "detail" in e:
            parts.append(_part("detail", orjson.dumps(e["detail"]).decode()))
        params.append(("entry", {"part": parts}))
    return fhir_response(_parameters(params))


def _patient_param(request: web.Request, name: str) -> str:
    """The Patient id of query parameter ``name`` (an id or ``Patient/<id>``); a located 400 otherwise."""
    values = request.query.getall(name, [])
    if not values:
        raise MpiInputError(
            "required (a Patient id or 'Patient/<id>' reference)", location=f"parameter {name}"
        )
    if len(values) > 1:
        raise MpiInputError("given more than once", location=f"parameter {name}")
    raw = values[0]
    ident = raw.split("/", 1)[1] if raw.startswith("Patient/") else raw
    if not _PATIENT_ID.fullmatch(ident):
        # the value is not echoed: it may be anything a client typed, PHI included
        raise MpiInputError("not a Patient id ([A-Za-z0-9-.], 1-64 characters)", location=f"parameter {name}")
    return ident


def _value(value: Any) -> dict[str, Any]:
    """A top-level parameter's value (``_part`` without the name)."""
    out = _part("", value)
    del out["name"]
    return out


def _record_parameter(record: ExplainedRecord) -> dict[str, Any]:
    parts = [
        _part("patient", _ref("Patient", record.patient_id)),
        _part("source", record.source_org),
        _part("person", _ref("Person", record.person_id)),
    ]
    parts += [{"name": "identifierSystem", "valueUri": s} for s in record.identifier_systems]
    return {"part": parts}


def explanation_parameters(e: Explanation) -> dict[str, Any]:
    """Render :meth:`PersonIndex.explain` output as FHIR Parameters (documented in docs/mpi.md)."""
    s = e.scoring
    params: list[tuple[str, dict[str, Any]]] = [
        ("recordA", _record_parameter(e.a)),
        ("recordB", _record_parameter(e.b)),
    ]
    for f in s.fields:
        parts = [
            {"name": "name", "valueCode": f.name},
            _part("level", f.level),
            {"name": "agreement", "valueCode": f.agreement},
        ]
        if f.label is not None:
            parts.append(_part("levelMeaning", f.label))
        if f.value_a is not None:
            parts.append(_part("valueA", f.value_a))
        if f.value_b is not None:
            parts.append(_part("valueB", f.value_b))
        if f.m is not None and f.u is not None:
            parts += [_part("m", f.m), _part("u", f.u)]
        parts.append(_part("bayesFactorBits", f.bayes_bits))
        if f.tf_bits is not None:
            parts.append(_part("termFrequencyBits", f.tf_bits))
        parts.append(_part("weight", f.weight))
        params.append(("field", {"part": parts}))
    params.append(("priorWeight", _value(s.prior)))
    running = s.prior
    for name, bits in s.terms:
        running += bits  # the matcher's order: the last running total is exactly the weight
        params.append(
            ("term", {"part": [_part("name", name), _part("weight", bits), _part("cumulative", running)]})
        )
    config = s.config
    params += [
        ("weight", _value(s.weight)),
        ("probability", _value(s.probability)),
        ("evidenceBits", _value(s.evidence)),
        ("demographicProbability", _value(s.demographic_probability)),
        ("matchThreshold", _value(config.match_threshold)),
        ("possibleThreshold", _value(config.possible_threshold)),
        ("minMatchEvidenceBits", _value(config.min_match_evidence_bits)),
        ("identifierCorroboration", _value(config.identifier_corroboration)),
        ("decision", {"valueCode": s.decision}),
    ]
    link: list[dict[str, Any]] = []
    if e.link is None:
        link.append({"name": "state", "valueCode": "none"})
    else:
        link += [
            {"name": "state", "valueCode": e.link.state},
            {"name": "origin", "valueCode": e.link.origin},
        ]
        if e.link.score is not None:
            link.append(_part("score", e.link.score))
        if e.link.actor:
            link.append(_part("actor", e.link.actor))
        if e.link.reason:
            link.append(_part("reason", e.link.reason))
        link.append(_part("updated", e.link.updated_at))
    params += [
        ("link", {"part": link}),
        ("samePerson", _value(e.a.person_id == e.b.person_id)),
        (
            "model",
            {
                "part": [
                    {"name": "source", "valueCode": s.model_source},
                    _part("fittedOnRecords", s.model_fitted_on_records),
                ]
            },
        ),
    ]
    return _parameters(params)


@routes.get("/Person/$mpi-explain")
@needs("Person", "rs", contexts=("user", "system"))
async def explain(request: web.Request) -> web.Response:
    """Why two patient records match or not, field by field (?a=&b=, Patient ids)."""
    a, b = _patient_param(request, "a"), _patient_param(request, "b")
    note(request, "operation", "E", patients=[a, b])
    explained = await run_db(request, lambda backend: _mpi(backend).explain(a, b))
    return fhir_response(explanation_parameters(explained))
