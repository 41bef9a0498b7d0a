"""HL7 timestamps (``YYYYMMDDHHMMSS.ffff+ZZZZ``) and common CSV date formats to FHIR date/dateTime."""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_TS = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?\s*([+-]\d{4}|Z)?$"
)


def _zone(tz: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def hl7_ts_to_fhir(value: str | None, tz: str = "UTC") -> str | None:
    """Convert an HL7 TS to a FHIR ``dateTime`` (or ``date`` for day precision), or ``None`` if invalid.

    Precision is kept: ``2014`` -> ``2014``, ``201403`` -> ``2014-03``, ``20140302`` -> ``2014-03-02``.
    A time without an offset is interpreted in ``tz`` (FHIR requires an offset once there is a time).
    Impossible dates (month 13, Feb 30) return ``None``. Never raises.
    """
    if not value:
        return None
    m = _TS.match(value.strip())
    if not m:
        return None
    y, mo, d, hh, mi, ss, frac, off = m.groups()
    if int(y) == 0:  # FHIR years run from 0001
        return None
    try:
        if mo is None:
            return y
        if d is None:
            if not 1 <= int(mo) <= 12:
                return None
            return f"{y}-{mo}"
        datetime(int(y), int(mo), int(d))
        if hh is None:
            return f"{y}-{mo}-{d}"
        mi = mi or "00"
        ss = ss or "00"
        dt = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss))
    except ValueError:
        return None
    fs = f".{frac}" if frac else ""
    if off == "Z":
        offs = "Z"
    elif off:
        offs = f"{off[:3]}:{off[3:]}"
        hours, minutes = int(off[1:3]), int(off[3:])
        if minutes > 59 or hours > 14 or (hours == 14 and minutes):  # FHIR: at most +/-14:00
            return None
    else:
        zone = _zone(tz)
        if zone is None or tz == "UTC":
            offs = "Z"
        else:
            delta = dt.replace(tzinfo=zone).utcoffset()
            mins = int(delta.total_seconds() // 60) if delta is not None else 0
            sign = "+" if mins >= 0 else "-"
            mins = abs(mins)
            offs = f"{sign}{mins // 60:02d}:{mins % 60:02d}"
    return f"{dt.year:04d}-{dt:%m-%dT%H:%M:%S}{fs}{offs}"  # %Y is not zero-padded below 1000 on glibc


def date_part(fhir_dt: str | None) -> str | None:
    """The ``date`` part of a FHIR dateTime (``2014-03-02T...`` -> ``2014-03-02``)."""
    if not fhir_dt:
        return None
    return fhir_dt.split("T", 1)[0]


def parse_date_format(value: str, fmt: str, tz: str = "UTC") -> str | None:
    """Parse ``value`` with a ``strptime`` format; return a FHIR date (no time in ``fmt``) or dateTime.

    Two-digit years follow ``strptime`` (69-99 -> 19xx, 00-68 -> 20xx). ``None`` when it does not parse.
    """
    try:
        dt = datetime.strptime(value.strip(), fmt)
    except ValueError:
        return None
    has_time = any(t in fmt for t in ("%H", "%I", "%M", "%S"))
    if not has_time:
        return f"{dt.year:04d}-{dt:%m-%d}"
    if dt.tzinfo is None:
        zone = _zone(tz)
        if zone is not None:
            dt = dt.replace(tzinfo=zone)
    s = dt.isoformat()
    return s.replace("+00:00", "Z") if s.endswith("+00:00") else s
