"""Every public HL7 v2 sample (Microsoft's and ReportStream's) converts without a crash and validates."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from adapters.base import ConvertedBundle, SourceInfo
from adapters.hl7v2 import HL7v2Adapter

# the same place as the `samples` fixture (tests/conftest.py), needed at collection time to parametrise
SAMPLES = Path(
    os.environ.get("FHIRBRIDGE_SAMPLES", Path(__file__).resolve().parents[3].parent / "shared" / "samples")
)

ADAPTER = HL7v2Adapter()  # shared: the adapter is stateless
SRC = SourceInfo("samples", timezone="America/New_York")
ROOT = SAMPLES / "hl7v2"
FILES = (
    sorted(p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".hl7", ".hl7v2"))
    if ROOT.is_dir()
    else []
)


def _convert(path: Path) -> list[ConvertedBundle]:
    out = list(ADAPTER.convert(path.read_bytes(), SRC, filename=str(path)))
    bad = [o for o in out if not isinstance(o, ConvertedBundle)]
    assert not bad, [str(o.error) for o in bad]  # type: ignore[union-attr]
    return out  # type: ignore[return-value]


def test_sample_set_is_complete(samples: Path) -> None:
    names = {p.relative_to(ROOT).parts[0] for p in FILES}
    assert len([p for p in FILES if p.parts[-2] == "ms-fhir-converter"]) == 139
    assert len([p for p in FILES if "reportstream" in p.parts]) == 263
    assert names == {"ms-fhir-converter", "ms-fhir-converter-timezone", "reportstream"}


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_sample_converts_and_validates(path: Path, samples: Path) -> None:
    out = _convert(path)
    assert out
    for cb in out:
        types = [e["resource"]["resourceType"] for e in cb.bundle["entry"]]
        assert types[-1] == "Provenance"


EXPECT = {
    "ADT-A01-01.hl7": {
        "Patient",
        "Encounter",
        "AllergyIntolerance",
        "Condition",
        "Coverage",
        "Practitioner",
        "Location",
    },
    "ADT-A40-01.hl7": {"Patient"},
    "ORU-R01-01.hl7": {"DiagnosticReport", "Observation", "Specimen"},
    "LRI_2.0-NG_CBC_Typ_Message.hl7": {"DiagnosticReport", "Observation", "Specimen"},
    "VXU-V04-01.hl7": {"Immunization"},
    "ORM-O01-01.hl7": {"ServiceRequest"},
    "OML-O21-01.hl7": {"ServiceRequest", "Specimen"},
    "SIU-S12-01.hl7": {"Appointment"},
    "MDM-T02-01.hl7": {"DocumentReference"},
    "RDE-O11-01.hl7": {"MedicationRequest"},
    "DFT-P03-01.hl7": {"ChargeItem"},
}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_message_types_give_the_expected_resources(name: str, samples: Path) -> None:
    (cb,) = _convert(ROOT / "ms-fhir-converter" / name)
    types = Counter(e["resource"]["resourceType"] for e in cb.bundle["entry"])
    assert EXPECT[name] <= set(types), types


def test_a40_sample_links_the_merged_patient(samples: Path) -> None:
    (cb,) = _convert(ROOT / "ms-fhir-converter" / "ADT-A40-01.hl7")
    links = [lk["type"] for e in cb.bundle["entry"] for lk in e["resource"].get("link", [])]
    assert "replaced-by" in links and "replaces" in links


def test_timezone_sample_uses_the_source_zone(samples: Path) -> None:
    (cb,) = _convert(ROOT / "ms-fhir-converter-timezone" / "Hl7v2TestTimezoneInput.hl7v2")
    assert cb.bundle["timestamp"] == "2005-01-10T04:55:04-05:00"
