"""The stand-in behaviours decisions 6, 11 and 17 were built on, measured on Apache Kafka and noida-db
in the same run (issue 25).

For each broker:

* **join**: seconds from a new consumer's creation to its first assignment (5 fresh groups, median);
* **idle**: CPU of the ledger and index consumer processes and of the broker while nothing arrives
  (decision 17: noida-db answers an empty fetch at once, so a caught-up kafka-python consumer spun);
* **compression**: the same 5,000 bundles produced with ``compression_type`` none and gzip (the only
  codec whose package is installed): producer CPU per record, broker CPU per record, bytes the broker
  keeps on disk (decision 17: noida-db rewrites its whole store on each autosave, so stored bytes cost
  broker CPU again and again).

Usage: python benchmarks/bench_brokers.py [--brokers kafka,noida] [--records 5000] [--idle-seconds 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import Broker, cli, proc_cpu
from kafka import KafkaConsumer, KafkaProducer

from bridge.config import Settings, Topics
from bridge.stream.topics import ensure_topics
from ledger.note import generate_key
from tests.integration.faults import synthetic_bundles


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def join_seconds(bootstrap: str, topic: str, trials: int = 5) -> float:
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"join-{uuid.uuid4().hex[:8]}",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1500,
        )
        while not consumer.assignment():
            consumer.poll(timeout_ms=50)
        times.append(time.perf_counter() - t0)
        consumer.close()
    return statistics.median(times)


def idle_cpu(broker: Broker, env: dict[str, str], seconds: float, logs: Path) -> dict[str, float]:
    """CPU share (% of one core) of each consumer and of the broker over ``seconds`` of no traffic."""
    procs = {}
    for name in ("ledger", "index"):
        with open(logs / f"{name}-idle.log", "wb") as out:
            procs[name] = subprocess.Popen(cli(name, "run"), env=env, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(6)  # joined and caught up
    before = {**{k: proc_cpu(p.pid) for k, p in procs.items()}, "broker": broker.cpu()}
    time.sleep(seconds)
    after = {**{k: proc_cpu(p.pid) for k, p in procs.items()}, "broker": broker.cpu()}
    for p in procs.values():
        p.terminate()
        p.wait(30)
    return {k: 100 * (after[k] - before[k]) / seconds for k in after}


def compression_cost(
    broker: Broker, bootstrap: str, records: list[tuple[bytes, bytes]], codec: str | None, data: Path
) -> dict[str, float]:
    topic = f"codec-{codec or 'none'}-{uuid.uuid4().hex[:6]}"
    ensure_topics(
        bootstrap, Topics(bundles=topic, deadletter=topic + ".dl", receipts=topic + ".rc", partitions=3)
    )
    time.sleep(1)
    disk0 = dir_bytes(data)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=10,
        batch_size=256 * 1024,
        compression_type=codec,
        max_request_size=8 * 1024 * 1024,
    )
    cpu0, broker0 = time.process_time(), broker.cpu()
    futures = [producer.send(topic, key=k, value=v) for k, v in records]
    producer.flush()
    for f in futures:
        f.get(60)
    cpu1 = time.process_time()
    time.sleep(3)  # the broker's after-work (noida-db's autosave)
    broker1 = broker.cpu()
    producer.close()
    n = len(records)
    return {
        "producer_ms": (cpu1 - cpu0) * 1000 / n,
        "broker_ms": (broker1 - broker0) * 1000 / n,
        "disk_bytes": (dir_bytes(data) - disk0) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", default="kafka,noida")
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--idle-seconds", type=float, default=15.0)
    args = ap.parse_args()
    records = [(cb.routing_key.encode(), cb.body) for cb in synthetic_bundles("st-mary", args.records)]
    mean = sum(len(v) for _, v in records) / len(records)
    print(f"{len(records)} bundles, {mean:,.0f} bytes each on average")
    results: dict[str, dict[str, float]] = {}
    for kind in [k.strip() for k in args.brokers.split(",") if k.strip()]:
        work = Path(tempfile.mkdtemp(prefix="fhirbridge-brokers-"))
        data_dir = work / "data"
        broker = Broker(kind, data_dir)
        try:
            env = dict(
                os.environ,
                FHIRBRIDGE_DATA_DIR=str(data_dir),
                KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
                FHIRBRIDGE_LOG_LEVEL="warning",
                FHIRBRIDGE_LOG_FORMAT="json",
            )
            settings = Settings.from_env(env)
            skey, _ = generate_key(settings.ledger.origin)
            assert settings.ledger.key_file is not None
            settings.ledger.key_file.parent.mkdir(parents=True, exist_ok=True)
            settings.ledger.key_file.write_text(skey)
            ensure_topics(broker.bootstrap, settings.kafka.topics)
            r: dict[str, float] = {"join_s": join_seconds(broker.bootstrap, settings.kafka.topics.bundles)}
            logs = work / "logs"
            logs.mkdir()
            idle = idle_cpu(broker, env, args.idle_seconds, logs)
            r.update({f"idle_{k}_pct": v for k, v in idle.items()})
            store = data_dir / "kafka" if kind.startswith("kafka") else data_dir
            for codec in (None, "gzip"):
                cost = compression_cost(broker, broker.bootstrap, records, codec, store)
                r.update({f"{codec or 'none'}_{k}": v for k, v in cost.items()})
            results[kind] = r
        finally:
            broker.stop()
            shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("group join, median of 5 (s)", "join_s", "{:.2f}"),
        ("idle ledger consumer (% of a core)", "idle_ledger_pct", "{:.1f}"),
        ("idle index consumer (% of a core)", "idle_index_pct", "{:.1f}"),
        ("idle broker (% of a core)", "idle_broker_pct", "{:.1f}"),
        ("producer CPU/record, none (ms)", "none_producer_ms", "{:.3f}"),
        ("producer CPU/record, gzip (ms)", "gzip_producer_ms", "{:.3f}"),
        ("broker CPU/record, none (ms)", "none_broker_ms", "{:.3f}"),
        ("broker CPU/record, gzip (ms)", "gzip_broker_ms", "{:.3f}"),
        ("disk bytes/record, none", "none_disk_bytes", "{:,.0f}"),
        ("disk bytes/record, gzip", "gzip_disk_bytes", "{:,.0f}"),
    ]
    print(f"{'':<40}" + "".join(f"{k:>12}" for k in results))
    for label, key, fmt in rows:
        print(f"{label:<40}" + "".join(f"{fmt.format(r[key]):>12}" for r in results.values()))


if __name__ == "__main__":
    main()
