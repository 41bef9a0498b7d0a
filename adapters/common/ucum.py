"""UCUM units: which unit strings are UCUM, and the UCUM code for the spellings labs actually send.

:func:`is_ucum` asks the real UCUM grammar (``ucumvert``: the full UCUM 2.2 syntax built from
``ucum-essence.xml``, parsed with lark) whether a string is a UCUM code. :func:`to_ucum` turns a unit
as a feed writes it into a UCUM code, or ``None`` when it is neither UCUM nor a spelling listed here.

Both are memoised: a feed repeats a few dozen units, and an unseen unit costs about a millisecond in
the Earley parser, a repeated one a dictionary look-up. The parser (and the ``ucumvert`` import, which
brings in pint) is built on first use, not at import, so processes that never see a unit never pay.

The spellings, in the order they are tried:

1. :data:`MISLEADING`: strings that *are* valid UCUM but mean something else in every clinical feed
   (``K/uL`` is kelvin per microlitre, ``m/uL`` metre per microlitre, ``F`` farad, ``C`` coulomb,
   ``pH`` picohenry, ``ft`` femtotonne, ``u/L`` atomic mass units per litre, ``mg%`` a hundredth of a
   milligram);
2. the string itself, when it is UCUM (kept as sent, e.g. ``mg/dl``: rewriting valid UCUM could change
   its meaning);
3. :data:`ALIASES`: whole-unit spellings that are not UCUM (``mmHg``, ``bpm``, ``x10E3/uL``, ``mEq/L``,
   ``mL/min/1.73m2`` ...), matched case-insensitively and without spaces;
4. ``10^n``/``x10En``/``10En`` per volume (``x10E9/L`` -> ``10*9/L``);
5. atom by atom (:data:`ATOMS`) around ``/`` and ``.``: ``mcg/mL`` -> ``ug/mL``, ``MG/DL`` -> ``mg/dL``,
   ``cells/uL`` -> ``{cells}/uL``, ``mIU/L`` -> ``m[IU]/L``.

Every candidate from steps 3-5 is checked with the grammar before it is returned, so a code comes out
only when the UCUM grammar accepts it.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

SYSTEM = "http://unitsofmeasure.org"

#: Longer strings are never parsed: no unit is that long, and the Earley parser's time grows with length.
MAX_LENGTH = 64

MISLEADING: dict[str, str] = {
    "k/ul": "10*3/uL",
    "k/mm3": "10*3/mm3",
    "k/mcl": "10*3/uL",
    "m/ul": "10*6/uL",
    "f": "[degF]",
    "c": "Cel",
    "ph": "[pH]",
    "ft": "[ft_i]",
    "u/l": "U/L",
    "u/ml": "U/mL",
    "mg%": "mg/dL",
    "g%": "g/dL",
    "gm": "g",
}

ALIASES: dict[str, str] = {
    # counts per volume
    "mil/ul": "10*6/uL",
    "thou/ul": "10*3/uL",
    "thou/mm3": "10*3/mm3",
    "giga/l": "10*9/L",
    "giga.l-1": "10*9/L",
    "tera/l": "10*12/L",
    "tera.l-1": "10*12/L",
    "cells/ul": "{cells}/uL",
    "cells/mcl": "{cells}/uL",
    "cells/mm3": "{cells}/mm3",
    "copies/ml": "{copies}/mL",
    "cfu/ml": "{CFU}/mL",
    "/hpf": "/[HPF]",
    "/lpf": "/[LPF]",
    "per hpf": "/[HPF]",
    "perhpf": "/[HPF]",
    "perlpf": "/[LPF]",
    # rates
    "bpm": "/min",
    "beats/min": "/min",
    "beat/min": "/min",
    "breaths/min": "/min",
    "breath/min": "/min",
    "/min.": "/min",
    "mm/hr": "mm/h",
    "ml/min/1.73m2": "mL/min/{1.73_m2}",
    "ml/min/1.73m^2": "mL/min/{1.73_m2}",
    "ml/min/1.73sqm": "mL/min/{1.73_m2}",
    "mg/24hr": "mg/(24.h)",
    "mg/24h": "mg/(24.h)",
    "mg/24hrs": "mg/(24.h)",
    "g/24hr": "g/(24.h)",
    "g/24h": "g/(24.h)",
    "ml/24hr": "mL/(24.h)",
    "ml/24h": "mL/(24.h)",
    "mmol/24hr": "mmol/(24.h)",
    "mmol/24h": "mmol/(24.h)",
    # pressure, temperature
    "mmhg": "mm[Hg]",
    "cmh2o": "cm[H2O]",
    "inhg": "[in_i'Hg]",
    "degf": "[degF]",
    "°f": "[degF]",
    "deg.f": "[degF]",
    "fahrenheit": "[degF]",
    "degc": "Cel",
    "°c": "Cel",
    "deg.c": "Cel",
    "celsius": "Cel",
    # body measures
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "pound": "[lb_av]",
    "pounds": "[lb_av]",
    "oz": "[oz_av]",
    "in": "[in_i]",
    "inch": "[in_i]",
    "inches": "[in_i]",
    "feet": "[ft_i]",
    "kg/m^2": "kg/m2",
    "kg/sqm": "kg/m2",
    # time
    "sec": "s",
    "secs": "s",
    "second": "s",
    "seconds": "s",
    "mins": "min",
    "minute": "min",
    "minutes": "min",
    "hr": "h",
    "hrs": "h",
    "hour": "h",
    "hours": "h",
    "day": "d",
    "days": "d",
    "week": "wk",
    "weeks": "wk",
    "wks": "wk",
    "month": "mo",
    "months": "mo",
    "mos": "mo",
    "yr": "a",
    "yrs": "a",
    "year": "a",
    "years": "a",
    # dimensionless
    "percent": "%",
    "pct": "%",
    "ratio": "{ratio}",
    "index": "{index}",
    "titer": "{titer}",
    "ppm": "[ppm]",
    "ppb": "[ppb]",
}

#: Atoms written in other spellings or cases -> the UCUM atom (keys lower-case).
ATOMS: dict[str, str] = {
    "mcg": "ug",
    "ug": "ug",
    "mg": "mg",
    "g": "g",
    "gm": "g",
    "kg": "kg",
    "ng": "ng",
    "pg": "pg",
    "l": "L",
    "dl": "dL",
    "ml": "mL",
    "ul": "uL",
    "mcl": "uL",
    "fl": "fL",
    "mol": "mol",
    "mmol": "mmol",
    "umol": "umol",
    "mcmol": "umol",
    "nmol": "nmol",
    "pmol": "pmol",
    "fmol": "fmol",
    "meq": "meq",
    "mosm": "mosm",
    "iu": "[IU]",
    "miu": "m[IU]",
    "uiu": "u[IU]",
    "kiu": "k[IU]",
    "u": "U",
    "mu": "mU",
    "ku": "kU",
    "cells": "{cells}",
    "copies": "{copies}",
    "cfu": "{CFU}",
    "hpf": "[HPF]",
    "lpf": "[LPF]",
    "hr": "h",
    "hrs": "h",
    "sec": "s",
    "min": "min",
    "mm": "mm",
    "cm": "cm",
    "m2": "m2",
    "mm3": "mm3",
    "ukat": "ukat",
}

_MICRO = str.maketrans({"\u00b5": "u", "\u03bc": "u", "\u00d7": "x"})
_SPACE_AROUND_OP = re.compile(r"\s*([/.])\s*")
_POWER_OF_TEN = re.compile(r"^x?10(?:\^|e|\*\*?)(\d{1,2})/(ul|mcl|l|mm3|ml)$")
_PER_VOLUME = {"ul": "uL", "mcl": "uL", "l": "L", "mm3": "mm3", "ml": "mL"}
_ATOM_SPLIT = re.compile(r"([/.()])")

_lock = threading.Lock()


@lru_cache(maxsize=1)
def _parser() -> Any:
    from ucumvert import get_ucum_parser  # with pint, 0.3 s to import: on the first unit, not at import

    return get_ucum_parser()


@lru_cache(maxsize=4096)
def is_ucum(code: str) -> bool:
    """True when ``code`` is a UCUM code (case-sensitive, as FHIR uses it). Never raises."""
    if not code or len(code) > MAX_LENGTH or not code.isascii() or not code.isprintable() or " " in code:
        return False
    from ucumvert import parse_ucum  # see _parser: on the first unit, not at import

    try:
        with _lock:  # one Earley parse at a time: cheap (misses only) and no reliance on lark's reentrancy
            parse_ucum(code, _parser())
    except Exception:  # any parse failure, whatever lark raises, means "not UCUM"
        return False
    return True


def _checked(candidate: str | None) -> str | None:
    return candidate if candidate and is_ucum(candidate) else None


@lru_cache(maxsize=4096)
def to_ucum(unit: str) -> str | None:
    """The UCUM code for ``unit`` as a feed writes it, or ``None``. Never raises.

    The result, when not ``None``, is accepted by the UCUM grammar, and ``to_ucum(result) == result``.
    """
    if not isinstance(unit, str):
        return None
    text = unit.strip()
    if not text or len(text) > MAX_LENGTH:
        return None
    key = text.lower()
    misleading = MISLEADING.get(key)
    if misleading is not None:
        return _checked(misleading)
    if is_ucum(text):
        return text
    text = _SPACE_AROUND_OP.sub(r"\1", text.translate(_MICRO))
    if is_ucum(text):
        return text
    key = re.sub(r"\s+", "", text.lower())
    found = _checked(MISLEADING.get(key) or ALIASES.get(key))
    if found:
        return found
    m = _POWER_OF_TEN.match(key)
    if m:
        found = _checked(f"10*{int(m.group(1))}/{_PER_VOLUME[m.group(2)]}")
        if found:
            return found
    if " " in text:
        return None
    parts = _ATOM_SPLIT.split(text)
    rebuilt = "".join(ATOMS.get(p.lower(), p) if p not in "/.()" else p for p in parts)
    if rebuilt == text:
        return None
    # the rebuilt code must itself come back unchanged, or to_ucum would not be idempotent
    found = _checked(rebuilt)
    return found if found and MISLEADING.get(found.lower()) in (None, found) else None


__all__ = ["ALIASES", "ATOMS", "MISLEADING", "SYSTEM", "is_ucum", "to_ucum"]
