"""The patient page's model, read from $everything pages: sources in delivery order, sections by type
and category, the banner, and what the API said it withheld."""

from __future__ import annotations

from typing import Any

from bridge.service.ui.summary import PROVENANCE_EXT, Filters, build_view, page_of, to_entry


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


# -- disagreements, deliveries, results, filters ----------------------------------------------------
def _lab(
    oid: str, when: str, value: float, *, unit: str = "mmol/L", code: str = "2823-3", **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": "Potassium"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit},
        **extra,
    }


RANGE: dict[str, Any] = {"referenceRange": [{"low": {"value": 3.5}, "high": {"value": 5.1}}]}


def test_different_values_of_one_fact_from_two_sources_are_a_dispute_with_both() -> None:
    view = build_view(
        "p",
        [
            {
                "entry": [
                    _entry(_lab("a", "2026-01-10T08:00:00Z", 4.1), ("st-mary", "2026-01-11")),
                    _entry(_lab("b", "2026-01-10T08:00:00Z", 4.9), ("riverside", "2026-01-12")),
                    # same fact, same value, one entry with two sources: no dispute
                    _entry(_lab("c", "2026-02-10T08:00:00Z", 4.0), ("st-mary", "1"), ("riverside", "2")),
                    # another time: another fact
                    _entry(_lab("d", "2026-03-10T08:00:00Z", 4.4), ("riverside", "1")),
                ]
            }
        ],
    )
    (dispute,) = view.disputes
    assert dispute.date == "2026-01-10T08:00:00Z"
    assert [(e.detail, e.source) for e in dispute.entries] == [
        ("4.1 mmol/L", "st-mary"),
        ("4.9 mmol/L", "riverside"),
    ]
    assert view.disputed == {("Observation", "a"), ("Observation", "b")}
    # both values are still entries of the section: nothing merged away
    assert {e.id for e in view.section("results").entries} == {"a", "b", "c", "d"}


def test_one_source_correcting_itself_is_not_sources_disagreeing() -> None:
    view = build_view(
        "p",
        [
            {
                "entry": [
                    _entry(_lab("a", "2026-01-10", 4.1), ("st-mary", "1")),
                    _entry(_lab("b", "2026-01-10", 4.9), ("st-mary", "2")),
                ]
            }
        ],
    )
    assert view.disputes == []


def test_each_delivery_is_kept_for_the_drawer() -> None:
    ext = {
        "url": PROVENANCE_EXT,
        "extension": [
            {"url": "sourceOrg", "valueString": "riverside"},
            {"url": "sourcePatient", "valueString": "pb"},
            {"url": "bundleSha256", "valueString": "ab" * 32},
            {"url": "receivedAt", "valueInstant": "2026-03-11T00:00:00Z"},
            {"url": "ledgerIndex", "valueInteger": 7},
        ],
    }
    item = {
        "resource": {"resourceType": "Condition", "id": "c", "code": {"text": "x"}},
        "extension": [ext, _prov("st-mary", "2026-01-01")],
    }
    (entry,) = build_view("p", [{"entry": [item]}]).section("problems").entries
    first, second = entry.deliveries
    assert (first.org, first.received, first.bundle_sha256) == ("st-mary", "2026-01-01", "00")
    assert (second.org, second.source_patient, second.bundle_sha256, second.ledger_index) == (
        "riverside",
        "pb",
        "ab" * 32,
        "7",
    )


def test_lab_flags_ranges_and_units_are_never_mixed() -> None:
    entries = [
        _entry(_lab("k1", "2026-01-01", 4.0, **RANGE), ("a", "1")),
        _entry(
            _lab("k2", "2026-02-01", 5.8, interpretation=[{"coding": [{"code": "H"}]}], **RANGE), ("a", "1")
        ),
        _entry(_lab("k3", "2026-03-01", 3.1, **RANGE), ("a", "1")),  # no flag sent: L from the range
        _entry(_lab("k4", "2026-03-01", 4100, unit="umol/L"), ("b", "1")),  # the same test in another unit
        _entry(
            _lab("k5", "2026-03-02", 5, valueQuantity={"value": 5, "comparator": "<", "unit": "mmol/L"}),
            ("a", "1"),
        ),
    ]
    view = build_view("p", [{"entry": entries}])
    assert [(s.unit, [p.entry.id for p in s.points]) for s in view.labs] == [
        ("mmol/L", ["k1", "k2", "k3"]),
        ("umol/L", ["k4"]),
    ]
    mmol = view.labs[0]
    assert [p.lab.flag for p in mmol.points] == ["", "H", "L"]
    assert mmol.latest.lab.range_text == "3.5–5.1 mmol/L" and (mmol.latest.lab.low, mmol.latest.lab.high) == (
        3.5,
        5.1,
    )
    assert view.lab_days == ["2026-03-01", "2026-02-01", "2026-01-01"]
    assert mmol.on("2026-02-01")[0].lab.value == 5.8


def test_filters_by_date_type_and_source_keep_the_banner_and_the_disputes() -> None:
    allergy = {
        "resourceType": "AllergyIntolerance",
        "id": "al",
        "code": {"text": "Penicillin"},
        "recordedDate": "2019-01-01",
    }
    entries = [
        _entry(allergy, ("st-mary", "1")),
        _entry(_lab("a", "2026-01-10", 4.1), ("st-mary", "2026-01-11")),
        _entry(_lab("b", "2026-01-10", 4.9), ("riverside", "2026-04-12")),
        _entry(
            {"resourceType": "Encounter", "id": "e", "period": {"start": "2025-06-01"}}, ("riverside", "1")
        ),
        _entry({"resourceType": "Condition", "id": "nodate", "code": {"text": "x"}}, ("riverside", "1")),
    ]
    pages = [{"entry": entries}]
    only = build_view(
        "p", pages, filters=Filters.parse({"source": "riverside", "from": "2026", "type": "results"})
    )
    assert [e.id for e in only.timeline] == ["b"]
    assert [e.id for e in only.section("results").entries] == ["b"] and only.section(
        "encounters"
    ).entries == []
    assert [a.id for a in only.allergies] == ["al"]  # the banner is never filtered
    assert len(only.disputes) == 1 and only.sources == ["riverside", "st-mary"]
    year = build_view("p", pages, filters=Filters.parse({"to": "2025-12"}))
    assert {e.id for e in year.timeline} == {"al", "e"}  # an undated entry matches no date range
    new = build_view("p", pages, filters=Filters.parse({"since": "2026-04-01"}))
    assert [e.id for e in new.timeline if e.new] == ["b"] and new.new == 1
    assert [e.id for e in new.timeline][-1] == "nodate"  # undated last


def test_filters_drop_what_they_cannot_read() -> None:
    f = Filters.parse(
        {"from": "01/02/2026", "to": "2026-13", "type": "nope", "source": "x" * 65, "since": "<b>"}
    )
    assert f == Filters()
    assert Filters.parse({"from": "2026-02", "to": "2026-02-29"}) == Filters(
        start="2026-02", end="2026-02-29"
    )
    assert Filters.parse({"type": "results", "since": "2026-01-01T10:00:00Z"}).query() == [
        ("type", "results"),
        ("since", "2026-01-01T10:00:00Z"),
    ]
