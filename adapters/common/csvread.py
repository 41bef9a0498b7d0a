"""Robust CSV reading for the CSV adapters: encodings, quoted newlines, ragged rows, located errors.

:func:`read_csv` yields :class:`Row` objects (a dict of column -> value plus the row's first physical
line number) and :class:`BadRow` objects for rows that cannot be trusted (more or fewer fields than
the header). It never raises on content; only :class:`CsvFileError` for a file with no header at all.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from adapters.errors import AdapterError

csv.field_size_limit(16 * 1024 * 1024)


class CsvFileError(AdapterError):
    """The file as a whole is unusable (empty, undecodable, no header). ``line`` when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class RowError(AdapterError):
    """A field of a row is unusable. ``column`` names it (``None``: the row as a whole); the adapter
    turns the error into a :class:`~adapters.errors.ParseError` located by file, line and column."""

    def __init__(self, column: str | None, message: str) -> None:
        super().__init__(message)
        self.column = column


@dataclass(slots=True)
class Row:
    """One data row: ``values`` keyed by (stripped) header names, ``line`` = first physical line (1-based)."""

    values: dict[str, str]
    line: int
    raw: str = ""


@dataclass(slots=True)
class BadRow:
    """A row that could not be read as a record: why, where, and its original text."""

    message: str
    line: int
    raw: str
    fields: list[str] = field(default_factory=list)


def decode(data: bytes, encoding: str = "utf-8") -> str:
    """Decode ``data``: UTF-8 (a BOM is stripped) by default, or the named encoding (e.g. ``latin-1``).

    Raises :class:`CsvFileError` naming the first bad byte's line when the bytes are not in that encoding.
    """
    enc = encoding.lower().replace("_", "-")
    if enc in ("utf-8", "utf8", "utf-8-sig"):
        enc = "utf-8-sig"
    try:
        return data.decode(enc)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CsvFileError(
            f"not valid {encoding}: byte 0x{data[exc.start]:02x} at line {line}; "
            "use the encoding option (e.g. encoding=latin-1)",
            line,
        ) from None
    except LookupError:
        raise CsvFileError(f"unknown encoding {encoding!r}") from None


def read_csv(
    text: str, *, delimiter: str = ",", required: tuple[str, ...] = ()
) -> tuple[list[str], Iterator[Row | BadRow]]:
    """Parse ``text``; return ``(header, rows)``.

    Blank lines are skipped. A row with a different number of fields than the header is a
    :class:`BadRow` (trailing empty fields beyond the header are tolerated). Raises
    :class:`CsvFileError` when the file is empty, has no header, or lacks a ``required`` column.
    """
    if not text.strip():
        raise CsvFileError("file is empty (no header line)", 1)
    # the lines as the csv reader counts them (str.splitlines also breaks at \x0c, \x85, \u2028...,
    # which put the wrong raw text on a rejected row)
    lines = io.StringIO(text).readlines()
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=False)
    try:
        header = next(reader)
    except StopIteration:
        raise CsvFileError("file is empty (no header line)", 1) from None
    except csv.Error as exc:
        raise CsvFileError(f"header line is not CSV: {exc}", 1) from None
    header = [h.strip() for h in header]
    if not any(header):
        raise CsvFileError("header line is blank", 1)
    counts = Counter(h for h in header if h)
    repeated = sorted(h for h, n in counts.items() if n > 1)
    if repeated:  # a later column would silently overwrite the earlier one's values
        raise CsvFileError(f"column name(s) appear more than once in the header: {', '.join(repeated)}", 1)
    missing = [c for c in required if c not in header]
    if missing:
        raise CsvFileError(f"missing required column(s): {', '.join(missing)}", 1)
    return header, _rows(reader, header, lines)


def _rows(reader: Any, header: list[str], lines: list[str]) -> Iterator[Row | BadRow]:
    n = len(header)
    prev_end = reader.line_num
    while True:
        start = prev_end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            end = reader.line_num
            yield BadRow(f"malformed CSV: {exc}", start, "".join(lines[start - 1 : end]))
            prev_end = end
            continue
        end = reader.line_num
        prev_end = end
        raw = "".join(lines[start - 1 : end])
        if not fields or all(not f.strip() for f in fields):  # blank or all-empty: no data
            continue
        if len(fields) > n and all(not f.strip() for f in fields[n:]):
            fields = fields[:n]
        if len(fields) != n:
            yield BadRow(f"row has {len(fields)} fields, header has {n}", start, raw, fields)
            continue
        yield Row(dict(zip(header, fields, strict=True)), start, raw)
