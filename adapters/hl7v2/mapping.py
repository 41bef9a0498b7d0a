"""HL7 v2 message -> FHIR R4 resources.

One :class:`Conversion` per message. It walks the segments once, in order, keeping the group state
the v2 grammar implies (the current ORC/OBR order, the current RXA, the current TXA document), and
adds resources to a :class:`~adapters.bundle.BundleBuilder` under documented business keys (see
docs/adapters.md, "Deterministic ids"). Segments nobody maps produce one ``unmapped-segment`` warning
per segment name; Z-segments go to :meth:`HL7v2Adapter.map_z_segment` first.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from adapters.bundle import BundleBuilder
from adapters.common.dates import BadTimestamp, parse_ts
from adapters.common.encounter_class import encounter_class
from adapters.common.race import CDC_RACE_ETHNICITY, ethnicity_extension, race_extension
from adapters.hl7v2 import datatypes as dt
from adapters.hl7v2.er7 import Field, Message, Segment

if TYPE_CHECKING:
    from adapters.hl7v2.adapter import HL7v2Adapter

V3_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
V3_MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
V2 = "http://terminology.hl7.org/CodeSystem/v2-"

GENDER = {
    "M": "male",
    "F": "female",
    "O": "other",
    "A": "other",
    "U": "unknown",
    "N": "unknown",
    "X": "other",
}
#: PV1-2 patient class (table 0004) -> v3 ActEncounterCode
ENCOUNTER_CLASS = {"E": "EMER", "I": "IMP", "O": "AMB", "P": "PRENC", "R": "AMB", "B": "IMP", "C": "AMB"}
#: Encounter.status implied by the trigger event (None: decide from PV1-45).
ENCOUNTER_STATUS = {
    "A01": "in-progress",
    "A02": "in-progress",
    "A03": "finished",
    "A04": "arrived",
    "A05": "planned",
    "A06": "in-progress",
    "A07": "in-progress",
    "A11": "cancelled",
    "A12": "in-progress",
    "A13": "in-progress",
    "A14": "planned",
    "A27": "cancelled",
    "A38": "cancelled",
    "A16": "in-progress",
    "A15": "in-progress",
    "A10": "in-progress",
    "A09": "in-progress",
    "A25": "in-progress",
    "A26": "in-progress",
}
MARITAL = {
    "A": "L",
    "D": "D",
    "M": "M",
    "S": "S",
    "W": "W",
    "C": "C",
    "G": "T",
    "P": "T",
    "R": "T",
    "E": "L",
    "N": "A",
    "I": "I",
    "B": "U",
    "U": "UNK",
    "O": "OTH",
    "T": "UNK",
    "L": "L",
}
#: OBX-11 (table 0085) -> Observation.status: the HL7 v2-to-FHIR IG's ConceptMap
#: table-hl70085-to-observation-status, every code it maps.
OBS_STATUS = {
    "A": "amended",
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "P": "preliminary",
    "X": "cancelled",
    "W": "entered-in-error",
}
#: The codes that ConceptMap leaves unmatched: what we say instead. ``registered`` claims that no
#: result exists yet, so I and O take it only without an OBX-5 value (:data:`OBS_STATUS_WITH_VALUE`).
OBS_STATUS_UNMATCHED = {
    "B": "final",  # appended: final results, reviewed, information added
    "U": "final",  # status changed to final without retransmission
    "V": "final",  # verified: final results reviewed and confirmed
    "R": "preliminary",  # entered, not verified
    "S": "preliminary",  # partial results
    "N": "cancelled",  # not asked: nothing was sought
    "I": "registered",  # specimen in lab, results pending
    "O": "registered",  # order detail only, no result
}
#: I and O when OBX-5 does carry a value: a pending result that already has one is preliminary; a
#: value given with the order (an ask-at-order-entry answer) is complete as given.
OBS_STATUS_WITH_VALUE = {"I": "preliminary", "O": "final"}
DR_STATUS = {
    "F": "final",
    "P": "preliminary",
    "C": "corrected",
    "A": "partial",
    "X": "cancelled",
    "R": "partial",
    "S": "partial",
    "I": "registered",
    "O": "registered",
    "Y": "final",
    "Z": "final",
    "M": "final",
    "D": "final",
}
ORDER_STATUS = {
    "NW": "active",
    "CA": "revoked",
    "DC": "revoked",
    "OC": "revoked",
    "HD": "on-hold",
    "RL": "active",
    "XO": "active",
    "SC": "active",
    "RP": "active",
    "CM": "completed",
    "IP": "active",
    "A": "active",
    "CM ": "completed",
    "ER": "entered-in-error",
}
ALLERGY_CATEGORY = {
    "DA": "medication",
    "FA": "food",
    "EA": "environment",
    "MA": "medication",
    "AA": "biologic",
    "PA": "environment",
    "LA": "environment",
    "MC": "medication",
}
ALLERGY_SEVERITY = {
    "SV": ("high", "severe"),
    "MO": ("low", "moderate"),
    "MI": ("low", "mild"),
    "U": ("unable-to-assess", None),
}
APPOINTMENT_STATUS = {
    "S12": "booked",
    "S13": "booked",
    "S14": "booked",
    "S15": "cancelled",
    "S16": "cancelled",
    "S17": "cancelled",
    "S26": "noshow",
    "S18": "booked",
    "S19": "booked",
    "S20": "cancelled",
    "S21": "cancelled",
    "S22": "cancelled",
    "S23": "booked",
    "S24": "booked",
    "S25": "booked",
}
SCH_STATUS = {
    "BOOKED": "booked",
    "CANCELLED": "cancelled",
    "COMPLETE": "fulfilled",
    "DC": "cancelled",
    "DELETED": "entered-in-error",
    "NOSHOW": "noshow",
    "OVERBOOK": "booked",
    "PENDING": "pending",
    "STARTED": "arrived",
    "WAITLIST": "waitlist",
    "BLOCKED": "booked",
}
TXA_STATUS = {
    "AU": "final",
    "DI": "preliminary",
    "DO": "preliminary",
    "IP": "preliminary",
    "IN": "preliminary",
    "PA": "preliminary",
    "LA": "final",
    "AV": "final",
    "UN": "preliminary",
    "CA": "entered-in-error",
    "OB": "amended",
    "OS": "amended",
}
RXA_STATUS = {"CP": "completed", "RE": "not-done", "NA": "not-done", "PA": "completed", "": "completed"}

_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*[-–]\s*([+-]?\d+(?:\.\d+)?)\s*$")
_BOUND = re.compile(r"^\s*([<>]=?)\s*([+-]?\d+(?:\.\d+)?)\s*$")


def unique_identifiers(idents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Identifiers with one entry per (system, value), in first-seen order.

    The same identifier often comes twice (the SSN in PID-3 and again in PID-19); the first entry is
    kept and takes any element (type, period, assigner) that only a later copy has.
    """
    out: dict[tuple[object, object], dict[str, Any]] = {}
    for ident in idents:
        key = (ident.get("system"), ident.get("value"))
        first = out.get(key)
        if first is None:
            out[key] = ident
        else:
            for k, v in ident.items():
                first.setdefault(k, v)
    return list(out.values())


class Conversion:
    """The state of converting one message. Subclass hooks receive it; see ``docs/adapters.md``."""

    def __init__(self, adapter: HL7v2Adapter, msg: Message, builder: BundleBuilder, ctx: dt.Context) -> None:
        self.adapter = adapter
        self.msg = msg
        self.b = builder
        self.ctx = ctx
        self.source = builder.source
        msh = msg.msh
        self.msg_type, self.trigger, self.structure = msg.message_type
        if not self.trigger and "_" in self.msg_type:
            self.msg_type, self.trigger = self.msg_type.split("_", 1)[:2]
        self.control_id = msg.control_id
        self.msg_key = f"{msh.v(3)}|{msh.v(4)}|{self.control_id}" if self.control_id else None
        self.patient_ref: str | None = None
        self.patient_key: str | None = None
        self.routing_key: str | None = None
        self.encounter_ref: str | None = None
        self.unmapped: dict[str, list[Segment]] = {}
        # group state
        self.orc: Segment | None = None
        self.order_ref: str | None = None
        self.report: dict[str, Any] | None = None
        self.report_obs: list[str] = []
        self.report_specimens: list[str] = []
        self.rxa_ref: str | None = None
        self.txa: dict[str, Any] | None = None
        self.txa_text: list[str] = []
        self.note_target: dict[str, Any] | None = None
        self.med_request: dict[str, Any] | None = None
        self.appointment: dict[str, Any] | None = None
        self.coverage_count = 0
        self.obx_count = 0
        self.obr_count = 0
        self._group_keys: dict[int, tuple[object, ...] | None] = {}
        self._obs_keys: set[tuple[object, ...]] = set()
        self._xcn_memo: dict[str, str] = {}
        self._xon_memo: dict[str, str] = {}
        self.pv1_index: int | None = None

    # ---------------------------------------------------------------------------------- helpers
    def loc(
        self, seg: Segment, field: int | None = None, rep: int | None = None, comp: int | None = None
    ) -> dt.LazyLoc:
        return self.ctx.loc(seg, field, rep, comp)

    def warn(self, code: str, message: str, loc: dt.Loc) -> None:
        self.ctx.warn(code, message, loc)

    def record_key(self, *parts: object) -> tuple[object, ...]:
        """A key scoped to this message (used when the data carry no business identifier)."""
        return ("message", self.b.input_sha256, self.msg.index, *parts)

    def subject(self, r: dict[str, Any], field: str = "subject") -> bool:
        if self.patient_ref:
            r[field] = {"reference": self.patient_ref}
            return True
        return False

    def encounter(self, r: dict[str, Any], field: str = "encounter") -> None:
        if self.encounter_ref:
            r[field] = {"reference": self.encounter_ref}

    def code(self, seg: Segment, n: int, rep: int = 1) -> dict[str, Any] | None:
        return dt.codeable(self.ctx, seg.f(n, rep), self.loc(seg, n, rep))

    def table_code(self, seg: Segment, n: int, table: str) -> dict[str, Any] | None:
        """A coded field whose codes come from HL7 table ``table`` (system defaulted when absent)."""
        f = seg.f(n)
        if not f:
            return None
        cc = dt.codeable(self.ctx, f, self.loc(seg, n))
        if cc and "coding" in cc:
            for c in cc["coding"]:
                c.setdefault("system", f"{V2}{table}")
        return cc

    def dtm(self, seg: Segment, n: int, comp: int = 1) -> str | None:
        return dt.fhir_datetime(self.ctx, seg.v(n, comp), self.loc(seg, n, None, comp if comp > 1 else None))

    def add_note(self, target: dict[str, Any] | None, text: str) -> None:
        if target is not None and text:
            target.setdefault("note", []).append({"text": text})

    # -------------------------------------------------------------------------- reference makers
    def practitioners(self, seg: Segment, n: int) -> list[str]:
        """References to the Practitioners of every repetition of XCN field ``n``."""
        return [ref for i in range(1, len(seg.reps(n)) + 1) if (ref := self.practitioner(seg, n, i))]

    def practitioner(self, seg: Segment, n: int, rep: int = 1) -> str | None:
        """XCN -> Practitioner (key: authority system + id, else the name)."""
        f = seg.f(n, rep)
        if not f:
            return None
        memo = self._xcn_memo.get(f.raw)
        if memo is not None:
            return memo or None
        ref = self._practitioner(seg, f, n, rep)
        self._xcn_memo[f.raw] = ref or ""
        return ref

    def _practitioner(self, seg: Segment, f: Field, n: int, rep: int) -> str | None:
        loc = self.loc(seg, n, rep)
        pid = f.c(1)
        name = dt.human_name(self.ctx, f, loc, offset=1)
        if not pid and not name:
            return None
        auth = dt.authority(f, 9)
        id_type = f.c(13)
        system = (
            "http://hl7.org/fhir/sid/us-npi"
            if id_type == "NPI" or auth in ("NPI", "2.16.840.1.113883.4.6")
            else self.source.system_for(auth or None, "practitioner")
        )
        r: dict[str, Any] = {"resourceType": "Practitioner"}
        if pid:
            ident: dict[str, Any] = {"system": system, "value": pid}
            t = dt.identifier_type(id_type)
            if t:
                ident["type"] = t
            r["identifier"] = [ident]
        if name:
            r["name"] = [name]
        key = (system, pid) if pid else ("name", f.text())
        return self.b.add(r, *key)

    def organization(
        self,
        name: str,
        ident: str = "",
        auth: str = "",
        seg: Segment | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str | None:
        """An Organization (key: authority system + id, else the name)."""
        if not name and not ident:
            return None
        r: dict[str, Any] = {"resourceType": "Organization"}
        system = self.source.system_for(auth or None, "organization")
        if ident:
            r["identifier"] = [{"system": system, "value": ident}]
        if name:
            r["name"] = name
        if extra:
            r.update(extra)
        key = (system, ident) if ident else ("name", name)
        return self.b.add(r, *key)

    def xon(self, seg: Segment, n: int, rep: int = 1) -> str | None:
        f = seg.f(n, rep)
        if not f:
            return None
        memo = self._xon_memo.get(f.raw)
        if memo is None:
            memo = self._xon_memo[f.raw] = (
                self.organization(f.c(1), f.c(10) or f.c(3), dt.authority(f, 6), seg) or ""
            )
        return memo or None

    def location(self, seg: Segment, n: int) -> str | None:
        """PL -> Location (key: facility, building, floor, point of care, room, bed)."""
        f = seg.f(n)
        if not f:
            return None
        poc, room, bed, fac = f.c(1), f.c(2), f.c(3), f.c(4, 1) or f.c(4, 2)
        building, floor, desc = f.c(7), f.c(8), f.c(9)
        parts = [p for p in (poc, room, bed) if p]
        if not parts and not fac and not desc:
            return None
        r: dict[str, Any] = {"resourceType": "Location", "status": "active", "mode": "instance"}
        label = " ".join(parts) or desc or fac
        r["name"] = label if not fac or label == fac else f"{label} ({fac})"
        if desc:
            r["description"] = desc
        ptype = "bd" if bed else "ro" if room else "wa" if poc else "bu" if building else "si"
        r["physicalType"] = {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": ptype}
            ]
        }
        if fac:
            org = self.organization(fac, f.c(4, 2), f.c(4, 3))
            if org:
                r["managingOrganization"] = {"reference": org}
        if floor or building:
            r["alias"] = [
                x
                for x in (f"building {building}" if building else "", f"floor {floor}" if floor else "")
                if x
            ]
        return self.b.add(r, fac, building, floor, poc, room, bed)

    def _telecoms(self, seg: Segment, fields: tuple[tuple[int, str | None], ...]) -> list[dict[str, Any]]:
        """ContactPoints from XTN fields; ``use`` defaults per field (home/work) unless given or email."""
        tele: list[dict[str, Any]] = []
        for n, default_use in fields:
            for i, f in enumerate(seg.reps(n), start=1):
                cp = dt.contact_point(self.ctx, f, self.loc(seg, n, i))
                if cp:
                    if default_use and "use" not in cp and cp["system"] != "email":
                        cp["use"] = default_use
                    tele.append(cp)
        return tele

    # ------------------------------------------------------------------------------ the walk
    def run(self) -> None:
        handlers: dict[str, Callable[[Segment], None]] = {
            "PID": self.pid,
            "PD1": self.pd1,
            "NK1": self.nk1,
            "PV1": self.pv1,
            "PV2": self.pv2,
            "MRG": self.mrg,
            "AL1": self.al1,
            "DG1": self.dg1,
            "IN1": self.in1,
            "ORC": self.orc_seg,
            "OBR": self.obr,
            "OBX": self.obx,
            "NTE": self.nte,
            "SPM": self.spm,
            "RXA": self.rxa,
            "RXR": self.rxr,
            "SCH": self.sch,
            "AIS": self.ais,
            "AIG": self.aip,
            "AIP": self.aip,
            "AIL": self.ail,
            "TXA": self.txa_seg,
            "RXE": self.rxe,
            "RXO": self.rxo,
            "FT1": self.ft1,
            "PR1": self.pr1,
            "TQ1": self.tq1,
            "ROL": self.rol,
            "PRT": self.prt,
        }
        quiet = {"MSH", "EVN", "SFT", "MSA", "ERR", "DSC", "QRD", "QRF"}
        # PID first: everything else refers to the patient
        pid = self.msg.first("PID")
        if pid is not None:
            self.pid(pid)
        else:
            self.no_patient()
        pv1 = self.msg.first("PV1")
        if pv1 is not None:
            self.pv1_index = pv1.index
            self.pv1(pv1)
        for seg in self.msg.segments:
            name = seg.name
            if name in ("PID", "PV1") and seg is (pid if name == "PID" else pv1):
                continue
            h = handlers.get(name)
            if h is not None:
                h(seg)
            elif name in quiet:
                continue
            elif name[0] == "Z":
                if not self.adapter.map_z_segment(self, seg):
                    self.unmapped.setdefault(name, []).append(seg)
            else:
                self.unmapped.setdefault(name, []).append(seg)
        self.finish()
        for name, segs in self.unmapped.items():
            what = "Z-segment" if name[0] == "Z" else "segment"
            self.warn(
                "unmapped-segment",
                f"{what} {name} is not mapped ({len(segs)} occurrence(s)); its data is not in the bundle",
                self.loc(segs[0]),
            )

    def finish(self) -> None:
        self.close_report()
        self.close_document()

    # --------------------------------------------------------------------------------- patient
    def no_patient(self) -> None:
        self.routing_key = f"message:{self.msg_key or self.b.input_sha256 + ':' + str(self.msg.index)}"

    def pid(self, seg: Segment) -> None:
        if self.patient_ref is not None:  # a second PID (e.g. A17 swap): its own Patient
            self._patient(seg, primary=False)
            return
        self._patient(seg, primary=True)

    def _patient(self, seg: Segment, primary: bool) -> str:
        ctx = self.ctx
        r: dict[str, Any] = {"resourceType": "Patient"}
        idents: list[dict[str, Any]] = []
        key: tuple[str, str] | None = None
        mrn_used = False
        for i, f in enumerate(seg.reps(3), start=1):
            loc = self.loc(seg, 3, i)
            t = f.c(5)
            auth = dt.authority(f, 4)
            mapped = dict(self.source.assigning_authorities).get(auth) if auth else None
            default = None
            if not mapped and not mrn_used and t in ("MR", "MRN", "PI", "PT", ""):
                default = self.source.mrn_system_uri
                mrn_used = True
            ident = dt.cx_identifier(ctx, f, loc, default_system=default, kind="patient")
            if ident:
                idents.append(ident)
                if (key is None or (default and key[0] != self.source.mrn_system_uri)) and t != "SS":
                    key = (ident["system"], ident["value"])
        for n, kind in ((2, "patient"), (4, "patient")):
            for i, f in enumerate(seg.reps(n), start=1):
                ident = dt.cx_identifier(ctx, f, self.loc(seg, n, i), kind=kind)
                if ident:
                    idents.append(ident)
                    if key is None:
                        key = (ident["system"], ident["value"])
        if seg.v(18):
            ident = dt.cx_identifier(ctx, seg.f(18), self.loc(seg, 18), kind="account")
            if ident:
                ident.setdefault("type", dt.identifier_type("AN"))
                idents.append(ident)
        if seg.v(19):
            idents.append({"type": dt.identifier_type("SS"), "system": dt.US_SSN, "value": seg.v(19)})
        if seg.v(20):
            f = seg.f(20)
            state = f.c(2)
            idents.append(
                {
                    "type": dt.identifier_type("DL"),
                    "system": self.source.system_for(state or None, "drivers-license"),
                    "value": f.c(1),
                }
            )
        if idents:
            r["identifier"] = unique_identifiers(idents)
        names = [
            hn
            for i, f in enumerate(seg.reps(5), start=1)
            if (hn := dt.human_name(ctx, f, self.loc(seg, 5, i)))
        ]
        for f in seg.reps(5):
            if f.c(15):  # XPN-15 "called by" (v2.7+): the name the patient goes by
                names.append({"use": "usual", "given": [f.c(15)], **({"family": f.c(1)} if f.c(1) else {})})
        for i, f in enumerate(seg.reps(9), start=1):
            alias = dt.human_name(ctx, f, self.loc(seg, 9, i))
            if alias:
                alias.setdefault("use", "nickname")
                names.append(alias)
        if names:
            r["name"] = names
        mmn = seg.f(6)
        if mmn and mmn.c(1, 1):
            r.setdefault("extension", []).append(
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                    "valueString": mmn.c(1, 1),
                }
            )
        tele = self._telecoms(seg, ((13, "home"), (14, "work"), (40, None)))
        if tele:
            r["telecom"] = tele
        g = seg.v(8)
        if g:
            gender = GENDER.get(g.upper())
            if gender:
                r["gender"] = gender
            else:
                self.warn("unknown-code", f"unknown administrative sex {g!r} (table 0001)", self.loc(seg, 8))
        if seg.v(7):
            loc = self.loc(seg, 7)
            try:
                prec, v = parse_ts(seg.v(7), self.source.timezone)
                r["birthDate"] = v[:10] if prec == "time" else v
                if prec == "time":
                    r["_birthDate"] = {
                        "extension": [
                            {
                                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                "valueDateTime": v,
                            }
                        ]
                    }
            except BadTimestamp as exc:
                self.warn("invalid-date", f"birth date: {exc.described()}; dropped", loc)
        addrs = [
            a for i, f in enumerate(seg.reps(11), start=1) if (a := dt.address(ctx, f, self.loc(seg, 11, i)))
        ]
        if addrs:
            r["address"] = addrs
        ms = seg.f(16)
        if ms:
            code = ms.c(1)
            v3 = MARITAL.get(code.upper()) if code else None
            cc = dt.codeable(ctx, ms, self.loc(seg, 16)) or {}
            if v3:
                cc["coding"] = [{"system": V3_MARITAL, "code": v3}] + [
                    c for c in cc.get("coding", []) if c.get("code") != code
                ]
            if cc:
                r["maritalStatus"] = cc
        lang = self.code(seg, 15)
        if lang:
            r["communication"] = [{"language": lang, "preferred": True}]
        if seg.v(24):
            mb = seg.v(24).upper()
            if seg.v(25).isdigit():
                r["multipleBirthInteger"] = int(seg.v(25))
            elif mb in ("Y", "N"):
                r["multipleBirthBoolean"] = mb == "Y"
        death = self.dtm(seg, 29)
        if death:
            r["deceasedDateTime"] = death
        elif seg.v(30).upper() in ("Y", "N"):
            r["deceasedBoolean"] = seg.v(30).upper() == "Y"
        self._race_ethnicity(seg, r)
        if not primary:
            return self.b.add(r, *(key or self.record_key("PID", seg.index)))
        if key is None:
            self.warn(
                "no-patient-identifier",
                "PID has no identifier in PID-2, PID-3 or PID-4; the Patient id is scoped to this message",
                self.loc(seg, 3),
            )
            self.patient_key = None
            ref = self.b.add(r, *self.record_key("PID"))
            self.routing_key = f"message:{self.msg_key or self.b.input_sha256 + ':' + str(self.msg.index)}"
        else:
            self.patient_key = f"{key[0]}|{key[1]}"
            ref = self.b.add(r, *key)
            self.routing_key = self.patient_key
        self.patient_ref = ref
        self.patient = r
        self.note_target = None
        return ref

    def _race_ethnicity(self, seg: Segment, r: dict[str, Any]) -> None:
        for n, build in ((10, race_extension), (22, ethnicity_extension)):
            codings = []
            for i, f in enumerate(seg.reps(n), start=1):
                cc = dt.codeable(self.ctx, f, self.loc(seg, n, i))
                if not cc:
                    continue
                for c in cc.get("coding", []):
                    if c.get("code"):
                        c = dict(c)
                        c.pop("version", None)
                        if c.get("system") in (f"{V2}0005", f"{V2}0189", None):
                            c["system"] = CDC_RACE_ETHNICITY
                        codings.append(c)
                        break
            ext = build(codings)
            if ext:
                r.setdefault("extension", []).append(ext)

    def pd1(self, seg: Segment) -> None:
        if not self.patient_ref:
            return
        p = self.b.get(self.patient_ref)
        if p is None:
            return
        gps = []
        for i in range(1, len(seg.reps(4)) + 1):
            ref = self.practitioner(seg, 4, i)
            if ref:
                gps.append({"reference": ref})
        for i in range(1, len(seg.reps(3)) + 1):
            ref = self.xon(seg, 3, i)
            if ref:
                gps.append({"reference": ref})
        if gps:
            p["generalPractitioner"] = gps

    def nk1(self, seg: Segment) -> None:
        if not self.patient_ref:
            return
        p = self.b.get(self.patient_ref)
        if p is None:
            return
        ctx = self.ctx
        c: dict[str, Any] = {}
        rel = self.table_code(seg, 3, "0063")
        role = self.table_code(seg, 7, "0131")
        rels = [x for x in (rel, role) if x]
        if rels:
            c["relationship"] = rels
        name = dt.human_name(ctx, seg.f(2), self.loc(seg, 2))
        if name:
            c["name"] = name
        tele = self._telecoms(seg, ((5, "home"), (6, "work"), (40, None)))
        if tele:
            c["telecom"] = tele
        addr = dt.address(ctx, seg.f(4), self.loc(seg, 4))
        if addr:
            c["address"] = addr
        g = seg.v(15)
        if g and GENDER.get(g.upper()):
            c["gender"] = GENDER[g.upper()]
        org_name = seg.f(13)
        if org_name and org_name.c(1):
            ref = self.xon(seg, 13)
            if ref:
                c["organization"] = {"reference": ref}
        p_ = dt.period(ctx, seg.v(8), seg.v(9), self.loc(seg, 8))
        if p_:
            c["period"] = p_
        if c:
            p.setdefault("contact", []).append(c)

    def mrg(self, seg: Segment) -> None:
        """MRG (A34/A40/...): the prior patient becomes a Patient replaced-by the surviving one."""
        if not self.patient_ref:
            return
        f = seg.f(1)
        ident = None
        if f:
            t = f.c(5)
            auth = dt.authority(f, 4)
            mapped = dict(self.source.assigning_authorities).get(auth) if auth else None
            default = (
                self.source.mrn_system_uri if not mapped and t in ("MR", "MRN", "PI", "PT", "") else None
            )
            ident = dt.cx_identifier(self.ctx, f, self.loc(seg, 1), default_system=default, kind="patient")
        if ident is None:
            for n in (4, 2, 3):
                if seg.v(n):
                    ident = dt.cx_identifier(self.ctx, seg.f(n), self.loc(seg, n), kind="patient")
                    break
        if ident is None:
            self.warn(
                "missing-field",
                "MRG has no prior patient identifier (MRG-1); merge not recorded",
                self.loc(seg, 1),
            )
            return
        if self.patient_key == f"{ident['system']}|{ident['value']}":
            return
        old: dict[str, Any] = {
            "resourceType": "Patient",
            "identifier": [ident],
            "active": False,
            "link": [{"other": {"reference": self.patient_ref}, "type": "replaced-by"}],
        }
        name = dt.human_name(self.ctx, seg.f(7), self.loc(seg, 7))
        if name:
            old["name"] = [name]
        old_ref = self.b.add(old, ident["system"], ident["value"])
        p = self.b.get(self.patient_ref)
        if p is not None:
            p.setdefault("link", []).append({"other": {"reference": old_ref}, "type": "replaces"})
            p["active"] = True
        if seg.v(5):  # prior visit number: nothing else to link, keep the identifier on the encounter
            enc = self.b.get(self.encounter_ref) if self.encounter_ref else None
            if enc is not None:
                enc.setdefault("identifier", []).append(
                    {"system": self.source.encounter_system_uri, "value": seg.v(5), "use": "old"}
                )

    # ------------------------------------------------------------------------------- encounter
    def pv1(self, seg: Segment) -> None:
        if self.encounter_ref is not None:
            self.unmapped.setdefault("PV1", []).append(seg)
            return
        ctx = self.ctx
        visit = seg.f(19)
        cls_code = seg.v(2).upper()
        if not visit and cls_code in ("", "N") and not seg.v(44) and not seg.v(3):
            return  # "not applicable" patient visit (A28, A31, ...): no encounter
        r: dict[str, Any] = {"resourceType": "Encounter"}
        status = ENCOUNTER_STATUS.get(self.trigger) if self.msg_type == "ADT" else None
        if status is None:
            status = "finished" if seg.v(45) else "in-progress" if seg.v(44) else "unknown"
        r["status"] = status
        if cls_code not in ENCOUNTER_CLASS and cls_code not in ("", "U", "N"):
            self.warn("unknown-code", f"unknown patient class {cls_code!r} (table 0004)", self.loc(seg, 2))
        r["class"] = encounter_class(ENCOUNTER_CLASS.get(cls_code))
        if visit:
            ident = dt.cx_identifier(
                ctx, visit, self.loc(seg, 19), default_system=self.source.encounter_system_uri
            )
            if ident:
                ident.setdefault("type", dt.identifier_type("VN"))
                r["identifier"] = [ident]
                key: tuple[object, ...] = (self.source.encounter_system_uri, visit.c(1))
        alt = seg.f(50)
        alt_ident = (
            dt.cx_identifier(ctx, alt, self.loc(seg, 50), kind="encounter") if alt and alt.c(1) else None
        )
        if alt_ident is not None:
            r.setdefault("identifier", []).append(alt_ident)
            if "identifier" in r and len(r["identifier"]) == 1:
                key = (alt_ident["system"], alt_ident["value"])
        if "identifier" not in r:
            if self.patient_key and seg.v(44):
                key = ("patient-admit", self.patient_key, seg.v(44))
            else:
                key = self.record_key("PV1")
        self.subject(r)
        t = self.table_code(seg, 4, "0007")
        if t:
            r["type"] = [t]
        svc = self.table_code(seg, 10, "0069")
        if svc:
            r["serviceType"] = svc
        parts = []
        for n, code, display in (
            (7, "ATND", "attender"),
            (8, "REF", "referrer"),
            (9, "CON", "consultant"),
            (17, "ADM", "admitter"),
        ):
            for i in range(1, len(seg.reps(n)) + 1):
                ref = self.practitioner(seg, n, i)
                if ref:
                    parts.append(
                        {
                            "type": [
                                {"coding": [{"system": V3_PARTICIPATION, "code": code, "display": display}]}
                            ],
                            "individual": {"reference": ref},
                        }
                    )
        if parts:
            r["participant"] = parts
        p = dt.period(ctx, seg.v(44), seg.v(45), self.loc(seg, 44))
        if p:
            if "start" in p and "end" in p and p["end"] < p["start"]:
                self.warn(
                    "inconsistent-period",
                    "discharge (PV1-45) before admission (PV1-44); end dropped",
                    self.loc(seg, 45),
                )
                del p["end"]
            r["period"] = p
        locs = []
        for n, status_ in (
            (3, "active"),
            (6, "completed"),
            (11, "active"),
            (42, "planned"),
            (43, "completed"),
        ):
            ref = self.location(seg, n)
            if ref:
                locs.append({"location": {"reference": ref}, "status": status_})
        if locs:
            r["location"] = locs
        hosp: dict[str, Any] = {}
        adm = self.table_code(seg, 14, "0023")
        if adm:
            hosp["admitSource"] = adm
        readm = self.table_code(seg, 13, "0092")
        if readm:
            hosp["reAdmission"] = readm
        diet = self.table_code(seg, 38, "0159")
        if diet:
            hosp["dietPreference"] = [diet]
        disp = self.table_code(seg, 36, "0112")
        if disp:
            hosp["dischargeDisposition"] = disp
        pre = self.code(seg, 16)
        if pre:
            hosp["specialArrangement"] = [pre]
        if hosp:
            r["hospitalization"] = hosp
        self.encounter_ref = self.b.add(r, *key)

    def pv2(self, seg: Segment) -> None:
        enc = self.b.get(self.encounter_ref) if self.encounter_ref else None
        if enc is None:
            return
        reason = self.code(seg, 3)
        if reason:
            enc["reasonCode"] = [reason]
        if seg.v(12):
            enc.setdefault("text", None)
            enc.pop("text", None)
        los = seg.v(11)
        if los.isdigit():
            enc["length"] = {
                "value": int(los),
                "unit": "d",
                "system": "http://unitsofmeasure.org",
                "code": "d",
            }
        prio = self.table_code(seg, 25, "0217")
        if prio:
            enc["priority"] = prio

    # ------------------------------------------------------------------------ roles (ROL, PRT)
    def rol(self, seg: Segment) -> None:
        self._role(seg, role_field=3, person_field=4)

    def prt(self, seg: Segment) -> None:
        self._role(seg, role_field=4, person_field=5)

    def _role(self, seg: Segment, role_field: int, person_field: int) -> None:
        """A person's role: the Encounter's participant, else the Patient's primary care provider (PP)."""
        ref = self.practitioner(seg, person_field)
        role = self.code(seg, role_field)
        enc = self.b.get(self.encounter_ref) if self.encounter_ref else None
        if ref is None:
            self.unmapped.setdefault(seg.name, []).append(seg)
            return
        after_pv1 = self.pv1_index is not None and seg.index > self.pv1_index
        if (
            enc is not None
            and after_pv1
            and self.report is None
            and self.appointment is None
            and self.txa is None
        ):
            part: dict[str, Any] = {"individual": {"reference": ref}}
            if role:
                part["type"] = [role]
            p = dt.period(self.ctx, seg.v(5), seg.v(6), self.loc(seg, 5)) if seg.name == "ROL" else None
            if p:
                part["period"] = p
            if part not in enc.setdefault("participant", []):
                enc["participant"].append(part)
            return
        if self.appointment is not None:
            self._appt_participant(ref)
            return
        pat = self.b.get(self.patient_ref) if self.patient_ref else None
        if pat is not None and seg.v(role_field) in ("PP", "FHCP"):
            gps = pat.setdefault("generalPractitioner", [])
            if {"reference": ref} not in gps:
                gps.append({"reference": ref})
            return
        self.unmapped.setdefault(seg.name, []).append(seg)

    # ------------------------------------------------------------------- allergies, diagnoses
    def al1(self, seg: Segment) -> None:
        loc = self.loc(seg, 3)
        cc = self.code(seg, 3)
        if not cc:
            self.warn("missing-field", "AL1-3 (allergen) is empty; allergy skipped", loc)
            return
        if not self.patient_ref:
            self.warn("no-patient", "AL1 without a PID; allergy skipped", loc)
            return
        r: dict[str, Any] = {
            "resourceType": "AllergyIntolerance",
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                        "code": "active",
                    }
                ]
            },
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                        "code": "confirmed",
                    }
                ]
            },
            "code": cc,
        }
        self.subject(r, "patient")
        cat = ALLERGY_CATEGORY.get(seg.v(2, 1).upper())
        if cat:
            r["category"] = [cat]
        elif seg.v(2):
            self.warn("unknown-code", f"unknown allergen type {seg.v(2)!r} (table 0127)", self.loc(seg, 2))
        sev = ALLERGY_SEVERITY.get(seg.v(4, 1).upper())
        if sev:
            r["criticality"] = sev[0]
        reactions = [x for f in seg.reps(5) if (x := f.text())]
        if reactions:
            reaction: dict[str, Any] = {"manifestation": [{"text": t} for t in reactions]}
            if sev and sev[1]:
                reaction["severity"] = sev[1]
            r["reaction"] = [reaction]
        onset = self.dtm(seg, 6)
        if onset:
            r["onsetDateTime"] = onset
        self.b.add(r, self.patient_key or self.record_key(), dt.first_code(cc))
        self.note_target = r

    def dg1(self, seg: Segment) -> None:
        cc = self.code(seg, 3)
        if not cc and seg.v(4):
            cc = {"text": seg.v(4)}
        if not cc:
            self.warn(
                "missing-field", "DG1-3/DG1-4 (diagnosis) is empty; diagnosis skipped", self.loc(seg, 3)
            )
            return
        if not self.patient_ref:
            self.warn("no-patient", "DG1 without a PID; diagnosis skipped", self.loc(seg))
            return
        if seg.v(4) and "text" not in cc:
            cc["text"] = seg.v(4)
        r: dict[str, Any] = {
            "resourceType": "Condition",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                            "code": "encounter-diagnosis",
                            "display": "Encounter Diagnosis",
                        }
                    ]
                }
            ],
            "code": cc,
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": "confirmed",
                    }
                ]
            },
        }
        self.subject(r)
        self.encounter(r)
        onset = self.dtm(seg, 5)
        if onset:
            r["onsetDateTime"] = onset
        rec = self.dtm(seg, 19)
        if rec:
            r["recordedDate"] = rec
        ref = self.practitioner(seg, 16)
        if ref:
            r["asserter"] = {"reference": ref}
        self.b.add(r, self.patient_key or self.record_key(), self.encounter_ref, dt.first_code(cc))
        enc = self.b.get(self.encounter_ref) if self.encounter_ref else None
        if enc is not None:
            rank = seg.v(15)
            d: dict[str, Any] = {"condition": {"reference": f"Condition/{r['id']}"}}
            if rank.isdigit() and int(rank) > 0:
                d["rank"] = int(rank)
            enc.setdefault("diagnosis", []).append(d)
        self.note_target = r

    def pr1(self, seg: Segment) -> None:
        cc = self.code(seg, 3) or ({"text": seg.v(4)} if seg.v(4) else None)
        if not cc or not self.patient_ref:
            self.unmapped.setdefault("PR1", []).append(seg)
            return
        r: dict[str, Any] = {"resourceType": "Procedure", "status": "completed", "code": cc}
        self.subject(r)
        self.encounter(r)
        when = self.dtm(seg, 5)
        if when:
            r["performedDateTime"] = when
        perf = [{"actor": {"reference": ref}} for ref in self.practitioners(seg, 8)]
        if perf:
            r["performer"] = perf
        self.b.add(r, self.patient_key or self.record_key(), self.encounter_ref, dt.first_code(cc), seg.v(5))
        self.note_target = r

    # -------------------------------------------------------------------------------- coverage
    def in1(self, seg: Segment) -> None:
        if not self.patient_ref:
            self.warn("no-patient", "IN1 without a PID; coverage skipped", self.loc(seg))
            return
        payor = self.organization(seg.v(4) or seg.f(3).c(1), seg.f(3).c(1), dt.authority(seg.f(3), 4))
        if payor is None:
            self.warn(
                "missing-field",
                "IN1-3/IN1-4 (insurance company) is empty; coverage skipped",
                self.loc(seg, 3),
            )
            return
        r: dict[str, Any] = {"resourceType": "Coverage", "status": "active", "payor": [{"reference": payor}]}
        self.subject(r, "beneficiary")
        idents = []
        policy = seg.v(36)
        if policy:
            idents.append({"system": self.source.system_for(seg.v(3) or None, "policy"), "value": policy})
        if idents:
            r["identifier"] = idents
            r["subscriberId"] = policy
        plan = self.code(seg, 2)
        classes = []
        if plan and dt.first_code(plan):
            classes.append(
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "plan"}
                        ]
                    },
                    "value": dt.first_code(plan) or "",
                    **({"name": plan["text"]} if plan.get("text") else {}),
                }
            )
        if seg.v(8):
            classes.append(
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/coverage-class",
                                "code": "group",
                            }
                        ]
                    },
                    "value": seg.v(8),
                    **({"name": seg.v(9)} if seg.v(9) else {}),
                }
            )
        if classes:
            r["class"] = classes
        p = dt.period(self.ctx, seg.v(12), seg.v(13), self.loc(seg, 12))
        if p:
            r["period"] = p
        typ = self.table_code(seg, 15, "0086")
        if typ:
            r["type"] = typ
        rel = seg.f(17)
        if rel and rel.c(1):
            code = {
                "SEL": "self",
                "SPO": "spouse",
                "CHD": "child",
                "PAR": "parent",
                "OTH": "other",
                "EME": "other",
                "MTH": "parent",
                "FTH": "parent",
                "DOM": "common",
            }.get(rel.c(1).upper())
            if code:
                r["relationship"] = {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                            "code": code,
                        }
                    ]
                }
            else:
                r["relationship"] = dt.codeable(self.ctx, rel, self.loc(seg, 17))
        order = seg.v(22)
        if order.isdigit() and int(order) > 0:
            r["order"] = int(order)
        self.coverage_count += 1
        self.b.add(
            r,
            self.patient_key or self.record_key(),
            dt.first_code(plan) if plan else "",
            seg.f(3).c(1),
            policy,
            seg.v(1) if not policy else "",
        )

    # ---------------------------------------------------------------------------------- orders
    def order_key(self, seg_orc: Segment | None, seg_obr: Segment | None) -> tuple[object, ...] | None:
        """Placer order number (ORC-2/OBR-2), else filler (ORC-3/OBR-3), with its namespace."""
        for s, n in ((seg_orc, 2), (seg_obr, 2), (seg_orc, 3), (seg_obr, 3)):
            if s is not None and s.v(n):
                f = s.f(n)
                return ("placer" if n == 2 else "filler", f.c(2) or f.c(3), f.c(1))
        return None

    def group_key(self, obr: Segment) -> tuple[object, ...] | None:
        """The key of the order group an OBR opens (its ServiceRequest, DiagnosticReport, results).

        Its order number (:meth:`order_key`), plus its position among the message's OBRs when an
        earlier OBR of the message already took that number: senders put several panels under one
        placer number, and each is its own order and report. The first keeps the plain order number,
        so a panel re-sent alone in a later message still updates the resources it made.
        """
        if obr.index in self._group_keys:
            return self._group_keys[obr.index]
        key = self.order_key(self.orc, obr)
        if key is not None and key in self._group_keys.values():
            key = (*key, "OBR", self.obr_count)
        self._group_keys[obr.index] = key
        return key

    def order_identifiers(self, seg_orc: Segment | None, seg_obr: Segment | None) -> list[dict[str, Any]]:
        out = []
        seen = set()
        for s, n, code in (
            (seg_orc, 2, "PLAC"),
            (seg_obr, 2, "PLAC"),
            (seg_orc, 3, "FILL"),
            (seg_obr, 3, "FILL"),
        ):
            if s is None or not s.v(n):
                continue
            f = s.f(n)
            system = self.source.system_for(
                f.c(3) or f.c(2) or None, "placer" if code == "PLAC" else "filler"
            )
            if (system, f.c(1)) in seen:
                continue
            seen.add((system, f.c(1)))
            out.append(
                {
                    "type": {"coding": [{"system": V2 + "0203", "code": code}]},
                    "system": system,
                    "value": f.c(1),
                }
            )
        return out

    def orc_seg(self, seg: Segment) -> None:
        self.close_report()
        self.orc = seg
        self.order_ref = None
        self.med_request = None

    def tq1(self, seg: Segment) -> None:
        if self.appointment is not None and self.txa is None:
            start = dt.fhir_instant(self.ctx, seg.v(7), self.loc(seg, 7)) if seg.v(7) else None
            end = dt.fhir_instant(self.ctx, seg.v(8), self.loc(seg, 8)) if seg.v(8) else None
            if start and end:
                self.appointment["start"], self.appointment["end"] = start, end
            return
        target = self.med_request or (self.b.get(self.order_ref) if self.order_ref else None)
        if target is None:
            return
        start = self.dtm(seg, 7)
        if start and target.get("resourceType") == "ServiceRequest":
            target["occurrenceDateTime"] = start
        prio = seg.v(9)
        if prio:
            target["priority"] = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "T": "urgent"}.get(
                prio.upper(), "routine"
            )

    def service_request(self, obr: Segment | None, code: dict[str, Any] | None) -> str | None:
        orc = self.orc
        key = self.group_key(obr) if obr is not None else self.order_key(orc, None)
        if not self.patient_ref:
            return None
        r: dict[str, Any] = {"resourceType": "ServiceRequest", "intent": "order"}
        ctrl = orc.v(1).upper() if orc is not None else ""
        status = ORDER_STATUS.get(orc.v(5).upper()) if orc is not None and orc.v(5) else None
        r["status"] = status or ORDER_STATUS.get(ctrl, "active" if ctrl else "unknown")
        idents = self.order_identifiers(orc, obr)
        if idents:
            r["identifier"] = idents
        r["code"] = code or {"text": "unknown"}
        self.subject(r)
        self.encounter(r)
        when = (self.dtm(orc, 9) if orc is not None else None) or (
            self.dtm(obr, 6) if obr is not None else None
        )
        if when:
            r["authoredOn"] = when
        req = (self.practitioner(orc, 12) if orc is not None else None) or (
            self.practitioner(obr, 16) if obr is not None else None
        )
        facility = self.ordering_facility(orc) if orc is not None else None
        if facility:
            req = self.practitioner_role(req, facility)
        if req:
            r["requester"] = {"reference": req}
        if obr is not None:
            prio = obr.v(5) or obr.v(27, 6)
            if prio:
                r["priority"] = {"S": "stat", "A": "asap", "R": "routine"}.get(prio.upper(), "routine")
            reasons = [c for i in range(1, len(obr.reps(31)) + 1) if (c := self.code(obr, 31, i))]
            if reasons:
                r["reasonCode"] = reasons
            occ = self.dtm(obr, 7)
            if occ:
                r["occurrenceDateTime"] = occ
        ref = self.b.add(r, *(key or self.record_key("order", obr.index if obr else orc.index if orc else 0)))
        self.note_target = r
        return ref

    def ordering_facility(self, orc: Segment) -> str | None:
        """ORC-21 (ordering facility, XON) -> Organization, with ORC-22 address and ORC-23 telecom."""
        org = self.xon(orc, 21)
        if org is None:
            return None
        r = self.b.get(org)
        if r is not None:
            addrs = [
                a
                for i, f in enumerate(orc.reps(22), start=1)
                if (a := dt.address(self.ctx, f, self.loc(orc, 22, i)))
            ]
            if addrs:
                r.setdefault("address", addrs)
            tele = self._telecoms(orc, ((23, "work"),))
            if tele:
                r.setdefault("telecom", tele)
        return org

    def practitioner_role(self, practitioner: str | None, organization: str) -> str:
        """The requester of an order placed at a facility, as the HL7 v2-to-FHIR IG maps ORC-12 and
        ORC-21: a PractitionerRole of the ordering provider (if any) at the ordering facility."""
        r: dict[str, Any] = {"resourceType": "PractitionerRole"}
        if practitioner:
            r["practitioner"] = {"reference": practitioner}
        r["organization"] = {"reference": organization}
        return self.b.add(r, "requester", practitioner or "", organization)

    def obr(self, seg: Segment) -> None:
        self.close_report()
        # an OBR opens an order group: the OBX after it are its results, not text of an earlier TXA
        # document (MDM puts its OBR before the TXA, so this never cuts a document message short)
        self.close_document()
        self.obr_count += 1
        code = self.code(seg, 4)
        if self.msg_type in ("ORU", "OUL") or (self.msg_type == "ORM" and self.trigger == "R01"):
            self.open_report(seg, code)
        else:
            self.order_ref = self.service_request(seg, code)
            if self.order_ref is None:
                self.warn("no-patient", "order without a PID; ServiceRequest skipped", self.loc(seg))

    def open_report(self, seg: Segment, code: dict[str, Any] | None) -> None:
        orc = self.orc
        r: dict[str, Any] = {"resourceType": "DiagnosticReport"}
        status = seg.v(25).upper()
        r["status"] = DR_STATUS.get(status, "unknown")
        if status and status not in DR_STATUS:
            self.warn("unknown-code", f"unknown result status {status!r} (table 0123)", self.loc(seg, 25))
        idents = self.order_identifiers(orc, seg)
        if idents:
            r["identifier"] = idents
        if code is None:
            self.warn("missing-field", "OBR-4 (universal service id) is empty", self.loc(seg, 4))
        r["code"] = code or {"text": "unknown"}
        self.subject(r)
        self.encounter(r)
        eff = self.dtm(seg, 7)
        eff_end = self.dtm(seg, 8)
        if eff and eff_end:
            r["effectivePeriod"] = {"start": eff, "end": eff_end}
        elif eff:
            r["effectiveDateTime"] = eff
        issued = dt.fhir_instant(self.ctx, seg.v(22), self.loc(seg, 22))
        if issued:
            r["issued"] = issued
        cat = self.table_code(seg, 24, "0074")
        if cat:
            r["category"] = [cat]
        perf = []
        for n in (32, 16):
            ref = self.practitioner(seg, n) if n == 16 else None
            if n == 32 and seg.v(32):
                f = seg.f(32)
                name_field = f.component(1)
                ref = None
                if name_field.c(1) or name_field.c(2):
                    pr: dict[str, Any] = {"resourceType": "Practitioner"}
                    nm: dict[str, Any] = {"family": name_field.c(2)} if name_field.c(2) else {}
                    if name_field.c(3):
                        nm["given"] = [name_field.c(3)]
                    if nm:
                        pr["name"] = [nm]
                    if name_field.c(1):
                        pr["identifier"] = [
                            {"system": self.source.system_for(None, "practitioner"), "value": name_field.c(1)}
                        ]
                        ref = self.b.add(pr, self.source.system_for(None, "practitioner"), name_field.c(1))
                    elif nm:
                        ref = self.b.add(pr, "name", name_field.c(2), name_field.c(3))
                if ref:
                    r.setdefault("resultsInterpreter", []).append({"reference": ref})
                continue
            if ref:
                perf.append({"reference": ref})
        # ORU orders: the ServiceRequest the report is based on, when the order is identified
        key = self.group_key(seg)
        if self.patient_ref:
            sr = self.service_request(seg, code)
            if sr:
                r["basedOn"] = [{"reference": sr}]
                self.note_target = None
        if perf:
            r["performer"] = perf
        spec_src = seg.f(15)
        self.report = r
        self.report_key = key or self.record_key("OBR", seg.index)
        self.report_seg = seg
        self.report_obs = []
        self.report_specimens = []
        if spec_src and spec_src.c(1):
            spec = {
                "resourceType": "Specimen",
                "type": dt.codeable(self.ctx, spec_src.component(1), self.loc(seg, 15))
                or {"text": spec_src.c(1)},
            }
            self.subject(spec)
            self.report_specimens.append(self.b.add(spec, *self.report_key, "OBR-15"))
        self.b.add(r, *self.report_key)
        self.note_target = None

    def close_report(self) -> None:
        r = self.report
        if r is None:
            return
        if self.report_obs:
            r["result"] = [{"reference": ref} for ref in self.report_obs]
        if self.report_specimens:
            r["specimen"] = [{"reference": ref} for ref in self.report_specimens]
            for ref in self.report_obs:
                o = self.b.get(ref)
                if o is not None and "specimen" not in o:
                    o["specimen"] = {"reference": self.report_specimens[0]}
        self.report = None

    def spm(self, seg: Segment) -> None:
        r: dict[str, Any] = {"resourceType": "Specimen"}
        f2 = seg.f(2)
        idents = []
        for comp, code in ((1, "PLAC"), (2, "FILL")):
            ei = f2.component(comp)
            if ei.c(1):
                idents.append(
                    {
                        "type": {"coding": [{"system": V2 + "0203", "code": code}]},
                        "system": self.source.system_for(ei.c(3) or ei.c(2) or None, "specimen"),
                        "value": ei.c(1),
                    }
                )
        if idents:
            r["identifier"] = idents
            r["accessionIdentifier"] = idents[-1]
        typ = self.code(seg, 4)
        if typ:
            r["type"] = typ
        self.subject(r)
        coll: dict[str, Any] = {}
        f17 = seg.f(17)
        if f17:
            start = dt.fhir_datetime(self.ctx, f17.c(1), self.loc(seg, 17, None, 1))
            end = dt.fhir_datetime(self.ctx, f17.c(2), self.loc(seg, 17, None, 2))
            if start and end:
                coll["collectedPeriod"] = {"start": start, "end": end}
            elif start:
                coll["collectedDateTime"] = start
        site = self.code(seg, 8)
        if site:
            coll["bodySite"] = site
        method = self.code(seg, 7)
        if method:
            coll["method"] = method
        if seg.v(12):
            n = dt.number(seg.f(12).c(1))
            if n is not None:
                coll["quantity"] = dt.quantity(self.ctx, n, seg.f(12).component(2), self.loc(seg, 12))
        if coll:
            r["collection"] = coll
        recv = self.dtm(seg, 18)
        if recv:
            r["receivedTime"] = recv
        cond = [c for i in range(1, len(seg.reps(24)) + 1) if (c := self.code(seg, 24, i))]
        if cond:
            r["condition"] = cond
        if idents:
            key: tuple[object, ...] = ("specimen", idents[-1]["system"], idents[-1]["value"])
        else:
            key = (*(getattr(self, "report_key", None) or self.record_key()), "SPM", seg.v(1) or seg.index)
        ref = self.b.add(r, *key)
        if self.report is not None:
            self.report_specimens.append(ref)
        elif self.order_ref:
            sr = self.b.get(self.order_ref)
            if sr is not None:
                sr.setdefault("specimen", []).append({"reference": ref})
        self.note_target = r

    def obx(self, seg: Segment) -> None:
        if self.txa is not None:
            self.txa_text.append(
                seg.f(5).text()
                if seg.v(2) in ("TX", "FT", "ST", "")
                else "\n".join(f.text() for f in seg.reps(5))
            )
            if seg.v(2) in ("TX", "FT", "ST", ""):
                extra = [f.text() for f in seg.reps(5)[1:]]
                if extra:
                    self.txa_text[-1] = "\n".join([self.txa_text[-1], *extra])
            return
        ref = self.observation(seg)
        if ref is None:
            return
        if self.report is not None:
            self.report_obs.append(ref)
        elif self.rxa_ref is not None:
            o = self.b.get(ref)
            if o is not None:
                o["partOf"] = [{"reference": self.rxa_ref}]
        elif self.order_ref is not None:
            sr = self.b.get(self.order_ref)
            if sr is not None:
                sr.setdefault("supportingInfo", []).append({"reference": ref})

    def observation(self, seg: Segment) -> str | None:
        ctx = self.ctx
        self.obx_count += 1
        code = self.code(seg, 3)
        if code is None:
            self.warn(
                "missing-field",
                "OBX-3 (observation identifier) is empty; observation skipped",
                self.loc(seg, 3),
            )
            return None
        r: dict[str, Any] = {"resourceType": "Observation"}
        st = seg.v(11).upper()
        status = OBS_STATUS.get(st)
        if status is None and st in OBS_STATUS_UNMATCHED:
            valued = st in OBS_STATUS_WITH_VALUE and any(f.text() for f in seg.reps(5))
            status = OBS_STATUS_WITH_VALUE[st] if valued else OBS_STATUS_UNMATCHED[st]
        r["status"] = status or ("unknown" if st else "final")
        if st and status is None:
            self.warn(
                "unknown-code", f"unknown observation result status {st!r} (table 0085)", self.loc(seg, 11)
            )
        r["code"] = code
        self.subject(r)
        self.encounter(r)
        self.obx_value(seg, r)
        rng = seg.v(7)
        if rng:
            r["referenceRange"] = [self.reference_range(seg, rng)]
        interp = [
            c
            for i in range(1, len(seg.reps(8)) + 1)
            if (c := self.table_code(seg, 8, "0078") if i == 1 else self.code(seg, 8, i))
        ]
        if interp:
            for c in interp:
                for cd in c.get("coding", []):
                    if cd.get("system") in (f"{V2}0078", "HL70078"):
                        cd["system"] = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
            r["interpretation"] = interp
        eff = self.dtm(seg, 14)
        if not eff and self.report is not None:
            eff = self.report.get("effectiveDateTime")
        if eff:
            r["effectiveDateTime"] = eff
        issued = dt.fhir_instant(ctx, seg.v(19), self.loc(seg, 19)) if seg.v(19) else None
        if issued:
            r["issued"] = issued
        perf = [{"reference": ref} for ref in self.practitioners(seg, 16)]
        org = self.xon(seg, 23)
        if org:
            perf.append({"reference": org})
        if perf:
            r["performer"] = perf
        method = self.code(seg, 17)
        if method:
            r["method"] = method
        site = self.code(seg, 20)
        if site:
            r["bodySite"] = site
        if self.report is not None:
            group: tuple[object, ...] = self.report_key
        elif self.rxa_ref is not None:
            group = ("immunization", self.rxa_ref)
        elif self.order_ref is not None:
            group = ("order", self.order_ref)
        else:
            group = (self.patient_key or "", *self.record_key())
        key = (*group, seg.v(1), dt.first_code(code), seg.v(4))
        if key in self._obs_keys:  # the same set id, code and sub-id again: another result, not a re-send
            key = (*key, "OBX", seg.index)
        self._obs_keys.add(key)
        ref = self.b.add(r, *key)
        self.note_target = r
        return ref

    def reference_range(self, seg: Segment, rng: str) -> dict[str, Any]:
        m = _RANGE.match(rng)
        if m:
            low, high = dt.number(m.group(1)), dt.number(m.group(2))
            out: dict[str, Any] = {}
            if low is not None:
                out["low"] = dt.quantity(self.ctx, low, seg.f(6), self.loc(seg, 6))
            if high is not None:
                out["high"] = dt.quantity(self.ctx, high, seg.f(6), self.loc(seg, 6))
            out["text"] = rng
            return out
        m = _BOUND.match(rng)
        if m:
            v = dt.number(m.group(2))
            if v is not None:
                side = "high" if m.group(1).startswith("<") else "low"
                return {side: dt.quantity(self.ctx, v, seg.f(6), self.loc(seg, 6)), "text": rng}
        return {"text": rng}

    def obx_value(self, seg: Segment, r: dict[str, Any]) -> None:
        vt = seg.v(2).upper()
        reps = seg.reps(5)
        if not reps:
            absent = seg.v(11).upper() in ("X", "N", "D")
            if not absent and vt:
                pass
            return
        loc = self.loc(seg, 5)
        if len(reps) > 1 and vt not in ("TX", "FT", "ST", "CE", "CWE", "CNE", "CF"):
            self.warn(
                "repeated-value", f"OBX-5 of type {vt} repeats {len(reps)} times; only the first is kept", loc
            )
        f = reps[0]
        if vt == "NM":
            n = dt.number(f.c(1))
            if n is None:
                self.warn("invalid-number", f"OBX-5 {f.c(1)!r} is not a number; kept as a string", loc)
                r["valueString"] = f.text()
            else:
                r["valueQuantity"] = dt.quantity(self.ctx, n, seg.f(6), self.loc(seg, 6))
        elif vt == "SN":
            self.structured_numeric(seg, f, r, loc)
        elif vt in ("CE", "CWE", "CNE", "CF", "CD"):
            codings = [c for i in range(1, len(reps) + 1) if (c := self.code(seg, 5, i))]
            if codings:
                cc = codings[0]
                for extra in codings[1:]:
                    cc.setdefault("coding", []).extend(extra.get("coding", []))
                r["valueCodeableConcept"] = cc
        elif vt in ("DT", "TS", "DTM"):
            v = dt.fhir_datetime(self.ctx, f.c(1), loc)
            if v:
                r["valueDateTime"] = v
            else:
                r["valueString"] = f.text()
        elif vt == "TM":
            v = dt.fhir_time(f.c(1))
            if v:
                r["valueTime"] = v
            else:
                self.warn("invalid-time", f"OBX-5 {f.c(1)!r} is not a valid TM; kept as a string", loc)
                r["valueString"] = f.text()
        elif vt in ("TX", "FT", "ST", "ID", "IS", "") or not vt:
            text = "\n".join(x.text() for x in reps)
            if text:
                r["valueString"] = text
        elif vt == "ED":
            data = f.c(5)
            r["valueString"] = (
                f"[{f.c(2) or 'data'} {f.c(3)}; {len(data)} characters of {f.c(4) or 'encoded'} data]"
            )
            self.warn("embedded-data", "OBX-5 encapsulated data (ED) is summarised, not embedded", loc)
        elif vt in (
            "XCN",
            "XPN",
            "XAD",
            "XTN",
            "CX",
            "EI",
            "HD",
            "PN",
            "AD",
            "TN",
            "CP",
            "MO",
            "NA",
            "RP",
            "SN",
            "DR",
            "CQ",
        ):
            if vt == "CQ" and dt.number(f.c(1)) is not None:
                r["valueQuantity"] = dt.quantity(self.ctx, dt.number(f.c(1)) or 0, f.component(2), loc)
            elif vt == "DR":
                p = dt.period(self.ctx, f.c(1, 1), f.c(2, 1), loc)
                if p:
                    r["valuePeriod"] = p
            else:
                r["valueString"] = f.text()
        else:
            self.warn(
                "unknown-value-type",
                f"unknown OBX-2 value type {vt!r}; value kept as a string",
                self.loc(seg, 2),
            )
            r["valueString"] = f.text()

    def structured_numeric(self, seg: Segment, f: Field, r: dict[str, Any], loc: dt.Loc) -> None:
        comp, n1, sep, n2 = f.c(1), f.c(2), f.c(3), f.c(4)
        a = dt.number(n1)
        b = dt.number(n2) if n2 else None
        if a is None and b is None:
            text = f.text()
            if text:
                self.warn(
                    "invalid-number",
                    f"OBX-5 structured numeric {text!r} has no number; kept as a string",
                    loc,
                )
                r["valueString"] = text
            return
        unit_loc = self.loc(seg, 6)
        if sep in ("-",) and a is not None and b is not None:
            r["valueRange"] = {
                "low": dt.quantity(self.ctx, a, seg.f(6), unit_loc),
                "high": dt.quantity(self.ctx, b, seg.f(6), unit_loc),
            }
        elif sep in (":", "/") and a is not None and b is not None:
            r["valueRatio"] = {"numerator": {"value": a}, "denominator": {"value": b}}
        elif a is not None:
            q = dt.quantity(self.ctx, a, seg.f(6), unit_loc)
            if comp in ("<", "<=", ">", ">="):
                q["comparator"] = comp
            elif comp and comp != "=":
                self.warn("unknown-code", f"unknown comparator {comp!r} in OBX-5", loc)
            r["valueQuantity"] = q
        else:
            r["valueString"] = f.text()

    def nte(self, seg: Segment) -> None:
        text = "\n".join(f.text() for f in seg.reps(3))
        if not text:
            return
        if self.txa is not None:
            self.txa_text.append(text)
            return
        if self.note_target is not None and self.note_target.get("resourceType") in (
            "Observation",
            "ServiceRequest",
            "Immunization",
            "AllergyIntolerance",
            "Condition",
            "MedicationRequest",
            "Specimen",
            "Procedure",
            "Appointment",
        ):
            if self.note_target["resourceType"] == "Appointment":
                self.note_target["comment"] = "\n".join(
                    x for x in (self.note_target.get("comment"), text) if x
                )
            else:
                self.add_note(self.note_target, text)
            return
        if self.report is not None:
            self.report["conclusion"] = "\n".join(x for x in (self.report.get("conclusion"), text) if x)
            return
        self.unmapped.setdefault("NTE", []).append(seg)

    # ---------------------------------------------------------------------------- immunization
    def rxa(self, seg: Segment) -> None:
        self.close_report()
        loc = self.loc(seg, 5)
        code = self.code(seg, 5)
        if not self.patient_ref:
            self.warn("no-patient", "RXA without a PID; immunization skipped", self.loc(seg))
            return
        r: dict[str, Any] = {"resourceType": "Immunization"}
        status = seg.v(20).upper()
        r["status"] = RXA_STATUS.get(status, "completed")
        if status and status not in RXA_STATUS:
            self.warn("unknown-code", f"unknown completion status {status!r} (table 0322)", self.loc(seg, 20))
        if code is None:
            self.warn("missing-field", "RXA-5 (administered code) is empty", loc)
        r["vaccineCode"] = code or {
            "coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "999", "display": "unknown"}]
        }
        self.subject(r, "patient")
        self.encounter(r)
        when = self.dtm(seg, 3)
        if when:
            r["occurrenceDateTime"] = when
        else:
            r["occurrenceString"] = seg.v(3) or "unknown"
            self.warn("missing-field", "RXA-3 (administration date) is missing or invalid", self.loc(seg, 3))
        amount = dt.number(seg.v(6))
        if amount is not None and amount != 999:
            r["doseQuantity"] = dt.quantity(self.ctx, amount, seg.f(7), self.loc(seg, 7))
        if seg.v(15):
            r["lotNumber"] = seg.v(15)
        exp = dt.fhir_date(self.ctx, seg.v(16), self.loc(seg, 16))
        if exp:
            r["expirationDate"] = exp
        mfr = seg.f(17)
        if mfr and (mfr.c(1) or mfr.c(2)):
            org = self.organization(mfr.c(2) or mfr.c(1), mfr.c(1), mfr.c(3))
            if org:
                r["manufacturer"] = {"reference": org}
        perf = []
        for i in range(1, len(seg.reps(10)) + 1):
            ref = self.practitioner(seg, 10, i)
            if ref:
                perf.append(
                    {
                        "function": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v2-0443",
                                    "code": "AP",
                                    "display": "Administering Provider",
                                }
                            ]
                        },
                        "actor": {"reference": ref},
                    }
                )
        if perf:
            r["performer"] = perf
        reason = self.code(seg, 18)
        if reason and r["status"] == "not-done":
            r["statusReason"] = reason
        info = seg.f(9)
        if info and info.c(1):
            src = info.c(1)
            r["primarySource"] = src == "00"
        orc = self.orc
        key: tuple[object, ...]
        if orc is not None and orc.v(3):
            key = ("filler", orc.f(3).c(2), orc.v(3))
            r["identifier"] = [
                {"system": self.source.system_for(orc.f(3).c(2) or None, "filler"), "value": orc.v(3)}
            ]
        else:
            key = (self.patient_key or self.record_key(), seg.v(3), dt.first_code(code), seg.v(15))
        self.rxa_ref = self.b.add(r, *key)
        self.note_target = r

    def rxr(self, seg: Segment) -> None:
        target = None
        if self.rxa_ref:
            target = self.b.get(self.rxa_ref)
            if target is not None:
                route = self.code(seg, 1)
                if route:
                    target["route"] = route
                site = self.code(seg, 2)
                if site:
                    target["site"] = site
            return
        if self.med_request is not None:
            route = self.code(seg, 1)
            if route:
                for d in self.med_request.setdefault("dosageInstruction", [{}]):
                    d["route"] = route

    # ------------------------------------------------------------------------------ pharmacy
    def rxe(self, seg: Segment) -> None:
        self.medication_request(
            seg,
            give_code=2,
            amount_min=3,
            units=5,
            dispense=10,
            dispense_units=11,
            refills=12,
            instructions=7,
        )

    def rxo(self, seg: Segment) -> None:
        if self.msg_type == "RDE" and any(s.name == "RXE" for s in self.msg.segments):
            return  # RDE: the RXE is the authoritative give; RXO is the original order
        self.medication_request(
            seg,
            give_code=1,
            amount_min=2,
            units=4,
            dispense=11,
            dispense_units=12,
            refills=13,
            instructions=7,
        )

    def medication_request(
        self,
        seg: Segment,
        *,
        give_code: int,
        amount_min: int,
        units: int,
        dispense: int,
        dispense_units: int,
        refills: int,
        instructions: int,
    ) -> None:
        code = self.code(seg, give_code)
        if not self.patient_ref:
            self.warn("no-patient", f"{seg.name} without a PID; medication request skipped", self.loc(seg))
            return
        if code is None:
            self.warn(
                "missing-field", f"{seg.name}-{give_code} (give code) is empty", self.loc(seg, give_code)
            )
        orc = self.orc
        r: dict[str, Any] = {"resourceType": "MedicationRequest", "intent": "order"}
        ctrl = orc.v(1).upper() if orc is not None else ""
        st = (
            ORDER_STATUS.get(orc.v(5).upper() if orc is not None else "")
            or ORDER_STATUS.get(ctrl)
            or "active"
        )
        r["status"] = {"revoked": "cancelled", "on-hold": "on-hold"}.get(
            st, st if st in ("active", "completed", "entered-in-error") else "active"
        )
        idents = self.order_identifiers(orc, None)
        if idents:
            r["identifier"] = idents
        r["medicationCodeableConcept"] = code or {"text": "unknown"}
        self.subject(r)
        self.encounter(r)
        if orc is not None:
            when = self.dtm(orc, 9)
            if when:
                r["authoredOn"] = when
            req = self.practitioner(orc, 12)
            if req:
                r["requester"] = {"reference": req}
        dosage: dict[str, Any] = {}
        instr = seg.f(instructions)
        if instr and instr.text():
            dosage["text"] = instr.text()
        amount = dt.number(seg.v(amount_min))
        if amount is not None:
            dosage["doseAndRate"] = [
                {"doseQuantity": dt.quantity(self.ctx, amount, seg.f(units), self.loc(seg, units))}
            ]
        if dosage:
            r["dosageInstruction"] = [dosage]
        disp: dict[str, Any] = {}
        n = dt.number(seg.v(dispense))
        if n is not None:
            disp["quantity"] = dt.quantity(self.ctx, n, seg.f(dispense_units), self.loc(seg, dispense_units))
        refill = seg.v(refills)
        if refill.isdigit():
            disp["numberOfRepeatsAllowed"] = int(refill)
        if disp:
            r["dispenseRequest"] = disp
        key = self.order_key(orc, None) or self.record_key(seg.name, seg.index)
        self.b.add(r, *key)
        self.med_request = r
        self.note_target = r

    # --------------------------------------------------------------------------- scheduling
    def sch(self, seg: Segment) -> None:
        r: dict[str, Any] = {"resourceType": "Appointment"}
        status = SCH_STATUS.get(seg.v(25, 1).upper()) or APPOINTMENT_STATUS.get(self.trigger, "booked")
        r["status"] = status
        idents = []
        for n, kind in ((1, "placer"), (2, "filler")):
            f = seg.f(n)
            if f and f.c(1):
                idents.append(
                    {
                        "system": self.source.system_for(f.c(3) or f.c(2) or None, f"appointment-{kind}"),
                        "value": f.c(1),
                    }
                )
        if idents:
            r["identifier"] = idents
        reason = self.code(seg, 7)
        if reason:
            r["reasonCode"] = [reason]
        typ = self.code(seg, 8)
        if typ:
            r["appointmentType"] = typ
        tq = seg.f(11)
        if tq:
            start = dt.fhir_instant(self.ctx, tq.c(4), self.loc(seg, 11, None, 4)) if tq.c(4) else None
            end = dt.fhir_instant(self.ctx, tq.c(5), self.loc(seg, 11, None, 5)) if tq.c(5) else None
            if start and end:
                r["start"], r["end"] = start, end
        dur = seg.v(9)
        if dur.isdigit() and seg.v(10, 1).lower() in ("min", "minutes", "m", ""):
            r["minutesDuration"] = int(dur)
        if seg.v(6):
            r["comment"] = seg.f(6).text()
        participants: list[dict[str, Any]] = []
        if self.patient_ref:
            participants.append({"actor": {"reference": self.patient_ref}, "status": "accepted"})
        for n in (12, 16, 20):
            for i in range(1, len(seg.reps(n)) + 1):
                ref = self.practitioner(seg, n, i)
                if ref:
                    participants.append({"actor": {"reference": ref}, "status": "accepted"})
        r["participant"] = participants
        key = (idents[-1]["system"], idents[-1]["value"]) if idents else self.record_key("SCH")
        self.b.add(r, *key)
        self.appointment = r
        self.note_target = r

    def _appt_participant(self, ref: str | None) -> None:
        if self.appointment is None or ref is None:
            return
        parts = self.appointment.setdefault("participant", [])
        if all(p.get("actor", {}).get("reference") != ref for p in parts):
            parts.append({"actor": {"reference": ref}, "status": "accepted"})

    def _appt_time(self, seg: Segment, start_n: int, dur_n: int) -> None:
        a = self.appointment
        if a is None or "start" in a:
            return
        start = dt.fhir_instant(self.ctx, seg.v(start_n), self.loc(seg, start_n)) if seg.v(start_n) else None
        if not start:
            return
        dur = seg.v(dur_n)
        unit = seg.v(dur_n + 1, 1).lower()
        if dur.isdigit():
            mult = {"min": 1, "m": 1, "minutes": 1, "h": 60, "hr": 60, "hours": 60, "s": 1 / 60, "": 1}.get(
                unit
            )
            if mult is not None:
                begin = datetime.fromisoformat(start.replace("Z", "+00:00"))
                end = begin + timedelta(minutes=int(dur) * mult)
                a["start"] = start
                a["end"] = end.isoformat(timespec="seconds").replace("+00:00", "Z")

    def ais(self, seg: Segment) -> None:
        if self.appointment is None:
            return
        svc = self.code(seg, 3)
        if svc:
            self.appointment.setdefault("serviceType", []).append(svc)
        self._appt_time(seg, 4, 7)

    def aip(self, seg: Segment) -> None:
        if self.appointment is None:
            return
        self._appt_participant(self.practitioner(seg, 3))
        self._appt_time(seg, 6, 9)

    def ail(self, seg: Segment) -> None:
        if self.appointment is None:
            return
        self._appt_participant(self.location(seg, 3))
        self._appt_time(seg, 6, 9)

    # -------------------------------------------------------------------------------- documents
    def txa_seg(self, seg: Segment) -> None:
        self.close_document()
        if not self.patient_ref:
            self.warn("no-patient", "TXA without a PID; document skipped", self.loc(seg))
            return
        r: dict[str, Any] = {"resourceType": "DocumentReference"}
        st = seg.v(17).upper()
        r["status"] = "entered-in-error" if st in ("CA",) else "current"
        doc_status = TXA_STATUS.get(st)
        if doc_status and doc_status != "entered-in-error":
            r["docStatus"] = doc_status
        typ = self.table_code(seg, 2, "0270")
        if typ:
            r["type"] = typ
        idents = []
        f12 = seg.f(12)
        if f12 and f12.c(1):
            system = self.source.system_for(f12.c(3) or f12.c(2) or None, "document")
            r["masterIdentifier"] = {"system": system, "value": f12.c(1)}
        for n in (14, 15, 16):
            f = seg.f(n)
            if f and f.c(1):
                idents.append(
                    {"system": self.source.system_for(f.c(3) or f.c(2) or None, "document"), "value": f.c(1)}
                )
        if idents:
            r["identifier"] = idents
        self.subject(r)
        when = seg.v(4) or seg.v(6) or seg.v(7)
        inst = dt.fhir_instant(self.ctx, when, self.loc(seg, 4)) if when else None
        if inst:
            r["date"] = inst
        authors = [
            {"reference": ref}
            for i in range(1, len(seg.reps(9)) + 1)
            if (ref := self.practitioner(seg, 9, i))
        ]
        if authors:
            r["author"] = authors
        auth = self.practitioner(seg, 22)
        if auth:
            r["authenticator"] = {"reference": auth}
        if self.encounter_ref:
            r["context"] = {"encounter": [{"reference": self.encounter_ref}]}
        if "masterIdentifier" in r:
            key: tuple[object, ...] = (r["masterIdentifier"]["system"], r["masterIdentifier"]["value"])
        else:
            key = self.record_key("TXA")
        self.txa = r
        self.txa_key = key
        self.txa_text = []

    def close_document(self) -> None:
        r = self.txa
        if r is None:
            return
        text = "\n".join(self.txa_text)
        att: dict[str, Any] = {"contentType": "text/plain; charset=utf-8"}
        if text:
            att["data"] = base64.b64encode(text.encode("utf-8")).decode("ascii")
        else:
            att["title"] = "no content in the message"
        content_type = r.get("type", {}).get("text") or dt.first_code(r.get("type"))
        if content_type and "title" not in att:
            att["title"] = content_type
        r["content"] = [{"attachment": att}]
        self.b.add(r, *self.txa_key)
        self.txa = None

    # -------------------------------------------------------------------------------- financial
    def ft1(self, seg: Segment) -> None:
        code = self.code(seg, 25) or self.code(seg, 7)
        if not self.patient_ref or code is None:
            self.unmapped.setdefault("FT1", []).append(seg)
            return
        r: dict[str, Any] = {"resourceType": "ChargeItem", "status": "billable", "code": code}
        self.subject(r)
        if self.encounter_ref:
            r["context"] = {"reference": self.encounter_ref}
        if seg.v(2):
            r["identifier"] = [{"system": self.source.system_for(None, "transaction"), "value": seg.v(2)}]
        when = dt.period(self.ctx, seg.v(4, 1), seg.v(4, 2), self.loc(seg, 4))
        if when:
            if "end" in when:
                r["occurrencePeriod"] = when
            else:
                r["occurrenceDateTime"] = when["start"]
        qty = dt.number(seg.v(10))
        if qty is not None:
            r["quantity"] = {"value": qty}
        price = dt.number(seg.v(11, 1)) or dt.number(seg.v(12, 1))
        if price is not None:
            r["priceOverride"] = (
                {"value": price, "currency": seg.v(11, 2) or "USD"}
                if len(seg.v(11, 2) or "USD") == 3
                else {"value": price}
            )
        entered = self.dtm(seg, 5)
        if entered:
            r["enteredDate"] = entered
        perf = [{"actor": {"reference": ref}} for ref in self.practitioners(seg, 20)]
        if perf:
            r["performer"] = perf
        diag = [c for i in range(1, len(seg.reps(19)) + 1) if (c := self.code(seg, 19, i))]
        if diag:
            r["reason"] = diag
        key = (
            (self.source.system_for(None, "transaction"), seg.v(2))
            if seg.v(2)
            else self.record_key("FT1", seg.v(1) or seg.index)
        )
        self.b.add(r, *key)
