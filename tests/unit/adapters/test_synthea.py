"""Synthea CSV adapter: both layouts, zip input, located bad rows, and a cross-check with Synthea's FHIR."""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.base import ConvertedBundle, RejectedRecord, SourceInfo
from adapters.synthea import SyntheaCsvAdapter

SRC = SourceInfo("synth")
P1 = "11111111-1111-1111-1111-111111111111"
E1 = "eeeeeeee-0000-0000-0000-000000000001"

CURRENT = {
    "patients.csv": (
        "Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,MIDDLE,LAST,SUFFIX,MAIDEN,MARITAL,RACE,ETHNICITY,"
        "GENDER,BIRTHPLACE,ADDRESS,CITY,STATE,COUNTY,FIPS,ZIP,LAT,LON,HEALTHCARE_EXPENSES,HEALTHCARE_COVERAGE,INCOME\n"
        f"{P1},1980-02-29,,999-12-3456,S999,,Mr.,Ann,Marie,Smith,,,M,asian,nonhispanic,F,Boston MA US,"
        "1 Main St,Boston,Massachusetts,Suffolk County,25025,02101,42.1,-71.0,100.5,20.0,50000\n"
    ),
    "encounters.csv": (
        "Id,START,STOP,PATIENT,ORGANIZATION,PROVIDER,PAYER,ENCOUNTERCLASS,CODE,DESCRIPTION,BASE_ENCOUNTER_COST,"
        "TOTAL_CLAIM_COST,PAYER_COVERAGE,REASONCODE,REASONDESCRIPTION\n"
        f"{E1},2020-01-01T10:00:00Z,2020-01-01T10:30:00Z,{P1},org-1,prov-1,pay-1,emergency,50849002,"
        "Emergency visit,100,100,0,,\n"
    ),
    "conditions.csv": (
        "START,STOP,PATIENT,ENCOUNTER,SYSTEM,CODE,DESCRIPTION\n"
        f"2020-01-01,,{P1},{E1},SNOMED-CT,44054006,Diabetes\n"
        f"2020-01-01,2020-02-01,{P1},{E1},SNOMED-CT,10509002,Acute bronchitis\n"
    ),
    "observations.csv": (
        "DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE\n"
        f"2020-01-01T10:00:00Z,{P1},{E1},vital-signs,8302-2,Body Height,170.5,cm,numeric\n"
        f"2020-01-01T10:00:00Z,{P1},{E1},survey,72166-2,Tobacco smoking status,Never smoked,,text\n"
        f"2020-01-01T10:00:00Z,{P1},{E1},laboratory,2339-0,Glucose,not-a-number,mg/dL,numeric\n"
        f"2020-01-01T10:00:00Z,{P1},{E1},laboratory,2339-0,Glucose,extra,mg/dL,numeric,oops\n"
        "2020-01-01T10:00:00Z,22222222-2222-2222-2222-222222222222,,laboratory,2339-0,Glucose,5,mg/dL,numeric\n"
    ),
    "procedures.csv": (
        "START,STOP,PATIENT,ENCOUNTER,SYSTEM,CODE,DESCRIPTION,BASE_COST,REASONCODE,REASONDESCRIPTION\n"
        f"2020-01-01T10:00:00Z,2020-01-01T10:15:00Z,{P1},{E1},SNOMED-CT,430193006,Med reconciliation,10,,\n"
        f"2020-13-01T10:00:00Z,,{P1},{E1},SNOMED-CT,430193006,Bad date,10,,\n"
    ),
    "allergies.csv": (
        "START,STOP,PATIENT,ENCOUNTER,CODE,SYSTEM,DESCRIPTION,TYPE,CATEGORY,REACTION1,DESCRIPTION1,SEVERITY1,"
        "REACTION2,DESCRIPTION2,SEVERITY2\n"
        f"2020-01-01,,{P1},{E1},7980,RxNorm,Penicillin,allergy,medication,247472004,Hives,MILD,,,\n"
    ),
    "organizations.csv": "Id,NAME,ADDRESS,CITY,STATE,ZIP,LAT,LON,PHONE,REVENUE,UTILIZATION,NPI\n"
    "org-1,General Hospital,2 Way,Boston,MA,02101,0,0,555-1234,0,1,1234567893\n",
    "providers.csv": "Id,ORGANIZATION,NAME,GENDER,SPECIALITY,ADDRESS,CITY,STATE,ZIP,LAT,LON,ENCOUNTERS,PROCEDURES,NPI\n"
    "prov-1,org-1,Greg House,M,GENERAL PRACTICE,2 Way,Boston,MA,02101,0,0,1,1,9999999991\n",
    "payer_transitions.csv": "PATIENT,MEMBERID,START_DATE,END_DATE,PAYER,SECONDARY_PAYER,PLAN_OWNERSHIP,OWNER_NAME\n"
    f"{P1},m-1,2020-01-01T00:00:00Z,2021-01-01T00:00:00Z,pay-1,,Self,Ann Smith\n",
    "payers.csv": "Id,NAME,OWNERSHIP,ADDRESS\npay-1,Acme Health,PRIVATE,1 Road\n",
    "claims.csv": "Id,PATIENTID\nc1," + P1 + "\n",
}


def write(tmp: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    return tmp


def of(out: ConvertedBundle, rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_current_layout_with_bad_rows_located(tmp_path: Path) -> None:
    outs = list(SyntheaCsvAdapter().convert_path(write(tmp_path, CURRENT), SRC))
    bundles = [o for o in outs if isinstance(o, ConvertedBundle)]
    rejected = [o for o in outs if isinstance(o, RejectedRecord)]
    assert len(bundles) == 1
    where = sorted(
        (Path(r.error.location.file or "").name, r.error.location.line, r.error.location.column)
        for r in rejected
    )
    assert where == [
        ("observations.csv", 4, "VALUE"),
        ("observations.csv", 5, None),
        ("observations.csv", 6, "PATIENT"),
        ("procedures.csv", 3, "START"),
    ]
    assert all(r.raw for r in rejected)
    out = bundles[0]
    [pat] = of(out, "Patient")
    assert pat["name"][0]["given"] == ["Ann", "Marie"] and pat["birthDate"] == "1980-02-29"
    assert out.routing_key == f"urn:fhirbridge:synth:mrn|{P1}"
    [enc] = of(out, "Encounter")
    assert enc["class"]["code"] == "EMER"
    prac = of(out, "Practitioner")[0]
    assert enc["participant"][0]["individual"]["reference"] == f"Practitioner/{prac['id']}"
    assert {"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999999991"} in prac["identifier"]
    conds = of(out, "Condition")
    assert {c["clinicalStatus"]["coding"][0]["code"] for c in conds} == {"active", "resolved"}
    assert all(c["encounter"]["reference"] == f"Encounter/{enc['id']}" for c in conds)
    obs = {o["code"]["coding"][0]["code"]: o for o in of(out, "Observation")}
    assert obs["8302-2"]["valueQuantity"]["value"] == 170.5
    assert obs["72166-2"]["valueString"] == "Never smoked"
    [alg] = of(out, "AllergyIntolerance")
    assert alg["code"]["coding"][0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
    assert alg["reaction"][0]["severity"] == "mild"
    [cov] = of(out, "Coverage")
    payer = next(o for o in of(out, "Organization") if o.get("name") == "Acme Health")
    assert cov["payor"][0]["reference"] == f"Organization/{payer['id']}"
    assert any(w.code == "file-not-converted" and "claims.csv" in w.message for w in out.warnings)


def test_unknown_encounter_becomes_logical_reference(tmp_path: Path) -> None:
    files = dict(CURRENT)
    files["immunizations.csv"] = (
        "DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,BASE_COST\n"
        f"2020-01-01T10:00:00Z,{P1},ghost-encounter,140,Influenza,136.00\n"
    )
    outs = list(SyntheaCsvAdapter().convert_path(write(tmp_path, files), SRC))
    [out] = [o for o in outs if isinstance(o, ConvertedBundle)]
    [imm] = of(out, "Immunization")
    assert imm["encounter"] == {
        "type": "Encounter",
        "identifier": {"system": "https://github.com/synthetichealth/synthea", "value": "ghost-encounter"},
    }
    assert any(w.code == "unknown-encounter" for w in out.warnings)


def test_zip_equals_directory(tmp_path: Path) -> None:
    d = write(tmp_path, CURRENT)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in CURRENT.items():
            zf.writestr(f"export/{name}", text)
    from_dir = [o.body for o in SyntheaCsvAdapter().convert_path(d, SRC) if isinstance(o, ConvertedBundle)]
    from_zip = [
        o.body
        for o in SyntheaCsvAdapter().convert(buf.getvalue(), SRC, filename="x.zip")
        if isinstance(o, ConvertedBundle)
    ]
    assert from_dir == from_zip and len(from_dir) == 1


def test_not_an_export(tmp_path: Path) -> None:
    [out] = list(SyntheaCsvAdapter().convert(b"not a zip", SRC, filename="x"))
    assert isinstance(out, RejectedRecord) and "zip" in out.error.message
    [out] = list(SyntheaCsvAdapter().convert_path(tmp_path, SRC))
    assert isinstance(out, RejectedRecord) and "patients.csv" in out.error.message
    (tmp_path / "patients.csv").write_text("")
    [out] = list(SyntheaCsvAdapter().convert_path(tmp_path, SRC))
    assert isinstance(out, RejectedRecord) and "empty" in out.error.message


# -- the shared sample (older 2022 layout) and Synthea's own FHIR for the same run ---------------------
def _utc(v: str) -> str:
    """Instants in UTC; Synthea's CSV has plain dates for conditions, its FHIR local date-times, so
    those compare at day precision (the CSV date is the UTC day)."""
    if len(v) == 10:
        return v
    return datetime.fromisoformat(v.replace("Z", "+00:00")).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _key(r: dict[str, Any]) -> tuple[str, str]:
    rt = r["resourceType"]
    code = {
        "Encounter": lambda: r["type"][0],
        "Immunization": lambda: r["vaccineCode"],
        "MedicationRequest": lambda: r["medicationCodeableConcept"],
        "CarePlan": lambda: r["category"][-1],
    }.get(rt, lambda: r["code"])()["coding"][0]["code"]
    when = {
        "Encounter": lambda: r["period"]["start"],
        "Condition": lambda: r["onsetDateTime"],
        "Immunization": lambda: r["occurrenceDateTime"],
        "MedicationRequest": lambda: r["authoredOn"],
        "CarePlan": lambda: r["period"]["start"],
        "Procedure": lambda: r.get("performedPeriod", {}).get("start") or r["performedDateTime"],
        "Observation": lambda: r["effectiveDateTime"],
    }[rt]()
    return code, _utc(when)


def _day(k: tuple[str, str]) -> tuple[str, date]:
    return k[0], date.fromisoformat(k[1][:10])


def test_sample_export_cross_checked_with_synthea_fhir(samples: Path) -> None:
    outs = list(SyntheaCsvAdapter().convert_path(samples / "synthea" / "csv", SRC))
    assert not [o for o in outs if isinstance(o, RejectedRecord)]
    bundles = {o.message_id: o for o in outs if isinstance(o, ConvertedBundle)}
    assert len(bundles) == 3
    for f in sorted((samples / "synthea" / "fhir").glob("*_*-*.json")):
        theirs = [e["resource"] for e in json.loads(f.read_bytes())["entry"]]
        pid = next(r["id"] for r in theirs if r["resourceType"] == "Patient")
        ours = [e["resource"] for e in bundles[pid].bundle["entry"]]
        t_pat = next(r for r in theirs if r["resourceType"] == "Patient")
        o_pat = next(r for r in ours if r["resourceType"] == "Patient")
        for k in ("birthDate", "gender"):
            assert o_pat[k] == t_pat[k]
        assert o_pat["name"][0]["family"] == t_pat["name"][0]["family"]
        assert o_pat["name"][0]["given"] == t_pat["name"][0]["given"]
        for rt in ("Encounter", "Condition", "Procedure", "Immunization", "MedicationRequest", "CarePlan"):
            if rt in ("Condition", "CarePlan"):  # day precision in the CSV: allow the UTC/local day shift
                t_days = sorted(_day(_key(r)) for r in theirs if r["resourceType"] == rt)
                o_days = sorted(_day(_key(r)) for r in ours if r["resourceType"] == rt)
                assert [c for c, _ in o_days] == [c for c, _ in t_days], (f.name, rt)
                assert all(abs((a - b).days) <= 1 for (_, a), (_, b) in zip(o_days, t_days, strict=True))
                continue
            t = Counter(_key(r) for r in theirs if r["resourceType"] == rt)
            o = Counter(_key(r) for r in ours if r["resourceType"] == rt)
            assert o == t, (f.name, rt)
        # Synthea's FHIR folds panels (blood pressure, surveys) into components; every one of its
        # observation and component codes, at the same instant, must be among ours.
        t_obs: set[tuple[str, str]] = set()
        for r in theirs:
            if r["resourceType"] == "Observation":
                code, when = _key(r)
                if not r.get("component"):  # a panel's own code is not a CSV row; its components are
                    t_obs.add((code, when))
                for c in r.get("component", []):
                    t_obs.add((c["code"]["coding"][0]["code"], when))
        o_obs = {_key(r) for r in ours if r["resourceType"] == "Observation"}
        missing = {k for k in t_obs if k not in o_obs}
        assert not missing, (f.name, sorted(missing)[:5])


@pytest.mark.parametrize("bad", ["max_bytes=x", "colour=1"])
def test_bad_options(bad: str) -> None:
    from adapters.errors import AdapterError

    k, v = bad.split("=")
    with pytest.raises(AdapterError):
        SyntheaCsvAdapter(**{k: v})


def test_a_zip_with_two_files_for_one_table_is_refused(tmp_path: Path) -> None:
    """a/patients.csv and b/patients.csv in one zip are two exports: refused, not one read over the other."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for folder in ("a", "b"):
            for name, text in CURRENT.items():
                zf.writestr(f"{folder}/{name}", text)
    [out] = list(SyntheaCsvAdapter().convert(buf.getvalue(), SRC, filename="x.zip"))
    assert isinstance(out, RejectedRecord)
    assert "several files for the same table" in out.error.message and "a/patients.csv" in out.error.message


@pytest.mark.parametrize("start", ["2021-08-23T03:26Z", "2021-08-23T25:26:50Z", "2021-08-23T03:26:50+25:00"])
def test_an_impossible_encounter_time_rejects_that_row_only(tmp_path: Path, start: str) -> None:
    """The whole timestamp is checked, not only its date: an impossible time rejects its row, located in
    encounters.csv, and the patient's other rows still convert."""
    files = dict(CURRENT)
    files["encounters.csv"] = files["encounters.csv"].replace("2020-01-01T10:00:00Z", start, 1)
    outs = list(SyntheaCsvAdapter().convert_path(write(tmp_path, files), SRC))
    bad = [
        o
        for o in outs
        if isinstance(o, RejectedRecord) and str(o.error.location.file).endswith("encounters.csv")
    ]
    assert len(bad) == 1 and start in bad[0].error.message
    loc = bad[0].error.location
    assert loc.line == 2 and loc.column == "START"
    [out] = [
        o for o in outs if isinstance(o, ConvertedBundle)
    ]  # the patient and the other rows still convert
    assert of(out, "Patient") and not of(out, "Encounter")
