"""Synthetic HL7 v2 ADT feeds from several hospitals that share some patients (our own data, no PHI).

Used for the shipped demo files (``deploy/demo/data``) and by the benchmarks. Deterministic for a given
seed. Patients seen at more than one hospital share their SSN; their demographics carry realistic noise
(a nickname, a dropped middle initial, a moved address, a reformatted phone).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

GIVEN_F = ["MARY", "PATRICIA", "JENNIFER", "LINDA", "ELIZABETH", "BARBARA", "SUSAN", "JESSICA", "SARAH", "KAREN",
           "NANCY", "LISA", "MARGARET", "SANDRA", "ASHLEY", "EMILY", "DONNA", "MICHELLE", "CAROL", "AMANDA"]
GIVEN_M = ["JAMES", "ROBERT", "JOHN", "MICHAEL", "DAVID", "WILLIAM", "RICHARD", "JOSEPH", "THOMAS", "CHARLES",
           "CHRISTOPHER", "DANIEL", "MATTHEW", "ANTHONY", "MARK", "DONALD", "STEVEN", "PAUL", "ANDREW", "JOSHUA"]
NICK = {"ELIZABETH": "LIZ", "WILLIAM": "BILL", "ROBERT": "BOB", "MARGARET": "PEGGY", "JOSEPH": "JOE",
        "MICHAEL": "MIKE", "JENNIFER": "JEN", "CHRISTOPHER": "CHRIS", "DANIEL": "DAN", "THOMAS": "TOM"}
FAMILY = ["SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ", "MARTINEZ",
          "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR", "MOORE", "JACKSON", "MARTIN",
          "LEE", "PEREZ", "THOMPSON", "WHITE", "HARRIS", "SANCHEZ", "CLARK", "RAMIREZ", "LEWIS", "ROBINSON"]
STREETS = ["MAIN ST", "OAK AVE", "PINE RD", "MAPLE DR", "CEDAR LN", "ELM ST", "LAKE VIEW RD", "HILL ST", "PARK AVE"]
CITIES = [("SPRINGFIELD", "IL", "62701"), ("PEORIA", "IL", "61602"), ("CHAMPAIGN", "IL", "61820"),
          ("DECATUR", "IL", "62521"), ("BLOOMINGTON", "IL", "61701")]
DOCTORS = [("1001", "NGUYEN", "ANNA"), ("1002", "OKAFOR", "CHIDI"), ("1003", "SCHMIDT", "PETER"),
           ("1004", "PATEL", "RAVI"), ("1005", "KOWALSKI", "MARTA")]


@dataclass(frozen=True)
class Hospital:
    org_id: str
    app: str
    facility: str
    mrn_prefix: str


HOSPITALS = (
    Hospital("st-mary", "STMARY_ADT", "STMARY", "SM"),
    Hospital("riverside", "RIVERSIDE_EPIC", "RIVERSIDE", "RV"),
    Hospital("lakeside", "LAKESIDE_CERNER", "LAKESIDE", "LK"),
)


@dataclass
class Person:
    ssn: str
    family: str
    given: str
    middle: str
    sex: str
    dob: str
    street: str
    city: tuple[str, str, str]
    phone: str


def _person(rng: random.Random) -> Person:
    sex = rng.choice("FM")
    return Person(
        ssn=f"{rng.randint(100, 899):03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}",
        family=rng.choice(FAMILY),
        given=rng.choice(GIVEN_F if sex == "F" else GIVEN_M),
        middle=rng.choice("ABCDEFGHJKLMNPRSTW"),
        sex=sex,
        dob=f"{rng.randint(1935, 2015)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
        street=f"{rng.randint(1, 9999)} {rng.choice(STREETS)}",
        city=rng.choice(CITIES),
        phone=f"{rng.randint(200, 989)}{rng.randint(200, 999)}{rng.randint(1000, 9999)}",
    )


def _noisy(p: Person, rng: random.Random) -> Person:
    """The same person as another hospital recorded them."""
    q = Person(**vars(p))
    r = rng.random()
    if r < 0.2 and p.given in NICK:
        q.given = NICK[p.given]
    elif r < 0.35:
        q.middle = ""
    elif r < 0.45:
        q.street = f"{rng.randint(1, 9999)} {rng.choice(STREETS)}"
    if rng.random() < 0.3:
        q.phone = p.phone  # formatting differs in the message, not the number
    return q


def _esc(s: str) -> str:
    return s.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\").replace("~", "\\R\\")


def adt_message(h: Hospital, trigger: str, control_id: str, when: datetime, mrn: str, p: Person, visit: str,
                patient_class: str, doctor: tuple[str, str, str], phone_style: int = 0) -> str:
    ts = when.strftime("%Y%m%d%H%M%S") + "-0600"
    admit = ts
    city, state, zipc = p.city
    phone = f"({p.phone[:3]}){p.phone[3:6]}-{p.phone[6:]}" if phone_style else p.phone
    struct = {"A01": "ADT_A01", "A04": "ADT_A01", "A08": "ADT_A01", "A03": "ADT_A03"}[trigger]
    segs = [
        f"MSH|^~\\&|{h.app}|{h.facility}|FHIRBRIDGE|HIE|{ts}||ADT^{trigger}^{struct}|{control_id}|P|2.5.1",
        f"EVN|{trigger}|{ts}",
        f"PID|1||{mrn}^^^{h.facility}^MR~{p.ssn.replace('-', '')}^^^SSA^SS||{_esc(p.family)}^{_esc(p.given)}^{p.middle}||"
        f"{p.dob}|{p.sex}|||{_esc(p.street)}^^{city}^{state}^{zipc}^USA^H||{phone}^PRN^PH|||||{visit}|{p.ssn.replace('-', '')}",
        f"PV1|1|{patient_class}|{'WARD' if patient_class == 'I' else 'CLINIC'}^{100 + int(visit[-2:]) % 50}^A^{h.facility}|||"
        f"|{doctor[0]}^{doctor[1]}^{doctor[2]}^^^DR|||MED||||||||{visit}^^^{h.facility}^VN|||||||||||||||||||||||||{admit}",
    ]
    if trigger == "A03":
        segs[-1] += f"|{(when + timedelta(days=2)).strftime('%Y%m%d%H%M%S')}-0600"
    return "\r".join(segs) + "\r"


def generate(n_people: int, *, hospitals: int = 2, overlap: float = 0.35, seed: int = 7,
             messages_per_patient: int = 2, start: datetime | None = None,
             max_messages: int | None = None) -> dict[str, list[str]]:
    """ADT messages per hospital org id. ``overlap`` of the people are seen by more than one hospital.

    ``max_messages`` stops the feed at exactly that many messages in all.
    """
    rng = random.Random(seed)
    start = start or datetime(2026, 3, 2, 8, 0, 0)
    hs = HOSPITALS[:hospitals]
    out: dict[str, list[str]] = {h.org_id: [] for h in hs}
    counters = {h.org_id: 0 for h in hs}
    for i in range(n_people):
        person = _person(rng)
        seen_by = [rng.choice(hs)]
        if rng.random() < overlap:
            seen_by = rng.sample(list(hs), k=min(len(hs), rng.choice([2, 2, 3])))
        for h in seen_by:
            recorded = person if h is seen_by[0] else _noisy(person, rng)
            mrn = f"{h.mrn_prefix}{100000 + i}"
            when = start + timedelta(minutes=rng.randint(0, 60 * 24 * 60))
            doctor = rng.choice(DOCTORS)
            for m in range(messages_per_patient):
                if max_messages is not None and sum(counters.values()) >= max_messages:
                    return out
                counters[h.org_id] += 1
                trigger = ("A04", "A08", "A03")[m % 3] if m else rng.choice(["A01", "A04"])
                visit = f"V{h.mrn_prefix}{i:06d}{m // 3:02d}"
                out[h.org_id].append(
                    adt_message(h, trigger, f"{h.mrn_prefix}{counters[h.org_id]:08d}", when + timedelta(hours=m), mrn,
                                recorded, visit, "I" if trigger in ("A01", "A03") else "O", doctor, phone_style=m % 2)
                )
    return out


def write_files(out_dir: Path, feeds: dict[str, list[str]], per_file: int = 50) -> dict[str, list[Path]]:
    """Write each hospital's messages as ER7 files of ``per_file`` messages (``\\r`` segments, ``\\n`` between)."""
    written: dict[str, list[Path]] = {}
    for org, messages in feeds.items():
        d = out_dir / org
        d.mkdir(parents=True, exist_ok=True)
        written[org] = []
        for k in range(0, len(messages), per_file):
            path = d / f"adt-{k // per_file + 1:04d}.hl7"
            path.write_text("\n".join(messages[k : k + per_file]) + "\n", encoding="utf-8")
            written[org].append(path)
    return written


def iter_messages(feeds: dict[str, list[str]]) -> Iterator[tuple[str, str]]:
    for org, msgs in feeds.items():
        for m in msgs:
            yield org, m
