"""The MPI linker alone, fed from the MPI topic (issue 26): linked records/s against the same matcher's
in-memory floor in the same run.

1. ``--records`` Patient versions (default 20,000) of a population with realistic name and place
   frequencies (``tests.support.demodata.population_person``, decision 15): two organisations, the
   second holding noisy copies of half the first's people, are published to a fresh MPI topic exactly
   as the index sink publishes them with ``FHIRBRIDGE_MPI_LINKER=topic`` (key org|id, acks=all).
2. The linker runs in this process through the real consumer: ``build_mpi_sink`` (leader lock, writer
   epoch) and :class:`bridge.consumers.runtime.ConsumerRuntime` on the MPI topic, group
   ``fhirbridge-mpi``, until every record is linked. Its rate is counted from the first batch handed
   to the sink (the group join before it is printed apart).
3. The floor: the same matcher over the same records in one in-memory pass (the batch linker of
   ``fhirbridge mpi link``: features, blocking, comparison, one EM fit; no database, no persons, no
   history), as ``bench_query.py`` measures it, right after; and the incremental index fed directly
   (``PersonIndex.upsert_patients`` in the consumer's batches, no broker), for where the time goes.

Prints the three rates and the ratio linker / floor (goal >= 0.8).

Usage: ``PYTHONPATH=. python benchmarks/bench_mpi_linker.py [--records 20000] [--broker noida|kafka] [--mpi-url URL]
[--batch 1000]``; with ``KAFKA_BOOTSTRAP_SERVERS`` set, that cluster is used instead of a local broker.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from bridge.config import Settings, Topics
from bridge.consumers.mpi_sink import MPI_GROUP, MpiSink, build_mpi_sink, patient_key, patient_message
from bridge.consumers.runtime import ConsumerRuntime, Record
from bridge.stores.mpi import MpiConfig, PersonIndex
from bridge.stores.mpi.features import extract_features
from bridge.stores.mpi.matcher import link_records
from bridge.stream.broker import BrokerHandle, start_local
from bridge.stream.producer import Publisher, producer_config
from bridge.stream.topics import ensure_topics
from tests.support.demodata import Person, population_noisy, population_person


def _patient(org: str, i: int, p: Person) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"{org}-{i}",
        "identifier": [{"system": f"urn:example:{org}:mrn", "value": f"M{i}"}],
        "name": [{"family": p.family, "given": [g for g in (p.given, p.middle) if g]}],
        "gender": "female" if p.sex == "F" else "male",
        "birthDate": f"{p.dob[:4]}-{p.dob[4:6]}-{p.dob[6:]}",
        "telecom": [{"system": "phone", "value": p.phone}],
        "address": [{"line": [p.street], "city": p.city[0], "state": p.city[1], "postalCode": p.city[2]}],
    }


def population(n: int, seed: int = 26) -> list[tuple[str, dict[str, Any]]]:
    """``n`` Patient versions: two thirds at one organisation, noisy copies of half of them at another."""
    rng = random.Random(seed)
    people = [population_person(rng) for _ in range(-(-2 * n // 3))]
    out = [("org-a", _patient("org-a", i, p)) for i, p in enumerate(people)]
    out += [("org-b", _patient("org-b", i, population_noisy(p, rng))) for i, p in enumerate(people)]
    out = out[:n]
    rng.shuffle(out)
    return out


def publish(settings: Settings, bootstrap: str, patients: list[tuple[str, dict[str, Any]]]) -> float:
    """Publish as the index sink does; returns the seconds it took."""
    producer = KafkaProducer(**producer_config(settings, bootstrap, client_id="bench-mpi-linker"))
    t = time.perf_counter()
    futures = [
        producer.send(
            settings.kafka.topics.mpi,
            key=patient_key(org, p["id"]),
            value=patient_message(org, p, "0" * 64, Record("fhir.bundles", 0, i, 0, None, None)),
        )
        for i, (org, p) in enumerate(patients)
    ]
    producer.flush(120)
    for f in futures:
        f.get(120)
    producer.close()
    return time.perf_counter() - t


def run_linker(settings: Settings, bootstrap: str, n: int) -> dict[str, float]:
    """The linker through the real consumer until ``n`` records are linked: seconds from start, from
    the first batch, and CPU seconds of this process from the first batch."""
    sink: MpiSink = build_mpi_sink(settings, follow_index=False)  # the linker alone: no index here
    first: dict[str, float] = {}
    inside = {"wall": 0.0, "batches": 0.0}
    process = sink.process

    def timed(records: Any) -> Any:
        t = time.perf_counter()
        if not first:
            first.update(wall=t, cpu=time.process_time())
        try:
            return process(records)
        finally:
            inside["wall"] += time.perf_counter() - t
            inside["batches"] += 1

    sink.process = timed  # type: ignore[method-assign]
    dead = Publisher(settings, bootstrap)
    t0 = time.perf_counter()
    runtime = ConsumerRuntime(
        settings, bootstrap, sink, dead, group_id=MPI_GROUP, topics=[settings.kafka.topics.mpi]
    )
    try:
        runtime.run(until=lambda: sink.linked + runtime.dead_lettered >= n, poll_timeout_ms=200)
    finally:
        dead.close()
    t1, c1 = time.perf_counter(), time.process_time()
    return {
        "start_s": t1 - t0,
        "join_s": first["wall"] - t0,
        "wall_s": t1 - first["wall"],
        "cpu_s": c1 - first["cpu"],
        "dead": runtime.dead_lettered,
        "sink_s": inside["wall"],
        "batches": inside["batches"],
    }


def floor(patients: list[tuple[str, dict[str, Any]]]) -> tuple[float, float, int]:
    """The same matcher in one in-memory pass (bench_query.batch_link): wall, CPU seconds, pairs."""
    config = MpiConfig()
    systems = frozenset(config.strong_identifier_systems)
    t, c = time.perf_counter(), time.process_time()
    res = link_records([extract_features(p, systems) for _, p in patients], config)
    return time.perf_counter() - t, time.process_time() - c, res.candidates


def incremental(url: str, patients: list[tuple[str, dict[str, Any]]], batch: int) -> tuple[float, float]:
    """The incremental index fed directly in the consumer's batches (no broker): wall, CPU seconds."""
    with PersonIndex.open(url) as mpi:
        t, c = time.perf_counter(), time.process_time()
        for k in range(0, len(patients), batch):
            mpi.upsert_patients(patients[k : k + batch])
        return time.perf_counter() - t, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--broker", choices=("noida", "kafka"), default="noida")
    ap.add_argument(
        "--mpi-url", default=None, help="an empty MPI database (default: SQLite in a temporary directory)"
    )
    ap.add_argument(
        "--batch", type=int, default=1000, help="the consumer's batch size (FHIRBRIDGE_CONSUMER_BATCH)"
    )
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-mpi-linker-") as tmp_s:
        tmp = Path(tmp_s)
        handle: BrokerHandle | None = None
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        kind = "external"
        if not bootstrap:
            handle = start_local(args.broker, tmp / "broker")
            bootstrap, kind = handle.bootstrap, args.broker
        try:
            suffix = uuid.uuid4().hex[:8]
            base = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp / "data")})
            settings = replace(
                base,
                kafka=replace(
                    base.kafka,
                    bootstrap_servers=bootstrap,
                    consumer_batch_size=args.batch,
                    consumer_instance_id=f"bench-{suffix}",
                    topics=Topics(
                        bundles=f"fhir.bundles.{suffix}",
                        deadletter=f"fhir.deadletter.{suffix}",
                        receipts=f"ledger.receipts.{suffix}",
                        mpi=f"mpi.patients.{suffix}",
                    ),
                ),
                stores=replace(
                    base.stores, mpi_url=args.mpi_url or f"sqlite://{tmp / 'linker.db'}", mpi_linker="topic"
                ),
            )
            (tmp / "data").mkdir()
            patients = population(args.records)
            n = len(patients)
            ensure_topics(bootstrap, settings.kafka.topics, settings.kafka)
            pub_s = publish(settings, bootstrap, patients)
            print(
                f"published {n:,} Patient versions to {settings.kafka.topics.mpi} "
                f"({settings.kafka.topics.partitions} partitions, {kind}) in {pub_s:.1f}s"
            )
            got = run_linker(settings, bootstrap, n)
            rate = n / got["wall_s"]
            with PersonIndex.open(settings.stores.mpi_url) as mpi:
                stats = mpi.stats()
            print(
                f"linker (mpi run's sink through the real consumer, {settings.stores.mpi_url.split(':', 1)[0]}, "
                f"batches of {args.batch}): {n:,} records linked in {got['wall_s']:.1f}s after a group join of "
                f"{got['join_s']:.1f}s: {rate:,.0f} records/s wall, {n / got['cpu_s']:,.0f} per CPU-second "
                f"(this process, broker client included); {stats['persons']:,} persons, pairs {stats['pairs']}, "
                f"{got['dead']:.0f} dead letters; {got['batches']:.0f} batches, {got['sink_s']:.1f}s of the wall inside "
                f"the sink ({got['wall_s'] - got['sink_s']:.1f}s in the consumer runtime: polls, fetches, commits)"
            )
            inc_wall, inc_cpu = incremental(f"sqlite://{tmp / 'direct.db'}", patients, args.batch)
            print(
                f"incremental index fed directly (SQLite, same batches, no broker): {n / inc_wall:,.0f} records/s "
                f"wall, {n / inc_cpu:,.0f} per CPU-second"
            )
            f_wall, f_cpu, pairs = floor(patients)
            print(
                f"floor, the same matcher in memory (batch linker, no database, {pairs:,} candidate pairs): "
                f"{n / f_wall:,.0f} records/s wall, {n / f_cpu:,.0f} per CPU-second"
            )
            print(
                f"linker / floor: {f_wall / got['wall_s']:.2f} wall, {f_cpu / got['cpu_s']:.2f} per CPU-second "
                f"(goal >= 0.8); direct incremental / floor: {f_wall / inc_wall:.2f} wall"
            )
        finally:
            if handle is not None:
                handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
