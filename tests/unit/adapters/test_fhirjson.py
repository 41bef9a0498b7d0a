"""FHIR passthrough adapter: forms, id handling, STU3 refusal, located rejections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import ConvertedBundle, RejectedRecord, SourceInfo
from adapters.bundle import validate_bundle
from adapters.fhirjson import FhirPassthroughAdapter, detect_stu3

SRC = SourceInfo("acme")
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"family": "Doe", "given": ["Jane"]}],
    "gender": "female",
}
OBS = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {"value": 72, "unit": "/min"},
}


def run(data: bytes, filename: str = "in.json") -> list[ConvertedBundle | RejectedRecord]:
    return list(FhirPassthroughAdapter().convert(data, SRC, filename=filename))


def resources(out: ConvertedBundle, rtype: str) -> list[dict]:
    return [e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_single_resource_keeps_source_id_as_identifier() -> None:
    [out] = run(json.dumps(PATIENT).encode())
    assert isinstance(out, ConvertedBundle)
    [pat] = resources(out, "Patient")
    assert pat["id"] != "p1"
    assert {"system": "urn:fhirbridge:acme:fhir-id:Patient", "value": "p1"} in pat["identifier"]
    assert out.routing_key == "urn:fhirbridge:acme:fhir-id:Patient|p1"
    assert out.bundle["type"] == "transaction"
    assert all(e["request"]["method"] == "PUT" for e in out.bundle["entry"])
    assert resources(out, "Provenance")


def test_ndjson_lines_reference_each_other_consistently_and_bad_line_is_located() -> None:
    data = (json.dumps(PATIENT) + "\n" + "{not json\n" + json.dumps(OBS) + "\n").encode()
    outs = run(data, "export.ndjson")
    assert [type(o).__name__ for o in outs] == ["ConvertedBundle", "RejectedRecord", "ConvertedBundle"]
    rej = outs[1]
    assert isinstance(rej, RejectedRecord)
    assert rej.error.location.line == 2 and rej.error.location.file == "export.ndjson"
    assert rej.raw == b"{not json"
    pat = resources(outs[0], "Patient")[0]  # type: ignore[arg-type]
    obs = resources(outs[2], "Observation")[0]  # type: ignore[arg-type]
    # the Patient is in another record: a logical reference by the identifier the Patient carries
    assert "reference" not in obs["subject"]
    assert obs["subject"]["type"] == "Patient" and obs["subject"]["identifier"] in pat["identifier"]
    assert outs[2].routing_key == outs[0].routing_key  # type: ignore[union-attr]


def test_bundle_with_urn_uuid_refs_and_one_invalid_entry() -> None:
    bad = {"resourceType": "Observation", "id": "o2", "code": {"text": "x"}}  # status missing
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:aaa", "resource": PATIENT},
            {"fullUrl": "urn:uuid:bbb", "resource": {**OBS, "subject": {"reference": "urn:uuid:aaa"}}},
            {"fullUrl": "urn:uuid:ccc", "resource": bad},
        ],
    }
    outs = run(json.dumps(bundle).encode())
    rejected = [o for o in outs if isinstance(o, RejectedRecord)]
    converted = [o for o in outs if isinstance(o, ConvertedBundle)]
    assert len(rejected) == 1 and len(converted) == 1
    assert rejected[0].error.location.xpath == "Bundle.entry[2].resource.status"
    assert "status" in rejected[0].error.message
    pat = resources(converted[0], "Patient")[0]
    obs = resources(converted[0], "Observation")[0]
    assert obs["subject"]["reference"] == f"Patient/{pat['id']}"


def test_references_outside_the_record() -> None:
    obs = {
        **OBS,
        "performer": [
            {"reference": "Organization?identifier=http://example.org/orgs|42"},
            {"reference": "urn:uuid:0b0b0b0b-0000-0000-0000-000000000000"},
            {"reference": "https://other.example/fhir/Practitioner/9"},
        ],
    }
    [out] = run(json.dumps(obs).encode())
    assert isinstance(out, ConvertedBundle)
    perf = resources(out, "Observation")[0]["performer"]
    assert perf[0] == {
        "type": "Organization",
        "identifier": {"system": "http://example.org/orgs", "value": "42"},
    }
    assert perf[1] == {"display": "urn:uuid:0b0b0b0b-0000-0000-0000-000000000000"}
    assert perf[2] == {"reference": "https://other.example/fhir/Practitioner/9"}
    assert [w.code for w in out.warnings] == ["unresolved-reference"]


def test_deterministic() -> None:
    data = json.dumps(PATIENT).encode()
    a, b = run(data), run(data)
    assert a[0].body == b[0].body  # type: ignore[union-attr]


def test_stu3_refused_with_clear_message() -> None:
    stu3 = {
        "resourceType": "ProcedureRequest",
        "id": "x",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/1"},
    }
    [out] = run(json.dumps(stu3).encode())
    assert isinstance(out, RejectedRecord)
    assert "STU3" in out.error.message and "ProcedureRequest" in out.error.message
    assert detect_stu3({"resourceType": "CapabilityStatement", "fhirVersion": "3.0.1"})
    assert detect_stu3(PATIENT) is None


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"[1,2]", "object"),
        (b"\xff\xfe{", "UTF-8"),
        (b'{"a": ', "JSON"),
        (b'{"resourceType": "NoSuchThing"}', "unknown R4 resource type"),
    ],
)
def test_bad_input_rejected_not_raised(data: bytes, needle: str) -> None:
    [out] = run(data)
    assert isinstance(out, RejectedRecord)
    assert needle in out.error.message
    assert out.error.location.line == 1  # located, as the conformance kit requires


def test_utf8_bom_accepted() -> None:
    [out] = run(b"\xef\xbb\xbf" + json.dumps(PATIENT).encode())
    assert isinstance(out, ConvertedBundle)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    for out in run(data):
        assert isinstance(out, ConvertedBundle | RejectedRecord)


def test_samples_stu3_refused_or_valid_r4(samples: Path) -> None:
    """Every STU3 sample that is not also valid R4 is refused *as STU3*, never with a generic error."""
    from fhir.resources.R4B import get_fhir_model_class

    refused = 0
    for f in sorted((samples / "fhir" / "ms-fhir-converter-stu3").glob("*.json")):
        doc = json.loads(f.read_bytes().decode("utf-8-sig"))
        try:
            get_fhir_model_class(doc["resourceType"]).model_validate(doc)
            r4_valid = True
        except Exception:
            r4_valid = False
        [out] = run(f.read_bytes(), str(f))
        if isinstance(out, RejectedRecord):
            assert "STU3" in out.error.message or "OperationDefinition" in f.name, (f.name, out.error.message)
            refused += 1
        else:
            assert out.warnings or r4_valid, f.name
    assert refused >= 25


def test_synthea_bundle_passes_through(samples: Path) -> None:
    f = next((samples / "synthea" / "fhir").glob("Jorge*.json"))
    src = json.loads(f.read_bytes())
    [out] = run(f.read_bytes(), str(f))
    assert isinstance(out, ConvertedBundle)
    validate_bundle(out.bundle)
    assert len(out.bundle["entry"]) == len(src["entry"]) + 1  # + our Provenance
    ids = {e["resource"]["id"] for e in out.bundle["entry"]}
    enc = resources(out, "Encounter")[0]
    assert enc["subject"]["reference"].split("/")[1] in ids


def test_a_non_object_request_and_an_impossible_timestamp_are_located_not_fatal() -> None:
    """``"request": "POST"`` rejects that entry, located, and the valid entries still convert; a
    ``timestamp`` that matches the pattern but is no real time (2020-13-45T99:99:99Z) does not reach
    Provenance.recorded."""
    doc = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": PATIENT, "request": "POST"}, {"resource": OBS}],
    }
    outs = run(json.dumps(doc).encode())
    rejected = [o for o in outs if isinstance(o, RejectedRecord)]
    assert [o.error.message for o in rejected] == ["Bundle.entry.request must be an object"]
    assert "Bundle.entry[0]" in str(rejected[0].error.location)
    assert any(isinstance(o, ConvertedBundle) for o in outs)
    doc = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": "2020-13-45T99:99:99Z",
        "entry": [{"resource": PATIENT}],
    }
    [out] = run(json.dumps(doc).encode())
    assert isinstance(out, ConvertedBundle)
    validate_bundle(out.bundle)


def test_a_second_different_resource_with_the_same_id_is_rejected_not_dropped() -> None:
    """Of two different resources with one id, the first is kept and the second rejected, located, with
    its raw entry: neither replaces the other silently."""
    other = {**PATIENT, "name": [{"family": "Other"}]}
    doc = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": PATIENT}, {"resource": other}],
    }
    outs = run(json.dumps(doc).encode())
    [rej] = [o for o in outs if isinstance(o, RejectedRecord)]
    assert "appears again with different content" in rej.error.message
    assert "Bundle.entry[1]" in str(rej.error.location) and b"Other" in rej.raw
    [out] = [o for o in outs if isinstance(o, ConvertedBundle)]
    [pat] = [e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert pat["name"] == PATIENT["name"]
    same = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": PATIENT}, {"resource": PATIENT}],
    }
    outs = run(json.dumps(same).encode())
    assert all(isinstance(o, ConvertedBundle) for o in outs)
    assert any(w.code == "duplicate-resource" for o in outs for w in o.warnings)  # type: ignore[union-attr]
