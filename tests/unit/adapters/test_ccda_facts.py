"""C-CDA adapter, no clinical fact lost in conversion: null-flavoured codes that carry text,
encounter dates, who and where of an encounter, eICR travel history and pregnancy status.

Every document here is written for its test (a minimal C-CDA document), not copied from samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapters.base import ConvertedBundle, SourceInfo
from adapters.bundle import validate_bundle
from adapters.ccda import CcdaAdapter
from adapters.conformance import run

SRC = SourceInfo("acme", timezone="America/New_York")
T = "2.16.840.1.113883.10.20.22"
LN = 'codeSystem="2.16.840.1.113883.6.1"'
SCT = 'codeSystem="2.16.840.1.113883.6.96"'
NPI = "2.16.840.1.113883.4.6"
PTYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def document(body: str, *, encounter: str = "") -> bytes:
    """A minimal C-CDA document: header, one patient, an optional encompassingEncounter, the sections."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xmlns:sdtc="urn:hl7-org:sdtc">
 <templateId root="{T}.1.1" extension="2015-08-01"/>
 <id root="2.16.840.1.113883.19.5" extension="ISSUE-19"/>
 <code code="34133-9" {LN}/>
 <effectiveTime value="20201107120000-0500"/>
 <recordTarget><patientRole><id root="2.16.840.1.113883.19.5.99" extension="MRN-19"/>
   <patient><name><given>Ann</given><family>Test</family></name>
   <administrativeGenderCode code="F" codeSystem="2.16.840.1.113883.5.1"/><birthTime value="19900101"/></patient>
 </patientRole></recordTarget>
 <author><time value="20201107"/><assignedAuthor><id root="{NPI}" extension="999"/>
   <assignedPerson><name><given>Al</given><family>Author</family></name></assignedPerson></assignedAuthor></author>
 {encounter}
 <component><structuredBody>{body}</structuredBody></component>
</ClinicalDocument>""".encode()


def section(tpl: str, code: str, entries: str, text: str = "<paragraph>x</paragraph>") -> str:
    return f"""<component><section><templateId root="{tpl}"/><code code="{code}" {LN}/><title>S</title>
      <text>{text}</text>{entries}</section></component>"""


def convert(data: bytes) -> ConvertedBundle:
    [out] = list(CcdaAdapter().convert(data, SRC, filename="issue19.xml"))
    assert isinstance(out, ConvertedBundle), out
    validate_bundle(out.bundle)
    return out


def assert_conformant(data: bytes, tmp_path: Path) -> None:
    """The conformance kit on the fixture: validation, determinism, references, located rejections."""
    p = tmp_path / "doc.xml"
    p.write_bytes(data)
    report = run(CcdaAdapter(), [p], SRC, mutations=3)
    assert report.ok, report.render()


def of(out: ConvertedBundle, rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def by_ref(out: ConvertedBundle, ref: str) -> dict[str, Any]:
    rtype, rid = ref.split("/")
    return next(r for r in of(out, rtype) if r["id"] == rid)


def codes(cc: dict[str, Any] | None) -> set[str]:
    return {c["code"] for c in (cc or {}).get("coding", [])}


def obs_by_code(out: ConvertedBundle) -> dict[str, dict[str, Any]]:
    return {c: o for o in of(out, "Observation") for c in codes(o["code"]) | {o["code"].get("text", "")}}


# -- null-flavoured coded values that carry text ---------------------------------------------------
NULL_CODED = document(
    section(
        f"{T}.2.3.1",
        "30954-2",
        f"""
  <entry><organizer classCode="BATTERY" moodCode="EVN"><templateId root="{T}.4.1"/><id root="r1"/>
   <code code="94500-6" {LN}/><statusCode code="completed"/><effectiveTime value="20201105"/>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.2"/><id root="r1a"/>
    <code code="94500-6" {LN}/><statusCode code="completed"/>
    <value xsi:type="CD" nullFlavor="UNK"><originalText>DETECTED</originalText></value></observation></component>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.2"/><id root="r1b"/>
    <code code="94309-2" {LN}/><statusCode code="completed"/>
    <value xsi:type="CD" nullFlavor="OTH"><originalText><reference value="#res2"/></originalText></value>
   </observation></component>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.2"/><id root="r1c"/>
    <code code="94531-1" {LN}/><statusCode code="completed"/>
    <value xsi:type="CE" nullFlavor="OTH"><translation code="POS" codeSystem="2.16.840.1.113883.19.9.1"
      displayName="Positive"/></value></observation></component>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.2"/><id root="r1d"/>
    <code code="94558-4" {LN}/><statusCode code="completed"/><value xsi:type="CD" nullFlavor="UNK"/>
   </observation></component>
   <component><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.2"/><id root="r1e"/>
    <code code="26464-8" {LN}/><statusCode code="completed"/>
    <value xsi:type="PQ" nullFlavor="OTH"><translation value="7.2" nullFlavor="OTH">
      <originalText>THOUS/MCL</originalText></translation></value></observation></component>
  </organizer></entry>""",
        '<paragraph ID="res2">Positive for SARS-CoV-2</paragraph>',
    )
    + section(
        f"{T}.2.5.1",
        "11450-4",
        f"""
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.3"/><id root="p1"/>
   <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/><statusCode code="active"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.4"/>
    <id root="p1o"/><code code="55607006" {SCT}/><statusCode code="completed"/>
    <value xsi:type="CD" nullFlavor="OTH"><originalText><reference value="#prob1"/></originalText></value>
   </observation></entryRelationship></act></entry>""",
        '<paragraph ID="prob1">Long COVID</paragraph>',
    )
    + section(
        f"{T}.2.6.1",
        "48765-2",
        f"""
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.30"/><id root="a1"/>
   <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/><statusCode code="active"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.7"/>
    <id root="a1o"/><code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/><statusCode code="completed"/>
    <value xsi:type="CD" code="419511003" {SCT}/>
    <participant typeCode="CSM"><participantRole classCode="MANU"><playingEntity classCode="MMAT">
      <code code="7980" codeSystem="2.16.840.1.113883.6.88"/></playingEntity></participantRole></participant>
    <entryRelationship typeCode="MFST" inversionInd="true"><observation classCode="OBS" moodCode="EVN">
      <templateId root="{T}.4.9"/><code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/>
      <value xsi:type="CD" nullFlavor="OTH"><originalText>Swollen tongue</originalText></value>
    </observation></entryRelationship>
   </observation></entryRelationship></act></entry>""",
    )
    + section(
        f"{T}.2.7.1",
        "47519-4",
        f"""
  <entry><procedure classCode="PROC" moodCode="EVN"><templateId root="{T}.4.14"/><id root="pr1"/>
   <code nullFlavor="OTH"><originalText><reference value="#proc1"/></originalText></code>
   <statusCode code="completed"/><effectiveTime value="20201101"/></procedure></entry>""",
        '<paragraph ID="proc1">Nasopharyngeal swab</paragraph>',
    )
)


def test_a_null_flavoured_coded_value_keeps_its_text(tmp_path: Path) -> None:
    out = convert(NULL_CODED)
    obs = obs_by_code(out)
    detected = obs["94500-6"]
    assert detected["valueCodeableConcept"] == {"text": "DETECTED"}
    assert "dataAbsentReason" not in detected
    assert obs["94309-2"]["valueCodeableConcept"] == {
        "text": "Positive for SARS-CoV-2"
    }  # narrative reference
    assert codes(obs["94531-1"].get("valueCodeableConcept")) == {"POS"}  # a translation is a value too
    assert obs["94558-4"]["dataAbsentReason"]["coding"][0]["code"] == "unknown"  # nothing to keep
    # a quantity whose unit is not UCUM: the number and the sender's unit, no UCUM code
    assert obs["26464-8"]["valueQuantity"] == {"value": 7.2, "unit": "THOUS/MCL"}
    [cond] = of(out, "Condition")
    assert cond["code"] == {"text": "Long COVID"}
    [allergy] = of(out, "AllergyIntolerance")
    assert allergy["reaction"][0]["manifestation"] == [{"text": "Swollen tongue"}]
    [proc] = of(out, "Procedure")
    assert proc["code"] == {"text": "Nasopharyngeal swab"}
    assert_conformant(NULL_CODED, tmp_path)


def test_a_negated_allergy_to_a_substance_named_only_in_text_is_not_no_known_allergy() -> None:
    doc = document(
        section(
            f"{T}.2.6.1",
            "48765-2",
            f"""
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.30"/><id root="a2"/>
   <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/><statusCode code="active"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN" negationInd="true">
    <templateId root="{T}.4.7"/><id root="a2o"/><code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/>
    <statusCode code="completed"/><value xsi:type="CD" code="419511003" {SCT}/>
    <participant typeCode="CSM"><participantRole classCode="MANU"><playingEntity classCode="MMAT">
      <code nullFlavor="OTH"><originalText><reference value="#sub1"/></originalText></code>
    </playingEntity></participantRole></participant>
   </observation></entryRelationship></act></entry>
  <entry><act classCode="ACT" moodCode="EVN"><templateId root="{T}.4.30"/><id root="a3"/>
   <code code="CONC" codeSystem="2.16.840.1.113883.5.6"/><statusCode code="active"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN" negationInd="true">
    <templateId root="{T}.4.7"/><id root="a3o"/><code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/>
    <statusCode code="completed"/><value xsi:type="CD" code="419511003" {SCT}/>
    <participant typeCode="CSM"><participantRole classCode="MANU"><playingEntity classCode="MMAT">
      <code nullFlavor="NA"/></playingEntity></participantRole></participant>
   </observation></entryRelationship></act></entry>""",
            '<paragraph ID="sub1">Amoxicillin-clavulanate</paragraph>',
        )
    )
    refuted, nka = of(convert(doc), "AllergyIntolerance")
    assert refuted["code"] == {"text": "Amoxicillin-clavulanate"}
    assert refuted["verificationStatus"]["coding"][0]["code"] == "refuted"
    assert codes(nka["code"]) == {"409137002"}  # no known drug allergy: a negated generic substance


# -- encounter dates --------------------------------------------------------------------------------
def _enc_doc(effective: str) -> bytes:
    return document(
        section(
            f"{T}.2.22.1",
            "46240-8",
            f"""
  <entry><encounter classCode="ENC" moodCode="EVN"><templateId root="{T}.4.49"/><id root="e1"/>
   <code code="99213" codeSystem="2.16.840.1.113883.6.12"/>{effective}</encounter></entry>""",
        ),
        encounter=f"""<componentOf><encompassingEncounter><id root="2.16.840.1.113883.19" extension="V-1"/>
   {effective}</encompassingEncounter></componentOf>""",
    )


def test_an_encounter_effective_time_with_value_and_high_keeps_the_value_as_its_start() -> None:
    out = convert(
        _enc_doc(
            '<effectiveTime value="20200301100000-0500"><high value="20200301113000-0500"/></effectiveTime>'
        )
    )
    encounters = of(out, "Encounter")
    assert len(encounters) == 2
    for enc in encounters:
        assert enc["period"] == {"start": "2020-03-01T10:00:00-05:00", "end": "2020-03-01T11:30:00-05:00"}
    # a low wins over the value
    [enc, _] = of(
        convert(_enc_doc('<effectiveTime value="2020"><low value="20200302"/></effectiveTime>')), "Encounter"
    )
    assert enc["period"] == {"start": "2020-03-02"}
    # a width gives the missing bound
    [enc, _] = of(
        convert(
            _enc_doc('<effectiveTime><low value="20200302"/><width value="2" unit="d"/></effectiveTime>')
        ),
        "Encounter",
    )
    assert enc["period"] == {"start": "2020-03-02", "end": "2020-03-04"}


# -- who and where --------------------------------------------------------------------------------
ADDR = "<addr><streetAddressLine>1 Clinic Way</streetAddressLine><city>Springfield</city><state>IL</state></addr>"


def _person(npi: str, given: str, extra: str = "") -> str:
    return (
        f'<assignedEntity><id root="{NPI}" extension="{npi}"/>{extra}'
        f"<assignedPerson><name><given>{given}</given><family>Doc</family></name></assignedPerson></assignedEntity>"
    )


WHO_WHERE = document(
    section(
        f"{T}.2.22.1",
        "46240-8",
        f"""
  <entry><encounter classCode="ENC" moodCode="EVN"><templateId root="{T}.4.49"/><id root="e2"/>
   <code code="99213" codeSystem="2.16.840.1.113883.6.12"/><effectiveTime value="20200401"/>
   <performer><sdtc:functionCode code="ATTPHYS" codeSystem="2.16.840.1.113883.5.88"/>{_person("301", "Ada")}</performer>
   <performer typeCode="SPRF">{_person("302", "Bob")}</performer>
   <participant typeCode="LOC"><participantRole classCode="SDLOC"><templateId root="{T}.4.32"/>
     <code code="1160-1" codeSystem="2.16.840.1.113883.6.259" displayName="Urgent Care Center"/>{ADDR}
     <playingEntity classCode="PLC"><name>East Urgent Care</name></playingEntity></participantRole></participant>
  </encounter></entry>""",
    ),
    encounter=f"""<componentOf><encompassingEncounter><id root="2.16.840.1.113883.19" extension="V-2"/>
   <code code="AMB" codeSystem="2.16.840.1.113883.5.4"/>
   <effectiveTime><low value="20201107094421-0500"/></effectiveTime>
   <responsibleParty>{
        _person(
            "201",
            "Rita",
            '<code code="207Q00000X" codeSystem="2.16.840.1.113883.6.101" displayName="Family Medicine"/>',
        ).replace(
            "</assignedEntity>",
            '<representedOrganization><id root="2.16.840.1.113883.19.5" extension="ORG-R"/>'
            "<name>Rita's Practice</name></representedOrganization></assignedEntity>",
        )
    }</responsibleParty>
   <encounterParticipant typeCode="ADM"><time><low value="20201107094421-0500"/></time>{
        _person("202", "Adam")
    }</encounterParticipant>
   <encounterParticipant typeCode="CON">{_person("203", "Cora")}</encounterParticipant>
   <encounterParticipant typeCode="DIS">{_person("204", "Dan")}</encounterParticipant>
   <encounterParticipant typeCode="REF">{_person("205", "Ruth")}</encounterParticipant>
   <location><healthCareFacility><id root="2.16.840.1.113883.19.5" extension="FAC-1"/>
     <code code="OF" codeSystem="2.16.840.1.113883.5.111" displayName="Outpatient facility"/>
     <location><name>Good Health Urgent Care</name>{ADDR}</location>
     <serviceProviderOrganization><id root="2.16.840.1.113883.19.5" extension="ORG-1"/>
       <name>Good Health Clinic</name>{ADDR}</serviceProviderOrganization>
   </healthCareFacility></location>
  </encompassingEncounter></componentOf>""",
)


def _participants(out: ConvertedBundle, enc: dict[str, Any]) -> dict[str, list[str]]:
    """given name -> participant type codes."""
    found: dict[str, list[str]] = {}
    for p in enc.get("participant", []):
        person = by_ref(out, p["individual"]["reference"])
        assert person["resourceType"] == "Practitioner"
        found.setdefault(person["name"][0]["given"][0], []).extend(
            c["code"] for t in p.get("type", []) for c in t["coding"] if c["system"] == PTYPE
        )
    return found


def test_the_encompassing_encounter_names_its_providers_facility_and_service_provider(tmp_path: Path) -> None:
    out = convert(WHO_WHERE)
    [comp] = of(out, "Composition")
    enc = by_ref(out, comp["encounter"]["reference"])
    assert _participants(out, enc) == {
        "Rita": ["ATND"],
        "Adam": ["ADM"],
        "Cora": ["CON"],
        "Dan": ["DIS"],
        "Ruth": ["REF"],
    }
    adm = next(p for p in enc["participant"] if p["type"][0]["coding"][0]["code"] == "ADM")
    assert adm["period"] == {"start": "2020-11-07T09:44:21-05:00"}
    provider = by_ref(out, enc["serviceProvider"]["reference"])
    assert provider["name"] == "Good Health Clinic"
    [loc_ref] = [x["location"]["reference"] for x in enc["location"]]
    facility = by_ref(out, loc_ref)
    assert facility["name"] == "Good Health Urgent Care" and facility["address"]["city"] == "Springfield"
    assert codes(facility["type"][0]) == {"OF"}
    assert facility["managingOrganization"] == enc["serviceProvider"]
    # the responsible provider's role in their organisation
    [role] = of(out, "PractitionerRole")
    rita = next(p for p in enc["participant"] if p["type"][0]["coding"][0]["code"] == "ATND")
    assert role["practitioner"] == rita["individual"]
    assert by_ref(out, role["organization"]["reference"])["name"] == "Rita's Practice"
    assert codes(role["code"][0]) == {"207Q00000X"}
    # deterministic ids, none shared, byte-identical re-conversion (the kit also checks it)
    ids = [e["resource"]["id"] for e in out.bundle["entry"]]
    assert len(ids) == len(set(ids)) and convert(WHO_WHERE).body == out.body
    assert_conformant(WHO_WHERE, tmp_path)


def test_an_encounter_activity_names_its_performers_and_location() -> None:
    out = convert(WHO_WHERE)
    enc = next(e for e in of(out, "Encounter") if codes(e["type"][0]) == {"99213"})
    assert _participants(out, enc) == {"Ada": ["ATND"], "Bob": ["SPRF"]}
    [loc] = [by_ref(out, x["location"]["reference"]) for x in enc["location"]]
    assert loc["name"] == "East Urgent Care" and codes(loc["type"][0]) == {"1160-1"}


# -- eICR: travel history, pregnancy ----------------------------------------------------------------
TRAVEL = "2.16.840.1.113883.10.20.15.2.3.1"
TRAVEL_PROFILE = "http://hl7.org/fhir/us/ecr/StructureDefinition/us-ph-travel-history"
ADDRESS_EXT = "http://hl7.org/fhir/us/ecr/StructureDefinition/us-ph-address-extension"


def _travel(ident: str, inner: str) -> str:
    return f"""<entry typeCode="DRIV"><act classCode="ACT" moodCode="EVN"><templateId root="{TRAVEL}"
      extension="2022-05-01"/><id root="{ident}"/>
      <code code="420008001" {SCT} displayName="Travel"/>{inner}</act></entry>"""


EICR_SOCIAL = document(
    section(
        f"{T}.2.17",
        "29762-2",
        _travel(
            "t1",
            """<statusCode code="completed"/>
      <effectiveTime><low value="20161022"/><high value="20161030"/></effectiveTime>
      <participant typeCode="LOC"><participantRole classCode="TERR"><addr><streetAddressLine>1170 N Rancho Robles Rd
      </streetAddressLine><city>Oracle</city><state>AZ</state><postalCode>85623</postalCode><country>US</country>
      </addr></participantRole></participant>""",
        )
        + _travel(
            "t2",
            """<text><reference value="#trv2"/></text><statusCode code="completed"/>
      <effectiveTime><width value="3" unit="wk"/><high value="20161109"/></effectiveTime>
      <participant typeCode="LOC"><participantRole classCode="TERR">
        <code code="BRA" codeSystem="1.0.3166.1" displayName="Brazil"/></participantRole></participant>
      <entryRelationship typeCode="COMP"><observation classCode="OBS" moodCode="EVN">
        <templateId root="2.16.840.1.113883.10.20.15.2.3.51" extension="2022-05-01"/><id root="t2p"/>
        <code code="280147009" codeSystem="2.16.840.1.113883.6.96" displayName="Type of activity"/>
        <statusCode code="completed"/>
        <value xsi:type="CD" code="C0683587" codeSystem="2.16.840.1.113883.6.86" displayName="Tourism"/>
      </observation></entryRelationship>""",
        )
        + _travel(
            "t3",
            """<text>Spent 8 years in the UK</text><statusCode code="completed"/>""",
        )
        + f"""
  <entry><observation classCode="OBS" moodCode="EVN" negationInd="true">
   <templateId root="2.16.840.1.113883.10.20.15.3.8"/><id root="preg1"/>
   <code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/><statusCode code="completed"/>
   <effectiveTime value="20201101"/><value xsi:type="CD" code="77386006" {SCT} displayName="Pregnancy"/>
  </observation></entry>
  <entry><observation classCode="OBS" moodCode="EVN" nullFlavor="UNK">
   <templateId root="2.16.840.1.113883.10.20.15.3.8"/><id root="preg2"/>
   <code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/><statusCode code="completed"/>
   <effectiveTime value="20201102"/><value xsi:type="CD" code="77386006" {SCT} displayName="Pregnancy"/>
  </observation></entry>
  <entry><observation classCode="OBS" moodCode="EVN">
   <templateId root="2.16.840.1.113883.10.20.15.3.8"/><id root="preg3"/>
   <code code="ASSERTION" codeSystem="2.16.840.1.113883.5.4"/><statusCode code="completed"/>
   <effectiveTime><low value="20200301"/></effectiveTime>
   <value xsi:type="CD" code="77386006" {SCT} displayName="Pregnancy"/>
   <entryRelationship typeCode="REFR"><observation classCode="OBS" moodCode="EVN">
     <templateId root="2.16.840.1.113883.10.20.15.3.1"/><code code="11778-8" {LN}/>
     <statusCode code="completed"/><value xsi:type="TS" value="20201205"/></observation></entryRelationship>
  </observation></entry>""",
        '<paragraph ID="trv2">Recent travel to Brazil</paragraph>',
    )
)


def test_eicr_travel_history_becomes_an_ecr_travel_history_observation(tmp_path: Path) -> None:
    out = convert(EICR_SOCIAL)
    travel = [o for o in of(out, "Observation") if codes(o["code"]) == {"420008001"}]
    assert len(travel) == 3
    address, coded, text_only = travel
    for o in travel:
        assert o["code"]["coding"][0]["system"] == "http://snomed.info/sct"
        assert o["category"][0]["coding"][0]["code"] == "social-history"
        assert o["status"] == "final"
    assert address["meta"]["profile"] == [TRAVEL_PROFILE]
    assert address["effectivePeriod"] == {"start": "2016-10-22", "end": "2016-10-30"}
    [loc] = address["component"]
    assert loc["code"]["coding"][0] == {"system": PTYPE, "code": "LOC", "display": "Location"}
    [ext] = loc["extension"]
    assert ext["url"] == ADDRESS_EXT and ext["valueAddress"]["city"] == "Oracle"
    assert ext["valueAddress"]["country"] == "US"
    # coded location, the act's narrative text, and the purpose of travel; width back from high
    assert coded["effectivePeriod"] == {"start": "2016-10-19", "end": "2016-11-09"}
    by_code = {c["code"]["coding"][0]["code"]: c for c in coded["component"] if "valueCodeableConcept" in c}
    locs = [c for c in coded["component"] if c["code"]["coding"][0]["code"] == "LOC"]
    assert [codes(c["valueCodeableConcept"]) or c["valueCodeableConcept"]["text"] for c in locs] == [
        {"BRA"},
        "Recent travel to Brazil",
    ]
    assert locs[0]["valueCodeableConcept"]["coding"][0]["system"] == "urn:iso:std:iso:3166"
    assert codes(by_code["280147009"]["valueCodeableConcept"]) == {"C0683587"}
    # no dates: converted, but it cannot claim the profile (effective[x] is required); said in a warning
    assert text_only["component"][0]["valueCodeableConcept"] == {"text": "Spent 8 years in the UK"}
    assert "profile" not in text_only["meta"]
    assert "travel-history-no-date" in {w.code for w in out.warnings}
    assert_conformant(EICR_SOCIAL, tmp_path)


def test_eicr_pregnancy_observation_uses_the_pregnancy_status_code_and_says_not_and_unknown() -> None:
    obs = [o for o in of(convert(EICR_SOCIAL), "Observation") if codes(o["code"]) & {"82810-3", "ASSERTION"}]
    assert len(obs) == 3
    for o in obs:
        assert o["code"]["coding"] == [
            {"system": "http://loinc.org", "code": "82810-3", "display": "Pregnancy status"}
        ]
    negated, unknown, pregnant = obs
    assert codes(negated["valueCodeableConcept"]) == {"60001007"}  # not pregnant, not "Pregnancy"
    assert "note" not in negated
    assert codes(unknown["valueCodeableConcept"]) == {"261665006"}
    assert codes(pregnant["valueCodeableConcept"]) == {"77386006"}
    [edd] = pregnant["component"]
    assert codes(edd["code"]) == {"11778-8"} and edd["valueDateTime"] == "2020-12-05"


# -- observations inside an observation are facts of their own ----------------------------------------
def test_an_observation_inside_an_observation_is_kept_as_a_member() -> None:
    doc = document(
        section(
            f"{T}.2.57",
            "61144-2",
            f"""
  <entry><observation classCode="OBS" moodCode="EVN"><templateId root="{T}.4.124"/><id root="n1"/>
   <code code="75305-3" {LN}/><statusCode code="completed"/><effectiveTime value="20200512"/>
   <value xsi:type="CD" code="248324001" {SCT} displayName="Well nourished"/>
   <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN">
    <templateId root="{T}.4.138"/><id root="n1a"/><code code="75303-8" {LN}/><statusCode code="completed"/>
    <value xsi:type="CD" code="386619000" {SCT} displayName="Low sodium diet"/></observation></entryRelationship>
  </observation></entry>""",
        )
    )
    out = convert(doc)
    obs = obs_by_code(out)
    status, assessment = obs["75305-3"], obs["75303-8"]
    assert codes(assessment["valueCodeableConcept"]) == {"386619000"}
    assert status["hasMember"] == [{"reference": f"Observation/{assessment['id']}"}]
