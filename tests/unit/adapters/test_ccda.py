"""C-CDA adapter: mapping of header and sections on a hand-written document, samples, determinism."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import ConvertedBundle, RejectedRecord, SourceInfo
from adapters.bundle import validate_bundle
from adapters.ccda import CcdaAdapter, document_type
from adapters.common.dates import hl7_ts_to_fhir

SRC = SourceInfo("acme", timezone="America/New_York")
LN = 'codeSystem="2.16.840.1.113883.6.1"'
SCT = 'codeSystem="2.16.840.1.113883.6.96"'
T = "2.16.840.1.113883.10.20.22"


def section(tpl: str, code: str, title: str, entries: str, text: str = "<paragraph>x</paragraph>") -> str:
    return f"""<component><section><templateId root="{tpl}" extension="2015-08-01"/>
      <code code="{code}" {LN}/><title>{title}</title><text>{text}</text>{entries}</section></component>"""


DOC = f"""<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xmlns:sdtc="urn:hl7-org:sdtc">
 <realmCode code="US"/>
 <templateId root="{T}.1.1" extension="2015-08-01"/>
 <templateId root="{T}.1.2" extension="2015-08-01"/>
 <id root="2.16.840.1.113883.19.5" extension="DOC-1"/>
 <code code="34133-9" {LN} displayName="Summarization of Episode Note"/>
 <title>Test CCD</title>
 <effectiveTime value="20200102030405-0500"/>
 <confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>
 <recordTarget><patientRole>
   <id root="2.16.840.1.113883.19.5.99" extension="MRN-7"/>
   <addr use="HP"><streetAddressLine>1 Main St</streetAddressLine><city>Springfield</city><state>IL</state>
     <postalCode>62701</postalCode></addr>
   <telecom value="tel:+1(555)555-2003" use="HP"/>
   <patient><name use="L"><given>Eve</given><given>A</given><family>Everywoman</family></name>
     <administrativeGenderCode code="F" codeSystem="2.16.840.1.113883.5.1"/>
     <birthTime value="19750501"/>
     <raceCode code="2106-3" displayName="White" codeSystem="2.16.840.1.113883.6.238"/>
     <sdtc:raceCode code="2076-8" displayName="Native Hawaiian" codeSystem="2.16.840.1.113883.6.238"/>
     <ethnicGroupCode code="2186-5" displayName="Not Hispanic or Latino" codeSystem="2.16.840.1.113883.6.238"/>
     <languageCommunication><languageCode code="en"/><preferenceInd value="true"/></languageCommunication>
   </patient></patientRole></recordTarget>
 <author><time value="20200102"/><assignedAuthor><id root="2.16.840.1.113883.4.6" extension="111"/>
   <assignedPerson><name><given>Henry</given><family>Seven</family></name></assignedPerson>
   <representedOrganization><id root="2.16.840.1.113883.19.5"/><name>Good Health</name></representedOrganization>
 </assignedAuthor></author>
 <custodian><assignedCustodian><representedCustodianOrganization><id root="2.16.840.1.113883.19.5"/>
   <name>Good Health</name></representedCustodianOrganization></assignedCustodian></custodian>
 <componentOf><encompassingEncounter><id root="2.16.840.1.113883.19.5" extension="ENC-1"/>
   <code code="AMB" codeSystem="2.16.840.1.113883.5.4"/>
   <effectiveTime><low value="20200101"/><high value="20200102"/></effectiveTime></encompassingEncounter></componentOf>
 <component><structuredBody>
 {
    section(
        f"{T}.2.6.1",
        "48765-2",
        "Allergies",
        f'''
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.30"/><id root="a1"/>
   <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/><statusCode code="active"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.7"/>
    <id root="a1o"/><code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/><statusCode code="completed"/>
    <effectiveTime><low value="2010"/></effectiveTime>
    <value xsi:type="CD" code="416098002" {SCT} displayName="Drug allergy"/>
    <participant typeCode="CSM"><participantRole classCode="MANU"><playingEntity classCode="MMAT">
      <code code="7980" codeSystem="2.16.840.1.113883.6.88" displayName="Penicillin G"/></playingEntity>
    </participantRole></participant>
    <entryRelationship typeCode="MFST" inversionInd="true"><observation classCode="OBS" moodCode="EVN">
      <templateId root="{T}.4.9"/><code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/>
      <value xsi:type="CD" code="247472004" {SCT} displayName="Hives"/>
      <entryRelationship typeCode="SUBJ" inversionInd="true"><observation classCode="OBS" moodCode="EVN">
        <templateId root="{T}.4.8"/><code code="SEV" codeSystem="2.16.840.1.113883.5.4"/>
        <value xsi:type="CD" code="6736007" {SCT}/></observation></entryRelationship>
    </observation></entryRelationship>
   </observation></entryRelationship></act></entry>
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.30"/><id root="a2"/>
   <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/><statusCode code="active"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN" negationInd="true">
    <templateId root="{T}.4.7"/><id root="a2o"/><code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/>
    <value xsi:type="CD" code="419199007" {SCT}/>
    <participant typeCode="CSM"><participantRole classCode="MANU"><playingEntity classCode="MMAT">
      <code nullFlavor="NA"/></playingEntity></participantRole></participant>
   </observation></entryRelationship></act></entry>''',
    )
}
 {
    section(
        f"{T}.2.5.1",
        "11450-4",
        "Problems",
        f'''
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.3"/><id root="p1"/>
   <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/><statusCode code="completed"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.4"/>
    <id root="p1o"/><code code="55607006" {SCT}/><text><reference value="#prob1"/></text>
    <statusCode code="completed"/>
    <effectiveTime><low value="20190101"/><high value="20190301"/></effectiveTime>
    <value xsi:type="CD" code="233604007" {SCT} displayName="Pneumonia">
      <translation code="J18.9" codeSystem="2.16.840.1.113883.6.90" displayName="Pneumonia, unspecified"/>
    </value></observation></entryRelationship></act></entry>
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.3"/><id root="p2"/>
   <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/><statusCode code="active"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN" negationInd="true">
    <templateId root="{T}.4.4"/><id root="p2o"/><code code="55607006" {SCT}/><statusCode code="completed"/>
    <effectiveTime><low nullFlavor="UNK"/></effectiveTime>
    <value xsi:type="CD" code="44054006" {SCT} displayName="Diabetes"/></observation></entryRelationship></act></entry>''',
        '<paragraph ID="prob1">Pneumonia (resolved)</paragraph>',
    )
}
 {
    section(
        f"{T}.2.1.1",
        "10160-0",
        "Medications",
        f'''
  <entry><substanceAdministration classCode="SBADM" moodCode="EVN"><templateId root="{T}.4.16"/><id root="m1"/>
   <text>Take one tablet daily</text><statusCode code="active"/>
   <effectiveTime xsi:type="IVL_TS"><low value="20190101"/></effectiveTime>
   <effectiveTime xsi:type="PIVL_TS" operator="A"><period value="24" unit="h"/></effectiveTime>
   <routeCode code="C38288" codeSystem="2.16.840.1.113883.3.26.1.1" displayName="ORAL"/>
   <doseQuantity value="1"/>
   <consumable><manufacturedProduct><manufacturedMaterial>
     <code code="197361" codeSystem="2.16.840.1.113883.6.88" displayName="Amlodipine 5 MG"/>
   </manufacturedMaterial></manufacturedProduct></consumable></substanceAdministration></entry>''',
    )
}
 {
    section(
        f"{T}.2.3.1",
        "30954-2",
        "Results",
        f'''
  <entry><organizer classCode="BATTERY" moodCode="EVN"><templateId root="{T}.4.1"/><id root="r1"/>
   <code code="24323-8" {LN} displayName="CMP"/><statusCode code="completed"/>
   <effectiveTime value="20200101083000-0500"/>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.2"/><id root="r1a"/>
    <code code="2345-7" {LN} displayName="Glucose"/><statusCode code="completed"/>
    <effectiveTime value="20200101083000-0500"/><value xsi:type="PQ" value="105" unit="mg/dL"/>
    <interpretationCode code="H" codeSystem="2.16.840.1.113883.5.83"/>
    <referenceRange><observationRange><value xsi:type="IVL_PQ"><low value="70" unit="mg/dL"/>
      <high value="99" unit="mg/dL"/></value></observationRange></referenceRange></observation></component>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.2"/><id root="r1b"/>
    <code code="1751-7" {LN} displayName="Albumin"/><statusCode code="completed"/>
    <value xsi:type="IVL_PQ"><high value="0.5" unit="g/dL" inclusive="false"/></value></observation></component>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.2"/><id root="r1c"/>
    <code code="5778-6" {LN}/><statusCode code="completed"/><value xsi:type="PQ" nullFlavor="UNK"/>
   </observation></component>
  </organizer></entry>''',
    )
}
 {
    section(
        f"{T}.2.4.1",
        "8716-3",
        "Vital Signs",
        f'''
  <entry><organizer classCode="CLUSTER" moodCode="EVN"><templateId root="{T}.4.26"/><id root="v1"/>
   <code code="46680005" {SCT}/><statusCode code="completed"/><effectiveTime value="20200101"/>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.27"/><id root="v1a"/>
    <code code="8867-4" {LN} displayName="Heart rate"/><statusCode code="completed"/>
    <value xsi:type="PQ" value="72" unit="/min"/></observation></component></organizer></entry>''',
    )
}
 {
    section(
        f"{T}.2.2.1",
        "11369-6",
        "Immunizations",
        f'''
  <entry><substanceAdministration classCode="SBADM" moodCode="EVN" negationInd="true"><templateId root="{T}.4.52"/>
   <id root="i1"/><statusCode code="completed"/><effectiveTime value="20191001"/>
   <consumable><manufacturedProduct><manufacturedMaterial>
     <code code="140" codeSystem="2.16.840.1.113883.12.292" displayName="Influenza"/>
   </manufacturedMaterial></manufacturedProduct></consumable>
   <entryRelationship typeCode="RSON"><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.53"/>
    <code code="PATOBJ" codeSystem="2.16.840.1.113883.5.8" displayName="patient objection"/></observation>
   </entryRelationship></substanceAdministration></entry>''',
    )
}
 {
    section(
        f"{T}.2.7.1",
        "47519-4",
        "Procedures",
        f'''
  <entry><procedure classCode="PROC" moodCode="EVN"><templateId root="{T}.4.14"/><id root="pr1"/>
   <code code="80146002" {SCT} displayName="Appendectomy"/><statusCode code="completed"/>
   <effectiveTime value="20150101"/></procedure></entry>''',
    )
}
 {
    section(
        f"{T}.2.22.1",
        "46240-8",
        "Encounters",
        f'''
  <entry><encounter classCode="ENC" moodCode="EVN"><templateId root="{T}.4.49"/><id root="e1"/>
   <code code="99213" codeSystem="2.16.840.1.113883.6.12" displayName="Office visit"/>
   <effectiveTime><low value="20180101"/></effectiveTime></encounter></entry>''',
    )
}
 {
    section(
        f"{T}.2.17",
        "29762-2",
        "Social History",
        f'''
  <entry><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.78"/><id root="s1"/>
   <code code="72166-2" {LN} displayName="Tobacco smoking status"/><statusCode code="completed"/>
   <effectiveTime value="20200101"/>
   <value xsi:type="CD" code="8517006" {SCT} displayName="Former smoker"/></observation></entry>''',
    )
}
 {
    section(
        f"{T}.2.15",
        "10157-6",
        "Family History",
        f'''
  <entry><organizer classCode="CLUSTER" moodCode="EVN"><templateId root="{T}.4.45"/><id root="f1"/>
   <statusCode code="completed"/>
   <subject><relatedSubject classCode="PRS"><code code="FTH" codeSystem="2.16.840.1.113883.5.111"
     displayName="Father"/><subject><administrativeGenderCode code="M" codeSystem="2.16.840.1.113883.5.1"/>
     </subject></relatedSubject></subject>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.46"/><id root="f1a"/>
    <code code="64572001" {SCT}/><value xsi:type="CD" code="22298006" {SCT} displayName="MI"/>
    <entryRelationship typeCode="SUBJ" inversionInd="true"><observation classCode="OBS" moodCode="EVN">
     <templateId root="{T}.4.31"/><code code="445518008" {SCT}/><value xsi:type="PQ" value="57" unit="a"/>
    </observation></entryRelationship></observation></component></organizer></entry>''',
    )
}
 {
    section(
        f"{T}.2.10",
        "18776-5",
        "Plan of Treatment",
        f'''
  <entry><observation classCode="OBS" moodCode="RQO"><templateId root="{T}.4.44"/><id root="pl1"/>
   <code code="4548-4" {LN} displayName="HbA1c"/><statusCode code="active"/>
   <effectiveTime value="20200601"/></observation></entry>''',
    )
}
 {
    section(
        f"{T}.2.60",
        "61146-7",
        "Goals",
        f'''
  <entry><observation classCode="OBS" moodCode="GOL"><templateId root="{T}.4.121"/><id root="g1"/>
   <code code="29463-7" {LN} displayName="Body weight"/><statusCode code="active"/>
   <value xsi:type="PQ" value="80" unit="kg"/></observation></entry>''',
    )
}
 {
    section(
        f"{T}.2.18",
        "48768-6",
        "Payers",
        f'''
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.60"/><id root="c1"/>
   <code code="48768-6" {LN}/><statusCode code="completed"/>
   <entryRelationship typeCode="COMP"><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.61"/>
    <id root="c1p" extension="GRP-1"/><code code="6" codeSystem="2.16.840.1.113883.3.221.5" displayName="BCBS"/>
    <statusCode code="completed"/>
    <performer typeCode="PRF"><assignedEntity><id root="2.16.840.1.113883.19.9"/>
     <representedOrganization><name>Blue Cross</name></representedOrganization></assignedEntity></performer>
    <participant typeCode="COV"><participantRole><id root="1.2.3.4" extension="SUB-42"/>
     <code code="SELF" codeSystem="2.16.840.1.113883.5.111"/></participantRole></participant>
   </act></entryRelationship></act></entry>''',
    )
}
 {
    section(
        f"{T}.2.65",
        "11488-4",
        "Notes",
        f'''
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.202"/><id root="n1"/>
   <code code="34109-9" {LN} displayName="Note"/><text><reference value="#note1"/></text>
   <statusCode code="completed"/><effectiveTime value="20200102030405-0500"/></act></entry>''',
        '<paragraph ID="note1">Patient doing well.</paragraph>',
    )
}
 <component><section><code code="10164-2" {LN}/><title>History of Present Illness</title>
   <text><list listType="ordered"><item>Cough for <content styleCode="Bold">3 days</content></item></list></text>
 </section></component>
 <component><section nullFlavor="NI"><templateId root="{T}.2.23"/><code code="46264-8" {LN}/>
   <title>Medical Equipment</title><text/></section></component>
 </structuredBody></component>
</ClinicalDocument>
"""


@pytest.fixture(scope="module")
def converted() -> ConvertedBundle:
    [out] = list(CcdaAdapter().convert(DOC.encode(), SRC, filename="ccd.xml"))
    if isinstance(out, RejectedRecord):
        pytest.fail(str(out.error))
    return out


def of(out: ConvertedBundle, rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def codes(cc: dict[str, Any]) -> set[str]:
    return {c["code"] for c in cc.get("coding", [])}


def test_header(converted: ConvertedBundle) -> None:
    [pat] = of(converted, "Patient")
    assert pat["name"][0] == {"family": "Everywoman", "given": ["Eve", "A"], "use": "official"}
    assert pat["gender"] == "female" and pat["birthDate"] == "1975-05-01"
    assert {"system": "urn:oid:2.16.840.1.113883.19.5.99", "value": "MRN-7"} in pat["identifier"]
    assert pat["telecom"] == [{"system": "phone", "value": "+1(555)555-2003", "use": "home"}]
    race = next(x for x in pat["extension"] if x["url"].endswith("us-core-race"))
    assert [x["url"] for x in race["extension"]] == ["ombCategory", "ombCategory", "text"]
    assert converted.routing_key == "urn:oid:2.16.840.1.113883.19.5.99|MRN-7"
    [comp] = of(converted, "Composition")
    assert comp["date"] == "2020-01-02T03:04:05-05:00"
    assert comp["meta"]["tag"][0]["code"] == "CCD"
    assert comp["title"] == "Test CCD" and comp["confidentiality"] == "N"
    assert comp["author"][0]["reference"].startswith("Practitioner/")
    assert comp["custodian"]["reference"].startswith("Organization/")
    assert comp["encounter"]["reference"].startswith("Encounter/")
    assert converted.bundle["timestamp"] == "2020-01-02T03:04:05-05:00"
    assert converted.message_id == "2.16.840.1.113883.19.5|DOC-1"


def test_narrative_kept_on_composition(converted: ConvertedBundle) -> None:
    [comp] = of(converted, "Composition")
    hpi = next(s for s in comp["section"] if s["title"] == "History of Present Illness")
    assert hpi["text"]["div"] == (
        '<div xmlns="http://www.w3.org/1999/xhtml"><ol><li>Cough for '
        '<span class="Bold">3 days</span></li></ol></div>'
    )
    empty = next(s for s in comp["section"] if s["title"] == "Medical Equipment")
    assert empty["emptyReason"]["coding"][0]["code"] == "unavailable"
    allergies = next(s for s in comp["section"] if s["title"] == "Allergies")
    assert len(allergies["entry"]) == 2


def test_allergies_with_negation(converted: ConvertedBundle) -> None:
    pen, nka = of(converted, "AllergyIntolerance")
    assert codes(pen["code"]) == {"7980"}
    assert pen["category"] == ["medication"] and pen["type"] == "allergy"
    assert pen["reaction"][0]["manifestation"][0]["coding"][0]["code"] == "247472004"
    assert pen["reaction"][0]["severity"] == "moderate"
    assert pen["onsetDateTime"] == "2010"
    assert codes(nka["code"]) == {"716186003"}


def test_problems_interval_translation_negation_and_narrative_reference(converted: ConvertedBundle) -> None:
    pneu, diab = of(converted, "Condition")
    assert [c["system"] for c in pneu["code"]["coding"]] == [
        "http://snomed.info/sct",
        "http://hl7.org/fhir/sid/icd-10-cm",
    ]
    assert pneu["onsetDateTime"] == "2019-01-01" and pneu["abatementDateTime"] == "2019-03-01"
    assert pneu["clinicalStatus"]["coding"][0]["code"] == "resolved"
    assert pneu["note"] == [{"text": "Pneumonia (resolved)"}]
    assert diab["verificationStatus"]["coding"][0]["code"] == "refuted"
    assert "onsetDateTime" not in diab


def test_medication_statement(converted: ConvertedBundle) -> None:
    [ms] = of(converted, "MedicationStatement")
    assert ms["status"] == "active" and ms["effectivePeriod"] == {"start": "2019-01-01"}
    d = ms["dosage"][0]
    assert d["timing"]["repeat"] == {"frequency": 1, "period": 24, "periodUnit": "h"}
    assert d["doseAndRate"][0]["doseQuantity"]["value"] == 1
    assert d["text"] == "Take one tablet daily"


def test_results_and_vitals(converted: ConvertedBundle) -> None:
    [rep] = of(converted, "DiagnosticReport")
    obs = {next(iter(codes(o["code"]))): o for o in of(converted, "Observation")}
    assert len(rep["result"]) == 3
    glu = obs["2345-7"]
    assert glu["valueQuantity"] == {
        "value": 105,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }
    assert glu["referenceRange"][0]["low"]["value"] == 70
    assert glu["interpretation"][0]["coding"][0]["code"] == "H"
    assert obs["1751-7"]["valueQuantity"]["comparator"] == "<"
    assert obs["5778-6"]["dataAbsentReason"]["coding"][0]["code"] == "unknown"
    assert obs["8867-4"]["category"][0]["coding"][0]["code"] == "vital-signs"
    assert obs["8867-4"]["effectiveDateTime"] == "2020-01-01"
    assert obs["72166-2"]["category"][0]["coding"][0]["code"] == "social-history"


def test_immunization_refused(converted: ConvertedBundle) -> None:
    [imm] = of(converted, "Immunization")
    assert imm["status"] == "not-done"
    assert codes(imm["statusReason"]) == {"PATOBJ"}


def test_other_sections(converted: ConvertedBundle) -> None:
    assert of(converted, "Procedure")[0]["performedDateTime"] == "2015-01-01"
    encs = of(converted, "Encounter")
    assert len(encs) == 2
    [fmh] = of(converted, "FamilyMemberHistory")
    assert codes(fmh["relationship"]) == {"FTH"} and fmh["condition"][0]["onsetAge"]["value"] == 57
    [sr] = of(converted, "ServiceRequest")
    assert sr["intent"] == "order" and sr["occurrenceDateTime"] == "2020-06-01"
    [goal] = of(converted, "Goal")
    assert goal["target"][0]["detailQuantity"]["value"] == 80
    [cov] = of(converted, "Coverage")
    assert cov["subscriberId"] == "SUB-42"
    payer = next(o for o in of(converted, "Organization") if o.get("name") == "Blue Cross")
    assert cov["payor"][0]["reference"] == f"Organization/{payer['id']}"
    [note] = of(converted, "DocumentReference")
    assert note["content"][0]["attachment"]["contentType"] == "text/plain"


def test_all_references_resolve_inside_bundle(converted: ConvertedBundle) -> None:
    ids = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in converted.bundle["entry"]}

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            if isinstance(o.get("reference"), str):
                assert o["reference"] in ids, o["reference"]
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(converted.bundle)


def test_deterministic_and_ids_stable() -> None:
    a = next(iter(CcdaAdapter().convert(DOC.encode(), SRC)))
    b = next(iter(CcdaAdapter().convert(DOC.encode(), SRC)))
    assert isinstance(a, ConvertedBundle) and isinstance(b, ConvertedBundle)
    assert a.body == b.body


def test_vendor_mess_missing_templates_wrong_code_system_empty_section() -> None:
    doc = DOC.replace(f'<templateId root="{T}.2.5.1" extension="2015-08-01"/>', "")
    doc = doc.replace(
        'code="233604007" codeSystem="2.16.840.1.113883.6.96"',
        'code="233604007" codeSystem="SNOMED" codeSystemName="SNOMED CT"',
    )
    [out] = list(CcdaAdapter().convert(doc.encode(), SRC))
    assert isinstance(out, ConvertedBundle)
    warn = {w.code for w in out.warnings}
    assert {"missing-template-id", "code-system-guessed"} <= warn
    pneu = of(out, "Condition")[0]
    assert pneu["code"]["coding"][0]["system"] == "http://snomed.info/sct"
    prov = of(out, "Provenance")[0]
    assert any(e["extension"][0]["valueCode"] == "code-system-guessed" for e in prov["extension"])


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "not well-formed"),
        (b"hello", "not well-formed"),
        (b"<root/>", "<root>"),
        (b"<section/>", "fragments=true"),
        (b"<ClinicalDocument><x></ClinicalDocument>", "not well-formed"),
    ],
)
def test_bad_documents_rejected_with_location(data: bytes, needle: str) -> None:
    [out] = list(CcdaAdapter().convert(data, SRC, filename="bad.xml"))
    assert isinstance(out, RejectedRecord)
    assert needle in out.error.message and out.error.location.file == "bad.xml"


def test_empty_clinical_document_converts_with_warnings() -> None:
    [out] = list(CcdaAdapter().convert(b'<ClinicalDocument xmlns="urn:hl7-org:v3"/>', SRC))
    assert isinstance(out, ConvertedBundle)
    assert {"no-record-target", "no-author", "no-body"} <= {w.code for w in out.warnings}


# -- shared samples ---------------------------------------------------------------------------------
def _documents(samples: Path) -> list[Path]:
    base = samples / "ccda"
    return sorted(p for p in base.rglob("*") if p.is_file() and "fragments" not in p.parts)


def test_every_sample_document_converts_and_validates(samples: Path) -> None:
    docs = _documents(samples)
    assert len(docs) == 29
    seen: Counter[str] = Counter()
    adapter = CcdaAdapter()
    from adapters.ccda.xmlsecure import parse

    for p in docs:
        data = p.read_bytes()
        [out] = list(adapter.convert(data, SRC, filename=str(p)))
        assert isinstance(out, ConvertedBundle), str(out.error)  # type: ignore[union-attr]
        assert of(out, "Patient") and of(out, "Composition") and of(out, "Provenance")
        dt = document_type(parse(data))
        seen[dt or "?"] += 1
    nine = {
        "CCD",
        "Consultation Note",
        "Discharge Summary",
        "History and Physical",
        "Operative Note",
        "Procedure Note",
        "Progress Note",
        "Referral Note",
        "Transfer Summary",
    }
    assert nine <= set(seen), seen


def test_one_sample_revalidates(samples: Path) -> None:
    p = samples / "ccda" / "ms-fhir-converter" / "Transfer_Summary.ccda"
    [out] = list(CcdaAdapter().convert(p.read_bytes(), SRC))
    assert isinstance(out, ConvertedBundle)
    validate_bundle(out.bundle)
    kinds = Counter(e["resource"]["resourceType"] for e in out.bundle["entry"])
    for rt in (
        "AllergyIntolerance",
        "Condition",
        "Observation",
        "DiagnosticReport",
        "Immunization",
        "Procedure",
        "FamilyMemberHistory",
        "Coverage",
        "Goal",
        "ServiceRequest",
    ):
        assert kinds[rt] >= 1, rt


def test_every_fragment_converts_with_fragments_option(samples: Path) -> None:
    frags = sorted(p for p in (samples / "ccda").rglob("*") if p.is_file() and "fragments" in p.parts)
    assert len(frags) == 131
    adapter = CcdaAdapter(fragments="true")
    for p in frags:
        [out] = list(adapter.convert(p.read_bytes(), SRC, filename=str(p)))
        assert isinstance(out, ConvertedBundle), str(out.error)  # type: ignore[union-attr]


# -- HL7 timestamps (adapters.common.dates), property-tested ---------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(min_value=datetime(1800, 1, 1), max_value=datetime(2200, 12, 31)),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)
def test_hl7_ts_round_trips_with_offset(dt: datetime, offset_min: int) -> None:
    sign = "+" if offset_min >= 0 else "-"
    off = f"{sign}{abs(offset_min) // 60:02d}{abs(offset_min) % 60:02d}"
    out = hl7_ts_to_fhir(f"{dt:%Y%m%d%H%M%S}{off}")
    assert out is not None
    parsed = datetime.fromisoformat(out)
    assert parsed == dt.replace(microsecond=0, tzinfo=timezone(timedelta(minutes=offset_min)))


@settings(max_examples=100, deadline=None)
@given(st.dates(min_value=datetime(1000, 1, 1).date()), st.sampled_from([4, 6, 8]))
def test_hl7_ts_keeps_precision(d: Any, digits: int) -> None:
    out = hl7_ts_to_fhir(f"{d:%Y%m%d}"[:digits])
    assert out == d.isoformat()[: {4: 4, 6: 7, 8: 10}[digits]]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_hl7_ts_never_raises(s: str) -> None:
    out = hl7_ts_to_fhir(s, "America/New_York")
    assert out is None or out[:4].isdigit()


def test_hl7_ts_local_time_uses_source_zone() -> None:
    assert hl7_ts_to_fhir("20200701120000", "America/New_York") == "2020-07-01T12:00:00-04:00"
    assert hl7_ts_to_fhir("20200101120000", "America/New_York") == "2020-01-01T12:00:00-05:00"
    assert hl7_ts_to_fhir("20200101120000") == "2020-01-01T12:00:00Z"
    assert hl7_ts_to_fhir("20200230") is None and hl7_ts_to_fhir("2020010112-9900") is None
    assert datetime.fromisoformat(hl7_ts_to_fhir("20200101120000Z") or "").tzinfo == UTC


EQUIPMENT = f"""<section xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <templateId root="{T}.2.23"/><code code="46264-8" {LN}/><title>Medical Equipment</title>
 <text><paragraph ID="eq1">Cane</paragraph></text>
 <entry><supply classCode="SPLY" moodCode="EVN"><templateId root="{T}.4.50"/><id root="s-1"/>
  <text><reference value="#eq1"/></text><statusCode code="active"/>
  <effectiveTime xsi:type="IVL_TS"><low value="20000113"/><high nullFlavor="NI"/></effectiveTime>
  <participant typeCode="PRD"><participantRole classCode="MANU"><id nullFlavor="UNK"/>
   <playingDevice><code code="87405001" {SCT} displayName="Cane"/></playingDevice></participantRole></participant>
 </supply></entry>
 <entry><procedure classCode="PROC" moodCode="EVN"><templateId root="{T}.4.14"/><id root="pr-9"/>
  <code code="609588000" {SCT} displayName="Total knee replacement"/><statusCode code="completed"/>
  <effectiveTime value="20160413"/>
  <participant typeCode="DEV"><participantRole classCode="MANU"><templateId root="{T}.4.37"/>
   <id root="2.16.840.1.113883.3.3719" extension="(01)00848486000400(11)160330(10)ABC456"/>
   <playingDevice><code code="702080006" {SCT} displayName="Knee prosthesis"/></playingDevice>
  </participantRole></participant></procedure></entry>
 <entry><procedure classCode="PROC" moodCode="EVN" negationInd="true"><templateId root="{T}.4.14"/><id root="pr-10"/>
  <code code="71388002" {SCT} displayName="Procedure"/><statusCode code="completed"/>
  <participant typeCode="DEV"><participantRole><playingDevice><code code="40388003" {SCT}/></playingDevice>
  </participantRole></participant></procedure></entry>
</section>"""


def test_medical_equipment_and_implants() -> None:
    [out] = list(CcdaAdapter(fragments="true").convert(EQUIPMENT.encode(), SRC, filename="eq.xml"))
    assert isinstance(out, ConvertedBundle), out
    [use] = of(out, "DeviceUseStatement")
    assert use["status"] == "active" and use["timingPeriod"] == {"start": "2000-01-13"}
    devices = {d["id"]: d for d in of(out, "Device")}
    assert len(devices) == 2  # the cane and the knee prosthesis; the negated procedure implanted nothing
    assert codes(devices[use["device"]["reference"].split("/")[1]]["type"]) == {"87405001"}
    knee, none = of(out, "Procedure")
    implant = devices[knee["focalDevice"][0]["manipulated"]["reference"].split("/")[1]]
    assert implant["udiCarrier"][0]["carrierHRF"] == "(01)00848486000400(11)160330(10)ABC456"
    assert none["status"] == "not-done" and "focalDevice" not in none


# -- one odd value must not make the adapter build invalid FHIR -------------------------------------


def test_dates_before_1000_offsets_past_14h_and_year_zero() -> None:
    assert hl7_ts_to_fhir("05000101120000") == "0500-01-01T12:00:00Z"
    assert hl7_ts_to_fhir("05000101") == "0500-01-01"
    assert hl7_ts_to_fhir("20200101120000+1400") == "2020-01-01T12:00:00+14:00"
    assert hl7_ts_to_fhir("20200101120000+1430") is None
    assert hl7_ts_to_fhir("20200101120000-1500") is None
    assert hl7_ts_to_fhir("00000101") is None and hl7_ts_to_fhir("0000") is None


def test_a_unit_with_spaces_and_a_foreign_root_namespace() -> None:
    doc = DOC.replace('unit="mg/dL"', 'unit=" mg/dL "', 1)
    assert doc != DOC
    [out] = list(CcdaAdapter().convert(doc.encode(), SRC, filename="ccd.xml"))
    assert isinstance(out, ConvertedBundle), out
    units = {q.get("code") for o in of(out, "Observation") for q in [o.get("valueQuantity") or {}]}
    assert "mg/dL" in units and " mg/dL " not in units
    foreign = DOC.replace('xmlns="urn:hl7-org:v3"', 'xmlns="urn:other"', 1)
    assert foreign != DOC
    [rej] = list(CcdaAdapter().convert(foreign.encode(), SRC, filename="ccd.xml"))
    assert isinstance(rej, RejectedRecord) and "not in the C-CDA namespace" in rej.error.message


# -- an entry with two known templateIds is dispatched on the first in document order ------------------
TWO_TEMPLATES = DOC.replace(
    f'<templateId root="{T}.4.78"/><id root="s1"/>',
    f'<templateId root="{T}.4.78"/><templateId root="{T}.4.4"/><id root="s1"/>',
)


def test_an_entry_with_two_known_templates_converts_the_same_in_every_process() -> None:
    """The first known templateId in document order decides (smoking status, not a problem), whatever
    the string hash seed of the process."""
    import json
    import subprocess
    import sys

    assert TWO_TEMPLATES != DOC
    script = (
        "import json, sys; from adapters.base import SourceInfo; from adapters.ccda import CcdaAdapter; "
        "[o] = CcdaAdapter().convert(sys.stdin.buffer.read(), SourceInfo('acme')); "
        "print(json.dumps(sorted(e['resource']['resourceType'] for e in o.bundle['entry'] "
        "if '8517006' in json.dumps(e['resource']))))"
    )
    seen = set()
    for seed in range(6):
        run = subprocess.run(
            [sys.executable, "-c", script],
            input=TWO_TEMPLATES.encode(),
            capture_output=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
            cwd=Path(__file__).resolve().parents[3],
            check=True,
            timeout=60,
        )
        seen.add(tuple(json.loads(run.stdout)))
    assert seen == {("Observation",)}
