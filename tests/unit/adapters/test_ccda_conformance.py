"""The project's adapter conformance kit (adapters.conformance) run on samples for the four adapters
of this package: validation, determinism, Provenance, in-bundle references, PUT entries, and located
rejections of truncated and mutated copies."""

from __future__ import annotations

from pathlib import Path

from adapters.base import SourceInfo
from adapters.ccda import CcdaAdapter
from adapters.common.guard import guarded
from adapters.conformance import run
from adapters.errors import InternalAdapterError, Location
from adapters.fhirjson import FhirPassthroughAdapter
from adapters.mappedcsv import EXAMPLES, MappedCsvAdapter
from adapters.synthea import SyntheaCsvAdapter

SRC = SourceInfo("conformance")


def _assert_ok(report: object) -> None:
    assert report.ok, report.render()  # type: ignore[attr-defined]


def test_ccda_conformance(samples: Path) -> None:
    base = samples / "ccda"
    paths = [
        base / "ms-fhir-converter" / "Transfer_Summary.ccda",
        base / "ms-fhir-converter" / "Unstructured_Document_embed.ccda",
        next((base / "hl7-c-cda-examples" / "documents" / "Health_Concerns").rglob("*.xml")),
    ]
    _assert_ok(run(CcdaAdapter(), paths, SRC, mutations=6))


def test_fhir_conformance(samples: Path) -> None:
    paths = [
        samples / "expected" / "ccda" / "ms-fhir-converter" / "CCD.json",
        samples / "fhir" / "ms-fhir-converter-stu3" / "Patient.json",
    ]
    _assert_ok(run(FhirPassthroughAdapter(), paths, SRC, mutations=6))


def test_synthea_conformance(samples: Path) -> None:
    _assert_ok(run(SyntheaCsvAdapter(), [samples / "synthea" / "csv"], SRC, mutations=3))


def test_mapped_csv_conformance(samples: Path) -> None:
    base = samples / "csv"
    _assert_ok(
        run(
            MappedCsvAdapter(mapping=str(EXAMPLES / "simplereport-patients.toml")),
            [base / "simplereport" / "patients" / "malformed.csv"],
            SRC,
            mutations=6,
        )
    )
    _assert_ok(
        run(
            MappedCsvAdapter(mapping=str(EXAMPLES / "reportstream-lab-results.toml")),
            [
                base / "reportstream" / "ReportStream-StandardCSV-ExampleData-20220509.csv",
                base / "reportstream" / "edge-cases" / "column-headers-only.csv",
            ],
            SRC,
            mutations=6,
        )
    )


def test_guard_turns_a_bug_into_a_located_internal_error() -> None:
    def broken():  # a real generator that fails half-way, as a converter bug would
        yield from ()
        raise KeyError("boom")

    [out] = list(guarded("x", broken(), Location(file="f", line=1), b"raw"))
    assert isinstance(out.error, InternalAdapterError)  # type: ignore[union-attr]
    assert out.error.location.line == 1 and "KeyError" in out.error.message  # type: ignore[union-attr]
