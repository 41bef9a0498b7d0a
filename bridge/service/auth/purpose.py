"""Why a request is made: the purpose of use (HL7 v3 ActReason) a token states.

A token states its purposes in the IHE IUA form, ``extensions.ihe_iua.purpose_of_use`` (a Coding or a
list of Codings, system ``http://terminology.hl7.org/CodeSystem/v3-ActReason``), or as a top-level
``purpose_of_use`` claim (a code, a Coding, or a list of either). A Coding of another code system, or
a code this module does not know, is refused with the token: a purpose the consent rules cannot read
must not pass for no purpose at all.

Who states nothing: a ``user/`` token is taken to be for treatment (TREAT), the IHE IUA default for a
clinician; a ``system/`` token is never given one (:attr:`bridge.service.auth.policy.Access.purposes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.errors import FhirbridgeError

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_ACT_REASON_SYSTEMS = frozenset({ACT_REASON, "urn:oid:2.16.840.1.113883.5.8"})

#: the v3-ActReason purposes of use (the PurposeOfUse value set, v3 2.0.0) this service understands
PURPOSES: dict[str, str] = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "BTG": "break the glass",
    "CAREMGT": "care management",
    "CLINTRL": "clinical trial",
    "ERTREAT": "emergency room treatment",
    "POPHLTH": "population health",
    "HPAYMT": "healthcare payment",
    "CLMATTCH": "claim attachment",
    "COVAUTH": "coverage authorization",
    "COVERAGE": "coverage under policy or program",
    "ELIGDTRM": "eligibility determination",
    "ELIGVER": "eligibility verification",
    "ENROLLM": "enrollment",
    "REMITADV": "remittance advice",
    "HOPERAT": "healthcare operations",
    "HSYSADMIN": "health system administration",
    "HQUALIMP": "health quality improvement",
    "HRESCH": "healthcare research",
    "PUBHLTH": "public health",
    "HLEGAL": "legal",
    "HMARKT": "marketing",
    "HDIRECT": "directory",
    "PATRQT": "patient requested",
    "FAMRQT": "family requested",
    "PWATRNY": "power of attorney",
    "SUPNWK": "support network",
    "DISASTER": "disaster",
    "THREAT": "threat",
    "SYSDEV": "system development",
    "TRAIN": "training",
}

#: the purposes that may break the glass (with a reason, for a clinician of an allowed organisation)
EMERGENCY = frozenset({"ETREAT", "BTG"})


class PurposeError(FhirbridgeError):
    """The token's purpose of use cannot be read (the message names the claim, never its value)."""


def purposes_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The ActReason codes a token's claims state, in order, once each (``()`` when none)."""
    found: list[str] = []
    extensions = claims.get("extensions")
    if extensions is not None:
        iua = extensions.get("ihe_iua") if isinstance(extensions, dict) else None
        if not isinstance(extensions, dict) or (iua is not None and not isinstance(iua, dict)):
            raise PurposeError("extensions.ihe_iua")
        if iua is not None and "purpose_of_use" in iua:
            found += _codes(iua["purpose_of_use"], "extensions.ihe_iua.purpose_of_use")
    if "purpose_of_use" in claims:
        found += _codes(claims["purpose_of_use"], "purpose_of_use")
    return tuple(dict.fromkeys(found))


def _codes(value: Any, claim: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise PurposeError(claim)
    out = []
    for item in items:
        if isinstance(item, str):
            code = item
        elif isinstance(item, dict) and isinstance(item.get("code"), str):
            system = item.get("system")
            if system is not None and system not in _ACT_REASON_SYSTEMS:
                raise PurposeError(claim)
            code = item["code"]
        else:
            raise PurposeError(claim)
        if code not in PURPOSES:
            raise PurposeError(claim)
        out.append(code)
    return out


def iua_claims(purposes: tuple[str, ...], organization: str | None = None) -> dict[str, Any]:
    """The IHE IUA claims of a token this service issues: its ``purposes`` and the user's
    ``organization`` (``{}`` when there are neither)."""
    iua: dict[str, Any] = {}
    if purposes:
        iua["purpose_of_use"] = [{"system": ACT_REASON, "code": p, "display": PURPOSES[p]} for p in purposes]
    if organization:
        iua["subject_organization_id"] = organization
    return {"extensions": {"ihe_iua": iua}} if iua else {}
