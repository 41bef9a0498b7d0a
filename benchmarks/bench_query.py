"""Query-service benchmark (issue 7): $everything latency on a 2M-resource population, SQLite and PostgreSQL.

Population: N people (default 100,000) seen by 3 providers with overlapping patients and demographic
noise (tests.support.demodata.population_person: census-like name and ZIP frequencies; population_noisy:
nicknames, dropped middle initials, moved addresses, typos, day/month swaps), about 20 resources per
patient record (encounters, observations, conditions),
so about 2,000,000 resources. One "heavy" person has about 1,000 resources over 3 linked records,
with results duplicated across sources (the de-duplication path).

Loading goes **directly into the index store and the MPI** (IndexStore.apply, PersonIndex.upsert_patients),
not through Kafka, for speed; the pipeline's own throughput is measured by bench_e2e.py.

Reported per backend:
* load rate (resources/s) and MPI linking rate (records/s, incremental PersonIndex, batches of 1,000).
  Linking is timed after the load has settled (its writes flushed; on PostgreSQL the database vacuumed,
  analysed and checkpointed, as after any bulk load), so that it measures linking, not the tail of the
  load;
* $everything over HTTP (aiohttp, loopback) for the heavy person, _count=1000: p50/p99, with
  authorization + consent + audit (a clinician's token; the heavy person's Consent withholds one kind of
  Observation, so every resource is evaluated; each access's AuditEvents committed before the answer)
  against the same service with none of them, in alternating blocks, and the p99 ratio (goal <= 1.3);
* $everything for random linked persons: p50/p99;
* the raw SQL floor: the same rows with one query (SELECT body ... WHERE patient_id IN (...)), p50/p99,
  and the ratio;
* the linking floor: the same matcher over the same records in one in-memory pass (the batch linker
  of ``fhirbridge mpi link``: no database, no persons, no history), records/s, and the ratio of the
  incremental index's rate to it, measured right after the incremental linking;
* a machine check before and after linking: seconds for a fixed pure-Python loop (``machine_check``),
  because on shared machines the same code's figures move with the machine's speed of the moment.

Usage: python benchmarks/bench_query.py [--people 100000] [--backend sqlite|postgres|both] [--requests 300]
       [--mpi-only] [--pg ADMIN_DSN]

PostgreSQL: ``--pg``, else ``FHIRBRIDGE_TEST_PG``, else a private durable server (PostgreSQL 16 from the
test extra) started for the run and stopped by its PID afterwards.

``--mpi-only`` measures the MPI linking alone (the same Patient records, the same batches of 1,000,
no index store, no HTTP): records/s wall and per CPU-second of this process (on PostgreSQL the server's
CPU is not included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.config import Settings
from bridge.gctune import tune_gc
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.mpi import MpiConfig, PersonIndex
from bridge.stores.mpi.features import extract_features
from bridge.stores.mpi.matcher import link_records
from bridge.stream.broker import free_port
from tests.services.postgres import admin_dsn
from tests.support.auth import bearer
from tests.support.demodata import HOSPITALS, population_noisy, population_person

LOINC = [
    ("2345-7", "Glucose", "mg/dL", 70, 140),
    ("718-7", "Hemoglobin", "g/dL", 11, 17),
    ("2160-0", "Creatinine", "mg/dL", 0.5, 1.4),
    ("2951-2", "Sodium", "mmol/L", 134, 146),
    ("8480-6", "Systolic BP", "mm[Hg]", 95, 170),
    ("8462-4", "Diastolic BP", "mm[Hg]", 55, 100),
    ("29463-7", "Body weight", "kg", 45, 120),
    ("8867-4", "Heart rate", "/min", 50, 110),
]
SNOMED = [
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertension"),
    ("195967001", "Asthma"),
    ("13645005", "COPD"),
    ("49436004", "Atrial fibrillation"),
]


def _pid(org: str, mrn: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{org}|Patient|{mrn}"))


def patient(org: str, mrn: str, p: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": _pid(org, mrn),
        "meta": {"source": f"urn:fhirbridge:{org}"},
        "identifier": [
            {"system": f"urn:fhirbridge:{org}:mrn", "value": mrn},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": p.ssn.replace("-", "")},
        ],
        "name": [{"family": p.family, "given": [g for g in (p.given, p.middle) if g]}],
        "gender": "female" if p.sex == "F" else "male",
        "birthDate": f"{p.dob[:4]}-{p.dob[4:6]}-{p.dob[6:]}",
        "address": [{"line": [p.street], "city": p.city[0], "state": p.city[1], "postalCode": p.city[2]}],
        "telecom": [{"system": "phone", "value": p.phone}],
    }


def clinical(
    org: str, pid: str, rng: random.Random, n: int, shared: list[tuple[str, str, float]] | None = None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    subject = {"reference": f"Patient/{pid}"}
    for k in range(n):
        rid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{org}|{pid}|{k}"))
        day = f"20{rng.randint(15, 26)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        kind = k % 10
        if kind == 0:
            out.append(
                {
                    "resourceType": "Encounter",
                    "id": rid,
                    "status": "finished",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "subject": subject,
                    "period": {"start": f"{day}T09:00:00Z", "end": f"{day}T09:30:00Z"},
                }
            )
        elif kind == 1:
            code, text = rng.choice(SNOMED)
            out.append(
                {
                    "resourceType": "Condition",
                    "id": rid,
                    "subject": subject,
                    "onsetDateTime": day,
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": text}]},
                }
            )
        else:
            code, text, unit, lo, hi = rng.choice(LOINC)
            value = round(rng.uniform(lo, hi), 1)
            when = f"{day}T{rng.randint(6, 20):02d}:{rng.choice(['00', '15', '30', '45'])}:00Z"
            if shared and rng.random() < 0.5:
                code, when, value = shared[k % len(shared)]
                text, unit = next((t, u) for c, t, u, _, _ in LOINC if c == code)
            out.append(
                {
                    "resourceType": "Observation",
                    "id": rid,
                    "status": "final",
                    "subject": subject,
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "laboratory",
                                }
                            ]
                        }
                    ],
                    "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": text}]},
                    "effectiveDateTime": when,
                    "valueQuantity": {
                        "value": value,
                        "unit": unit,
                        "system": "http://unitsofmeasure.org",
                        "code": unit,
                    },
                }
            )
    return out


def population(
    people: int, seed: int = 1
) -> tuple[list[IncomingBundle], list[tuple[str, dict[str, Any]]], str]:
    rng = random.Random(seed)
    bundles: list[IncomingBundle] = []
    patients: list[tuple[str, dict[str, Any]]] = []
    heavy_pid = ""
    offset = 0
    for i in range(people):
        person = population_person(rng)
        heavy = i == 0
        seen = (
            list(HOSPITALS)
            if heavy
            else (
                rng.sample(list(HOSPITALS), rng.choice([2, 3]))
                if rng.random() < 0.35
                else [rng.choice(HOSPITALS)]
            )
        )
        shared = (
            [
                (c, f"2024-0{m % 9 + 1}-1{m % 9}T08:00:00Z", float(m))
                for m, (c, *_rest) in enumerate(LOINC * 40)
            ]
            if heavy
            else None
        )
        for j, h in enumerate(seen):
            p = person if j == 0 else population_noisy(person, rng)
            mrn = f"{h.mrn_prefix}{i:07d}"
            pat = patient(h.org_id, mrn, p)
            n = 333 if heavy else rng.randint(6, 20)
            resources = [pat, *clinical(h.org_id, pat["id"], rng, n, shared)]
            if heavy and j == 0:
                heavy_pid = pat["id"]
                resources.append(heavy_consent(h.org_id, heavy_pid))
            offset += 1
            bundles.append(
                IncomingBundle(
                    {
                        "resourceType": "Bundle",
                        "timestamp": "2026-01-01T00:00:00Z",
                        "entry": [{"resource": r} for r in resources],
                    },
                    f"{offset:064x}",
                    h.org_id,
                    f"urn:fhirbridge:{h.org_id}:mrn|{mrn}",
                    "fhir.bundles",
                    offset % 3,
                    offset,
                    "2026-01-02T00:00:00.000Z",
                )
            )
            patients.append((h.org_id, pat))
    return bundles, patients, heavy_pid


def heavy_consent(org: str, pid: str) -> dict[str, Any]:
    """The heavy person's privacy Consent: their HIV test results (LOINC 75622-1) are shown to nobody
    without breaking the glass. Its provision looks at each resource's type and code, so every resource
    of $everything is evaluated: the consent's most expensive shape."""
    return {
        "resourceType": "Consent",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{org}|Consent|{pid}")),
        "meta": {"source": f"urn:fhirbridge:{org}"},
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "policyRule": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]
        },
        "provision": {
            "type": "deny",
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
            "code": [{"coding": [{"system": "http://loinc.org", "code": "75622-1"}]}],
        },
    }


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else xs[0]


async def http_latency(
    base: str, pids: list[str], requests: int, count: int, headers: dict[str, str] | None = None
) -> list[float]:
    """Sequential GETs of $everything against a running service; milliseconds per request."""
    import aiohttp

    out: list[float] = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for k in range(min(20, requests)):  # warm up
            async with session.get(
                f"{base}/Patient/{pids[k % len(pids)]}/$everything", params={"_count": str(count)}
            ) as r:
                await r.read()
        for k in range(requests):
            t = time.perf_counter()
            async with session.get(
                f"{base}/Patient/{pids[k % len(pids)]}/$everything", params={"_count": str(count)}
            ) as resp:
                body = await resp.read()
            out.append((time.perf_counter() - t) * 1000)
            assert resp.status == 200, body[:300]
    return out


def start_service(settings: Settings, *, auth: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    """``fhirbridge serve`` in its own process (its own heap, as in production); ``auth=False``: the same
    application without authorization, in this script's own server mode (no command offers that)."""
    port = free_port()
    env = dict(
        os.environ,
        FHIRBRIDGE_DATA_DIR=str(settings.data_dir),
        FHIRBRIDGE_INDEX_URL=settings.stores.index_url,
        FHIRBRIDGE_MPI_URL=settings.stores.mpi_url,
        FHIRBRIDGE_LEDGER_URL=settings.ledger.url,
        FHIRBRIDGE_HTTP_PORT=str(port),
        FHIRBRIDGE_LOG_LEVEL="warning",
    )
    argv = ["-m", "bridge.cli", "serve"] if auth else [__file__, "--serve-without-authorization"]
    proc = subprocess.Popen([sys.executable, *argv], env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/metadata", timeout=2):
                return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the service did not start")


def machine_check() -> float:
    """Seconds for a fixed pure-Python loop of 10 million additions: how fast this machine runs Python at
    this moment, printed next to the figures that depend on it (the values seen are in docs/mpi.md)."""
    t = time.perf_counter()
    s = 0
    for i in range(10_000_000):
        s += i
    return time.perf_counter() - t


def link(mpi: PersonIndex, patients: list[tuple[str, dict[str, Any]]]) -> tuple[float, float]:
    """Load the records into the incremental MPI in batches of 1,000: (wall seconds, CPU seconds)."""
    t, c = time.perf_counter(), time.process_time()
    for k in range(0, len(patients), 1000):
        mpi.upsert_patients(patients[k : k + 1000])
    return time.perf_counter() - t, time.process_time() - c


def batch_link(patients: list[tuple[str, dict[str, Any]]]) -> tuple[float, float, int]:
    """The linking floor: the same matcher over the same records in one in-memory pass, as
    ``fhirbridge mpi link`` runs it (features, blocking, comparison, one EM fit, weights), with no
    database, no persons and no history. Returns (wall seconds, CPU seconds, candidate pairs). Its
    comparison uses rapidfuzz's threads on large inputs, so its wall time can use both cores."""
    config = MpiConfig()
    systems = frozenset(config.strong_identifier_systems)
    t, c = time.perf_counter(), time.process_time()
    res = link_records([extract_features(p, systems) for _, p in patients], config)
    return time.perf_counter() - t, time.process_time() - c, res.candidates


def report_floor(
    name: str, patients: list[tuple[str, dict[str, Any]]], link_s: float, link_cpu: float
) -> None:
    """Print the linking floor (:func:`batch_link`), measured right after the incremental linking, and
    the ratio of the two rates."""
    wall, cpu, pairs = batch_link(patients)
    n = len(patients)
    print(
        f"[{name}] linking floor, the same matcher in memory (batch linker, no database, "
        f"{pairs:,} candidate pairs): {n / wall:,.0f} records/s wall, {n / cpu:,.0f} per CPU-second; "
        f"incremental index / floor: {wall / link_s:.2f} wall, {cpu / link_cpu:.2f} per CPU-second"
    )


def settle(url: str) -> None:
    """After a bulk write: flush it to disk and, on PostgreSQL, vacuum and analyse the database."""
    if url.startswith("postgres"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
            # the dirty buffers written now, not during the next phase (superusers only: else skipped)
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                conn.execute("CHECKPOINT")
    os.sync()


def run_mpi_only(name: str, url: str, patients: list[tuple[str, dict[str, Any]]]) -> None:
    mpi = PersonIndex.open(url)
    try:
        check = machine_check()
        wall, cpu = link(mpi, patients)
        check_after = machine_check()
        stats = mpi.stats()
    finally:
        mpi.close()
    print(
        f"[{name}] MPI only: linked {len(patients):,} records in {wall:.1f}s: {len(patients) / wall:,.0f} records/s "
        f"wall, {len(patients) / cpu:,.0f} per CPU-second; {stats['persons']:,} persons, pairs {stats['pairs']}; "
        f"machine check {check:.2f} s before, {check_after:.2f} s after"
    )
    report_floor(name, patients, wall, cpu)


def run_backend(
    name: str,
    settings: Settings,
    bundles: list[IncomingBundle],
    patients: list[tuple[str, dict[str, Any]]],
    heavy: str,
    requests: int,
) -> dict[str, float]:
    store = IndexStore.open(settings.stores.index_url)
    mpi = PersonIndex.open(settings.stores.mpi_url)
    n_res = sum(len(b.bundle["entry"]) for b in bundles)
    t = time.perf_counter()
    for k in range(0, len(bundles), 500):
        store.apply(bundles[k : k + 500])
    load_s = time.perf_counter() - t
    # The load is over before linking is timed: its writes are flushed and (PostgreSQL) the 2M fresh
    # rows vacuumed and analysed, as an operator does after a bulk load. Otherwise the linking figure
    # includes the tail of the load: the kernel writing back gigabytes of dirty pages, autovacuum on
    # the same 2 cores.
    settle(settings.stores.index_url)
    check = machine_check()
    link_s, link_cpu = link(mpi, patients)
    check_after = machine_check()
    # the same for the MPI database before the latency measurements (the plans need statistics)
    settle(settings.stores.mpi_url)
    linked = mpi.linked_patient_ids(heavy)
    heavy_rows = len(store.resources_for_patients(linked))
    print(
        f"[{name}] loaded {n_res:,} resources in {load_s:.0f}s ({n_res / load_s:,.0f}/s); "
        f"linked {len(patients):,} records in {link_s:.0f}s ({len(patients) / link_s:,.0f} records/s, "
        f"{len(patients) / link_cpu:,.0f} per CPU-second); machine check {check:.2f} s before, "
        f"{check_after:.2f} s after"
    )
    print(f"[{name}] heavy person: {len(linked)} linked records, {heavy_rows} resources")
    report_floor(name, patients, link_s, link_cpu)

    # raw SQL floor: the same rows, one query
    marks = ",".join("?" * len(linked))
    sql = f"SELECT body FROM resources WHERE patient_id IN ({marks})"
    floor = []
    for _ in range(requests):
        t = time.perf_counter()
        rows = store.db.query(sql, linked)
        floor.append((time.perf_counter() - t) * 1000)
    assert len(rows) == heavy_rows
    multi = [p for (_, p) in patients[1::97][:200] if len(mpi.linked_patient_ids(p["id"])) > 1]
    store.close()
    mpi.close()
    proc, base = start_service(settings)
    plain, plain_base = start_service(settings, auth=False)
    port = int(base.rsplit(":", 1)[1])
    # a clinician of an organisation that sent none of the heavy person's records: every resource of the
    # answer goes through the person's Consent, and each access leaves its AuditEvents (SQLite,
    # synchronous=FULL) before the answer goes out
    headers = bearer(
        replace(settings, http=replace(settings.http, port=port)),
        "user/*.rs",
        organization="bench-reader",
        purpose="TREAT",
    )
    try:
        # authorization + consent + audit, and none of them, alternating blocks of the same requests; and
        # the patient's own token (authorization and audit, no Consent applies), to tell the costs apart
        own = bearer(replace(settings, http=replace(settings.http, port=port)), "patient/*.rs", patient=heavy)
        on: list[float] = []
        off: list[float] = []
        mine: list[float] = []
        block = max(1, requests // 4)
        for _ in range(4):
            on += asyncio.run(http_latency(base, [heavy], block, 1000, headers))
            off += asyncio.run(http_latency(plain_base, [heavy], block, 1000))
            mine += asyncio.run(http_latency(base, [heavy], block, 1000, own))
        heavy_lat = on
        rand_lat = asyncio.run(
            http_latency(base, [p["id"] for p in multi] or [heavy], requests, 100, headers)
        )
    finally:
        for p in (proc, plain):
            p.terminate()
            p.wait(30)
    print(
        f"[{name}] $everything heavy person, authorization + consent + audit / none of them (alternating "
        f"blocks of {block}): p50 {statistics.median(on):.1f} / {statistics.median(off):.1f} ms, "
        f"p99 {pct(on, 99):.1f} / {pct(off, 99):.1f} ms; p50 ratio {statistics.median(on) / statistics.median(off):.2f}, "
        f"p99 ratio {pct(on, 99) / pct(off, 99):.2f} (goal <= 1.3)"
    )
    print(
        f"[{name}] $everything heavy person, the patient's own token (authorization + audit, no Consent "
        f"applies) / none: p50 {statistics.median(mine):.1f} / {statistics.median(off):.1f} ms, "
        f"p99 {pct(mine, 99):.1f} / {pct(off, 99):.1f} ms; p99 ratio {pct(mine, 99) / pct(off, 99):.2f}"
    )
    res = {
        "heavy_p50": statistics.median(heavy_lat),
        "heavy_p99": pct(heavy_lat, 99),
        "rand_p50": statistics.median(rand_lat),
        "rand_p99": pct(rand_lat, 99),
        "floor_p50": statistics.median(floor),
        "floor_p99": pct(floor, 99),
    }
    print(
        f"[{name}] $everything heavy person (~{heavy_rows} resources, _count=1000): p50 {res['heavy_p50']:.1f} ms, p99 {res['heavy_p99']:.1f} ms"
    )
    print(
        f"[{name}] $everything random linked persons: p50 {res['rand_p50']:.1f} ms, p99 {res['rand_p99']:.1f} ms"
    )
    print(
        f"[{name}] raw SQL floor (one query, same rows): p50 {res['floor_p50']:.1f} ms, p99 {res['floor_p99']:.1f} ms; "
        f"ratio $everything/floor p50 {res['heavy_p50'] / res['floor_p50']:.1f}x"
    )
    return res


def run_postgres(
    admin: str,
    base: Settings,
    bundles: list[IncomingBundle],
    patients: list[tuple[str, dict[str, Any]]],
    heavy: str,
    args: argparse.Namespace,
) -> None:
    import psycopg

    dbs = [f"fb_bench_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with psycopg.connect(admin, autocommit=True) as conn:
        for d in dbs:
            conn.execute(f'CREATE DATABASE "{d}"')
    root = admin.rsplit("/", 1)[0]
    try:
        pg = replace(
            base, stores=replace(base.stores, index_url=f"{root}/{dbs[0]}", mpi_url=f"{root}/{dbs[1]}")
        )
        if args.mpi_only:
            run_mpi_only("postgres", pg.stores.mpi_url, patients)
        else:
            run_backend("postgres", pg, bundles, patients, heavy, args.requests)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for d in dbs:
                conn.execute(f'DROP DATABASE IF EXISTS "{d}" WITH (FORCE)')


def serve_without_authorization() -> None:
    """The query service without authorization, hence without consent and audit, to measure what they
    cost (this script only: no command of fhirbridge offers it)."""
    from aiohttp import web

    from bridge.service.app import create_app
    from bridge.service.auth.middleware import Authorization

    settings = Settings.from_env()
    tune_gc(settings.gc_threshold)
    app = create_app(settings, authorization=Authorization.off_for_benchmarks())
    web.run_app(app, host=settings.http.host, port=settings.http.port, print=None, access_log=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=100_000)
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument(
        "--pg", default=None, help="admin DSN (default: FHIRBRIDGE_TEST_PG, else a private server)"
    )
    ap.add_argument("--mpi-only", action="store_true", help="measure the MPI linking alone")
    ap.add_argument("--serve-without-authorization", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_without_authorization:
        serve_without_authorization()
        return
    t = time.perf_counter()
    bundles, patients, heavy = population(args.people)
    n_res = sum(len(b.bundle["entry"]) for b in bundles)
    print(
        f"population: {args.people:,} people, {len(patients):,} patient records, {n_res:,} resources "
        f"(generated in {time.perf_counter() - t:.0f}s)"
    )
    work = Path(tempfile.mkdtemp(prefix="fhirbridge-query-"))
    base = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(work)})
    # the GC settings of `fhirbridge index run` / `serve` (bridge/gctune.py), as in production
    tune_gc(base.gc_threshold)
    try:
        if args.mpi_only:
            bundles = []  # only the Patient records are used
        if args.backend in ("sqlite", "both"):
            if args.mpi_only:
                run_mpi_only("sqlite", base.stores.mpi_url, patients)
            else:
                run_backend("sqlite", base, bundles, patients, heavy, args.requests)
        if args.backend in ("postgres", "both"):
            with contextlib.ExitStack() as stack:
                admin = args.pg or stack.enter_context(admin_dsn(durable=True))
                run_postgres(admin, base, bundles, patients, heavy, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
