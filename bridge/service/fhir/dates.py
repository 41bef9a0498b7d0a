"""FHIR date and dateTime search values: the half-open UTC interval each denotes, at its precision.

Intervals are integer microseconds since day 0 of the proleptic Gregorian calendar, so that values at
the ends of years 0001-9999 (``9999-12-31``, a common "unknown" sentinel), or moved there by an
offset, never overflow.
"""

from __future__ import annotations

import calendar
import functools
import re
from datetime import UTC, date, datetime, timedelta

#: a FHIR date/dateTime search value at any precision (ASCII digits only; matched whole)
DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,
)


def utc_millis(value: str) -> str:
    """A FHIR date/dateTime parameter as the index's stored instant form (UTC, milliseconds, ``Z``): the
    first instant it denotes, rounded up to the millisecond (the stored ``meta.lastUpdated`` values are
    whole milliseconds), so that string comparison with them is exact. Clamped to years 0001-9999."""
    lo = -(-interval(value)[0] // 1000) * 1000
    return _as_datetime(lo).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_US_PER_DAY = 86_400_000_000
#: the first and last microsecond a datetime can hold, as microseconds since day 0 of the proleptic calendar
_MIN_US = date.min.toordinal() * _US_PER_DAY
_MAX_US = (date.max.toordinal() + 1) * _US_PER_DAY - 1


@functools.lru_cache(
    maxsize=4096
)  # in_range asks for the same bounds (and most stored dates) once per resource
def interval(value: str) -> tuple[int, int]:
    """The half-open UTC interval a FHIR date/dateTime denotes, in microseconds since day 0 of the
    proleptic Gregorian calendar (integers: an interval at the ends of years 0001-9999, or moved there
    by an offset, never overflows).

    The precision given sets the width (FHIR search): a year, a month, a day, a minute
    (``T08:00Z``: 08:00:00 to 08:00:59.999999), a second, or the fraction of a second written (``.5``:
    a tenth; below a microsecond, the microsecond it falls in). Values without an offset are taken as
    UTC. Raises ValueError for a malformed value.
    """
    m = DATE.fullmatch(value)
    if m is None:
        raise ValueError(f"not a FHIR date or dateTime: {value!r}")
    year_s, month_s, day_s, hour_s, minute_s, second_s, frac, tz = m.groups()
    year, month = int(year_s), int(month_s or 1)
    first = date(year, month, int(day_s or 1))  # ValueError for year 0, month 13, day 30 of February
    day0 = first.toordinal()
    if month_s is None:
        return day0 * _US_PER_DAY, (day0 + (366 if calendar.isleap(year) else 365)) * _US_PER_DAY
    if day_s is None:
        return day0 * _US_PER_DAY, (day0 + calendar.monthrange(year, month)[1]) * _US_PER_DAY
    if hour_s is None:
        return day0 * _US_PER_DAY, (day0 + 1) * _US_PER_DAY
    hour, minute, second = int(hour_s), int(minute_s), int(second_s or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"not a valid time: {value!r}")
    offset = 0
    if tz and tz != "Z":
        oh, om = int(tz[1:3]), int(tz[4:6])
        if oh > 23 or om > 59:
            raise ValueError(f"not a valid offset: {value!r}")
        offset = (1 if tz[0] == "+" else -1) * (oh * 60 + om) * 60_000_000
    if second_s is None:
        width = 60_000_000
    elif frac is None:
        width = 1_000_000
    else:
        width = 10 ** max(0, 6 - len(frac))
    lo = (
        day0 * _US_PER_DAY
        + ((hour * 60 + minute) * 60 + second) * 1_000_000
        + int(frac[:6].ljust(6, "0") if frac else 0)
    )
    return lo - offset, lo - offset + width


def now_us() -> int:
    """Now, on :func:`interval`'s scale (microseconds since day 0 of the proleptic calendar, UTC)."""
    now = datetime.now(UTC)
    day = now.date().toordinal() * _US_PER_DAY
    return day + ((now.hour * 60 + now.minute) * 60 + now.second) * 1_000_000 + now.microsecond


def _as_datetime(us: int) -> datetime:
    """Microseconds from :func:`interval` as an aware UTC datetime, clamped to datetime.min/max."""
    return datetime.min.replace(tzinfo=UTC) + timedelta(microseconds=min(max(us, _MIN_US), _MAX_US) - _MIN_US)


def date_range(value: str) -> tuple[datetime, datetime]:
    """The half-open UTC interval a FHIR date/dateTime denotes, at the precision given (see
    :func:`interval`), clamped to datetime.min/max in UTC (``9999-12-31`` ends at datetime.max).

    Values without an offset are taken as UTC. Raises ValueError for a malformed value.
    """
    lo, hi = interval(value)
    return _as_datetime(lo), _as_datetime(hi)


def stored_interval(value: str) -> tuple[int, int]:
    """:func:`interval` of a stored clinical date; one Python's ISO parser reads but FHIR's grammar
    does not (``2026-01-10 08:00:00+0100``) is taken as the second it names."""
    try:
        return interval(value)
    except ValueError:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))  # ValueError: no date at all
    offset = dt.utcoffset() or timedelta(0)
    naive = dt.replace(tzinfo=None)
    lo = (
        naive.toordinal() * _US_PER_DAY
        + ((naive.hour * 60 + naive.minute) * 60 + naive.second) * 1_000_000
        + naive.microsecond
        - offset // timedelta(microseconds=1)
    )
    return lo, lo + 1_000_000


def in_range(clinical: str | None, start: str | None, end: str | None) -> bool:
    """Whether a clinical date overlaps [start, end], each taken at its own precision (FHIR search semantics).

    A resource without a clinical date never matches a date filter. Dates at the ends of the calendar
    (``9999-12-31``, ``0001-01-01T00:00:00+01:00``) compare like any other: nothing overflows.
    """
    if start is None and end is None:
        return True
    if not clinical:
        return False
    try:
        lo, hi = stored_interval(clinical)
    except ValueError:
        return False
    if start is not None and hi <= interval(start)[0]:
        return False
    return not (end is not None and lo >= interval(end)[1])
