"""Units outside HL7 v2: the C-CDA PQ quantity and the mapped-CSV adapter emit a UCUM code only for a
unit the UCUM grammar accepts (as written or as a known spelling), else the text with a warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from adapters.base import ConvertedBundle, SourceInfo
from adapters.bundle import BundleBuilder
from adapters.ccda.datatypes import Ctx, quantity
from adapters.mappedcsv import MappedCsvAdapter

UCUM = "http://unitsofmeasure.org"
SRC = SourceInfo("vendor", timezone="UTC")


def ccda_quantity(unit: str | None) -> tuple[dict[str, Any] | None, list[str]]:
    attrs = f' unit="{unit}"' if unit is not None else ""
    root = etree.fromstring(f'<observation><value value="5.5"{attrs}/></observation>'.encode())
    b = BundleBuilder(
        adapter_name="ccda", adapter_version="t", source=SRC, input_sha256="0" * 64, record_key="1"
    )
    q = quantity(root.find("value"), Ctx(b, SRC, root, "doc.xml"))
    return q, [w.code for w in b.warnings]


@pytest.mark.parametrize(
    ("unit", "code"),
    [("mg/dL", "mg/dL"), ("10*9/L", "10*9/L"), ("1", "1"), (" mmol/L ", "mmol/L"), ("mEq/L", "meq/L"),
     ("mcg", "ug"), ("mmHg", "mm[Hg]"), ("IU/L", "[IU]/L")],
)  # fmt: skip
def test_ccda_units_get_a_ucum_code_when_they_are_ucum(unit: str, code: str) -> None:
    q, warnings = ccda_quantity(unit)
    assert q == {"value": 5.5, "unit": unit.strip(), "system": UCUM, "code": code}
    assert warnings == []


def test_ccda_unit_that_is_not_ucum_stays_text_with_a_warning() -> None:
    q, warnings = ccda_quantity("tablets taken")
    assert q == {"value": 5.5, "unit": "tablets taken"}
    assert warnings == ["unknown-unit"]


def test_ccda_quantity_without_unit() -> None:
    assert ccda_quantity(None) == ({"value": 5.5}, [])


LAB = """
name = "units"
[[resource]]
name = "obs"
type = "Observation"
key = "{id}"
  [[resource.field]]
  path = "status"
  value = "final"
  [[resource.field]]
  path = "code.text"
  column = "test"
  required = true
  [[resource.field]]
  path = "valueQuantity.value"
  column = "result"
  type = "decimal"
  [[resource.field]]
  path = "valueQuantity.unit"
  column = "units"
  [[resource.field]]
  path = "valueQuantity.system"
  value = "http://unitsofmeasure.org"
  when = "units"
  [[resource.field]]
  path = "valueQuantity.code"
  column = "units"
  [[resource.field]]
  path = "referenceRange[0].low.value"
  column = "low"
  type = "decimal"
  [[resource.field]]
  path = "referenceRange[0].low.unit"
  column = "units"
"""


def convert_rows(tmp_path: Path, rows: str) -> list[ConvertedBundle]:
    p = tmp_path / "units.toml"
    p.write_text(LAB)
    outs = list(MappedCsvAdapter(mapping=str(p)).convert(("id,test,result,units,low\n" + rows).encode(), SRC))
    assert all(isinstance(o, ConvertedBundle) for o in outs), outs
    return outs  # type: ignore[return-value]


def observation(out: ConvertedBundle) -> dict[str, Any]:
    (o,) = [e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    return o


def test_csv_units_are_normalised_to_ucum(tmp_path: Path) -> None:
    a, b = convert_rows(tmp_path, "1,Vitamin B12,450,pg/mL,200\n2,Vitamin D,30,mcg/mL,20\n")
    assert observation(a)["valueQuantity"] == {"value": 450, "unit": "pg/mL", "system": UCUM, "code": "pg/mL"}
    assert observation(b)["valueQuantity"] == {"value": 30, "unit": "mcg/mL", "system": UCUM, "code": "ug/mL"}
    # a unit given as text only gets its UCUM code too
    assert observation(b)["referenceRange"][0]["low"] == {
        "value": 20,
        "unit": "mcg/mL",
        "system": UCUM,
        "code": "ug/mL",
    }
    assert not a.warnings and not b.warnings


def test_csv_unit_that_is_not_ucum_is_not_emitted_as_ucum(tmp_path: Path) -> None:
    (out,) = convert_rows(tmp_path, "1,Widgets,3,blobs,1\n")
    o = observation(out)
    assert o["valueQuantity"] == {"value": 3, "unit": "blobs"}
    assert o["referenceRange"][0]["low"] == {"value": 1, "unit": "blobs"}
    (w,) = out.warnings
    assert w.code == "unknown-unit" and (w.location.line, w.location.column) == (2, "units")
