"""Message types beyond ADT: ORU, VXU, ORM/OML, SIU, MDM, RDE, DFT; AL1, DG1, IN1, NK1; NTE; SN values."""

from __future__ import annotations

import base64

from adapters.base import ConvertedBundle, SourceInfo
from adapters.hl7v2 import HL7v2Adapter

SRC = SourceInfo("st-mary", timezone="UTC")
A = HL7v2Adapter()
MSH = "MSH|^~\\&|APP|FAC|FB|FB|20240101120000+0000||{type}|C1|P|2.5.1\r"
PID = "PID|1||M1^^^^MR||DOE^JANE||19800101|F\r"


def seg(name: str, fields: dict[int, str]) -> str:
    """A segment with the given fields (1-based) and empty ones in between."""
    out = [""] * (max(fields) + 1)
    out[0] = name
    for n, v in fields.items():
        out[n] = v
    return "|".join(out) + "\r"


def bundle(body: str, mtype: str) -> ConvertedBundle:
    (out,) = A.convert((MSH.format(type=mtype) + PID + body).encode(), SRC)
    assert isinstance(out, ConvertedBundle), out.error  # type: ignore[union-attr]
    return out


def of(b: ConvertedBundle, rtype: str) -> list[dict]:
    return [e["resource"] for e in b.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def ref(r: dict) -> str:
    return f"{r['resourceType']}/{r['id']}"


def test_oru_report_observations_specimen() -> None:
    b = bundle(
        "ORC|RE|P1^EPIC|F1^LAB\r"
        "OBR|1|P1^EPIC|F1^LAB|24331-1^Lipid panel^LN|||20240101080000+0000|||||||||||||||20240101100000+0000|||F\r"
        "OBX|1|NM|2093-3^Cholesterol^LN||182|mg/dL|<200|N|||F|||20240101080000+0000\r"
        "NTE|1||fasting\r"
        "OBX|2|SN|2085-9^HDL^LN||>^60|mg/dL^^UCUM|40-60|H|||C\r"
        "OBX|3|CWE|5778-6^Color^LN||YEL^Yellow^HL70xxx||||||F\r"
        "OBX|4|ST|8251-1^Comment^LN||line one~line two||||||P\r"
        "OBX|5|SN|11111-1^Ratio^LN||^1^:^128||||||F\r"
        "SPM|1|S1&LAB||119297000^Blood^SCT|||||||||||||20240101075500+0000\r",
        "ORU^R01^ORU_R01",
    )
    (dr,) = of(b, "DiagnosticReport")
    obs = of(b, "Observation")
    (spec,) = of(b, "Specimen")
    (sr,) = of(b, "ServiceRequest")
    (pat,) = of(b, "Patient")
    assert dr["status"] == "final" and dr["code"]["coding"][0]["code"] == "24331-1"
    assert dr["result"] == [{"reference": ref(o)} for o in obs]
    assert dr["specimen"] == [{"reference": ref(spec)}]
    assert dr["basedOn"] == [{"reference": ref(sr)}]
    assert dr["effectiveDateTime"] == "2024-01-01T08:00:00Z" and dr["issued"] == "2024-01-01T10:00:00Z"
    chol, hdl, color, comment, ratio = obs
    assert chol["valueQuantity"] == {
        "value": 182,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }
    assert chol["referenceRange"] == [
        {
            "high": {"value": 200, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
            "text": "<200",
        }
    ]
    assert chol["note"] == [{"text": "fasting"}]
    assert chol["subject"] == {"reference": ref(pat)} and chol["specimen"] == {"reference": ref(spec)}
    assert hdl["valueQuantity"]["comparator"] == ">" and hdl["status"] == "corrected"
    assert hdl["interpretation"][0]["coding"][0]["code"] == "H"
    assert color["valueCodeableConcept"]["coding"][0]["code"] == "YEL"
    assert comment["valueString"] == "line one\nline two" and comment["status"] == "preliminary"
    assert ratio["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 128}}
    assert spec["collection"]["collectedDateTime"] == "2024-01-01T07:55:00Z"
    assert spec["type"]["coding"][0]["system"] == "http://snomed.info/sct"


def test_vxu_immunization() -> None:
    b = bundle(
        "ORC|RE||IZ-9^NDA\r"
        + seg(
            "RXA",
            {
                1: "0",
                2: "1",
                3: "20230915",
                5: "08^HepB^CVX",
                6: "0.5",
                7: "mL^^UCUM",
                9: "00^New record^NIP001",
                15: "LOT42",
                16: "20250101",
                17: "MSD^Merck^MVX",
                20: "CP",
            },
        )
        + "RXR|C28161^Intramuscular^NCIT|LA^Left arm^HL70163\r"
        "OBX|1|CE|64994-7^Eligibility^LN||V02^VFC eligible^HL70064||||||F\r",
        "VXU^V04^VXU_V04",
    )
    (imm,) = of(b, "Immunization")
    assert imm["status"] == "completed"
    assert imm["vaccineCode"]["coding"][0] == {
        "system": "http://hl7.org/fhir/sid/cvx",
        "code": "08",
        "display": "HepB",
    }
    assert imm["occurrenceDateTime"] == "2023-09-15" and imm["lotNumber"] == "LOT42"
    assert imm["expirationDate"] == "2025-01-01" and imm["primarySource"] is True
    assert imm["doseQuantity"]["code"] == "mL" and imm["route"]["coding"][0]["code"] == "C28161"
    (org,) = of(b, "Organization")
    assert imm["manufacturer"] == {"reference": ref(org)} and org["name"] == "Merck"
    (obs,) = of(b, "Observation")
    assert obs["partOf"] == [{"reference": ref(imm)}]


def test_orm_and_oml_service_requests() -> None:
    for mtype in ("ORM^O01^ORM_O01", "OML^O21^OML_O21"):
        b = bundle(
            seg("ORC", {1: "NW", 2: "ORD7^EPIC", 9: "20240101110000+0000", 12: "99^HOUSE^GREG"})
            + "OBR|1|ORD7^EPIC||85025^CBC^C4|R||||||||||||||||||||||||^Anemia\r",
            mtype,
        )
        (sr,) = of(b, "ServiceRequest")
        assert sr["status"] == "active" and sr["intent"] == "order"
        assert sr["code"]["coding"][0]["system"] == "http://www.ama-assn.org/go/cpt"
        assert sr["authoredOn"] == "2024-01-01T11:00:00Z"
        (pr,) = of(b, "Practitioner")
        assert sr["requester"] == {"reference": ref(pr)} and pr["name"][0]["family"] == "HOUSE"
        assert sr["identifier"][0]["value"] == "ORD7"


def test_siu_appointment() -> None:
    b = bundle(
        seg(
            "SCH",
            {
                1: "A1^EPIC",
                2: "F1^SCHED",
                7: "Checkup^Routine checkup",
                8: "ROUTINE^Routine^HL70276",
                9: "30",
                10: "min",
            },
        )
        + "TQ1|||||||20240110090000+0000|20240110093000+0000\r"
        "AIP|1||77^KILDARE^JAMES\r",
        "SIU^S12^SIU_S12",
    )
    (ap,) = of(b, "Appointment")
    assert ap["status"] == "booked"
    assert (ap["start"], ap["end"]) == ("2024-01-10T09:00:00Z", "2024-01-10T09:30:00Z")
    assert ap["minutesDuration"] == 30
    actors = [p["actor"]["reference"] for p in ap["participant"]]
    assert actors[0].startswith("Patient/") and any(a.startswith("Practitioner/") for a in actors)
    b2 = bundle("SCH|A1^EPIC|F1^SCHED\r", "SIU^S15^SIU_S12")
    assert of(b2, "Appointment")[0]["status"] == "cancelled"


def test_mdm_document_reference() -> None:
    b = bundle(
        "TXA|1|DS^Discharge summary^HL70270|TX|20240101130000+0000||||||||DOC-1^EPIC|||||AU\r"
        "OBX|1|TX|||Patient discharged home.\r"
        "OBX|2|TX|||Follow up in \\T\\ two weeks.\r",
        "MDM^T02^MDM_T02",
    )
    (doc,) = of(b, "DocumentReference")
    assert doc["status"] == "current" and doc["docStatus"] == "final"
    assert doc["masterIdentifier"]["value"] == "DOC-1"
    assert doc["date"] == "2024-01-01T13:00:00Z"
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert text == "Patient discharged home.\nFollow up in & two weeks."
    assert not of(b, "Observation")


def test_rde_medication_request() -> None:
    b = bundle(
        seg("ORC", {1: "NW", 2: "RX1^EPIC", 9: "20240101090000+0000", 12: "55^CASEY^BEN"})
        + seg(
            "RXE",
            {
                1: "^^^20240101^^R",
                2: "860975^Metformin 500 MG^RXNORM",
                3: "500",
                5: "mg^^UCUM",
                7: "^Take with food",
                10: "60",
                11: "{tbl}^^UCUM",
                12: "3",
            },
        ),
        "RDE^O11^RDE_O11",
    )
    (mr,) = of(b, "MedicationRequest")
    assert mr["status"] == "active" and mr["intent"] == "order"
    assert (
        mr["medicationCodeableConcept"]["coding"][0]["system"]
        == "http://www.nlm.nih.gov/research/umls/rxnorm"
    )
    assert mr["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 500
    assert mr["dosageInstruction"][0]["text"] == "Take with food"
    assert mr["dispenseRequest"] == {
        "quantity": {"value": 60, "unit": "{tbl}", "system": "http://unitsofmeasure.org", "code": "{tbl}"},
        "numberOfRepeatsAllowed": 3,
    }


def test_dft_charge_items() -> None:
    b = bundle(
        "PV1|1|O|||||||||||||||||V5\rFT1|1|T100||20240101||CG|99213^Office visit^C4|||1|125.00\r",
        "DFT^P03^DFT_P03",
    )
    (ci,) = of(b, "ChargeItem")
    (enc,) = of(b, "Encounter")
    assert ci["status"] == "billable" and ci["code"]["coding"][0]["code"] == "99213"
    assert ci["context"] == {"reference": ref(enc)} and ci["quantity"] == {"value": 1}
    assert ci["occurrenceDateTime"] == "2024-01-01"


def test_allergy_condition_coverage_contact() -> None:
    b = bundle(
        "NK1|1|DOE^JOHN|SPO^Spouse^HL70063\r"
        "PV1|1|I|||||||||||||||||V1\r"
        "AL1|1|DA|70618^Penicillin^RXNORM|SV|Hives~Wheezing|20100101\r"
        "DG1|1||I10^Hypertension^I10||20200101|A\r"
        + seg(
            "IN1",
            {
                1: "1",
                2: "GOLD^Gold plan",
                3: "BCBS^^^X",
                4: "Blue Cross",
                12: "20240101",
                13: "20241231",
                17: "SEL",
                36: "POL9",
            },
        ),
        "ADT^A01^ADT_A01",
    )
    (al,) = of(b, "AllergyIntolerance")
    assert al["category"] == ["medication"] and al["criticality"] == "high"
    assert [m["text"] for m in al["reaction"][0]["manifestation"]] == ["Hives", "Wheezing"]
    assert al["onsetDateTime"] == "2010-01-01"
    (cond,) = of(b, "Condition")
    (enc,) = of(b, "Encounter")
    assert cond["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10"
    assert enc["diagnosis"] == [{"condition": {"reference": ref(cond)}}]
    (cov,) = of(b, "Coverage")
    (payor,) = [o for o in of(b, "Organization") if o.get("name") == "Blue Cross"]
    assert cov["payor"] == [{"reference": ref(payor)}] and cov["subscriberId"] == "POL9"
    assert cov["relationship"]["coding"][0]["code"] == "self"
    assert cov["period"] == {"start": "2024-01-01", "end": "2024-12-31"}
    (pat,) = of(b, "Patient")
    assert pat["contact"][0]["relationship"][0]["coding"][0]["code"] == "SPO"


def test_invalid_values_never_reach_the_bundle() -> None:
    b = bundle("OBR|1|||X^Y^LN|||2024999\rOBX|1|NM|A^B^LN||12abc|||||F|||notatime\r", "ORU^R01")
    (o,) = of(b, "Observation")
    assert o["valueString"] == "12abc" and "effectiveDateTime" not in o
    codes = {w.code for w in b.warnings}
    assert {"invalid-number", "invalid-timestamp"} <= codes


def test_message_without_pid_still_converts_what_it_can() -> None:
    (out,) = A.convert((MSH.format(type="ORU^R01") + "OBR|1|||X^Y^LN\r").encode(), SRC)
    assert isinstance(out, ConvertedBundle)
    assert out.routing_key.startswith("message:")


def test_rol_becomes_participant_or_primary_care() -> None:
    b = bundle(
        "ROL|1|AD|PP^Primary Care Provider^HL70443|12^SMITH^ANN\r"
        "PV1|1|O|||||||||||||||||V2\r"
        "ROL|2|AD|AT^Attending^HL70443|34^JONES^BOB|20240101|20240102\r",
        "ADT^A04^ADT_A01",
    )
    (pat,) = of(b, "Patient")
    (enc,) = of(b, "Encounter")
    pracs = {p["name"][0]["family"]: p for p in of(b, "Practitioner")}
    assert pat["generalPractitioner"] == [{"reference": ref(pracs["SMITH"])}]
    (part,) = enc["participant"]
    assert part["individual"] == {"reference": ref(pracs["JONES"])}
    assert part["type"][0]["coding"][0]["code"] == "AT" and part["period"] == {
        "start": "2024-01-01",
        "end": "2024-01-02",
    }
    assert not [w for w in b.warnings if w.code == "unmapped-segment"]
