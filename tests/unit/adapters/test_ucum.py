"""adapters.common.ucum: UCUM validation with the real grammar, and the spellings labs send mapped to UCUM."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ucumvert import get_ucum_parser, parse_ucum

from adapters.common import ucum

PARSER = get_ucum_parser()


def accepted_by_library(code: str) -> bool:
    """The library's own verdict, without our wrapper or its caches."""
    try:
        parse_ucum(code, PARSER)
    except Exception:
        return False
    return True


# units that real labs send, and a few more from common panels
VALID_AS_SENT = [
    "nmol/L", "umol/L", "ug/L", "pmol/L", "g/L", "10*9/L", "10*12/L", "mmol/L", "mg/dL", "U/L", "fL", "pg",
    "%", "uL", "10*3/uL", "10*6/uL", "g/dL", "{cells}/uL", "mL/min/{1.73_m2}", "/[HPF]", "[IU]/L", "m[IU]/mL",
    "mm[Hg]", "Cel", "[degF]", "/min", "kg/m2", "mg/(24.h)", "ng/mL{FEU}", "meq/L", "mosm/kg", "1", "{ratio}",
]  # fmt: skip

MAPPED = {
    "mcg": "ug",
    "mcg/mL": "ug/mL",
    "\u00b5L": "uL",
    "\u00b5mol/L": "umol/L",
    "cells/uL": "{cells}/uL",
    "mEq/L": "meq/L",
    "IU": "[IU]",
    "IU/L": "[IU]/L",
    "mIU/mL": "m[IU]/mL",
    "sec": "s",
    "hrs": "h",
    "mmHg": "mm[Hg]",
    "mm Hg": "mm[Hg]",
    "bpm": "/min",
    "beats/min": "/min",
    "degF": "[degF]",
    "x10E3/uL": "10*3/uL",
    "x10E9/L": "10*9/L",
    "10^3/uL": "10^3/uL",  # valid UCUM (the 10^ atom) as sent: kept
    "K/uL": "10*3/uL",  # valid UCUM, but kelvin per microlitre
    "F": "[degF]",  # farad
    "pH": "[pH]",  # picohenry
    "u/L": "U/L",  # atomic mass units per litre
    "mg%": "mg/dL",
    "MG/DL": "mg/dL",
    "mg / dL": "mg/dL",
    "mL/min/1.73m2": "mL/min/{1.73_m2}",
    "mm/hr": "mm/h",
    "lbs": "[lb_av]",
    "giga.l-1": "10*9/L",
    "copies/mL": "{copies}/mL",
}

NOT_UCUM = ["", "   ", "blobs", "per cent of total", "mg/dL mg/dL", "x" * 100, "%^percent", "{a b}/L", "\x00"]


@pytest.mark.parametrize("unit", VALID_AS_SENT)
def test_valid_ucum_is_kept_as_sent(unit: str) -> None:
    assert ucum.is_ucum(unit)
    assert ucum.to_ucum(unit) == unit


@pytest.mark.parametrize(("unit", "code"), MAPPED.items())
def test_common_spellings_map_to_ucum(unit: str, code: str) -> None:
    assert ucum.to_ucum(unit) == code
    assert accepted_by_library(code)


@pytest.mark.parametrize("unit", NOT_UCUM)
def test_not_ucum_gives_no_code(unit: str) -> None:
    assert ucum.to_ucum(unit) is None


def test_every_listed_target_is_ucum_and_maps_to_itself() -> None:
    for table in (ucum.MISLEADING, ucum.ALIASES):
        for spelling, code in table.items():
            assert accepted_by_library(code), (spelling, code)
            assert ucum.to_ucum(code) == code, (spelling, code)
            assert ucum.to_ucum(spelling) == code, spelling


def test_validation_is_cached() -> None:
    ucum.to_ucum("mg/dL")
    before = ucum.is_ucum.cache_info().hits
    for _ in range(100):
        assert ucum.to_ucum("mg/dL") == "mg/dL"
    # repeated units never reach the grammar again (the outer cache answers them)
    assert ucum.is_ucum.cache_info().hits == before
    assert ucum.to_ucum.cache_info().hits >= 100


# units as feeds write them: UCUM-ish atoms, operators, digits, annotations, spaces and anything else
_ATOM = st.sampled_from(
    ["mg", "g", "L", "dL", "mL", "uL", "mcg", "mmol", "U", "IU", "[IU]", "%", "10*3", "10^9", "x10E3", "K",
     "cells", "{cells}", "h", "hr", "min", "s", "sec", "mm", "[Hg]", "Hg", "m2", "1.73", "24", "kg", "pH",
     "\u00b5", "F", "C", "degF", "ft", "in", "{", "}", "(", ")"]
)  # fmt: skip
_UNITS = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(_ATOM, st.sampled_from(["/", ".", " ", "-", "2", "^"])), max_size=8).map("".join),
)


@settings(max_examples=400, deadline=None)
@given(_UNITS)
@example("mg/dL")
@example("K/uL")
@example("((((((((((((((((((((((((((((((g))))))))))))))))))))))))))))))")
def test_normaliser_never_raises_emits_only_ucum_and_is_idempotent(unit: str) -> None:
    code = ucum.to_ucum(unit)
    if code is None:
        return
    assert accepted_by_library(code)
    assert ucum.is_ucum(code)
    assert ucum.to_ucum(code) == code
    assert code == code.strip() and " " not in code  # a FHIR code: no whitespace


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_is_ucum_agrees_with_the_library(text: str) -> None:
    assert ucum.is_ucum(text) == (
        bool(text) and len(text) <= ucum.MAX_LENGTH and text.isascii() and text.isprintable()
        and " " not in text and accepted_by_library(text)
    )  # fmt: skip
