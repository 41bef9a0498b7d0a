"""Normalised matching features of a FHIR R4 Patient.

A feature record is a small JSON-serialisable ``dict`` (stored as is by the index) with these keys, each a
string (``""`` when unknown) unless said otherwise:

``g``/``f``  first given name / family name: lower case, accents removed, letters only;
``gn``/``gm``/``fn``/``fm``  NYSIIS and Metaphone codes of the given and family names;
``b``  birth date as ``YYYYMMDD`` (or ``YYYYMM``/``YYYY`` for partial dates);
``s``  administrative gender (``male``/``female``/``other``; ``unknown`` is treated as missing);
``a``  first address line(s), lower case, single-spaced; ``c`` city; ``z`` postal code (alphanumerics);
``t``  phone: digits of the first phone number, last 10 kept;
``i``  strong identifiers: sorted list of ``[system, value]`` (value with spaces and dashes removed).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

import jellyfish
import orjson

from bridge.stores.mpi.config import MpiInputError

Features = dict[str, Any]

_NON_LETTER = re.compile(r"[^a-z]")
_NON_ALNUM_SPACE = re.compile(r"[^a-z0-9 ]")
_NON_ALNUM = re.compile(r"[^a-z0-9]")
_NON_DIGIT = re.compile(r"[^0-9]")
_ID_NOISE = re.compile(r"[\s\-./]")
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")

STRING_KEYS = ("g", "f", "gn", "gm", "fn", "fm", "b", "s", "a", "c", "z", "t")


def _fold(text: str) -> str:
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


def norm_name(text: Any) -> str:
    """Lower-case ASCII letters only (``"O'Brien-Smith"`` -> ``"obriensmith"``)."""
    if not isinstance(text, str):
        return ""
    return _norm_name(text)


@functools.lru_cache(maxsize=65536)  # names repeat: most records carry one of a few thousand
def _norm_name(text: str) -> str:
    return _NON_LETTER.sub("", _fold(text))


def norm_text(text: Any) -> str:
    if not isinstance(text, str):
        return ""
    return " ".join(_NON_ALNUM_SPACE.sub(" ", _fold(text)).split())


@functools.lru_cache(maxsize=16384)
def _norm_city(text: str) -> str:
    return norm_text(text)


def norm_birth_date(value: Any) -> str:
    """``YYYY-MM-DD`` (or a partial FHIR date / dateTime) -> ``YYYYMMDD`` / ``YYYYMM`` / ``YYYY``."""
    if not isinstance(value, str):
        return ""
    text: str = value.strip()
    if len(text) >= 10 and text[4] == "-" and text[7] == "-":  # the usual full date: no regex
        digits = text[:4] + text[5:7] + text[8:10]
        if digits.isdecimal():  # what \d matches
            return digits
    m = _DATE.match(text)
    if not m:
        return ""
    return "".join(part for part in m.groups() if part)


def _pick_name(names: Any) -> Mapping[str, Any]:
    if not isinstance(names, list):
        return {}
    if len(names) == 1:  # the usual case: the one name, whatever its use
        return names[0] if isinstance(names[0], dict) else {}
    candidates = [n for n in names if isinstance(n, dict)]
    for use in ("official", "usual", None):
        for n in candidates:
            if use is None or n.get("use") == use:
                return n
    return {}


def _first_str(values: Any) -> str:
    if isinstance(values, list):
        for v in values:
            if isinstance(v, str) and v.strip():
                return v
    return ""


def _pick_address(addresses: Any) -> Mapping[str, Any]:
    if not isinstance(addresses, list):
        return {}
    if len(addresses) == 1:  # the usual case: the one address, current home or not
        return addresses[0] if isinstance(addresses[0], dict) else {}
    candidates = [a for a in addresses if isinstance(a, dict)]
    for a in candidates:
        period = a.get("period")
        if a.get("use") == "home" and not (isinstance(period, dict) and period.get("end")):
            return a
    return candidates[0] if candidates else {}


def _phone(telecom: Any) -> str:
    if not isinstance(telecom, list):
        return ""
    for t in telecom:
        if (
            isinstance(t, dict)
            and t.get("system") in ("phone", "sms", None)
            and isinstance(t.get("value"), str)
        ):
            digits = _NON_DIGIT.sub("", t["value"])
            if len(digits) >= 6:
                return digits[-10:]
    return ""


@functools.lru_cache(maxsize=65536)
def phonetic(name: str) -> tuple[str, str]:
    """(NYSIIS, Metaphone) codes of a normalised name; empty strings for an empty name."""
    if not name:
        return "", ""
    return jellyfish.nysiis(name), jellyfish.metaphone(name)


@functools.lru_cache(maxsize=64)
def _as_set(systems: tuple[str, ...]) -> frozenset[str]:
    return frozenset(systems)


def extract_features(patient: Mapping[str, Any], strong_systems: Iterable[str]) -> Features:
    """Return the feature record of a FHIR Patient resource.

    Raises :class:`MpiInputError` when ``patient`` is not a Patient resource with a string ``id``.
    Missing or malformed demographic elements simply become unknown features.
    """
    if not isinstance(patient, Mapping) or patient.get("resourceType") != "Patient":  # JSON objects are dicts
        raise MpiInputError("resource is not a FHIR Patient")
    pid = patient.get("id")
    if not isinstance(pid, str) or not pid:
        raise MpiInputError("Patient has no id")
    if "\x00" in pid:  # PostgreSQL cannot store it in text
        raise MpiInputError("Patient id contains a NUL character")
    name = _pick_name(patient.get("name"))
    given = norm_name(_first_str(name.get("given")))
    family = norm_name(name.get("family"))
    if not given and not family and isinstance(name.get("text"), str):
        parts = norm_text(name["text"]).split()
        if parts:
            given, family = norm_name(parts[0]), norm_name(parts[-1]) if len(parts) > 1 else ""
    gn, gm = phonetic(given)
    fn, fm = phonetic(family)
    gender = patient.get("gender")
    sex = gender if gender in ("male", "female", "other") else ""
    addr = _pick_address(patient.get("address"))
    lines = addr.get("line")
    line = norm_text(" ".join(x for x in lines if isinstance(x, str))) if isinstance(lines, list) else ""
    strong = strong_systems if isinstance(strong_systems, frozenset) else _as_set(tuple(strong_systems))
    ids: set[tuple[str, str]] = set()
    raw_ids = patient.get("identifier")
    for ident in raw_ids if isinstance(raw_ids, list) else ():
        if not isinstance(ident, dict):
            continue
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and system in strong and isinstance(value, str):
            v = _ID_NOISE.sub("", value).upper()
            if v:
                ids.add((system, v))
    return {
        "g": given,
        "f": family,
        "gn": gn,
        "gm": gm,
        "fn": fn,
        "fm": fm,
        "b": norm_birth_date(patient.get("birthDate")),
        "s": sex,
        "a": line,
        "c": _norm_city(city) if isinstance(city := addr.get("city"), str) else "",
        "z": _NON_ALNUM.sub(
            "", _fold(addr.get("postalCode") or "") if isinstance(addr.get("postalCode"), str) else ""
        ),
        "t": _phone(patient.get("telecom")),
        "i": sorted([list(p) for p in ids]),
    }


def features_digest(features: Features) -> str:
    """A stable digest of a feature record (used to make re-upserts idempotent)."""
    return hashlib.sha256(orjson.dumps(features, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
