"""HL7 v2 orders and results: one order and report per OBR group, ORC-21, OBX-11, patient identifiers."""

from __future__ import annotations

import base64

import pytest

from adapters.base import ConvertedBundle, SourceInfo
from adapters.hl7v2 import HL7v2Adapter

SRC = SourceInfo("st-mary", timezone="UTC")
A = HL7v2Adapter()
MSH = "MSH|^~\\&|LAB|FAC|FB|FB|20240101120000+0000||{type}|C1|P|2.5.1\r"
PID = "PID|1||M1^^^^MR||DOE^JANE||19800101|F\r"


def bundle(body: str, mtype: str = "ORU^R01^ORU_R01", pid: str = PID) -> ConvertedBundle:
    (out,) = A.convert((MSH.format(type=mtype) + pid + body).encode(), SRC)
    assert isinstance(out, ConvertedBundle), out.error  # type: ignore[union-attr]
    return out


def of(b: ConvertedBundle, rtype: str) -> list[dict]:
    return [e["resource"] for e in b.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def ref(r: dict) -> str:
    return f"{r['resourceType']}/{r['id']}"


def by_ref(b: ConvertedBundle) -> dict[str, dict]:
    return {ref(e["resource"]): e["resource"] for e in b.bundle["entry"]}


def code_of(r: dict, field: str = "code") -> str:
    return r[field]["coding"][0]["code"]


# two panels ordered under one placer number, as many lab systems send them
TWO_PANELS = (
    "ORC|RE|P100^EPIC|F100^LAB||CM\r"
    "OBR|1|P100^EPIC|F100^LAB|58410-2^CBC panel^LN|||20240101080000+0000||||||||||||||20240101100000+0000|||F\r"
    "OBX|1|NM|6690-2^WBC^LN||7.2|10*3/uL^^UCUM|4.5-11.0|N|||F\r"
    "OBX|2|NM|718-7^Hemoglobin^LN||13.9|g/dL^^UCUM|12.0-16.0|N|||F\r"
    "OBR|2|P100^EPIC|F101^LAB|24323-8^Metabolic panel^LN|||20240101080000+0000||||||||||||||20240101100000+0000|||F\r"
    "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL^^UCUM|70-99|N|||F\r"
    "OBX|2|NM|2951-2^Sodium^LN||140|mmol/L^^UCUM|135-145|N|||F\r"
    "OBX|3|NM|2823-3^Potassium^LN||4.1|mmol/L^^UCUM|3.5-5.1|N|||F\r"
)


def test_obr_groups_sharing_a_placer_number_are_separate_reports_and_orders() -> None:
    b = bundle(TWO_PANELS)
    reports = of(b, "DiagnosticReport")
    orders = of(b, "ServiceRequest")
    res = by_ref(b)
    assert sorted(code_of(r) for r in reports) == ["24323-8", "58410-2"]
    assert sorted(code_of(r) for r in orders) == ["24323-8", "58410-2"]
    linked = {code_of(r): sorted(code_of(res[x["reference"]]) for x in r["result"]) for r in reports}
    assert linked == {"58410-2": ["6690-2", "718-7"], "24323-8": ["2345-7", "2823-3", "2951-2"]}
    for r in reports:  # each report is based on the order of its own panel
        (based,) = r["basedOn"]
        assert code_of(res[based["reference"]]) == code_of(r)
    assert len(of(b, "Observation")) == 5


def test_identical_obr_groups_keep_their_own_observations() -> None:
    group = (
        "OBR|{n}|P7^EPIC||2345-7^Glucose^LN|||20240101080000+0000|||||||||||||||||F\r"
        "OBX|1|NM|2345-7^Glucose^LN||{v}|mg/dL^^UCUM|70-99||||F\r"
    )
    b = bundle("ORC|RE|P7^EPIC\r" + group.format(n=1, v=95) + group.format(n=2, v=97))
    reports = of(b, "DiagnosticReport")
    obs = of(b, "Observation")
    assert len(reports) == 2 and len(obs) == 2 and len(of(b, "ServiceRequest")) == 2
    values = sorted(by_ref(b)[r["result"][0]["reference"]]["valueQuantity"]["value"] for r in reports)
    assert [len(r["result"]) for r in reports] == [1, 1] and values == [95, 97]


def test_order_message_with_two_obr_under_one_orc_gives_two_service_requests() -> None:
    b = bundle(
        "ORC|NW|P9^EPIC|||||||20240101090000+0000\r"
        "OBR|1|P9^EPIC||58410-2^CBC panel^LN\r"
        "OBR|2|P9^EPIC||24323-8^Metabolic panel^LN\r",
        "ORM^O01^ORM_O01",
    )
    assert sorted(code_of(r) for r in of(b, "ServiceRequest")) == ["24323-8", "58410-2"]


def test_the_first_group_of_an_order_keeps_the_id_it_has_alone() -> None:
    # a panel re-sent alone in a later message must update the report it made, not add a second one
    alone = bundle(TWO_PANELS.split("OBR|2|")[0])
    both = bundle(TWO_PANELS)
    (report,) = of(alone, "DiagnosticReport")
    assert report["id"] in {r["id"] for r in of(both, "DiagnosticReport")}
    (order,) = of(alone, "ServiceRequest")
    assert order["id"] in {r["id"] for r in of(both, "ServiceRequest")}


# ORC-12 ordering provider, ORC-21 ordering facility (XON: name, id in XON-10), ORC-22 address, ORC-23 phone
ORC_AT_FACILITY = (
    "ORC|NW|P55^EPIC|||||||20240101090000+0000|||1234567890^WELBY^MARCUS^^^DR^^^NPI|||||||||"
    "Springfield Clinic^L^^^^CLINICS&2.16.840.1.113883.19.5&ISO^XX^^^SPC001|"
    "100 MAIN ST^^SPRINGFIELD^IL^62701^USA^B|^WPN^PH^^1^217^5550100\r"
    "OBR|1|P55^EPIC||58410-2^CBC panel^LN\r"
)


def test_orc21_ordering_facility_is_the_requesters_organization() -> None:
    b = bundle(ORC_AT_FACILITY, "ORM^O01^ORM_O01")
    res = by_ref(b)
    (sr,) = of(b, "ServiceRequest")
    role = res[sr["requester"]["reference"]]
    assert role["resourceType"] == "PractitionerRole"
    practitioner = res[role["practitioner"]["reference"]]
    assert practitioner["identifier"][0]["value"] == "1234567890"
    org = res[role["organization"]["reference"]]
    assert org["resourceType"] == "Organization" and org["name"] == "Springfield Clinic"
    assert org["identifier"][0]["value"] == "SPC001"
    assert org["address"][0]["city"] == "SPRINGFIELD"
    assert org["telecom"][0]["value"] == "+1 (217) 555-0100"


def test_orc21_without_an_ordering_provider_still_names_the_facility() -> None:
    b = bundle(
        "ORC|RE|P56^EPIC|F56^LAB||CM||||||||||||||||Riverside Urgent Care\r"
        "OBR|1|P56^EPIC|F56^LAB|2345-7^Glucose^LN|||||||||||||||||||||F\r"
        "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL^^UCUM|||||F\r"
    )
    res = by_ref(b)
    (sr,) = of(b, "ServiceRequest")
    role = res[sr["requester"]["reference"]]
    assert "practitioner" not in role
    assert res[role["organization"]["reference"]]["name"] == "Riverside Urgent Care"


def test_without_orc21_the_requester_stays_the_practitioner() -> None:
    b = bundle(ORC_AT_FACILITY.replace("Springfield Clinic^L^^^^CLINICS&2.16.840.1.113883.19.5&ISO^XX^^^SPC001", ""),
               "ORM^O01^ORM_O01")  # fmt: skip
    (sr,) = of(b, "ServiceRequest")
    assert sr["requester"]["reference"].startswith("Practitioner/")
    assert not of(b, "PractitionerRole")


def obx_status(status: str, value: str = "95") -> str:
    b = bundle(
        "OBR|1|P1^EPIC||2345-7^Glucose^LN|||||||||||||||||||||F\r"
        f"OBX|1|NM|2345-7^Glucose^LN||{value}|mg/dL^^UCUM|||||{status}\r"
    )
    (o,) = of(b, "Observation")
    return str(o["status"])


@pytest.mark.parametrize(
    ("code", "status"),
    # the HL7 v2-to-FHIR IG's ConceptMap table-hl70085-to-observation-status
    [("A", "amended"), ("C", "corrected"), ("D", "entered-in-error"), ("F", "final"), ("P", "preliminary"),
     ("X", "cancelled"), ("W", "entered-in-error")],
)  # fmt: skip
def test_obx11_follows_the_ig_concept_map(code: str, status: str) -> None:
    assert obx_status(code) == status


def test_obx11_o_with_a_value_is_not_registered() -> None:
    # "order detail": the value given with the order exists, so "registered" (no result yet) is wrong
    assert obx_status("O") == "final"
    assert obx_status("I") == "preliminary"


def test_obx11_o_and_i_without_a_value_are_registered() -> None:
    assert obx_status("O", value="") == "registered"
    assert obx_status("I", value="") == "registered"


def test_the_same_ssn_in_pid3_and_pid19_is_one_identifier() -> None:
    pid = "PID|1||M1^^^STMARY^MR~427749385^^^SSA^SS||DOE^JANE||19800101|F|||||||||||427749385\r"
    b = bundle("PV1|1|O\r", "ADT^A01^ADT_A01", pid=pid)
    (patient,) = of(b, "Patient")
    ssns = [i for i in patient["identifier"] if i["system"] == "http://hl7.org/fhir/sid/us-ssn"]
    assert len(ssns) == 1 and ssns[0]["value"] == "427749385"
    assert ssns[0]["type"]["coding"][0]["code"] == "SS"
    assert len(patient["identifier"]) == 2


def test_different_identifiers_are_all_kept() -> None:
    pid = "PID|1||M1^^^STMARY^MR~427749385^^^SSA^SS||DOE^JANE||19800101|F|||||||||||427749386\r"
    b = bundle("PV1|1|O\r", "ADT^A01^ADT_A01", pid=pid)
    (patient,) = of(b, "Patient")
    assert len(patient["identifier"]) == 3


def test_an_obr_after_a_txa_gets_its_own_results() -> None:
    # a document before the order group must not swallow the group's OBX as document text
    b = bundle(
        "TXA|1|DS|TX|20240101090000+0000||||||||DOC1^LAB|||||AU\r"
        "OBX|1|TX|11506-3^Note^LN||Document line one|||||||F\r"
        "OBR|1|P3^EPIC||2345-7^Glucose^LN|||20240101080000+0000|||||||||||||||||F\r"
        "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL^^UCUM|70-99|N|||F\r"
    )
    (doc,) = of(b, "DocumentReference")
    (report,) = of(b, "DiagnosticReport")
    (o,) = of(b, "Observation")
    assert o["valueQuantity"]["value"] == 95 and report["result"] == [{"reference": ref(o)}]
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert text == "Document line one"


def test_repeated_obx_outside_an_order_group_are_kept_apart() -> None:
    # specimen-level results (OUL^R22) before any OBR, with the same set id and code
    b = bundle(
        "SPM|1|S1&LAB||119297000^Blood^SCT\r"
        "OBX|27|NM|8867-4^Heart rate^LN||60|/min|||||F|||20240101080000+0000\r"
        "OBX|27|NM|8867-4^Heart rate^LN||72|/min|||||F|||20240101090000+0000\r",
        "OUL^R22^OUL_R22",
    )
    assert sorted(o["valueQuantity"]["value"] for o in of(b, "Observation")) == [60, 72]
