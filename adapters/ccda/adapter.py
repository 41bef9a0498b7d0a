"""The C-CDA R2.1 adapter: one ClinicalDocument -> one FHIR R4 document-shaped transaction bundle.

See docs/ccda.md for the mapping. Output per document: Patient, the authors (Practitioner/Device),
Organizations, the encompassing Encounter, one resource per converted entry, and a Composition whose
sections keep the original narrative (as XHTML) and reference the resources made from their entries.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from adapters.base import Adapter, Outcome, RejectedRecord, SourceInfo, sha256_hex
from adapters.bundle import BundleBuilder
from adapters.ccda import header
from adapters.ccda.datatypes import (
    Ctx,
    El,
    attachment_from_ed,
    concept,
    first,
    id_key,
    identifier,
    period,
    ts,
)
from adapters.ccda.narrative import plain_div, to_xhtml
from adapters.ccda.sections.dispatch import convert_entry, section_kind
from adapters.ccda.sections.encounters import encounter
from adapters.ccda.xmlsecure import DEFAULT_MAX_BYTES, BadXml, UnsafeXml, parse
from adapters.errors import AdapterError, InternalAdapterError, Location, ValidationFailed

T = "2.16.840.1.113883.10.20.22"
#: document-level templateId root -> short name (the 9 C-CDA R2.1 document types plus a few more).
DOCUMENT_TYPES: dict[str, str] = {
    f"{T}.1.2": "CCD",
    f"{T}.1.4": "Consultation Note",
    f"{T}.1.8": "Discharge Summary",
    f"{T}.1.3": "History and Physical",
    f"{T}.1.7": "Operative Note",
    f"{T}.1.6": "Procedure Note",
    f"{T}.1.9": "Progress Note",
    f"{T}.1.14": "Referral Note",
    f"{T}.1.13": "Transfer Summary",
    f"{T}.1.15": "Care Plan",
    f"{T}.1.5": "Diagnostic Imaging Report",
    f"{T}.1.10": "Unstructured Document",
    f"{T}.1.1": "US Realm Header",
}
#: LOINC document codes used when the templateId is missing (vendor documents).
DOCUMENT_CODES: dict[str, str] = {
    "34133-9": "CCD",
    "11488-4": "Consultation Note",
    "18842-5": "Discharge Summary",
    "34117-2": "History and Physical",
    "11504-8": "Operative Note",
    "28570-0": "Procedure Note",
    "11506-3": "Progress Note",
    "57133-1": "Referral Note",
    "18761-7": "Transfer Summary",
    "52521-2": "Care Plan",
    "18748-4": "Diagnostic Imaging Report",
}
DOC_TYPE_TAG_SYSTEM = "urn:fhirbridge:ccda:document-type"
_FRAGMENT_ROOTS = {
    "section",
    "component",
    "entry",
    "structuredBody",
    "recordTarget",
    "observation",
    "act",
    "organizer",
    "substanceAdministration",
    "procedure",
    "encounter",
    "supply",
}
_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def document_type(root: El) -> str | None:
    """The C-CDA document type name, from templateId (most specific wins) or the LOINC code."""
    found = [
        DOCUMENT_TYPES[t.get("root")] for t in root.findall("templateId") if t.get("root") in DOCUMENT_TYPES
    ]
    specific = [f for f in found if f != "US Realm Header"]
    if specific:
        return specific[0]
    code = root.find("code")
    if code is not None and code.get("code") in DOCUMENT_CODES:
        return DOCUMENT_CODES[code.get("code")]
    return found[0] if found else None


class CcdaAdapter(Adapter):
    """C-CDA R2.1 documents (all 9 document types) to FHIR R4, parsed securely.

    Options: ``max_bytes`` (size limit, default 20 MiB); ``fragments=true`` to also accept bare
    sections/entries (HL7's example fragments), attached to a placeholder Patient.
    """

    name = "ccda"
    version = "0.1.0"
    description = "HL7 C-CDA R2.1 XML documents (CCD, notes, summaries) to FHIR R4 document bundles"
    suffixes = (".xml", ".ccda", ".cda")

    def __init__(self, **options: str) -> None:
        unknown = set(options) - {"max_bytes", "fragments"}
        if unknown:
            raise AdapterError(
                f"adapter 'ccda' has no option(s) {', '.join(sorted(unknown))}; known: max_bytes, fragments"
            )
        try:
            self.max_bytes = int(options.get("max_bytes", DEFAULT_MAX_BYTES))
        except ValueError:
            raise AdapterError(
                f"ccda option max_bytes must be an integer, got {options['max_bytes']!r}"
            ) from None
        if self.max_bytes < 1:
            raise AdapterError("ccda option max_bytes must be positive")
        frag = options.get("fragments", "false").lower()
        if frag not in ("true", "false", "1", "0", "yes", "no"):
            raise AdapterError(f"ccda option fragments must be true or false, got {frag!r}")
        self.fragments = frag in ("true", "1", "yes")

    def convert(self, data: bytes, source: SourceInfo, *, filename: str | None = None) -> Iterator[Outcome]:
        """Yield one outcome for the document. Unsafe or broken XML yields a located RejectedRecord."""
        notes: list[str] = []
        try:
            root = parse(data, max_bytes=self.max_bytes, notes=notes)
        except UnsafeXml as exc:
            yield RejectedRecord(self.error(f"refused: {exc}", Location(file=filename, line=1)), data)
            return
        except BadXml as exc:
            yield RejectedRecord(self.error(str(exc), Location(file=filename, line=exc.line or 1)), data)
            return
        tag = root.tag if isinstance(root.tag, str) else ""
        if tag != "ClinicalDocument":
            if self.fragments and tag:
                yield from self._safe(root, data, source, filename, fragment=True, notes=notes)
                return
            hint = " (a C-CDA fragment; use --option fragments=true)" if tag in _FRAGMENT_ROOTS else ""
            yield RejectedRecord(
                self.error(
                    f"root element is <{tag}>, not <ClinicalDocument>{hint}", Location(file=filename, line=1)
                ),
                data,
            )
            return
        yield from self._safe(root, data, source, filename, fragment=False, notes=notes)

    def _safe(
        self,
        root: El,
        data: bytes,
        source: SourceInfo,
        filename: str | None,
        *,
        fragment: bool,
        notes: list[str],
    ) -> Iterator[Outcome]:
        doc_id = id_key(root) if not fragment else None
        where = Location(file=filename, line=root.sourceline or 1, xpath=f"/{root.tag}")
        try:
            yield self._convert(root, data, source, filename, fragment, notes)
        except ValidationFailed as exc:  # our output is invalid: a bug in this adapter, reported as such
            yield RejectedRecord(
                InternalAdapterError(str(exc), adapter=self.name, location=where), data, doc_id
            )
        except Exception as exc:  # a converter bug on unexpected content: located, never a traceback
            yield RejectedRecord(
                InternalAdapterError(
                    f"cannot convert document: {type(exc).__name__}: {exc}", adapter=self.name, location=where
                ),
                data,
                doc_id,
            )

    # -- the document ---------------------------------------------------------------------------------
    def _convert(
        self,
        root: El,
        data: bytes,
        source: SourceInfo,
        filename: str | None,
        fragment: bool,
        notes: list[str],
    ) -> Any:
        input_sha = sha256_hex(data)
        doc_key = id_key(root) or f"sha256:{input_sha}"
        eff = ts(root.find("effectiveTime"), _TmpCtx(source)) if not fragment else None  # type: ignore[arg-type]
        recorded = eff if eff and _INSTANT.match(eff) else None
        b = BundleBuilder(
            adapter_name=self.name,
            adapter_version=self.version,
            source=source,
            input_sha256=input_sha,
            record_key=doc_key,
            recorded=recorded,
        )
        ctx = Ctx(b, source, root, filename)
        ctx.doc_key = doc_key
        for n in notes:
            b.warn("xml-namespace-error", n)
        if fragment:
            return self._fragment(root, ctx, filename)
        dtype = document_type(root)
        if dtype is None:
            ctx.warn("missing-template-id", "no C-CDA document templateId or known document code", root)
        pr = first(root, "recordTarget/patientRole")
        if pr is None:
            ctx.warn(
                "no-record-target", "document has no recordTarget/patientRole; placeholder Patient used", root
            )
            ctx.patient_ref = b.add({"resourceType": "Patient"}, "doc", doc_key)
        else:
            ctx.patient_ref = header.patient(pr, ctx)
            if len(root.findall("recordTarget")) > 1:
                ctx.warn(
                    "multiple-record-targets", "more than one recordTarget; only the first is converted", root
                )
        # authors, custodian, encompassing encounter
        authors: list[str] = []
        for a in root.findall("author"):
            r = header.practitioner(a.find("assignedAuthor"), ctx)
            if r:
                authors.append(r)
            ro = first(a, "assignedAuthor/representedOrganization")
            header.organization(ro, ctx) if ro is not None else None
        cust = header.organization(
            first(root, "custodian/assignedCustodian/representedCustodianOrganization"), ctx
        )
        ee = first(root, "componentOf/encompassingEncounter")
        if ee is not None:
            ctx.encounter_ref = encounter(ee, ctx, header=True)[0]
        legal = root.find("legalAuthenticator")
        legal_ref = header.practitioner(legal.find("assignedEntity"), ctx) if legal is not None else None
        for perf in root.findall("documentationOf/serviceEvent/performer"):
            header.practitioner(perf.find("assignedEntity"), ctx)
        if not authors:
            authors = [cust] if cust else []
        if not authors:
            ctx.warn(
                "no-author",
                "document names no author or custodian; the source organization is the author",
                root,
            )
            authors = [
                b.add(
                    {"resourceType": "Organization", "name": source.name or source.org_id},
                    "source-org",
                    source.org_id,
                )
            ]
        comp = self._composition(root, ctx, dtype, authors, cust, legal_ref)
        # body
        body = first(root, "component/structuredBody")
        nxb = first(root, "component/nonXMLBody")
        if body is not None:
            comp["section"] = [
                s for s in (self._section(sec, ctx) for sec in body.findall("component/section")) if s
            ]
            if not comp["section"]:
                del comp["section"]
        elif nxb is not None:
            self._non_xml_body(nxb, ctx, comp, authors)
        else:
            ctx.warn("no-body", "document has no body", root)
        b.add(comp, "composition", doc_key)
        pat = b.get(ctx.patient_ref or "") or {}
        mrn = (pat.get("identifier") or [None])[0]
        if isinstance(mrn, dict):
            routing = f"{mrn.get('system')}|{mrn.get('value')}"
        else:
            routing = ctx.patient_ref or doc_key
        return b.build(routing_key=routing, message_id=doc_key, location=Location(file=filename))

    def _composition(
        self,
        root: El,
        ctx: Ctx,
        dtype: str | None,
        authors: list[str],
        cust: str | None,
        legal_ref: str | None,
    ) -> dict[str, Any]:
        comp: dict[str, Any] = {"resourceType": "Composition", "status": "final"}
        doc_ident = identifier(root.find("id"), ctx)
        if doc_ident:
            comp["identifier"] = doc_ident
        ctype = concept(root.find("code"), ctx)
        if ctype is None:
            ctype = {"text": dtype or "Clinical document"}
            ctx.warn("no-document-code", "document has no code", root)
        comp["type"] = ctype
        if dtype:
            comp["meta"] = {
                "tag": [{"system": DOC_TYPE_TAG_SYSTEM, "code": dtype.replace(" ", "-"), "display": dtype}]
            }
        comp["subject"] = {"reference": ctx.patient_ref}
        if ctx.encounter_ref:
            comp["encounter"] = {"reference": ctx.encounter_ref}
        date = ts(root.find("effectiveTime"), ctx)
        if not date:
            ctx.warn("no-document-date", "document has no effectiveTime; 1970-01-01 used", root)
            date = "1970-01-01"
        comp["date"] = date
        comp["author"] = [{"reference": r} for r in dict.fromkeys(authors)]
        title = root.find("title")
        t = " ".join("".join(title.itertext()).split()) if title is not None else ""
        comp["title"] = (
            t
            or ctype.get("text")
            or next((c.get("display") for c in ctype.get("coding", []) if c.get("display")), None)
            or dtype
            or "Clinical document"
        )
        conf = root.find("confidentialityCode")
        if conf is not None and conf.get("code") in ("U", "L", "M", "N", "R", "V"):
            comp["confidentiality"] = conf.get("code")
        if cust:
            comp["custodian"] = {"reference": cust}
        if legal_ref:
            att: dict[str, Any] = {"mode": "legal", "party": {"reference": legal_ref}}
            lt = ts(first(root, "legalAuthenticator/time"), ctx)
            if lt:
                att["time"] = lt
            comp["attester"] = [att]
        rel = []
        for rd in root.findall("relatedDocument"):
            code = {"RPLC": "replaces", "APND": "appends", "XFRM": "transforms"}.get(rd.get("typeCode") or "")
            pid = identifier(first(rd, "parentDocument/id"), ctx)
            if code and pid:
                rel.append({"code": code, "targetIdentifier": pid})
        if rel:
            comp["relatesTo"] = rel
        events = []
        for se in root.findall("documentationOf/serviceEvent"):
            ev: dict[str, Any] = {}
            c = concept(se.find("code"), ctx)
            if c:
                ev["code"] = [c]
            p = period(se.find("effectiveTime"), ctx)
            if p:
                ev["period"] = p
            if ev:
                events.append(ev)
        if events:
            comp["event"] = events
        return comp

    def _section(self, sec: El, ctx: Ctx) -> dict[str, Any] | None:
        kind = section_kind(sec)
        out: dict[str, Any] = {}
        title = sec.find("title")
        t = " ".join("".join(title.itertext()).split()) if title is not None else ""
        if t:
            out["title"] = t
        code = concept(sec.find("code"), ctx)
        if code:
            out["code"] = code
        if not sec.findall("templateId") and sec.find("code") is not None:
            ctx.warn("missing-template-id", f"section {t or '?'} has no templateId; recognised by code", sec)
        div = to_xhtml(sec.find("text"))
        if div:
            out["text"] = {"status": "generated", "div": div}
        refs: list[str] = []
        for entry in sec.findall("entry"):
            for stmt in entry:
                if not isinstance(stmt.tag, str) or stmt.tag in ("templateId",):
                    continue
                refs.extend(convert_entry(stmt, ctx, kind))
        if refs:
            out["entry"] = [{"reference": r} for r in dict.fromkeys(refs)]
        subs = [s for s in (self._section(c, ctx) for c in sec.findall("component/section")) if s]
        if subs:
            out["section"] = subs
        if not refs and not subs:
            if sec.get("nullFlavor") or not div:
                out["emptyReason"] = {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
                            "code": "unavailable" if sec.get("nullFlavor") else "notasked",
                        }
                    ]
                }
            if not div:
                out["text"] = {"status": "generated", "div": plain_div(t or "Empty section")}
        return out or None

    def _non_xml_body(self, nxb: El, ctx: Ctx, comp: dict[str, Any], authors: list[str]) -> None:
        text = nxb.find("text")
        att = attachment_from_ed(text, ctx) if text is not None else None
        if att is None:
            ctx.warn("empty-non-xml-body", "nonXMLBody has no usable content", nxb)
            return
        dr: dict[str, Any] = {
            "resourceType": "DocumentReference",
            "status": "current",
            "type": comp["type"],
            "subject": {"reference": ctx.patient_ref},
            "date": comp["date"] if "T" in comp["date"] else None,
            "author": [{"reference": r} for r in authors],
            "content": [{"attachment": {**att, "title": comp.get("title")}}],
        }
        if "identifier" in comp:
            dr["masterIdentifier"] = comp["identifier"]
        dr = {k: v for k, v in dr.items() if v is not None}
        ref = ctx.b.add(dr, "nonxml", ctx.doc_key)
        comp["section"] = [
            {
                "title": comp.get("title", "Document"),
                "entry": [{"reference": ref}],
                "text": {
                    "status": "generated",
                    "div": plain_div("Unstructured document: see the referenced DocumentReference"),
                },
            }
        ]

    def _fragment(self, root: El, ctx: Ctx, filename: str | None) -> Any:
        b = ctx.b
        ctx.warn(
            "fragment", f"converted a <{root.tag}> fragment without a document header; placeholder Patient"
        )
        rt = root if root.tag == "recordTarget" else root.find(".//recordTarget")
        pr = rt.find("patientRole") if rt is not None else None
        ctx.patient_ref = (
            header.patient(pr, ctx)
            if pr is not None
            else b.add({"resourceType": "Patient"}, "fragment", ctx.doc_key)
        )
        secs = [root] if root.tag == "section" else list(root.iter("section"))
        for sec in secs:
            self._section(sec, ctx)
        if not secs and root.tag not in ("recordTarget",):
            stmts = (
                [root]
                if root.tag != "entry" and root.tag != "component"
                else [c for c in root if isinstance(c.tag, str)]
            )
            for s in stmts:
                convert_entry(s, ctx, None)
        return b.build(
            routing_key=ctx.patient_ref or ctx.doc_key, message_id=None, location=Location(file=filename)
        )


class _TmpCtx:
    """Just enough of a Ctx for :func:`ts` before the builder exists (no warnings recorded)."""

    def __init__(self, source: SourceInfo) -> None:
        self.source = source

    def warn(self, *args: object, **kwargs: object) -> None:
        return None
