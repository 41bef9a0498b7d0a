"""HL7 timestamps (v2 TS/DTM, CDA TS): one reading for every adapter (adapters.common.dates.parse_ts).

Three layers: the edge cases that decide the rules, a literal reference implementation checked against
the fast one on generated values, and the same value read alike by the hl7v2 and ccda adapters.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from adapters.base import SourceInfo
from adapters.bundle import BundleBuilder
from adapters.ccda.datatypes import Ctx, ts
from adapters.common.dates import BadTimestamp, hl7_ts_to_fhir, parse_ts
from adapters.errors import Location
from adapters.hl7v2 import datatypes as v2

FHIR_DATETIME = re.compile(
    r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?$"
)
ZONES = ["UTC", "America/New_York", "Europe/London", "Asia/Kathmandu", "Australia/Lord_Howe"]


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        ("2024", "UTC", "2024"),
        ("202403", "UTC", "2024-03"),
        ("20240305", "America/New_York", "2024-03-05"),
        ("2024030514", "UTC", "2024-03-05T14:00:00Z"),  # FHIR needs seconds once there is a time
        ("20240305143015.1234", "UTC", "2024-03-05T14:30:15.1234Z"),
        ("20240305143015.123456", "UTC", "2024-03-05T14:30:15.123456Z"),  # a CDA TS may have more than 4
        ("20240305143015.1234567", "UTC", None),  # finer than a microsecond
        ("20240305143015+0545", "UTC", "2024-03-05T14:30:15+05:45"),
        ("20240305143015", "Asia/Kathmandu", "2024-03-05T14:30:15+05:45"),  # the source's zone
        ("20240705143000", "America/New_York", "2024-07-05T14:30:00-04:00"),  # at that local time (DST)
        ("20240305143015+0000", "America/New_York", "2024-03-05T14:30:15Z"),
        ("20240305143015", "Europe/London", "2024-03-05T14:30:15Z"),  # a zone at UTC: Z as well
        ("20240305143015-0000", "UTC", "2024-03-05T14:30:15-00:00"),
        ("20240305143015Z", "America/New_York", "2024-03-05T14:30:15Z"),  # ISO 8601's UTC designator
        ("20240305143015 +0100", "UTC", "2024-03-05T14:30:15+01:00"),
        ("20240305143015+1400", "UTC", "2024-03-05T14:30:15+14:00"),
        ("20240305143015+1401", "UTC", None),  # FHIR: at most 14:00
        ("20240305143015-1500", "UTC", None),
        ("20240305143015+0560", "UTC", None),
        ("20240305143015+05", "UTC", None),  # hours alone: a cut +0530 would be 30 minutes off
        ("20241305", "UTC", None),  # month 13
        ("20240230", "UTC", None),
        ("20240305240000", "UTC", None),  # hour 24
        ("20240305236000", "UTC", None),
        ("20240305235960", "UTC", None),
        ("24", "UTC", None),  # HL7 has no two-digit years:
        ("240305", "UTC", "2403-05"),  # the first four digits are the year, the next two the month
        ("0000", "UTC", None),  # FHIR years run from 0001
        ("2024-03-05", "UTC", None),
        ("٢٠٢٤٠٣٠٥", "UTC", None),  # digits are ASCII in DTM and in the CDA schema
        ("2024030514.5", "UTC", None),  # a fraction only after seconds
    ],
)
def test_parse_ts_edge_cases(value: str, tz: str, expected: str | None) -> None:
    assert hl7_ts_to_fhir(value, tz) == expected


def test_bad_timestamp_keeps_the_value_out_of_its_text() -> None:
    with pytest.raises(BadTimestamp) as ei:
        parse_ts("19801313", "UTC")
    assert str(ei.value) == "month 13" and ei.value.value == "19801313"
    assert ei.value.described() == "month 13 in '19801313'"


# -- a literal reference implementation ---------------------------------------------------------------


def reference(value: str, tz: str) -> str | None:
    """The rules of adapters.common.dates, written out step by step with no regular expression."""
    s = value.strip()
    offset = None
    if s.endswith("Z"):
        s, offset = s[:-1].rstrip(), "Z"
    elif len(s) >= 5 and s[-5] in "+-" and all(c in "0123456789" for c in s[-4:]):
        s, offset = s[:-5].rstrip(), s[-5:]
    main, _, frac = s.partition(".")
    digits = set("0123456789")
    if not main or not set(main) <= digits or len(main) not in (4, 6, 8, 10, 12, 14):
        return None
    if "." in s and (len(main) != 14 or not 1 <= len(frac) <= 6 or not set(frac) <= digits):
        return None
    y, rest = int(main[:4]), main[4:]
    parts = [int(rest[i : i + 2]) for i in range(0, len(rest), 2)]
    if y == 0:
        return None
    if len(parts) == 0:
        return main[:4]
    if not 1 <= parts[0] <= 12:
        return None
    if len(parts) == 1:
        return f"{main[:4]}-{main[4:6]}"
    try:
        datetime(y, parts[0], parts[1])
    except ValueError:
        return None
    if len(parts) == 2:
        return f"{main[:4]}-{main[4:6]}-{main[6:8]}"
    hour, minute, second = [*parts[2:], 0, 0][:3]
    if hour > 23 or minute > 59 or second > 59:
        return None
    local = datetime(y, parts[0], parts[1], hour, minute, second)
    if offset == "Z":
        off = "Z"
    elif offset:
        oh, om = int(offset[1:3]), int(offset[3:])
        if om > 59 or oh * 60 + om > 14 * 60:
            return None
        off = "Z" if offset == "+0000" else f"{offset[:3]}:{offset[3:]}"
    else:
        zone = UTC if tz == "UTC" else ZoneInfo(tz)
        minutes = (local.replace(tzinfo=zone).utcoffset() or timedelta(0)) // timedelta(minutes=1)
        sign = "-" if minutes < 0 else "+"
        off = "Z" if minutes == 0 else f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    fraction = f".{frac}" if "." in s else ""
    return f"{main[:4]}-{main[4:6]}-{main[6:8]}T{hour:02d}:{minute:02d}:{second:02d}{fraction}{off}"


def _two(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.integers(lo, hi).map(lambda n: f"{n:02d}")


#: HL7-shaped values, valid and not: every precision, parts mostly in range and sometimes not (month
#: 13, hour 24, minute 60 ...), fractions of 0-8 digits, offsets of every length (and Z), spaces, now
#: and then a non-ASCII digit.
@st.composite
def hl7_ts(draw: st.DrawFn) -> str:
    ranges = [(1, 12, 0, 19), (1, 28, 0, 39), (0, 23, 0, 29), (0, 59, 0, 69), (0, 59, 0, 69)]
    parts = [
        draw(st.one_of(_two(lo, hi), _two(lo, hi), _two(lo, hi), _two(bad_lo, bad_hi)))
        for lo, hi, bad_lo, bad_hi in ranges[: draw(st.integers(0, 5))]
    ]
    frac = draw(st.one_of(st.just(""), st.text("0123456789", max_size=8).map(lambda f: "." + f)))
    offset = draw(
        st.one_of(
            st.just(""),
            st.just("Z"),
            st.tuples(st.sampled_from("+-"), _two(0, 14), st.sampled_from(["00", "30", "45"])).map("".join),
            st.tuples(st.sampled_from("+-"), _two(0, 19), _two(0, 69)).map("".join),
            st.tuples(st.sampled_from("+-"), st.text("0123456789", min_size=1, max_size=5)).map("".join),
        )
    )
    year = draw(st.one_of(st.integers(1800, 2100), st.integers(0, 9999)))
    return (
        f"{year:04d}"
        + "".join(parts)
        + frac
        + draw(st.sampled_from(["", " "]))
        + offset
        + draw(st.sampled_from(["", "", "", "\u0665"]))
    )


HL7_TS = hl7_ts()


@settings(max_examples=800, deadline=None)
@given(HL7_TS, st.sampled_from(ZONES))
def test_parse_ts_matches_the_reference(value: str, tz: str) -> None:
    assert hl7_ts_to_fhir(value, tz) == reference(value, tz)


@settings(max_examples=300, deadline=None)
@given(st.one_of(HL7_TS, st.text(max_size=30)), st.sampled_from(ZONES))
def test_never_an_invalid_fhir_datetime(value: str, tz: str) -> None:
    out = hl7_ts_to_fhir(value, tz)
    assert out is None or FHIR_DATETIME.match(out), out


# -- one behaviour: the hl7v2 and ccda adapters read a value alike -----------------------------------


def _ccda_ts(value: str, source: SourceInfo) -> tuple[str | None, bool]:
    el = etree.Element("effectiveTime", value=value)
    b = BundleBuilder(
        adapter_name="ccda", adapter_version="0", source=source, input_sha256="0" * 64, record_key="1"
    )
    return ts(el, Ctx(b, source, el, None)), bool(b.warnings)


def _hl7v2_ts(value: str, source: SourceInfo) -> tuple[str | None, bool]:
    warned: list[str] = []
    ctx = v2.Context(source, lambda code, message, loc: warned.append(code))
    return v2.fhir_datetime(ctx, value, Location(segment="OBX", field=14)), bool(warned)


@settings(max_examples=300, deadline=None)
@given(HL7_TS.filter(lambda v: v.strip() != ""), st.sampled_from(ZONES))
def test_hl7v2_and_ccda_read_a_timestamp_alike(value: str, tz: str) -> None:
    source = SourceInfo("org", timezone=tz)
    ccda, ccda_warned = _ccda_ts(value, source)
    hl7v2, hl7v2_warned = _hl7v2_ts(value, source)
    assert ccda == hl7v2 == hl7_ts_to_fhir(value, tz)
    assert ccda_warned == hl7v2_warned == (ccda is None)  # a value dropped is never dropped silently
