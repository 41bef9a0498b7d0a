"""Mapped CSV adapter: vendor flat files -> FHIR R4, driven by a declarative TOML mapping.

One bundle per data row (the row's resources, e.g. Patient + Observation). A row that cannot be
mapped (missing required value, unparseable date, unmapped code, ragged row, invalid FHIR) becomes
a :class:`RejectedRecord` located by file, line and column; the other rows still convert.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from adapters.base import Adapter, Outcome, RejectedRecord, SourceInfo, sha256_hex
from adapters.bundle import BundleBuilder
from adapters.common import ucum
from adapters.common.csvread import BadRow, CsvFileError, RowError, decode, read_csv
from adapters.common.dates import parse_date_format
from adapters.common.guard import guarded
from adapters.errors import AdapterError, InternalAdapterError, Location, ValidationFailed
from adapters.mappedcsv.mapping import (
    FieldSpec,
    Mapping,
    MappingError,
    ResourceSpec,
    load_mapping,
    template_columns,
)

EXAMPLES = Path(__file__).parent / "examples"
_SEG = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)(?:\[(\d+)\])?")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at a path like ``name[0].given[1]``, creating dicts and lists as needed."""
    segs = [(m.group(1), int(m.group(2)) if m.group(2) is not None else None) for m in _SEG.finditer(path)]
    cur: Any = obj
    for i, (name, idx) in enumerate(segs):
        last = i == len(segs) - 1
        if idx is None:
            if last:
                cur[name] = value
            else:
                cur = cur.setdefault(name, {})
        else:
            lst = cur.setdefault(name, [])
            while len(lst) <= idx:
                lst.append(None)
            if last:
                lst[idx] = value
            else:
                if lst[idx] is None:
                    lst[idx] = {}
                cur = lst[idx]


def compact(obj: Any) -> Any:
    """Drop ``None`` holes in lists and empty containers left by optional fields."""
    if isinstance(obj, dict):
        out = {k: compact(v) for k, v in obj.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(obj, list):
        out_l = [compact(v) for v in obj]
        return [v for v in out_l if v not in (None, {}, [])]
    return obj


_QUANTITY_KEYS = frozenset({"value", "comparator", "unit", "system", "code", "id", "extension"})
_INDEX = re.compile(r"\[\d+\]")


def _quantities(obj: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, Quantity) for every Quantity in a resource: a numeric ``value`` with a unit or a code.

    No other FHIR type has a numeric ``value`` beside only Quantity's elements (Identifier's and
    Coding's are strings, Money has a currency).
    """
    if isinstance(obj, dict):
        v = obj.get("value")
        if (
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and ("unit" in obj or "code" in obj)
            and obj.keys() <= _QUANTITY_KEYS
        ):
            yield path, obj
            return
        for k, child in obj.items():
            yield from _quantities(child, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, child in enumerate(obj):
            yield from _quantities(child, f"{path}[{i}]")


def _unit_column(spec: ResourceSpec, path: str) -> str | None:
    """The column a Quantity's code (else unit) came from, for the warning's location."""
    bare = _INDEX.sub("", path)
    for leaf in ("code", "unit"):
        for f in spec.fields:
            if f.column and _INDEX.sub("", f.path) == f"{bare}.{leaf}":
                return f.column
    return None


class MappedCsvAdapter(Adapter):
    """CSV with a declarative mapping: ``--option mapping=FILE`` (required); ``encoding=latin-1`` overrides."""

    name = "csv"
    version = "0.1.0"
    description = "Vendor CSV flat files mapped to FHIR by a TOML mapping (--option mapping=FILE)"
    suffixes = (".csv", ".txt")

    def __init__(self, **options: str) -> None:
        unknown = set(options) - {"mapping", "encoding", "delimiter"}
        if unknown:
            raise AdapterError(
                f"adapter 'csv' has no option(s) {', '.join(sorted(unknown))}; "
                "known: mapping, encoding, delimiter"
            )
        mp = options.get("mapping")
        self.mapping: Mapping | None = None
        self.encoding = options.get("encoding") or "utf-8"
        self.delimiter = options.get("delimiter") or ","
        if mp:
            path = Path(mp)
            if not path.exists() and (EXAMPLES / mp).exists():
                path = EXAMPLES / mp
            elif not path.exists() and (EXAMPLES / f"{mp}.toml").exists():
                path = EXAMPLES / f"{mp}.toml"
            self.mapping = load_mapping(path)
            self.encoding = options.get("encoding") or self.mapping.encoding
            self.delimiter = options.get("delimiter") or self.mapping.delimiter
        try:
            "x".encode(self.encoding)
        except LookupError:
            raise AdapterError(f"csv option encoding {self.encoding!r} is not a known encoding") from None
        if len(self.delimiter) != 1:
            raise AdapterError("csv option delimiter must be one character")

    def convert(self, data: bytes, source: SourceInfo, *, filename: str | None = None) -> Iterator[Outcome]:
        """One outcome per data row; a file-level problem (empty, no header, encoding) is one rejection."""
        yield from guarded(
            self.name, self._convert(data, source, filename), Location(file=filename, line=1), data
        )

    def _convert(self, data: bytes, source: SourceInfo, filename: str | None) -> Iterator[Outcome]:
        if self.mapping is None:
            yield RejectedRecord(
                self.error(
                    f"adapter 'csv' needs --option mapping=FILE (a TOML mapping; examples: "
                    f"{', '.join(sorted(p.stem for p in EXAMPLES.glob('*.toml')))})",
                    Location(file=filename),
                ),
                data,
            )
            return
        input_sha = sha256_hex(data)
        try:
            text = decode(data, self.encoding)
            header, rows = read_csv(text, delimiter=self.delimiter)
        except CsvFileError as exc:
            yield RejectedRecord(self.error(str(exc), Location(file=filename, line=exc.line)), data)
            return
        mapping = self.mapping
        colmap = self._resolve_columns(header, mapping)
        missing = [c for c in mapping.required_columns if c not in colmap]
        if missing:
            yield RejectedRecord(
                self.error(
                    f"header lacks column(s) required by mapping {mapping.name!r}: {', '.join(missing)} "
                    f"(header: {', '.join(header[:12])}{'...' if len(header) > 12 else ''})",
                    Location(file=filename, line=1),
                ),
                data,
            )
            return
        absent = sorted(c for c in mapping.columns() if c not in colmap)
        count = 0
        for row in rows:
            count += 1
            if isinstance(row, BadRow):
                yield RejectedRecord(
                    self.error(row.message, Location(file=filename, line=row.line)),
                    row.raw.encode("utf-8"),
                    f"line {row.line}",
                )
                continue
            values = {c: row.values.get(h, "") for c, h in colmap.items()}
            try:
                yield self._row(mapping, values, row.line, row.raw, source, input_sha, filename, absent)
            except Exception as exc:  # a bug, not bad input: located, never a traceback
                yield RejectedRecord(
                    InternalAdapterError(
                        f"cannot convert row: {type(exc).__name__}: {exc}",
                        adapter=self.name,
                        location=Location(file=filename, line=row.line),
                    ),
                    row.raw.encode("utf-8"),
                    f"line {row.line}",
                )
        if count == 0:  # nothing is dropped silently: say that the file had no records
            yield RejectedRecord(
                self.error("file has a header but no data rows", Location(file=filename, line=1)), data
            )

    def _resolve_columns(self, header: list[str], mapping: Mapping) -> dict[str, str]:
        """Mapping column name -> header name (exact, else case- and space-insensitive)."""
        norm = {re.sub(r"[\s_]+", "_", h.strip().lower()): h for h in header}
        out: dict[str, str] = {}
        for c in mapping.columns():
            if c in header:
                out[c] = c
            else:
                h = norm.get(re.sub(r"[\s_]+", "_", c.strip().lower()))
                if h is not None:
                    out[c] = h
        return out

    # -- one row ------------------------------------------------------------------------------------
    def _row(
        self,
        m: Mapping,
        values: dict[str, str],
        line: int,
        raw: str,
        source: SourceInfo,
        input_sha: str,
        filename: str | None,
        absent: list[str],
    ) -> Outcome:
        rec_id = self._template(m.record_id, values) if m.record_id else None
        record_key = f"line:{line}" if not rec_id else f"id:{rec_id}"
        b = BundleBuilder(
            adapter_name=self.name,
            adapter_version=self.version,
            source=source,
            input_sha256=input_sha,
            record_key=record_key,
        )
        refs: dict[str, str] = {}
        try:
            for spec in m.resources:
                ref = self._resource(spec, values, refs, b, line, source)
                if ref:
                    refs[spec.name] = ref
        except RowError as exc:
            return RejectedRecord(
                self.error(str(exc), Location(file=filename, line=line, column=exc.column)),
                raw.encode("utf-8"),
                rec_id or f"line {line}",
            )
        if not refs:
            return RejectedRecord(
                self.error("row produced no resources", Location(file=filename, line=line)),
                raw.encode("utf-8"),
                rec_id or f"line {line}",
            )
        if absent:
            b.warn(
                "column-absent", f"mapped column(s) not in the file: {', '.join(absent)}", Location(line=line)
            )
        routing = self._template(m.routing_key, values) if m.routing_key else None
        if not routing:
            routing = (
                next((r for r in refs.values() if r.startswith("Patient/")), None) or rec_id or f"line {line}"
            )
        try:
            return b.build(
                routing_key=routing,
                message_id=rec_id or f"line {line}",
                location=Location(file=filename, line=line),
            )
        except ValidationFailed as exc:
            first = exc.errors[0] if exc.errors else {}
            path = ".".join(str(p) for p in first.get("loc", ()))
            return RejectedRecord(
                self.error(
                    f"row does not make valid FHIR: {path}: {first.get('msg', '')}",
                    Location(file=filename, line=line),
                ),
                raw.encode("utf-8"),
                rec_id or f"line {line}",
            )

    def _resource(
        self,
        spec: ResourceSpec,
        values: dict[str, str],
        refs: dict[str, str],
        b: BundleBuilder,
        line: int,
        source: SourceInfo,
    ) -> str | None:
        res: dict[str, Any] = {"resourceType": spec.type}
        content = 0
        errors: list[RowError] = []
        for f in spec.fields:
            try:
                v = self._value(f, values, refs, source)
            except RowError as exc:
                errors.append(exc)
                continue
            if v is None:
                continue
            if f.is_content:
                content += 1
            set_path(res, f.path, v)
        if errors:
            if spec.required or content:
                raise errors[0]
            return None
        if content == 0 and not spec.required:
            return None
        if spec.profile:
            res["meta"] = {"profile": list(spec.profile)}
        res = compact(res)
        self._units(res, spec, b, line)
        key = self._template(spec.key, values) if spec.key else None
        if spec.key and not key:
            raise RowError(None, f"{spec.name}: key {spec.key!r} is empty for this row")
        return b.add(res, spec.name, key if key else f"line:{line}")

    def _units(self, res: dict[str, Any], spec: ResourceSpec, b: BundleBuilder, line: int) -> None:
        """Give every Quantity of the resource a UCUM code when its unit is (or maps to) UCUM.

        A mapping copies unit cells as the vendor writes them (``mcg/mL``, ``mEq/L``); a code the UCUM
        grammar rejects is never emitted under the UCUM system: it is dropped, the text stays in
        ``unit``, and one ``unknown-unit`` warning names the column. Codes of another system are the
        mapping's choice and are left alone.
        """
        for path, q in _quantities(res, ""):
            system, code, unit = q.get("system"), q.get("code"), q.get("unit")
            if system not in (None, ucum.SYSTEM) or not isinstance(code or unit, str):
                continue
            sent = str(code or unit)
            found = ucum.to_ucum(sent)
            if found:
                q["system"], q["code"] = ucum.SYSTEM, found
                q.setdefault("unit", sent)
                continue
            if code is None and system is None:
                continue  # text only, and the mapping claims nothing: nothing to correct
            q.pop("code", None)
            q.pop("system", None)
            q.setdefault("unit", sent)
            b.warn(
                "unknown-unit",
                f"{spec.name}.{path}: unit {sent!r} is not UCUM and not a known spelling of a UCUM unit; "
                "kept as text",
                Location(line=line, column=_unit_column(spec, path)),
            )

    def _template(self, template: str | None, values: dict[str, str]) -> str:
        if not template:
            return ""
        out = template
        for c in template_columns(template):
            out = out.replace("{" + c + "}", " ".join((values.get(c) or "").split()))
        return out.strip() if any((values.get(c) or "").strip() for c in template_columns(template)) else ""

    def _value(self, f: FieldSpec, values: dict[str, str], refs: dict[str, str], source: SourceInfo) -> Any:
        if f.when is not None and not (values.get(f.when) or "").strip():
            return None
        if f.reference is not None:
            r = refs.get(f.reference)
            if r is None and f.required:
                raise RowError(
                    None, f"{f.path}: referenced resource {f.reference!r} was not built for this row"
                )
            return {"reference": r} if r else None
        if f.value is not None:
            return f.value
        col = f.column
        raw = (
            self._template(f.template, values)
            if f.template
            else " ".join((values.get(col or "") or "").split())
        )
        if f.strip_chars and raw:
            raw = raw.strip(f.strip_chars)
        if not raw:
            if f.default is not None:
                return f.default
            if f.required:
                raise RowError(col, f"{col or f.template} is empty but required for {f.path}")
            return None
        if f.map is not None:
            key = raw.strip().lower()
            if key in f.map:
                mapped = f.map[key]
                if mapped == "" or mapped is None:
                    return None
                raw = mapped
            elif f.on_unmapped == "error":
                raise RowError(col, f"{col} value {raw!r} is not in the value map for {f.path}")
            elif f.on_unmapped == "drop":
                return None
            elif f.on_unmapped == "default":
                if f.default is None:
                    return None
                raw = f.default
        if not isinstance(raw, str):
            return raw
        return self._convert_type(f, raw, source)

    def _convert_type(self, f: FieldSpec, raw: str, source: SourceInfo) -> Any:
        col = f.column
        if f.type in ("string", "code"):
            return raw
        if f.type in ("date", "dateTime"):
            for fmt in f.formats:
                v = parse_date_format(raw, fmt, source.timezone)
                if v is not None:
                    if f.type == "date":
                        return v[:10]
                    return v
            raise RowError(
                col,
                f"{col} value {raw!r} does not match any date format of {f.path} ({', '.join(f.formats)})",
            )
        if f.type == "decimal":
            try:
                d = Decimal(raw.replace(",", ""))
            except InvalidOperation:
                raise RowError(col, f"{col} value {raw!r} is not a number") from None
            if not d.is_finite():
                raise RowError(col, f"{col} value {raw!r} is not a finite number")
            return int(d) if d == d.to_integral_value() and "." not in raw else float(d)
        if f.type == "integer":
            if not re.match(r"^[+-]?\d+$", raw):
                raise RowError(col, f"{col} value {raw!r} is not an integer")
            return int(raw)
        if f.type == "boolean":
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise RowError(col, f"{col} value {raw!r} is not a yes/no value")
        raise RowError(col, f"unsupported type {f.type}")  # pragma: no cover - checked at load


__all__ = ["MappedCsvAdapter", "MappingError", "compact", "set_path"]
