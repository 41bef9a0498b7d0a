"""One Bulk Data export, run in the background: pages of the index streamed into NDJSON files.

:class:`ExportRun` holds what the kick-off decided (:class:`ExportSpec`) and the state of the run; the
service's asyncio task (:mod:`bridge.service.fhir.bulk`) calls :meth:`ExportRun.begin`, then
:meth:`ExportRun.step` until it says it is done, then :meth:`ExportRun.complete`, each in the Backend's
thread pool, so that a cancellation is noticed between two pages and no page holds the event loop.

What is exported (docs/bulk.md):

* **pinned to a signed ledger checkpoint**: at the start the latest signed checkpoint (size ``N``) is
  taken, and a resource is exported only when the bundle that delivered its stored version is logged
  in the ledger at a leaf index below ``N`` (each page's bundles are looked up at once with
  ``find_many``). The others (logged after the checkpoint, or not yet) are counted as *pending*, and the
  manifest's ``transactionTime`` is moved back to the earliest ``lastUpdated`` among them, so that an
  export with ``_since=<transactionTime>`` returns them;
* of the types the token's ``system/`` scopes may read (with their granular narrowing), ``_type``,
  ``_typeFilter`` and ``_since``; Consents are never exported;
* through the patients' Consents for the token's purpose of use, one gate per person (the records the
  MPI links by MATCH), built only for persons one of whose records has a Consent when the base policy is
  permit; withheld resources are counted and reported in the error file.

Each type goes into its own files, split at ``file_lines`` lines or ``file_patients`` distinct patients
(each download is audited with one AuditEvent per patient in the file). A file is written line by line
to ``<name>.part`` with its SHA-256 computed as it is written, then renamed and recorded with its
patients.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from bridge.config import ExportSettings
from bridge.errors import FhirbridgeError
from bridge.service.consent.enforce import ConsentCheck, ConsentGate, suppressed_outcome
from bridge.service.context import Backend
from bridge.stores.db import Database, SqliteTuning
from bridge.stores.exports import (
    COMPLETE,
    ORG_GROUP_PREFIX,
    ExportFile,
    consenting_patients,
    organization_group_id,
    organization_patients,
    organizations,
    patient_resources,
    resource_page,
    resource_types,
)
from bridge.stores.index.store import StoredResource

#: types never exported: a patient's Consents are served by ``/Consent`` (who may see them is not who
#: may see the record)
NOT_EXPORTED = frozenset({"Consent"})
#: persons whose consent gates are kept at once (a gate holds the person's parsed Consents)
GATE_CACHE = 4096
#: how often a running job's progress is recorded (a running job's record also says whether it was cancelled)
PROGRESS_EVERY_S = 1.0
#: a group's patients read per query
GROUP_CHUNK = 500
#: the run's own index connection: 8 MiB of page cache (the index's own connections keep 64 MiB)
EXPORT_READ_TUNING = SqliteTuning(cache_kib=8192, busy_timeout_ms=30_000)


#: a ``_typeFilter`` query: whether a parsed resource (from that source organisation) matches it
Matcher = Callable[..., bool]


class Cancelled(FhirbridgeError):
    """The job was cancelled (DELETE) or expired while it ran (caught by the task that runs it)."""


@dataclass(frozen=True)
class ExportSpec:
    """What the kick-off decided: which records (``kind`` system, patient or group), which types, since
    when, and the request's filters (narrowing, ``_typeFilter``, consent)."""

    job_id: str
    kind: str
    types: tuple[str, ...] | None
    since: str | None
    kickoff: datetime
    group_id: str | None = None
    #: the signed ledger checkpoint the export is pinned to, and its size (None: no ledger configured)
    checkpoint: str | None = None
    tree_size: int | None = None
    #: the group's members (Patient ids) as the kick-off resolved them; None for other kinds
    members: tuple[str, ...] | None = None
    #: the types the token may read (None: every type, authorization off)
    readable: Callable[[str], bool] | None = None
    #: whether the token's narrowing admits a parsed resource (None: no narrowing)
    permit: Callable[[dict[str, Any]], bool] | None = None
    #: whether the token's scopes narrow a type (so that each of its resources must be looked at)
    narrowed: Callable[[str], bool] | None = None
    #: ``_typeFilter``: type -> matchers, a resource of that type is exported when one matches
    type_filters: dict[str, list[Matcher]] = field(default_factory=dict)
    consent: ConsentCheck | None = None
    #: parameters ignored under ``Prefer: handling=lenient`` (reported in the error file)
    ignored: tuple[str, ...] = ()


def iso_millis(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _File:
    """One NDJSON file being written: lines, bytes and SHA-256 as it goes, renamed into place when closed."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.final = directory / name
        self.part = directory / f"{name}.part"
        self.fh: IO[bytes] = open(self.part, "wb")  # noqa: SIM115 - closed by close() or discard()
        self.digest = hashlib.sha256()
        self.lines = 0
        self.bytes = 0

    def write(self, line: bytes) -> None:
        self.fh.write(line)
        self.digest.update(line)
        self.lines += 1
        self.bytes += len(line)

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.part, self.final)

    def discard(self) -> None:
        self.fh.close()
        self.part.unlink(missing_ok=True)


class _Sink:
    """The files being written for one type: the resources, the patients they belong to, and (with a
    ledger) beside them the ledger leaf of each line's delivering bundle (``<name>.leaves.ndjson``)."""

    def __init__(self, directory: Path, name: str, resource_type: str, seq: int, *, leaves: bool) -> None:
        self.resource_type, self.seq = resource_type, seq
        self.data = _File(directory, name)
        self.leaves = _File(directory, name.replace(".ndjson", ".leaves.ndjson")) if leaves else None
        self.patients: dict[str, int] = {}

    @property
    def lines(self) -> int:
        return self.data.lines

    def write(self, line: bytes, patient_id: str | None, leaf: bytes | None = None) -> None:
        self.data.write(line)
        if self.leaves is not None and leaf is not None:
            self.leaves.write(leaf)
        if patient_id is not None:
            self.patients[patient_id] = self.patients.get(patient_id, 0) + 1

    def close(self, job_id: str, kind: str) -> list[ExportFile]:
        out = []
        for f, fkind, patients in ((self.data, kind, self.patients), (self.leaves, "leaves", {})):
            if f is None:
                continue
            f.close()
            out.append(
                ExportFile(
                    job_id,
                    f.name,
                    fkind,
                    self.resource_type,
                    self.seq * 2 + (fkind == "leaves"),
                    f.lines,
                    f.bytes,
                    f.digest.hexdigest(),
                    patients,
                )
            )
        return out

    def discard(self) -> None:
        self.data.discard()
        if self.leaves is not None:
            self.leaves.discard()


class _ConsentFilter:
    """The consent decision over an export: one gate per person, built when first needed."""

    def __init__(self, check: ConsentCheck, restricted: frozenset[str] | None) -> None:
        self.check = check
        #: the patients whose person has a Consent (None: every person must be decided, base policy deny)
        self.restricted = restricted
        self._gates: dict[str, ConsentGate] = {}
        self.withheld = 0

    def admits(self, backend: Backend, r: StoredResource) -> bool:
        pid = r.patient_id
        if pid is None or (self.restricted is not None and pid not in self.restricted):
            return True
        gate = self._gates.get(pid)
        if gate is None:
            linked = linked_ids(backend, pid)
            gate = self.check.gate(backend, linked)
            if len(self._gates) >= GATE_CACHE:
                self._gates.clear()
            for p in linked:
                self._gates[p] = gate
        if gate.admits(r):
            return True
        self.withheld += 1
        return False


def linked_ids(backend: Backend, patient_id: str) -> list[str]:
    """The records the MPI links to ``patient_id`` by MATCH, itself first."""
    mpi = backend.mpi()
    linked = (
        mpi.linked_patient_ids(patient_id)
        if mpi is not None
        else backend.index().identifier_linked(patient_id)
    )
    return linked if patient_id in linked else [patient_id, *linked]


def latest_checkpoint(backend: Backend) -> tuple[str, int] | None:
    """The ledger's latest signed checkpoint note and its tree size (None: none signed yet)."""
    note = backend.ledger().latest_checkpoint()
    return None if note is None else (note, int(note.split("\n")[1]))


class ExportRun:
    """The state of one running export (used from one thread at a time, in turn)."""

    def __init__(self, spec: ExportSpec, settings: ExportSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.directory = settings.directory / spec.job_id
        self.types: list[str] = []
        self.type_index = 0
        self.after = ""
        self.chunk = 0
        self.members: list[str] = []
        self.tree_size = spec.tree_size
        self.db: Database | None = None
        #: set by the service to stop the run between two pages (cancelled, expired, shutting down)
        self.stop = False
        self.sink: _Sink | None = None
        self.seq = 0
        self.written = 0
        self.pending = 0
        self.pending_since: str | None = None
        self.filtered = 0
        self.consent: _ConsentFilter | None = None
        self._per_type: dict[str, int] = {}
        self._progress_at = 0.0

    # -- phases ----------------------------------------------------------------------------------
    def begin(self, backend: Backend) -> None:
        """List the types, resolve the group's linked records, prepare the consent decision."""
        # a connection of the run's own, with a small page cache: the export reads the whole index once,
        # which would otherwise fill (and evict from) the 64 MiB caches of the connections serving requests
        self.db = Database(backend.index().db.url, EXPORT_READ_TUNING)
        db = self.db
        types = list(self.spec.types) if self.spec.types is not None else resource_types(db)
        readable = self.spec.readable
        self.types = [t for t in types if t not in NOT_EXPORTED and (readable is None or readable(t))]
        if self.spec.kind == "group":
            seen: dict[str, None] = {}
            for pid in self.spec.members or ():
                for linked in linked_ids(backend, pid):
                    seen[linked] = None
            self.members = sorted(seen)
        if self.spec.consent is not None:
            restricted: frozenset[str] | None = None
            if self.spec.consent.default == "permit":
                found: set[str] = set()
                for pid in consenting_patients(db):
                    found.update(linked_ids(backend, pid))
                restricted = frozenset(found)
            self.consent = _ConsentFilter(self.spec.consent, restricted)
        self.directory.mkdir(parents=True, exist_ok=True)

    def step(self, backend: Backend) -> bool:
        """Export one page; True when every type is done. Raises :class:`Cancelled` when the job is no
        longer running."""
        if self.type_index >= len(self.types):
            return True
        rtype = self.types[self.type_index]
        db = self.db
        assert db is not None, "begin() first"
        limit = self.settings.page_rows
        if self.spec.kind == "group":
            ids = self.members[self.chunk : self.chunk + GROUP_CHUNK]
            rows = patient_resources(db, rtype, ids, since=self.spec.since)
            self.chunk += GROUP_CHUNK
            last = self.chunk >= len(self.members)
        else:
            rows = resource_page(
                db,
                rtype,
                self.after,
                since=self.spec.since,
                compartment_only=self.spec.kind == "patient",
                limit=limit,
            )
            if rows:
                self.after = rows[-1].id
            last = len(rows) < limit
        self._write(backend, rtype, rows)
        if last:
            self._close_sink(backend)
            self.type_index += 1
            self.after, self.chunk = "", 0
        done = self.type_index >= len(self.types)
        now = time.monotonic()
        # at most once a second (each is a durable write), and when a type is done; a DELETE in this
        # process also sets ``stop``, seen between two pages
        if last or now - self._progress_at >= PROGRESS_EVERY_S:
            self._progress_at = now
            progress = f"{self.written} resources written; {rtype} ({self.type_index} of {len(self.types)} types done)"
            if not backend.exports().set_progress(self.spec.job_id, progress):
                raise Cancelled()
        return done

    def complete(self, backend: Backend) -> str:
        """Write the error file, record the job complete; returns the ``transactionTime``."""
        self._close_sink(backend)
        kickoff = iso_millis(self.spec.kickoff)
        transaction_time = min(kickoff, self.pending_since) if self.pending_since else kickoff
        issues = self._issues(transaction_time)
        if issues:
            sink = self._open("OperationOutcome", leaves=False)
            for outcome in issues:
                sink.write(orjson.dumps(outcome) + b"\n", None)
            self._record(backend, sink.close(self.spec.job_id, "error"))
        expires = int(time.time()) + self.settings.expiry_minutes * 60
        if not backend.exports().finish(
            self.spec.job_id, COMPLETE, expires_at=expires, transaction_time=transaction_time
        ):
            raise Cancelled()
        return transaction_time

    def close(self) -> None:
        """Close the run's index connection (after :meth:`complete` or :meth:`discard`)."""
        if self.db is not None:
            self.db.close()
            self.db = None

    def discard(self) -> None:
        """Remove whatever this job wrote (cancelled, expired or failed)."""
        if self.sink is not None:
            self.sink.discard()
            self.sink = None
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- the parts ------------------------------------------------------------------------------
    def _write(self, backend: Backend, rtype: str, rows: list[StoredResource]) -> None:
        if not rows:
            return
        pinned: dict[tuple[str, str], int] | None = None
        if self.tree_size is not None:
            ledger = backend.ledger()
            idents = sorted({(r.bundle_sha256, r.source_org) for r in rows})
            pinned = ledger.find_many(idents)
        size = self.tree_size
        permit = self.spec.permit
        narrowed = permit is not None and self.spec.narrowed is not None and self.spec.narrowed(rtype)
        filters = self.spec.type_filters.get(rtype)
        consent = self.consent
        cap_lines, cap_patients = self.settings.file_lines, self.settings.file_patients
        for r in rows:
            if pinned is not None:
                leaf = pinned.get((r.bundle_sha256, r.source_org))
                if leaf is None or (size is not None and leaf >= size):
                    self.pending += 1
                    if self.pending_since is None or r.last_updated < self.pending_since:
                        self.pending_since = r.last_updated
                    continue
            if narrowed or filters:
                parsed = orjson.loads(r.body)
                if narrowed and permit is not None and not permit(parsed):
                    self.filtered += 1
                    continue
                if filters and not any(f(parsed, source_org=r.source_org) for f in filters):
                    continue
            if consent is not None and not consent.admits(backend, r):
                continue
            sink = self.sink
            pid = r.patient_id
            if (
                sink is None
                or sink.lines >= cap_lines
                or (pid is not None and pid not in sink.patients and len(sink.patients) >= cap_patients)
            ):
                self._close_sink(backend)
                sink = self.sink = self._open(rtype, leaves=pinned is not None)
            body = r.body
            if b"\n" in body:  # NDJSON: one resource per line, whatever the stored JSON's layout
                body = orjson.dumps(orjson.loads(body))
            leaf_line = None
            if pinned is not None:
                leaf_line = orjson.dumps(
                    {
                        "id": r.id,
                        "bundleSha256": r.bundle_sha256,
                        "sourceOrg": r.source_org,
                        "ledgerIndex": pinned[(r.bundle_sha256, r.source_org)],
                    }
                )
                leaf_line += b"\n"
            sink.write(body + b"\n", pid, leaf_line)
            self.written += 1

    def _open(self, rtype: str, *, leaves: bool) -> _Sink:
        n = self._per_type[rtype] = self._per_type.get(rtype, 0) + 1
        self.seq += 1
        return _Sink(self.directory, f"{rtype}-{n}.ndjson", rtype, self.seq, leaves=leaves)

    def _close_sink(self, backend: Backend) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            self._record(backend, sink.close(self.spec.job_id, "output"))

    def _record(self, backend: Backend, files: list[ExportFile]) -> None:
        store = backend.exports()
        for f in files:
            if not store.add_file(f):
                raise Cancelled()

    def _issues(self, transaction_time: str) -> list[dict[str, Any]]:
        """The error file's OperationOutcomes: counts only, never what or whose."""
        out: list[dict[str, Any]] = []
        if self.consent is not None and self.consent.withheld:
            outcome = suppressed_outcome()
            issue = outcome["issue"][0]
            issue["diagnostics"] = (
                f"{self.consent.withheld} resources were withheld by patients' consents "
                "for the purpose of use of this request"
            )
            out.append(outcome)
        if self.pending:
            out.append(
                _outcome(
                    "information",
                    "incomplete",
                    f"{self.pending} resources were left out: the bundle that delivered their stored version "
                    f"is not in the ledger below tree size {self.tree_size} (logged after the checkpoint, or "
                    f"not yet); an export with _since={transaction_time} includes them",
                )
            )
        if self.filtered:
            out.append(
                _outcome(
                    "information",
                    "suppressed",
                    f"{self.filtered} resources were left out by the narrowing of the token's scopes",
                )
            )
        for name in self.spec.ignored:
            out.append(
                _outcome("warning", "not-supported", f"parameter {name} is not supported and was ignored")
            )
        return out


def _outcome(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def members_of(backend: Backend, group_id: str) -> list[str] | None:
    """The member Patient ids of a group: a defined one's, or a source organisation's Patient records;
    None when there is no such group."""
    if group_id.startswith(ORG_GROUP_PREFIX):
        db = backend.index().db
        for org in organizations(db):
            if organization_group_id(org) == group_id:
                return organization_patients(db, org)
        return None
    group = backend.exports().group(group_id)
    return list(group.members) if group is not None else None
