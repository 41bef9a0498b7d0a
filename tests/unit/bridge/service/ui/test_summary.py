"""The patient page's model, read from $everything pages: sources in delivery order, sections by type
and category, the banner, and what the API said it withheld."""

from __future__ import annotations

from typing import Any

from bridge.service.ui.summary import PROVENANCE_EXT, build_view, page_of, to_entry


def _prov(org: str, received: str) -> dict[str, Any]:
    return {
        "url": PROVENANCE_EXT,
        "extension": [
            {"url": "sourceOrg", "valueString": org},
            {"url": "bundleSha256", "valueString": "00"},
            {"url": "receivedAt", "valueInstant": received},
        ],
    }


def _entry(resource: dict[str, Any], *sources: tuple[str, str]) -> dict[str, Any]:
    return {"resource": resource, "search": {"mode": "match"}, "extension": [_prov(o, t) for o, t in sources]}


def _obs(oid: str, category: str | None, when: str) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "code": {"coding": [{"code": "x", "display": f"obs {oid}"}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": 5, "comparator": "<", "unit": "mmol/L"},
    }
    if category:
        obs["category"] = [{"coding": [{"code": category}]}]
    return obs


SUPPRESSED = {
    "resource": {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "suppressed", "details": {"text": "btg"}}],
    },
    "search": {"mode": "outcome"},
}


def test_the_first_delivery_is_the_source_and_the_others_also_reported() -> None:
    entry = _entry(
        {"resourceType": "Condition", "id": "c", "code": {"text": "Asthma"}},
        ("riverside", "2026-03-01T00:00:00Z"),
        ("st-mary", "2026-01-01T00:00:00Z"),
        ("riverside", "2026-04-01T00:00:00Z"),  # a second delivery by the same organisation
        ("lakeside", "2026-02-01T00:00:00Z"),
    )
    view = build_view("p", [{"total": 1, "entry": [entry]}])
    (row,) = view.section("problems").entries
    assert row.source == "st-mary" and row.also == ("lakeside", "riverside")
    assert row.title == "Asthma"


def test_sections_by_type_and_category_newest_first() -> None:
    entries = [
        _entry(_obs("lab-old", "laboratory", "2020-01-01"), ("a", "1")),
        _entry(_obs("lab-new", "laboratory", "2025-01-01"), ("a", "1")),
        _entry(_obs("vs", "vital-signs", "2024-01-01"), ("a", "1")),
        _entry(_obs("social", "social-history", "2024-01-01"), ("a", "1")),
        _entry(_obs("nocat", None, "2024-01-01"), ("a", "1")),
        _entry({"resourceType": "DiagnosticReport", "id": "dr", "code": {"text": "CBC"}}, ("a", "1")),
        _entry(
            {
                "resourceType": "MedicationStatement",
                "id": "ms",
                "medicationCodeableConcept": {"text": "Metformin"},
            }
        ),
    ]
    view = build_view("p", [{"entry": entries}])
    assert [e.id for e in view.section("results").entries] == ["lab-new", "lab-old"]
    assert [e.id for e in view.section("vitals").entries] == ["vs"]
    assert {e.id for e in view.other.entries} == {"social", "nocat", "dr"}  # nothing dropped
    (med,) = view.section("medications").entries
    assert med.title == "Metformin" and med.source == ""  # no provenance: no source claimed
    assert view.section("results").entries[0].detail == "<5 mmol/L"


def test_banner_records_mrns_and_severe_allergies_first() -> None:
    def patient(pid: str, mrn: str) -> dict[str, Any]:
        return {
            "resourceType": "Patient",
            "id": pid,
            "name": [{"given": ["Ann"], "family": "Lee"}],
            "birthDate": "1970-01-01",
            "gender": "female",
            "identifier": [
                {"system": "ssn", "value": "1"},
                {"type": {"coding": [{"code": "MR"}]}, "value": mrn},
            ],
        }

    def allergy(aid: str, **extra: Any) -> dict[str, Any]:
        return {"resourceType": "AllergyIntolerance", "id": aid, "code": {"text": aid}, **extra}

    pages = [
        {
            "entry": [
                _entry(patient("other", "B-2"), ("riverside", "1")),
                _entry(allergy("mild", recordedDate="2025-01-01"), ("a", "1")),
                _entry(allergy("crit", criticality="high", recordedDate="2001-01-01"), ("a", "1")),
            ]
        },
        {
            "entry": [
                _entry(patient("p", "A-1"), ("st-mary", "1")),
                _entry(
                    allergy("react", reaction=[{"severity": "severe"}], recordedDate="2000-01-01"), ("a", "1")
                ),
            ]
        },
    ]
    view = build_view("p", pages)
    assert (view.name, view.birth_date, view.sex) == ("Ann Lee", "1970-01-01", "female")
    assert [(r.id, r.sources, r.mrns) for r in view.records] == [
        ("other", ("riverside",), ("B-2",)),
        ("p", ("st-mary",), ("A-1",)),
    ]
    assert view.hospitals == 2
    assert [a.id for a in view.allergies] == ["crit", "react", "mild"]


def test_withheld_and_warnings_are_read_from_the_outcomes() -> None:
    warning = {
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "warning", "code": "not-supported", "diagnostics": "odd parameter"}],
        },
        "search": {"mode": "outcome"},
    }
    view = build_view("p", [{"entry": [SUPPRESSED, warning]}])
    assert view.withheld and view.notices == ["odd parameter"]
    assert not build_view("p", [{"entry": [warning]}]).withheld


def test_entry_titles_per_type() -> None:
    assert (
        to_entry({"resourceType": "Immunization", "vaccineCode": {"coding": [{"code": "08"}]}}, []).title
        == "08"
    )
    enc = to_entry(
        {"resourceType": "Encounter", "class": {"code": "AMB"}, "period": {"start": "2026-01-01"}}, []
    )
    assert (enc.title, enc.detail, enc.date) == ("AMB", "2026-01-01", "2026-01-01")
    doc = to_entry({"resourceType": "DocumentReference", "description": "Discharge letter"}, ["a"])
    assert doc.title == "Discharge letter" and doc.source == "a"
    assert to_entry({"resourceType": "Procedure"}, []).title == "Procedure"  # never an empty row


def test_page_of_clamps() -> None:
    items = [to_entry({"resourceType": "Condition", "id": str(i)}, []) for i in range(30)]
    assert [len(page_of(items, p, 25)[0]) for p in (0, 1, 2, 9)] == [25, 25, 5, 5]
    assert page_of([], 3, 25) == ([], 1)
