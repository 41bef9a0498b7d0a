"""HL7 v2 units: UCUM system and code for every unit the UCUM grammar accepts, common spellings mapped,
one warning per field for the rest, and never a code without a system."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.base import ConvertedBundle, SourceInfo
from adapters.hl7v2 import HL7v2Adapter

SRC = SourceInfo("st-mary", timezone="UTC")
A = HL7v2Adapter()
UCUM = "http://unitsofmeasure.org"
HEAD = (
    "MSH|^~\\&|LAB|FAC|FB|FB|20240101120000+0000||ORU^R01^ORU_R01|C1|P|2.5.1\r"
    "PID|1||M1^^^^MR||DOE^JANE||19800101|F\r"
    "OBR|1|P1^EPIC||24323-8^Panel^LN|||20240101080000+0000|||||||||||||||||F\r"
)


def convert(body: str) -> ConvertedBundle:
    (out,) = A.convert((HEAD + body).encode(), SRC)
    assert isinstance(out, ConvertedBundle), out.error  # type: ignore[union-attr]
    return out


def observations(b: ConvertedBundle) -> list[dict[str, Any]]:
    return [e["resource"] for e in b.bundle["entry"] if e["resource"]["resourceType"] == "Observation"]


def quantities(obj: Any) -> list[dict[str, Any]]:
    """Every Quantity-like object (has a numeric value and a unit or code) in a resource."""
    out = []
    if isinstance(obj, dict):
        if isinstance(obj.get("value"), int | float) and ("unit" in obj or "code" in obj):
            out.append(obj)
        for v in obj.values():
            out += quantities(v)
    elif isinstance(obj, list):
        for v in obj:
            out += quantities(v)
    return out


def unit_of(obx6: str) -> dict[str, Any]:
    (o,) = observations(convert(f"OBX|1|NM|2345-7^Glucose^LN||5.4|{obx6}|||||F\r"))
    return dict(o["valueQuantity"])


ISSUE_UNITS = ["nmol/L", "umol/L", "ug/L", "pmol/L", "g/L", "10*9/L", "10*12/L", "mmol/L", "mg/dL", "U/L",
               "fL", "pg", "%"]  # fmt: skip


@pytest.mark.parametrize("unit", ISSUE_UNITS)
@pytest.mark.parametrize("system", ["", "UCUM"])
def test_valid_ucum_units_get_system_and_code(unit: str, system: str) -> None:
    q = unit_of(f"{unit}^^{system}" if system else unit)
    assert q == {"value": 5.4, "unit": unit, "system": UCUM, "code": unit}


@pytest.mark.parametrize(
    ("sent", "code"),
    [("mcg", "ug"), ("uL", "uL"), ("cells/uL", "{cells}/uL"), ("mEq/L", "meq/L"), ("IU", "[IU]"),
     ("IU/L", "[IU]/L"), ("sec", "s"), ("hrs", "h"), ("mmHg", "mm[Hg]"), ("bpm", "/min"), ("degF", "[degF]"),
     ("x10E3/uL", "10*3/uL"), ("K/uL", "10*3/uL"), ("mIU/mL", "m[IU]/mL")],
)  # fmt: skip
def test_common_spellings_become_ucum_and_keep_the_text_as_sent(sent: str, code: str) -> None:
    assert unit_of(sent) == {"value": 5.4, "unit": sent, "system": UCUM, "code": code}


def test_unit_text_is_tried_when_the_code_is_local() -> None:
    assert unit_of("LB1^pounds^99LOCAL") == {
        "value": 5.4,
        "unit": "pounds",
        "system": UCUM,
        "code": "[lb_av]",
    }


def test_a_non_ucum_code_claimed_as_ucum_gets_no_code() -> None:
    b = convert("OBX|1|NM|2345-7^Glucose^LN||5.4|blobs^^UCUM|||||F\r")
    (o,) = observations(b)
    assert o["valueQuantity"] == {"value": 5.4, "unit": "blobs"}
    assert [w.code for w in b.warnings] == ["unknown-unit"]


def test_unit_systems_without_a_uri_are_not_emitted_as_systems() -> None:
    assert unit_of("blobs^^ISO+") == {"value": 5.4, "unit": "blobs"}
    assert unit_of("blobs^^ANSI") == {"value": 5.4, "unit": "blobs"}


def test_a_local_unit_keeps_its_local_system() -> None:
    q = unit_of("blobs^^99LOCAL")
    assert q["code"] == "blobs" and q["system"].endswith(":codesystem:99LOCAL")


def test_an_unknown_unit_is_warned_once_per_field() -> None:
    # OBX-6 is the unit of the value and of both ends of the reference range
    b = convert("OBX|1|NM|2345-7^Glucose^LN||5.4|furlongs|1.0-9.0|||||F\r")
    (o,) = observations(b)
    assert o["valueQuantity"] == {"value": 5.4, "unit": "furlongs"}
    assert o["referenceRange"][0]["low"] == {"value": 1.0, "unit": "furlongs"}
    unit_warnings = [w for w in b.warnings if w.code == "unknown-unit"]
    assert len(unit_warnings) == 1
    assert (unit_warnings[0].location.segment, unit_warnings[0].location.field) == ("OBX", 6)


def test_each_field_gets_its_own_warning() -> None:
    b = convert(
        "OBX|1|NM|2345-7^Glucose^LN||5.4|furlongs|1.0-9.0|||||F\r"
        "OBX|2|NM|2951-2^Sodium^LN||140|furlongs|135-145|||||F\r"
    )
    unit_warnings = [w for w in b.warnings if w.code == "unknown-unit"]
    assert [w.location.segment_index for w in unit_warnings] == [4, 5]


def test_a_structured_numeric_unit_warning_is_located_at_obx6() -> None:
    b = convert("OBX|1|SN|2345-7^Glucose^LN||>^5|furlongs|||||F\r")
    (w,) = [w for w in b.warnings if w.code == "unknown-unit"]
    assert (w.location.segment, w.location.field) == ("OBX", 6)


def test_no_quantity_has_a_code_without_a_system() -> None:
    # R4 qty-3: a unit code needs its system
    b = convert(
        "OBX|1|NM|2345-7^Glucose^LN||5.4|blobs^^UCUM|1-9||||F\r"
        "OBX|2|NM|2951-2^Sodium^LN||140|mEq/L|135-145||||F\r"
        "OBX|3|SN|6690-2^WBC^LN||^4^-^5|x10E3/uL|||||F\r"
        "OBX|4|NM|8310-5^Temp^LN||98.6|F^Fahrenheit^ISO+|||||F\r"
        "OBX|5|CQ|1234-5^Dose^LN||5^mcg&micrograms&UCUM|||||F\r"
    )
    qs = [q for o in observations(b) for q in quantities(o)]
    assert len(qs) >= 8
    assert all("system" in q for q in qs if "code" in q)
    assert {q.get("code") for q in qs} >= {"meq/L", "10*3/uL", "[degF]", "ug"}


def test_immunization_dose_units_are_ucum() -> None:
    msg = (
        "MSH|^~\\&|EHR|FAC|FB|FB|20240101120000+0000||VXU^V04^VXU_V04|V1|P|2.5.1\r"
        "PID|1||M1^^^^MR||DOE^JANE||19800101|F\r"
        "RXA|0|1|20240101090000+0000||08^HepB^CVX|0.5|mL^milliliter^ISO+||00\r"
    )
    (out,) = A.convert(msg.encode(), SRC)
    assert isinstance(out, ConvertedBundle)
    (imm,) = [e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == "Immunization"]
    assert imm["doseQuantity"] == {"value": 0.5, "unit": "milliliter", "system": UCUM, "code": "mL"}


def test_an_unknown_unit_coding_system_is_warned_once_per_field() -> None:
    b = convert("OBX|1|NM|2345-7^Glucose^LN||5.4|blobs^^XYZSYS|1.0-9.0|||||F\r")
    assert [w.code for w in b.warnings if w.location.field == 6] == ["unknown-code-system"]


def test_a_field_read_for_two_resources_is_warned_once() -> None:
    # OBR-7 is the report's effective time and the order's occurrence: one bad value, one warning
    (out,) = A.convert(
        (
            HEAD.replace("20240101080000+0000", "20241301080000")
            + "OBX|1|NM|2345-7^Glucose^LN||5.4|mg/dL|||||F\r"
        ).encode(),
        SRC,
    )
    assert isinstance(out, ConvertedBundle)
    assert [(w.code, w.location.field) for w in out.warnings] == [("invalid-timestamp", 7)]
