"""FHIR Bulk Data Access 2.0 export: ``$export`` at system, Patient and Group level (docs/bulk.md).

* ``GET /$export``, ``GET /Patient/$export``, ``GET /Group/{id}/$export`` with ``Prefer: respond-async``
  (else 400): the parameters are checked, the latest signed ledger checkpoint is taken, the job is
  recorded, and the answer is ``202`` with ``Content-Location`` naming its status URL; the export runs
  as an asyncio task of this process (:mod:`bridge.service.fhir.export_job`);
* ``GET /_bulk/{job}``: ``202`` with ``X-Progress`` and ``Retry-After`` while it runs; ``200`` with the
  manifest when it is complete; ``500`` with an OperationOutcome when it failed; ``404`` for an unknown,
  expired or cancelled job, and for another client's;
* ``DELETE /_bulk/{job}``: stop it and delete its files (``202``);
* ``GET /_bulk/{job}/{file}``: an NDJSON file (``application/fhir+ndjson``), for the client that asked
  only; each download is audited with the patients the file holds;
* ``GET /Group``, ``GET /Group/{id}``: the groups that may be exported, one per source organisation
  (``org-<organisation id>``) and those defined with ``fhirbridge groups``.

Only ``system/`` scopes authorize an export (SMART Backend Services); ``patient/`` and ``user/`` tokens
are refused with 403. Consent applies with the token's purpose of use. Finished jobs and their files
are deleted ``FHIRBRIDGE_EXPORT_EXPIRY_MINUTES`` after they finish; jobs that a restart interrupted are
marked failed when the service starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from bridge.logging import get_logger
from bridge.service.audit.middleware import note
from bridge.service.auth.marks import Forbidden, needs
from bridge.service.auth.middleware import access_of
from bridge.service.auth.policy import Access
from bridge.service.consent.enforce import consent_check
from bridge.service.context import BACKEND, SETTINGS, Backend, base_url, run_db
from bridge.service.fhir.dates import DATE, utc_millis
from bridge.service.fhir.export_job import (
    NOT_EXPORTED,
    Cancelled,
    ExportRun,
    ExportSpec,
    Matcher,
    latest_checkpoint,
    members_of,
)
from bridge.service.fhir.query import parse_search
from bridge.service.http import FhirHTTPError, fhir_response, json_response, operation_outcome
from bridge.stores.exports import (
    COMPLETE,
    FAILED,
    FHIR_ID,
    ORG_GROUP_PREFIX,
    RUNNING,
    Job,
    organization_group_id,
    organizations,
)

log = get_logger(__name__)
routes = web.RouteTableDef()

NDJSON = "application/fhir+ndjson"
#: the ``_outputFormat`` values meaning NDJSON (Bulk Data 2.0 lists the three)
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
#: the parameters of a kick-off; ``_type`` and ``_typeFilter`` may be repeated, the others may not
EXPORT_PARAMS = ("_type", "_since", "_outputFormat", "_typeFilter")
_REPEATABLE = frozenset({"_type", "_typeFilter"})
_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_JOB = re.compile(r"[0-9a-f]{32}")
_FILE = re.compile(r"[A-Z][A-Za-z]{0,63}-[0-9]{1,9}(\.leaves)?\.ndjson")
RETRY_AFTER = "2"
ORG_SYSTEM = "urn:fhirbridge:org"


# -- the kick-off's parameters (pure: tested with hypothesis) ------------------------------------
@dataclass(frozen=True)
class ExportQuery:
    """A kick-off's parameters, checked: types (None: every type), ``_since`` (UTC, milliseconds),
    ``_typeFilter`` as (type, query) pairs, and the parameters ignored under ``handling=lenient``."""

    types: tuple[str, ...] | None = None
    since: str | None = None
    type_filters: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()


def parse_prefer(header: str | None) -> frozenset[str]:
    """The preferences of a ``Prefer`` header (RFC 7240), lower-cased: ``respond-async``,
    ``handling=lenient``, ... (parameters after ``;`` dropped)."""
    if not header:
        return frozenset()
    out = set()
    for part in header.split(","):
        token = part.split(";", 1)[0].strip().lower().replace(" ", "")
        if token:
            out.add(token)
    return frozenset(out)


def parse_export_query(pairs: list[tuple[str, str]], *, lenient: bool = False) -> ExportQuery:
    """Check a kick-off's query (``(name, value)`` pairs as received). Raises :class:`FhirHTTPError`
    (400) naming the parameter for a bad value, a parameter given twice that may not be, a NUL, an
    unknown parameter (unless ``lenient``: then it is listed in ``ignored``)."""
    seen: dict[str, list[str]] = {}
    ignored: list[str] = []
    for name, value in pairs:
        if "\x00" in name or "\x00" in value:
            raise FhirHTTPError(400, "invalid", "a parameter contains a NUL character")
        if name not in EXPORT_PARAMS:
            if not lenient:
                raise FhirHTTPError(
                    400,
                    "not-supported",
                    f"parameter {name!r} is not supported by $export (send Prefer: handling=lenient to have "
                    "unsupported parameters ignored)",
                )
            if name not in ignored:
                ignored.append(name)
            continue
        seen.setdefault(name, []).append(value)
    for name, values in seen.items():
        if len(values) > 1 and name not in _REPEATABLE:
            raise FhirHTTPError(
                400, "invalid", f"parameter {name} is given {len(values)} times; give it once"
            )
    fmt = seen.get("_outputFormat", [None])[0]
    if fmt is not None and fmt.strip() not in OUTPUT_FORMATS:
        raise FhirHTTPError(
            400,
            "not-supported",
            f"parameter _outputFormat: {fmt!r} is not supported; use application/fhir+ndjson",
        )
    types: tuple[str, ...] | None = None
    if "_type" in seen:
        names = [t.strip() for v in seen["_type"] for t in v.split(",")]
        if not any(names):
            raise FhirHTTPError(400, "invalid", "parameter _type names no resource type")
        for t in names:
            if not _TYPE.fullmatch(t):
                raise FhirHTTPError(400, "invalid", f"parameter _type: {t!r} is not a resource type name")
            if t in NOT_EXPORTED:
                raise FhirHTTPError(
                    400, "not-supported", f"parameter _type: {t} is not exported (read it with GET /{t})"
                )
        types = tuple(dict.fromkeys(names))
    since = None
    if "_since" in seen:
        raw = seen["_since"][0]
        if not DATE.fullmatch(raw):
            raise FhirHTTPError(
                400, "invalid", f"parameter _since: {raw!r} is not a FHIR instant or dateTime"
            )
        try:
            since = utc_millis(raw)
        except ValueError:
            raise FhirHTTPError(400, "invalid", f"parameter _since: {raw!r} is not a valid date") from None
    filters: list[tuple[str, str]] = []
    for raw in seen.get("_typeFilter", []):
        for item in _split_type_filters(raw):
            rtype, sep, query = item.partition("?")
            if not sep or not _TYPE.fullmatch(rtype) or not query:
                raise FhirHTTPError(
                    400, "invalid", f"parameter _typeFilter: {item!r} is not Type?search-parameters"
                )
            if types is not None and rtype not in types:
                raise FhirHTTPError(
                    400, "invalid", f"parameter _typeFilter: {rtype} is not among the types of _type"
                )
            filters.append((rtype, query))
    return ExportQuery(types, since, tuple(filters), tuple(ignored))


def _split_type_filters(value: str) -> list[str]:
    """``_typeFilter`` values are comma-separated queries; a comma inside a query (an OR of values) is
    escaped as ``%2C`` by the client, which the URL decoding has already turned into ``,``: a part that
    does not start with a type name belongs to the query before it."""
    parts: list[str] = []
    for part in value.split(","):
        if parts and not re.match(r"[A-Z][A-Za-z]*\?", part):
            parts[-1] += "," + part
        else:
            parts.append(part)
    return [p for p in parts if p]


def type_filter_matchers(filters: tuple[tuple[str, str], ...], base: str) -> dict[str, list[Matcher]]:
    """``_typeFilter`` queries as matchers, per type (a resource of a filtered type is exported when one
    of its type's queries matches it). Raises :class:`FhirHTTPError` (400) naming ``_typeFilter`` for a
    query the search parser refuses, an unknown search parameter (never silently ignored: the filter
    would export more than asked) or a result parameter (``_count``, ``_sort``, ...)."""
    out: dict[str, list[Matcher]] = {}
    for rtype, text in filters:
        params = parse_qsl(text, keep_blank_values=True)
        for name, _ in params:
            if name.startswith("_"):
                raise FhirHTTPError(
                    400,
                    "not-supported",
                    f"parameter _typeFilter: {rtype}?{name} is not a search parameter it takes",
                )
        try:
            q = parse_search(rtype, params, strict=True, base=base)
        except FhirHTTPError as exc:
            raise FhirHTTPError(
                400, exc.code, f"parameter _typeFilter ({rtype}): {exc.diagnostics}"
            ) from None
        out.setdefault(rtype, []).append(q.matches)
    return out


# -- authorization ---------------------------------------------------------------------------
def _system_types(access: Access | None, types: tuple[str, ...] | None) -> None:
    """403 for a ``_type`` the token's ``system/`` scopes may not read."""
    if access is None or types is None:
        return
    refused = [t for t in types if not access.scopes.allows(("system",), t, "r")]
    if refused:
        raise Forbidden(f"the token's system/ scopes do not grant 'r' on {', '.join(refused)}")


def owner_of(access: Access | None) -> str:
    """Who may poll and download a job: the token's ``issuer|client_id`` (``-`` with authorization off)."""
    if access is None:
        return "-"
    ctx = access.context
    return f"{ctx.issuer}|{ctx.client_id or ctx.subject or ''}"


# -- the jobs of this process ----------------------------------------------------------------
@dataclass
class ExportManager:
    """The export tasks of this service process, and the sweeper that deletes expired jobs."""

    runs: dict[str, ExportRun] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    sweeper: asyncio.Task[None] | None = None
    recovered: bool = False
    #: when this process started (seconds): jobs created before it and still running were interrupted
    started: int = field(default_factory=lambda: int(time.time()))

    def start(self, app: web.Application, spec: ExportSpec) -> None:
        run = ExportRun(spec, app[SETTINGS].export)
        self.runs[spec.job_id] = run
        self.tasks[spec.job_id] = asyncio.get_running_loop().create_task(self._run(app, run))

    async def _run(self, app: web.Application, run: ExportRun) -> None:
        backend = app[BACKEND]
        job = run.spec.job_id
        try:
            await backend.run(run.begin, backend)
            done = False
            while not done:
                if run.stop:
                    raise Cancelled()
                done = await backend.run(run.step, backend)
            await backend.run(run.complete, backend)
            log.info("export.complete", job=job, resources=run.written, pending=run.pending)
        except Cancelled:
            await backend.run(run.discard)
            log.info("export.stopped", job=job)
        except Exception as exc:
            log.error("export.failed", job=job, error=type(exc).__name__)
            await backend.run(run.discard)
            expires = int(time.time()) + app[SETTINGS].export.expiry_minutes * 60
            reason = f"the export failed ({type(exc).__name__}); see the server log"
            with contextlib.suppress(Exception):  # the store down too: the next start marks it failed
                await backend.run(
                    lambda be: be.exports().finish(job, FAILED, expires_at=expires, error=reason), backend
                )
        finally:
            await backend.run(run.close)
            self.runs.pop(job, None)
            self.tasks.pop(job, None)

    async def remove(self, app: web.Application, job_id: str) -> None:
        """Stop the job if it runs here, then delete its files and its record."""
        backend = app[BACKEND]
        # marked cancelled first: a page being written in a thread then stops at its next store call
        await backend.run(lambda be: be.exports().cancel(job_id), backend)
        run, task = self.runs.get(job_id), self.tasks.get(job_id)
        if run is not None:
            run.stop = True
        if task is not None:
            await asyncio.wait([task])
        directory = app[SETTINGS].export.directory / job_id

        def delete(be: Backend) -> None:
            shutil.rmtree(directory, ignore_errors=True)
            be.exports().delete_job(job_id)

        await backend.run(delete, backend)

    async def recover(self, app: web.Application) -> None:
        """Mark the jobs a previous process left running as failed (once per process)."""
        if self.recovered:
            return
        backend = app[BACKEND]
        reason = "interrupted by a restart of the service; start it again"
        ids = await backend.run(
            lambda be: be.exports().fail_interrupted(reason, before=self.started), backend
        )
        self.recovered = True
        if ids:
            log.warning("export.interrupted", jobs=len(ids))

    async def sweep(self, app: web.Application) -> int:
        """Delete every expired job and its files; returns how many."""
        backend = app[BACKEND]
        now = int(time.time())
        expired = await backend.run(lambda be: be.exports().expired(now), backend)
        for job_id in expired:
            await self.remove(app, job_id)
        return len(expired)

    async def _sweep_forever(self, app: web.Application) -> None:
        interval = max(1.0, min(60.0, app[SETTINGS].export.expiry_minutes * 60 / 4))
        while True:
            try:
                await self.recover(app)
                await self.sweep(app)
            except Exception as exc:  # the database down: try again at the next round
                log.warning("export.sweep_failed", error=type(exc).__name__)
            await asyncio.sleep(interval)

    async def on_startup(self, app: web.Application) -> None:
        try:
            await self.recover(app)
        except Exception as exc:  # the export database down: the sweeper tries again
            log.warning("export.recover_failed", error=type(exc).__name__)
        self.sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(app))

    async def on_cleanup(self, app: web.Application) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        for run in list(self.runs.values()):
            run.stop = True
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()))


EXPORTS = web.AppKey("exports", ExportManager)


def install(app: web.Application) -> None:
    """Add the export routes, the export tasks' manager and its start-up and clean-up to ``app``."""
    manager = app[EXPORTS] = ExportManager()
    app.add_routes(routes)
    app.on_startup.append(manager.on_startup)
    app.on_cleanup.append(manager.on_cleanup)


# -- the routes ---------------------------------------------------------------------------------
@routes.get("/$export")
@needs("*", "r", contexts=("system",))
async def export_system(request: web.Request) -> web.Response:
    """Kick off a system-level export: every resource the token may read."""
    return await _kickoff(request, "system")


@routes.get("/Patient/$export")
@needs("*", "r", contexts=("system",))
async def export_patients(request: web.Request) -> web.Response:
    """Kick off a Patient-level export: every patient's compartment."""
    return await _kickoff(request, "patient")


@routes.get(r"/Group/{id}/$export")
@needs("*", "r", contexts=("system",))
async def export_group(request: web.Request) -> web.Response:
    """Kick off a Group-level export: the compartments of the group's patients and their linked records."""
    return await _kickoff(request, "group", request.match_info["id"])


async def _kickoff(request: web.Request, kind: str, group_id: str | None = None) -> web.Response:
    note(request, "operation", "E")
    settings = request.app[SETTINGS]
    prefer = parse_prefer(request.headers.get("Prefer"))
    if "respond-async" not in prefer:
        raise FhirHTTPError(
            400, "invalid", "an export runs asynchronously: send the header Prefer: respond-async"
        )
    query = parse_export_query(list(request.query.items()), lenient="handling=lenient" in prefer)
    type_filters = type_filter_matchers(query.type_filters, base_url(request))
    access = access_of(request)
    _system_types(access, query.types)
    base = base_url(request)
    consent = consent_check(request, access, settings, base)
    members: list[str] | None = None
    if group_id is not None:
        if not FHIR_ID.fullmatch(group_id):  # never a group (and PostgreSQL cannot compare a NUL)
            raise FhirHTTPError(404, "not-found", "no such Group: a group id is a FHIR id")
        members = await run_db(request, members_of, group_id)
        if members is None:
            raise FhirHTTPError(404, "not-found", f"Group/{group_id} is not known")
    backend = request.app[BACKEND]
    pin = await run_db(request, latest_checkpoint) if backend.has_ledger else None
    if backend.has_ledger and pin is None:
        return fhir_response(
            operation_outcome(
                "error",
                "transient",
                "the ledger has no signed checkpoint yet, so no export can be pinned; retry later",
            ),
            status=503,
            headers={"Retry-After": "10"},
        )
    manager = request.app[EXPORTS]
    job_id = uuid.uuid4().hex
    now = datetime.now(UTC)
    export = settings.export
    owner = owner_of(access)
    request_url = f"{base}{request.path_qs}"
    params = {
        "types": list(query.types) if query.types is not None else None,
        "since": query.since,
        "ignored": list(query.ignored),
    }

    def create(be: Backend) -> bool:
        return be.exports().create_job(
            job_id,
            owner=owner,
            kind=kind,
            group_id=group_id,
            request=request_url,
            params=params,
            now=int(now.timestamp()),
            expires_at=int(now.timestamp()) + export.expiry_minutes * 60,
            max_running=export.max_running,
            tree_size=pin[1] if pin else None,
            checkpoint=pin[0] if pin else None,
        )

    if not await run_db(request, create):
        return fhir_response(
            operation_outcome(
                "error", "throttled", f"{export.max_running} exports are running already; retry later"
            ),
            status=429,
            headers={"Retry-After": "30"},
        )
    readable = permit = narrowed = None
    if access is not None:
        scopes = access.scopes

        def readable(t: str) -> bool:
            return scopes.allows(("system",), t, "r")

        def permit(resource: dict[str, Any]) -> bool:
            return scopes.grants(resource, "r", "system")

        def narrowed(t: str) -> bool:  # some resources of the type may be refused: each is looked at
            return scopes.narrowing(t, "r", "system") not in ([], [()])

    spec = ExportSpec(
        job_id=job_id,
        kind=kind,
        types=query.types,
        since=query.since,
        kickoff=now,
        group_id=group_id,
        members=tuple(members) if members is not None else None,
        checkpoint=pin[0] if pin else None,
        tree_size=pin[1] if pin else None,
        readable=readable,
        permit=permit,
        narrowed=narrowed,
        type_filters=type_filters,
        consent=consent,
        ignored=query.ignored,
    )
    manager.start(request.app, spec)
    log.info("export.started", job=job_id, kind=kind)
    status_url = f"{base}/_bulk/{job_id}"
    return fhir_response(
        operation_outcome("information", "informational", f"export started; poll {status_url}"),
        status=202,
        headers={"Content-Location": status_url},
    )


async def _own_job(request: web.Request) -> Job:
    """The path's job, if it exists, has not expired, and was asked for by this token's client (404
    otherwise: another client's job is not said to exist)."""
    job_id = request.match_info["job"]
    unknown = FhirHTTPError(404, "not-found", "no such export (unknown, expired or cancelled)")
    if not _JOB.fullmatch(job_id):
        raise unknown
    job: Job | None = await run_db(request, lambda be: be.exports().job(job_id))
    if job is None or job.expires_at <= time.time() or job.owner != owner_of(access_of(request)):
        raise unknown
    return job


@routes.get("/_bulk/{job}")
@needs("*", "r", contexts=("system",))
async def export_status(request: web.Request) -> web.Response:
    """The export's status: 202 while it runs, the manifest when complete, 500 when it failed."""
    note(request, "operation", "E")
    job = await _own_job(request)
    if job.status == RUNNING:
        return fhir_response(
            operation_outcome("information", "informational", f"in progress: {job.progress}"),
            status=202,
            headers={"X-Progress": job.progress[:200], "Retry-After": RETRY_AFTER},
        )
    if job.status == FAILED:
        return fhir_response(
            operation_outcome("error", "exception", job.error or "the export failed"), status=500
        )
    if job.status != COMPLETE:  # pragma: no cover - a cancelled job is deleted at once
        raise FhirHTTPError(404, "not-found", "no such export (unknown, expired or cancelled)")
    files = await run_db(request, lambda be: be.exports().files(job.id))
    base = base_url(request)
    output: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    hashes: dict[str, str] = {}
    leaves = {f.name: f for f in files if f.kind == "leaves"}
    for f in files:
        url = f"{base}/_bulk/{job.id}/{f.name}"
        hashes[url] = f.sha256
        if f.kind == "leaves":
            continue
        ext: dict[str, Any] = {"sha256": f.sha256}
        side = leaves.get(f.name.replace(".ndjson", ".leaves.ndjson"))
        if side is not None:
            ext["ledgerLeaves"] = {"url": f"{base}/_bulk/{job.id}/{side.name}", "sha256": side.sha256}
        item = {"type": f.resource_type, "url": url, "count": f.lines, "extension": ext}
        (output if f.kind == "output" else errors).append(item)
    manifest: dict[str, Any] = {
        "transactionTime": job.transaction_time,
        "request": job.request,
        "requiresAccessToken": True,
        "output": output,
        "error": errors,
        "extension": {"sha256": hashes},
    }
    if job.checkpoint is not None:
        manifest["extension"].update({"ledgerCheckpoint": job.checkpoint, "ledgerTreeSize": job.tree_size})
    response = json_response(manifest)
    response.headers["Expires"] = formatdate(job.expires_at, usegmt=True)
    return response


@routes.delete("/_bulk/{job}")
@needs("*", "r", contexts=("system",))
async def export_cancel(request: web.Request) -> web.Response:
    """Cancel the export (running or not) and delete its files."""
    note(request, "operation", "E")
    job = await _own_job(request)
    await request.app[EXPORTS].remove(request.app, job.id)
    return fhir_response(
        operation_outcome("information", "informational", "export cancelled and its files deleted"),
        status=202,
    )


@routes.get("/_bulk/{job}/{file}")
@needs("*", "r", contexts=("system",))
async def export_download(request: web.Request) -> web.StreamResponse:
    """One NDJSON file of a complete export, audited with the patients it holds."""
    note(request, "read", "R")
    job = await _own_job(request)
    name = request.match_info["file"]
    missing = FhirHTTPError(404, "not-found", "no such file in this export")
    if job.status != COMPLETE or not _FILE.fullmatch(name):
        raise missing
    f = await run_db(request, lambda be: be.exports().file(job.id, name))
    path = request.app[SETTINGS].export.directory / job.id / name
    if f is None or not path.is_file():
        raise missing
    note(
        request,
        "read",
        "R",
        patients=list(f.patients),
        touched={f.resource_type: f.lines} if not f.patients else None,
        touched_by_patient={p: {f.resource_type: n} for p, n in f.patients.items()},
    )
    return web.FileResponse(path, headers={"Content-Type": NDJSON})


# -- groups ------------------------------------------------------------------------------------
def _org_group(org: str, count: int) -> dict[str, Any]:
    return {
        "resourceType": "Group",
        "id": organization_group_id(org),
        "type": "person",
        "actual": True,
        "name": f"Patients sent by {org}",
        "quantity": count,
        "characteristic": [
            {
                "code": {"text": "source organisation"},
                "valueReference": {"identifier": {"system": ORG_SYSTEM, "value": org}},
                "exclude": False,
            }
        ],
    }


def _defined_group(gid: str, name: str, members: tuple[str, ...] | None, count: int) -> dict[str, Any]:
    group: dict[str, Any] = {
        "resourceType": "Group",
        "id": gid,
        "type": "person",
        "actual": True,
        "name": name,
        "quantity": count,
    }
    if members is not None:
        group["member"] = [{"entity": {"reference": f"Patient/{m}"}} for m in members]
    return group


@routes.get("/Group")
@needs("Group", "s", contexts=("user", "system"))
async def search_groups(request: web.Request) -> web.Response:
    """Every group that may be exported: one per source organisation, and the defined ones (no members)."""
    note(request, "search-type", "E")
    if request.query:
        raise FhirHTTPError(400, "not-supported", "GET /Group takes no search parameters")

    def read(be: Backend) -> tuple[dict[str, int], list[Any]]:
        return organizations(be.index().db), be.exports().groups()

    orgs, defined = await run_db(request, read)
    base = base_url(request)
    groups = [_org_group(org, n) for org, n in orgs.items()]
    groups += [_defined_group(g.id, g.name, None, len(g.members)) for g in defined]
    note(request, "search-type", "E", touched={"Group": len(groups)})
    return fhir_response(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(groups),
            "entry": [
                {"fullUrl": f"{base}/Group/{g['id']}", "resource": g, "search": {"mode": "match"}}
                for g in groups
            ],
        }
    )


@routes.get(r"/Group/{id:[A-Za-z0-9\-\.]{1,64}}")
@needs("Group", "r", contexts=("user", "system"))
async def read_group(request: web.Request) -> web.Response:
    """A group: a source organisation's (its characteristic and size) or a defined one (its members)."""
    gid = request.match_info["id"]
    note(request, "read", "R")
    if gid.startswith(ORG_GROUP_PREFIX):
        orgs = await run_db(request, lambda be: organizations(be.index().db))
        for org, n in orgs.items():
            if organization_group_id(org) == gid:
                note(request, "read", "R", touched={"Group": 1})
                return fhir_response(_org_group(org, n))
    else:
        group = await run_db(request, lambda be: be.exports().group(gid))
        if group is not None:
            note(request, "read", "R", patients=list(group.members), touched={"Group": 1})
            return fhir_response(_defined_group(group.id, group.name, group.members, len(group.members)))
    raise FhirHTTPError(404, "not-found", f"Group/{gid} is not known")
