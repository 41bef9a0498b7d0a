"""Index consumers 1 -> 2 -> 4 on a topic of 12 partitions, on Apache Kafka and PostgreSQL (issue 26).

One Apache Kafka node (bridge/stream/kafka.py) and a private PostgreSQL; ``--bundles`` signed bundles
(one Patient, one Encounter each; tests/integration/faults.py) are published once into
``fhir.bundles`` with 12 partitions. For each step k, k ``fhirbridge index run`` processes (a group of
their own, distinct static-membership ids, a fresh index database; ``FHIRBRIDGE_MPI_LINKER=topic``,
so the index consumers do not link, which is what lets them scale) start together and consume the
whole topic. The script prints, per step: seconds until every bundle is in the index, bundles/s, CPU
per bundle of the consumers, the broker and PostgreSQL, how the group spread the 12 partitions, and
whether anything was lost (rows in the index against bundles published). ``bundles/s`` counts from
the processes' start (imports, group join, rebalances included); ``after 1st`` from the first bundle
indexed.

Usage: python benchmarks/bench_scaleout.py [--bundles 12000] [--steps 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import Broker, cli, proc_cpu
from kafka import KafkaAdminClient

from bridge.config import Settings
from bridge.stores.index.store import IndexStore
from bridge.stream.producer import Publisher
from bridge.stream.topics import ensure_topics
from tests.integration.faults import publish_synthetic
from tests.services.postgres import PostgresServer


def postgres_cpu(postmaster: int) -> float:
    """CPU of the postmaster and its live children: PostgreSQL's backends call setsid(), so they are not
    in the postmaster's process group."""
    total = proc_cpu(postmaster)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    total += proc_cpu(int(d.name))
            except OSError:
                continue
    return total


def assignment(bootstrap: str, group: str) -> list[int]:
    """Partitions per member of ``group``, sorted (an even spread of 12 over 4 is [3, 3, 3, 3])."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-scaleout")
    try:
        described = admin.describe_groups([group])
    finally:
        admin.close()
    info = described[group] if isinstance(described, dict) else described[0]
    counts = []
    for member in info.get("members", []):
        got = member.get("member_assignment") or {}
        parts = got.get("assigned_partitions") or got.get("assignment") or got.get("partitions") or []
        n = 0
        for item in parts:
            if isinstance(item, dict):
                n += len(item.get("partitions", []))
            elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], (list, tuple)):
                n += len(item[1])
            else:
                n += 1
        counts.append(n)
    return sorted(counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundles", type=int, default=12_000)
    ap.add_argument("--steps", default="1,2,4")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fhirbridge-scaleout-"))
    pg = PostgresServer()
    pg.start()
    broker = Broker("kafka", work / "data")
    try:
        base_env = dict(
            os.environ,
            FHIRBRIDGE_DATA_DIR=str(work / "data"),
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
            FHIRBRIDGE_PARTITIONS="12",
            FHIRBRIDGE_MPI_LINKER="topic",
            FHIRBRIDGE_LOG_LEVEL="warning",
            FHIRBRIDGE_LOG_FORMAT="json",
        )
        settings = Settings.from_env(base_env)
        subprocess.run(
            cli("keys", "create", "--org", "st-mary"), env=base_env, check=True, capture_output=True
        )
        settings = Settings.from_env(base_env)
        ensure_topics(broker.bootstrap, settings.kafka.topics, settings.kafka)
        t0 = time.perf_counter()
        publish_synthetic(Publisher(settings, broker.bootstrap), "st-mary", args.bundles)
        print(
            f"{args.bundles} bundles published to 12 partitions in {time.perf_counter() - t0:.1f}s; "
            f"Apache Kafka at {broker.bootstrap}, PostgreSQL {pg.dsn()}"
        )
        print(
            f"{'consumers':>9} {'seconds':>8} {'bundles/s':>10} {'after 1st':>10} {'consumer ms/b':>14} {'broker ms/b':>12}"
            f" {'postgres ms/b':>14} {'partitions per member':>22} {'indexed':>8}"
        )
        for k in [int(x) for x in args.steps.split(",")]:
            url = pg.create_db(f"idx{k}")
            env = dict(base_env, FHIRBRIDGE_INDEX_URL=url, FHIRBRIDGE_MPI_URL=pg.create_db(f"mpi{k}"))
            index = IndexStore.open(url)
            group = f"scaleout-{k}"
            procs = []
            cpu0 = {"broker": broker.cpu(), "pg": postgres_cpu(pg.pid or 0)}
            start = time.perf_counter()
            for i in range(k):
                penv = dict(env, FHIRBRIDGE_CONSUMER_INSTANCE_ID=f"{group}-{i}")
                procs.append(
                    subprocess.Popen(
                        cli("index", "run", "--group", group),
                        env=penv,
                        stdout=subprocess.DEVNULL,
                        stderr=open(work / f"index-{k}-{i}.log", "wb"),  # noqa: SIM115
                    )
                )
            spread: list[int] = []
            first: float | None = None
            while time.perf_counter() - start < 900:
                done = index.counts()["bundles"]
                if done and first is None:
                    first = time.perf_counter()
                if len(spread) < k or sum(spread) < 12 or min(spread) == 0:  # once settled
                    try:
                        spread = assignment(broker.bootstrap, group)
                    except Exception:
                        spread = []
                if done >= args.bundles:
                    break
                time.sleep(0.2)
            end = time.perf_counter()
            seconds = end - start
            steady = end - (first or start)
            consumer_cpu = sum(proc_cpu(p.pid) for p in procs)
            cpu1 = {"broker": broker.cpu(), "pg": postgres_cpu(pg.pid or 0)}
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
            n = args.bundles
            indexed = index.counts()["bundles"]
            index.close()
            print(
                f"{k:>9} {seconds:>8.1f} {n / seconds:>10,.0f} {n / steady:>10,.0f} {consumer_cpu * 1000 / n:>14.3f}"
                f" {(cpu1['broker'] - cpu0['broker']) * 1000 / n:>12.3f} {(cpu1['pg'] - cpu0['pg']) * 1000 / n:>14.3f}"
                f" {spread!s:>22} {indexed:>8}"
            )
    finally:
        broker.stop()
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
