"""Synthetic lab results (HL7 v2 ORU^R01) for one patient, our own data with no PHI.

The client interop tests need a patient with many Observations of one code, each at its own instant,
so that a search sorted by date has exactly one right order. Every message is one OBR panel with a
glucose and a potassium OBX; :func:`lab_messages` returns the messages and the glucose result instants,
which the tests use as the truth the server's answers are compared with.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from tests.support.demodata import HOSPITALS, Hospital

GLUCOSE = ("2345-7", "Glucose [Mass/volume] in Serum or Plasma")
POTASSIUM = ("2823-3", "Potassium [Moles/volume] in Serum or Plasma")
LOINC = "http://loinc.org"
CST = timezone(timedelta(hours=-6))


@dataclass(frozen=True)
class LabPatient:
    """The patient the clients read: seen by one hospital only, so no MPI merge changes their record."""

    hospital: Hospital
    mrn: str
    ssn: str
    family: str
    given: str
    dob: str
    sex: str

    def pid(self) -> str:
        return (
            f"PID|1||{self.mrn}^^^{self.hospital.facility}^MR~{self.ssn}^^^SSA^SS||{self.family}^{self.given}||"
            f"{self.dob}|{self.sex}|||1 LAB WAY^^SPRINGFIELD^IL^62701^USA^H"
        )


PATIENT = LabPatient(HOSPITALS[0], "SM990001", "999001234", "CLIENTTEST", "TESSA", "19700101", "F")
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"


def _ts(when: datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S%z")


def adt_registration(patient: LabPatient = PATIENT) -> str:
    """An A04 (register an outpatient) for ``patient``."""
    ts = "20260102080000-0600"
    h = patient.hospital
    return "\r".join(
        [
            f"MSH|^~\\&|{h.app}|{h.facility}|FHIRBRIDGE|HIE|{ts}||ADT^A04^ADT_A01|LABREG0001|P|2.5.1",
            f"EVN|A04|{ts}",
            patient.pid(),
            f"PV1|1|O|CLINIC^101^A^{h.facility}||||1001^NGUYEN^ANNA^^^DR|||MED|||||||||VLAB000001^^^{h.facility}^VN",
        ]
    )


def lab_messages(instants: list[datetime], *, first_control: int, patient: LabPatient = PATIENT) -> list[str]:
    """One ORU^R01 per instant: an OBR panel with glucose and potassium results taken at that instant.

    Control ids and order numbers count from ``first_control``, so that batches never share an order
    (which would update the earlier Observations instead of adding new ones).
    """
    h = patient.hospital
    out = []
    for k, when in enumerate(instants, start=first_control):
        ts = _ts(when)
        glucose = 70 + (k * 7) % 60
        potassium = 3.5 + (k % 15) / 10
        out.append(
            "\r".join(
                [
                    f"MSH|^~\\&|STMARY_LAB|{h.facility}|FHIRBRIDGE|HIE|{ts}||ORU^R01^ORU_R01|LAB{k:06d}|P|2.5.1",
                    patient.pid(),
                    f"OBR|1|ORD{k:06d}^{h.facility}|FIL{k:06d}^{h.facility}|24323-8^Metabolic panel^LN|||{ts}",
                    f"OBX|1|NM|{GLUCOSE[0]}^{GLUCOSE[1]}^LN||{glucose}|mg/dL|70-99|N|||F|||{ts}",
                    f"OBX|2|NM|{POTASSIUM[0]}^{POTASSIUM[1]}^LN||{potassium:.1f}|mmol/L|3.5-5.1|N|||F|||{ts}",
                ]
            )
        )
    return out


#: the results ingested before any client runs: one every 1 day 37 minutes from 5 January 2026
INITIAL = [datetime(2026, 1, 5, 7, 0, tzinfo=CST) + k * timedelta(days=1, minutes=37) for k in range(48)]
#: results that arrive while a client pages: between the initial ones, and newer than all of them
LATE = [INITIAL[k] + timedelta(hours=5) for k in range(0, 48, 4)] + [
    INITIAL[-1] + timedelta(days=d) for d in (2, 3, 4)
]
