"""Patient builders and a small noisy population for the MPI tests."""

from __future__ import annotations

import random
from typing import Any

SSN = "http://hl7.org/fhir/sid/us-ssn"


def patient(
    pid: str,
    given: str | None = None,
    family: str | None = None,
    birth: str | None = None,
    gender: str | None = None,
    *,
    line: str | None = None,
    city: str | None = None,
    postal: str | None = None,
    phone: str | None = None,
    ssn: str | None = None,
    mrn: str | None = None,
) -> dict[str, Any]:
    p: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    if given:
        name["given"] = [given]
    if name:
        p["name"] = [name]
    if birth:
        p["birthDate"] = birth
    if gender:
        p["gender"] = gender
    addr: dict[str, Any] = {}
    if line:
        addr["line"] = [line]
    if city:
        addr["city"] = city
    if postal:
        addr["postalCode"] = postal
    if addr:
        p["address"] = [addr]
    if phone:
        p["telecom"] = [{"system": "phone", "value": phone}]
    ids = []
    if ssn:
        ids.append({"system": SSN, "value": ssn})
    if mrn:
        ids.append({"system": "urn:example:mrn", "value": mrn})
    if ids:
        p["identifier"] = ids
    return p


GIVEN = [
    "alice",
    "bruno",
    "carmen",
    "dmitri",
    "elena",
    "farid",
    "greta",
    "hiro",
    "ines",
    "jonas",
    "kasia",
    "liam",
    "maya",
    "nils",
    "olga",
    "pavel",
    "quinn",
    "rosa",
    "sven",
    "tara",
    "umar",
    "vera",
    "wim",
    "xena",
]
FAMILY = [
    "andersen",
    "baptiste",
    "castellano",
    "dimitrov",
    "eriksson",
    "fontaine",
    "gallagher",
    "hoffmann",
    "ivanova",
    "jablonski",
    "kowalczyk",
    "lindqvist",
    "moreau",
    "novak",
    "oconnell",
    "petrovic",
    "quintero",
    "rasmussen",
    "schneider",
    "takahashi",
    "ulrich",
    "vasquez",
    "weber",
    "yilmaz",
]


def _typo(rng: random.Random, s: str) -> str:
    i = rng.randrange(1, len(s) - 1)
    return s[:i] + s[i + 1] + s[i] + s[i + 2 :]


def population(people: int, seed: int = 3) -> tuple[list[tuple[str, dict[str, Any]]], set[frozenset[str]]]:
    """``people`` persons, ~half seen twice (second copy with one typo); returns records and true pairs."""
    rng = random.Random(seed)
    recs: list[tuple[str, dict[str, Any]]] = []
    truth: set[frozenset[str]] = set()
    for n in range(people):
        g, f = rng.choice(GIVEN), rng.choice(FAMILY) + rng.choice(["", "son", "ek", "ini"])
        birth = f"{rng.randint(1930, 2015)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        sex = rng.choice(["male", "female"])
        line = f"{rng.randint(1, 200)} {rng.choice(['elm', 'oak', 'main', 'lake', 'hill'])} street"
        postal = str(rng.randint(10000, 99999))
        recs.append(("org-a", patient(f"a{n}", g, f, birth, sex, line=line, city="metro", postal=postal)))
        if rng.random() < 0.5:
            g2, f2 = (_typo(rng, g), f) if rng.random() < 0.5 else (g, _typo(rng, f))
            recs.append(
                ("org-b", patient(f"b{n}", g2, f2, birth, sex, line=line, city="metro", postal=postal))
            )
            truth.add(frozenset((f"a{n}", f"b{n}")))
    return recs, truth
