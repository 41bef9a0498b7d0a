"""The ADT spine: A01/A04/A08 -> Patient, Encounter, Provenance; merges; determinism."""

from __future__ import annotations

import hashlib

import pytest

from adapters.base import ConvertedBundle, RejectedRecord, SourceInfo
from adapters.bundle import INPUT_HASH_SYSTEM, canonical_json
from adapters.hl7v2 import HL7v2Adapter
from adapters.ids import business_key, resource_id

SRC = SourceInfo("st-mary", timezone="America/New_York")

ADT_A01 = (
    "MSH|^~\\&|EPIC|STM^2.16.840.1.113883.19.1^ISO|FB|FB|20240305143000||ADT^A01^ADT_A01|CTRL001|P|2.5.1\r"
    "EVN|A01|20240305143000\r"
    "PID|1||MRN123^^^STM^MR~999-88-7777^^^SSA^SS||DOE^JANE^Q^JR^DR||19800229|F|||"
    "12 MAIN ST^APT 4^SPRINGFIELD^IL^62701^USA^H||^PRN^PH^^1^217^5551234|^WPN^PH^^^217^5559999^12|EN^English^ISO639|M\r"
    "NK1|1|DOE^JOHN|SPO^Spouse^HL70063||^PRN^PH^^^217^5550000\r"
    + "|".join(
        [
            "PV1",
            "1",
            "I",
            "4W^401^B^STM",
            "",
            "",
            "",
            "1234^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO",
            "",
            "",
            "MED",
            "",
            "",
            "",
            "7",
            "",
            "",
            "1234^WELBY^MARCUS^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO",
            "",
            "IP",
            *[""] * 24,
            "20240305142500",
        ]
    )
    + "\r"
)


def convert(text: str, source: SourceInfo = SRC, adapter: HL7v2Adapter | None = None) -> list:
    return list((adapter or HL7v2Adapter()).convert(text.encode(), source, filename="t.hl7"))


def one(text: str, source: SourceInfo = SRC) -> ConvertedBundle:
    out = convert(text, source)
    assert len(out) == 1
    assert isinstance(out[0], ConvertedBundle), getattr(out[0], "error", None)
    return out[0]


def resources(b: ConvertedBundle, rtype: str) -> list[dict]:
    return [e["resource"] for e in b.bundle["entry"] if e["resource"]["resourceType"] == rtype]


@pytest.mark.parametrize("trigger", ["A01", "A04", "A08"])
def test_adt_spine_patient_encounter_provenance(trigger: str) -> None:
    b = one(ADT_A01.replace("ADT^A01^ADT_A01", f"ADT^{trigger}^ADT_A01").replace("EVN|A01", f"EVN|{trigger}"))
    (p,) = resources(b, "Patient")
    mrn = [i for i in p["identifier"] if i["system"] == SRC.mrn_system_uri]
    assert [i["value"] for i in mrn] == ["MRN123"]
    assert {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-88-7777"}.items() <= next(
        i for i in p["identifier"] if i["value"] == "999-88-7777"
    ).items()
    assert p["id"] == resource_id("st-mary", "Patient", business_key(SRC.mrn_system_uri, "MRN123"))
    assert p["name"][0] == {"family": "DOE", "given": ["JANE", "Q"], "prefix": ["DR"], "suffix": ["JR"]}
    assert p["gender"] == "female" and p["birthDate"] == "1980-02-29"
    assert p["address"][0]["city"] == "SPRINGFIELD" and p["address"][0]["use"] == "home"
    assert {"system": "phone", "value": "+1 (217) 555-1234", "use": "home"} in p["telecom"]
    assert p["maritalStatus"]["coding"][0]["code"] == "M"
    assert p["contact"][0]["name"]["family"] == "DOE"
    (enc,) = resources(b, "Encounter")
    assert enc["class"]["code"] == "IMP"
    assert enc["subject"]["reference"] == f"Patient/{p['id']}"
    assert enc["identifier"][0]["system"] == SRC.encounter_system_uri
    assert enc["identifier"][0]["value"] == "IP"
    # no offset in PV1-44: America/New_York in March 2024 (before DST on 10 March) is -05:00
    assert enc["period"] == {"start": "2024-03-05T14:25:00-05:00"}
    assert enc["status"] == {"A01": "in-progress", "A04": "arrived", "A08": "in-progress"}[trigger]
    (prov,) = resources(b, "Provenance")
    targets = {t["reference"] for t in prov["target"]}
    assert f"Patient/{p['id']}" in targets and f"Encounter/{enc['id']}" in targets
    assert prov["entity"][0]["what"]["identifier"]["system"] == INPUT_HASH_SYSTEM
    assert prov["recorded"] == "2024-03-05T14:30:00-05:00"
    assert b.routing_key == f"{SRC.mrn_system_uri}|MRN123"
    assert b.message_id == "CTRL001"
    assert all(e["request"]["method"] == "PUT" for e in b.bundle["entry"])


def test_input_hash_is_of_the_message_bytes() -> None:
    b = one(ADT_A01)
    assert b.input_sha256 == hashlib.sha256(ADT_A01.encode()).hexdigest()


def test_deterministic_and_byte_identical() -> None:
    a, b = one(ADT_A01), one(ADT_A01)
    assert a.body == b.body and a.sha256 == b.sha256
    assert canonical_json(a.bundle) == a.body
    assert hashlib.sha256(a.body).hexdigest() == a.sha256


def test_line_endings_bom_and_mllp_give_same_resources() -> None:
    base = one(ADT_A01)
    for variant in (
        ADT_A01.replace("\r", "\n"),
        ADT_A01.replace("\r", "\r\n"),
        "\ufeff" + ADT_A01,
        "\x0b" + ADT_A01 + "\x1c\r",
    ):
        b = one(variant)
        assert [e["resource"]["id"] for e in b.bundle["entry"][:-1]] == [
            e["resource"]["id"] for e in base.bundle["entry"][:-1]
        ]
        assert resources(b, "Patient") == resources(base, "Patient")


def test_source_mrn_system_and_timezone_are_used() -> None:
    src = SourceInfo(
        "acme",
        mrn_system="https://acme.example/mrn",
        encounter_system="https://acme.example/visit",
        timezone="Europe/Paris",
    )
    b = one(ADT_A01, src)
    (p,) = resources(b, "Patient")
    assert p["identifier"][0] == {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                    "code": "MR",
                    "display": "Medical record number",
                }
            ]
        },
        "system": "https://acme.example/mrn",
        "value": "MRN123",
    }
    (enc,) = resources(b, "Encounter")
    assert enc["identifier"][0]["system"] == "https://acme.example/visit"
    assert enc["period"]["start"] == "2024-03-05T14:25:00+01:00"
    assert b.routing_key == "https://acme.example/mrn|MRN123"


def test_a03_discharge_finishes_encounter() -> None:
    msg = ADT_A01.replace("ADT^A01", "ADT^A03").replace(
        "|20240305142500\r", "|20240305142500|20240307100000\r"
    )
    (enc,) = resources(one(msg), "Encounter")
    assert enc["status"] == "finished"
    assert enc["period"]["end"] == "2024-03-07T10:00:00-05:00"


def test_a40_merge_links_patients() -> None:
    msg = (
        "MSH|^~\\&|A|B|C|D|20240101120000+0000||ADT^A40^ADT_A39|M1|P|2.5\r"
        "PID|1||NEW1^^^STM^MR||DOE^JANE\r"
        "MRG|OLD9^^^STM^MR\r"
    )
    b = one(msg)
    pats = {p["identifier"][0]["value"]: p for p in resources(b, "Patient")}
    assert pats["OLD9"]["link"] == [
        {"other": {"reference": f"Patient/{pats['NEW1']['id']}"}, "type": "replaced-by"}
    ]
    assert pats["OLD9"]["active"] is False
    assert pats["NEW1"]["link"][0] == {
        "other": {"reference": f"Patient/{pats['OLD9']['id']}"},
        "type": "replaces",
    }
    assert pats["OLD9"]["identifier"][0]["system"] == SRC.mrn_system_uri


def test_a28_without_visit_has_no_encounter() -> None:
    msg = "MSH|^~\\&|A|B|C|D|20240101||ADT^A28|M2|P|2.4\rPID|1||X1^^^^MR||ROE^RICHARD||19700101|M\rPV1|1|N\r"
    b = one(msg)
    assert resources(b, "Encounter") == []
    assert len(resources(b, "Patient")) == 1


def test_a11_cancel_admit_marks_cancelled() -> None:
    msg = ADT_A01.replace("ADT^A01", "ADT^A11")
    (enc,) = resources(one(msg), "Encounter")
    assert enc["status"] == "cancelled"


def test_batch_file_gives_one_bundle_per_message() -> None:
    second = ADT_A01.replace("CTRL001", "CTRL002").replace("MRN123", "MRN456")
    batch = "FHS|^~\\&|A\rBHS|^~\\&|A\r" + ADT_A01 + second + "BTS|2\rFTS|1\r"
    out = convert(batch)
    assert [o.message_id for o in out] == ["CTRL001", "CTRL002"]
    assert [o.location.message_index for o in out] == [1, 2]
    assert out[1].routing_key.endswith("|MRN456")


def test_bad_message_in_batch_does_not_stop_the_rest() -> None:
    bad = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|BAD|P|2.5\rPID|1||X\r???|broken\r"
    out = convert(bad + ADT_A01)
    assert isinstance(out[0], RejectedRecord)
    assert out[0].error.location.message_index == 1
    assert out[0].error.location.line == 3
    assert isinstance(out[1], ConvertedBundle)


def test_timestamps_never_invalid() -> None:
    msg = ADT_A01.replace("19800229", "19810229").replace("20240305142500", "20241305142500")
    b = one(msg)
    (p,) = resources(b, "Patient")
    assert "birthDate" not in p
    codes = {w.code for w in b.warnings}
    assert {"invalid-date", "invalid-timestamp"} <= codes


def test_z_segment_warns_by_default_and_is_recorded_in_provenance() -> None:
    b = one(ADT_A01 + "ZPI|1|VIP\r")
    w = [w for w in b.warnings if w.code == "unmapped-segment"]
    assert w and w[0].location.segment == "ZPI"
    (prov,) = resources(b, "Provenance")
    assert any("ZPI" in ext["extension"][1]["valueString"] for ext in prov["extension"])


def test_z_segment_subclass_can_map_it() -> None:
    class Site(HL7v2Adapter):
        def map_z_segment(self, conv, seg):  # type: ignore[no-untyped-def]
            if seg.name != "ZPI" or conv.patient_ref is None:
                return False
            conv.b.get(conv.patient_ref).setdefault("extension", []).append(
                {"url": "https://st-mary.example/vip", "valueBoolean": seg.v(2) == "VIP"}
            )
            return True

    out = list(Site().convert((ADT_A01 + "ZPI|1|VIP\r").encode(), SRC))
    (p,) = resources(out[0], "Patient")
    assert {"url": "https://st-mary.example/vip", "valueBoolean": True} in p["extension"]
    assert not [w for w in out[0].warnings if w.code == "unmapped-segment"]


def test_adt_without_pid_and_unknown_message_type_are_reported_not_silent() -> None:
    from adapters import registry
    from adapters.base import ConvertedBundle, SourceInfo

    adapter = registry.get("hl7v2")
    msh = "MSH|^~\\&|APP|FAC|RCV|RFAC|20260101120000+0000||{t}|C1|P|2.5.1"
    pv1 = "PV1|1|I|WARD^1^A^FAC"
    no_pid = "\r".join([msh.format(t="ADT^A01^ADT_A01"), pv1]) + "\r"
    out = list(adapter.convert(no_pid.encode(), SourceInfo("st-mary")))
    assert isinstance(out[0], ConvertedBundle)
    assert "missing-segment" in {w.code for w in out[0].warnings}
    unknown = "\r".join([msh.format(t="ZZZ^Z01"), "PID|1||M1^^^FAC^MR||DOE^JANE"]) + "\r"
    out = list(adapter.convert(unknown.encode(), SourceInfo("st-mary")))
    assert isinstance(out[0], ConvertedBundle)
    warning = next(w for w in out[0].warnings if w.code == "unsupported-message-type")
    assert warning.location.segment == "MSH" and warning.location.field == 9
