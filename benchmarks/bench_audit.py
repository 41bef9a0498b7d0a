"""Access audit throughput: AuditEvents per second from ``AuditStore.record`` into the signed audit log.

    .venv/bin/python benchmarks/bench_audit.py [--events 20000] [--threads 4] [--no-pg]

The service records each access's events (1 to 3: one per patient, cycling 1, 2, 3) in one durable
transaction from its database threads, and ``fhirbridge audit run`` appends them to the audit log in
its own process. This runs exactly that, for SQLite (WAL, ``synchronous=FULL``) and, unless ``--no-pg``,
a durable private PostgreSQL (fsync on):

* **pipeline**: ``--threads`` threads, each with its own ``AuditStore``, record the accesses (events built
  beforehand; building costs are printed separately), while ``run_audit_log`` runs in a second process
  with a signing key and the default checkpoint cadence (1,000 entries or 1 s). The clock stops when the
  appender has appended the last row and signed a checkpoint over it. Rate = events / that time.
* **floor**: the same threads insert the same rows (same columns, canonical body, hash) into a bare
  table, one transaction per access with the same durability and no audit log: what any durable
  per-access audit store pays.
* **log alone**: the audit log's own append rate for these rows' leaves (batches of 1,000, signed).

Prints events/s, the ratio pipeline / floor (the price of the store's bookkeeping plus the log, while
both share the machine), how far the appender lagged, and the goal (2,000 AuditEvents/s sustained). The
machine has 2 cores shared with other work: compare figures from the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.config import Settings
from bridge.consumers.audit_log import run_audit_log
from bridge.service.audit.events import audit_events
from bridge.service.auth.scopes import ScopeSet
from bridge.service.auth.tokens import AccessContext
from bridge.stores.audit import (
    AUDIT_TUNING,
    AuditStore,
    canonical,
    leaf_entry,
    open_audit_log,
    row_values,
)
from bridge.stores.db import Database
from ledger import note

GOAL = 2000.0
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def build_accesses(n_events: int) -> list[list[dict[str, Any]]]:
    """Accesses of 1, 2, 3, 1, 2, 3... patients until ``n_events`` events."""
    who = AccessContext(
        issuer="https://idp.example/auth",
        organization="st-mary",
        subject="dr-house",
        client_id="ehr-app",
        scopes=ScopeSet.parse("user/*.rs"),
        patient=None,
        fhir_user="Practitioner/7",
        token_id="jti-1",
        expires_at=None,
    )
    out: list[list[dict[str, Any]]] = []
    total, i = 0, 0
    while total < n_events:
        k = min(1 + i % 3, n_events - total)
        out.append(
            audit_events(
                who,
                action="E",
                interaction="operation",
                patients=[f"pat-{i}-{j}" for j in range(k)],
                touched={"Observation": 12, "Condition": 3, "MedicationRequest": 2},
                query=f"GET /Patient/pat-{i}-0/$everything",
                outcome="success",
                request_id=str(uuid.uuid4()),
                purpose="TREAT",
                break_glass_reason=None,
                recorded=T0 + timedelta(milliseconds=i),
                server="http://127.0.0.1:8080",
                client_address="10.0.0.7",
            )
        )
        total += k
        i += 1
    return out


def build_cost_us() -> float:
    """µs per AuditEvent to build an access's events (the service's CPU; best of 5 runs of 2,000 events)."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        build_accesses(2000)
        best = min(best, time.perf_counter() - t)
    return best / 2000 * 1e6


def run_threads(accesses: Sequence[Any], threads: int, make: Callable[[], Callable[[Any], None]]) -> float:
    """Split ``accesses`` over ``threads`` workers (each with ``make()``'s writer); the wall time."""
    chunks = [accesses[k::threads] for k in range(threads)]
    writers = [make() for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(writer: Callable[[Any], None], chunk: Sequence[Any]) -> None:
        start.wait()
        try:
            for item in chunk:
                writer(item)
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(w, c)) for w, c in zip(writers, chunks, strict=True)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def _appender(env: dict[str, str], done: Any, result: Any) -> None:
    settings = Settings.from_env(env)
    seen_done = False

    def until(progress: Any) -> bool:
        # stop after a step that began once the writers were done, and found no full batch
        nonlocal seen_done
        if seen_done and progress.caught_up:
            return True
        seen_done = done.is_set()
        return False

    t0 = time.process_time()
    progress = run_audit_log(settings, until=until)
    result.put((progress.appended, time.perf_counter(), time.process_time() - t0))


def bench_pipeline(
    env: dict[str, str], accesses: list[list[dict[str, Any]]], threads: int
) -> dict[str, float]:
    settings = Settings.from_env(env)
    AuditStore.open(settings.audit.url).close()  # the table exists before the appender polls it
    open_audit_log(settings).close()
    n = sum(map(len, accesses))
    ctx = multiprocessing.get_context("fork")
    done, result = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_appender, args=(env, done, result))
    proc.start()
    time.sleep(1.0)  # let the appender start (imports, open): not part of the sustained rate

    def make() -> Callable[[list[dict[str, Any]]], None]:
        store = AuditStore.open(settings.audit.url)
        return store.record

    t0 = time.perf_counter()
    c0 = time.process_time()
    wall_writes = run_threads(accesses, threads, make)
    cpu_writes = time.process_time() - c0
    done.set()
    appended, t_end, cpu_appender = result.get(timeout=600)
    proc.join(60)
    if appended != n:
        raise SystemExit(f"the appender appended {appended} of {n} events")
    elapsed = t_end - t0
    return {
        "rate": n / elapsed,
        "write_rate": n / wall_writes,
        "lag": elapsed - wall_writes,
        "cpu_writes_us": cpu_writes / n * 1e6,
        "cpu_appender_us": cpu_appender / n * 1e6,
    }


def bench_floor(url: str, accesses: list[list[dict[str, Any]]], threads: int) -> float:
    rows = [[row_values(e) for e in access] for access in accesses]
    db = Database(url, AUDIT_TUNING)
    seq = "INTEGER PRIMARY KEY" if db.kind == "sqlite" else "BIGSERIAL PRIMARY KEY"
    db.execute(
        f"CREATE TABLE bare (seq {seq}, id TEXT, recorded TEXT, patient_id TEXT, agent TEXT, organization TEXT, "
        "purpose TEXT, break_glass BOOLEAN, outcome TEXT, body TEXT, sha256 TEXT)"
    )
    db.close()

    def make() -> Callable[[list[tuple[Any, ...]]], None]:
        own = Database(url, AUDIT_TUNING)

        def insert(access_rows: list[tuple[Any, ...]]) -> None:
            with own.transaction() as tx:
                tx.executemany(
                    "INSERT INTO bare (id, recorded, patient_id, agent, organization, purpose, break_glass, outcome,"
                    " body, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    access_rows,
                )

        return insert

    return sum(map(len, rows)) / run_threads(rows, threads, make)


def bench_log_alone(env: dict[str, str]) -> float:
    """Append the pipeline's leaves again, to a fresh log, in batches of 1,000."""
    settings = Settings.from_env(env)
    store = AuditStore.open(settings.audit.url)
    leaves = [leaf_entry(r) for page in store.iter_all() for r in page]
    store.close()
    fresh = Settings.from_env({**env, "FHIRBRIDGE_AUDIT_LOG_URL": env["BENCH_SECOND_LOG_URL"]})
    signer = (fresh.audit.key_file or Path()).read_text().strip()
    log = open_audit_log(fresh, signer_key=signer)
    t0 = time.perf_counter()
    for k in range(0, len(leaves), 1000):
        log.append(leaves[k : k + 1000])
    log.checkpoint_now()
    elapsed = time.perf_counter() - t0
    log.close()
    return len(leaves) / elapsed


def run_backend(label: str, env: dict[str, str], floor_url: str, accesses: list[Any], threads: int) -> None:
    settings = Settings.from_env(env)
    skey, _ = note.generate_key(settings.audit.origin, note.ALG_ED25519)
    assert settings.audit.key_file is not None
    settings.audit.key_file.write_text(skey + "\n")
    floor = bench_floor(floor_url, accesses, threads)
    pipe = bench_pipeline(env, accesses, threads)
    alone = bench_log_alone(env)
    n = sum(map(len, accesses))
    print(f"{label}: {n:,} events in {len(accesses):,} accesses, {threads} writer threads")
    print(f"  floor (bare INSERTs, one durable transaction per access)   {floor:9,.0f} events/s")
    print(
        f"  pipeline record() -> appender -> signed log              {pipe['rate']:9,.0f} events/s"
        f"  (record() alone {pipe['write_rate']:,.0f}/s; the log was {pipe['lag'] * 1000:.0f} ms behind at the end)"
    )
    print(f"  the audit log alone (append + sign, batches of 1,000)    {alone:9,.0f} events/s")
    print(
        f"  CPU per event: writers {pipe['cpu_writes_us']:.0f} µs, appender {pipe['cpu_appender_us']:.0f} µs"
    )
    verdict = "met" if pipe["rate"] >= GOAL else "NOT met"
    print(f"  ratio pipeline / floor {pipe['rate'] / floor:.2f}x;  goal >= {GOAL:,.0f} events/s: {verdict}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--no-pg", action="store_true")
    args = ap.parse_args()
    build_us = build_cost_us()
    accesses = build_accesses(args.events)
    size = sum(len(canonical(e)) for a in accesses for e in a) / args.events
    print(
        f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} (shared machine: compare figures of one run); "
        f"building an AuditEvent: {build_us:.0f} µs; canonical JSON {size:,.0f} bytes"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "FHIRBRIDGE_DATA_DIR": tmp,
            "FHIRBRIDGE_AUDIT_URL": f"sqlite://{tmp}/audit.db",
            "FHIRBRIDGE_AUDIT_LOG_URL": f"sqlite://{tmp}/audit-log.db",
            "BENCH_SECOND_LOG_URL": f"sqlite://{tmp}/audit-log-2.db",
        }
        run_backend("SQLite", env, f"sqlite://{tmp}/floor.db", accesses, args.threads)
        if not args.no_pg:
            from tests.services.postgres import admin_dsn

            with admin_dsn(durable=True) as admin:
                urls, drops = [], []
                for _ in range(4):
                    url, drop = pg_scratch(admin)
                    urls.append(url)
                    drops.append(drop)
                try:
                    pg_env = {
                        "FHIRBRIDGE_DATA_DIR": tmp,
                        "FHIRBRIDGE_AUDIT_URL": urls[0],
                        "FHIRBRIDGE_AUDIT_LOG_URL": urls[1],
                        "BENCH_SECOND_LOG_URL": urls[2],
                    }
                    run_backend("PostgreSQL (durable)", pg_env, urls[3], accesses, args.threads)
                finally:
                    for drop in drops:
                        drop()
    return 0


def pg_scratch(admin: str) -> tuple[str, Callable[[], None]]:
    import psycopg

    name = f"fhirbridge_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return admin.rsplit("/", 1)[0] + "/" + name, drop


if __name__ == "__main__":
    sys.exit(main())
