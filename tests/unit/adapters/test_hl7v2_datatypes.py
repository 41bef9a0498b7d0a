"""HL7 v2 data types to FHIR: TS/DTM (every precision, offsets, zones), CX, XPN, XAD, XTN, CWE, NM/SN units."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import SourceInfo
from adapters.common.dates import parse_ts
from adapters.errors import Location
from adapters.hl7v2 import datatypes as dt
from adapters.hl7v2.er7 import DEFAULT_ENCODING, Field

FHIR_DATETIME = re.compile(
    r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?$"
)


class Sink:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, Location]] = []

    def __call__(self, code: str, message: str, loc: Location) -> None:
        self.items.append((code, message, loc))


def ctx(tz: str = "UTC", **kw: object) -> tuple[dt.Context, Sink]:
    sink = Sink()
    return dt.Context(SourceInfo("org", timezone=tz, **kw), sink), sink  # type: ignore[arg-type]


def F(raw: str) -> Field:
    return Field(raw, DEFAULT_ENCODING)


LOC = Location(segment="PID", field=7)


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        ("2024", "UTC", ("year", "2024")),
        ("202403", "UTC", ("month", "2024-03")),
        ("20240305", "UTC", ("day", "2024-03-05")),
        ("2024030514", "UTC", ("time", "2024-03-05T14:00:00Z")),
        ("202403051430", "UTC", ("time", "2024-03-05T14:30:00Z")),
        ("20240305143015", "UTC", ("time", "2024-03-05T14:30:15Z")),
        ("20240305143015.1234", "UTC", ("time", "2024-03-05T14:30:15.1234Z")),
        ("20240305143015+0530", "UTC", ("time", "2024-03-05T14:30:15+05:30")),
        ("20240305143015-0000", "UTC", ("time", "2024-03-05T14:30:15-00:00")),
        ("202403051430-0500", "Europe/Paris", ("time", "2024-03-05T14:30:00-05:00")),
        # no offset: the source's zone, DST-aware
        ("20240305143000", "America/New_York", ("time", "2024-03-05T14:30:00-05:00")),
        ("20240705143000", "America/New_York", ("time", "2024-07-05T14:30:00-04:00")),
        ("20240705143000", "Asia/Kolkata", ("time", "2024-07-05T14:30:00+05:30")),
    ],
)
def test_parse_ts_precisions_and_offsets(value: str, tz: str, expected: tuple[str, str]) -> None:
    assert parse_ts(value, tz) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x",
        "2024-03-05",
        "20241301",
        "20240230",
        "20240305250000",
        "20240305126000",
        "0000",
        "20240305120000+1500",
        "2024030512000",
    ],
)
def test_invalid_timestamps_are_dropped_with_warning(bad: str) -> None:
    c, sink = ctx()
    assert dt.fhir_datetime(c, bad, LOC) is None
    assert bool(sink.items) == bool(bad)


def test_instant_needs_time_and_date_drops_time() -> None:
    c, sink = ctx()
    assert dt.fhir_instant(c, "20240305", LOC) is None and sink.items[0][0] == "imprecise-instant"
    assert dt.fhir_date(c, "20240305143000+0200", LOC) == "2024-03-05"


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="0123456789+-. ", max_size=24),
    st.sampled_from(["UTC", "America/New_York", "Australia/Lord_Howe"]),
)
def test_never_an_invalid_fhir_datetime(value: str, tz: str) -> None:
    c, _ = ctx(tz)
    out = dt.fhir_datetime(c, value, LOC)
    assert out is None or FHIR_DATETIME.match(out), out


def test_cx_identifier_systems() -> None:
    c, _ = ctx(assigning_authorities=(("STM", "https://stm.example/mrn"),))
    assert dt.cx_identifier(c, F("123^^^STM^MR"), LOC) == {
        "type": {"coding": [{"system": dt.V2_0203, "code": "MR", "display": "Medical record number"}]},
        "system": "https://stm.example/mrn",
        "value": "123",
    }
    assert dt.cx_identifier(c, F("9^^^SSA&2.16.840.1.113883.4.1&ISO^SS"), LOC)["system"] == dt.US_SSN  # type: ignore[index]
    assert dt.cx_identifier(c, F("9^^^X&1.2.3&ISO"), LOC)["system"] == "urn:oid:1.2.3"  # type: ignore[index]
    assert dt.cx_identifier(c, F("9^^^LAB"), LOC)["system"] == "urn:fhirbridge:org:id:LAB"  # type: ignore[index]
    assert dt.cx_identifier(c, F("^^^LAB"), LOC) is None


def test_xpn() -> None:
    c, _ = ctx()
    assert dt.human_name(c, F("DOE^JANE^Q^JR^DR^^L"), LOC) == {
        "use": "official",
        "family": "DOE",
        "given": ["JANE", "Q"],
        "prefix": ["DR"],
        "suffix": ["JR"],
    }
    assert dt.human_name(c, F("DOE&VAN^JO"), LOC)["family"] == "DOE"  # type: ignore[index]
    assert dt.human_name(c, F("^^^^^"), LOC) is None


def test_xad_and_xtn() -> None:
    c, _sink = ctx()
    assert dt.address(c, F("1 MAIN ST^STE 2^TOWN^ST^12345^USA^H^^COUNTY"), LOC) == {
        "use": "home",
        "line": ["1 MAIN ST", "STE 2"],
        "city": "TOWN",
        "district": "COUNTY",
        "state": "ST",
        "postalCode": "12345",
        "country": "USA",
    }
    assert dt.address(c, F("^^^^^^ZZ"), LOC) is None
    assert dt.contact_point(c, F("^PRN^PH^^1^555^1234567^99"), LOC) == {
        "system": "phone",
        "value": "+1 (555) 123-4567 ext. 99",
        "use": "home",
    }
    assert dt.contact_point(c, F("^NET^Internet^a@b.org"), LOC) == {"system": "email", "value": "a@b.org"}
    assert dt.contact_point(c, F("(555)555-1212"), LOC) == {"system": "phone", "value": "(555)555-1212"}
    assert dt.contact_point(c, F("^PRS^CP^^^555^7654321"), LOC)["use"] == "mobile"  # type: ignore[index]


def test_cwe_systems_known_unknown_local() -> None:
    c, sink = ctx()
    cc = dt.codeable(c, F("718-7^Hemoglobin^LN^HGB^Hgb^L^2.77^^Hemoglobin in blood"), LOC)
    assert cc == {
        "coding": [
            {"system": "http://loinc.org", "version": "2.77", "code": "718-7", "display": "Hemoglobin"},
            {"system": "urn:fhirbridge:org:codesystem:L", "code": "HGB", "display": "Hgb"},
        ],
        "text": "Hemoglobin in blood",
    }
    assert not sink.items
    cc = dt.codeable(c, F("X1^Thing^WEIRDSYS"), LOC)
    assert cc == {"coding": [{"system": "WEIRDSYS", "code": "X1", "display": "Thing"}]}
    assert sink.items[0][0] == "unknown-code-system" and "WEIRDSYS" in sink.items[0][1]
    assert dt.codeable(c, F("^free text only"), LOC) == {
        "coding": [{"display": "free text only"}],
        "text": "free text only",
    }
    assert dt.codeable(c, F("A^^HL70078"), LOC)["coding"][0]["system"] == (  # type: ignore[index]
        "http://terminology.hl7.org/CodeSystem/v2-0078"
    )


def test_numbers_and_ucum_units() -> None:
    c, sink = ctx()
    assert dt.number("5.50") == 5.5 and dt.number("-3") == -3 and dt.number(".5") == 0.5
    for bad in ("1e5", "nan", "1,5", "", "inf", "5-"):
        assert dt.number(bad) is None
    assert dt.quantity(c, 5.5, F("mmol/L^^UCUM"), LOC) == {
        "value": 5.5,
        "unit": "mmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "mmol/L",
    }
    assert dt.quantity(c, 60, F("beats/min"), LOC)["code"] == "/min"
    assert dt.quantity(c, 98.6, F("degF^^ANSI"), LOC)["code"] == "[degF]"
    q = dt.quantity(c, 1, F("blobs^^99LOCAL"), LOC)
    assert q["unit"] == "blobs" and q["system"].endswith("codesystem:99LOCAL")
    q = dt.quantity(c, 1, F("blobs"), LOC)
    assert q == {"value": 1, "unit": "blobs"} and sink.items[-1][0] == "unknown-unit"
