"""HL7 timestamps (v2 TS/DTM, CDA TS) and common CSV date formats to FHIR date/dateTime.

:func:`parse_ts` is the one reading of an HL7 timestamp for every adapter. The form is that of HL7
v2.5.1 DTM (ch. 2A) and the CDA TS literal: ``YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ]``.

* Dates keep their precision (``2014``, ``2014-03``, ``2014-03-02``): FHIR dateTime allows a year or
  a month, and a date carries no offset, so one given with a date is not used.
* A time becomes a FHIR dateTime with seconds (FHIR requires them once there is a time: ``14`` is
  ``14:00:00``) and an offset: the value's own, else the one of the source's time zone at that local
  time (zoneinfo, so DST-aware; FHIR requires an offset once there is a time).
* Fractions of a second are kept as written, 1 to 6 digits: DTM allows 4, the CDA TS more; 6 is the
  microsecond, the finest a ``datetime`` downstream can hold.
* The offset is 4 digits (DTM and CDA TS both say ``ZZZZ``), at most 14:00 either way (FHIR's limit).
  ``Z`` (the ISO 8601 designator for UTC, found in CDA documents) is UTC. An offset of hours alone is
  refused: a truncated ``+0530`` would be read 30 minutes wrong.
* A zero offset is written ``Z`` (the source's ``+0000`` and a zone at UTC alike), except ``-0000``,
  which is kept as ``-00:00``.
* Only ASCII digits: a value that is no real calendar date or time (month 13, 30 February, hour 24,
  minute 60, year 0) raises :class:`BadTimestamp`, so no invalid dateTime is ever emitted.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from adapters.errors import AdapterError

_TS = re.compile(
    r"^([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?)?)?)?"
    r"\s*(?:([+-])([0-9]{2})([0-9]{2})|(Z))?$"
)


class BadTimestamp(AdapterError):
    """A TS/DTM that is not a valid date/time. ``str()`` says why without the value; ``value`` holds it."""

    def __init__(self, value: str, reason: str, *, quoted: str = " in ") -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason
        self._quoted = quoted

    def described(self) -> str:
        """The reason with the value, for a conversion warning (which records what was dropped)."""
        return f"{self.reason}{self._quoted}{self.value!r}"


def _zone(tz: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return None


@lru_cache(maxsize=64)
def _source_zone(name: str) -> ZoneInfo | timezone:
    """The source's time zone; UTC for ``UTC``, an empty name or a name zoneinfo does not know."""
    if name in ("UTC", "Z", ""):
        return UTC
    return _zone(name) or UTC


@lru_cache(maxsize=8192)
def parse_ts(value: str, tz_name: str = "UTC") -> tuple[str, str]:
    """An HL7 TS/DTM to ``(precision, FHIR value)``, per the rules of this module.

    precision is ``year``, ``month``, ``day`` (the value is a FHIR date) or ``time`` (a FHIR dateTime
    with seconds and an offset). ``tz_name`` is the IANA zone of local times without an offset.
    Raises :class:`BadTimestamp` for anything that is not a real calendar date/time.
    """
    m = _TS.match(value.strip())
    if not m:
        raise BadTimestamp(value, "not an HL7 timestamp", quoted=": ")
    y, mo, d, hh, mi, ss, frac, sign, oh, om, zulu = m.groups()
    year = int(y)
    if year < 1:  # FHIR years run from 0001
        raise BadTimestamp(value, "year 0")
    if mo is None:
        return "year", y
    if not 1 <= int(mo) <= 12:
        raise BadTimestamp(value, f"month {mo}")
    if d is None:
        return "month", f"{y}-{mo}"
    try:
        datetime(year, int(mo), int(d))
    except ValueError as exc:
        raise BadTimestamp(value, str(exc)) from None
    if hh is None:
        return "day", f"{y}-{mo}-{d}"
    h, mn, s = int(hh), int(mi or 0), int(ss or 0)
    if h > 23 or mn > 59 or s > 59:
        if h == 24 and mn == 0 and s == 0:
            raise BadTimestamp(value, "24:00 is not a FHIR time")
        raise BadTimestamp(value, "time out of range")
    if sign:
        offh, offm = int(oh), int(om)
        if offm > 59 or offh > 14 or (offh == 14 and offm):  # FHIR: at most +/-14:00
            raise BadTimestamp(value, "offset out of range")
        off = f"{sign}{oh}:{om}"
    elif zulu:
        off = "Z"
    else:
        local = datetime(year, int(mo), int(d), h, mn, s, tzinfo=_source_zone(tz_name))
        delta = local.utcoffset() or timedelta(0)
        total = int(delta.total_seconds() // 60)
        sgn = "-" if total < 0 else "+"
        total = abs(total)
        off = f"{sgn}{total // 60:02d}:{total % 60:02d}"
    if off == "+00:00":
        off = "Z"
    fr = f".{frac}" if frac else ""
    return "time", f"{y}-{mo}-{d}T{h:02d}:{mn:02d}:{s:02d}{fr}{off}"


def hl7_ts_to_fhir(value: str | None, tz: str = "UTC") -> str | None:
    """:func:`parse_ts`'s FHIR value (a date or dateTime), or ``None`` when empty or invalid. Never raises."""
    if not value:
        return None
    try:
        return parse_ts(value, tz)[1]
    except BadTimestamp:
        return None


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
