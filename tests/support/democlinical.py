"""A clinician's view of the demo's shared patient: synthetic HL7 v2 clinical feeds (our own data, no PHI).

The ADT feeds of :mod:`tests.support.demodata` give two hospitals with overlapping patients; this
module adds, for the shared demo patient (the one the demo's Consent names, by SSN):

* lab results (ORU^R01) from st-mary: four tests on four dates, with OBX-7 reference ranges and OBX-8
  flags, some out of range (H/L);
* one panel from riverside at the same collection time as one of st-mary's: the glucose result is the
  same (one fact both hospitals sent, merged by ``$everything``), the creatinine is not (a value the
  hospitals disagree on);
* allergies (AL1, penicillin severe: SV) and problems (DG1) in ADT^A08 updates, medications (RDE^O11),
  immunizations (VXU^V04) and documents (MDM^T02: st-mary's discharge summary, riverside's
  consultation note) from each hospital;
* a patient at riverside whose family name has a typo (with other registration noise, below), who the
  MPI scores as a POSSIBLE_MATCH of their st-mary record;
* :func:`late_feeds`: one st-mary result that the demo ingests after the ledger's checkpoint (from
  st-mary, so that the demo's st-mary clinician sees it: the demo's Consent withholds riverside's record
  from st-mary).

Deterministic. ``python -m tests.support.democlinical`` writes the files under ``deploy/demo/``
(``clinical/<org>/clinical-0001.hl7`` and ``late/<org>/late-0001.hl7``), beside the ADT feeds of
``data/``, which it leaves as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from tests.support.demodata import HOSPITALS, Hospital

ST_MARY, RIVERSIDE = HOSPITALS[0], HOSPITALS[1]
OFFSET = "-0600"


@dataclass(frozen=True)
class DemoPatient:
    """A patient as one hospital registered them (the values of the shipped ADT feeds)."""

    mrn: str
    ssn: str | None
    family: str
    given: str
    middle: str
    dob: str
    sex: str
    street: str
    city: str
    zip: str
    phone: str

    def pid(self, h: Hospital) -> str:
        ids = f"{self.mrn}^^^{h.facility}^MR" + (f"~{self.ssn}^^^SSA^SS" if self.ssn else "")
        return (
            f"PID|1||{ids}||{self.family}^{self.given}^{self.middle}||{self.dob}|{self.sex}|||"
            f"{self.street}^^{self.city}^IL^{self.zip}^USA^H||{self.phone}^PRN^PH||||||{self.ssn or ''}"
        )


#: the shared demo patient (SSN 137278222, named by deploy/demo/consents), as each hospital has them
CLARK = {
    ST_MARY.org_id: DemoPatient(
        "SM100056",
        "137278222",
        "CLARK",
        "PAUL",
        "A",
        "19710712",
        "M",
        "9122 HILL ST",
        "PEORIA",
        "61602",
        "2526246105",
    ),
    RIVERSIDE.org_id: DemoPatient(
        "RV100056",
        "137278222",
        "CLARK",
        "PAUL",
        "A",
        "19710712",
        "M",
        "9122 HILL ST",
        "PEORIA",
        "61602",
        "2526246105",
    ),
}
#: st-mary's record of a patient seen only there (shipped ADT feed), and riverside's registration of the
#: same man: a typo in the family name (WHTIE), the nickname STEVE, a typo in the birth date (28 for 18),
#: no SSN, and a new address and phone. A name typo alone still links (the birth date, sex and town
#: agree: MATCH); with these the MPI scores the pair about 0.83, between its POSSIBLE_MATCH (0.30) and
#: MATCH (0.95) thresholds, so it waits in the review queue (docs/mpi.md)
TYPO_ORIGINAL = DemoPatient(
    "SM100001",
    "456557166",
    "WHITE",
    "STEVEN",
    "C",
    "19780218",
    "M",
    "8816 CEDAR LN",
    "CHAMPAIGN",
    "61820",
    "6683446062",
)
TYPO = DemoPatient(
    "RV900001", None, "WHTIE", "STEVE", "", "19780228", "M", "41 ELM ST", "CHAMPAIGN", "61820", "2175550143"
)

#: (LOINC, name, unit, reference range)
GLUCOSE = ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", "70-99")
POTASSIUM = ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", "3.5-5.1")
CREATININE = ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "0.7-1.3")
HEMOGLOBIN = ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", "13.5-17.5")
PANEL = ("24323-8", "Comprehensive metabolic 2000 panel - Serum or Plasma")

#: st-mary's results: collection time -> value per test (the flag follows from the range)
ST_MARY_LABS = {
    "20260112083000": {GLUCOSE: "96", POTASSIUM: "4.2", CREATININE: "1.0", HEMOGLOBIN: "14.2"},
    "20260209083000": {GLUCOSE: "118", POTASSIUM: "3.3", CREATININE: "1.1", HEMOGLOBIN: "13.1"},
    "20260309083000": {GLUCOSE: "104", POTASSIUM: "4.0", CREATININE: "1.4", HEMOGLOBIN: "13.8"},
    "20260406083000": {GLUCOSE: "92", POTASSIUM: "4.4", CREATININE: "1.2", HEMOGLOBIN: "14.0"},
}
#: riverside's panel of the same specimen as st-mary's third: the glucose agrees, the creatinine does not
SHARED_TIME = "20260309083000"
RIVERSIDE_LABS = {SHARED_TIME: {GLUCOSE: "104", CREATININE: "1.2"}}
#: the result the demo ingests after the ledger's checkpoint
LATE_TIME = "20260420083000"
LATE_LABS = {LATE_TIME: {POTASSIUM: "5.6"}}


def flag(value: str, ref: str) -> str:
    """OBX-8 for ``value`` against a ``low-high`` range: H, L or N."""
    low, high = (float(x) for x in ref.split("-"))
    v = float(value)
    return "H" if v > high else "L" if v < low else "N"


def _msh(h: Hospital, app: str, ts: str, mtype: str, control: str) -> str:
    return f"MSH|^~\\&|{app}|{h.facility}|FHIRBRIDGE|HIE|{ts}{OFFSET}||{mtype}|{control}|P|2.5.1"


def _pv1(h: Hospital, visit: str, admit: str) -> str:
    """A clinic visit of one hour that has ended (PV1-44 admit, PV1-45 discharge)."""
    discharge = (datetime.strptime(admit, "%Y%m%d%H%M%S") + timedelta(hours=1)).strftime("%Y%m%d%H%M%S")
    return (
        f"PV1|1|O|CLINIC^101^A^{h.facility}||||1001^NGUYEN^ANNA^^^DR|||MED|||||||||{visit}^^^{h.facility}^VN"
        f"|||||||||||||||||||||||||{admit}{OFFSET}|{discharge}{OFFSET}"
    )


def oru(
    h: Hospital, p: DemoPatient, labs: dict[str, dict[tuple[str, str, str, str], str]], n: int
) -> list[str]:
    """One ORU^R01 per collection time, one OBX per test with its range (OBX-7) and flag (OBX-8)."""
    out = []
    for k, (ts, results) in enumerate(sorted(labs.items()), start=n):
        order = f"{h.mrn_prefix}LAB{k:04d}"
        segs = [
            _msh(h, f"{h.facility}_LAB", ts, "ORU^R01^ORU_R01", f"{h.mrn_prefix}L{k:07d}"),
            p.pid(h),
            f"ORC|RE|{order}^{h.facility}|{order}F^{h.facility}||CM||||{ts}{OFFSET}|||1001^NGUYEN^ANNA^^^DR",
            f"OBR|1|{order}^{h.facility}|{order}F^{h.facility}|{PANEL[0]}^{PANEL[1]}^LN|||{ts}{OFFSET}|||||||||"
            f"1001^NGUYEN^ANNA^^^DR||||||{ts}{OFFSET}|||F",
        ]
        for i, ((code, name, unit, ref), value) in enumerate(results.items(), start=1):
            segs.append(
                f"OBX|{i}|NM|{code}^{name}^LN||{value}|{unit}|{ref}|{flag(value, ref)}|||F|||{ts}{OFFSET}"
            )
        out.append("\r".join(segs) + "\r")
    return out


def chart_update(
    h: Hospital, p: DemoPatient, ts: str, control: str, allergies: list[str], problems: list[str]
) -> str:
    """An ADT^A08 (update patient information) carrying the patient's allergies (AL1) and problems (DG1)."""
    segs = [
        _msh(h, h.app, ts, "ADT^A08^ADT_A01", control),
        f"EVN|A08|{ts}{OFFSET}",
        p.pid(h),
        _pv1(h, f"V{control}", ts),
    ]
    segs += [f"AL1|{i}|{a}" for i, a in enumerate(allergies, start=1)]
    segs += [f"DG1|{i}||{d}" for i, d in enumerate(problems, start=1)]
    return "\r".join(segs) + "\r"


def medication_order(
    h: Hospital, p: DemoPatient, ts: str, control: str, order: str, drug: str, dose: str
) -> str:
    """An RDE^O11 pharmacy order (RXE) for ``drug`` (``code^name^RXNORM``)."""
    return (
        "\r".join(
            [
                _msh(h, f"{h.facility}_RX", ts, "RDE^O11^RDE_O11", control),
                p.pid(h),
                f"ORC|NW|{order}^{h.facility}|||IP||||{ts}{OFFSET}|||1001^NGUYEN^ANNA^^^DR",
                f"RXE|1^BID^HL70335|{drug}|{dose}||mg|TAB^Tablet^HL70292|^Take by mouth with meals|||60|{{tablet}}|3",
            ]
        )
        + "\r"
    )


def vaccination(h: Hospital, p: DemoPatient, ts: str, control: str, vaccine: str, lot: str) -> str:
    """A VXU^V04 recording one administered vaccine (RXA, RXR)."""
    return (
        "\r".join(
            [
                _msh(h, f"{h.facility}_IZ", ts, "VXU^V04^VXU_V04", control),
                p.pid(h),
                f"ORC|RE||{control}^{h.facility}",
                f"RXA|0|1|{ts}{OFFSET}||{vaccine}|0.5|mL^mL^UCUM||00^New immunization record^NIP001|"
                f"1001^NGUYEN^ANNA^^^DR|||||{lot}|20271231|PMC^Sanofi Pasteur^MVX|||CP|A",
                "RXR|C28161^Intramuscular^NCIT|LD^Left Deltoid^HL70163",
            ]
        )
        + "\r"
    )


def document(
    h: Hospital, p: DemoPatient, ts: str, control: str, doc_id: str, kind: str, lines: list[str]
) -> str:
    """An MDM^T02 carrying a signed text document (TXA; the OBX lines are its text)."""
    segs = [
        _msh(h, f"{h.facility}_MDM", ts, "MDM^T02^MDM_T02", control),
        f"EVN|T02|{ts}{OFFSET}",
        p.pid(h),
        _pv1(h, f"V{control}", ts),
        f"TXA|1|{kind}|TX|{ts}{OFFSET}|1001^NGUYEN^ANNA^^^DR||||1001^NGUYEN^ANNA^^^DR|||{doc_id}^{h.facility}|||||AU",
    ]
    segs += [
        f"OBX|{i}|TX|18842-5^Discharge summary^LN||{line}||||||F" for i, line in enumerate(lines, start=1)
    ]
    return "\r".join(segs) + "\r"


def registration(h: Hospital, p: DemoPatient, ts: str, control: str) -> str:
    """An ADT^A04 (register an outpatient)."""
    return (
        "\r".join(
            [
                _msh(h, h.app, ts, "ADT^A04^ADT_A01", control),
                f"EVN|A04|{ts}{OFFSET}",
                p.pid(h),
                _pv1(h, f"V{control}", ts),
            ]
        )
        + "\r"
    )


PENICILLIN = "DA|7980^Penicillin G^RXNORM|SV|Anaphylaxis~Hives|20150304"
LATEX = "EA|111088007^Latex^SCT|MO|Contact dermatitis"
PEANUT = "FA|256349002^Peanut^SCT|MI|Itching of mouth"
DIABETES = "E11.9^Type 2 diabetes mellitus without complications^I10|||20260112083000-0600|F"
HYPERTENSION = "I10^Essential (primary) hypertension^I10|||20260209083000-0600|F"
METFORMIN = "861007^Metformin hydrochloride 500 MG Oral Tablet^RXNORM"
LISINOPRIL = "314076^Lisinopril 10 MG Oral Tablet^RXNORM"
FLU = "150^Influenza, injectable, quadrivalent, preservative free^CVX"
TDAP = "115^Tdap^CVX"


def clinical_feeds() -> dict[str, list[str]]:
    """The clinical messages per hospital org id (ingested with the ADT feeds)."""
    sm, rv = CLARK[ST_MARY.org_id], CLARK[RIVERSIDE.org_id]
    st_mary = [
        chart_update(ST_MARY, sm, "20260112090000", "SMC0000001", [PENICILLIN, LATEX], [DIABETES]),
        chart_update(
            ST_MARY, sm, "20260209090000", "SMC0000002", [PENICILLIN, LATEX], [DIABETES, HYPERTENSION]
        ),
        *oru(ST_MARY, sm, ST_MARY_LABS, 1),
        medication_order(ST_MARY, sm, "20260112093000", "SMC0000003", "SMRX0001", METFORMIN, "500"),
        medication_order(ST_MARY, sm, "20260209093000", "SMC0000004", "SMRX0002", LISINOPRIL, "10"),
        vaccination(ST_MARY, sm, "20251015100000", "SMC0000005", FLU, "FLU2025A"),
        document(
            ST_MARY,
            sm,
            "20260309120000",
            "SMC0000006",
            "SMDOC0001",
            "DS^Discharge summary^HL70270",
            [
                "Synthetic demo document: no real patient.",
                "Seen for follow-up of type 2 diabetes and hypertension.",
                "Creatinine 1.4 mg/dL (H): repeat in four weeks; metformin continued.",
            ],
        ),
    ]
    riverside = [
        chart_update(RIVERSIDE, rv, "20260301090000", "RVC0000001", [PENICILLIN, PEANUT], [DIABETES]),
        *oru(RIVERSIDE, rv, RIVERSIDE_LABS, 1),
        medication_order(RIVERSIDE, rv, "20260301093000", "RVC0000002", "RVRX0001", METFORMIN, "500"),
        vaccination(RIVERSIDE, rv, "20240611100000", "RVC0000003", TDAP, "TDAP2024B"),
        document(
            RIVERSIDE,
            rv,
            "20260301120000",
            "RVC0000004",
            "RVDOC0001",
            "CN^Consultation note^HL70270",
            [
                "Synthetic demo document: no real patient.",
                "Endocrinology consultation: diabetes well controlled; peanut allergy reported.",
            ],
        ),
        registration(RIVERSIDE, TYPO, "20260315101500", "RVC0000005"),
    ]
    return {ST_MARY.org_id: st_mary, RIVERSIDE.org_id: riverside}


def late_feeds() -> dict[str, list[str]]:
    """The message the demo ingests after the ledger's checkpoint (so its entry is pending)."""
    return {ST_MARY.org_id: oru(ST_MARY, CLARK[ST_MARY.org_id], LATE_LABS, 90)}


def write(demo_dir: Path) -> list[Path]:
    """Write :func:`clinical_feeds` under ``demo_dir/clinical`` and :func:`late_feeds` under ``demo_dir/late``."""
    written = []
    for sub, name, feeds in (("clinical", "clinical", clinical_feeds()), ("late", "late", late_feeds())):
        for org, messages in feeds.items():
            d = demo_dir / sub / org
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{name}-0001.hl7"
            path.write_text("\n".join(messages) + "\n", encoding="utf-8")
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write(Path(__file__).resolve().parents[2] / "deploy" / "demo"):
        print(p)
