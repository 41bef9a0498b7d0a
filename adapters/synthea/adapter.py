"""Synthea CSV export -> one FHIR R4 transaction bundle per patient.

Input: the export directory (``convert_path``) or a zip of it (``convert``). ``patients.csv`` is
required; every other file is optional. Both column layouts are accepted (the current one and the
2022 one without MIDDLE/FIPS/INCOME/SYSTEM, with ``DATE`` or ``START`` on procedures, and
``START_YEAR``/``START_DATE`` on payer transitions): columns are read by name, and missing ones are
simply absent.

A row that cannot be read (ragged, bad date, unknown patient) becomes a :class:`RejectedRecord`
located by file and line; it does not stop the rest. Files we do not convert (claims, ...) are
named in a warning on every bundle.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters.base import Adapter, Outcome, RejectedRecord, SourceInfo, sha256_hex
from adapters.bundle import BundleBuilder
from adapters.common.codes import name_to_uri
from adapters.common.csvread import BadRow, CsvFileError, Row, RowError, decode, read_csv
from adapters.common.encounter_class import encounter_class
from adapters.common.guard import guarded
from adapters.common.race import CDC_RACE_ETHNICITY, ethnicity_extension, race_extension
from adapters.errors import AdapterError, InternalAdapterError, Location, ValidationFailed

SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"

#: files converted, keyed by name; the value is the patient column.
PATIENT_FILES = {
    "encounters": "PATIENT",
    "conditions": "PATIENT",
    "observations": "PATIENT",
    "medications": "PATIENT",
    "procedures": "PATIENT",
    "immunizations": "PATIENT",
    "allergies": "PATIENT",
    "careplans": "PATIENT",
    "devices": "PATIENT",
    "supplies": "PATIENT",
    "imaging_studies": "PATIENT",
    "payer_transitions": "PATIENT",
}
LOOKUP_FILES = ("organizations", "providers", "payers")
NOT_CONVERTED = ("claims", "claims_transactions", "patient_expenses")

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
)  # FHIR: seconds required
_YEAR = re.compile(r"^\d{4}$")
#: ENCOUNTERCLASS -> v3 ActEncounterCode
_ENC_CLASS = {
    "ambulatory": "AMB",
    "wellness": "AMB",
    "outpatient": "AMB",
    "urgentcare": "AMB",
    "emergency": "EMER",
    "inpatient": "IMP",
    "home": "HH",
    "hospice": "HH",
    "snf": "IMP",
    "virtual": "VR",
}
_RACE = {
    "white": ("2106-3", "White"),
    "black": ("2054-5", "Black or African American"),
    "asian": ("2028-9", "Asian"),
    "native": ("1002-5", "American Indian or Alaska Native"),
    "hawaiian": ("2076-8", "Native Hawaiian or Other Pacific Islander"),
    "other": ("2131-1", "Other Race"),
}
_ETHNICITY = {
    "hispanic": ("2135-2", "Hispanic or Latino"),
    "nonhispanic": ("2186-5", "Not Hispanic or Latino"),
}
_MARITAL = {"M": "Married", "S": "Never Married", "D": "Divorced", "W": "Widowed"}


def dt(value: str | None, column: str, *, required: bool = False) -> str | None:
    """A Synthea date or UTC timestamp, checked to be a valid FHIR date/dateTime."""
    v = (value or "").strip()
    if not v:
        if required:
            raise RowError(column, f"{column} is empty")
        return None
    if _DATE.match(v) or _DATETIME.match(v):
        try:  # the whole value: hours, minutes, seconds and offset too, not only the date
            parsed = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise RowError(column, f"{column} {v!r} is not a real date or time") from None
        offset = parsed.utcoffset()  # Python allows up to 24 h; FHIR up to 14:00
        if offset is not None and abs(offset.total_seconds()) > 14 * 3600:
            raise RowError(column, f"{column} {v!r} has an offset beyond FHIR's 14:00")
        return v
    if _YEAR.match(v):
        return v
    raise RowError(column, f"{column} {v!r} is not an ISO-8601 date or UTC timestamp")


def cc(system: str, code: str | None, display: str | None) -> dict[str, Any] | None:
    code = (code or "").strip()
    display = (display or "").strip()
    if not code and not display:
        return None
    out: dict[str, Any] = {}
    if code:
        c = {"system": system, "code": code}
        if display:
            c["display"] = display
        out["coding"] = [c]
    if display:
        out["text"] = display
    return out


def number(v: str) -> float | int | None:
    try:
        f = float(v)
    except ValueError:
        return None
    if f != f or f in (float("inf"), float("-inf")):
        return None
    return int(f) if re.match(r"^-?\d+$", v.strip()) else f


class _Table:
    """One CSV file of the export: rows grouped by patient, plus bad rows."""

    def __init__(self, name: str, text: str, filename: str) -> None:
        self.name = name
        self.filename = filename
        self.header, rows = read_csv(text)
        self.rows: list[Row] = []
        self.bad: list[BadRow] = []
        for r in rows:
            if isinstance(r, BadRow):
                self.bad.append(r)
            else:
                self.rows.append(r)


class SyntheaCsvAdapter(Adapter):
    """Synthea's CSV export (directory or zip) to one bundle per patient."""

    name = "synthea-csv"
    version = "0.1.0"
    description = "Synthea CSV export (directory or .zip), one FHIR bundle per patient; both column layouts"
    suffixes = (".zip",)

    def __init__(self, **options: str) -> None:
        unknown = set(options) - {"max_bytes"}
        if unknown:
            raise AdapterError(
                f"adapter 'synthea-csv' has no option(s) {', '.join(sorted(unknown))}; known: max_bytes"
            )
        try:
            self.max_bytes = int(options.get("max_bytes", 2 * 1024**3))
        except ValueError:
            raise AdapterError(
                f"synthea-csv option max_bytes must be an integer, got {options['max_bytes']!r}"
            ) from None

    # -- input forms ------------------------------------------------------------------------------
    def convert_path(self, path: Path, source: SourceInfo) -> Iterator[Outcome]:
        """Convert an export directory (or a zip file of one)."""
        if not path.is_dir():
            yield from super().convert_path(path, source)
            return
        files: dict[str, tuple[bytes, str]] = {}
        total = 0
        for p in sorted(path.glob("*.csv")):
            data = p.read_bytes()
            total += len(data)
            if total > self.max_bytes:
                yield RejectedRecord(
                    self.error(f"export exceeds max_bytes={self.max_bytes}", Location(file=str(p))), b""
                )
                return
            files[p.stem.lower()] = (data, str(p))
        yield from guarded(
            self.name, self._convert_files(files, source, str(path)), Location(file=str(path), line=1), b""
        )

    def convert(self, data: bytes, source: SourceInfo, *, filename: str | None = None) -> Iterator[Outcome]:
        """Convert a zip of the export directory (CSV members anywhere in it)."""
        floc = Location(file=filename)
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            yield RejectedRecord(
                self.error("expected a Synthea CSV export directory or a .zip of one", floc), data
            )
            return
        files: dict[str, tuple[bytes, str]] = {}
        with zf:
            members = [i for i in zf.infolist() if i.filename.lower().endswith(".csv") and not i.is_dir()]
            if sum(i.file_size for i in members) > self.max_bytes:
                yield RejectedRecord(self.error(f"zip expands beyond max_bytes={self.max_bytes}", floc), data)
                return
            stems: dict[str, list[str]] = {}
            for info in members:
                stems.setdefault(Path(info.filename).stem.lower(), []).append(info.filename)
            clashes = {stem: names for stem, names in stems.items() if len(names) > 1}
            if clashes:  # one would silently replace the other: refuse the export, say which
                listed = "; ".join(", ".join(names) for names in clashes.values())
                yield RejectedRecord(
                    self.error(
                        f"the zip holds several files for the same table ({listed}): one export per zip", floc
                    ),
                    data,
                )
                return
            for info in members:
                stem = Path(info.filename).stem.lower()
                try:
                    content = zf.read(info)
                except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
                    yield RejectedRecord(self.error(f"cannot read {info.filename}: {exc}", floc), b"")
                    continue
                files[stem] = (content, f"{filename or 'export.zip'}!{info.filename}")
        yield from guarded(
            self.name,
            self._convert_files(files, source, filename or "export.zip"),
            Location(file=filename, line=1),
            b"",
        )

    # -- conversion -------------------------------------------------------------------------------
    def _convert_files(
        self, files: dict[str, tuple[bytes, str]], source: SourceInfo, where: str
    ) -> Iterator[Outcome]:
        if "patients" not in files:
            yield RejectedRecord(self.error("no patients.csv in the export", Location(file=where)), b"")
            return
        tables: dict[str, _Table] = {}
        for name, (data, fname) in sorted(files.items()):
            if name in NOT_CONVERTED or (
                name not in PATIENT_FILES and name not in LOOKUP_FILES and name != "patients"
            ):
                continue
            try:
                tables[name] = _Table(name, decode(data), fname)
            except CsvFileError as exc:
                if name == "patients":
                    yield RejectedRecord(self.error(str(exc), Location(file=fname, line=exc.line)), data)
                    return
                yield RejectedRecord(self.error(str(exc), Location(file=fname, line=exc.line)), data)
        skipped = sorted(n for n in files if n not in tables and n not in ("patients",))
        for t in tables.values():
            for bad in t.bad:
                yield RejectedRecord(
                    self.error(bad.message, Location(file=t.filename, line=bad.line)), bad.raw.encode("utf-8")
                )
        lookups = {
            n: {r.values.get("Id", ""): r for r in tables[n].rows} if n in tables else {}
            for n in LOOKUP_FILES
        }
        by_patient: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
        patients = tables["patients"]
        known = {r.values.get("Id", "") for r in patients.rows}
        for name, col in PATIENT_FILES.items():
            table = tables.get(name)
            if table is None:
                continue
            for r in table.rows:
                pid = r.values.get(col, "")
                if pid not in known:
                    yield RejectedRecord(
                        self.error(
                            f"{col} {pid!r} is not in patients.csv",
                            Location(file=table.filename, line=r.line, column=col),
                        ),
                        r.raw.encode("utf-8"),
                    )
                    continue
                by_patient[pid][name].append(r)
        if not patients.rows:
            yield RejectedRecord(
                self.error(
                    "patients.csv has a header but no patients", Location(file=patients.filename, line=1)
                ),
                b"",
            )
        for prow in patients.rows:
            yield from self._guarded(
                prow,
                patients.filename,
                self._patient(
                    prow, by_patient.get(prow.values.get("Id", ""), {}), tables, lookups, source, skipped
                ),
            )

    def _guarded(self, prow: Row, pfile: str, outcomes: Iterator[Outcome]) -> Iterator[Outcome]:
        """Run one patient's conversion; an unexpected failure (a bug) is a located InternalAdapterError."""
        try:
            yield from outcomes
        except Exception as exc:
            yield RejectedRecord(
                InternalAdapterError(
                    f"cannot convert patient: {type(exc).__name__}: {exc}",
                    adapter=self.name,
                    location=Location(file=pfile, line=prow.line),
                ),
                prow.raw.encode("utf-8"),
                prow.values.get("Id"),
            )

    def _patient(
        self,
        prow: Row,
        rows: dict[str, list[Row]],
        tables: dict[str, _Table],
        lookups: dict[str, dict[str, Row]],
        source: SourceInfo,
        skipped: list[str],
    ) -> Iterator[Outcome]:
        pid = prow.values.get("Id", "").strip()
        pfile = tables["patients"].filename
        if not pid:
            yield RejectedRecord(
                self.error("patient row has no Id", Location(file=pfile, line=prow.line, column="Id")),
                prow.raw.encode(),
            )
            return
        # the input hash covers every row of this patient, so it changes when any of them does
        raw_rows = [prow.raw] + [r.raw for name in sorted(rows) for r in rows[name]]
        input_sha = sha256_hex("".join(raw_rows).encode("utf-8"))
        b = BundleBuilder(
            adapter_name=self.name,
            adapter_version=self.version,
            source=source,
            input_sha256=input_sha,
            record_key=pid,
        )
        try:
            pref = b.add(self._patient_resource(prow.values, source), source.mrn_system_uri, pid)
        except RowError as exc:
            yield RejectedRecord(
                self.error(str(exc), Location(file=pfile, line=prow.line, column=exc.column)),
                prow.raw.encode(),
            )
            return
        conv = _PatientConverter(self, b, pref, pid, lookups)
        for name in PATIENT_FILES:
            t = tables.get(name)
            for r in rows.get(name, ()):
                try:
                    conv.row(name, r.values)
                except RowError as exc:
                    assert t is not None
                    yield RejectedRecord(
                        self.error(str(exc), Location(file=t.filename, line=r.line, column=exc.column)),
                        r.raw.encode("utf-8"),
                        f"{pid}:{name}:{r.line}",
                    )
        conv.finish()
        if skipped:
            b.warn("file-not-converted", f"not converted: {', '.join(f'{s}.csv' for s in skipped)}")
        try:
            yield b.build(
                routing_key=f"{source.mrn_system_uri}|{pid}",
                message_id=pid,
                location=Location(file=pfile, line=prow.line),
            )
        except ValidationFailed as exc:
            yield RejectedRecord(
                self.error(str(exc), Location(file=pfile, line=prow.line)), prow.raw.encode(), pid
            )

    def _patient_resource(self, v: dict[str, str], source: SourceInfo) -> dict[str, Any]:
        pid = v["Id"].strip()
        res: dict[str, Any] = {"resourceType": "Patient"}
        ident = [
            {"system": SYNTHEA_SYSTEM, "value": pid},
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
                },
                "system": source.mrn_system_uri,
                "value": pid,
            },
        ]
        for col, code, system in (
            ("SSN", "SS", "http://hl7.org/fhir/sid/us-ssn"),
            ("DRIVERS", "DL", "urn:oid:2.16.840.1.113883.4.3.25"),
            ("PASSPORT", "PPN", "http://hl7.org/fhir/sid/passport-USA"),
        ):
            val = (v.get(col) or "").strip()
            if val:
                ident.append(
                    {
                        "type": {
                            "coding": [
                                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": code}
                            ]
                        },
                        "system": system,
                        "value": val,
                    }
                )
        res["identifier"] = ident
        name: dict[str, Any] = {"use": "official"}
        given = [x for x in ((v.get("FIRST") or "").strip(), (v.get("MIDDLE") or "").strip()) if x]
        if (v.get("LAST") or "").strip():
            name["family"] = v["LAST"].strip()
        if given:
            name["given"] = given
        if (v.get("PREFIX") or "").strip():
            name["prefix"] = [v["PREFIX"].strip()]
        if (v.get("SUFFIX") or "").strip():
            name["suffix"] = [v["SUFFIX"].strip()]
        names = [name] if len(name) > 1 else []
        if (v.get("MAIDEN") or "").strip():
            names.append(
                {"use": "maiden", "family": v["MAIDEN"].strip(), **({"given": given} if given else {})}
            )
        if names:
            res["name"] = names
        g = (v.get("GENDER") or "").strip().upper()
        if g:
            res["gender"] = {"M": "male", "F": "female"}.get(g, "unknown")
        bd = dt(v.get("BIRTHDATE"), "BIRTHDATE", required=True)
        res["birthDate"] = (bd or "")[:10]
        dd = dt(v.get("DEATHDATE"), "DEATHDATE")
        if dd:
            res["deceasedDateTime"] = dd
        ms = (v.get("MARITAL") or "").strip().upper()
        if ms in _MARITAL:
            res["maritalStatus"] = {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                        "code": ms,
                        "display": _MARITAL[ms],
                    }
                ],
                "text": _MARITAL[ms],
            }
        addr: dict[str, Any] = {}
        if (v.get("ADDRESS") or "").strip():
            addr["line"] = [v["ADDRESS"].strip()]
        for col, key in (("CITY", "city"), ("STATE", "state"), ("COUNTY", "district"), ("ZIP", "postalCode")):
            if (v.get(col) or "").strip():
                addr[key] = v[col].strip()
        lat, lon = number(v.get("LAT") or ""), number(v.get("LON") or "")
        if addr:
            addr["country"] = "US"
            if lat is not None and lon is not None:
                addr["extension"] = [
                    {
                        "url": "http://hl7.org/fhir/StructureDefinition/geolocation",
                        "extension": [
                            {"url": "latitude", "valueDecimal": lat},
                            {"url": "longitude", "valueDecimal": lon},
                        ],
                    }
                ]
            res["address"] = [addr]
        exts: list[dict[str, Any]] = []
        for table, column, build in (
            (_RACE, "RACE", race_extension),
            (_ETHNICITY, "ETHNICITY", ethnicity_extension),
        ):
            found = table.get((v.get(column) or "").strip().lower())
            ext = build(
                [{"system": CDC_RACE_ETHNICITY, "code": found[0], "display": found[1]}] if found else []
            )
            if ext:
                exts.append(ext)
        if g in ("M", "F"):
            exts.append(
                {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": g}
            )
        bp = (v.get("BIRTHPLACE") or "").strip()
        if bp:
            exts.append(
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                    "valueAddress": {"text": " ".join(bp.split())},
                }
            )
        if exts:
            res["extension"] = exts
        return res


class _PatientConverter:
    """Converts the rows of one patient into resources on the builder."""

    def __init__(
        self,
        adapter: SyntheaCsvAdapter,
        b: BundleBuilder,
        pref: str,
        pid: str,
        lookups: dict[str, dict[str, Row]],
    ) -> None:
        self.a = adapter
        self.b = b
        self.pref = pref
        self.pid = pid
        self.lookups = lookups
        self.seen: dict[tuple[str, ...], int] = defaultdict(int)
        self.imaging: dict[str, dict[str, Any]] = {}
        self.enc_refs: list[tuple[dict[str, Any], str]] = []

    def key(self, *parts: str) -> tuple[str, ...]:
        """A content key for rows without an Id; repeated identical rows get an occurrence number."""
        k = tuple(parts)
        self.seen[k] += 1
        return (*k, str(self.seen[k]))

    def enc_ref(self, v: dict[str, str]) -> dict[str, Any] | None:
        eid = (v.get("ENCOUNTER") or "").strip()
        if not eid:
            return None
        ref = {"reference": self.b.ref("Encounter", "synthea", eid)}
        self.enc_refs.append((ref, eid))
        return ref

    def org(self, oid: str) -> str | None:
        oid = oid.strip()
        if not oid:
            return None
        row = self.lookups["organizations"].get(oid)
        res: dict[str, Any] = {
            "resourceType": "Organization",
            "identifier": [{"system": SYNTHEA_SYSTEM, "value": oid}],
            "active": True,
        }
        if row is not None:
            v = row.values
            if v.get("NAME"):
                res["name"] = v["NAME"].strip()
            addr: dict[str, Any] = {
                k2: v[k1].strip()
                for k1, k2 in (("CITY", "city"), ("STATE", "state"), ("ZIP", "postalCode"))
                if (v.get(k1) or "").strip()
            }
            if (v.get("ADDRESS") or "").strip():
                addr["line"] = [v["ADDRESS"].strip()]
            if addr:
                res["address"] = [addr]
            if (v.get("PHONE") or "").strip():
                res["telecom"] = [{"system": "phone", "value": v["PHONE"].strip()}]
            if (v.get("NPI") or "").strip():
                res["identifier"].append(
                    {"system": "http://hl7.org/fhir/sid/us-npi", "value": v["NPI"].strip()}
                )
        else:
            self.b.warn("unknown-organization", f"organization {oid} is not in organizations.csv")
        return self.b.add(res, "synthea", oid)

    def provider(self, prid: str) -> str | None:
        prid = prid.strip()
        if not prid:
            return None
        row = self.lookups["providers"].get(prid)
        res: dict[str, Any] = {
            "resourceType": "Practitioner",
            "identifier": [{"system": SYNTHEA_SYSTEM, "value": prid}],
            "active": True,
        }
        if row is not None:
            v = row.values
            nm = " ".join((v.get("NAME") or "").split())
            if nm:
                parts = nm.split(" ")
                res["name"] = [
                    {"text": nm, "family": parts[-1], **({"given": parts[:-1]} if len(parts) > 1 else {})}
                ]
            g = (v.get("GENDER") or "").strip().upper()
            if g in ("M", "F"):
                res["gender"] = "male" if g == "M" else "female"
            if (v.get("NPI") or "").strip():
                res["identifier"].append(
                    {"system": "http://hl7.org/fhir/sid/us-npi", "value": v["NPI"].strip()}
                )
            if (v.get("ORGANIZATION") or "").strip():
                self.org(v["ORGANIZATION"])
        else:
            self.b.warn("unknown-provider", f"provider {prid} is not in providers.csv")
        return self.b.add(res, "synthea", prid)

    def code_system(self, v: dict[str, str], default: str) -> str:
        s = (v.get("SYSTEM") or "").strip()
        if not s:
            return default
        return name_to_uri(s) or default

    def row(self, name: str, v: dict[str, str]) -> None:
        getattr(self, f"_{name}")(v)

    # -- one method per file ----------------------------------------------------------------------
    def _encounters(self, v: dict[str, str]) -> None:
        eid = (v.get("Id") or "").strip()
        if not eid:
            raise RowError("Id", "encounter has no Id")
        start = dt(v.get("START"), "START", required=True)
        stop = dt(v.get("STOP"), "STOP")
        ec = (v.get("ENCOUNTERCLASS") or "").strip().lower()
        code = _ENC_CLASS.get(ec, "AMB")
        if ec and ec not in _ENC_CLASS:
            self.b.warn("unknown-encounter-class", f"ENCOUNTERCLASS {ec!r} mapped to AMB")
        res: dict[str, Any] = {
            "resourceType": "Encounter",
            "identifier": [{"system": SYNTHEA_SYSTEM, "value": eid}],
            "status": "finished",
            "class": encounter_class(code),
            "subject": {"reference": self.pref},
            "period": {"start": start, **({"end": stop} if stop else {})},
        }
        t = cc(SNOMED, v.get("CODE"), v.get("DESCRIPTION"))
        if t:
            res["type"] = [t]
        r = cc(SNOMED, v.get("REASONCODE"), v.get("REASONDESCRIPTION"))
        if r:
            res["reasonCode"] = [r]
        prov = self.provider(v.get("PROVIDER") or "")
        if prov:
            res["participant"] = [{"individual": {"reference": prov}}]
        org = self.org(v.get("ORGANIZATION") or "")
        if org:
            res["serviceProvider"] = {"reference": org}
        self.b.add(res, "synthea", eid)

    def _conditions(self, v: dict[str, str]) -> None:
        start = dt(v.get("START"), "START", required=True)
        stop = dt(v.get("STOP"), "STOP")
        code = cc(self.code_system(v, SNOMED), v.get("CODE"), v.get("DESCRIPTION"))
        if code is None:
            raise RowError("CODE", "condition has no CODE or DESCRIPTION")
        res: dict[str, Any] = {
            "resourceType": "Condition",
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "resolved" if stop else "active",
                    }
                ]
            },
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": "confirmed",
                    }
                ]
            },
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                            "code": "encounter-diagnosis",
                            "display": "Encounter Diagnosis",
                        }
                    ]
                }
            ],
            "code": code,
            "subject": {"reference": self.pref},
            "onsetDateTime": start,
            "recordedDate": start,
        }
        if stop:
            res["abatementDateTime"] = stop
        enc = self.enc_ref(v)
        if enc:
            res["encounter"] = enc
        self.b.add(
            res, *self.key("condition", self.pid, v.get("ENCOUNTER", ""), v.get("CODE", ""), start or "")
        )

    def _observations(self, v: dict[str, str]) -> None:
        date = dt(v.get("DATE"), "DATE", required=True)
        code = cc(LOINC, v.get("CODE"), v.get("DESCRIPTION"))
        if code is None:
            raise RowError("CODE", "observation has no CODE")
        res: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final",
            "code": code,
            "subject": {"reference": self.pref},
            "effectiveDateTime": date,
        }
        cat = (v.get("CATEGORY") or "").strip()
        if cat:
            res["category"] = [
                {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": cat}
                    ]
                }
            ]
        value = (v.get("VALUE") or "").strip()
        typ = (v.get("TYPE") or "").strip().lower()
        units = (v.get("UNITS") or "").strip()
        if value:
            n = number(value) if typ == "numeric" else None
            if typ == "numeric" and n is None:
                raise RowError("VALUE", f"numeric observation VALUE {value!r} is not a number")
            if n is not None:
                q: dict[str, Any] = {"value": n}
                if units:
                    q.update(unit=units, system=UCUM, code=units)
                res["valueQuantity"] = q
            else:
                res["valueString"] = value
        else:
            res["dataAbsentReason"] = {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}
                ]
            }
        enc = self.enc_ref(v)
        if enc:
            res["encounter"] = enc
        self.b.add(res, *self.key("obs", self.pid, v.get("ENCOUNTER", ""), v.get("CODE", ""), date or ""))

    def _medications(self, v: dict[str, str]) -> None:
        start = dt(v.get("START"), "START", required=True)
        stop = dt(v.get("STOP"), "STOP")
        code = cc(RXNORM, v.get("CODE"), v.get("DESCRIPTION"))
        if code is None:
            raise RowError("CODE", "medication has no CODE")
        res: dict[str, Any] = {
            "resourceType": "MedicationRequest",
            "status": "stopped" if stop else "active",
            "intent": "order",
            "medicationCodeableConcept": code,
            "subject": {"reference": self.pref},
            "authoredOn": start,
        }
        r = cc(SNOMED, v.get("REASONCODE"), v.get("REASONDESCRIPTION"))
        if r:
            res["reasonCode"] = [r]
        disp = number((v.get("DISPENSES") or "").strip())
        if isinstance(disp, int) and disp > 0:
            res["dispenseRequest"] = {"numberOfRepeatsAllowed": disp - 1}
        if stop:
            res["dosageInstruction"] = [
                {"timing": {"repeat": {"boundsPeriod": {"start": start, "end": stop}}}}
            ]
        enc = self.enc_ref(v)
        if enc:
            res["encounter"] = enc
        self.b.add(res, *self.key("med", self.pid, v.get("ENCOUNTER", ""), v.get("CODE", ""), start or ""))

    def _procedures(self, v: dict[str, str]) -> None:
        start = dt(
            v.get("START") if "START" in v else v.get("DATE"),
            "START" if "START" in v else "DATE",
            required=True,
        )
        stop = dt(v.get("STOP"), "STOP")
        code = cc(self.code_system(v, SNOMED), v.get("CODE"), v.get("DESCRIPTION"))
        if code is None:
            raise RowError("CODE", "procedure has no CODE")
        res: dict[str, Any] = {
            "resourceType": "Procedure",
            "status": "completed",
            "code": code,
            "subject": {"reference": self.pref},
        }
        if stop:
            res["performedPeriod"] = {"start": start, "end": stop}
        else:
            res["performedDateTime"] = start
        r = cc(SNOMED, v.get("REASONCODE"), v.get("REASONDESCRIPTION"))
        if r:
            res["reasonCode"] = [r]
        enc = self.enc_ref(v)
        if enc:
            res["encounter"] = enc
        self.b.add(res, *self.key("proc", self.pid, v.get("ENCOUNTER", ""), v.get("CODE", ""), start or ""))

    def _immunizations(self, v: dict[str, str]) -> None:
        date = dt(v.get("DATE"), "DATE", required=True)
        code = cc(CVX, v.get("CODE"), v.get("DESCRIPTION"))
        if code is None:
            raise RowError("CODE", "immunization has no CODE")
        res: dict[str, Any] = {
            "resourceType": "Immunization",
            "status": "completed",
            "vaccineCode": code,
            "patient": {"reference": self.pref},
            "occurrenceDateTime": date,
            "primarySource": True,
        }
        enc = self.enc_ref(v)
        if enc:
            res["encounter"] = enc
        self.b.add(res, *self.key("imm", self.pid, v.get("ENCOUNTER", ""), v.get("CODE", ""), date or ""))

    def _allergies(self, v: dict[str, str]) -> None:
        start = dt(v.get("START"), "START", required=True)
        stop = dt(v.get("STOP"), "STOP")
        system = self.code_system(v, SNOMED)
        code = cc(system, v.get("CODE"), v.get("DESCRIPTION"))
        if code is None:
            raise RowError("CODE", "allergy has no CODE")
        res: dict[str, Any] = {
            "resourceType": "AllergyIntolerance",
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                        "code": "inactive" if stop else "active",
                    }
                ]
            },
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                        "code": "confirmed",
                    }
                ]
            },
            "code": code,
            "patient": {"reference": self.pref},
            "recordedDate": start,
            "onsetDateTime": start,
        }
        typ = (v.get("TYPE") or "").strip().lower()
        if typ in ("allergy", "intolerance"):
            res["type"] = typ
        cat = (v.get("CATEGORY") or "").strip().lower()
        if cat in ("food", "medication", "environment", "biologic"):
            res["category"] = [cat]
        reactions = []
        for i in ("1", "2"):
            m = cc(SNOMED, v.get(f"REACTION{i}"), v.get(f"DESCRIPTION{i}"))
            if m:
                r: dict[str, Any] = {"manifestation": [m]}
                sev = (v.get(f"SEVERITY{i}") or "").strip().lower()
                if sev in ("mild", "moderate", "severe"):
                    r["severity"] = sev
                reactions.append(r)
        if reactions:
            res["reaction"] = reactions
        enc = self.enc_ref(v)
        if enc:
            res["encounter"] = enc
        self.b.add(res, *self.key("allergy", self.pid, v.get("CODE", ""), start or ""))

    def _careplans(self, v: dict[str, str]) -> None:
        start = dt(v.get("START"), "START", required=True)
        stop = dt(v.get("STOP"), "STOP")
        cid = (v.get("Id") or "").strip()
        res: dict[str, Any] = {
            "resourceType": "CarePlan",
            "status": "completed" if stop else "active",
            "intent": "order",
            "subject": {"reference": self.pref},
            "period": {"start": start, **({"end": stop} if stop else {})},
        }
        if cid:
            res["identifier"] = [{"system": SYNTHEA_SYSTEM, "value": cid}]
        cat = cc(SNOMED, v.get("CODE"), v.get("DESCRIPTION"))
        if cat:
            res["category"] = [cat]
        reason = cc(SNOMED, v.get("REASONCODE"), v.get("REASONDESCRIPTION"))
        if reason:
            res["activity"] = [
                {
                    "detail": {
                        "status": "completed" if stop else "in-progress",
                        "reasonCode": [reason],
                        **({"code": cat} if cat else {}),
                    }
                }
            ]
        enc = self.enc_ref(v)
        if enc:
            res["encounter"] = enc
        key = ("synthea", cid) if cid else self.key("careplan", self.pid, v.get("CODE", ""), start or "")
        self.b.add(res, *key)

    def _devices(self, v: dict[str, str]) -> None:
        start = dt(v.get("START"), "START", required=True)
        stop = dt(v.get("STOP"), "STOP")
        code = cc(SNOMED, v.get("CODE"), v.get("DESCRIPTION"))
        if code is None:
            raise RowError("CODE", "device has no CODE")
        res: dict[str, Any] = {
            "resourceType": "Device",
            "type": code,
            "patient": {"reference": self.pref},
            "status": "inactive" if stop else "active",
        }
        udi = (v.get("UDI") or "").strip()
        if udi:
            res["udiCarrier"] = [{"carrierHRF": udi}]
        res["manufactureDate"] = start
        self.b.add(res, *self.key("device", self.pid, v.get("CODE", ""), start or "", udi))

    def _supplies(self, v: dict[str, str]) -> None:
        date = dt(v.get("DATE"), "DATE", required=True)
        code = cc(SNOMED, v.get("CODE"), v.get("DESCRIPTION"))
        if code is None:
            raise RowError("CODE", "supply has no CODE")
        res: dict[str, Any] = {
            "resourceType": "SupplyDelivery",
            "status": "completed",
            "patient": {"reference": self.pref},
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/supply-item-type", "code": "device"}
                ]
            },
            "suppliedItem": {"itemCodeableConcept": code},
            "occurrenceDateTime": date,
        }
        qty = number((v.get("QUANTITY") or "").strip())
        if qty is not None:
            res["suppliedItem"]["quantity"] = {"value": qty}
        self.b.add(res, *self.key("supply", self.pid, v.get("ENCOUNTER", ""), v.get("CODE", ""), date or ""))

    def _imaging_studies(self, v: dict[str, str]) -> None:
        sid = (v.get("Id") or "").strip()
        date = dt(v.get("DATE"), "DATE", required=True)
        suid = (v.get("SERIES_UID") or "").strip()
        if not sid or not suid:
            raise RowError("Id" if not sid else "SERIES_UID", "imaging study row needs Id and SERIES_UID")
        study = self.imaging.get(sid)
        if study is None:
            study = {
                "resourceType": "ImagingStudy",
                "identifier": [{"system": SYNTHEA_SYSTEM, "value": sid}],
                "status": "available",
                "subject": {"reference": self.pref},
                "started": date,
                "series": [],
            }
            enc = self.enc_ref(v)
            if enc:
                study["encounter"] = enc
            pc = cc(SNOMED, v.get("PROCEDURE_CODE"), None)
            if pc:
                study["procedureCode"] = [pc]
            self.imaging[sid] = study
        series = next((s for s in study["series"] if s["uid"] == suid), None)
        if series is None:
            series = {
                "uid": suid,
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": (v.get("MODALITY_CODE") or "OT").strip() or "OT",
                },
            }
            if (v.get("MODALITY_DESCRIPTION") or "").strip():
                series["modality"]["display"] = v["MODALITY_DESCRIPTION"].strip()
            if (v.get("BODYSITE_CODE") or "").strip():
                series["bodySite"] = {
                    "system": SNOMED,
                    "code": v["BODYSITE_CODE"].strip(),
                    **(
                        {"display": v["BODYSITE_DESCRIPTION"].strip()}
                        if (v.get("BODYSITE_DESCRIPTION") or "").strip()
                        else {}
                    ),
                }
            study["series"].append(series)
        iuid = (v.get("INSTANCE_UID") or "").strip()
        if iuid:
            series.setdefault("instance", []).append(
                {
                    "uid": iuid,
                    "sopClass": {
                        "system": "urn:ietf:rfc:3986",
                        "code": f"urn:oid:{(v.get('SOP_CODE') or '').strip()}",
                    },
                }
            )

    def _payer_transitions(self, v: dict[str, str]) -> None:
        payer = (v.get("PAYER") or "").strip()
        if not payer:
            raise RowError("PAYER", "payer transition has no PAYER")
        start_col = "START_DATE" if "START_DATE" in v else "START_YEAR"
        end_col = "END_DATE" if "END_DATE" in v else "END_YEAR"
        start = dt(v.get(start_col), start_col)
        end = dt(v.get(end_col), end_col)
        prow = self.lookups["payers"].get(payer)
        org: dict[str, Any] = {
            "resourceType": "Organization",
            "identifier": [{"system": SYNTHEA_SYSTEM, "value": payer}],
            "type": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                            "code": "pay",
                            "display": "Payer",
                        }
                    ]
                }
            ],
        }
        if prow is not None and (prow.values.get("NAME") or "").strip():
            org["name"] = prow.values["NAME"].strip()
        oref = self.b.add(org, "synthea", payer)
        res: dict[str, Any] = {
            "resourceType": "Coverage",
            "status": "active",
            "beneficiary": {"reference": self.pref},
            "payor": [{"reference": oref}],
        }
        member = (v.get("MEMBERID") or "").strip()
        if member:
            res["subscriberId"] = member
        if start or end:
            res["period"] = {**({"start": start} if start else {}), **({"end": end} if end else {})}
        own = (v.get("PLAN_OWNERSHIP") or v.get("OWNERSHIP") or "").strip().lower()
        rel = {"self": "self", "spouse": "spouse", "guardian": "other"}.get(own)
        if rel:
            res["relationship"] = {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship", "code": rel}
                ]
            }
        self.b.add(res, *self.key("coverage", self.pid, payer, start or ""))

    def finish(self) -> None:
        """Add the imaging studies; turn references to encounters missing from encounters.csv into
        logical references (by Synthea id), so every literal reference resolves inside the bundle."""
        missing: set[str] = set()
        for ref, eid in self.enc_refs:
            if not self.b.has(ref["reference"]):
                del ref["reference"]
                ref["type"] = "Encounter"
                ref["identifier"] = {"system": SYNTHEA_SYSTEM, "value": eid}
                missing.add(eid)
        for eid in sorted(missing):
            self.b.warn(
                "unknown-encounter", f"ENCOUNTER {eid} is not in encounters.csv; referenced by identifier"
            )
        for sid, study in self.imaging.items():
            study["numberOfSeries"] = len(study["series"])
            study["numberOfInstances"] = sum(len(s.get("instance", [])) for s in study["series"])
            self.b.add(study, "synthea", sid)
