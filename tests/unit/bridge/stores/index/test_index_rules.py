from __future__ import annotations

from typing import Any

import orjson

from bridge.stores.index.rules import clinical_date, dedupe_key, patient_of


def _obs(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "effectiveDateTime": "2026-01-02T10:00:00Z",
        "valueQuantity": {
            "value": 5.4,
            "unit": "mmol/L",
            "system": "http://unitsofmeasure.org",
            "code": "mmol/L",
        },
    }
    base.update(kw)
    return base


def test_patient_of_by_type() -> None:
    assert patient_of({"resourceType": "Patient", "id": "p9"}) == "p9"
    assert patient_of(_obs()) == "p1"
    assert patient_of({"resourceType": "Immunization", "patient": {"reference": "Patient/p2"}}) == "p2"
    appt = {
        "resourceType": "Appointment",
        "participant": [{"actor": {"reference": "Practitioner/x"}}, {"actor": {"reference": "Patient/p3"}}],
    }
    assert patient_of(appt) == "p3"
    assert patient_of({"resourceType": "Practitioner", "id": "x"}) is None
    assert patient_of({"resourceType": "Observation", "subject": {"reference": "Group/g"}}) is None


def test_clinical_date_preference_order() -> None:
    assert clinical_date(_obs()) == "2026-01-02T10:00:00Z"
    assert (
        clinical_date(_obs(effectiveDateTime=None, effectivePeriod={"start": "2025-12-31"})) == "2025-12-31"
    )
    assert (
        clinical_date({"resourceType": "Encounter", "period": {"start": "2026-03-01T08:00:00-06:00"}})
        == "2026-03-01T08:00:00-06:00"
    )
    assert clinical_date({"resourceType": "Patient"}) is None


def test_same_observation_from_two_sources_has_same_key() -> None:
    a = _obs(id="a", meta={"source": "urn:fhirbridge:st-mary"})
    b = _obs(id="b", meta={"source": "urn:fhirbridge:riverside"}, subject={"reference": "Patient/p2"})
    assert dedupe_key(a) == dedupe_key(b) is not None


def test_different_value_unit_or_time_is_not_the_same_fact() -> None:
    base = dedupe_key(_obs())
    assert dedupe_key(_obs(valueQuantity={"value": 5.5, "unit": "mmol/L"})) != base
    assert dedupe_key(_obs(effectiveDateTime="2026-01-02T11:00:00Z")) != base
    assert dedupe_key(_obs(valueQuantity={"value": 5.4, "unit": "mg/dL", "code": "mg/dL"})) != base


def test_types_without_a_safe_rule_never_merge() -> None:
    assert dedupe_key({"resourceType": "Encounter", "period": {"start": "2026-01-01"}}) is None
    assert dedupe_key(_obs(code={"text": "no coding"})) is None


def test_dedupe_key_with_a_precomputed_clinical_date_matches_its_own() -> None:
    from bridge.stores.index.rules import clinical_date, dedupe_key

    obs = {
        "resourceType": "Observation",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "effectiveDateTime": "2026-01-01T10:00:00Z",
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    cond = {"resourceType": "Condition", "code": {"coding": [{"system": "sct", "code": "1"}]}}
    for r in (obs, cond):
        assert dedupe_key(r, clinical_date(r)) == dedupe_key(r)
    assert dedupe_key(obs, None) is None  # an explicit "no clinical date" is honoured, not recomputed


def test_observations_stating_different_facts_never_share_a_key() -> None:
    """Only six value forms were compared, so panels, ranges, ratios and comparators
    of different values merged, and one reading disappeared from the clinician's view."""
    del_value = {k: v for k, v in _obs().items() if k != "valueQuantity"}
    bp = {**del_value, "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]}}

    def comp(code: str, v: float) -> dict[str, object]:
        return {
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "valueQuantity": {
                "value": v,
                "unit": "mm[Hg]",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        }

    normal = {**bp, "component": [comp("8480-6", 120), comp("8462-4", 80)]}
    high = {**bp, "component": [comp("8480-6", 180), comp("8462-4", 110)]}
    assert dedupe_key(normal) != dedupe_key(high)
    assert dedupe_key(normal) == dedupe_key({**bp, "component": [comp("8462-4", 80), comp("8480-6", 120.0)]})
    low_range = {
        **del_value,
        "valueRange": {"low": {"value": 1, "unit": "g"}, "high": {"value": 2, "unit": "g"}},
    }
    high_range = {
        **del_value,
        "valueRange": {"low": {"value": 50, "unit": "g"}, "high": {"value": 90, "unit": "g"}},
    }
    assert None is not dedupe_key(low_range) != dedupe_key(high_range)
    ratio = {**del_value, "valueRatio": {"numerator": {"value": 1}, "denominator": {"value": 128}}}
    assert (
        None
        is not dedupe_key(ratio)
        != dedupe_key({**del_value, "valueRatio": {"numerator": {"value": 1}, "denominator": {"value": 64}}})
    )
    less = _obs(valueQuantity={"value": 5, "comparator": "<", "unit": "mg", "code": "mg"})
    assert dedupe_key(less) != dedupe_key(_obs(valueQuantity={"value": 5, "unit": "mg", "code": "mg"}))
    absent = {**del_value, "dataAbsentReason": {"coding": [{"code": "error"}]}}
    assert dedupe_key(absent) != dedupe_key(del_value)
    for unknown in (
        {**del_value, "valueSampledData": {"data": "1 2 3"}},
        {**del_value, "valueQuantity": {"unit": "mg"}},
        {**bp, "component": [{"code": {"coding": [{"code": "x"}]}, "valueAttachment": {}}]},
    ):
        assert dedupe_key(unknown) is None  # a value form that is not compared is never merged


def test_the_same_number_written_differently_is_the_same_fact() -> None:
    assert dedupe_key(_obs(valueQuantity={"value": 5, "unit": "mg"})) == dedupe_key(
        _obs(valueQuantity={"value": 5.0, "unit": "mg"})
    )


def test_entered_in_error_and_different_doses_never_merge() -> None:
    assert dedupe_key(_obs(status="entered-in-error")) is None
    cond = {
        "resourceType": "Condition",
        "code": {"coding": [{"system": "sct", "code": "1"}]},
        "onsetDateTime": "2026-01-01",
    }
    assert dedupe_key(cond) is not None
    assert dedupe_key({**cond, "verificationStatus": {"coding": [{"code": "entered-in-error"}]}}) is None
    med = {
        "resourceType": "MedicationRequest",
        "medicationCodeableConcept": {"coding": [{"system": "rx", "code": "1"}]},
        "authoredOn": "2026-01-01T09:00:00Z",
        "dosageInstruction": [{"text": "10 mg daily"}],
    }
    assert dedupe_key(med) != dedupe_key({**med, "dosageInstruction": [{"text": "40 mg daily"}]})
    assert dedupe_key(med) == dedupe_key({**med, "authoredOn": "2026-01-01T18:00:00Z"})


def test_a_record_outside_the_patients_bundle_belongs_to_that_patient() -> None:
    """The FHIR adapter turns a reference to a Patient outside the record into a logical reference
    under the source's fhir-id system; the index files the resource under that Patient's own id."""
    from adapters.base import SourceInfo
    from adapters.fhirjson.adapter import FhirPassthroughAdapter

    source = SourceInfo("riverside")
    adapter = FhirPassthroughAdapter()
    patient_doc = {"resourceType": "Patient", "id": "p-9", "name": [{"family": "Doe"}]}
    consent_doc = {
        "resourceType": "Consent",
        "id": "c-1",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p-9"},
        "policyRule": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]
        },
    }
    [patient] = [r for o in adapter.convert(orjson.dumps(patient_doc), source) for r in _resources(o)]
    consent = next(
        r
        for o in adapter.convert(orjson.dumps(consent_doc), source)
        for r in _resources(o)
        if r["resourceType"] == "Consent"
    )
    assert "reference" not in consent["patient"]  # a logical reference: the Patient is not in this record
    assert patient_of(consent) == patient["id"]
    other = {**consent, "patient": {"identifier": {"system": "urn:example:mrn", "value": "p-9"}}}
    assert patient_of(other) is None  # any other identifier names no Patient the index can find


def _resources(outcome: object) -> list[dict[str, Any]]:
    bundle = getattr(outcome, "bundle", None)
    assert bundle is not None, outcome
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] != "Provenance"]
