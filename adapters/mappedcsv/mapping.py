"""Declarative CSV -> FHIR mappings (TOML), loaded and checked up front.

A mapping names the resources built from each row and, for each, the fields to fill::

    name = "simplereport-patients"
    [input]
    encoding = "utf-8"          # or "latin-1"; a UTF-8 BOM is always accepted
    delimiter = ","
    [record]
    id = "{last_name}|{first_name}|{date_of_birth}"   # record id (message id); default: the line

    [[resource]]
    name = "patient"            # referenced by other resources' `reference` fields
    type = "Patient"
    key = "{last_name}|{first_name}|{date_of_birth}"  # business key -> deterministic id
    required = true             # a row that cannot build it is rejected (default true)

      [[resource.field]]
      path = "birthDate"        # FHIR path with [n] indexes, e.g. name[0].given[1]
      column = "date_of_birth"  # or template = "{a} {b}", or value = "constant", or reference = "patient"
      type = "date"             # string (default) | date | dateTime | decimal | integer | boolean
      formats = ["%m/%d/%Y", "%m/%d/%y", "%Y-%m-%d"]
      required = true
      map = { F = "female" }    # value map (case-insensitive keys)
      on_unmapped = "error"     # error (default) | keep | drop | default
      default = "unknown"       # used when the cell is empty (and for on_unmapped = "default")
      when = "patient_id"       # only set when this column is non-empty

Problems in the mapping file raise :class:`MappingError` with the mapping's path and the element.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import AdapterError

TYPES = ("string", "date", "dateTime", "decimal", "integer", "boolean", "code")
_PATH = re.compile(r"^[a-zA-Z][a-zA-Z0-9]*(\[\d+\])?(\.[a-zA-Z][a-zA-Z0-9]*(\[\d+\])?)*$")
_TEMPLATE_VAR = re.compile(r"\{([^{}]+)\}")
_FIELD_KEYS = {
    "path",
    "column",
    "template",
    "value",
    "reference",
    "type",
    "formats",
    "required",
    "map",
    "on_unmapped",
    "default",
    "when",
    "strip_chars",
}
_RESOURCE_KEYS = {"name", "type", "key", "required", "field", "profile"}


class MappingError(AdapterError):
    """The mapping file is invalid. The message names the file and the offending element."""


@dataclass(frozen=True, slots=True)
class FieldSpec:
    path: str
    column: str | None = None
    template: str | None = None
    value: Any = None
    reference: str | None = None
    type: str = "string"
    formats: tuple[str, ...] = ()
    required: bool = False
    map: dict[str, Any] | None = None
    on_unmapped: str = "error"
    default: Any = None
    when: str | None = None
    strip_chars: str | None = None

    def columns(self) -> list[str]:
        cols = [self.column] if self.column else []
        if self.template:
            cols += _TEMPLATE_VAR.findall(self.template)
        if self.when:
            cols.append(self.when)
        return cols

    @property
    def is_content(self) -> bool:
        """True when the field depends on the row (not a constant or a reference)."""
        return bool(self.column or self.template)


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    name: str
    type: str
    key: str | None
    required: bool
    fields: tuple[FieldSpec, ...]
    profile: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Mapping:
    name: str
    path: str
    encoding: str
    delimiter: str
    record_id: str | None
    routing_key: str | None
    resources: tuple[ResourceSpec, ...]
    description: str = ""
    required_columns: tuple[str, ...] = field(default=())

    def columns(self) -> set[str]:
        out: set[str] = set()
        for r in self.resources:
            for f in r.fields:
                out.update(f.columns())
            if r.key:
                out.update(_TEMPLATE_VAR.findall(r.key))
        for t in (self.record_id, self.routing_key):
            if t:
                out.update(_TEMPLATE_VAR.findall(t))
        return out


def template_columns(template: str) -> list[str]:
    return _TEMPLATE_VAR.findall(template)


def load_mapping(path: str | Path) -> Mapping:
    """Read and check a TOML mapping. Raises :class:`MappingError` (never a traceback) when it is invalid."""
    p = Path(path)
    where = str(p)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise MappingError(f"cannot read mapping file {where}: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MappingError(f"mapping file {where} is not valid TOML: {exc}") from None
    return parse_mapping(doc, where)


def parse_mapping(doc: dict[str, Any], where: str = "<mapping>") -> Mapping:
    """Check a decoded mapping document; see the module doc for the format."""

    def err(msg: str) -> MappingError:
        return MappingError(f"mapping {where}: {msg}")

    unknown = set(doc) - {"name", "description", "input", "record", "resource"}
    if unknown:
        raise err(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    inp = doc.get("input", {})
    if not isinstance(inp, dict) or set(inp) - {"encoding", "delimiter"}:
        raise err("[input] takes only encoding and delimiter")
    encoding = str(inp.get("encoding", "utf-8"))
    try:
        "x".encode(encoding)
    except LookupError:
        raise err(f"[input] encoding {encoding!r} is not a known encoding") from None
    delimiter = str(inp.get("delimiter", ","))
    if len(delimiter) != 1:
        raise err("[input] delimiter must be one character")
    rec = doc.get("record", {})
    if not isinstance(rec, dict) or set(rec) - {"id", "routing_key"}:
        raise err("[record] takes only id and routing_key")
    res_list = doc.get("resource")
    if not isinstance(res_list, list) or not res_list:
        raise err("needs at least one [[resource]]")
    names: set[str] = set()
    resources: list[ResourceSpec] = []
    from fhir.resources.R4B import get_fhir_model_class  # 0.13 s to import: only to check a mapping

    for i, r in enumerate(res_list):
        rw = f"resource[{i}]"
        if not isinstance(r, dict):
            raise err(f"{rw} must be a table")
        bad = set(r) - _RESOURCE_KEYS
        if bad:
            raise err(f"{rw}: unknown key(s) {', '.join(sorted(bad))}")
        rtype = r.get("type")
        if not isinstance(rtype, str):
            raise err(f"{rw}: type is required")
        try:
            get_fhir_model_class(rtype)
        except (KeyError, ValueError):
            raise err(f"{rw}: {rtype!r} is not an R4 resource type") from None
        name = str(r.get("name", rtype.lower()))
        if name in names:
            raise err(f"{rw}: duplicate resource name {name!r}")
        names.add(name)
        fields = []
        for j, f in enumerate(r.get("field", [])):
            fw = f"{rw}.field[{j}]"
            if not isinstance(f, dict):
                raise err(f"{fw} must be a table")
            bad = set(f) - _FIELD_KEYS
            if bad:
                raise err(f"{fw}: unknown key(s) {', '.join(sorted(bad))}")
            path = f.get("path")
            if not isinstance(path, str) or not _PATH.match(path):
                raise err(f"{fw}: path {path!r} is not like name[0].given[1]")
            sources = [k for k in ("column", "template", "value", "reference") if k in f]
            if len(sources) != 1:
                raise err(f"{fw} ({path}): needs exactly one of column, template, value, reference")
            typ = f.get("type", "string")
            if typ not in TYPES:
                raise err(f"{fw} ({path}): type {typ!r} is not one of {', '.join(TYPES)}")
            formats = f.get("formats", [])
            if typ in ("date", "dateTime") and not formats:
                formats = (
                    ["%Y-%m-%d"]
                    if typ == "date"
                    else ["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]
                )
            if not isinstance(formats, list) or not all(isinstance(x, str) for x in formats):
                raise err(f"{fw} ({path}): formats must be a list of strptime formats")
            mp = f.get("map")
            if mp is not None and not isinstance(mp, dict):
                raise err(f"{fw} ({path}): map must be a table")
            onu = f.get("on_unmapped", "error")
            if onu not in ("error", "keep", "drop", "default"):
                raise err(f"{fw} ({path}): on_unmapped must be error, keep, drop or default")
            fields.append(
                FieldSpec(
                    path=path,
                    column=f.get("column"),
                    template=f.get("template"),
                    value=f.get("value"),
                    reference=f.get("reference"),
                    type=typ,
                    formats=tuple(formats),
                    required=bool(f.get("required", False)),
                    map={str(k).strip().lower(): v for k, v in mp.items()} if mp else None,
                    on_unmapped=onu,
                    default=f.get("default"),
                    when=f.get("when"),
                    strip_chars=f.get("strip_chars"),
                )
            )
        prof = r.get("profile", [])
        resources.append(
            ResourceSpec(
                name=name,
                type=rtype,
                key=r.get("key"),
                required=bool(r.get("required", True)),
                fields=tuple(fields),
                profile=tuple(prof) if isinstance(prof, list) else (prof,),
            )
        )
    for r in resources:
        for f in r.fields:
            if f.reference is not None and f.reference not in names:
                raise err(
                    f"resource {r.name!r} field {f.path}: reference to unknown resource {f.reference!r}"
                )
    required_cols = sorted({c for r in resources for f in r.fields if f.required for c in f.columns()})
    return Mapping(
        name=str(doc.get("name", Path(where).stem)),
        path=where,
        encoding=encoding,
        delimiter=delimiter,
        record_id=rec.get("id"),
        routing_key=rec.get("routing_key"),
        resources=tuple(resources),
        description=str(doc.get("description", "")),
        required_columns=tuple(required_cols),
    )
