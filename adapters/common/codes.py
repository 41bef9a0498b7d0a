"""Code-system identifiers: HL7 OIDs and common names to FHIR system URIs."""

from __future__ import annotations

import re

#: OID -> canonical FHIR URI (from the FHIR R4 terminology pages and HL7 THO).
OID_TO_URI: dict[str, str] = {
    "2.16.840.1.113883.6.1": "http://loinc.org",
    "2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "2.16.840.1.113883.12.292": "http://hl7.org/fhir/sid/cvx",
    "2.16.840.1.113883.6.59": "http://hl7.org/fhir/sid/cvx",
    "2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
    "2.16.840.1.113883.6.3": "http://hl7.org/fhir/sid/icd-10",
    "2.16.840.1.113883.6.103": "http://hl7.org/fhir/sid/icd-9-cm",
    "2.16.840.1.113883.6.104": "http://hl7.org/fhir/sid/icd-9-cm",
    "2.16.840.1.113883.6.4": "http://www.cms.gov/Medicare/Coding/ICD10",
    "2.16.840.1.113883.6.12": "http://www.ama-assn.org/go/cpt",
    "2.16.840.1.113883.6.285": "urn:oid:2.16.840.1.113883.6.285",
    "2.16.840.1.113883.6.69": "http://hl7.org/fhir/sid/ndc",
    "2.16.840.1.113883.6.8": "http://unitsofmeasure.org",
    "2.16.840.1.113883.6.101": "http://nucc.org/provider-taxonomy",
    "2.16.840.1.113883.6.238": "urn:oid:2.16.840.1.113883.6.238",
    "2.16.840.1.113883.4.9": "http://fdasis.nlm.nih.gov",
    "2.16.840.1.113883.3.26.1.1": "http://ncithesaurus-stage.nci.nih.gov",
    "2.16.840.1.113883.3.26.1.5": "http://terminology.hl7.org/CodeSystem/nciVersionOfNDF-RT",
    "2.16.840.1.113883.3.221.5": "https://nahdo.org/sopt",
    "2.16.840.1.113883.4.642.3.1": "http://hl7.org/fhir/ValueSet/audit-event-sub-type",
    "2.16.840.1.113883.5.1": "http://terminology.hl7.org/CodeSystem/v3-AdministrativeGender",
    "2.16.840.1.113883.5.2": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
    "2.16.840.1.113883.5.4": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
    "2.16.840.1.113883.5.6": "http://terminology.hl7.org/CodeSystem/v3-ActClass",
    "2.16.840.1.113883.5.7": "http://terminology.hl7.org/CodeSystem/v3-ActPriority",
    "2.16.840.1.113883.5.8": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "2.16.840.1.113883.5.14": "http://terminology.hl7.org/CodeSystem/v3-ActStatus",
    "2.16.840.1.113883.5.25": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
    "2.16.840.1.113883.5.83": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
    "2.16.840.1.113883.5.88": "http://terminology.hl7.org/CodeSystem/v3-ParticipationFunction",
    "2.16.840.1.113883.5.90": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
    "2.16.840.1.113883.5.110": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
    "2.16.840.1.113883.5.111": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
    "2.16.840.1.113883.5.112": "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration",
    "2.16.840.1.113883.5.1063": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "2.16.840.1.113883.5.1076": "http://terminology.hl7.org/CodeSystem/v3-ReligiousAffiliation",
    "2.16.840.1.113883.5.60": "http://terminology.hl7.org/CodeSystem/v3-LanguageAbilityMode",
    "2.16.840.1.113883.5.61": "http://terminology.hl7.org/CodeSystem/v3-LanguageAbilityProficiency",
    "2.16.840.1.113883.5.1008": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
    "2.16.840.1.113883.5.1119": "http://terminology.hl7.org/CodeSystem/v3-AddressUse",
    "2.16.840.1.113883.5.45": "http://terminology.hl7.org/CodeSystem/v3-EntityNameUse",
    "2.16.840.1.113883.5.143": "http://terminology.hl7.org/CodeSystem/v3-TelecomAddressUse",
    "2.16.840.1.113883.5.1001": "http://terminology.hl7.org/CodeSystem/v3-ActMood",
    "2.16.840.1.113883.5.1002": "http://terminology.hl7.org/CodeSystem/v3-ActRelationshipType",
    "2.16.840.1.113883.5.79": "urn:ietf:bcp:13",
    "2.16.840.1.113883.5.1052": "http://terminology.hl7.org/CodeSystem/v3-ActSite",
    "2.16.840.1.113883.5.85": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
    "2.16.840.1.113883.12.112": "http://terminology.hl7.org/CodeSystem/v2-0112",
    "2.16.840.1.113883.12.227": "http://hl7.org/fhir/sid/mvx",
    "2.16.840.1.113883.6.301.5": "https://www.nubc.org/CodeSystem/PatDischargeStatus",
    "2.16.840.1.113883.4.1": "http://hl7.org/fhir/sid/us-ssn",
    "2.16.840.1.113883.4.6": "http://hl7.org/fhir/sid/us-npi",
    "2.16.840.1.113883.6.13": "http://terminology.hl7.org/CodeSystem/CD2",
}

#: Names vendors put in ``codeSystemName`` (upper-cased, spaces and dashes removed) -> URI.
NAME_TO_URI: dict[str, str] = {
    "LOINC": "http://loinc.org",
    "LN": "http://loinc.org",
    "SNOMED": "http://snomed.info/sct",
    "SNOMEDCT": "http://snomed.info/sct",
    "SCT": "http://snomed.info/sct",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD9": "http://hl7.org/fhir/sid/icd-9-cm",
    "ICD9CM": "http://hl7.org/fhir/sid/icd-9-cm",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "CPT4": "http://www.ama-assn.org/go/cpt",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "UCUM": "http://unitsofmeasure.org",
    "NUCC": "http://nucc.org/provider-taxonomy",
}

_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def is_oid(value: str) -> bool:
    """True when ``value`` is a syntactically valid ISO OID."""
    return bool(_OID.match(value))


def is_uuid(value: str) -> bool:
    return bool(_UUID.match(value))


def system_uri(code_system: str | None, code_system_name: str | None = None) -> tuple[str | None, bool]:
    """The FHIR system URI for a CDA ``codeSystem`` OID (or, failing that, a ``codeSystemName``).

    Returns ``(uri, trusted)``. ``trusted`` is False when the system had to be guessed from the name
    or is not an OID at all (the caller should warn). ``(None, False)`` when there is nothing usable.
    """
    if code_system:
        cs = code_system.strip()
        if cs in OID_TO_URI:
            return OID_TO_URI[cs], True
        if is_oid(cs):
            return f"urn:oid:{cs}", True
        if is_uuid(cs):
            return f"urn:uuid:{cs.lower()}", True
        if cs.startswith(("http://", "https://", "urn:")):
            return cs, True
    if code_system_name:
        key = re.sub(r"[\s\-_]", "", code_system_name).upper()
        if key in NAME_TO_URI:
            return NAME_TO_URI[key], False
    return None, False


def name_to_uri(name: str) -> str | None:
    """The URI of a code system given by a common name (``LOINC``, ``SNOMED-CT``, ``RxNorm`` ...)."""
    return NAME_TO_URI.get(re.sub(r"[\s\-_]", "", name).upper())
