"""End-to-end throughput of the demo stack, with raw kafka-python as the peer (issues 2 and 6).

Generates N ADT messages (our synthetic feeds, 2 hospitals), starts a fresh noida-db broker, runs
the ledger and index consumers as separate processes exactly as ``fhirbridge demo`` does, and
measures:

* ingest: ``fhirbridge ingest`` wall time (process start, parse, map, R4B validation, sign, produce
  with acks=all) -> messages/s;
* seconds from the start of ingest until every bundle is in the ledger and in the index (queryable);
* peer, same run: producing the same bundle bytes with a bare kafka-python producer (same acks=all,
  idempotent config) and consuming them back with a bare consumer;
* bridge producer alone: publishing pre-converted bundles through ``bridge.stream.producer.Publisher``
  (signing included), for the "producer >= 70% of raw" goal.

The stack's run also prints a CPU budget in ms per bundle: each ``fhirbridge ingest`` process (from
its rusage, split by its ``ingest.cpu`` log line into start-up, convert + validate, sign + send and
the producer's I/O thread), the broker's process group (``/proc``), and each consumer process
(``/proc``, split by its ``consumer.stopped`` log line into poll, envelope check, parse, store, MPI,
ledger append, receipts, commit). 1,000 bundles/s on 2 cores leaves 2 ms per bundle for all of them.
The ``fhirbridge ingest`` processes run at once, one per hospital (``--ingest-processes``).

Brokers (``--brokers``, each measured in turn in the same run, then a table side by side):
``kafka`` (one Apache Kafka 4 node from Maven Central, bridge/stream/kafka.py), ``noida`` (the
embedded default), ``kafka3`` (three Apache Kafka nodes, topics with replication factor 3 and
``min.insync.replicas=2``) and ``tansu``.

Usage: python benchmarks/bench_e2e.py [--messages 10000] [--brokers kafka,noida,kafka3] [--ingest-processes 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from adapters import registry
from adapters.base import ConvertedBundle, SourceInfo
from bridge.config import Settings, Topics
from bridge.stores.index.store import IndexStore
from bridge.stores.ledger import open_ledger
from bridge.stream.broker import start_local
from bridge.stream.producer import Publisher, producer_config
from bridge.stream.topics import ensure_topics
from ledger.note import generate_key
from tests.support.demodata import generate, write_files


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge.cli", *args]


TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of one process, in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def group_cpu(pgid: int) -> float:
    """utime + stime of every live process in process group ``pgid`` (the broker and its children)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def children_cpu() -> float:
    """utime + stime of every child process waited for so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def json_lines(text: str, event: str) -> list[dict[str, Any]]:
    import json

    out = []
    for line in text.splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def start_consumers(env: dict[str, str], logs: Path, tag: str) -> dict[str, subprocess.Popen[bytes]]:
    procs = {}
    cenv = dict(env, FHIRBRIDGE_LOG_LEVEL="info")
    for name in ("ledger", "index"):
        out = open(logs / f"{name}-{tag}.log", "wb")  # noqa: SIM115
        procs[name] = subprocess.Popen(cli(name, "run"), env=cenv, stdout=out, stderr=subprocess.STDOUT)
    return procs


def print_budget(rows: list[tuple[str, float]], n: int, wall_s: float) -> None:
    total = sum(ms for _, ms in rows if not _.startswith("  "))
    print(
        f"CPU budget, ms per bundle ({n} bundles, {wall_s:.1f} s wall; 2 cores = {2000 * wall_s / n:.2f} ms/bundle available):"
    )
    for name, ms in rows:
        print(f"  {name:<58} {ms:7.3f}")
    print(
        f"  {'total':<58} {total:7.3f}  -> CPU-bound ceiling {2000 / total if total else 0:,.0f} bundles/s on 2 cores"
    )


def measure_latency(
    settings: Settings,
    bootstrap: str,
    adapter: object,
    items: list[tuple[str, ConvertedBundle]],
    rate: float,
    index: IndexStore,
) -> dict[str, float]:
    """Publish ``items`` at ``rate``/s; latency to the ledger receipt and to the index row, per bundle."""
    import statistics
    import threading

    produced: dict[str, float] = {}
    queryable: dict[str, float] = {}
    stop = threading.Event()
    last_rowid = index.db.query("SELECT COALESCE(MAX(rowid), 0) FROM bundles")[0][0]

    def watch_index() -> None:
        nonlocal last_rowid
        while not stop.is_set():
            rows = index.db.query(
                "SELECT rowid, bundle_sha256 FROM bundles WHERE rowid > ? ORDER BY rowid", (last_rowid,)
            )
            now = time.time()
            for rowid, sha in rows:
                queryable.setdefault(sha, now)
                last_rowid = rowid
            time.sleep(0.005)

    watcher = threading.Thread(target=watch_index, daemon=True)
    watcher.start()
    receipts = KafkaConsumer(
        settings.kafka.topics.receipts,
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        group_id=None,
    )
    receipts.poll(timeout_ms=1000)
    for tp in receipts.assignment():
        receipts.seek_to_end(tp)
    pub = Publisher(settings, bootstrap)
    t0 = time.perf_counter()
    for k, (org, cb) in enumerate(items):
        due = t0 + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        produced[cb.sha256] = time.time()
        pub.publish(cb, adapter, SourceInfo(org))  # type: ignore[arg-type]
    pub.flush()
    ledgered: dict[str, float] = {}
    deadline = time.time() + 120
    while (len(ledgered) < len(items) or len(queryable) < len(items)) and time.time() < deadline:
        polled = receipts.poll(
            timeout_ms=5
        )  # noida-db answers empty fetches at once: poll briefly, then sleep
        if not polled:
            time.sleep(0.01)
        for msgs in polled.values():
            for m in msgs:
                sha = m.key.decode()
                if sha in produced:
                    ledgered.setdefault(sha, m.timestamp / 1000)
    stop.set()
    receipts.close()
    pub.close()
    led = sorted((ledgered[s] - produced[s]) * 1000 for s in ledgered)
    idx = sorted((queryable[s] - produced[s]) * 1000 for s in queryable if s in produced)

    def q(xs: list[float], p: int) -> float:
        return statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))

    return {
        "ledger_p50": q(led, 50),
        "ledger_p99": q(led, 99),
        "index_p50": q(idx, 50),
        "index_p99": q(idx, 99),
    }


class Broker:
    """A broker started for one measurement: its bootstrap, its processes' ids, the env it needs."""

    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        self.env: dict[str, str] = {}
        if kind in ("kafka", "kafka3"):
            from bridge.stream.kafka import start_cluster

            nodes = 3 if kind == "kafka3" else 1
            self.cluster = start_cluster(data_dir / "kafka", nodes)
            self.bootstrap = self.cluster.bootstrap
            self.pids = [n.pid for n in self.cluster.nodes if n.pid is not None]
            self._stop = self.cluster.stop
            if nodes == 3:
                self.env = {"FHIRBRIDGE_REPLICATION": "3"}
        else:
            handle = start_local(kind, data_dir)
            self.bootstrap = handle.bootstrap
            assert handle.pid is not None
            self.pids = [handle.pid]
            self._stop = handle.stop

    def cpu(self) -> float:
        return sum(group_cpu(pid) for pid in self.pids)

    def stop(self) -> None:
        self._stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument(
        "--brokers",
        default="kafka,noida,kafka3",
        help="comma-separated, measured in this order: kafka, noida, kafka3 (3 nodes, RF 3), tansu",
    )
    ap.add_argument("--latency-messages", type=int, default=2000)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (data, consumer logs)")
    ap.add_argument(
        "--ingest-processes",
        type=int,
        default=2,
        help="`fhirbridge ingest` processes running at once: one per org, or an org's files split over "
        "several; 0: one per org, one after the other (the set-up before issue 6)",
    )
    args = ap.parse_args()
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    results = {}
    for kind in kinds:
        print(f"\n===== broker: {kind}")
        results[kind] = run(kind, args)
    if len(results) > 1:
        print("\n===== side by side (same run)")
        rows = [
            ("end to end, bundles/s", "e2e_rate", "{:,.0f}"),
            ("ingest, msgs/s", "ingest_rate", "{:,.0f}"),
            ("CPU per bundle, all processes (ms)", "cpu_total_ms", "{:.3f}"),
            ("  of which the broker (ms)", "cpu_broker_ms", "{:.3f}"),
            ("p99 produce -> queryable at half rate (ms)", "index_p99", "{:.0f}"),
            ("p99 produce -> ledger-committed (ms)", "ledger_p99", "{:.0f}"),
            ("raw kafka-python produce, msgs/s", "raw_rate", "{:,.0f}"),
            ("bridge Publisher, msgs/s", "pub_rate", "{:,.0f}"),
            ("Publisher / raw", "pub_ratio", "{:.2f}"),
        ]
        print(f"{'':<46}" + "".join(f"{k:>12}" for k in results))
        for label, key, fmt in rows:
            print(f"{label:<46}" + "".join(f"{fmt.format(r[key]):>12}" for r in results.values()))


def run(kind: str, args: argparse.Namespace) -> dict[str, float]:
    """One broker's measurement; returns the figures of the side-by-side table."""
    figures: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="fhirbridge-bench-"))
    data_dir = work / "data"
    broker = Broker(kind, data_dir)
    try:
        env = dict(
            os.environ,
            FHIRBRIDGE_DATA_DIR=str(data_dir),
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
            FHIRBRIDGE_LOG_LEVEL="warning",
            FHIRBRIDGE_LOG_FORMAT="json",
            **broker.env,
        )
        settings = Settings.from_env(env)
        people = max(1, args.messages // 2)
        feeds = generate(
            people, hospitals=2, overlap=0.35, seed=99, messages_per_patient=2, max_messages=args.messages
        )
        total = sum(len(v) for v in feeds.values())
        files = write_files(work / "feeds", feeds, per_file=500)
        size = sum(p.stat().st_size for fs in files.values() for p in fs)
        print(f"broker {kind} at {broker.bootstrap}; {total} ADT messages, {size / 1e6:.1f} MB of ER7")

        for org in feeds:
            subprocess.run(
                cli("keys", "create", "--org", org), env=env, check=True, stdout=subprocess.DEVNULL
            )
        skey, _vkey = generate_key(settings.ledger.origin)
        assert settings.ledger.key_file is not None
        settings.ledger.key_file.write_text(skey)
        ensure_topics(broker.bootstrap, settings.kafka.topics)

        # -- convert once in-process to get the exact bundle bytes for the raw peers
        adapter = registry.get("hl7v2")
        converted: list[tuple[str, ConvertedBundle]] = []
        t0 = time.perf_counter()
        for org, paths in files.items():
            for p in paths:
                for o in adapter.convert_path(p, SourceInfo(org, timezone="America/Chicago")):
                    assert isinstance(o, ConvertedBundle), o
                    converted.append((org, o))
        convert_s = time.perf_counter() - t0
        payload = sum(len(c.body) for _, c in converted)
        print(
            f"convert+validate in-process: {len(converted) / convert_s:,.0f} msgs/s ({payload / 1e6:.1f} MB of bundles)"
        )

        # -- peer: raw kafka-python produce of the same bytes
        raw_topic = Topics(
            bundles="bench.raw",
            deadletter="bench.raw.dl",
            receipts="bench.raw.rc",
            partitions=3,
            replication=settings.kafka.topics.replication,
        )
        ensure_topics(broker.bootstrap, raw_topic)
        prod = KafkaProducer(**producer_config(settings, broker.bootstrap))
        t0 = time.perf_counter()
        futs = [prod.send("bench.raw", key=c.routing_key.encode(), value=c.body) for _, c in converted]
        prod.flush()
        for f in futs:
            f.get(30)
        raw_s = time.perf_counter() - t0
        prod.close()
        raw_rate = len(converted) / raw_s
        figures["raw_rate"] = raw_rate
        print(
            f"peer raw kafka-python produce (acks=all, idempotent): {raw_rate:,.0f} msgs/s, {payload / raw_s / 1e6:.1f} MB/s"
        )

        cons = KafkaConsumer(
            "bench.raw",
            bootstrap_servers=broker.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            consumer_timeout_ms=5000,
            max_partition_fetch_bytes=settings.kafka.topics.max_message_bytes,
        )
        t0 = time.perf_counter()
        n = 0
        for _ in cons:
            n += 1
            if n >= len(converted):
                break
        raw_cons_s = time.perf_counter() - t0
        cons.close()
        print(f"peer raw kafka-python consume: {n / raw_cons_s:,.0f} msgs/s")

        # -- bridge publisher alone (signing + envelope), same bytes
        pub_settings = replace(
            settings,
            kafka=replace(
                settings.kafka,
                topics=Topics(
                    bundles="bench.pub",
                    deadletter="bench.pub.dl",
                    receipts="bench.pub.rc",
                    replication=settings.kafka.topics.replication,
                ),
            ),
        )
        ensure_topics(broker.bootstrap, pub_settings.kafka.topics)
        pub = Publisher(pub_settings, broker.bootstrap)
        t0 = time.perf_counter()
        futs = [pub.publish(c, adapter, SourceInfo(org)) for org, c in converted]
        pub.flush()
        for f in futs:
            f.get(30)
        pub_s = time.perf_counter() - t0
        pub.close()
        pub_rate = len(converted) / pub_s
        figures.update(pub_rate=pub_rate, pub_ratio=pub_rate / raw_rate)
        print(f"bridge Publisher (sign + produce): {pub_rate:,.0f} msgs/s = {pub_rate / raw_rate:.0%} of raw")

        # The peers' topics go before the stack runs: noida-db rewrites its whole store on every autosave,
        # so their 20,000 records would tax the broker (and the stack's budget) for the rest of the run.
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, client_id="bench-admin")
        admin.delete_topics(
            [
                t
                for ts in (raw_topic, pub_settings.kafka.topics)
                for t in (ts.bundles, ts.deadletter, ts.receipts)
            ]
        )
        admin.close()

        # -- the demo stack end to end
        logs = work / "logs"
        logs.mkdir()
        procs = start_consumers(env, logs, "e2e")
        index = IndexStore.open(settings.stores.index_url)
        ledger = open_ledger(settings.ledger.url, origin=settings.ledger.origin)
        time.sleep(4)  # let both consumers join their groups before the clock starts
        cpu0 = {"broker": broker.cpu(), **{k: proc_cpu(p.pid) for k, p in procs.items()}}
        children0 = children_cpu()
        t0 = time.perf_counter()
        ienv = dict(env, FHIRBRIDGE_LOG_LEVEL="info")
        jobs = [(org, paths) for org, paths in files.items()]
        if args.ingest_processes > len(jobs):  # split each org's files over more processes
            per = -(-args.ingest_processes // len(jobs))
            jobs = [(org, paths[i::per]) for org, paths in files.items() for i in range(per) if paths[i::per]]
        ingests: list[tuple[subprocess.Popen[bytes], Path]] = []
        for i, (org, paths) in enumerate(jobs):
            cmd = cli(
                "ingest",
                "--adapter",
                "hl7v2",
                "--source",
                org,
                "--timezone",
                "America/Chicago",
                "--no-progress",
                *map(str, paths),
            )
            err_path = logs / f"ingest-{i}.log"
            with open(err_path, "wb") as err_file:
                proc = subprocess.Popen(cmd, env=ienv, stdout=subprocess.DEVNULL, stderr=err_file)
            if args.ingest_processes == 0:
                proc.wait()
            ingests.append((proc, err_path))
        ingest_logs: list[dict[str, Any]] = []
        for proc, err_path in ingests:
            proc.wait()
            err = err_path.read_text(errors="replace")
            if proc.returncode != 0:
                raise SystemExit(f"ingest failed: {err[-2000:]}")
            ingest_logs += json_lines(err, "ingest.cpu")
        ingest_cpu = children_cpu() - children0
        ingest_s = time.perf_counter() - t0
        ledger_done = index_done = None
        while time.perf_counter() - t0 < 600 and (ledger_done is None or index_done is None):
            now = time.perf_counter() - t0
            if ledger_done is None and ledger.size() >= total:
                ledger_done = now
            if index_done is None and index.db.query("SELECT COUNT(*) FROM bundles")[0][0] >= total:
                index_done = now
            time.sleep(0.1)
        e2e_s = max(ledger_done or 0, index_done or 0)
        e2e_rate = total / e2e_s
        cpu1 = {"broker": broker.cpu(), **{k: proc_cpu(p.pid) for k, p in procs.items()}}
        for cproc in procs.values():
            cproc.terminate()
        for cproc in procs.values():
            cproc.wait(30)
        stages: dict[str, dict[str, Any]] = {}
        for name in procs:
            lines = json_lines((logs / f"{name}-e2e.log").read_text(errors="replace"), "consumer.stopped")
            stages[name] = lines[-1]["cpu_ms_per_record"] if lines else {}
        n = total
        rows: list[tuple[str, float]] = []
        startup = sum(float(lg["cpu_s"]["start-up"]) for lg in ingest_logs)
        split = {
            k: sum(float(lg["cpu_s"][k]) for lg in ingest_logs)
            for k in ("convert", "publish", "producer threads and the rest")
        }
        rows.append(
            (f"ingest ({len(ingests)} processes, all threads, incl. start-up)", ingest_cpu * 1000 / n)
        )
        rows.append(("  start-up (imports, topics, keys)", startup * 1000 / n))
        rows.append(("  convert + validate (adapter, main thread)", split["convert"] * 1000 / n))
        rows.append(("  sign + send (Publisher.publish, main thread)", split["publish"] * 1000 / n))
        rows.append(("  producer I/O thread, flush, rest", split["producer threads and the rest"] * 1000 / n))
        rows.append((f"broker ({kind})", (cpu1["broker"] - cpu0["broker"]) * 1000 / n))
        for name in ("ledger", "index"):
            rows.append((f"{name} consumer (process)", (cpu1[name] - cpu0[name]) * 1000 / n))
            st = stages[name]
            for k in sorted(st):
                if k not in ("records", "process"):
                    rows.append((f"  {k}", float(st[k])))
        print_budget(rows, n, e2e_s)
        figures.update(
            e2e_rate=e2e_rate,
            ingest_rate=total / ingest_s,
            cpu_total_ms=sum(ms for name, ms in rows if not name.startswith("  ")),
            cpu_broker_ms=(cpu1["broker"] - cpu0["broker"]) * 1000 / n,
        )
        print(
            f"ingest (fhirbridge ingest, {len(ingests)} processes, incl. start-up): {total / ingest_s:,.0f} msgs/s ({ingest_s:.1f}s)"
        )
        print(
            f"all {total} in the ledger after {ledger_done:.1f}s; all queryable (index) after {index_done:.1f}s"
        )
        print(f"end to end: {e2e_rate:,.0f} bundles/s sustained, from first ingest to last queryable")
        print(f"ratio ingest / raw produce: {total / ingest_s / raw_rate:.2f}")

        # -- latency at half the sustained rate: fresh bundles, paced, produced by the bridge publisher
        rate = max(1.0, e2e_rate / 2)
        fresh = generate(
            max(1, args.latency_messages // 2),
            hospitals=2,
            seed=123,
            messages_per_patient=2,
            max_messages=args.latency_messages,
            start=datetime(2026, 9, 1),
        )
        paced: list[tuple[str, ConvertedBundle]] = []
        for org, msgs in fresh.items():
            for o in adapter.convert("\n".join(msgs).encode(), SourceInfo(org, timezone="America/Chicago")):
                assert isinstance(o, ConvertedBundle)
                paced.append((org, o))
        procs = start_consumers(env, logs, "latency")
        time.sleep(4)
        lat = measure_latency(settings, broker.bootstrap, adapter, paced, rate, index)
        print(f"latency at {rate:,.0f} bundles/s (half the sustained rate), {len(paced)} bundles:")
        print(
            f"  produce -> ledger-committed: p50 {lat['ledger_p50']:.0f} ms, p99 {lat['ledger_p99']:.0f} ms"
        )
        print(f"  produce -> queryable:        p50 {lat['index_p50']:.0f} ms, p99 {lat['index_p99']:.0f} ms")
        figures.update(lat)
        for cproc in procs.values():
            cproc.terminate()
            cproc.wait(30)
    finally:
        broker.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    main()
