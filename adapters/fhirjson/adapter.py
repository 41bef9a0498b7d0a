"""FHIR R4 JSON passthrough: validate with R4B and re-emit as a fhirbridge transaction bundle.

Input forms (detected from the bytes, UTF-8 with or without BOM):

* one JSON resource -> one bundle;
* a JSON ``Bundle`` (any type) -> one bundle holding every entry's resource; an entry that fails
  validation becomes its own :class:`RejectedRecord` (location ``Bundle.entry[i]``), the others convert;
* Bulk Data NDJSON (one resource per line) -> one bundle per line; a bad line is rejected with its
  line number and does not stop the file.

Every resource gets a deterministic id derived from its type and source id, and its source id is kept
as an identifier under ``urn:fhirbridge:<org>:fhir-id:<Type>``. Relative and ``urn:uuid`` references are
rewritten to the new ids, so references across NDJSON lines and files stay consistent.

STU3 input is detected and refused (see :func:`detect_stu3`); converting it is out of scope.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from adapters.base import Adapter, ConvertedBundle, Outcome, RejectedRecord, SourceInfo, sha256_hex
from adapters.bundle import BundleBuilder
from adapters.common.guard import guarded
from adapters.errors import InternalAdapterError, Location, ValidationFailed

#: Resource types that exist in STU3 but not in R4.
STU3_ONLY_TYPES = frozenset(
    {
        "BodySite",
        "DataElement",
        "DeviceComponent",
        "EligibilityRequest",
        "EligibilityResponse",
        "ExpansionProfile",
        "ImagingManifest",
        "ProcedureRequest",
        "ProcessRequest",
        "ProcessResponse",
        "ReferralRequest",
        "Sequence",
        "ServiceDefinition",
    }
)
_LEGACY_TERMINOLOGY = ("http://hl7.org/fhir/v2/", "http://hl7.org/fhir/v3/")
_RELATIVE_REF = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(/_history/[A-Za-z0-9\-.]{1,64})?$")
_CONDITIONAL_IDENTIFIER = re.compile(r"^([A-Z][A-Za-z]+)\?identifier=(?:([^|&]*)\|)?([^&]+)$")
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_SERVER_META = ("versionId", "lastUpdated")


def _is_instant(value: Any) -> bool:
    """A FHIR instant that really is a time (the pattern alone passes ``2020-13-45T99:99:99Z``)."""
    if not isinstance(value, str) or not _INSTANT.match(value):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _r4b_class(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class  # 0.13 s to import: on the first resource

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None


def _stu3_class(resource_type: str) -> Any:
    from fhir.resources.STU3 import get_fhir_model_class  # 0.12 s: only for input that may be STU3

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None


def _walk_strings(obj: Any, key: str) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _walk_strings(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_strings(v, key)


def detect_stu3(resource: dict[str, Any], *, r4_valid: bool | None = None) -> str | None:
    """Why ``resource`` looks like FHIR STU3 (or earlier), or ``None`` when it does not.

    Strong signs (always decisive): an STU3-only resource type, ``fhirVersion`` 0.x-3.x, a profile
    under ``/STU3/`` or ``/DSTU2/``. Weak signs, used only when the resource is not valid R4
    (``r4_valid`` is False): pre-R4 terminology URIs (``http://hl7.org/fhir/v2/...``) or the resource
    validating against the STU3 models. Never raises.
    """
    rtype = resource.get("resourceType")
    if rtype in STU3_ONLY_TYPES:
        return f"resource type {rtype} exists only in STU3"
    fv = resource.get("fhirVersion")
    if isinstance(fv, str) and re.match(r"^[0-3]\.", fv):
        return f"fhirVersion is {fv}"
    profiles = (resource.get("meta") or {}).get("profile") if isinstance(resource.get("meta"), dict) else None
    for p in profiles or ():
        if isinstance(p, str) and ("/STU3/" in p or "/DSTU2/" in p):
            return f"meta.profile {p} is an STU3 profile"
    if r4_valid is False:
        for system in _walk_strings(resource, "system"):
            if system.startswith(_LEGACY_TERMINOLOGY):
                return f"it uses the pre-R4 code system URI {system}"
        cls = _stu3_class(rtype) if isinstance(rtype, str) else None
        if cls is not None:
            try:
                cls.model_validate(resource)
            except (ValidationError, ValueError, TypeError):
                return None
            return f"it is not valid R4 but is valid STU3 {rtype}"
    return None


def _fmt_validation(exc: ValidationError, prefix: str) -> str:
    errs = exc.errors()
    first: dict[str, Any] = dict(errs[0]) if errs else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"not valid FHIR R4: {prefix}{'.' + loc if loc else ''}: {first.get('msg', exc)}{more}"


class _Item:
    __slots__ = ("full_url", "index", "location", "raw", "resource")

    def __init__(
        self, resource: Any, location: Location, raw: bytes, full_url: str | None, index: int
    ) -> None:
        self.resource = resource
        self.location = location
        self.raw = raw
        self.full_url = full_url
        self.index = index


class FhirPassthroughAdapter(Adapter):
    """R4 JSON resources, Bundles and NDJSON, validated with R4B and normalised (see module doc)."""

    name = "fhir"
    version = "0.1.0"
    description = "FHIR R4 JSON resources, Bundles and Bulk Data NDJSON (validated, ids kept as identifiers)"
    suffixes = (".json", ".ndjson")

    # -- entry point ----------------------------------------------------------------------------
    def convert(self, data: bytes, source: SourceInfo, *, filename: str | None = None) -> Iterator[Outcome]:
        """Yield one outcome per record (a resource, a Bundle, or an NDJSON line). Never raises for bad input."""
        yield from guarded(
            self.name, self._convert(data, source, filename), Location(file=filename, line=1), data
        )

    def _convert(self, data: bytes, source: SourceInfo, filename: str | None) -> Iterator[Outcome]:
        input_sha = sha256_hex(data)
        floc = Location(file=filename, line=1)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            yield RejectedRecord(
                self.error(
                    f"input is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}",
                    Location(file=filename, line=line),
                ),
                data,
            )
            return
        if not text.strip():
            yield RejectedRecord(self.error("input is empty", floc), data)
            return
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if text.strip().count("\n") >= 1:
                yield from self._ndjson(text, source, input_sha, filename)
                return
            yield RejectedRecord(
                self.error(f"not JSON: {exc}", Location(file=filename, line=getattr(exc, "lineno", 1) or 1)),
                data,
            )
            return
        if not isinstance(doc, dict):
            yield RejectedRecord(
                self.error("top-level JSON value must be a FHIR resource object", floc), data
            )
            return
        if doc.get("resourceType") == "Bundle":
            yield from self._bundle(doc, data, source, input_sha, filename)
        else:
            item = _Item(
                doc, Location(file=filename, line=1, xpath=str(doc.get("resourceType") or "$")), data, None, 0
            )
            yield from self._record([item], source, input_sha, "0", filename, None, data)

    # -- input forms ----------------------------------------------------------------------------
    def _ndjson(
        self, text: str, source: SourceInfo, input_sha: str, filename: str | None
    ) -> Iterator[Outcome]:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            raw = line.encode("utf-8")
            loc = Location(file=filename, line=lineno, xpath=None)
            try:
                res = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield RejectedRecord(
                    self.error(f"NDJSON line is not JSON: {exc}", loc), raw, f"line {lineno}"
                )
                continue
            if not isinstance(res, dict):
                yield RejectedRecord(
                    self.error("NDJSON line is not a JSON object", loc), raw, f"line {lineno}"
                )
                continue
            item = _Item(res, loc, raw, None, 0)
            yield from self._record([item], source, input_sha, f"line:{lineno}", filename, None, raw)

    def _bundle(
        self, doc: dict[str, Any], data: bytes, source: SourceInfo, input_sha: str, filename: str | None
    ) -> Iterator[Outcome]:
        floc = Location(file=filename, line=1, xpath="Bundle")
        reason = detect_stu3(doc)
        if reason is None:
            for e in doc.get("entry") or ():
                res = e.get("resource") if isinstance(e, dict) else None
                if isinstance(res, dict) and (reason := detect_stu3(res)) is not None:
                    break
        if reason is not None:
            yield RejectedRecord(self.error(_stu3_message(reason), floc), data, doc.get("id"))
            return
        entries = doc.get("entry")
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            yield RejectedRecord(self.error("Bundle.entry must be an array", floc), data, doc.get("id"))
            return
        items: list[_Item] = []
        rejected: list[RejectedRecord] = []
        for i, e in enumerate(entries):
            loc = Location(file=filename, line=1, xpath=f"Bundle.entry[{i}]")
            raw = orjson.dumps(e)
            request = e.get("request") if isinstance(e, dict) else None
            if request is not None and not isinstance(request, dict):
                rejected.append(
                    RejectedRecord(self.error("Bundle.entry.request must be an object", loc), raw)
                )
                continue
            if not isinstance(e, dict) or not isinstance(e.get("resource"), dict):
                method = (e.get("request") or {}).get("method") if isinstance(e, dict) else None
                why = f"a {method} request" if method else "no resource"
                rejected.append(
                    RejectedRecord(self.error(f"bundle entry has {why}; only resources pass", loc), raw)
                )
                continue
            method = (e.get("request") or {}).get("method")
            if method in ("DELETE", "PATCH"):
                rejected.append(
                    RejectedRecord(
                        self.error(f"bundle entry is a {method} request; only resources pass", loc), raw
                    )
                )
                continue
            full_url = e.get("fullUrl") if isinstance(e.get("fullUrl"), str) else None
            items.append(_Item(e["resource"], loc, raw, full_url, i))
        yield from rejected
        if not items:
            if not rejected:
                yield RejectedRecord(self.error("Bundle has no entries", floc), data, doc.get("id"))
            return
        recorded = doc.get("timestamp") if isinstance(doc.get("timestamp"), str) else None
        bundle_id = doc.get("id") if isinstance(doc.get("id"), str) else None
        yield from self._record(items, source, input_sha, "bundle", filename, recorded, data, bundle_id)

    # -- one record -----------------------------------------------------------------------------
    def _record(
        self,
        items: list[_Item],
        source: SourceInfo,
        input_sha: str,
        record_key: str,
        filename: str | None,
        recorded: str | None,
        raw: bytes,
        message_id: str | None = None,
    ) -> Iterator[Outcome]:
        good: list[_Item] = []
        for it in items:
            res = it.resource
            rtype = res.get("resourceType")
            if not isinstance(rtype, str):
                yield RejectedRecord(self.error("resource has no resourceType", it.location), it.raw)
                continue
            strong = detect_stu3(res)
            if strong:
                yield RejectedRecord(self.error(_stu3_message(strong), it.location), it.raw, _mid(res))
                continue
            cls = _r4b_class(rtype)
            if cls is None:
                yield RejectedRecord(
                    self.error(f"unknown R4 resource type {rtype!r}", it.location), it.raw, _mid(res)
                )
                continue
            try:
                cls.model_validate(res)
            except (ValidationError, ValueError, TypeError) as exc:
                weak = detect_stu3(res, r4_valid=False)
                if weak:
                    msg = _stu3_message(weak)
                elif isinstance(exc, ValidationError):
                    msg = _fmt_validation(exc, rtype)
                    it.location = _deeper(it.location, exc, rtype)
                else:
                    msg = f"not valid FHIR R4: {rtype}: {exc}"
                yield RejectedRecord(self.error(msg, it.location), it.raw, _mid(res))
                continue
            good.append(it)
        if not good:
            return
        if not _is_instant(recorded):
            lu = (good[0].resource.get("meta") or {}).get("lastUpdated") if len(good) == 1 else None
            recorded = lu if _is_instant(lu) else None
        b = BundleBuilder(
            adapter_name=self.name,
            adapter_version=self.version,
            source=source,
            input_sha256=input_sha,
            record_key=record_key,
            recorded=recorded,
        )
        # New ids first, so that references between items can be rewritten.
        id_map: dict[str, str] = {}
        new_ids: list[str] = []
        for it in good:
            res = it.resource
            rtype = res["resourceType"]
            src_id = res.get("id")
            if isinstance(src_id, str) and src_id:
                nid = b.id_for(rtype, "fhir", src_id)
                id_map[f"{rtype}/{src_id}"] = f"{rtype}/{nid}"
            else:
                basis = (
                    it.full_url or hashlib.sha256(orjson.dumps(res, option=orjson.OPT_SORT_KEYS)).hexdigest()
                )
                nid = b.id_for(rtype, "fhir-anon", basis)
            if it.full_url:
                id_map[it.full_url] = f"{rtype}/{nid}"
            new_ids.append(nid)
        local = set(id_map.values()) | {
            f"{it.resource['resourceType']}/{nid}" for it, nid in zip(good, new_ids, strict=True)
        }
        routing: str | None = None
        duplicates: list[RejectedRecord] = []
        added: dict[str, dict[str, Any]] = {}
        for it, nid in zip(good, new_ids, strict=True):
            res = orjson.loads(orjson.dumps(it.resource))  # deep copy
            rtype = res["resourceType"]
            src_id = res.get("id") if isinstance(res.get("id"), str) else None
            self._rewrite_refs(res, id_map, local, b, it.location)
            res["id"] = nid
            meta = res.get("meta")
            if isinstance(meta, dict):
                for k in _SERVER_META:
                    meta.pop(k, None)
                old_src = meta.pop("source", None)
                if old_src:
                    b.warn(
                        "meta-source-replaced",
                        f"{rtype} meta.source {old_src!r} replaced by ours",
                        it.location,
                    )
                if not meta:
                    res.pop("meta")
            if src_id:
                self._keep_source_id(res, rtype, src_id, source, b, it.location)
            if any(system.startswith(_LEGACY_TERMINOLOGY) for system in _walk_strings(res, "system")):
                b.warn(
                    "pre-r4-terminology",
                    f"{rtype} uses a pre-R4 code system URI (hl7.org/fhir/v2 or v3)",
                    it.location,
                )
            ref = f"{rtype}/{nid}"
            if b.has(ref):
                if added.get(ref) == it.resource:  # the same source resource converts the same way
                    b.warn(
                        "duplicate-resource",
                        f"{rtype}/{src_id} appears twice, identical; kept once",
                        it.location,
                    )
                    continue
                # nothing is dropped unseen: the first stays, this one is rejected with its raw entry
                duplicates.append(
                    RejectedRecord(
                        self.error(
                            f"{rtype}/{src_id} appears again with different content; the first one is kept",
                            it.location,
                        ),
                        it.raw,
                    )
                )
                continue
            added[ref] = it.resource
            b.add(res)
            if routing is None:
                routing = _patient_key(it.resource, source)
        if routing is None:
            first = good[0].resource
            routing = f"{first['resourceType']}/{first.get('id') or new_ids[0]}"
        loc = (
            Location(file=filename, line=good[0].location.line)
            if len(items) == 1
            else Location(file=filename)
        )
        if message_id is None and len(good) == 1:
            message_id = _mid(good[0].resource)
        yield from duplicates
        try:
            yield b.build(routing_key=routing, message_id=message_id, location=loc)
        except ValidationFailed as exc:  # we validated each resource first: this is our bug
            yield RejectedRecord(
                InternalAdapterError(str(exc), adapter=self.name, location=Location(file=filename, line=1)),
                raw,
                message_id,
            )

    def _rewrite_refs(
        self, obj: Any, id_map: dict[str, str], local: set[str], b: BundleBuilder, loc: Location
    ) -> None:
        """Point references at the new ids. A reference to a resource outside this record becomes a
        logical reference (``type`` + ``identifier`` under the source's fhir-id system), so that every
        literal reference resolves inside the bundle."""
        if isinstance(obj, dict):
            ref = obj.get("reference")
            if isinstance(ref, str) and not ref.startswith("#"):
                self._rewrite_one(obj, ref, id_map, local, b, loc)
            for k, v in obj.items():
                if k != "reference":
                    self._rewrite_refs(v, id_map, local, b, loc)
        elif isinstance(obj, list):
            for v in obj:
                self._rewrite_refs(v, id_map, local, b, loc)

    def _rewrite_one(
        self,
        obj: dict[str, Any],
        ref: str,
        id_map: dict[str, str],
        local: set[str],
        b: BundleBuilder,
        loc: Location,
    ) -> None:
        new = id_map.get(ref)
        if new is not None:
            obj["reference"] = new
            return
        m = _RELATIVE_REF.match(ref)
        if m and _r4b_class(m.group(1)) is not None:
            rtype, rid = m.group(1), m.group(2)
            new = f"{rtype}/{b.id_for(rtype, 'fhir', rid)}"
            if new in local:
                obj["reference"] = new
                return
            del obj["reference"]
            obj.setdefault("type", rtype)
            obj.setdefault("identifier", {"system": b.source.system_for(rtype, kind="fhir-id"), "value": rid})
            return
        c = _CONDITIONAL_IDENTIFIER.match(ref)
        if c and _r4b_class(c.group(1)) is not None:
            del obj["reference"]
            obj.setdefault("type", c.group(1))
            ident = {"value": c.group(3)}
            if c.group(2):
                ident = {"system": c.group(2), "value": c.group(3)}
            obj.setdefault("identifier", ident)
            return
        if "://" in ref and not ref.startswith("urn:"):
            return  # an absolute reference to another server stays as it is
        del obj["reference"]
        obj.setdefault("display", ref)
        b.warn(
            "unresolved-reference", f"reference {ref} does not resolve inside the input; kept as display", loc
        )

    def _keep_source_id(
        self,
        res: dict[str, Any],
        rtype: str,
        src_id: str,
        source: SourceInfo,
        b: BundleBuilder,
        loc: Location,
    ) -> None:
        ident = {"system": source.system_for(rtype, kind="fhir-id"), "value": src_id}
        cls = _r4b_class(rtype)
        field = getattr(cls, "model_fields", {}).get("identifier") if cls is not None else None
        if field is None:
            b.warn(
                "source-id-not-kept", f"{rtype} has no identifier element; source id {src_id!r} not kept", loc
            )
            return
        if "List" in str(field.annotation):
            lst = res.setdefault("identifier", [])
            if ident not in lst:
                lst.append(ident)
        elif "identifier" not in res:
            res["identifier"] = ident
        else:
            b.warn(
                "source-id-not-kept",
                f"{rtype}.identifier is single and taken; source id {src_id!r} not kept",
                loc,
            )


def _deeper(loc: Location, exc: ValidationError, rtype: str) -> Location:
    """``loc`` with its xpath extended to the first failing element (``Bundle.entry[3].resource.status``)."""
    errs = exc.errors()
    if not errs:
        return loc
    path = ".".join(str(p) for p in errs[0].get("loc", ()) if p != "__root__")
    base = (
        f"{loc.xpath}.resource"
        if loc.xpath and loc.xpath.startswith("Bundle.entry")
        else (loc.xpath or rtype)
    )
    return Location(file=loc.file, line=loc.line, xpath=f"{base}.{path}" if path else base)


def _stu3_message(reason: str) -> str:
    return (
        f"input is FHIR STU3, not R4 ({reason}); the fhir adapter accepts only R4. "
        "Convert it to R4 first (e.g. with the FHIR Converter's STU3-to-R4 templates)"
    )


def _mid(res: dict[str, Any]) -> str | None:
    rid = res.get("id")
    return f"{res.get('resourceType')}/{rid}" if isinstance(rid, str) else None


_PATIENT_FIELDS = ("subject", "patient", "beneficiary")


def _patient_key(res: dict[str, Any], source: SourceInfo) -> str | None:
    """The routing key: the source Patient id as an identifier token, if the resource names one."""
    system = source.system_for("Patient", kind="fhir-id")
    if res.get("resourceType") == "Patient" and isinstance(res.get("id"), str):
        return f"{system}|{res['id']}"
    for f in _PATIENT_FIELDS:
        ref = res.get(f)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            m = _RELATIVE_REF.match(ref["reference"])
            if m and m.group(1) == "Patient":
                return f"{system}|{m.group(2)}"
    return None


__all__ = ["STU3_ONLY_TYPES", "ConvertedBundle", "FhirPassthroughAdapter", "detect_stu3"]
