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
from typing import Any

GIVEN_F = [
    "MARY",
    "PATRICIA",
    "JENNIFER",
    "LINDA",
    "ELIZABETH",
    "BARBARA",
    "SUSAN",
    "JESSICA",
    "SARAH",
    "KAREN",
    "NANCY",
    "LISA",
    "MARGARET",
    "SANDRA",
    "ASHLEY",
    "EMILY",
    "DONNA",
    "MICHELLE",
    "CAROL",
    "AMANDA",
]
GIVEN_M = [
    "JAMES",
    "ROBERT",
    "JOHN",
    "MICHAEL",
    "DAVID",
    "WILLIAM",
    "RICHARD",
    "JOSEPH",
    "THOMAS",
    "CHARLES",
    "CHRISTOPHER",
    "DANIEL",
    "MATTHEW",
    "ANTHONY",
    "MARK",
    "DONALD",
    "STEVEN",
    "PAUL",
    "ANDREW",
    "JOSHUA",
]
NICK = {
    "ELIZABETH": "LIZ",
    "WILLIAM": "BILL",
    "ROBERT": "BOB",
    "MARGARET": "PEGGY",
    "JOSEPH": "JOE",
    "MICHAEL": "MIKE",
    "JENNIFER": "JEN",
    "CHRISTOPHER": "CHRIS",
    "DANIEL": "DAN",
    "THOMAS": "TOM",
}
FAMILY = [
    "SMITH",
    "JOHNSON",
    "WILLIAMS",
    "BROWN",
    "JONES",
    "GARCIA",
    "MILLER",
    "DAVIS",
    "RODRIGUEZ",
    "MARTINEZ",
    "HERNANDEZ",
    "LOPEZ",
    "GONZALEZ",
    "WILSON",
    "ANDERSON",
    "THOMAS",
    "TAYLOR",
    "MOORE",
    "JACKSON",
    "MARTIN",
    "LEE",
    "PEREZ",
    "THOMPSON",
    "WHITE",
    "HARRIS",
    "SANCHEZ",
    "CLARK",
    "RAMIREZ",
    "LEWIS",
    "ROBINSON",
]
STREETS = [
    "MAIN ST",
    "OAK AVE",
    "PINE RD",
    "MAPLE DR",
    "CEDAR LN",
    "ELM ST",
    "LAKE VIEW RD",
    "HILL ST",
    "PARK AVE",
]
CITIES = [
    ("SPRINGFIELD", "IL", "62701"),
    ("PEORIA", "IL", "61602"),
    ("CHAMPAIGN", "IL", "61820"),
    ("DECATUR", "IL", "62521"),
    ("BLOOMINGTON", "IL", "61701"),
]
DOCTORS = [
    ("1001", "NGUYEN", "ANNA"),
    ("1002", "OKAFOR", "CHIDI"),
    ("1003", "SCHMIDT", "PETER"),
    ("1004", "PATEL", "RAVI"),
    ("1005", "KOWALSKI", "MARTA"),
]


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


# -- a population with realistic name and place frequencies (benchmarks) ----------------------------------
# The demo feed above draws from short lists (30 family names, 5 towns), which is fine for a demo of a
# few hundred patients but not for 100,000 people: every family name would be shared by ~3,300 people
# and every ZIP code by 20,000, which no real population shows (the commonest US surname, Smith, is
# ~0.8 %). population_person keeps those lists as the common head and adds a long tail built from
# syllables, drawn with Zipf-like weights, so that frequencies fall off as in census name tables.

_FAMILY_HEAD = [
    "BAR",
    "KEL",
    "MOR",
    "HAN",
    "WIL",
    "STE",
    "LAN",
    "DON",
    "FER",
    "GAL",
    "HOL",
    "MAR",
    "BRO",
    "CAR",
    "DAL",
    "ED",
    "FAR",
    "GRE",
    "HAR",
    "JAN",
    "KIR",
    "LIN",
    "MAC",
    "NOR",
    "OST",
    "PAR",
    "QUIN",
    "ROS",
    "SAL",
    "TOR",
    "VAN",
    "WES",
    "ZIM",
    "ABE",
    "BEL",
    "COR",
    "DUN",
    "ELL",
    "FOS",
    "GIL",
]
_FAMILY_MID = ["", "", "", "A", "E", "I", "O", "AN", "ER", "IN"]
_FAMILY_TAIL = [
    "RING",
    "TON",
    "SEN",
    "LEY",
    "MAN",
    "BERG",
    "FORD",
    "WELL",
    "WOOD",
    "SON",
    "STEIN",
    "ER",
    "ERS",
    "INS",
    "OWSKI",
    "ELLI",
    "EZ",
    "ARD",
    "ICK",
    "ETT",
    "OW",
    "LAND",
    "MORE",
    "STON",
    "HAM",
    "BY",
    "DALE",
    "FIELD",
    "HART",
    "KINS",
]
_GIVEN_HEAD = [
    "AL",
    "BRI",
    "CA",
    "DA",
    "E",
    "FE",
    "GA",
    "HA",
    "I",
    "JA",
    "KA",
    "LA",
    "MA",
    "NA",
    "O",
    "PE",
    "RA",
    "SA",
    "TA",
    "VA",
    "WIN",
    "ZE",
    "LU",
    "MI",
    "RO",
]
_GIVEN_TAIL_F = ["NA", "RA", "LIE", "LYN", "DRA", "NIA", "ELLE", "RIA", "SHA", "TTE"]
_GIVEN_TAIL_M = ["SON", "TON", "VIN", "RIS", "DEN", "RON", "MAR", "LEN", "CUS", "DRIC"]
_TOWN_TAIL = ["VILLE", "TON", " CITY", " FALLS", " GROVE", "BURG", " HEIGHTS", "FORD"]


def _zipf_names(names: list[str], rng: random.Random) -> tuple[list[str], list[float]]:
    names = sorted(set(names))
    rng.shuffle(names)
    return names, [1.0 / (rank + 10) for rank in range(len(names))]


def _population_tables() -> dict[str, tuple[list[Any], list[float]]]:
    rng = random.Random(20240501)  # fixed: the tables are part of the generator, not of a run
    family = [h + m + t for h in _FAMILY_HEAD for m in _FAMILY_MID for t in _FAMILY_TAIL]
    given_f = [h + t for h in _GIVEN_HEAD for t in _GIVEN_TAIL_F]
    given_m = [h + t for h in _GIVEN_HEAD for t in _GIVEN_TAIL_M]
    towns = sorted({h.title().upper() + t for h in _FAMILY_HEAD for t in _TOWN_TAIL})
    rng.shuffle(towns)
    zips = rng.sample(range(60001, 63000), 600)  # Illinois ZIP codes, 600 of them
    places = [(towns[i % len(towns)], "IL", f"{z:05d}") for i, z in enumerate(zips)] + list(CITIES)
    return {
        "family": _zipf_names(family, rng),
        "given_f": _zipf_names(given_f, rng),
        "given_m": _zipf_names(given_m, rng),
        "place": (places, [1.0 / (rank + 5) for rank in range(len(places))]),
    }


_TABLES: dict[str, tuple[list[Any], list[float]]] = {}


def _draw(rng: random.Random, table: str) -> Any:
    if not _TABLES:
        _TABLES.update(_population_tables())
    values, weights = _TABLES[table]
    return rng.choices(values, weights)[0]


def population_person(rng: random.Random) -> Person:
    """One person of a large synthetic population: a third of family names and two fifths of given
    names from the common head (the demo lists), the rest from a Zipf-weighted tail of about 9,600
    family and 500 given names; 605 towns/ZIP codes with Zipf-weighted sizes."""
    p = _person(rng)
    if rng.random() > 0.35:
        p.family = _draw(rng, "family")
    if rng.random() > 0.4:
        p.given = _draw(rng, "given_f" if p.sex == "F" else "given_m")
    p.city = _draw(rng, "place")
    return p


def population_noisy(p: Person, rng: random.Random) -> Person:
    """:func:`_noisy`, plus the errors registration clerks make: a one-letter typo in a name (4 %),
    day and month swapped in the birth date (2 %)."""
    q = _noisy(p, rng)
    r = rng.random()
    if r < 0.02:
        q.family = _typo(q.family, rng)
    elif r < 0.04:
        q.given = _typo(q.given, rng)
    elif r < 0.06 and int(q.dob[6:]) <= 12:
        q.dob = q.dob[:4] + q.dob[6:] + q.dob[4:6]
    return q


def _typo(s: str, rng: random.Random) -> str:
    if len(s) < 3:
        return s
    i = rng.randrange(1, len(s) - 1)
    return s[:i] + s[i + 1] + s[i] + s[i + 2 :] if rng.random() < 0.5 else s[:i] + s[i + 1 :]


def _esc(s: str) -> str:
    return (
        s.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


def adt_message(
    h: Hospital,
    trigger: str,
    control_id: str,
    when: datetime,
    mrn: str,
    p: Person,
    visit: str,
    patient_class: str,
    doctor: tuple[str, str, str],
    phone_style: int = 0,
) -> str:
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
        f"|{doctor[0]}^{doctor[1]}^{doctor[2]}^^^DR|||MED|||||||||{visit}^^^{h.facility}^VN|||||||||||||||||||||||||{admit}",
    ]
    if trigger == "A03":
        segs[-1] += f"|{(when + timedelta(days=2)).strftime('%Y%m%d%H%M%S')}-0600"
    return "\r".join(segs) + "\r"


def generate(
    n_people: int,
    *,
    hospitals: int = 2,
    overlap: float = 0.35,
    seed: int = 7,
    messages_per_patient: int = 2,
    start: datetime | None = None,
    max_messages: int | None = None,
) -> dict[str, list[str]]:
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
                    adt_message(
                        h,
                        trigger,
                        f"{h.mrn_prefix}{counters[h.org_id]:08d}",
                        when + timedelta(hours=m),
                        mrn,
                        recorded,
                        visit,
                        "I" if trigger in ("A01", "A03") else "O",
                        doctor,
                        phone_style=m % 2,
                    )
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
