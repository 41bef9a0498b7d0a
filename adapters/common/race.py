"""The US Core race and ethnicity extensions on a Patient, as every adapter builds them.

Each coding goes into the ``ombCategory`` slice when its code is one of the OMB categories of the US
Core value set (omb-race-category, omb-ethnicity-category), else into ``detailed``; the ``text``
slice, which US Core requires, lists each coding's display, or its code when it has none.
"""

from __future__ import annotations

from typing import Any

#: CDC Race & Ethnicity code system
CDC_RACE_ETHNICITY = "urn:oid:2.16.840.1.113883.6.238"
US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
#: US Core omb-race-category (from 5.0.0 it includes 2131-1 Other Race)
OMB_RACE = frozenset({"1002-5", "2028-9", "2054-5", "2076-8", "2106-3", "2131-1"})
#: US Core omb-ethnicity-category
OMB_ETHNICITY = frozenset({"2135-2", "2186-5"})


def race_extension(codings: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The us-core-race extension for ``codings`` (each with a ``code``), or ``None`` when there are none."""
    return _extension(US_CORE_RACE, OMB_RACE, codings)


def ethnicity_extension(codings: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The us-core-ethnicity extension for ``codings`` (each with a ``code``), or ``None`` when there are none."""
    return _extension(US_CORE_ETHNICITY, OMB_ETHNICITY, codings)


def _extension(url: str, omb: frozenset[str], codings: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not codings:
        return None
    parts: list[dict[str, Any]] = [
        {"url": "ombCategory" if c["code"] in omb else "detailed", "valueCoding": c} for c in codings
    ]
    parts.append({"url": "text", "valueString": ", ".join(c.get("display") or c["code"] for c in codings)})
    return {"url": url, "extension": parts}
