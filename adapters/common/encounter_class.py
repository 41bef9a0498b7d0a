"""``Encounter.class``: the v3 ActEncounterCode Coding every adapter emits, and the one for "unknown".

R4 requires ``Encounter.class``; a source that does not say which class an encounter was gets the
v3-NullFlavor ``UNK`` rather than a guess.
"""

from __future__ import annotations

V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"

#: v3 ActEncounterCode (R4's Encounter.class value set) -> its display
ENCOUNTER_CLASSES: dict[str, str] = {
    "AMB": "ambulatory",
    "EMER": "emergency",
    "FLD": "field",
    "HH": "home health",
    "IMP": "inpatient encounter",
    "ACUTE": "inpatient acute",
    "NONAC": "inpatient non-acute",
    "OBSENC": "observation encounter",
    "PRENC": "pre-admission",
    "SS": "short stay",
    "VR": "virtual",
}


def encounter_class(code: str | None) -> dict[str, str]:
    """A new ``Encounter.class`` Coding: ``code`` under v3-ActCode with its display when it is an
    ActEncounterCode (:data:`ENCOUNTER_CLASSES`), else v3-NullFlavor ``UNK`` "unknown"."""
    if code in ENCOUNTER_CLASSES:
        return {"system": V3_ACT_CODE, "code": code, "display": ENCOUNTER_CLASSES[code]}
    return {"system": V3_NULL_FLAVOR, "code": "UNK", "display": "unknown"}
